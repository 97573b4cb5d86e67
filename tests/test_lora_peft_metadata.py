"""LoRAs saved by diffusers / PEFT keep lora_alpha (and rank_pattern / alpha_pattern) in the
safetensors metadata (``lora_adapter_metadata``), not as ``.alpha`` tensors. Parity against
diffusers 0.42.1's own ``load_lora_weights`` + ``fuse_lora`` on the tiny model, fp32 on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from zimage_native.lora import lora_alpha_config, metadata_alpha, metadata_rank

from .utils import assert_rel, rel_err

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


def save_peft_lora(folder, tiny_model_dir, **config):
    """A LoRA trained-looking (random B, not zero) on diffusers' transformer, saved by diffusers."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = diffusers.ZImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    lora_config = LoraConfig(target_modules=TARGETS, init_lora_weights=False, **config)
    transformer.add_adapter(lora_config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    diffusers.ZImagePipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=lora_config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def run_both(tiny_model_dir, path):
    from zimage_native import ZImagePipeline

    from .fixtures import reference_pipeline

    ref = reference_pipeline(tiny_model_dir)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=1.0)
    ours = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    ours.progress = False
    ours.load_lora(path, 1.0)
    kw = dict(height=64, width=64, num_inference_steps=3, output_type="latent")
    expected = ref("a cat", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **kw).images
    got = ours("a cat", seed=0, **kw).images
    return got, expected


@pytest.mark.parametrize("config", [
    pytest.param(dict(r=4, lora_alpha=8), id="alpha 8 rank 4"),
    pytest.param(dict(r=4, lora_alpha=16), id="alpha 16 rank 4"),
    pytest.param(dict(r=4, lora_alpha=8, rank_pattern={"layers.0.attention.to_k": 2, "w2": 6},
                      alpha_pattern={"to_v": 3, "layers.1.feed_forward.w1": 32}), id="rank and alpha patterns"),
    pytest.param(dict(r=4, lora_alpha=8, use_rslora=True), id="rsLoRA alpha/sqrt(rank)"),
])
def test_peft_metadata_alpha_matches_diffusers_fuse_lora(tiny_model_dir, tmp_path, config):
    path = save_peft_lora(tmp_path, tiny_model_dir, **config)
    with safe_open(str(path), "pt") as f:  # the file really carries its alpha in the metadata only
        assert "lora_adapter_metadata" in f.metadata()
        assert not any(k.endswith(".alpha") for k in f.keys())
    got, expected = run_both(tiny_model_dir, path)
    assert_rel(got, expected, 1e-5, "final latents with a PEFT-metadata LoRA")


def test_metadata_alpha_lookup_follows_peft_pattern_rules():
    meta = {"lora_adapter_metadata": json.dumps({
        "transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": False,
        "transformer.rank_pattern": {"layers.0.attention.to_k": 2},
        "transformer.alpha_pattern": {"to_v": 3, "layers.1.feed_forward.w1": 32}})}
    config = lora_alpha_config(meta)
    assert metadata_alpha(config, "layers.0.attention.to_q", 4) == 8 / 4
    assert metadata_alpha(config, "layers.0.attention.to_k", 2) == 8 / 2
    assert metadata_alpha(config, "layers.1.attention.to_v", 4) == 3 / 4
    assert metadata_alpha(config, "layers.1.feed_forward.w1", 4) == 32 / 4
    assert metadata_alpha(config, "layers.0.feed_forward.w1", 4) == 8 / 4
    assert metadata_alpha(config, "noise_refiner.0.attention.to_v", 4) == 3 / 4  # suffix match on a dot
    assert metadata_alpha(config, "layers.0.attention.xto_v", 4) == 8 / 4  # not on a partial name
    assert metadata_rank(config, "layers.0.attention.to_k") == 2 and metadata_rank(config, "layers.1.attention.to_k") == 4
    # Unprefixed PEFT config dicts are read as well; no metadata or no lora_alpha: no override.
    assert metadata_alpha(lora_alpha_config({"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2})}),
                          "layers.0.attention.to_q", 4) == 2 / 4
    assert lora_alpha_config({"format": "pt"}) is None
    assert lora_alpha_config(None) is None
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        lora_alpha_config({"lora_adapter_metadata": "{not json"})


def test_alpha_tensor_in_the_file_wins_over_metadata(tmp_path):
    """A per-module .alpha tensor is the module's own alpha; the metadata fills in where there is none."""
    from safetensors.torch import save_file

    from zimage_native.lora import parse_lora, read_lora

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    sd = {"transformer.layers.0.attention.to_q.lora_A.weight": a, "transformer.layers.0.attention.to_q.lora_B.weight": b,
          "transformer.layers.0.attention.to_q.alpha": torch.tensor(2.0),
          "transformer.layers.0.attention.to_k.lora_A.weight": a.clone(),
          "transformer.layers.0.attention.to_k.lora_B.weight": b.clone()}
    path = tmp_path / "l.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4,
                                                                            "transformer.lora_alpha": 12})})
    shapes = {f"layers.0.attention.{n}": (8, 8) for n in ("to_q", "to_k")}
    name, state, meta = read_lora(path, with_metadata=True)
    modules, _ = parse_lora(state, shapes, name, metadata=meta)
    by_name = {m.source: m for m in modules}
    assert {k: m.alpha_scale for k, m in by_name.items()} == {"layers.0.attention.to_q": 2 / 4,
                                                              "layers.0.attention.to_k": 12 / 4}
    assert rel_err(by_name["layers.0.attention.to_k"].delta(), b @ a * 3) < 1e-6


