"""Shared pieces of the kernels: tile heuristics, row views, the launch counter, jit helpers.

Every kernel in this folder walks "rows": the input is viewed as (B, L, D) with a unit stride on
the last dim and arbitrary strides on B and L (so slices such as ``h[:, :Nx]`` or the two halves
of a fused gate-up output are read in place, without a copy), and the output is written
contiguous in the input's shape.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import triton
import triton.language as tl

# Elements one program touches per input: 4096 keeps one D = 3840 row per program on the GPU
# (Liger's layout) and gives the CPU interpreter large numpy tiles instead of many tiny programs.
TILE_ELEMENTS = 4096

# Every launch passes these options. No fused multiply-add contraction (ptxas --fmad=false): the GPU
# build then performs the same IEEE operations, each rounded, as the CPU interpreter the tests run and
# as the torch twins (``a * b + c`` rounds twice; explicit fmas, such as those inside the correctly
# rounded division, stay). It also pins the behaviour across Triton versions (3.10 changes the
# default). tests/test_kernels_gpu_build.py reads the SASS: no FFMA in the row kernels.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# Kernel launches per op since the last reset. Eager launches only: a replayed CUDA graph
# re-runs kernels without passing through Python.
LAUNCHES: Counter[str] = Counter()


def count_launch(op: str) -> None:
    LAUNCHES[op] += 1


def launch_counts() -> dict[str, int]:
    return dict(LAUNCHES)


def reset_launch_counts() -> None:
    LAUNCHES.clear()


def is_interpreted(kernel) -> bool:
    """True when the kernel was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def row_tile(n_cols: int, max_block_cols: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_COLS, BLOCK_ROWS, num_warps) for a row kernel over ``n_cols`` columns.

    A row reduction needs the whole row in one tile (``max_block_cols=None``); an elementwise
    kernel may split long rows (``max_block_cols=1024``).
    """
    block_cols = triton.next_power_of_2(max(n_cols, 1))
    if max_block_cols is not None:
        block_cols = min(block_cols, max_block_cols)
    block_rows = max(1, TILE_ELEMENTS // block_cols)
    tile = block_cols * block_rows
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2
    return block_cols, block_rows, num_warps


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` (any rank >= 1) as (B, L, D) with unit stride on D; copies only when it must."""
    if t.ndim < 3:
        t = t.reshape((1,) * (3 - t.ndim) + tuple(t.shape))
    elif t.ndim > 3:
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whatever device happens to be current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"zimage::{op}: tensors on different devices: {devices}")


def check_float(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"zimage::{op}: {name} must be a floating-point tensor, got {t.dtype}")


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` -> ``dtype``, rounding to nearest even (as torch does).

    bf16 is rounded with integer ops: Triton's CPU interpreter truncates fp32 -> bf16 casts, which
    would break the rounding-order contract in the tests. On the GPU this matches cvt.rn.bf16.f32
    bit for bit (NaN payloads aside) at the cost of a few integer ops in a memory-bound kernel.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        bits = tl.where(x != x, 0x7FC00000, bits)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def row_sum(x):
    """Sum over axis 1. ``tl.sum`` minus its wrapper: the wrapper is itself a @triton.jit function,
    which Triton's CPU interpreter can only call when triton was *imported* with TRITON_INTERPRET=1
    (torch and diffusers import triton early); the builtin reduce has no such constraint."""
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def rms_normalize(x, w, eps, n_cols):
    """Rows of fp32 ``x`` (masked lanes 0) -> cast(x * rsqrt(mean(x^2) + eps), w.dtype) * w, in w's dtype.

    The rounding order of diffusers' RMSNorm: statistics in fp32, the normalised value rounded to
    the weight dtype *before* the weight multiply, the product rounded to the weight dtype.
    """
    var = row_sum(x * x) / n_cols
    normed = round_to(x * tl.math.rsqrt(var + eps)[:, None], w.dtype)
    return round_to(normed.to(tl.float32) * w.to(tl.float32)[None, :], w.dtype)


@triton.jit
def tanh_f32(x):
    """tanh in fp32 to ~2e-7 relative error, from tl.exp only (so it also runs in the interpreter).

    Cephes' tanhf: an odd polynomial below |x| = 0.625 (no cancellation near 0), 1 - 2/(e^2|x| + 1)
    above (e^2|x| overflowing to inf gives exactly 1).
    """
    ax = tl.abs(x)
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1) * z * x + x
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    return tl.where(ax < 0.625, small, tl.where(x < 0, -big, big))
