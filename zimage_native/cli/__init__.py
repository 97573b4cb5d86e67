"""The ``zimage`` command line: a thin layer over the library, one module per command.

Each flag maps to one argument of the library. Bad input exits non-zero with a one-line message
(no traceback); images are written atomically.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


_INTERRUPTED: list[int] = []


def _exit_interrupted(signum, frame):
    sys.stderr.write("interrupted\n")
    _INTERRUPTED.append(signum)
    raise SystemExit(130)


def _the_zimage_command() -> bool:
    """Whether this process is the ``zimage`` command starting (its script, or ``python -m
    zimage_native.cli``), not a program that imports the CLI."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv:
        return argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["zimage_native.cli"]
    return os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else ""))[0] == "zimage"


# Ctrl-C while the command's own modules import (click and the commands: 0.2 to 0.5 s installed) printed
# Python's import traceback (7 to 46 lines): while they do, it prints `interrupted` and exits 130, as
# later. Python's own start before this line (about 0.1 s) keeps Python's behaviour.
_STARTING = (_the_zimage_command() and threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if _STARTING:
    signal.signal(signal.SIGINT, _exit_interrupted)

import logging  # noqa: E402
import re  # noqa: E402

import click  # noqa: E402

from .. import __version__  # noqa: E402
from ._common import LIBRARY_FLAGS  # noqa: E402


#: The predecessor's flags (docs/cli.md, "Coming from the predecessor") that are spelled otherwise here.
PREDECESSOR_FLAGS = {
    "--cpu-offload": "--offload model (each component on the GPU only while it runs)",
    "--flash-attn": "--attention flash_attn_2 (or --attention auto, the fastest backend installed)",
    "--attention-backend": "--attention",
    "--use-custom-scheduler": "the default: the engine always runs its own FlowMatch Euler scheduler",
    "--api-url": "--encoder-url URL, a `zimage serve` that encodes the prompts (docs/server.md)",
    "--use-api-encoder": "--encoder-url URL, a `zimage serve` that encodes the prompts (docs/server.md)",
    "--api-model": "the model of the `zimage serve` given by --encoder-url",
}


_SIZE = "the size is two flags, in pixels: --width W --height H (for example --width 1024 --height 768)"
_COUNT = ("--num-images N makes N images per prompt (--batch-size B only samples B of them at once: faster on a "
          "GPU, more memory)")
_CFG = "the CFG scale is --guidance-scale (0 turns CFG off, the Turbo default; the base model's is 4)"
_SAMPLER = "there is one sampler, FlowMatch Euler; --steps and --shift set its schedule"
#: Other tools' flags (Automatic1111, ComfyUI, diffusers scripts), with the parameter a command must have for
#: the hint to apply and what they are here; click's own suggestion can mislead (--batch -> --batch-size,
#: which gives no more images).
OTHER_TOOLS_FLAGS = {
    "--size": ("width", _SIZE), "--resolution": ("width", _SIZE),
    "--batch": ("num_images", _COUNT), "--batch-count": ("num_images", _COUNT), "--n-iter": ("num_images", _COUNT),
    "--n-samples": ("num_images", _COUNT),
    "--cfg": ("guidance_scale", _CFG), "--cfg-scale": ("guidance_scale", _CFG),
    "--sampler": ("shift", _SAMPLER), "--scheduler": ("shift", _SAMPLER),
    "--prompt": ("prompt", "the prompt is the first argument, in quotes: {command} \"a red fox\" ..."),
}


def _one_line(e: click.UsageError) -> click.ClickException:
    """click's usage errors (no such file, bad choice, unknown option) as one line, with click's exit
    status 2 for usage errors (:class:`UsageLine`); the line names the command's --help, or for a flag of
    the predecessor project what it is here, or for -v after a command where it goes."""
    from ._common import UsageLine

    where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
    # the predecessor's and other tools' flags, with '_' for '-' too (`--n_iter`, the CompVis scripts' spelling)
    dashed = e.option_name.replace("_", "-") if isinstance(e, click.NoSuchOption) else None
    if dashed in PREDECESSOR_FLAGS:
        return UsageLine(f"No such option '{e.option_name}': the predecessor's {dashed} is "
                         f"{PREDECESSOR_FLAGS[dashed]} here{where}")
    if dashed in OTHER_TOOLS_FLAGS and e.ctx is not None:
        param, what = OTHER_TOOLS_FLAGS[dashed]
        if any(p.name == param for p in e.ctx.command.params):
            return UsageLine(f"No such option '{e.option_name}': {what.format(command=e.ctx.command_path)}{where}")
    if isinstance(e, click.NoSuchOption) and e.option_name.startswith("--") and e.ctx is not None:
        # `--num_inference_steps 4`, `--text_encoder_quant int8`: the library's argument name, or a flag's
        # with '_' (click suggested nothing, or --compile for --n_samples, or three flags)
        flag = _command_flags(e.ctx).get(e.option_name[2:])
        if flag is not None:
            return UsageLine(f"No such option '{e.option_name}': it is {flag[0]} here{where}")
    extra = re.match(r"Got unexpected extra arguments? \((.*)\)$", e.format_message())
    prompt = e.ctx.params.get("prompt") if e.ctx is not None else None
    if extra and _prompt_keyword(e.ctx, prompt) is not None and _follows(e.ctx, prompt, extra[1]):
        # `zimage generate prompt=a cat`, `prompt="a cat" width=512`: written as a Python call takes them
        return UsageLine(_prompt_keyword_hint(e.ctx, prompt, _extra_words(e.ctx, extra[1])))
    flags = _keyword_flags(e.ctx, _extra_words(e.ctx, extra[1])) if extra and e.ctx is not None else None
    if flags is not None:  # `width=512`, `llm_url=http://host:8000/v1`: written as a Python call takes them
        return UsageLine(f"{e.format_message()}: settings are flags here, {flags}{where}")
    if extra and isinstance(prompt, str) and _lora_before(e.ctx, prompt) is not None:
        # `--lora style.safetensors 0.8 "a cat"`: the scale was read as the prompt, the prompt as more
        return UsageLine(f"--lora takes its scale in the same argument, after ':': --lora "
                         f"{_lora_before(e.ctx, prompt)}:{prompt} ('{prompt}' was read as the prompt){where}")
    if extra and isinstance(prompt, str) and " " not in prompt.strip() and _follows(e.ctx, prompt, extra[1]):
        # an unquoted prompt: its first word, the extra words right after it (not a stray flag value
        # such as the 768 of `--width 1024 768`, which no quoting would fix)
        words = _extra_words(e.ctx, extra[1])
        # `zimage generate a red fox width=512`: the keywords at the end are settings, not more prompt
        cut, flags = _trailing_settings(e.ctx, words, 1)
        text = " ".join([prompt, *words[:cut]])
        how = (f"put it in quotes, and settings are flags: {e.ctx.command_path} \"{text}\" {flags}" if flags else
               f"put it in quotes, {e.ctx.command_path} \"{text}\"")
        return UsageLine(f"the prompt is one argument: {how} ... (the words after '{prompt}' were read as more "
                         f"arguments)")
    first = extra[1].split(" ")[0] if extra else ""  # ('' for an empty argument: `zimage generate "a cat" ""`)
    lora = _lora_before(e.ctx, first) if first and e.ctx is not None else None
    if lora is not None:  # `--lora style.safetensors 0.8`: the scale read as an extra argument
        return UsageLine(f"--lora takes its scale in the same argument, after ':': --lora {lora}:{first} "
                         f"('{first}' was read as one more argument){where}")
    if isinstance(e, click.NoSuchOption) and e.ctx is not None:  # `--lora style.safetensors -0.5`: click read
        # the negative scale as short options ('-0')
        scale = next((a for a in e.ctx.meta.get(ARGS_KEY, []) if a.startswith(e.option_name)
                      and _lora_before(e.ctx, a) is not None), None)
        if scale is not None:
            return UsageLine(f"--lora takes its scale in the same argument, after ':': --lora "
                             f"{_lora_before(e.ctx, scale)}:{scale} ('{scale}' was read as an option){where}")
    if isinstance(e, click.NoSuchOption) and e.option_name in ("-v", "--verbose") and e.ctx and e.ctx.parent:
        root = e.ctx.find_root().info_name
        command = e.ctx.command_path[len(root):].strip()
        return UsageLine(f"No such option '{e.option_name}': -v/--verbose goes before the command: "
                         f"{root} -v {command} ...")
    return UsageLine(e.format_message().splitlines()[0] + where)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "none")


