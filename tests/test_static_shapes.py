"""Static shapes and hoisting: caption buckets (masked) and the staged forward leave results unchanged."""

from __future__ import annotations

import pytest
import torch

from zimage_native.scheduler import make_schedule

from .utils import assert_rel

LONG = "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat"


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_caption_buckets_do_not_change_results(tiny_pipe, guidance):
    kw = dict(height=48, width=64, num_inference_steps=3, output_type="latent", seed=0, guidance_scale=guidance)
    expected = tiny_pipe(["a cat", LONG], **kw).images
    tiny_pipe.caption_buckets = (64, 128, 256, 512)
    try:
        got = tiny_pipe(["a cat", LONG], **kw).images
        single = tiny_pipe("a cat", **kw).images
    finally:
        tiny_pipe.caption_buckets = None
    assert_rel(got, expected, 1e-5, "bucketed vs exact caption lengths")
    assert_rel(single, tiny_pipe("a cat", **kw).images, 1e-5, "bucketed single prompt")


def test_plan_uses_the_bucket_and_always_masks(tiny_pipe):
    embeds = tiny_pipe.encode_prompt(["a cat"])
    schedule = make_schedule(tiny_pipe.scheduler_config, 2)
    tiny_pipe.caption_buckets = (64, 128)
    try:
        plan = tiny_pipe.plan((4, 4), embeds, None, schedule)
    finally:
        tiny_pipe.caption_buckets = None
    layout, tokens = plan.plain
    assert tokens.shape[1] == 64 and layout.caption_mask is not None and layout.joint_mask is not None
    assert int(layout.caption_mask.sum()) == 32  # the padded-to-32 caption is attended, the rest masked
    exact = tiny_pipe.plan((4, 4), embeds, None, schedule)
    assert exact.plain[1].shape[1] == 32 and exact.plain[0].joint_mask is None


@torch.no_grad()
def test_staged_forward_equals_forward(tiny_pipe):
    """forward == forward_tokens(encode_caption, modulations precomputed for a batch of times)."""
    from zimage_native.model.sequence import build_layout, pad_captions, patchify

    dit = tiny_pipe.transformer
    g = torch.Generator().manual_seed(0)
    caps = [torch.randn(9, dit.config.cap_feat_dim, generator=g), torch.randn(40, dit.config.cap_feat_dim, generator=g)]
    layout = build_layout(dit.config, [9, 40], 6, 10)
    x = patchify(torch.randn(2, 16, 6, 10, generator=g))
    cap = pad_captions(caps, layout.caption_pad.shape[1])
    t = torch.tensor([0.25, 0.25])
    expected = dit(x, cap, t, layout)
    mods = dit.modulations(dit.time_embedding(torch.tensor([0.0, 0.25, 0.5]), x.dtype))
    got = dit.forward_tokens(x, dit.encode_caption(cap, layout), None, layout, [m[1:2] for m in mods])
    assert_rel(got, expected, 1e-6, "staged forward")
