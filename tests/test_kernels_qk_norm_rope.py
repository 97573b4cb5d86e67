"""zimage::qk_norm_rope against the model's ``apply_rope(norm_q(q), cos, sin)`` (and the same for k).

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
from zimage_native.model.rope import apply_rope, rope_cos_sin

from .utils import assert_rel

pytest.importorskip("triton")
from zimage_native.accel import load_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3 / 8}  # fp16: 3 more mantissa bits
MAX_MISMATCH = {torch.float32: 1.0, torch.bfloat16: 0.01, torch.float16: 0.01}


def make_inputs(b, l, h, axes_dims, dtype, seed=0, batch_rope=True):
    head_dim = sum(axes_dims)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, l, h, head_dim, generator=g) * 2
    k = torch.randn(b, l, h, head_dim, generator=g)
    norms = []
    for _ in range(2):
        norm = RMSNorm(head_dim, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(head_dim, generator=g))
        norms.append(norm.to(DEVICE, dtype))
    # Integer (axis 0, row, column) positions, as model.sequence builds them.
    positions = torch.randint(0, 40, (b if batch_rope else 1, l, 3), generator=g)
    cos, sin = rope_cos_sin(positions, tuple(axes_dims), theta=256.0)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), norms, cos.to(DEVICE), sin.to(DEVICE)


def reference(q, k, norms, cos, sin):
    return apply_rope(norms[0](q), cos, sin), apply_rope(norms[1](k), cos, sin)


def check(got, expected, dtype, what):
    for name, g, e in zip("qk", got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype and g.is_contiguous()
        assert_rel(g, e, TOLERANCE[dtype], f"{what} ({name})")
        mismatch = (g != e).float().mean().item()
        assert mismatch <= MAX_MISMATCH[dtype], f"{what} ({name}): {mismatch:.1%} of elements differ"


def run(q, k, norms, cos, sin):
    return torch.ops.zimage.qk_norm_rope(q, k, norms[0].weight, norms[1].weight, cos, sin, norms[0].eps)


CASES = [  # (B, L, H, axes_dims, rope per item)
    pytest.param(1, 3, 30, (32, 48, 48), True, id="model: 30 heads of 128, 3 tokens"),
    pytest.param(2, 5, 3, (4, 10, 10), False, id="Dh=24 (12 pairs), batch 2 sharing one rope table"),
    pytest.param(1, 1, 1, (2, 2, 4), True, id="one token, one head, Dh=8"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("b, l, h, axes_dims, batch_rope", CASES)
def test_qk_norm_rope_matches_reference(b, l, h, axes_dims, batch_rope, dtype):
    q, k, norms, cos, sin = make_inputs(b, l, h, axes_dims, dtype, batch_rope=batch_rope)
    check(run(q, k, norms, cos, sin), reference(q, k, norms, cos, sin), dtype, f"qk_norm_rope {b}x{l}x{h}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_qk_norm_rope_reads_views_of_a_fused_qkv(dtype):
    """q and k as strided views of one (B, L, 3, H, Dh) projection output, and a transposed cos table."""
    q, k, norms, cos, sin = make_inputs(2, 4, 3, (8, 12, 12), dtype)
    qkv = torch.stack([q, k, torch.zeros_like(q)], dim=2)  # (B, L, 3, H, Dh)
    qv, kv = qkv[:, :, 0], qkv[:, :, 1]
    assert not qv.is_contiguous()
    cos_t = cos.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    check(run(qv, kv, norms, cos_t, sin), reference(q, k, norms, cos, sin), dtype, "fused-qkv views")


def test_qk_norm_rope_rejects_bad_shapes():
    q, k, norms, cos, sin = make_inputs(1, 2, 2, (2, 2, 2), torch.float32)
    with pytest.raises(ValueError, match="must be"):
        run(q, k, norms, cos[:, :1], sin)
    with pytest.raises(ValueError, match="even"):
        odd = torch.ones(1, 2, 2, 5, device=DEVICE)
        torch.ops.zimage.qk_norm_rope(odd, odd, torch.ones(5, device=DEVICE), torch.ones(5, device=DEVICE),
                                      cos, sin, 1e-5)