def _command_flags(ctx: click.Context) -> dict[str, tuple[str, click.Option]]:
    """The command's flags (``"--width"``, its option) by their names without dashes, with '_' or '-'
    (``width``, ``tiled_vae``, ``tiled-vae``), and by the library's names of their arguments
    (``num_inference_steps``: ``--steps``)."""
    flags: dict[str, tuple[str, click.Option]] = {}
    for p in ctx.command.params:
        for opt in (p.opts + p.secondary_opts) if isinstance(p, click.Option) else ():
            if opt.startswith("--"):
                flags[opt[2:]] = flags[opt[2:].replace("-", "_")] = (opt, p)
    flags.update({name: flags[flag[2:]] for name, flag in LIBRARY_FLAGS.items()
                  if name not in flags and flag[2:] in flags})
    return flags


def _keyword_flags(ctx: click.Context, words: list[str]) -> str | None:
    """Extra arguments written as keywords (``width=512``, ``num_inference_steps=4``,
    ``llm_url=http://host:8000/v1``: the library's argument name or a flag's name without its dashes, with
    '_' or '-') as the flags of the command (``--width 512``); None unless every word is one, so a prompt
    word that holds a URL or an '=' is not taken for a keyword."""
    flags = _command_flags(ctx)
    out = []
    for word in words:
        m = re.fullmatch(r"([A-Za-z][\w-]*)=(.*)", word, re.S)
        if m is None or m[1] not in flags:
            return None
        opt, param = flags[m[1]]
        if not param.is_flag:
            out.append(_with_value(opt, param, m[2]))
            continue
        if m[2].lower() not in _TRUE + _FALSE:
            return None
        # tiled_vae=True: --tiled-vae; progress=false or no_progress=1: --no-progress
        names = param.opts if (m[2].lower() in _TRUE) == (opt in param.opts) else param.secondary_opts
        named = [n for n in names if n.startswith("--")]
        if not named:  # a switch with no "off" flag: off is the default
            return None
        out.append(named[0])
    return " ".join(out)


