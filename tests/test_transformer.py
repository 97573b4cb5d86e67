"""DiT parity against diffusers 0.42.1 ZImageTransformer2DModel, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from zimage_native.config import TransformerConfig
from zimage_native.loading import assign_state_dict, build_on_meta
from zimage_native.model.sequence import build_layout, pad_captions, patchify, unpatchify
from zimage_native.model.transformer import ZImageTransformer

from zimage_native.testing import randomize_
from .dit_configs import REAL_HEADS_DIT, TINY_DIT
from .utils import assert_rel

diffusers = pytest.importorskip("diffusers")


def make_pair(kwargs, seed=0):
    ref = diffusers.ZImageTransformer2DModel(**kwargs).eval()
    randomize_(ref, seed)
    config = TransformerConfig.from_dict(kwargs)
    ours = assign_state_dict(build_on_meta(lambda: ZImageTransformer(config)), dict(ref.state_dict()), "dit")
    return ref, ours.eval(), config


def run_ours(model, config, latents, caps, t):
    layout = build_layout(config, [c.shape[0] for c in caps], latents.shape[-2], latents.shape[-1])
    lc = layout.caption_pad.shape[1]
    out = model(patchify(latents), pad_captions(caps, lc), t, layout)
    return unpatchify(out, layout.grid, config.in_channels)


@pytest.mark.parametrize(
    "kwargs, size, cap_lens",
    [
        pytest.param(TINY_DIT, (16, 24), [7], id="one item, caption needs padding"),
        pytest.param(TINY_DIT, (10, 14), [40], id="35 patches: image padding"),
        pytest.param(TINY_DIT, (10, 14), [7, 40], id="batch of two captions of different lengths"),
        pytest.param(TINY_DIT, (16, 16), [32, 64, 5], id="three items, exact multiples and a short one"),
        pytest.param(REAL_HEADS_DIT, (12, 20), [9, 45], id="real head geometry"),
    ],
)
@torch.no_grad()
def test_dit_matches_diffusers(kwargs, size, cap_lens):
    ref, ours, config = make_pair(kwargs)
    g = torch.Generator().manual_seed(0)
    b = len(cap_lens)
    latents = torch.randn(b, 16, *size, generator=g)
    caps = [torch.randn(n, config.cap_feat_dim, generator=g) for n in cap_lens]
    t = torch.rand(b, generator=g)
    expected = torch.stack(ref(list(latents.unsqueeze(2)), t, caps, return_dict=False)[0]).squeeze(2)
    got = run_ours(ours, config, latents, caps, t)
    assert_rel(got, expected, 1e-5, "DiT output")


@torch.no_grad()
def test_pad_tokens_are_attended():
    """Changing x_pad_token changes the output when the image needs padding (they are real tokens)."""
    _, ours, config = make_pair(TINY_DIT)
    g = torch.Generator().manual_seed(1)
    latents, caps, t = torch.randn(1, 16, 10, 14, generator=g), [torch.randn(7, 48, generator=g)], torch.rand(1)
    before = run_ours(ours, config, latents, caps, t)
    ours.x_pad_token.add_(1.0)
    after = run_ours(ours, config, latents, caps, t)
    assert (before - after).abs().max() > 1e-4


def test_released_config_parameter_count():
    model = build_on_meta(lambda: ZImageTransformer(TransformerConfig()))
    sd = model.state_dict()
    assert len(sd) == 521
    assert sum(p.numel() for p in sd.values()) == 6_154_908_736
    assert not any("context_refiner" in k and "adaLN" in k for k in sd)


def test_config_rejects_bad_head_geometry():
    with pytest.raises(ValueError, match="sum\\(axes_dims\\)"):
        TransformerConfig(dim=64, n_heads=2, axes_dims=(8, 8, 8))


def test_layout_rejects_positions_outside_rope_tables():
    config = TransformerConfig.from_dict(dict(TINY_DIT, axes_lens=[64, 512, 512]))
    with pytest.raises(ValueError, match="caption length"):
        build_layout(config, [100], 8, 8)
