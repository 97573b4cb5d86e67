"""``zimage format-prompt``: print the exact text the text encoder reads for a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..hub import DEFAULT_MODEL
from ..prompt.format import CAPTION_TOKENS_MOST
from . import PromptCommand
from ._common import user_errors
from .templates import registry_for, templates_dir_option

DEFAULT_MAX_SEQUENCE_LENGTH = 512


def load_tokenizer(model: str):
    """The tokenizer of a model folder (its tokenizer/ subfolder, or the folder itself when it is a
    tokenizer folder) or of a Hub id (only the tokenizer files are downloaded)."""
    from ..hub import tokenizer_from_folder

    path = Path(model).expanduser()
    if path.exists():
        if (path / "tokenizer").is_dir():
            return tokenizer_from_folder(path / "tokenizer")
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            return tokenizer_from_folder(path)
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected a model folder with tokenizer/ or a tokenizer folder")
    if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise FileNotFoundError(f"model folder not found: {model}")
    from ..hub import resolve_tokenizer_folder

    return tokenizer_from_folder(resolve_tokenizer_folder(str(model)))  # a failure: one-line HubError


def prompt_options(fn):
    """The prompt fields of the chat format, shared by the commands that format prompts."""
    options = [
        click.option("--system-prompt", default=None, help="System message, placed first."),
        click.option("--thinking-content", default=None, help="Text inside <think>...</think> (adds the block)."),
        click.option("--assistant-content", default=None,
                     help="Assistant text after the think block, closed with <|im_end|>."),
        click.option("--force-think-block/--no-force-think-block", default=None,
                     help="Add an empty think block when there is no thinking content (--no-... drops a template's)."),
        click.option("--strip-quotes/--no-strip-quotes", default=None,
                     help='Remove " from the prompt (Z-Image renders quoted text).'),
        click.option("--template", default=None, help="Template name; explicit flags override its fields."),
        templates_dir_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def resolve_prompt_fields(template, templates_dirs, system_prompt, thinking_content, assistant_content,
                          force_think_block, strip_quotes) -> dict:
    """The keyword arguments of format_prompt: a template's fields with the explicit flags winning."""
    if template is not None:
        return registry_for(templates_dirs).get(template).prompt_fields(
            system_prompt=system_prompt, thinking_content=thinking_content, assistant_content=assistant_content,
            force_think_block=force_think_block, strip_quotes=strip_quotes)
    if templates_dirs:
        registry_for(templates_dirs)  # still check the folders
    return {"system_prompt": system_prompt, "thinking_content": thinking_content,
            "assistant_content": assistant_content, "force_think_block": bool(force_think_block),
            "strip_quotes": bool(strip_quotes)}


@click.command("format-prompt", cls=PromptCommand)
@click.argument("prompt")
@prompt_options
@click.option("--tokens", is_flag=True, help="Also print the token count and ids (needs the model's tokenizer).")
@click.option("--model", default=None,
              help=f"Model folder or Hub id whose tokenizer counts the tokens [default: {DEFAULT_MODEL}].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the text (and the tokens with --tokens).")
@user_errors
def format_prompt_command(prompt, system_prompt, thinking_content, assistant_content, force_think_block,
                          strip_quotes, template, templates_dirs, tokens, model, as_json):
    """Print the exact chat-formatted text of PROMPT that the text encoder reads.

    Without --tokens the output is that text and nothing else (no newline is added).
    """
    from ..prompt.format import format_prompt

    if model is not None and not tokens:
        raise ValueError("--model only names the tokenizer for --tokens; add --tokens")
    fields = resolve_prompt_fields(template, templates_dirs, system_prompt, thinking_content, assistant_content,
                                   force_think_block, strip_quotes)
    text = format_prompt(prompt, **fields)
    ids = None
    if tokens:
        ids = load_tokenizer(model or DEFAULT_MODEL)(text, add_special_tokens=False)["input_ids"]
    if as_json:
        out = {"text": text}
        if ids is not None:
            out.update(tokens=len(ids), ids=ids)
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    click.echo(text, nl=False)
    if ids is None:
        return
    if not text.endswith("\n"):
        click.echo()
    click.echo(f"tokens: {len(ids)}")
    click.echo(f"ids: {ids}")
    if len(ids) > CAPTION_TOKENS_MOST:  # no limit keeps them all
        click.echo(f"note: {len(ids)} tokens is more than the released models take (--max-sequence-length "
                   f"{CAPTION_TOKENS_MOST} at most): shorten the prompt, or its last {len(ids) - CAPTION_TOKENS_MOST} tokens are cut")
    elif len(ids) > DEFAULT_MAX_SEQUENCE_LENGTH:
        over = len(ids) - DEFAULT_MAX_SEQUENCE_LENGTH
        click.echo(f"note: {len(ids)} tokens is more than the default max_sequence_length "
                   f"{DEFAULT_MAX_SEQUENCE_LENGTH}; raise the limit (--max-sequence-length {len(ids)}) or the "
                   f"last {over} tokens are cut")