def _trailing_settings(ctx: click.Context, words: list[str], first: int = 0) -> tuple[int, str | None]:
    """Where the settings written as keywords at the end of ``words`` start (the first such index from
    ``first`` on, else ``len(words)``), and their flags (:func:`_keyword_flags`; None if there are none)."""
    return next(((i, f) for i in range(first, len(words)) if (f := _keyword_flags(ctx, words[i:]))),
                (len(words), None))


def _prompt_keyword(ctx: click.Context, prompt) -> str | None:
    """The prompt of a command's PROMPT argument written as a keyword (``prompt=a cat``, as in a Python
    call: the shell passes ``prompt="a cat"`` as ``prompt=a cat``): ``a cat``; None for any other prompt
    (one holding an '=' later in its text, ``a sign reading x=1``, stays a prompt)."""
    m = re.match(r"prompt=(.*)", prompt, re.S | re.I) if isinstance(prompt, str) and "prompt" in ctx.params else None
    return m[1] if m else None


def _prompt_keyword_hint(ctx: click.Context, prompt: str, words: list[str]) -> str | None:
    """The line for a PROMPT argument written as a keyword (:func:`_prompt_keyword`), and the words
    that followed it on the command line: more words of an unquoted prompt, then settings written as
    keywords (named as their flags, :func:`_keyword_flags`); None if ``prompt`` is no such keyword."""
    text = _prompt_keyword(ctx, prompt)
    if text is None:
        return None
    cut, flags = _trailing_settings(ctx, words)
    text = " ".join([text, *words[:cut]]).strip() or "a red fox"
    settings = f", and settings are flags: {ctx.command_path} \"{text}\" {flags}" if flags else \
        f": {ctx.command_path} \"{text}\""
    return f"the prompt is the first argument, in quotes, without '{prompt[:prompt.index('=') + 1]}'{settings} ..."


class PromptCommand(click.Command):
    """A command whose PROMPT argument written as a keyword (``zimage generate prompt="a cat"``) is
    refused (:func:`_prompt_keyword_hint`) rather than taken as the prompt ``prompt=a cat``."""

    def invoke(self, ctx):
        from ._common import UsageLine

        hint = _prompt_keyword_hint(ctx, ctx.params.get("prompt"), [])
        if hint is not None:
            raise UsageLine(hint)
        return super().invoke(ctx)


