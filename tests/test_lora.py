"""LoRA: every spelling fuses to the hand-computed W + scale * (alpha / rank) * B @ A; undo is exact.

The LoRA files are written here with random factors on the tiny DiT (dim 64, 2 layers, 1 refiner).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from zimage_native.config import TransformerConfig
from zimage_native.lora import LoraMixin, detect_family, parse_lora_arg
from zimage_native.model.transformer import ZImageTransformer

from zimage_native.testing import randomize_
from .dit_configs import TINY_DIT

DIM, FFN = 64, int(64 / 3 * 8)
RANK = 4


class Pipe(LoraMixin):
    """A stand-in with a ``transformer`` (LoraMixin: a LoraStack behind load_lora / unload_lora)."""

    def __init__(self, dtype=torch.float32):
        self.transformer = randomize_(ZImageTransformer(TransformerConfig.from_dict(TINY_DIT)), 7).to(dtype)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def factors(out: int, inp: int, rank: int = RANK, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1  # A (down), B (up)


def expected(w, a, b, scale=1.0, alpha=None):
    rank = a.shape[0]
    return w + scale * ((alpha if alpha is not None else rank) / rank) * b @ a


def save(tmp_path, sd, name="lora.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def assert_only_changed(before, after, changed: dict[str, torch.Tensor]):
    for k, v in after.items():
        if k in changed:
            torch.testing.assert_close(v, changed[k], rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(v, before[k]), f"{k} changed"


# One case per spelling: (file keys for module M with factors A, B and alpha), the canonical weight it changes.
SPELLINGS = {
    "kohya": ("lora_unet_layers_0_attention_to_q.lora_down.weight", "lora_unet_layers_0_attention_to_q.lora_up.weight",
              "lora_unet_layers_0_attention_to_q.alpha", "layers.0.attention.to_q.weight"),
    "kohya-out": ("lora_unet_layers_1_attention_to_out_0.lora_down.weight",
                  "lora_unet_layers_1_attention_to_out_0.lora_up.weight", "lora_unet_layers_1_attention_to_out_0.alpha",
                  "layers.1.attention.to_out.0.weight"),
    "kohya-adaln": ("lora_unet_noise_refiner_0_adaLN_modulation_0.lora_down.weight",
                    "lora_unet_noise_refiner_0_adaLN_modulation_0.lora_up.weight",
                    "lora_unet_noise_refiner_0_adaLN_modulation_0.alpha", "noise_refiner.0.adaLN_modulation.0.weight"),
    "kohya-ffn": ("lora_unet_context_refiner_0_feed_forward_w2.lora_down.weight",
                  "lora_unet_context_refiner_0_feed_forward_w2.lora_up.weight",
                  "lora_unet_context_refiner_0_feed_forward_w2.alpha", "context_refiner.0.feed_forward.w2.weight"),
    "ai-toolkit": ("diffusion_model.layers.0.attention.to_k.lora_A.weight",
                   "diffusion_model.layers.0.attention.to_k.lora_B.weight", None, "layers.0.attention.to_k.weight"),
    "diffusers": ("transformer.layers.1.feed_forward.w1.lora_A.weight", "transformer.layers.1.feed_forward.w1.lora_B.weight",
                  "transformer.layers.1.feed_forward.w1.alpha", "layers.1.feed_forward.w1.weight"),
    "peft-default": ("base_model.model.layers.0.attention.to_v.lora_A.default.weight",
                     "base_model.model.layers.0.attention.to_v.lora_B.default.weight", None,
                     "layers.0.attention.to_v.weight"),
    "diffsynth": ("layers.1.feed_forward.w3.lora_A.default.weight", "layers.1.feed_forward.w3.lora_B.default.weight",
                  None, "layers.1.feed_forward.w3.weight"),
    "dotted": ("layers.0.attention.to.q.lora.down.weight", "layers.0.attention.to.q.lora.up.weight",
               "layers.0.attention.to.q.alpha", "layers.0.attention.to_q.weight"),
    "onetrainer": ("layers.1.attention.to_k.lora_linear_layer.down.weight",
                   "layers.1.attention.to_k.lora_linear_layer.up.weight", None, "layers.1.attention.to_k.weight"),
    "lycoris": ("lycoris_layers_0_feed_forward_w1.lora_down.weight", "lycoris_layers_0_feed_forward_w1.lora_up.weight",
                "lycoris_layers_0_feed_forward_w1.alpha", "layers.0.feed_forward.w1.weight"),
    "bare-out-lora-AB": ("diffusion_model.layers.1.attention.out.lora_A.weight",
                         "diffusion_model.layers.1.attention.out.lora_B.weight", "diffusion_model.layers.1.attention.out.alpha",
                         "layers.1.attention.to_out.0.weight"),
    "bare-out-kohya": ("lora_unet_layers_0_attention_out.lora_down.weight", "lora_unet_layers_0_attention_out.lora_up.weight",
                       "lora_unet_layers_0_attention_out.alpha", "layers.0.attention.to_out.0.weight"),
    "x-embedder": ("diffusion_model.x_embedder.lora_A.weight", "diffusion_model.x_embedder.lora_B.weight", None,
                   "all_x_embedder.2-1.weight"),
    "final-layer": ("diffusion_model.final_layer.linear.lora_down.weight",
                    "diffusion_model.final_layer.linear.lora_up.weight", None, "all_final_layer.2-1.linear.weight"),
    "final-adaln": ("transformer.all_final_layer.2-1.adaLN_modulation.1.lora_A.weight",
                    "transformer.all_final_layer.2-1.adaLN_modulation.1.lora_B.weight", None,
                    "all_final_layer.2-1.adaLN_modulation.1.weight"),
    "t-embedder": ("lora_unet_t_embedder_mlp_2.lora_down.weight", "lora_unet_t_embedder_mlp_2.lora_up.weight",
                   "lora_unet_t_embedder_mlp_2.alpha", "t_embedder.mlp.2.weight"),
    "cap-embedder": ("transformer.cap_embedder.1.lora_A.weight", "transformer.cap_embedder.1.lora_B.weight", None,
                     "cap_embedder.1.weight"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_every_spelling_fuses_to_the_hand_computed_weight(tmp_path, spelling, scale):
    down_key, up_key, alpha_key, target = SPELLINGS[spelling]
    pipe = Pipe()
    before = weights(pipe)
    w = before[target]
    a, b = factors(w.shape[0], w.shape[1])
    sd = {down_key: a, up_key: b}
    alpha = None
    if alpha_key:
        alpha = 2.0
        sd[alpha_key] = torch.tensor(alpha)
    report = pipe.load_lora(save(tmp_path, sd), scale=scale)
    assert report.matched == 1 and report.weights == 1 and not report.unmatched, report
    assert_only_changed(before, weights(pipe), {target: expected(w, a, b, scale, alpha)})
    assert pipe.unload_lora() == 1
    assert_only_changed(before, weights(pipe), {})


QKV = ["layers.0.attention.to_q.weight", "layers.0.attention.to_k.weight", "layers.0.attention.to_v.weight"]


@pytest.mark.parametrize("down, up, alpha", [
    ("diffusion_model.layers.0.attention.qkv.lora_A.weight", "diffusion_model.layers.0.attention.qkv.lora_B.weight", None),
    ("diffusion_model.layers.0.attention.qkv.lora_down.weight", "diffusion_model.layers.0.attention.qkv.lora_up.weight",
     "diffusion_model.layers.0.attention.qkv.alpha"),
    ("layers.0.attention.qkv.lora.down.weight", "layers.0.attention.qkv.lora.up.weight", "layers.0.attention.qkv.alpha"),
    ("lora_unet_layers_0_attention_qkv.lora_down.weight", "lora_unet_layers_0_attention_qkv.lora_up.weight",
     "lora_unet_layers_0_attention_qkv.alpha"),
    ("layers.0.attention.qkv.lora_linear_layer.down.weight", "layers.0.attention.qkv.lora_linear_layer.up.weight", None),
    ("transformer.layers.0.attention.to_qkv.lora_A.weight", "transformer.layers.0.attention.to_qkv.lora_B.weight", None),
], ids=["lora_AB", "lora_down_up", "dotted", "kohya", "onetrainer", "native-fused"])
def test_fused_qkv_lora_splits_B_into_thirds_with_A_shared(tmp_path, down, up, alpha):
    pipe = Pipe()
    before = weights(pipe)
    a, b = factors(3 * DIM, DIM)
    sd = {down: a, up: b}
    if alpha:
        sd[alpha] = torch.tensor(8.0)
    report = pipe.load_lora(save(tmp_path, sd), 0.5)
    assert report.matched == 1 and report.weights == 3
    want = {k: expected(before[k], a, part, 0.5, 8.0 if alpha else None) for k, part in zip(QKV, b.chunk(3))}
    assert_only_changed(before, weights(pipe), want)
    pipe.unload_lora()
    assert_only_changed(before, weights(pipe), {})


def test_fused_w13_lora(tmp_path):
    pipe = Pipe()
    before = weights(pipe)
    a, b = factors(2 * FFN, DIM)
    report = pipe.load_lora(save(tmp_path, {"layers.1.feed_forward.w13.lora_A.weight": a,
                                            "layers.1.feed_forward.w13.lora_B.weight": b}))
    assert report.weights == 2
    w1, w3 = b.chunk(2)
    assert_only_changed(before, weights(pipe), {
        "layers.1.feed_forward.w1.weight": expected(before["layers.1.feed_forward.w1.weight"], a, w1),
        "layers.1.feed_forward.w3.weight": expected(before["layers.1.feed_forward.w3.weight"], a, w3)})


def test_duplicate_spellings_are_applied_once(tmp_path):
    """Anime-Z style: split to.q/k/v plus a redundant fused qkv; to_out.0 plus a redundant bare out."""
    pipe = Pipe()
    before = weights(pipe)
    sd, want = {}, {}
    for i, proj in enumerate("qkv"):
        a, b = factors(DIM, DIM, seed=i)
        sd[f"layers.0.attention.to.{proj}.lora.down.weight"], sd[f"layers.0.attention.to.{proj}.lora.up.weight"] = a, b
        sd[f"layers.0.attention.to.{proj}.alpha"] = torch.tensor(2.0)
        want[f"layers.0.attention.to_{proj}.weight"] = expected(before[f"layers.0.attention.to_{proj}.weight"], a, b, 1, 2.0)
    a, b = factors(3 * DIM, DIM, seed=9)
    sd["layers.0.attention.qkv.lora.down.weight"], sd["layers.0.attention.qkv.lora.up.weight"] = a, b
    sd["layers.0.attention.qkv.alpha"] = torch.tensor(2.0)
    a, b = factors(DIM, DIM, seed=5)
    sd["layers.0.attention.to_out.0.lora.down.weight"], sd["layers.0.attention.to_out.0.lora.up.weight"] = a, b
    want["layers.0.attention.to_out.0.weight"] = expected(before["layers.0.attention.to_out.0.weight"], a, b)
    a2, b2 = factors(DIM, DIM, seed=6)
    sd["layers.0.attention.out.lora.down.weight"], sd["layers.0.attention.out.lora.up.weight"] = a2, b2
    report = pipe.load_lora(save(tmp_path, sd))
    assert report.matched == 4 and sorted(report.duplicates) == ["layers.0.attention.out", "layers.0.attention.qkv"]
    assert "dotted" in report.family
    assert_only_changed(before, weights(pipe), want)


def test_lokr_forms(tmp_path):
    pipe = Pipe()
    before = weights(pipe)
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    # to_q: full w1 (4, 4), factorised w2 (16, 2) @ (2, 16), alpha 1 -> scale alpha / rank = 0.5
    w1, w2a, w2b = r(4, 4), r(16, 2), r(2, 16)
    # to_k: both full, alpha ignored (no rank)
    k1, k2 = r(8, 4), r(8, 16)
    # w2 of layer 1: factorised w1 (FFN: 170 = 10 * 17 rows, 64 = 4 * 16 cols)
    f1a, f1b, f2 = r(10, 3), r(3, 4), r(17, 16)
    sd = {
        "diffusion_model.layers.0.attention.to_q.lokr_w1": w1, "diffusion_model.layers.0.attention.to_q.lokr_w2_a": w2a,
        "diffusion_model.layers.0.attention.to_q.lokr_w2_b": w2b, "diffusion_model.layers.0.attention.to_q.alpha": torch.tensor(1.0),
        "diffusion_model.layers.0.attention.to_k.lokr_w1": k1, "diffusion_model.layers.0.attention.to_k.lokr_w2": k2,
        "diffusion_model.layers.0.attention.to_k.alpha": torch.tensor(7.0),
        "lycoris_layers_1_feed_forward_w1.lokr_w1_a": f1a, "lycoris_layers_1_feed_forward_w1.lokr_w1_b": f1b,
        "lycoris_layers_1_feed_forward_w1.lokr_w2": f2, "lycoris_layers_1_feed_forward_w1.alpha": torch.tensor(6.0),
    }
    report = pipe.load_lora(save(tmp_path, sd), 0.8)
    assert report.kinds == {"lokr": 3} and "LoKr" in report.family
    want = {
        "layers.0.attention.to_q.weight": before["layers.0.attention.to_q.weight"] + 0.8 * 0.5 * torch.kron(w1, w2a @ w2b),
        "layers.0.attention.to_k.weight": before["layers.0.attention.to_k.weight"] + 0.8 * torch.kron(k1, k2),
        "layers.1.feed_forward.w1.weight": before["layers.1.feed_forward.w1.weight"] + 0.8 * 2.0 * torch.kron(f1a @ f1b, f2),
    }
    assert_only_changed(before, weights(pipe), want)


@pytest.mark.parametrize("marker", ["lokr_factor tensor", "kohya metadata"])
def test_musubi_tuners_own_lokr_scales_a_whole_w2_by_alpha_over_its_size(tmp_path, marker):
    """musubi-tuner's LoKr (networks.lokr) keeps w2 whole when its dim reaches the factor's size and
    trains with alpha / max(w2's shape) there (alpha 1 on a 3840-wide layer: 1/60), where LyCORIS files
    use 1: read as LyCORIS, such a LoRA was fused up to 60 times too strong (Comfy-Org/ComfyUI#15114
    reports the collapse). Its factorised modules keep alpha / rank; LyCORIS files are unchanged."""
    from safetensors.torch import save_file

    pipe = Pipe()
    before = weights(pipe)
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    k1, k2 = r(8, 4), r(8, 16)  # to_k: w1 and a whole w2 (8 x 16)
    w1, w2a, w2b = r(4, 4), r(16, 2), r(2, 16)  # to_q: a factorised w2 of dim 2
    sd = {"lora_unet_layers_0_attention_to_k.lokr_w1": k1, "lora_unet_layers_0_attention_to_k.lokr_w2": k2,
          "lora_unet_layers_0_attention_to_k.alpha": torch.tensor(1.0),
          "lora_unet_layers_0_attention_to_q.lokr_w1": w1, "lora_unet_layers_0_attention_to_q.lokr_w2_a": w2a,
          "lora_unet_layers_0_attention_to_q.lokr_w2_b": w2b, "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(1.0)}
    metadata = {"ss_network_module": "networks.lokr"} if marker == "kohya metadata" else None
    if marker == "lokr_factor tensor":
        sd["lokr_factor"] = torch.tensor(-1)
    path = tmp_path / "musubi_lokr.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    report = pipe.load_lora(path)
    assert report.kinds == {"lokr": 2} and not report.unmatched  # the factor tensor is not a stray key
    want = {"layers.0.attention.to_k.weight": before["layers.0.attention.to_k.weight"] + torch.kron(k1, k2) / 16,
            "layers.0.attention.to_q.weight": before["layers.0.attention.to_q.weight"] + 0.5 * torch.kron(w1, w2a @ w2b)}
    assert_only_changed(before, weights(pipe), want)


def test_loha(tmp_path):
    pipe = Pipe()
    before = weights(pipe)
    g = torch.Generator().manual_seed(4)
    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=g) * 0.2 for s in [(DIM, 2), (2, DIM), (DIM, 2), (2, DIM)])
    sd = {f"lora_unet_layers_1_attention_to_v.{k}": v for k, v in
          dict(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b, alpha=torch.tensor(1.0)).items()}
    report = pipe.load_lora(save(tmp_path, sd))
    assert report.kinds == {"loha": 1}
    want = before["layers.1.attention.to_v.weight"] + 0.5 * (w1a @ w1b) * (w2a @ w2b)
    assert_only_changed(before, weights(pipe), {"layers.1.attention.to_v.weight": want})


def test_many_loras_stack_and_unload_restores_bit_exactly(tmp_path):
    pipe = Pipe(torch.bfloat16)  # rounding on every fuse: the undo must still be exact
    before = weights(pipe)
    paths, scales, total = [], [0.5, -1.25], {}
    for i, scale in enumerate(scales):
        sd = {}
        for name in ("layers.0.attention.to_q", "layers.1.feed_forward.w2", "noise_refiner.0.adaLN_modulation.0"):
            w = before[name + ".weight"]
            a, b = factors(w.shape[0], w.shape[1], seed=10 * i + len(name))
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = a, b
            total[name] = total.get(name, 0) + scale * (b @ a)
        paths.append(save(tmp_path, sd, f"l{i}.safetensors"))
    reports = pipe.load_lora(paths, scale=scales)
    assert [r.scale for r in reports] == scales and len(pipe.loras) == 2
    after = weights(pipe)
    for name, delta in total.items():
        torch.testing.assert_close(after[name + ".weight"].float(), before[name + ".weight"].float() + delta,
                                   rtol=0.02, atol=0.02)
    assert pipe.unload_lora() == 3 and pipe.loras == []
    for k, v in weights(pipe).items():
        assert torch.equal(v, before[k]), k
    pipe.load_lora(paths[0])  # and again after an unload
    pipe.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


def test_no_undo_asks_for_a_reload(tmp_path):
    pipe = Pipe()
    a, b = factors(DIM, DIM)
    pipe.load_lora({"transformer.layers.0.attention.to_q.lora_A.weight": a,
                    "transformer.layers.0.attention.to_q.lora_B.weight": b}, undo=False)
    with pytest.raises(RuntimeError, match="reload the pipeline"):
        pipe.unload_lora()


def test_unmatched_keys_are_reported_and_strict_raises(tmp_path):
    pipe = Pipe()
    a, b = factors(DIM, DIM)
    sd = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": a,
          "diffusion_model.layers.0.attention.to_q.lora_B.weight": b,
          "diffusion_model.layers.7.attention.to_q.lora_A.weight": a.clone(),  # no layer 7 in the tiny model
          "diffusion_model.layers.7.attention.to_q.lora_B.weight": b.clone(),
          "diffusion_model.layers.0.attention.to_q.diff_b": torch.zeros(DIM),
          "some_metadata_tensor": torch.zeros(1)}
    path = save(tmp_path, sd)
    report = pipe.load_lora(path)
    assert report.matched == 1 and len(report.unmatched) == 4 and "some_metadata_tensor" in report.unmatched
    assert "1 modules matched" in str(report) and "4 unmatched keys" in str(report)
    pipe.unload_lora()
    with pytest.raises(ValueError, match="4 keys match no Z-Image module"):
        pipe.load_lora(path, strict=True)


@pytest.mark.parametrize("key, family", [
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "FLUX"),
    ("diffusion_model.single_blocks.3.linear1.lora_A.weight", "FLUX"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "FLUX in diffusers naming"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight", "SDXL"),
    ("unet.down_blocks.1.attentions.0.proj_in.lora_A.weight", "SDXL"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "CLIP text encoder"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "another DiT family"),
    ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "Wan"),
])
def test_foreign_loras_raise_naming_the_family(tmp_path, key, family):
    pipe = Pipe()
    before = weights(pipe)
    with pytest.raises(ValueError, match=f"this LoRA is for .*{family}.*not Z-Image"):
        pipe.load_lora(save(tmp_path, {key: torch.zeros(4, 64), key.replace("down", "up").replace("lora_A", "lora_B"):
                                       torch.zeros(64, 4)}))
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


def test_shape_mismatch_and_empty_and_broken_loras_raise_before_any_change(tmp_path):
    pipe = Pipe()
    before = weights(pipe)
    good_a, good_b = factors(DIM, DIM)
    good = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": good_a,
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": good_b}
    lumina = {"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(4, 2304),
              "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(3 * 2304, 4)}
    with pytest.raises(ValueError, match=r"\(6912, 2304\) but the model weight is \(192, 64\).*Lumina-2"):
        pipe.load_lora([save(tmp_path, good, "g.safetensors"), save(tmp_path, lumina, "l.safetensors")])
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())  # the good one was not applied either
    with pytest.raises(ValueError, match="no key of this LoRA matches a Z-Image module"):
        pipe.load_lora(save(tmp_path, {"foo.lora_A.weight": good_a, "foo.lora_B.weight": good_b}, "none.safetensors"))
    half = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": good_a}
    with pytest.raises(ValueError, match="has down weights but not the other half"):
        pipe.load_lora(save(tmp_path, half, "half.safetensors"))
    dora = dict(good, **{"diffusion_model.layers.0.attention.to_q.dora_scale": torch.ones(1, DIM)})
    with pytest.raises(ValueError, match="DoRA"):
        pipe.load_lora(save(tmp_path, dora, "dora.safetensors"))
    with pytest.raises(ValueError, match="2 LoRAs but 3 scales"):
        pipe.load_lora([good, good], scale=[1, 2, 3])
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    pt = tmp_path / "lora.pt"
    torch.save(good, pt)
    with pytest.raises(ValueError, match="pickle"):
        pipe.load_lora(pt)
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


def test_fp8_weights_must_be_fused_before_quantising():
    pipe = Pipe()
    lin = pipe.transformer.layers[0].attention.to_q
    lin.weight = nn.Parameter(lin.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    a, b = factors(DIM, DIM)
    with pytest.raises(ValueError, match="fuse LoRAs before quantising"):
        pipe.load_lora({"layers.0.attention.to_q.lora_A.weight": a, "layers.0.attention.to_q.lora_B.weight": b})


def test_family_detection():
    assert detect_family(["lora_unet_layers_0_attention_to_q.lora_down.weight"]).startswith("kohya / musubi-tuner")
    assert "ai-toolkit" in detect_family(["diffusion_model.layers.0.attention.to_q.lora_A.weight"])
    assert "diffusers" in detect_family(["transformer.layers.0.attention.to_q.lora_A.weight"])
    assert "PEFT" in detect_family(["layers.0.attention.to_q.lora_A.default.weight"])
    assert "fused attention.qkv" in detect_family(["diffusion_model.layers.0.attention.qkv.lora_A.weight"])


@pytest.mark.parametrize("text, parsed", [("style.safetensors", ("style.safetensors", 1.0)),
                                          ("style.safetensors:0.6", ("style.safetensors", 0.6)),
                                          ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
                                          ("C:\\loras\\a.safetensors:-1.5", ("C:\\loras\\a.safetensors", -1.5)),
                                          ("odd:name.safetensors", ("odd:name.safetensors", 1.0))])
def test_parse_lora_arg(text, parsed):
    assert parse_lora_arg(text) == parsed


def test_lora_on_the_real_pipeline_changes_and_restores_the_image(tiny_model_dir, tmp_path):
    """End to end on ZImagePipeline (its LoraStack): a LoRA changes the output; unload gives it back exactly."""
    from zimage_native import ZImagePipeline
    from zimage_native.lora import LoraStack

    assert not issubclass(ZImagePipeline, LoraMixin)  # a collaborator, not a mixin
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    assert isinstance(pipe.lora_stack, LoraStack)
    pipe.progress = False
    kwargs = dict(width=32, height=32, num_inference_steps=2, seed=1, output_type="latent")
    ref = pipe("a cat", **kwargs).images
    sd = {}
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, nn.Linear) and ".attention.to_" in name:
            a, b = factors(m.weight.shape[0], m.weight.shape[1], seed=len(name))
            sd[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = a
            sd[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = b
            sd[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(float(RANK))
    report = pipe.load_lora(save(tmp_path, sd), 1.0)
    assert report.matched == 4 * 4 and not report.unmatched  # 4 blocks (2 layers, 2 refiners), q/k/v/out each
    assert not torch.equal(pipe("a cat", **kwargs).images, ref)
    pipe.unload_lora()
    assert torch.equal(pipe("a cat", **kwargs).images, ref)


def test_rank_mismatch_raises_and_stray_foreign_keys_are_reported(caplog):
    pipe = Pipe()
    before = weights(pipe)
    a, b = factors(DIM, DIM)
    with pytest.raises(ValueError, match="rank mismatch"):
        pipe.load_lora({"layers.0.attention.to_q.lora_A.weight": a, "layers.0.attention.to_q.lora_B.weight": b[:, :3]})
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    te_key = "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
    with caplog.at_level("WARNING", logger="zimage_native.lora"):
        report = pipe.load_lora({"layers.0.attention.to_q.lora_A.weight": a,
                                 "layers.0.attention.to_q.lora_B.weight": b, te_key: torch.zeros(4, 8)})
    assert report.matched == 1 and report.unmatched == [te_key]
    assert "CLIP text encoder" in caplog.text


def _qwen3_text_encoder_keys(layers: int = 2) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA of the Qwen3 text encoder, as Z-Image LoRA trainers write it beside lora_unet_ keys."""
    sd = {}
    for i in range(layers):
        for module in ("self_attn_q_proj", "self_attn_k_proj", "mlp_gate_proj"):
            sd[f"lora_te_model_layers_{i}_{module}.lora_down.weight"] = torch.zeros(RANK, 16)
            sd[f"lora_te_model_layers_{i}_{module}.lora_up.weight"] = torch.zeros(16, RANK)
            sd[f"lora_te_model_layers_{i}_{module}.alpha"] = torch.tensor(float(RANK))
    return sd


def test_a_qwen3_text_encoder_lora_is_named_as_such(tmp_path, caplog):
    """Kohya-style keys of the Qwen3 text encoder (lora_te_model_layers_N_self_attn_* / mlp_*) were named
    "a CLIP text encoder (SD / SDXL / FLUX lora_te)": a file of them alone was refused as "not Z-Image",
    and one with DiT keys too warned twice (that family, then every key unmatched). Beside DiT keys the
    DiT part is applied and one warning counts the skipped text-encoder keys; alone, the file is refused
    as a Qwen3 text-encoder LoRA this engine does not apply, nothing changed. A CLIP key is still CLIP's."""
    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.lora import describe_lora_keys

    pipe = Pipe()
    before = weights(pipe)
    a, b = factors(DIM, DIM)
    text_encoder = _qwen3_text_encoder_keys()
    mixed = {"lora_unet_layers_0_attention_to_q.lora_down.weight": a,
             "lora_unet_layers_0_attention_to_q.lora_up.weight": b, **text_encoder}
    mixed_file = save(tmp_path, mixed, "mixed.safetensors")
    with caplog.at_level("WARNING", logger="zimage_native.lora"):
        report = pipe.load_lora(mixed_file)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert report.matched == 1 and sorted(report.unmatched) == sorted(text_encoder)
    assert len(warnings) == 1 and f"{len(text_encoder)} keys are for the Qwen3 text encoder" in warnings[0], warnings
    assert "CLIP" not in caplog.text
    q = "layers.0.attention.to_q.weight"
    assert_only_changed(before, weights(pipe), {q: expected(before[q], a, b)})
    pipe.unload_lora()
    with pytest.raises(ValueError, match=rf"this is a LoRA for the Qwen3 text encoder \({len(text_encoder)} keys, "
                                         rf"e\.g\. 'lora_te_model_layers_0_.*which this engine does not apply"):
        pipe.load_lora(save(tmp_path, text_encoder, "te.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    described = describe_lora_keys(mixed)
    assert described["foreign"] is None and described["text_encoder_keys"] == len(text_encoder)
    clip = "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
    assert describe_lora_keys([clip])["foreign"].startswith("a CLIP text encoder")
    info = CliRunner().invoke(main, ["info", str(mixed_file)]).output
    assert f"{len(text_encoder)} keys for the Qwen3 text encoder: not applied" in info and "not for Z-Image" not in info


def test_an_adapter_refit_reuses_the_copies_of_the_original_weights(tiny_model_dir, tmp_path):
    """set_adapters (and every adapter call) unfuses the LoRAs and fuses the active ones again. The
    unfused weights equal their saved originals again, so the refit keeps those copies instead of
    copying every fused weight once more (on a GPU, each LoRA'd weight to CPU memory per call; a
    whole-DiT LoRA is GBs per weight change). The images are those of a pipeline that loaded the
    adapters at these weights anew, and unloading still restores the weights bit for bit."""
    from .fixtures import our_pipeline

    pipe, fresh = our_pipeline(tiny_model_dir), our_pipeline(tiny_model_dir)
    kwargs = dict(width=32, height=32, num_inference_steps=2, seed=1, output_type="latent")
    before = weights(pipe)
    paths = []
    for seed in (1, 2):
        sd = {}
        for name, m in pipe.transformer.named_modules():
            if isinstance(m, nn.Linear) and name.startswith(("layers", "noise_refiner", "context_refiner")):
                a, b = factors(m.out_features, m.in_features, seed=seed + len(name))
                sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
        paths.append(save(tmp_path, sd, f"lora{seed}.safetensors"))
    for p in (pipe, fresh):
        p.load_lora_weights(paths[0], adapter_name="a")
        p.load_lora_weights(paths[1], adapter_name="b")
    copies = dict(pipe.lora_stack.originals)
    assert len(copies) > 20
    for w in (0.3, 0.8):
        pipe.set_adapters(["a", "b"], [w, 1 - w])
        assert all(pipe.lora_stack.originals[k] is v for k, v in copies.items()), "the originals were copied again"
        assert not pipe.lora_stack.spare
    fresh.set_adapters(["a", "b"], [0.8, 0.2])
    assert torch.equal(pipe("a cat", **kwargs).images, fresh("a cat", **kwargs).images)
    pipe.set_adapters(["a"])  # one adapter: nothing stays in spare after the refit
    assert set(pipe.lora_stack.originals) <= set(copies) and not pipe.lora_stack.spare
    pipe.unload_lora_weights()
    assert_only_changed(before, weights(pipe), {})
