"""zimage::silu_mul against the model's SwiGLU gate ``F.silu(w1 x) * w3 x``.

Runs on the GPU when there is one, else on the CPU with Triton's interpreter (slow: few shapes).
Tolerances (relative error; for bf16 and fp16 also the share of elements that differ at all):
    fp32  rel err <= 1e-6
    bf16  rel err <= 1e-3 and <= 1% of elements differ
    fp16  rel err <= 1.25e-4 (bf16's bound over 2^3: fp16 has 3 more mantissa bits) and <= 1% differ
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from zimage_native.model.layers import FeedForward, SwiGLU

from .utils import assert_rel

pytest.importorskip("triton")
from zimage_native.accel import load_kernels  # noqa: E402
from zimage_native.accel.fused_ops import swap_leaf_  # noqa: E402
from zimage_native.accel.fusions import fuse_projections_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3 / 8}  # fp16: 3 more mantissa bits
MAX_MISMATCH = {torch.float32: 1.0, torch.bfloat16: 0.01, torch.float16: 0.01}


def randn(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def check(got, expected, dtype, what):
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
    assert_rel(got, expected, TOLERANCE[dtype], what)
    mismatch = (got != expected).float().mean().item()
    assert mismatch <= MAX_MISMATCH[dtype], f"{what}: {mismatch:.1%} of elements differ (rounding order?)"


CASES = [  # (rows shape, F)
    pytest.param((1, 3), 10240, id="model F=10240 (10 column blocks), 3 rows"),
    pytest.param((), 170, id="one row of odd F=170 (the tiny test model)"),
    pytest.param((2, 3, 4), 33, id="4-D, F=33"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows, n", CASES)
def test_silu_mul_matches_reference_on_gate_up_halves(rows, n, dtype):
    gate_up = randn(*rows, 2 * n, scale=3.0).to(DEVICE, dtype)  # one fused GEMM output
    a, b = gate_up.split(n, dim=-1)  # strided views, read in place
    check(torch.ops.zimage.silu_mul(a, b), F.silu(a) * b, dtype, f"silu_mul {rows} F={n}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # exp(large) = inf, by design
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_silu_mul_separate_and_transposed_inputs(dtype):
    a = randn(3, 50, scale=4.0, seed=1).to(DEVICE, dtype)
    b = randn(50, 3, seed=2).to(DEVICE, dtype).t()  # last-dim stride != 1: copied
    check(torch.ops.zimage.silu_mul(a, b), F.silu(a) * b, dtype, "separate inputs")
    big = torch.tensor([-100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0], device=DEVICE, dtype=dtype)
    check(torch.ops.zimage.silu_mul(big, torch.ones_like(big)), F.silu(big), dtype, "saturation")


@pytest.mark.parametrize("fuse_gate_up", [True, False], ids=["one gate-up GEMM", "two GEMMs"])
def test_feed_forward_with_the_silu_mul_leaf_matches_feed_forward(fuse_gate_up):
    """The whole SwiGLU module, fp32, with the SwiGLU leaf swapped; the fused GEMM keeps w1/w3 as views
    (same keys, no copy), and in-place edits of w1/w3 reach it."""
    torch.manual_seed(0)
    ffn = FeedForward(32, 85).to(DEVICE)
    x = randn(2, 5, 32, seed=3).to(DEVICE)
    expected = ffn(x)
    fused = copy.deepcopy(ffn)
    assert swap_leaf_(fused, SwiGLU) == 1
    if fuse_gate_up:
        assert fuse_projections_(fused) == (0, 1)
    kernels.reset_launch_counts()
    assert_rel(fused(x), expected, 1e-6, "FeedForward with TritonSwiGLU")
    assert kernels.launch_counts() == {"silu_mul": 1}
    assert list(fused.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]
    if fuse_gate_up:
        assert fused.w1.weight.data_ptr() == fused.w13.weight.data_ptr()  # a view, not a copy
        with torch.no_grad():
            fused.w3.weight.mul_(2)
            ffn.w3.weight.mul_(2)
        assert_rel(fused(x), ffn(x), 1e-6, "after an in-place weight edit")