def _extra_words(ctx: click.Context, text: str) -> list[str]:
    """The extra arguments that click's message joins with spaces (``text``) as the words of the command
    line (:meth:`ZImageGroup.parse_args`), so that one holding a space (``negative_prompt="low quality"``)
    stays one word."""
    given = sorted({a for a in ctx.meta.get(ARGS_KEY, []) if a}, key=len, reverse=True)
    words, i = [], 0
    while i < len(text):
        word = next((a for a in given if text.startswith(a, i) and text[i + len(a):i + len(a) + 1] in ("", " ")),
                    text[i:].split(" ", 1)[0])
        words.append(word)
        i += len(word) + 1
    return words or [text]


def _with_value(opt: str, param: click.Option, value: str) -> str:
    """The flag with a keyword's value, as the flag takes it: a choice as the flag spells it (Python's
    ``offload=None``: ``--offload none``; ``compile=True``, a flag whose value is optional: ``--compile``),
    a value that is none of its choices as the choices (``--kernels [none|triton]``)."""
    import shlex

    choices = getattr(param.type, "choices", None)
    if choices is None:
        return f"{opt} {shlex.quote(value)}"
    names, low = {str(c).lower(): str(c) for c in choices}, value.lower()
    if low in _TRUE and getattr(param, "_flag_needs_value", False):
        return opt
    off = next((names[n] for n in ("none", "off") if n in names), None) if low in _FALSE else None
    value = names.get(low, off)
    return f"{opt} {shlex.quote(value)}" if value is not None else f"{opt} [{'|'.join(map(str, choices))}]"


def _follows(ctx: click.Context, prompt: str, extra: str) -> bool:
    """Whether the extra arguments start right after the prompt on the command line (as
    :meth:`ZImageGroup.parse_args` saw it)."""
    args = ctx.meta.get(ARGS_KEY, [])
    return any(word == prompt and i + 1 < len(args) and not args[i + 1].startswith("-")
               and extra.startswith(args[i + 1]) for i, word in enumerate(args))


def _lora_before(ctx: click.Context, extra: str) -> str | None:
    """The --lora value without a scale of its own that the number ``extra`` follows on the command
    line, if it does."""
    args, number = ctx.meta.get(ARGS_KEY, []), r"[-+]?(\d+\.?\d*|\.\d+)"
    if not re.fullmatch(number, extra):
        return None
    return next((args[i + 1] for i in range(len(args) - 2) if args[i] == "--lora" and args[i + 2] == extra
                 and not re.search(f":{number}$", args[i + 1])), None)


