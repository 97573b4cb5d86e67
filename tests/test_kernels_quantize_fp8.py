"""zimage::quantize_fp8_rows against its slow twin ``accel.fp8.quantize_rows`` (plain PyTorch).

Runs on the GPU when there is one, else on the CPU with Triton's interpreter. The contract is
bit equality: the same fp8 bytes and the same fp32 scales as the twin (both round to nearest even
after a correctly rounded division), for bf16, fp16 and fp32 inputs, including subnormal fp8
values, all-zero rows and strided row views.
"""

from __future__ import annotations

import pytest
import torch

from zimage_native.accel.fp8 import Float8Linear, cpu_rowwise_scaled_mm, quantize_rows

pytest.importorskip("triton")
from zimage_native.accel import load_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check_equal(x):
    q, scale = torch.ops.zimage.quantize_fp8_rows(x)
    q_ref, scale_ref = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (x.shape[0], 1)
    assert torch.equal(scale, scale_ref), (scale - scale_ref).abs().max()
    differ = (q.view(torch.uint8) != q_ref.view(torch.uint8))
    assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} fp8 values differ from the twin"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("rows, cols", [(37, 96), (5, 3840), (1, 16)], ids=["37x96", "5x3840 (model dim)", "1x16"])
def test_quantize_fp8_rows_equals_the_torch_twin(rows, cols, dtype):
    # Heavy-tailed rows (a few outliers per row) push most values into e4m3's subnormal range.
    x = randn(rows, cols) * torch.exp(2 * randn(rows, cols, seed=1))
    check_equal(x.to(DEVICE, dtype))


def test_zero_rows_strided_views_and_ties():
    x = randn(8, 64).to(DEVICE, torch.bfloat16)
    x[3] = 0  # an all-zero row: the scale floor, all-zero output
    check_equal(x)
    wide = randn(6, 160).to(DEVICE, torch.bfloat16)
    check_equal(wide[:, 32:96])  # a row view with a stride > K, read in place
    # Exact ties between two e4m3 values (the row max 448 makes the scale 1): round half to even.
    ties = torch.tensor([[448.0, 1.0625, 1.1875, 0.0029296875, -0.0048828125, 17.0, -19.0, 0.5]] * 2)
    check_equal(ties.to(DEVICE))


@pytest.mark.skipif(DEVICE == "cpu" and not cpu_rowwise_scaled_mm(),
                    reason=f"torch {torch.__version__}: the CPU _scaled_mm takes per-tensor scales only")
def test_float8_linear_with_the_kernel_matches_the_twin_path():
    if DEVICE == "cpu" and not hasattr(torch, "_scaled_mm"):
        pytest.skip("no torch._scaled_mm")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=torch.bfloat16)
    slow = Float8Linear.from_linear(linear)
    fast = Float8Linear.from_linear(linear, quantize=torch.ops.zimage.quantize_fp8_rows)
    torch.testing.assert_close(fast(x), slow(x), rtol=0, atol=0)


def test_fake_implementation_under_compile():
    x = randn(4, 32).to(DEVICE, torch.bfloat16)
    fn = torch.compile(lambda t: torch.ops.zimage.quantize_fp8_rows(t), backend="eager", fullgraph=True)
    q, scale = fn(x)
    q_ref, scale_ref = quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
