"""Import ``zimage_native.kernels`` on demand, with the errors a user can act on.

The package lives in the repository's top-level ``kernels/`` folder and is installed as
``zimage_native.kernels`` (pyproject.toml maps it; a checkout needs ``pip install -e .``). Nothing
here runs at import time: the engine imports the kernels (and Triton) only when
``kernels="triton"`` is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType

NAME = "zimage_native.kernels"


class AccelerationUnavailable(RuntimeError):
    """An acceleration that was asked for cannot run here (no Triton, no GPU, a missing library)."""

INSTALL_HINT = ("install it with `pip install 'zimage-native[triton]'` (Linux with an NVIDIA or AMD GPU; on Windows "
                "it installs triton-windows)")


def triton_unavailable_reason() -> str | None:
    """None when Triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return f"the triton package is not installed; {INSTALL_HINT}"
    try:
        importlib.import_module("triton")
    except Exception as e:  # a broken install raises anything from ImportError to RuntimeError
        return f"triton is installed but fails to import ({type(e).__name__}: {e})"
    return None


@contextlib.contextmanager
def _interpreter_env(interpret: bool):
    """TRITON_INTERPRET=1 while the kernels are decorated (Triton reads it in @triton.jit), then restored."""
    if not interpret:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def load_kernels(interpret: bool = False) -> ModuleType:
    """Import and return ``zimage_native.kernels`` (which registers the ``zimage::`` ops).

    ``interpret=True`` builds the kernels with Triton's CPU interpreter (slow; for tests on a
    machine without a GPU). The choice is made once per process, at the first import.
    Raises RuntimeError with an install hint when Triton is missing.
    """
    if NAME in sys.modules:
        return _checked(sys.modules[NAME], interpret)
    reason = triton_unavailable_reason()
    if reason is not None:
        raise AccelerationUnavailable(f"kernels='triton' needs Triton: {reason}")
    with _interpreter_env(interpret):
        try:
            module = importlib.import_module(NAME)
        except ModuleNotFoundError as e:
            if e.name != NAME:
                raise
            raise AccelerationUnavailable(f"{NAME} is not installed: reinstall zimage-native (`pip install -e .` in a "
                               "checkout); pyproject.toml maps the kernels/ folder to that name") from e
    return _checked(module, interpret)


def _checked(module: ModuleType, interpret: bool) -> ModuleType:
    if not module.is_available():
        raise AccelerationUnavailable(f"kernels='triton' needs Triton: {NAME} was imported without it ("
                           f"{triton_unavailable_reason() or 'restart Python after installing it'})")
    if interpret and not module.INTERPRETED:
        raise AccelerationUnavailable(f"{NAME} was already imported without TRITON_INTERPRET=1; "
                           "the interpreter can only be chosen before the first import")
    return module