def _check_flag_values(command: click.Command, args: list[str], path: str, help_names=()) -> None:
    """Refuse a flag that takes a value followed by another of the command's flags, its help flags
    (``help_names``) included: click takes the flag as the value (``--negative-prompt --tiled-vae``
    drew an image with the negative prompt "--tiled-vae" and no tiling; ``-o --overwrite`` asked for
    ``--overwrite.png``; ``--negative-prompt --help`` ran the model)."""
    from ._common import UsageLine

    names = {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
    names.update(help_names)
    takes = {o: p for p in command.params if isinstance(p, click.Option) and not p.is_flag and not p.count
             and not getattr(p, "_flag_needs_value", False) for o in p.opts}
    for flag, value in zip(args, args[1:]):
        if flag == "--":
            return
        if flag in takes and value in names:
            raise UsageLine(f"{flag} takes a value, and the next word is the flag {value}: give the value after "
                            f"{flag} ({flag} VALUE {value} ...) (see `{path} --help`)")


def _expand_seeds(command: click.Command, args: list[str]) -> list[str]:
    """``args`` of ``command`` with ``--seed 1 2 3`` as ``--seed 1 --seed 2 --seed 3`` (click options take
    one value each) where its --seed takes several (``zimage generate``), up to a ``--``; a command whose
    --seed takes one seed (``zimage rewrite``) keeps its words: expanded, ``--seed 1 2`` ran with seed 2
    and ``--seed 5 1984`` lost the prompt 1984."""
    if not any(isinstance(p, click.Option) and "--seed" in p.opts and p.multiple for p in command.params):
        return list(args)
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        if args[i] == "--":
            return out + list(args[i + 1:])
        if args[i] == "--seed":
            out.append(args[i + 1]) if i + 1 < len(args) else None
            i += 2
            while i < len(args) and re.fullmatch(r"-?\d+", args[i]):
                out += ["--seed", args[i]]
                i += 1
            continue
        i += 1
    return out


#: ``ctx.meta`` key of the command line as :meth:`ZImageGroup.parse_args` read it (for :func:`_one_line`).
ARGS_KEY = "zimage.args"


#: click >= 8.2 raises this for a bare group or command with no_args_is_help (its help, exit status 2);
#: click 8.1 prints the help and exits without an exception.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a command runs: a KeyboardInterrupt (every ``except KeyboardInterrupt`` catches it),
    but not that class itself. CPython (3.10 to 3.13) marks the process to end by SIGINT whenever a
    KeyboardInterrupt leaves code run from a string (the ``exec`` of a dataclass's or namedtuple's
    generated methods, frequent while torch and transformers import), even one caught afterwards; with
    ``python -m zimage_native.cli`` the run then ended by the signal after its ``interrupted`` line
    (status -2 to a Python parent) instead of exiting 130. A subclass is not marked."""


def _raise_interrupted(signum, frame):
    raise Interrupted


def _catch_ctrl_c():
    """Make SIGINT raise :class:`Interrupted` while a command runs, where it would raise Python's own
    KeyboardInterrupt (not where it is ignored, as in a background job, or handled by an embedding
    program, or outside the main thread); returns the function that restores the handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return lambda: None
    signal.signal(signal.SIGINT, _raise_interrupted)
    return lambda: signal.signal(signal.SIGINT, signal.default_int_handler)


class ZImageGroup(click.Group):
    """Lets ``--seed 1 2 3`` mean ``--seed 1 --seed 2 --seed 3`` where --seed takes several
    (:func:`_expand_seeds`), and prints click's usage errors as one line with exit status 2
    (:func:`_one_line`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _NO_ARGS_IS_HELP:
            raise
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx):
        restore = _catch_ctrl_c()
        try:
            return super().invoke(ctx)
        except _NO_ARGS_IS_HELP:
            raise
        except click.UsageError as e:
            raise _one_line(e) from None
        except KeyboardInterrupt:
            # Ctrl-C while a model loads or downloads, or a conversion runs: click says "Aborted!" with
            # exit status 1, a failure; 130 (128 + SIGINT) is the shell's status for an interrupted command,
            # as a generation interrupted while sampling has (its line says what it wrote). A conversion's
            # output appears only when complete, and an image only when written.
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None
        finally:
            restore()

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        path, words, leaf = f"{ctx.command_path} {name}", rest, cmd
        while isinstance(leaf, click.Group) and words and words[0] in leaf.commands:  # `templates show ...`
            path, leaf, words = f"{path} {words[0]}", leaf.commands[words[0]], words[1:]
        if leaf is not None and not isinstance(leaf, click.Group):
            own = _expand_seeds(leaf, words)
            rest, ctx.meta[ARGS_KEY] = [*rest[:len(rest) - len(words)], *own], [*args[:len(args) - len(words)], *own]
            _check_flag_values(leaf, own, path, ctx.help_option_names)
        return name, cmd, rest

    def parse_args(self, ctx, args):
        ctx.meta[ARGS_KEY] = list(args)
        return super().parse_args(ctx, args)


@click.group(cls=ZImageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="zimage")
@click.option("-v", "--verbose", is_flag=True, help="Log what the engine does.")
def main(verbose: bool) -> None:
    """zimage: fast, PyTorch-native Z-Image text-to-image."""
    from ._common import FlagNames

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(FlagNames())
    # A no-op where the root logger has handlers already (an embedding program, pytest).
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


from .bench import bench  # noqa: E402
from .convert import convert  # noqa: E402
from .env import env  # noqa: E402
from .format_prompt import format_prompt_command  # noqa: E402
from .generate import generate  # noqa: E402
from .info import info  # noqa: E402
from .rewrite import rewrite  # noqa: E402
from .serve import serve  # noqa: E402
from .templates import templates  # noqa: E402

main.add_command(generate)
main.add_command(info)
main.add_command(convert)
main.add_command(bench)
main.add_command(format_prompt_command)
main.add_command(templates)
main.add_command(rewrite)
main.add_command(serve)
main.add_command(env)

if _STARTING and signal.getsignal(signal.SIGINT) is _exit_interrupted:  # from here on: ZImageGroup.invoke
    signal.signal(signal.SIGINT, signal.default_int_handler)
if _INTERRUPTED:  # its SystemExit was caught on the way (code that catches everything, or C code that clears
    raise SystemExit(130)  # errors): the run would go on after saying `interrupted` (seen once in 23 tries)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
