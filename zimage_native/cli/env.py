"""``zimage env``: what this machine offers the engine (zimage_native.environment)."""

from __future__ import annotations

import json

import click


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def env(as_json: bool) -> None:
    """Show the versions, GPUs, memory and packages the engine sees, which accelerations can run
    here (and why not), and which example profile fits each GPU. Include it in bug reports."""
    from ..environment import lines, notes, report, verdicts

    rep = report()
    if as_json:
        said = notes(rep)
        rep["runs_here"] = {what: {"runs": why is None, "why": why, **({"note": said[what]} if what in said else {})}
                            for what, why in verdicts(rep)}
        click.echo(json.dumps(rep, indent=2))
        return
    for line in lines(rep):
        click.echo(line)
