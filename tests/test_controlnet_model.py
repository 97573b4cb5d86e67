"""ControlNet-Union model parity against diffusers 0.42.1 ZImageControlNetModel, fp32 on CPU.

One tiny layout per published version: 1.0 (16-channel control input, plain control refiner),
2.0 (33 channels, the control layers double as the refiner stage) and 2.1 (33 channels,
dedicated control refiner blocks). The diffusers models are built from diffusers' own classes and
randomised (the zero-initialised projections too), and their state dicts are loaded strictly.
"""

from __future__ import annotations

import functools

import pytest
import torch

from zimage_native.config import ControlNetConfig, TransformerConfig
from zimage_native.loading import assign_state_dict, build_on_meta
from zimage_native.model.controlnet import ControlTransformerBlock, ZImageControlNet
from zimage_native.model.sequence import build_layout, pad_captions, patchify, unpatchify
from zimage_native.model.transformer import TransformerBlock, ZImageTransformer
from zimage_native.testing import randomize_

from .dit_configs import TINY_DIT
from .utils import assert_rel, rel_err

diffusers = pytest.importorskip("diffusers")

# Four main layers and two noise-refiner layers, so that places [0, 2] and refiner places [0, 1]
# sit where the published layouts put them (every other layer; both refiner layers).
CONTROL_DIT = dict(TINY_DIT, n_layers=4, n_refiner_layers=2)
_SHARED = dict(dim=64, n_heads=2, n_kv_heads=2, n_refiner_layers=2, norm_eps=1e-5, qk_norm=True,
               all_patch_size=(2,), all_f_patch_size=(1,))
CONTROL_LAYOUTS = {
    "1.0": dict(_SHARED, control_layers_places=[0, 2], control_refiner_layers_places=None, control_in_dim=16,
                add_control_noise_refiner=None),
    "2.0": dict(_SHARED, control_layers_places=[0, 2], control_refiner_layers_places=[0, 1], control_in_dim=33,
                add_control_noise_refiner="control_layers"),
    "2.1": dict(_SHARED, control_layers_places=[0, 2], control_refiner_layers_places=[0, 1], control_in_dim=33,
                add_control_noise_refiner="control_noise_refiner"),
}


@functools.lru_cache(maxsize=None)
def make_models(version: str, seed: int = 0):
    """(diffusers DiT, diffusers ControlNet, our DiT, our ControlNet, DiT config) with equal random weights.
    Cached: the tests only read the models."""
    ref_dit = diffusers.ZImageTransformer2DModel(**CONTROL_DIT).eval()
    randomize_(ref_dit, seed)
    ref_cn = diffusers.ZImageControlNetModel(**CONTROL_LAYOUTS[version]).eval()
    randomize_(ref_cn, seed + 1)
    ref_cn = diffusers.ZImageControlNetModel.from_transformer(ref_cn, ref_dit)
    config = TransformerConfig.from_dict(CONTROL_DIT)
    dit = assign_state_dict(build_on_meta(lambda: ZImageTransformer(config)), dict(ref_dit.state_dict()), "dit")
    cn_config = ControlNetConfig.from_dict(CONTROL_LAYOUTS[version])
    # diffusers' state dict also holds the DiT modules shared by from_transformer: keep the control ones.
    own = {k: v for k, v in ref_cn.state_dict().items() if k.startswith(("control_",))}
    cn = assign_state_dict(build_on_meta(lambda: ZImageControlNet(cn_config, config)), own, "controlnet")
    return ref_dit, ref_cn, dit.eval(), cn.eval(), config


