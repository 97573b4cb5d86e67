"""Every command's --help, read as a new user reads it: each option says what it does, its default and
the unit of its number, in words that need no knowledge of the project this one replaces."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from zimage_native.cli import main

# Counts, not lengths: their names end like a size's but hold no pixels.
NOT_PIXELS = {"batch_size", "graph_cache_size", "queue_size", "shard_size"}


def commands(group=main, path=("zimage",)):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def options():
    return [(path, p) for path, command in commands() for p in command.params
            if isinstance(p, click.Option) and p.name != "help"]


def has_default(option: click.Option) -> bool:
    """A value the option takes when not given, other than none, off or an empty list."""
    default = option.default
    return not (default is None or default is False or isinstance(default, (tuple, list)) and not default
                or type(default).__name__ == "Sentinel" or option.is_flag)


def test_every_option_says_what_it_does_and_its_default():
    problems = []
    for path, option in options():
        text = option.help or ""
        if not text.strip():
            problems.append(f"{path} {option.opts[0]}: no help")
        elif has_default(option) and not option.show_default and "default" not in text.lower():
            problems.append(f"{path} {option.opts[0]}: default {option.default!r} not said")
    assert not problems, problems


def test_no_help_text_assumes_the_user_knows_the_predecessor():
    """The predecessor may be named for what it called something, never as the explanation itself."""
    texts = [(f"{path} {option.opts[0]}", option.help or "") for path, option in options()]
    texts += [(path, command.help or "") for path, command in commands()]
    assert not [where for where, text in texts if "predecessor" in text.lower()]


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_the_printed_help_names_no_predecessor(command):
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--device" in result.output, result.output
    assert "predecessor" not in result.output.lower()


def test_sizes_and_times_name_their_unit():
    problems = []
    for path, option in options():
        text = (option.help or "").lower()
        if re.search(r"(width|height|sizes?|side|overlap)$", option.name) and option.name not in NOT_PIXELS \
                and "pixel" not in text:
            problems.append(f"{path} {option.opts[0]}: no 'pixels'")
        if re.search(r"(timeout|_s|delay)$", option.name) and "second" not in text:
            problems.append(f"{path} {option.opts[0]}: no 'seconds'")
    assert not problems, problems
