"""``zimage templates``: list and show the prompt templates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..prompt.templates import CATEGORIES
from ._common import user_errors
from .options import UserPath

templates_dir_option = click.option(
    "--templates-dir", "templates_dirs", multiple=True, type=UserPath(exists=True, file_okay=False, path_type=Path),
    help="Extra folder of templates (repeatable); its templates replace shipped ones of the same name.")


def registry_for(templates_dirs):
    from ..prompt.templates import default_registry

    return default_registry(templates_dirs)


@click.group()
def templates():
    """List and show the prompt templates."""


@templates.command("list")
@click.option("--category", type=click.Choice(CATEGORIES), default=None, help="Only this category.")
@templates_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the templates' fields.")
@user_errors
def list_templates(category, templates_dirs, as_json):
    """One template per line: name, category, description."""
    items = registry_for(templates_dirs).list(category)
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in items], indent=2, ensure_ascii=False))
        return
    width = max((len(t.name) for t in items), default=0)
    for t in items:
        click.echo(f"{t.name:<{width}}  {t.category:<12}  {t.description}")


@templates.command("show")
@click.argument("name")
@templates_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the template's fields as JSON.")
@user_errors
def show_template(name, templates_dirs, as_json):
    """Show the template NAME: its fields, settings and the texts it adds."""
    t = registry_for(templates_dirs).get(name)
    if as_json:
        click.echo(json.dumps(t.to_dict(), indent=2, ensure_ascii=False))
        return
    rows = [("name", t.name), ("category", t.category), ("description", t.description)]
    if t.tags:
        rows.append(("tags", ", ".join(t.tags)))
    if t.settings:
        rows.append(("settings", " ".join(f"{k}={v}" for k, v in t.settings.items())))
    rows.append(("think block", "forced (empty)" if t.force_think_block and not t.thinking_content
                 else "with thinking content" if t.thinking_content else "none"))
    if t.path is not None:
        rows.append(("file", str(t.path)))
    for key, value in rows:
        click.echo(f"{key + ':':<13}{value}")
    for label, text in (("system prompt", t.system_prompt), ("thinking content", t.thinking_content),
                        ("assistant content", t.assistant_content)):
        if text:
            click.echo(f"\n{label}:\n{text}")
