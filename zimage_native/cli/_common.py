"""Helpers shared by the CLI commands: one-line user errors and atomic image writes."""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

import click


class UserError(click.ClickException):
    """An input the command refused while running (a value the engine rejects, a file, a model, memory):
    printed as one line, exit status 1."""


class UsageLine(UserError):
    """A command line that cannot be parsed: click's usage errors (an unknown flag, a bad or missing value
    or argument, a path that does not exist) and the CLI's own checks of the words typed (an unquoted
    prompt, a setting written as a keyword, a flag taking the next flag as its value), printed as one line
    with click's exit status for usage errors, 2."""

    exit_code = 2


# The library's argument names and the CLI flags that set them: a library message about
# ``num_inference_steps`` reaches the user as one about ``--steps``, the flag they typed.
LIBRARY_FLAGS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "num_images_per_prompt": "--num-images",
    "max_sequence_length": "--max-sequence-length", "max_len": "--max-sequence-length", "width": "--width",
    "height": "--height", "strength": "--strength", "cfg_truncation": "--cfg-truncation", "tile_size": "--tile-size",
    "tile_overlap": "--tile-overlap", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
    "top_p": "--top-p", "offload": "--offload", "variant": "--variant", "text_encoder_quant": "--text-encoder-quant",
    "shift": "--shift", "mask_image": "--mask", "llm_url": "--llm-url", "text_encoder_url": "--encoder-url",
    "compile": "--compile", "fp8": "--fp8", "kernels": "--kernels", "cuda_graphs": "--cuda-graphs",
    "overlap": "--tile-overlap", "seed_variance": "--seed-variance", "seed_variance_share": "--seed-variance-share",
    "seed_variance_steps": "--seed-variance-steps", "first_block_cache": "--first-block-cache",
    "cfg_normalization": "--cfg-normalization", "replicas": "--replicas",
}
_NAMES = "|".join(LIBRARY_FLAGS)
# A statement about the argument ("steps must be ...", "text_encoder_quant applies to ...") or one that
# starts with it ("with text_encoder_url the server's ..."), at the start or after ': ', '; ', ', ', '('.
_STATEMENT = re.compile(rf"(?:^|(?<=: )|(?<=; )|(?<=, )|(?<=\())(with )?({_NAMES})"
                        rf"(?(1)(?=[\s,])|(?=\s+(?:must|is|are|needs|applies)\b))")
# A keyword, with its value ("for num_inference_steps=4" -> "--steps=4") or without ("give width= and
# height=" -> "give --width and --height").
_KEYWORD = re.compile(rf"(?<![\w.-])({_NAMES})=(?=([^\s,;)]?))")


#: How a file name ends (a model, LoRA, image, config or prompt file), for :func:`_in_path`.
_FILE_END = re.compile(r"\.(?:safetensors|sft|gguf|ckpt|pt|pth|bin|png|jpe?g|webp|json|toml|txt)$", re.IGNORECASE)


def _in_path(m: re.Match) -> bool:
    """Whether the match lies in a path or a file name (``/runs/width=512/``, ``strength=0.8.safetensors``:
    the word it is part of holds a path separator or ends as a file name does), which stays as it is."""
    word = re.search(r"\S*$", m.string[:m.start()]).group() + re.match(r"\S*", m.string[m.start():]).group()
    return "/" in word or "\\" in word or _FILE_END.search(word.rstrip(".,;:)]}'\"")) is not None


def _outside_paths(pattern: re.Pattern, replace, message: str) -> str:
    return pattern.sub(lambda m: m.group(0) if _in_path(m) else replace(m), message)


def _flag_keywords(message: str) -> str:
    return _outside_paths(_KEYWORD, lambda m: LIBRARY_FLAGS[m.group(1)] + ("=" if m.group(2) else ""), message)


def cli_message(message: str) -> str:
    """``message`` with the library argument names it starts a statement with, or gives as keywords,
    replaced by their flags."""
    return _flag_keywords(_STATEMENT.sub(lambda m: (m.group(1) or "") + LIBRARY_FLAGS[m.group(2)], message))


# In the engine's warnings an argument name is a whole word: the unambiguous ones (with an underscore)
# are named by their flags on the command line ("guidance_scale 1 turns CFG on" -> "--guidance-scale 1 ..."),
# and any given as a keyword as in an error ("give width= ..." -> "give --width ...").
_WARNING_NAME = re.compile(rf"(?<![\w.-])({'|'.join(k for k in LIBRARY_FLAGS if '_' in k)})(?![\w])")