def test_zimage_convert_bakes_the_metadata_alpha_like_load_lora(tiny_model_dir, tmp_path):
    """`zimage convert --lora` reads the same metadata: the baked weights equal load_lora's."""
    from zimage_native.converters.convert import convert_checkpoint
    from zimage_native.loading import load_component
    from zimage_native.lora import LoraMixin

    from .test_convert import read_folder
    from .test_formats import dit_state

    path = save_peft_lora(tmp_path, tiny_model_dir, r=4, lora_alpha=16, alpha_pattern={"to_v": 3})
    convert_checkpoint(tiny_model_dir / "transformer", tmp_path / "baked", "diffusers", loras=[(str(path), 0.5)])
    baked = read_folder(tmp_path / "baked")

    class P(LoraMixin):
        transformer = load_component("transformer", tiny_model_dir / "transformer", torch.float32, "cpu")

    p = P()
    p.load_lora(path, 0.5)
    for k, v in p.transformer.state_dict().items():
        assert torch.equal(baked[k], v), k
    # The factor is 0.5 * alpha / rank = 0.5 * 16 / 4 (3 / 4 for to_v), not 0.5 (alpha = rank).
    with safe_open(str(path), "pt") as f:
        a = f.get_tensor("transformer.layers.0.attention.to_q.lora_A.weight")
        b = f.get_tensor("transformer.layers.0.attention.to_q.lora_B.weight")
        av = f.get_tensor("transformer.layers.0.attention.to_v.lora_A.weight")
        bv = f.get_tensor("transformer.layers.0.attention.to_v.lora_B.weight")
    base = dit_state(tiny_model_dir)
    assert rel_err(baked["layers.0.attention.to_q.weight"] - base["layers.0.attention.to_q.weight"],
                   0.5 * 16 / 4 * (b @ a)) < 1e-5
    assert rel_err(baked["layers.0.attention.to_v.weight"] - base["layers.0.attention.to_v.weight"],
                   0.5 * 3 / 4 * (bv @ av)) < 1e-5


def test_rank_disagreeing_with_the_metadata_is_reported(caplog):
    from zimage_native.lora import parse_lora

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    sd = {"layers.0.attention.to_q.lora_A.weight": a, "layers.0.attention.to_q.lora_B.weight": b}
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 2}})}
    with caplog.at_level("WARNING", logger="zimage_native.lora"):
        modules, _ = parse_lora(sd, {"layers.0.attention.to_q": (8, 8)}, "x.safetensors", metadata=meta)
    assert modules[0].alpha_scale == 8 / 4
    assert "has rank 4 but the file's PEFT metadata (r / rank_pattern) says 2" in caplog.text
