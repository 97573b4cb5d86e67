"""Helpers shared by the CLI commands: one-line user errors and atomic image writes."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import click


class UserError(click.ClickException):
    """Printed as one line, exit status 1 (click's convention for usage errors is 2)."""


def _is_user_error(e: BaseException) -> bool:
    """The library's input errors. The engine's own classes are looked up among the modules already
    imported (an exception of a module that was never imported cannot have been raised), so this
    module imports neither torch nor the engine."""
    if isinstance(e, (ValueError, FileNotFoundError, KeyError)):
        return True
    accel = sys.modules.get("zimage_native.accel._kernels")
    return accel is not None and isinstance(e, accel.AccelerationUnavailable)


def user_errors(fn):
    """Turn the library's input errors into one-line CLI errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not _is_user_error(e):
                raise
            loading = sys.modules.get("zimage_native.loading")
            mismatch = loading is not None and isinstance(e, loading.StateDictMismatchError)
            message = e.args[0] if isinstance(e, KeyError) and e.args and not mismatch else str(e)
            raise UserError(str(message).splitlines()[0] if str(message) else type(e).__name__) from None

    return wrapper


def save_image_atomic(image, path: Path, **save_kwargs) -> None:
    """Write a PNG next to its destination, then rename: no partial or empty file on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", **save_kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
