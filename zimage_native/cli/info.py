"""``zimage info``: what a model folder holds, read from headers only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import user_errors


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def info(path: Path, as_json: bool):
    """Show the components of a model folder: class, dtypes, tensors and parameters."""
    from ..hub import check_model_folder
    from ..loading import inspect_weights

    check_model_folder(path)
    report = {}
    for name in ("transformer", "vae", "text_encoder"):
        config = json.loads((path / name / "config.json").read_text())
        kind = config.get("_class_name") or ",".join(config.get("architectures", [])) or config.get("model_type", "?")
        report[name] = {"class": kind, **inspect_weights(path / name)}
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    report["scheduler"] = {"class": scheduler.get("_class_name", "?"), "shift": scheduler.get("shift")}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{path}")
    for name in ("transformer", "vae", "text_encoder"):
        r = report[name]
        dtypes = ", ".join(f"{k} {v:,}" for k, v in sorted(r["dtypes"].items()))
        click.echo(f"  {name:<13} {r['class']:<28} {r['parameters']:>15,} params  {r['tensors']:>5} tensors  "
                   f"{r['files']} file(s)  [{dtypes}]")
    click.echo(f"  {'scheduler':<13} {report['scheduler']['class']:<28} shift {report['scheduler']['shift']}")