class FlagNames(logging.Filter):
    """On the CLI's log handler: the engine's warnings name the flags the user types, not the library's
    argument names."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("zimage_native") and record.levelno >= logging.WARNING:
            message = _flag_keywords(record.getMessage())
            record.msg, record.args = _outside_paths(_WARNING_NAME, lambda m: LIBRARY_FLAGS[m.group(1)], message), None
        return True


def _is_user_error(e: BaseException) -> bool:
    """The library's input errors. The engine's own classes are looked up among the modules already
    imported (an exception of a module that was never imported cannot have been raised), so this
    module imports neither torch nor the engine."""
    if isinstance(e, (ValueError, FileNotFoundError, KeyError)):
        return True
    accel, hub = sys.modules.get("zimage_native.accel._kernels"), sys.modules.get("zimage_native.hub")
    chat, encoder = sys.modules.get("zimage_native.prompt.remote"), sys.modules.get("zimage_native.server.remote")
    finite = sys.modules.get("zimage_native.finite")
    return ((accel is not None and isinstance(e, accel.AccelerationUnavailable))
            or (finite is not None and isinstance(e, finite.NonFiniteError))
            or (hub is not None and isinstance(e, hub.HubError))
            or (chat is not None and isinstance(e, chat.ChatServerError))
            or (encoder is not None and isinstance(e, encoder.RemoteEncoderError)))


def user_errors(fn):
    """Turn the library's input errors into one-line CLI errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            torch = sys.modules.get("torch")
            if torch is not None and isinstance(e, torch.OutOfMemoryError):
                from ..devices import MEMORY_ADVICE

                said = next((line.strip() for line in str(e).splitlines() if line.strip()), "out of memory")  # (torch's ends in its docs' address, in parentheses)
                raise UserError(f"{said}{'' if said.endswith('.') else '.'} To use less memory: a smaller --width/--height "
                                f"or --batch-size, or --tiled-vae (the VAE decode is the peak at 2K and larger), for "
                                f"the images; for the weights, {MEMORY_ADVICE}") from None
            if isinstance(e, OSError) and e.filename is not None:  # a file or folder the system refused
                raise UserError(f"cannot use {e.filename}: {e.strerror or e}") from None
            if not _is_user_error(e):
                raise
            raise UserError(user_message(e)) from None

    return wrapper


def user_message(e: BaseException) -> str:
    """The one line a library input error (``_is_user_error``) is shown as, in flag names."""
    loading = sys.modules.get("zimage_native.loading")
    mismatch = loading is not None and isinstance(e, loading.StateDictMismatchError)
    message = e.args[0] if isinstance(e, KeyError) and e.args and not mismatch else str(e)
    message = getattr(e, "cli_message", None) or message  # without advice meant for a Python caller
    return cli_message(str(message).splitlines()[0]) if str(message) else type(e).__name__


def check_writable_folder(folder: Path, flag: str) -> None:
    """Make ``folder`` (and its parents) and check that a file can be written in it, so that a run fails
    in seconds rather than after loading and sampling; raises ValueError naming ``flag``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        # A file where a folder of the path should be: the system says "File exists" or "Not a directory".
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else e.strerror or e
        if blocker is None and e.errno == errno.ENOENT:  # /proc: "No such file or directory" of a folder that is there
            base = next(p for p in (folder, *folder.parents) if p.exists())
            why = f"{'it' if base == folder else base} is a folder but takes no new file or folder: {e.strerror}"
        raise ValueError(f"{flag}: cannot write in the folder {folder} ({why})") from None


def save_image_atomic(image, path: Path, pnginfo=None) -> None:
    """Write a PNG (``metadata.save_png``: fast compression) next to its destination, then rename: no
    partial or empty file on failure. The file is made by ``open`` (not ``tempfile.mkstemp``, whose
    files are private), so it has the permissions the umask gives any new file."""
    from ..metadata import save_png

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    f = open(tmp, "xb")
    try:
        with f:
            save_png(image, f, pnginfo)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_user_text(path: Path, what: str) -> str:
    """A text file a user wrote: UTF-8, with or without a byte order mark (Notepad's), or UTF-16 with
    one (what Windows PowerShell 5's ``>`` writes); anything else is a one-line error."""
    data = Path(path).read_bytes()
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
