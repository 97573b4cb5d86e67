"""zimage::rms_norm against the model's RMSNorm (and norm(x) * (1 + scale) of the blocks).

Runs on the GPU when there is one, else on the CPU with Triton's interpreter (slow: few shapes).
Tolerances (relative error of the whole output, and for bf16 and fp16 the share of elements that differ
at all, which catches a wrong rounding order):
    fp32  rel err <= 1e-6
    bf16  rel err <= 1e-3 and <= 1% of elements differ (measured: 0, bit-exact)
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


def make_norm(dim: int, dtype: torch.dtype, eps: float = 1e-5) -> RMSNorm:
    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    return norm.to(DEVICE, dtype)


def check(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_rel(got, expected, TOLERANCE[dtype], what)
    mismatch = (got != expected).float().mean().item()
    assert mismatch <= MAX_MISMATCH[dtype], f"{what}: {mismatch:.1%} of elements differ (rounding order?)"


def randn(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


CASES = [  # (x shape, scale shape or None)
    pytest.param((1, 3, 3840), (1, 1, 3840), id="model D=3840, 3 rows, with the adaLN scale"),
    pytest.param((1, 2, 3840), None, id="model D=3840, no scale (context refiner)"),
    pytest.param((1, 2, 2560), None, id="caption embedder D=2560"),
    pytest.param((123,), None, id="one row of odd D=123"),
    pytest.param((5, 123), (123,), id="odd D=123, 2-D, scale shared by every row"),
    pytest.param((2, 3, 4, 40), (2, 1, 1, 40), id="4-D input, per-item scale"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape, scale_shape", CASES)
def test_rms_norm_matches_reference(shape, scale_shape, dtype):
    norm = make_norm(shape[-1], dtype)
    x = (randn(*shape, scale=3.0)).to(DEVICE, dtype)
    scale = None if scale_shape is None else randn(*scale_shape, scale=0.3, seed=1).to(DEVICE, dtype)
    expected = norm(x) if scale is None else norm(x) * (1.0 + scale)
    got = torch.ops.zimage.rms_norm(x, norm.weight, norm.eps, scale)
    check(got, expected, dtype, f"rms_norm {shape} scale={scale_shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rms_norm_reads_strided_inputs_in_place(dtype):
    """A slice with row gaps (h[:, :Nx]) and a transposed tensor (last-dim stride != 1)."""
    norm = make_norm(64, dtype)
    h = randn(2, 10, 64).to(DEVICE, dtype)
    sliced = h[:, 3:9]
    scale = randn(2, 1, 64, seed=1).to(DEVICE, dtype)
    check(torch.ops.zimage.rms_norm(sliced, norm.weight, norm.eps, scale), norm(sliced) * (1.0 + scale), dtype,
          "row-strided slice")
    transposed = randn(2, 64, 7).to(DEVICE, dtype).transpose(1, 2)
    check(torch.ops.zimage.rms_norm(transposed, norm.weight, norm.eps), norm(transposed), dtype, "transposed")


def test_rms_norm_mixed_dtypes_follow_eager_promotion():
    """fp32 activations with bf16 weights: normalised in fp32, cast to bf16 before the weight multiply."""
    norm = make_norm(96, torch.bfloat16)
    x = randn(4, 96, scale=5.0).to(DEVICE)
    check(torch.ops.zimage.rms_norm(x, norm.weight, norm.eps), norm(x), torch.bfloat16, "fp32 x, bf16 weight")


def test_rms_norm_empty_and_bad_inputs():
    norm = make_norm(16, torch.float32)
    assert torch.ops.zimage.rms_norm(torch.empty(0, 16, device=DEVICE), norm.weight, 1e-5).shape == (0, 16)
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.zimage.rms_norm(torch.ones(3, 8, device=DEVICE), norm.weight, 1e-5)
    with pytest.raises(TypeError, match="scale dtype"):
        torch.ops.zimage.rms_norm(torch.ones(3, 16, device=DEVICE), norm.weight, 1e-5,
                                  torch.ones(16, device=DEVICE, dtype=torch.bfloat16))
