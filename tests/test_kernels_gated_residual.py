"""zimage::gated_rms_norm_residual against the blocks' ``x + tanh(gate) * norm2(y)`` (and ``x + norm2(y)``).

Runs on the GPU when there is one, else on the CPU with Triton's interpreter (slow: few shapes).
Tolerances (relative error; for bf16 and fp16 also the share of elements that differ at all):
    fp32  rel err <= 1e-6
    bf16  rel err <= 1e-3 and <= 1% of elements differ
    fp16  rel err <= 1.25e-4 (bf16's bound over 2^3: fp16 has 3 more mantissa bits) and <= 1% differ
"""

from __future__ import annotations

import pytest
import torch

from zimage_native.model.layers import RMSNorm

from .utils import assert_rel

pytest.importorskip("triton")
from zimage_native.accel import load_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3 / 8}  # fp16: 3 more mantissa bits
MAX_MISMATCH = {torch.float32: 1.0, torch.bfloat16: 0.01, torch.float16: 0.01}


def randn(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def make_norm(dim, dtype):
    norm = RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(dim, seed=7))
    return norm.to(DEVICE, dtype)


def reference(x, y, norm, gate):
    return x + norm(y) if gate is None else x + gate.tanh() * norm(y)


def check(got, expected, dtype, what):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_rel(got, expected, TOLERANCE[dtype], what)
    mismatch = (got != expected).float().mean().item()
    assert mismatch <= MAX_MISMATCH[dtype], f"{what}: {mismatch:.1%} of elements differ (rounding order?)"


CASES = [  # (shape, gate shape or None)
    pytest.param((1, 3, 3840), (1, 1, 3840), id="model D=3840, 3 rows, gated"),
    pytest.param((1, 2, 3840), None, id="model D=3840, ungated (context refiner)"),
    pytest.param((123,), (123,), id="one row of odd D=123"),
    pytest.param((2, 3, 5, 40), (2, 1, 1, 40), id="4-D input, per-item gate"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape, gate_shape", CASES)
def test_gated_residual_matches_reference(shape, gate_shape, dtype):
    norm = make_norm(shape[-1], dtype)
    x = randn(*shape, seed=1).to(DEVICE, dtype)
    y = randn(*shape, scale=4.0, seed=2).to(DEVICE, dtype)
    gate = None if gate_shape is None else randn(*gate_shape, scale=1.5, seed=3).to(DEVICE, dtype)
    got = torch.ops.zimage.gated_rms_norm_residual(x, y, norm.weight, norm.eps, gate)
    check(got, reference(x, y, norm, gate), dtype, f"gated residual {shape}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # exp(large) = inf, by design
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gated_residual_tanh_over_its_whole_range(dtype):
    """Gates from 1e-6 (the polynomial branch) to 50 (saturated), both signs."""
    gate = torch.cat([torch.logspace(-6, 1.7, 200), -torch.logspace(-6, 1.7, 200), torch.zeros(1)])
    d = gate.numel()
    norm = make_norm(d, dtype)
    x, y = randn(2, d, seed=1).to(DEVICE, dtype), randn(2, d, seed=2).to(DEVICE, dtype)
    gate = gate.to(DEVICE, dtype)
    check(torch.ops.zimage.gated_rms_norm_residual(x, y, norm.weight, norm.eps, gate),
          reference(x, y, norm, gate), dtype, "tanh range")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gated_residual_reads_strided_inputs_in_place(dtype):
    norm = make_norm(48, dtype)
    h = randn(2, 9, 48, seed=1).to(DEVICE, dtype)
    x = h[:, 2:7]  # rows with gaps between items
    y = randn(2, 48, 5, seed=2).to(DEVICE, dtype).transpose(1, 2)  # last-dim stride != 1: copied
    gate = randn(2, 1, 48, seed=3).to(DEVICE, dtype)
    check(torch.ops.zimage.gated_rms_norm_residual(x, y, norm.weight, norm.eps, gate),
          reference(x, y, norm, gate), dtype, "strided")


def test_gated_residual_promotes_like_eager():
    """An fp32 residual stream with bf16 weights and gate stays fp32, as eager promotion does."""
    norm = make_norm(64, torch.bfloat16)
    x = randn(3, 64, seed=1).to(DEVICE)
    y = randn(3, 64, seed=2).to(DEVICE, torch.bfloat16)
    gate = randn(64, seed=3).to(DEVICE, torch.bfloat16)
    got = torch.ops.zimage.gated_rms_norm_residual(x, y, norm.weight, norm.eps, gate)
    assert got.dtype == torch.float32
    check(got, reference(x, y, norm, gate), torch.float32, "mixed dtypes")
