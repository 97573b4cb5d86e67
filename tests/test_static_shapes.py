"""Shapes without masks (captions padded to 32, CFG as two forwards) and the staged forward."""

from __future__ import annotations

import pytest
import torch

from zimage_native.scheduler import make_schedule

from .utils import assert_rel

LONG = "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat"


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["no CFG", "CFG"])
def test_single_image_plans_are_mask_free_and_padded_to_32(tiny_pipe, guidance):
    from zimage_native import sampling

    embeds = tiny_pipe.encode_prompt([LONG])
    negative = tiny_pipe.encode_prompt([""])
    schedule = make_schedule(tiny_pipe.scheduler_config, 2)
    plan = sampling.plan(tiny_pipe, (4, 4), embeds, negative, schedule, guidance_scale=guidance)
    sides = [plan.plain] + ([plan.negative] if guidance else [])
    assert (plan.negative is None) == (guidance == 0)
    for (layout, tokens), features in zip(sides, (embeds, negative)):
        assert layout.caption_mask is None and layout.joint_mask is None  # never a mask at batch 1
        assert tokens.shape == (1, -(-features[0].shape[0] // 32) * 32, tiny_pipe.transformer_config.dim)


def test_masks_only_when_a_batch_mixes_caption_lengths(tiny_pipe):
    from zimage_native import sampling

    schedule = make_schedule(tiny_pipe.scheduler_config, 2)
    mixed = sampling.plan(tiny_pipe, (4, 4), tiny_pipe.encode_prompt(["a cat", LONG]), None, schedule)
    assert mixed.plain[0].joint_mask is not None and int(mixed.plain[0].caption_mask[0].sum()) == 32
    same = sampling.plan(tiny_pipe, (4, 4), tiny_pipe.encode_prompt(["a cat", "a dog"]), None, schedule)
    assert same.plain[0].joint_mask is None  # the same 32-token class: no mask


def test_cfg_as_two_forwards_equals_one_batched_forward(tiny_pipe):
    """The negatives' forward on its own layout gives what the batched, masked forward gave."""
    from zimage_native.model.sequence import build_layout, pad_captions, patchify

    dit = tiny_pipe.transformer
    pos, neg = tiny_pipe.encode_prompt([LONG]), tiny_pipe.encode_prompt([""])
    x = patchify(torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0)))
    t = torch.tensor([0.3])

    def run(features, batch_x):
        layout = build_layout(dit.config, [f.shape[0] for f in features], 4, 6)
        return dit(batch_x, pad_captions(features, layout.caption_pad.shape[1]), t.expand(batch_x.shape[0]), layout)

    batched = run(pos + neg, x.repeat(2, 1, 1))  # one masked forward of 2 (the old CFG path)
    assert_rel(run(pos, x), batched[:1], 1e-5, "positive forward alone")
    assert_rel(run(neg, x), batched[1:], 1e-5, "negative forward alone")


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
