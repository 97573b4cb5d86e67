"""Each Triton twin against the eager leaf it replaces (``model.layers``), leaf against leaf, and
the block built from the leaves against itself with every leaf swapped.

Runs on the GPU when there is one, else with Triton's CPU interpreter. Tolerances (fixed):
fp32 rel err <= 1e-6; bf16 rel err <= 1e-3 and at most 1% of the elements differ at all.
"""

from __future__ import annotations

import copy

import pytest
import torch

from zimage_native.model.layers import ModulatedRMSNorm, PostNormResidual, QKNormRoPE, RMSNorm, SwiGLU
from zimage_native.model.rope import rope_cos_sin

from .utils import assert_rel

pytest.importorskip("triton")
from zimage_native.accel import load_kernels  # noqa: E402
from zimage_native.accel.fused_ops import TWINS, swap_leaf_, twin_of  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
MAX_MISMATCH = {torch.float32: 1.0, torch.bfloat16: 0.01}
D, B, L = 96, 2, 7


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def norm(cls, dim, dtype, seed=7):
    module = cls(dim, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return module.to(DEVICE, dtype)


def cases(dtype):
    """leaf type -> (leaf module, positional inputs, keyword inputs), at small shapes."""
    positions = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(L), torch.arange(3), indexing="ij"), -1)
    rope = rope_cos_sin(positions[..., 0, :] * 3 + 1, (8, 12, 12), 256.0)  # Dh = 32
    rope = tuple(t.to(DEVICE) for t in rope)
    scale = 0.3 * randn(B, 1, D, seed=5, dtype=dtype)
    qk = (randn(B, L, 3, 32, seed=1, dtype=dtype), randn(B, L, 3, 32, seed=2, dtype=dtype))
    return {
        RMSNorm: (norm(RMSNorm, D, dtype), (randn(B, L, D, seed=3, dtype=dtype),), {}),
        ModulatedRMSNorm: (norm(ModulatedRMSNorm, D, dtype), (randn(B, L, D, seed=3, dtype=dtype), scale), {}),
        PostNormResidual: (norm(PostNormResidual, D, dtype),
                           (randn(B, L, D, seed=3, dtype=dtype), randn(B, L, D, seed=4, dtype=dtype), scale), {}),
        QKNormRoPE: (QKNormRoPE(), (*qk, norm(RMSNorm, 32, dtype, 8), norm(RMSNorm, 32, dtype, 9), rope), {}),
        SwiGLU: (SwiGLU(), (randn(B, L, D, seed=3, dtype=dtype), randn(B, L, D, seed=4, dtype=dtype)), {}),
    }


def check(got, expected, dtype, what):
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert g.shape == e.shape and g.dtype == e.dtype, what
        assert_rel(g, e, TOLERANCE[dtype], what)
        mismatch = (g != e).float().mean().item()
        assert mismatch <= MAX_MISMATCH[dtype], f"{what}: {mismatch:.1%} of elements differ (rounding order?)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("leaf", list(TWINS), ids=lambda t: t.__name__)
@torch.no_grad()
def test_twin_matches_its_leaf(leaf, dtype):
    module, args, kwargs = cases(dtype)[leaf]
    twin = twin_of(module, TWINS[leaf][0])
    assert type(twin) is TWINS[leaf][0] and isinstance(twin, leaf)
    assert [p is q for p, q in zip(twin.parameters(), module.parameters())] == [True] * len(list(module.parameters()))
    kernels.reset_launch_counts()
    check(twin(*args, **kwargs), module(*args, **kwargs), dtype, f"{TWINS[leaf][0].__name__} vs {leaf.__name__}")
    assert sum(kernels.launch_counts().values()) == 1  # one launch per leaf call


@pytest.mark.parametrize("leaf", [ModulatedRMSNorm, PostNormResidual], ids=lambda t: t.__name__)
@torch.no_grad()
def test_norm_twins_without_modulation(leaf):
    """Context-refiner blocks call the same leaves without a scale or gate."""
    module, args, _ = cases(torch.float32)[leaf]
    twin = twin_of(module, TWINS[leaf][0])
    check(twin(*args[:-1]), module(*args[:-1]), torch.float32, f"{leaf.__name__} without modulation")


def test_swap_replaces_exactly_one_leaf_type():
    from zimage_native.config import TransformerConfig
    from zimage_native.model.transformer import ZImageTransformer

    from .dit_configs import TINY_DIT

    with torch.device("meta"):
        model = ZImageTransformer(TransformerConfig.from_dict(TINY_DIT))
    before = [(name, type(m)) for name, m in model.named_modules()]
    keys = list(model.state_dict())
    assert swap_leaf_(model, PostNormResidual) == 8  # 4 blocks x 2
    after = dict((name, type(m)) for name, m in model.named_modules())
    changed = {name for name, t in before if after[name] is not t}
    assert changed and all(after[name] is TWINS[PostNormResidual][0] for name in changed)
    assert list(model.state_dict()) == keys
    assert swap_leaf_(copy.deepcopy(model), PostNormResidual) == 0  # twins are not swapped again
