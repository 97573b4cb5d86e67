"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
from pathlib import Path
from types import ModuleType

import pytest
import torch

from zimage_native.accel.fp8 import cpu_rowwise_scaled_mm

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script, not a package module) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"zimage_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; b is the reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "output") -> float:
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} (max abs {(a.double() - b.double()).abs().max():.3e})"
    return err


#: fp8 on the CPU (the tests' stand-in for fp8 tensor cores) needs per-row scales in the CPU
#: torch._scaled_mm: PyTorch 2.13 has them, 2.11 (the GPU image's) does not.
needs_cpu_fp8 = pytest.mark.skipif(not cpu_rowwise_scaled_mm(),
                                   reason=f"torch {torch.__version__}: the CPU _scaled_mm takes per-tensor scales only")


def _triton_version() -> tuple[int, int]:
    import re

    import triton

    major, minor = (int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    return major, minor


#: The GPU build probes (tests/gpu_build_probe.py and the GGML kernel's FMA probe) drive Triton's
#: compiler through its internals, which change between releases; they were written against
#: Triton 3.6 to 3.9. An older Triton is skipped by name; a newer one that breaks them fails.
needs_probe_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None and _triton_version() < (3, 6),
    reason="the GPU build probes drive Triton 3.6-3.9's compiler internals; this Triton is older")


#: The output dtypes of the dequantisation kernels, their test ids, and the integer views that compare bits.
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPE_IDS = ["fp32", "bf16", "fp16"]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bits_equal(got: torch.Tensor, expected: torch.Tensor, what: str, nan_payloads: bool = False) -> None:
    """Bit equality of two float tensors (``nan_payloads``: any NaN equals any NaN)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    differ = got.view(BITS[got.dtype]) != expected.view(BITS[expected.dtype])
    if nan_payloads:
        differ &= ~(got.isnan() & expected.isnan())
    assert not differ.any(), f"{what}: {int(differ.sum())} of {differ.numel()} values differ from the twin"


@contextlib.contextmanager
def reserved_port():
    """A port for a server that another process starts and binds later (Ray Serve's proxy, ``zimage
    serve --ray --port``). A socket stays bound there with SO_REUSEADDR, not listening: the server's
    bind (SO_REUSEADDR, as uvicorn and Ray Serve set it) succeeds, while no bind to port 0 (the other
    xdist worker's servers) is handed the port meanwhile, as one picked and closed could be."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def patch_weight_reads(monkeypatch, read) -> None:
    """Replace ``loading.iter_tensors`` with ``read`` in ``loading`` and in every module that imported it
    by name (imported first: a module first imported while the patch is on keeps the patched function
    after the test, and the next test to load a model in the process raised the test's exception)."""
    import zimage_native.formats.controlnet
    import zimage_native.loading
    import zimage_native.prompt.rewriter
    import zimage_native.text_encoder

    for module in (zimage_native.loading, zimage_native.text_encoder, zimage_native.formats.controlnet,
                   zimage_native.prompt.rewriter):
        monkeypatch.setattr(module, "iter_tensors", read)


class WeightsRead(Exception):
    """Raised by :func:`refuse_weight_reads`' patch: a load got past its checks to reading weights."""


def refuse_weight_reads(monkeypatch) -> list[str]:
    """:func:`patch_weight_reads` with a reader that raises :class:`WeightsRead`, except for a read of
    ``formats.controlnet.DECIDING`` alone (the one tensor whose values a ControlNet's layout, and so its
    bytes, depend on: read before it is weighed), which reads it and is listed in the list returned."""
    import inspect

    from zimage_native.formats.checkpoint import read_header
    from zimage_native.formats.controlnet import DECIDING
    from zimage_native.loading import iter_tensors

    decided = []

    def read(*args, **kwargs):
        call = inspect.signature(iter_tensors).bind(*args, **kwargs)
        files, keep = list(call.arguments["files"]), call.arguments.get("keep")
        keys = [k for f in files for k in read_header(f)[0] if keep is None or keep(k)]
        if keys != [DECIDING]:
            raise WeightsRead
        decided.append(DECIDING)
        call.arguments["files"] = files
        return iter_tensors(*call.args, **call.kwargs)

    patch_weight_reads(monkeypatch, read)
    return decided