def inputs(version: str, cap_lens, size=(10, 14), seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(cap_lens)
    latents = torch.randn(b, 16, *size, generator=g)
    control = torch.randn(b, CONTROL_LAYOUTS[version]["control_in_dim"], *size, generator=g)
    caps = [torch.randn(n, TINY_DIT["cap_feat_dim"], generator=g) for n in cap_lens]
    t = torch.rand(b, generator=g)
    return latents, control, caps, t


def run_reference(ref_dit, ref_cn, latents, control, caps, t, scale):
    x = list(latents.unsqueeze(2))
    hints = ref_cn(x, t, caps, list(control.unsqueeze(2)), conditioning_scale=scale)
    out = ref_dit(x, t, caps, controlnet_block_samples=hints, return_dict=False)[0]
    return hints, torch.stack(out).squeeze(2)


def run_ours(dit, cn, config, latents, control, caps, t, scale):
    layout = build_layout(config, [c.shape[0] for c in caps], latents.shape[-2], latents.shape[-1])
    cap = pad_captions(caps, layout.caption_pad.shape[1])
    x = patchify(latents, config.patch_size)
    step = cn(dit, x, cap, t, patchify(control, config.patch_size), layout, scale)
    c = dit.time_embedding(t, x.dtype)
    out = dit.forward_tokens(x, dit.encode_caption(cap, layout), c, layout, **step)
    return step["control_hints"], unpatchify(out, layout.grid, config.in_channels, config.patch_size), layout


@pytest.mark.parametrize("version", sorted(CONTROL_LAYOUTS))
@pytest.mark.parametrize("cap_lens, size", [
    pytest.param([7], (16, 24), id="one item"),
    pytest.param([7, 40], (10, 14), id="two captions of different lengths, image padding"),
])
@torch.no_grad()
def test_controlnet_matches_diffusers(version, cap_lens, size):
    ref_dit, ref_cn, dit, cn, config = make_models(version)
    latents, control, caps, t = inputs(version, cap_lens, size)
    ref_hints, expected = run_reference(ref_dit, ref_cn, latents, control, caps, t, 0.75)
    hints, got, layout = run_ours(dit, cn, config, latents, control, caps, t, 0.75)

    assert sorted(hints) == sorted(ref_hints) == list(CONTROL_LAYOUTS[version]["control_layers_places"])
    nx = layout.image_pad.shape[1]
    for layer, hint in hints.items():
        for i, n in enumerate(cap_lens):  # rows of item i: its image tokens and its padded caption
            rows = nx + -(-n // 32) * 32
            assert_rel(hint[i, :rows], ref_hints[layer][i, :rows], 1e-5, f"hint for layer {layer}, item {i}")
    assert_rel(got, expected, 1e-5, f"DiT output with ControlNet {version} hints")
    # The hints matter: without them the output is far from the controlled one.
    plain = dit(patchify(latents), pad_captions(caps, layout.caption_pad.shape[1]), t, layout)
    plain = unpatchify(plain, layout.grid, config.in_channels)
    assert rel_err(plain, expected) > 1e-2


@pytest.mark.parametrize("version", sorted(CONTROL_LAYOUTS))
def test_branch_is_built_from_the_dit_block(version):
    _, _, _, cn, _ = make_models(version)
    blocks = list(cn.control_layers) + list(cn.control_noise_refiner or [])
    assert all(isinstance(b, TransformerBlock) for b in blocks)
    assert [b.before_proj is not None for b in cn.control_layers] == [True, False]
    if version == "1.0":
        assert not any(isinstance(b, ControlTransformerBlock) for b in cn.control_noise_refiner)
    assert sum(p.numel() for p in cn.parameters()) == sum(
        v.numel() for k, v in make_models(version)[1].state_dict().items() if k.startswith("control_"))


@torch.no_grad()
def test_scale_zero_gives_the_plain_dit():
    ref_dit, ref_cn, dit, cn, config = make_models("2.1")
    latents, control, caps, t = inputs("2.1", [9])
    _, got, layout = run_ours(dit, cn, config, latents, control, caps, t, 0.0)
    plain = unpatchify(dit(patchify(latents), pad_captions(caps, layout.caption_pad.shape[1]), t, layout),
                       layout.grid, config.in_channels)
    assert torch.equal(got, plain)


def test_config_checks_against_the_dit():
    config = TransformerConfig.from_dict(CONTROL_DIT)
    with pytest.raises(ValueError, match="reach past the DiT's 4 layers"):
        ZImageControlNet(ControlNetConfig.from_dict(dict(CONTROL_LAYOUTS["1.0"], control_layers_places=[0, 4])),
                         config)
    with pytest.raises(ValueError, match="does not fit the DiT"):
        ZImageControlNet(ControlNetConfig.from_dict(dict(CONTROL_LAYOUTS["2.1"], dim=128, n_heads=4)), config)
    with pytest.raises(ValueError, match="including 0"):
        ControlNetConfig(control_layers_places=(1, 3))
    with pytest.raises(ValueError, match="makes only 2"):
        ControlNetConfig(control_layers_places=(0, 2), control_refiner_layers_places=(0, 1, 2),
                         add_control_noise_refiner="control_layers")


@torch.no_grad()
def test_hints_compile_in_one_graph():
    """The hook keeps forward_tokens a single graph (compile="full" uses fullgraph=True), and so
    does the branch's step."""
    _, _, dit, cn, config = make_models("2.1")
    latents, control, caps, t = inputs("2.1", [7, 40])
    hints, expected, layout = run_ours(dit, cn, config, latents, control, caps, t, 0.5)
    cap = pad_captions(caps, layout.caption_pad.shape[1])
    x, c = patchify(latents), dit.time_embedding(t, latents.dtype)
    tokens, ctx = dit.encode_caption(cap, layout), cn.embed_control(patchify(control), layout, dit.x_pad_token)
    step = torch.compile(cn.step, backend="eager", fullgraph=True)
    compiled_step = step(dit, x, tokens, ctx, layout, dit.modulations(c), cn.modulations(c), 0.5)
    forward = torch.compile(dit.forward_tokens, backend="eager", fullgraph=True)
    got = unpatchify(forward(x, tokens, c, layout, **compiled_step), layout.grid, config.in_channels)
    assert_rel(got, expected, 1e-6, "compiled step")


@pytest.mark.parametrize("version", sorted(CONTROL_LAYOUTS))
@torch.no_grad()
def test_the_step_runs_the_dits_embedding_and_shared_refiner_blocks_once(version):
    """The branch needs the DiT's image embedding and noise refiner (2.x: with its refiner hints
    added after the first hinted block), so its step computes the DiT's own refined image tokens too
    and hands them on: the DiT's output is bit for bit the one it computes itself, and the refiner
    blocks before the first hint (1.0: all) and the embedder run once per step instead of twice."""
    _, _, dit, cn, config = make_models(version)
    latents, control, caps, t = inputs(version, [7, 40], (10, 14))
    layout = build_layout(config, [c.shape[0] for c in caps], *latents.shape[-2:])
    cap = pad_captions(caps, layout.caption_pad.shape[1])
    x, c = patchify(latents), dit.time_embedding(t, latents.dtype)
    tokens, ctx = dit.encode_caption(cap, layout), cn.embed_control(patchify(control), layout, dit.x_pad_token)
    calls, handles = {}, []  # (the models are cached: the hooks go again)
    for name, module in [*((f"refiner {i}", b) for i, b in enumerate(dit.noise_refiner)), ("embedder", dit.x_embedder)]:
        handles.append(module.register_forward_hook(
            lambda m, a, out, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)))
    try:
        step = cn.step(dit, x, tokens, ctx, layout, dit.modulations(c), cn.modulations(c), 0.75)
        got = dit.forward_tokens(x, tokens, c, layout, **step)
    finally:
        for handle in handles:
            handle.remove()
    places = CONTROL_LAYOUTS[version].get("control_refiner_layers_places") or ()
    first = min(places) if version != "1.0" and places else len(dit.noise_refiner) - 1
    want = {"embedder": 1, **{f"refiner {i}": 1 if i <= first else 2 for i in range(len(dit.noise_refiner))}}
    assert calls == want
    own = dit.refine_image(dit.embed_image(x, layout), layout, dit.modulations(c))
    assert torch.equal(step["image_tokens"], own)
    assert torch.equal(got, dit.forward_tokens(x, tokens, c, layout, control_hints=step["control_hints"]))
