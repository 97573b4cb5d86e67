"""Single-file formats: detection from headers, ComfyUI / LDM / fp8 loading, config inference, errors.

Every file is written here from the tiny random model (no downloads): the ComfyUI DiT by running
our key map backwards, the LDM VAE likewise, the text encoder with a ``model.`` prefix. Each
lossless format must load to the same weights and outputs as the diffusers folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_native.config import TransformerConfig, VAEConfig
from zimage_native.converters.keymap import (DIT_COMFYUI, DIT_NATIVE_FUSED, TE_TRANSFORMERS, convert_state_dict,
                                             vae_ldm_keymap)
from zimage_native.formats import (UnsupportedFormatError, describe, detect_format, infer_text_encoder_config,
                                   infer_transformer_config, infer_vae_config)
from zimage_native.hub import resolve_tokenizer_folder
from zimage_native.loading import StateDictMismatchError, load_component, read_component_state_dict
from zimage_native.model.sequence import build_layout, pad_captions, patchify
from zimage_native.text_encoder import TextEncoder

from .fresh_process import run_fresh
from .utils import assert_rel, needs_cpu_fp8, patch_weight_reads

TINY_AXES = {"axes_dims": [8, 12, 12]}  # RoPE axes cannot be read from shapes
TINY_GROUPS = {"norm_num_groups": 16}  # nor can the VAE's GroupNorm groups


# ----------------------------------------------------------------------------------- file writers


def dit_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")


def vae_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors")


def te_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "text_encoder" / "model.safetensors")


def comfy_dit(model_dir: Path, prefix: str = "model.diffusion_model.", norm_final: bool = True) -> dict:
    """The ComfyUI / original single-file layout of the tiny DiT."""
    sd = convert_state_dict(dit_state(model_dir), None, DIT_COMFYUI)
    if norm_final:
        sd["norm_final.weight"] = torch.ones(sd["x_pad_token"].shape[1])
    return {prefix + k: v for k, v in sd.items()}


def ldm_vae(model_dir: Path, prefix: str = "") -> dict:
    """The BFL / LDM layout (ComfyUI ``ae.safetensors``) of the tiny VAE."""
    return {prefix + k: v for k, v in convert_state_dict(vae_state(model_dir), None, vae_ldm_keymap(4)).items()}


def prefixed_te(model_dir: Path, lm_head: bool = True) -> dict:
    """``qwen_3_4b.safetensors``: the text encoder with a ``model.`` prefix (and a tied lm_head)."""
    sd = convert_state_dict(te_state(model_dir), None, TE_TRANSFORMERS)
    if lm_head:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


def write(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def to_fp8(sd: dict, scaled: bool, scale_name: str = "scale_weight", per_row: bool = False) -> tuple[dict, dict]:
    """(fp8 file contents, expected dequantised fp32 values): every 2-D weight in fp8."""
    out, expected = {}, {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            if scaled:
                amax = v.abs().amax(dim=1, keepdim=True) if per_row else v.abs().max()
                scale = (amax / 448.0).float()
                q = (v / scale).to(torch.float8_e4m3fn)
                out[k] = q
                out[k[: -len("weight")] + scale_name] = scale.reshape(-1) if per_row else scale.reshape(())
                expected[k] = q.float() * scale
            else:
                out[k] = v.to(torch.float8_e4m3fn)
                expected[k] = out[k].float()
        else:
            out[k] = v
            expected[k] = v
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, expected


def dit_output(model, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One DiT forward on fixed random inputs (in ``dtype``: the model's)."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    latents = torch.randn(1, cfg.in_channels, 8, 8, generator=g).to(dtype)
    caption = [torch.randn(5, cfg.cap_feat_dim, generator=g).to(dtype)]
    layout = build_layout(cfg, [5], 8, 8, "cpu")
    with torch.no_grad():
        return model(patchify(latents, cfg.patch_size), pad_captions(caption, layout.caption_pad.shape[1]),
                     torch.tensor([0.3]), layout)


def vae_output(vae) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return vae.decode(torch.randn(1, 16, 4, 4, generator=g)).sample


def assert_same_weights(module, reference):
    a, b = module.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("layout, prefix", [("comfyui", "model.diffusion_model."), ("comfyui", ""),
                                            ("comfyui", "diffusion_model."), ("native-fused", ""),
                                            ("diffusers", "")])
def test_dit_single_file_loads_like_the_folder(tiny_model_dir, tiny_pipe, tmp_path, layout, prefix):
    if layout == "comfyui":
        sd = comfy_dit(tiny_model_dir, prefix)
    elif layout == "native-fused":
        sd = convert_state_dict(dit_state(tiny_model_dir), None, DIT_NATIVE_FUSED)
    else:
        sd = dit_state(tiny_model_dir)
    path = write(tmp_path / "dit.safetensors", sd)
    fmt = detect_format(path)
    assert [(c.component, c.layout, c.prefix) for c in fmt.components] == [("transformer", layout, prefix)]
    model = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES)
    assert model.config == tiny_pipe.transformer.config
    assert_same_weights(model, tiny_pipe.transformer)
    assert_rel(dit_output(model), dit_output(tiny_pipe.transformer), 1e-6, "DiT output")


def test_dit_config_inferred_from_tiny_shapes(tiny_model_dir, tmp_path):
    """dim, layers, refiner layers, heads (from the q/k-norm size), cap_feat_dim, in_channels come from shapes."""
    from .dit_configs import TINY_DIT

    path = write(tmp_path / "dit.safetensors", comfy_dit(tiny_model_dir))
    info = describe(path)["components"]["transformer"]
    cfg = info["config_error"]  # the released axes_dims do not fit head_dim 32: named, with the fix
    assert "head dim is 32" in cfg and "axes_dims" in cfg
    model = load_component("transformer", path, None, "cpu", config=TINY_AXES)
    for key in ("dim", "n_layers", "n_refiner_layers", "n_heads", "cap_feat_dim", "in_channels"):
        assert getattr(model.config, key) == TINY_DIT[key], key
    # Other shapes: 3 layers, 4 heads of 16 (axes 4+6+6), no refiner changes.
    other = TransformerConfig.from_dict(dict(TINY_DIT, n_layers=3, n_heads=4, n_kv_heads=4, axes_dims=[4, 6, 6]))
    shapes = _meta_shapes(other)
    assert infer_transformer_config(shapes, {"axes_dims": [4, 6, 6]}) == other


def _meta_shapes(config: TransformerConfig) -> dict[str, tuple]:
    from zimage_native.model.transformer import ZImageTransformer

    with torch.device("meta"):
        model = ZImageTransformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dit_config_override_from_json_and_mismatch(tiny_model_dir, tmp_path):
    path = write(tmp_path / "dit.safetensors", comfy_dit(tiny_model_dir))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", "axes_dims": [8, 12, 12], "rope_theta": 100.0}))
    model = load_component("transformer", path, None, "cpu", config=cfg)
    assert model.config.rope_theta == 100.0 and model.config.axes_dims == (8, 12, 12)
    with pytest.raises(ValueError, match=r"n_layers=1 does not match the checkpoint.*n_layers=2"):
        load_component("transformer", path, None, "cpu", config={**TINY_AXES, "n_layers": 1})
    with pytest.raises(ValueError, match=r"layers 2\.\.4 missing: the checkpoint holds layers 0\.\.1 \(2 blocks\), "
                                         r"the config gives n_layers=5"):  # fewer blocks than the config: missing
        load_component("transformer", path, None, "cpu", config={**TINY_AXES, "n_layers": 5})
    with pytest.raises(ValueError, match="n_heads=4 does not match"):
        load_component("transformer", path, None, "cpu", config={**TINY_AXES, "n_heads": 4})


def test_dit_inconsistent_shapes_raise(tiny_model_dir, tmp_path):
    sd = comfy_dit(tiny_model_dir, "")
    sd["layers.1.feed_forward.w1.weight"] = sd["layers.1.feed_forward.w1.weight"][:-8]
    path = write(tmp_path / "bad.safetensors", sd)
    with pytest.raises(StateDictMismatchError, match=r"shape mismatches.*layers.1.feed_forward.w1.weight"):
        load_component("transformer", path, None, "cpu", config=TINY_AXES)
    sd = comfy_dit(tiny_model_dir, "")
    sd["layers.0.feed_forward.w1.weight"] = torch.zeros(100, 64)
    with pytest.raises(ValueError, match=r"feed_forward.w1.weight has shape \(100, 64\), the config implies"):
        load_component("transformer", write(tmp_path / "bad2.safetensors", sd), None, "cpu", config=TINY_AXES)
    sd = comfy_dit(tiny_model_dir, "")
    del sd["context_refiner.0.attention.qkv.weight"]
    sd = {k.replace("context_refiner.0.", "context_refiner.9."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"context_refiner 0\.\.8 missing: the checkpoint holds context_refiner 9 "):
        load_component("transformer", write(tmp_path / "bad3.safetensors", sd), None, "cpu", config=TINY_AXES)


def test_released_shapes_infer_the_turbo_config_from_headers_only(tmp_path):
    """A header-only (sparse) ComfyUI file with the released shapes: 453 tensors, 6.15 B params, Turbo config."""
    from zimage_native.model.transformer import ZImageTransformer

    with torch.device("meta"):
        model = ZImageTransformer(TransformerConfig())
    comfy = convert_state_dict(model.state_dict(), None, DIT_COMFYUI)
    path = write_sparse(tmp_path / "z_image_turbo_bf16.safetensors", {k: (v.shape, "BF16") for k, v in comfy.items()})
    report = describe(path)
    dit = report["components"]["transformer"]
    assert dit["layout"] == "comfyui" and dit["tensors"] == 453 and dit["parameters"] == 6_154_908_736
    assert TransformerConfig.from_dict(dit["config"]) == TransformerConfig()
    assert dit["dtypes"] == {"BF16": 6_154_908_736}
    assert "problem" not in report and "cannot_load" not in dit  # its keys are the DiT's (checked from the header)


def _released_shapes(drop: tuple[str, ...] = (), extra_layers: int = 0) -> dict[str, tuple]:
    """The canonical shapes of the released DiT without the blocks in ``drop`` (prefixes such as
    'layers.29.'), with ``extra_layers`` more main layers."""
    shapes = _meta_shapes(TransformerConfig(n_layers=30 + extra_layers))
    return {k: v for k, v in shapes.items() if not k.startswith(drop)}


@pytest.mark.parametrize("drop, message", [
    (("layers.29.",), r"layers 29 missing: the checkpoint holds layers 0\.\.28 \(29 blocks\), the released Z-Image "
                      r"DiTs of its widths \(dim 3840\) have n_layers=30\. The file is incomplete"),
    (("layers.11.",), r"layers 11 missing: the checkpoint holds layers 0\.\.10, 12\.\.29 \(29 blocks\)\. The file is "
                      r"incomplete"),
    (("noise_refiner.1.", "context_refiner.1."), r"noise_refiner 1 missing: the checkpoint holds noise_refiner 0 "
                                                 r"\(1 block\), the released .* have n_refiner_layers=2"),
    (("context_refiner.0.",), r"context_refiner 0 missing: the checkpoint holds context_refiner 1 \(1 block\)"),
])
def test_a_released_width_dit_missing_blocks_is_refused_naming_them(tmp_path, drop, message):
    """A DiT file of the released widths missing blocks (a partial conversion: layers 0..28 of 30)
    had its config inferred with fewer layers: it loaded, ran and made wrong images without a word.
    Its blocks must be the released ones now (30 layers, 2 refiner blocks of each kind), and a gap
    in the indices is named as the blocks missing (and by `zimage info`)."""
    shapes = _released_shapes(drop)
    with pytest.raises(ValueError, match=message):
        infer_transformer_config(shapes)
    comfy = convert_state_dict({k: torch.empty(v, device="meta") for k, v in shapes.items()}, None, DIT_COMFYUI)
    path = write_sparse(tmp_path / "z_image_turbo_bf16.safetensors", {k: (v.shape, "BF16") for k, v in comfy.items()})
    dit = describe(path)["components"]["transformer"]
    assert "config" not in dit and re.search(message, dit["config_error"]), dit


def test_a_released_width_dit_of_another_depth_needs_its_config():
    """More layers than the released model, at its widths: refused unless a config gives that depth;
    a config giving the depth the file has is taken at its word (fewer layers too)."""
    with pytest.raises(ValueError, match=r"holds layers 0\.\.31 \(32 blocks\), the released .* n_layers=30: if the "
                                         r"file is another model of these widths, give its config \(n_layers=32\)"):
        infer_transformer_config(_released_shapes(extra_layers=2))
    assert infer_transformer_config(_released_shapes(extra_layers=2), {"n_layers": 32}).n_layers == 32
    assert infer_transformer_config(_released_shapes(("layers.29.",)), {"n_layers": 29}).n_layers == 29
    with pytest.raises(ValueError, match=r"layers 29 missing: .* the config gives n_layers=30"):
        infer_transformer_config(_released_shapes(("layers.29.",)), {"n_layers": 30})


def test_zimage_info_does_not_call_a_deeper_released_width_dit_unloadable(tmp_path):
    """A file of the released widths with more layers (32) is another model of these widths that
    loads with its config, as a file whose RoPE axes only a config gives: `zimage info` called it
    'cannot load' (and --check exited 1). It shows the config error only now; a file missing a
    layer is still one that cannot load."""
    for drop, extra, unloadable in (((), 2, False), (("layers.29.",), 0, True)):
        shapes = _released_shapes(drop, extra_layers=extra)
        comfy = convert_state_dict({k: torch.empty(v, device="meta") for k, v in shapes.items()}, None, DIT_COMFYUI)
        path = write_sparse(tmp_path / f"dit{extra}.safetensors", {k: (v.shape, "BF16") for k, v in comfy.items()})
        report = describe(path)
        dit = report["components"]["transformer"]
        assert "config" not in dit and "n_layers=" in dit["config_error"], dit
        assert ("cannot_load" in dit) == ("problem" in report) == unloadable, (extra, report)


def test_a_released_width_dit_with_fewer_layers_is_told_it_may_need_its_config():
    """A file of the released widths with fewer layers and no gap (0..19 of 30) is a cut file or
    another model of these widths (a pruned one, which loads with its config): the message said only
    to download it again. It names the config too now; a config's count is not second-guessed."""
    shapes = _released_shapes(tuple(f"layers.{i}." for i in range(20, 30)))
    with pytest.raises(ValueError, match=r"layers 20\.\.29 missing: .* The file is incomplete .*; if it is another "
                                         r"model of these widths \(fewer blocks: a pruned model\), give its config "
                                         r"\(n_layers=20\)$"):
        infer_transformer_config(shapes)
    assert infer_transformer_config(shapes, {"n_layers": 20}).n_layers == 20
    with pytest.raises(ValueError, match=r"the config gives n_layers=30\. The file is incomplete[^;]*$"):
        infer_transformer_config(shapes, {"n_layers": 30})


def test_a_dit_folder_missing_layers_is_refused_naming_them(tiny_model_dir, tmp_path, monkeypatch):
    """A DiT folder whose config.json gives more layers than its weights hold: load_component
    inferred the depth from the keys over the config.json and loaded a shallower DiT without a word;
    from_pretrained read every weight, then failed naming a few missing keys (a KeyError). Both
    refuse it now from the header, naming the folder and the missing layers, before a weight is read."""
    import shutil

    from safetensors.torch import save_file

    from zimage_native import ZImagePipeline
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("layers.1.")}, str(weights))
    message = (r"transformer: layers 1 missing: the checkpoint holds layers 0 \(1 block\), its config.json gives "
               r"n_layers=2\. The file is incomplete")
    with pytest.raises(ValueError, match=re.escape(str(model / "transformer")) + ": " + message):
        load_component("transformer", model / "transformer", None, "cpu")

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    patch_weight_reads(monkeypatch, no_reads)
    with pytest.raises(ValueError, match=re.escape(str(model / "transformer")) + ": " + message):
        ZImagePipeline.from_pretrained(model, device="cpu", dtype=torch.float32)


def test_released_vae_and_text_encoder_shapes(tmp_path):
    from transformers import Qwen3Config, Qwen3Model

    from zimage_native.formats import RELEASED_QWEN3
    from zimage_native.model.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
        te = Qwen3Model(Qwen3Config(**{k: v for k, v in RELEASED_QWEN3.items() if k != "model_type"}))
    ldm = convert_state_dict(vae.state_dict(), None, vae_ldm_keymap(4))
    path = write_sparse(tmp_path / "ae.safetensors", {k: (v.shape, "F32") for k, v in ldm.items()})
    entry = describe(path)["components"]["vae"]
    assert entry["layout"] == "ldm" and entry["parameters"] == 83_819_683 and entry["tensors"] == 244
    assert VAEConfig.from_dict(entry["config"]) == VAEConfig()
    sd = convert_state_dict(te.state_dict(), None, TE_TRANSFORMERS)
    path = write_sparse(tmp_path / "qwen_3_4b.safetensors", {k: (v.shape, "BF16") for k, v in sd.items()})
    entry = describe(path)["components"]["text_encoder"]
    assert entry["tensors"] == 398 and entry["parameters"] == 4_022_468_096 and "cannot_load" not in entry
    cfg = entry["config"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (2560, 36, 32, 8, 128, 9728, 151936)


def write_sparse(path: Path, tensors: dict[str, tuple[tuple, str]]) -> Path:
    """A safetensors file whose data section is a hole: the header is real, the bytes are never written."""
    sizes = {"BF16": 2, "F32": 4, "F16": 2, "F8_E4M3": 1}
    header, offset = {}, 0
    for key, (shape, dtype) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


# ----------------------------------------------------------------------------------- VAE and text encoder


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_ldm_vae_single_file_loads_like_the_folder(tiny_model_dir, tiny_pipe, tmp_path, prefix):
    path = write(tmp_path / "ae.safetensors", ldm_vae(tiny_model_dir, prefix))
    assert [(c.component, c.layout) for c in detect_format(path).components] == [("vae", "ldm")]
    vae = load_component("vae", path, torch.float32, "cpu", config=TINY_GROUPS)
    assert vae.config == dataclasses.replace(tiny_pipe.vae_config, sample_size=1024)  # sample_size: unused
    assert_same_weights(vae, tiny_pipe.vae)
    assert_rel(vae_output(vae), vae_output(tiny_pipe.vae), 1e-6, "VAE decode")


def test_vae_groups_must_divide_widths(tiny_model_dir, tmp_path):
    path = write(tmp_path / "ae.safetensors", ldm_vae(tiny_model_dir))
    with pytest.raises(ValueError, match="norm_num_groups"):
        load_component("vae", path, None, "cpu", config={"norm_num_groups": 24})
    with pytest.raises(ValueError, match="latent_channels=4 does not match"):
        load_component("vae", path, None, "cpu", config={"latent_channels": 4})


def test_text_encoder_single_file_loads_like_the_folder(tiny_model_dir, tiny_pipe, tmp_path):
    path = write(tmp_path / "qwen_3_4b.safetensors", prefixed_te(tiny_model_dir))
    fmt = detect_format(path)
    assert [(c.component, c.layout) for c in fmt.components] == [("text_encoder", "transformers")]
    # Only rope_theta / eps / max positions are not in the shapes; the tiny model uses the released ones.
    model = load_component("text_encoder", path, torch.float32, "cpu", config={"max_position_embeddings": 2048})
    ref = tiny_pipe.text_encoder
    assert_same_weights(model, ref.model)
    a = TextEncoder(model, ref.tokenizer).encode(["a cat on a chair", "mountains"])
    b = ref.encode(["a cat on a chair", "mountains"])
    for x, y in zip(a, b):
        assert_rel(x, y, 1e-6, "text features")


def test_text_encoder_errors(tiny_model_dir, tmp_path):
    sd = prefixed_te(tiny_model_dir, lm_head=False)
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match="looks truncated"):
        load_component("text_encoder", write(tmp_path / "t.safetensors", sd), None, "cpu")
    sd = {k: v for k, v in prefixed_te(tiny_model_dir).items() if "q_norm" not in k and "k_norm" not in k}
    with pytest.raises(UnsupportedFormatError, match="not a Qwen3 model"):
        load_component("text_encoder", write(tmp_path / "q2.safetensors", sd), None, "cpu")
    with pytest.raises(ValueError, match="num_key_value_heads=4 does not match"):
        load_component("text_encoder", write(tmp_path / "ok.safetensors", prefixed_te(tiny_model_dir)), None, "cpu",
                       config={"num_key_value_heads": 4})


def test_every_text_encoder_loader_drops_the_lm_head(tiny_model_dir, tiny_pipe, tmp_path):
    """An untied LM head (``lm_head.*``, here with a bias as some exports carry) is not part of the
    encoder: the folder loader and the single-file loader (one loader since the split) both drop it."""
    from zimage_native.text_encoder import load_qwen3_encoder

    sd = prefixed_te(tiny_model_dir, lm_head=False)
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    sd["lm_head.weight"] = torch.randn(vocab, hidden)
    sd["lm_head.bias"] = torch.randn(vocab)
    single = write(tmp_path / "qwen3_untied.safetensors", sd)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    write(folder / "model.safetensors", sd)
    (folder / "config.json").write_text((tiny_model_dir / "text_encoder" / "config.json").read_text())
    ref = tiny_pipe.text_encoder.model
    for model in (load_component("text_encoder", single, torch.float32, "cpu", config={"max_position_embeddings": 2048}),
                  load_component("text_encoder", folder, torch.float32, "cpu"),
                  load_qwen3_encoder(folder, torch.float32, "cpu")):
        assert not any(k.startswith("lm_head") for k in model.state_dict())
        assert_same_weights(model, ref)


def test_component_folders_load_too(tiny_model_dir, tiny_pipe):
    """A diffusers component folder goes through the same path; its config.json is the base."""
    dit = load_component("transformer", tiny_model_dir / "transformer", torch.float32, "cpu")
    assert_same_weights(dit, tiny_pipe.transformer)
    vae = load_component("vae", tiny_model_dir / "vae", torch.float32, "cpu")
    assert_same_weights(vae, tiny_pipe.vae)
    te = load_component("text_encoder", tiny_model_dir / "text_encoder", torch.float32, "cpu")
    assert_same_weights(te, tiny_pipe.text_encoder.model)


def test_infer_vae_and_text_encoder_configs_from_tiny_shapes(tiny_model_dir, tiny_pipe):
    from .fixtures import TINY_QWEN3, TINY_VAE

    shapes = {k: tuple(v.shape) for k, v in tiny_pipe.vae.state_dict().items()}
    cfg = infer_vae_config(shapes, TINY_GROUPS)
    assert cfg.block_out_channels == tuple(TINY_VAE["block_out_channels"]) and cfg.layers_per_block == 1
    te = {k: tuple(v.shape) for k, v in te_state(tiny_model_dir).items()}
    cfg = infer_text_encoder_config(te)
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
        assert cfg[key] == TINY_QWEN3[key], key
    assert cfg["hidden_size"] == 48 and cfg["rope_theta"] == 1e6


# ----------------------------------------------------------------------------------- single-file pipelines


def _pipe_class():
    from zimage_native import ZImagePipeline

    return ZImagePipeline


def test_from_single_files_generates_like_the_folder(tiny_model_dir, tiny_pipe, tmp_path):
    dit = write(tmp_path / "z_image_turbo_bf16.safetensors", comfy_dit(tiny_model_dir))
    vae = write(tmp_path / "ae.safetensors", ldm_vae(tiny_model_dir))
    te = write(tmp_path / "qwen_3_4b.safetensors", prefixed_te(tiny_model_dir))
    pipe = _pipe_class().from_single_files(
        transformer=dit, vae=vae, text_encoder=te, tokenizer=tiny_model_dir / "tokenizer", device="cpu",
        dtype=torch.float32, transformer_config=TINY_AXES, vae_config=TINY_GROUPS,
        text_encoder_config={"max_position_embeddings": 2048})
    pipe.progress = False
    kwargs = dict(width=32, height=32, num_inference_steps=2, seed=5, output_type="latent")
    assert_rel(pipe("a cat", **kwargs).images, tiny_pipe("a cat", **kwargs).images, 1e-6, "latents")
    image = pipe("a cat", width=32, height=32, num_inference_steps=1, seed=5, output_type="np").images
    ref = tiny_pipe("a cat", width=32, height=32, num_inference_steps=1, seed=5, output_type="np").images
    assert_rel(torch.from_numpy(image), torch.from_numpy(ref), 1e-6, "image")
    assert "single files" in pipe.source


def test_all_in_one_file(tiny_model_dir, tiny_pipe, tmp_path):
    """ComfyUI all-in-one: model.diffusion_model. + vae. + text_encoders.qwen3_4b.transformer. in one file."""
    sd = comfy_dit(tiny_model_dir)
    sd.update(ldm_vae(tiny_model_dir, "vae."))
    sd.update({"text_encoders.qwen3_4b.transformer." + k: v for k, v in prefixed_te(tiny_model_dir).items()})
    path = write(tmp_path / "aio.safetensors", sd)
    assert sorted(c.component for c in detect_format(path).components) == ["text_encoder", "transformer", "vae"]
    pipe = _pipe_class().from_single_files(
        transformer=path, tokenizer=tiny_model_dir, device="cpu", dtype=torch.float32, transformer_config=TINY_AXES,
        vae_config=TINY_GROUPS, text_encoder_config={"max_position_embeddings": 2048})
    assert_same_weights(pipe.transformer, tiny_pipe.transformer)
    assert_same_weights(pipe.vae, tiny_pipe.vae)
    assert_same_weights(pipe.text_encoder.model, tiny_pipe.text_encoder.model)


def test_an_fp8_dit_file_runs_the_pipeline_as_its_upcast_weights_resident_and_streamed(tiny_model_dir, tmp_path):
    from zimage_native.quant_linear import FP8StoredLinear

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    dit = write(tmp_path / "z_image_turbo_fp8_scaled.safetensors", sd)
    assert_kept_dit_runs_as_upcast(tiny_model_dir, dit, lambda t: t.layers[0].feed_forward.w1, FP8StoredLinear)


def assert_kept_dit_runs_as_upcast(model_dir, dit, layer, kind):
    """The pipeline with the DiT file ``dit`` kept packed (``layer(transformer)`` is a ``kind``) gives
    the latents of its upcast weights, resident and under each offload."""
    from .fixtures import our_pipeline

    kw = dict(width=32, height=32, num_inference_steps=2, seed=5, output_type="latent")
    upcast = our_pipeline(model_dir, transformer=dit)
    upcast.transformer = load_component("transformer", dit, torch.float32, "cpu", config=TINY_AXES, keep_fp8=False)
    want = upcast("a cat", **kw).images
    for offload in ("none", "blocks", "model"):
        pipe = our_pipeline(model_dir, transformer=dit, offload=offload)
        assert isinstance(layer(pipe.transformer), kind)
        assert torch.equal(pipe("a cat", **kw).images, want), offload


def test_from_single_files_needs_every_component(tiny_model_dir, tmp_path):
    dit = write(tmp_path / "dit.safetensors", comfy_dit(tiny_model_dir))
    with pytest.raises(ValueError, match="no vae or text_encoder given"):
        _pipe_class().from_single_files(transformer=dit, tokenizer=tiny_model_dir)
    with pytest.raises(ValueError, match="needs transformer="):
        _pipe_class().from_single_files(vae=dit)


def test_format_comes_from_the_header_not_the_name(tiny_model_dir, tmp_path):
    path = write(tmp_path / "ae.safetensors", comfy_dit(tiny_model_dir))  # a DiT named like a VAE
    assert [c.component for c in detect_format(path).components] == ["transformer"]
    with pytest.raises(UnsupportedFormatError, match=r"no vae in this checkpoint \(found: transformer\)"):
        load_component("vae", path, None, "cpu")


# ----------------------------------------------------------------------------------- fp8


FP8_FILES = pytest.mark.parametrize("scaled, scale_name, per_row", [
    (False, None, False), (True, "scale_weight", False), (True, "weight_scale", True)])


@FP8_FILES
def test_fp8_dit_is_dequantised_while_loading_when_asked(tiny_model_dir, tiny_pipe, tmp_path, scaled, scale_name,
                                                          per_row):
    sd, expected = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), scaled, scale_name or "", per_row)
    path = write(tmp_path / "fp8.safetensors", sd)
    info = detect_format(path).components[0]
    assert info.quantization == ("scaled-fp8" if scaled else "fp8") and "F8_E4M3" in info.dtypes
    model = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=False)
    want = convert_state_dict(expected, DIT_COMFYUI, None)
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert_rel(dit_output(model), dit_output(tiny_pipe.transformer), 0.1, "fp8 DiT output")  # lossy, but close
    bf16 = load_component("transformer", path, torch.bfloat16, "cpu", config=TINY_AXES, keep_fp8=False)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


@FP8_FILES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dit_keeps_its_float8_weights_with_the_results_of_the_upcast_ones(tiny_model_dir, tmp_path, scaled,
                                                                             scale_name, per_row, dtype):
    from zimage_native.quant_linear import FP8StoredLinear, resident_bytes

    sd, expected = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), scaled, scale_name or "", per_row)
    path = write(tmp_path / "fp8.safetensors", sd)
    kept = load_component("transformer", path, dtype, "cpu", config=TINY_AXES)
    upcast = load_component("transformer", path, dtype, "cpu", config=TINY_AXES, keep_fp8=False)
    stored = {n: m for n, m in kept.named_modules() if isinstance(m, FP8StoredLinear)}
    linears = [n for n, m in upcast.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(stored) == sorted(linears)  # every linear: the test file stores all 2-D weights in fp8
    want = convert_state_dict(expected, DIT_COMFYUI, None)
    for name, layer in stored.items():  # the file's values, dequantised as loading does
        assert layer.weight.dtype == torch.uint8 and layer.scale.dtype == torch.float32
        assert torch.equal(layer.dequantize(torch.float32), want[f"{name}.weight"]), name
        assert torch.equal(layer.dequantize(dtype), upcast.get_submodule(name).weight), name  # as loading casts
    if dtype == torch.float32:
        assert torch.equal(dit_output(kept), dit_output(upcast))  # the same results, bit for bit
    block = lambda m: resident_bytes(m.layers[0])  # noqa: E731  (1 byte per value against 2 or 4)
    assert block(kept) < 0.6 * block(upcast) if dtype == torch.bfloat16 else block(kept) < 0.3 * block(upcast)


def test_fp8_stored_weights_survive_a_dtype_cast_of_the_model(tiny_model_dir, tmp_path):
    from zimage_native.quant_linear import FP8StoredLinear

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    model = load_component("transformer", write(tmp_path / "fp8.safetensors", sd), torch.float32, "cpu",
                           config=TINY_AXES)
    layer = model.layers[0].attention.to_q
    assert isinstance(layer, FP8StoredLinear)
    before = layer.dequantize(torch.float32)
    model.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.dequantize(torch.float32), before)
    assert "float8_e4m3fn" in repr(layer)


def test_a_lora_on_an_fp8_dit_file_is_a_side_path_equal_to_the_fused_lora(tiny_model_dir, tmp_path):
    from zimage_native.lora import LoraMixin

    class Holder(LoraMixin):
        def __init__(self, transformer):
            self.transformer = transformer

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    path = write(tmp_path / "fp8.safetensors", sd)
    kept = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES)
    upcast = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=False)
    g = torch.Generator().manual_seed(1)
    lora = {  # the original module tree's fused qkv: one A, and a B split by rows over to_q / to_k / to_v
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, 64, generator=g) * 0.02,
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(192, 4, generator=g) * 0.02,
        "diffusion_model.layers.1.feed_forward.w2.lora_A.weight": torch.randn(2, 170, generator=g) * 0.02,
        "diffusion_model.layers.1.feed_forward.w2.lora_B.weight": torch.randn(64, 2, generator=g) * 0.02,
    }
    before, stored = dit_output(kept), kept.layers[0].attention.to_k.weight.clone()
    holder = Holder(kept)
    assert holder.load_lora(lora, scale=0.7).weights == 4
    assert torch.equal(kept.layers[0].attention.to_k.weight, stored) and len(kept.layers[0].attention.to_k.lora) == 1
    Holder(upcast).load_lora(lora, scale=0.7)  # fused into the upcast weights
    assert_rel(dit_output(kept), dit_output(upcast), 1e-6, "fp8 DiT + LoRA")
    assert holder.unload_lora() == 4 and torch.equal(dit_output(kept), before)


def fusion_lora() -> dict[str, torch.Tensor]:
    """A LoRA (ComfyUI names) on the q|k|v of layers.0 (the whole fusion) and on to_q alone of layers.1
    (one part of it)."""
    g = torch.Generator().manual_seed(1)
    return {
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, 64, generator=g) * 0.02,
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(192, 4, generator=g) * 0.02,
        "diffusion_model.layers.1.attention.to_q.lora_A.weight": torch.randn(2, 64, generator=g) * 0.02,
        "diffusion_model.layers.1.attention.to_q.lora_B.weight": torch.randn(64, 2, generator=g) * 0.02,
    }


def module_kinds(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


def assert_fusion_lora_held_then_released(plain, pipe, stored: type) -> None:
    """``pipe`` (with :func:`fusion_lora` loaded) and ``plain`` (without) after fp8: the layers with side
    paths stay ``stored`` layers and layers.1's q|k|v stays apart (its to_k in fp8); after unload_lora
    ``pipe`` has the modules and the output of ``plain``, bit for bit, and nothing waits for fp8."""
    from zimage_native.accel.fp8 import Float8Linear, fp8_waiting

    held = [pipe.transformer.layers[0].attention.to_k, pipe.transformer.layers[1].attention.to_q]
    assert all(isinstance(m, stored) and m.lora for m in held)
    assert pipe.transformer.layers[1].attention.to_qkv is None and isinstance(
        pipe.transformer.layers[1].attention.to_k, Float8Linear)
    want = dit_output(plain.transformer)
    assert not torch.equal(dit_output(pipe.transformer), want)  # the LoRA is in effect
    pipe.unload_lora()
    assert module_kinds(pipe.transformer) == module_kinds(plain.transformer)
    assert not fp8_waiting(pipe.transformer)
    assert torch.equal(dit_output(pipe.transformer), want)


@needs_cpu_fp8
@pytest.mark.parametrize("compile", ["off", "blocks"])
def test_unload_lora_after_fp8_gives_the_dit_fp8_makes_without_a_lora(tiny_model_dir, tmp_path, compile):
    """An fp8 file's linears with LoRA side paths stay stored layers (weight-only) under fp8, and
    their q|k|v stays apart. After unload_lora they become fp8 GEMMs, fused as without the LoRA: the
    same module types under the same names (to_qkv included), the same results bit for bit, and a
    compiled DiT compiled again around the new modules."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.quant_linear import FP8StoredLinear, PackedLinear

    from .fixtures import our_pipeline

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    dit = write(tmp_path / "fp8.safetensors", sd)
    lora = fusion_lora()
    options = dict(fp8=True) if compile == "off" else dict(fp8=True, compile=compile,
                                                           compile_backend=CompileCounterWithBackend("eager"))
    plain, pipe = our_pipeline(tiny_model_dir, transformer=dit), our_pipeline(tiny_model_dir, transformer=dit)
    torch._dynamo.reset()
    plain.optimize(**options)
    pipe.load_lora(lora, scale=0.7)
    pipe.optimize(**options)
    assert_fusion_lora_held_then_released(plain, pipe, FP8StoredLinear)
    if compile != "off":
        block = pipe.transformer.layers[0]
        assert type(block.forward).__name__ == "CompiledBlock"
        assert block.forward.packed == [m for m in block.modules() if isinstance(m, PackedLinear)]


@needs_cpu_fp8
def test_fp8_compute_takes_an_fp8_files_values_and_scales_as_they_are(tiny_model_dir, tmp_path):
    from zimage_native.accel.fp8 import Float8Linear, quantize_fp8_

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    kept = load_component("transformer", write(tmp_path / "fp8.safetensors", sd), torch.bfloat16, "cpu",
                          config=TINY_AXES)
    attention = kept.layers[0].attention
    stored = [attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]]
    values, scales = [m.values().clone() for m in stored], [m.scale.clone() for m in stored]
    out_storage = stored[3].values().data_ptr()
    # q|k|v of the 4 blocks stacked into one fp8 GEMM each (12 linears) and the 4 out projections
    # (the feed-forward width, 170, is not a multiple of 16)
    line = quantize_fp8_(kept)
    assert "16 linears in float8 e4m3 (4 as fused GEMMs" in line
    # the file's other linears (feed-forward, adaLN, embedders, final layer) stay in fp8, not "21 kept in bfloat16"
    assert line.endswith(", 21 kept as stored layers (float8_e4m3fn 21; dequantised per call)"), line
    layers = [attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]]
    assert all(isinstance(m, Float8Linear) for m in [*layers, attention.to_qkv])
    for layer, value, scale in zip(layers, values, scales):  # no second rounding
        assert torch.equal(layer.weight.view(torch.uint8), value.view(torch.uint8))
        assert torch.equal(layer.weight_scale, scale)
    assert layers[3].weight.data_ptr() == out_storage  # an unfused layer shares the file's storage: no copy
    assert layers[0].weight.data_ptr() == attention.to_qkv.weight.data_ptr()  # the parts are views of the fusion
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(layers[0].reference(x.float()), Float8Linear(values[0], scales[0], None).reference(x.float()))
    assert_rel(layers[0](x), layers[0].reference(x), 1e-2, "fp8 GEMM against its slow twin")


@needs_cpu_fp8
def test_an_fp8_files_kept_fusions_are_one_fp8_gemm_with_one_activation_quantisation(tmp_path, monkeypatch):
    from zimage_native.accel import fp8
    from zimage_native.model.layers import FeedForward
    from zimage_native.model.transformer import Attention, ZImageTransformer
    from zimage_native.testing import randomize_

    from .dit_configs import TINY_FP8_DIT  # its FFN width (256) takes fp8, so w1|w3 fuse too

    source = randomize_(ZImageTransformer(TransformerConfig.from_dict(TINY_FP8_DIT)))
    sd, _ = to_fp8(convert_state_dict(source.state_dict(), None, DIT_COMFYUI), True, per_row=True)  # a scale per row
    path = write(tmp_path / "fp8.safetensors", sd)
    models = [load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES) for _ in range(2)]
    fused, apart = models
    assert "28 linears in float8 e4m3 (8 as fused GEMMs" in fp8.quantize_fp8_(fused)  # 4 attentions' q|k|v, 4 feed-forwards' w1|w3
    monkeypatch.setattr(fp8, "_fusions", lambda module: [])  # the same layers, each its own GEMM
    assert "(0 as fused GEMMs" in fp8.quantize_fp8_(apart)
    assert apart.layers[0].attention.to_qkv is None and apart.layers[0].feed_forward.w13 is None
    x = torch.randn(2, 7, 96)
    for mine, theirs, names in ((fused.layers[0].attention, apart.layers[0].attention, ("to_q", "to_k", "to_v")),
                                (fused.layers[0].feed_forward, apart.layers[0].feed_forward, ("w1", "w3"))):
        whole = (mine.to_qkv if names[0] == "to_q" else mine.w13).reference(x).chunk(len(names), dim=-1)
        for name, part in zip(names, whole):  # the same rows and scales (fp64 twin)
            assert getattr(mine, name).weight.untyped_storage().data_ptr() == \
                (mine.to_qkv if names[0] == "to_q" else mine.w13).weight.untyped_storage().data_ptr()
            assert torch.equal(part, getattr(theirs, name).reference(x))

    calls = []

    def counting(rows):
        calls.append(rows.shape)
        return fp8.quantize_rows(rows)

    outputs = []
    for model in models:
        for m in model.modules():
            if isinstance(m, fp8.Float8Linear):
                m.quantize = counting
        calls.clear()
        outputs += [dit_output(model), len(calls)]
    fused_out, fused_calls, apart_out, apart_calls = outputs
    attentions = sum(isinstance(m, Attention) for m in fused.modules())
    ffns = sum(isinstance(m, FeedForward) for m in fused.modules())
    assert apart_calls - fused_calls == 2 * attentions + ffns  # one activation quantised once per fusion
    assert_rel(fused_out, apart_out, 1e-6, "fused fp8 GEMMs against one fp8 GEMM per linear")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fp8_weights_can_stay_fp8_with_their_scales(tiny_model_dir, tmp_path, dtype):
    """With a dtype too (it casts the other floating tensors): the fp8 weights were cast to it by
    rows, without their scales, since they were read by rows."""
    sd, expected = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    path = write(tmp_path / "fp8.safetensors", sd)
    state, scales = read_component_state_dict(path, "transformer", dequantize_fp8=False, dtype=dtype)
    q = state["layers.0.attention.to_k.weight"]
    assert q.dtype == torch.float8_e4m3fn
    assert state["x_pad_token"].dtype == (dtype or torch.float32)  # a 2-D tensor of the file, cast by rows
    assert torch.equal(scales["layers.0.attention.to_k.weight"], sd["layers.0.attention.qkv.scale_weight"])
    want = convert_state_dict(expected, DIT_COMFYUI, None)["layers.0.attention.to_k.weight"]
    assert torch.equal(q.float() * scales["layers.0.attention.to_k.weight"], want)


def test_scaled_fp8_text_encoder(tiny_model_dir, tiny_pipe, tmp_path):
    sd, expected = to_fp8(prefixed_te(tiny_model_dir, lm_head=False), True)
    path = write(tmp_path / "qwen_3_4b_fp8_scaled.safetensors", sd)
    assert detect_format(path).components[0].quantization == "scaled-fp8"
    model = load_component("text_encoder", path, torch.float32, "cpu", config={"max_position_embeddings": 2048})
    assert torch.equal(model.state_dict()["layers.0.self_attn.q_proj.weight"],
                       expected["model.layers.0.self_attn.q_proj.weight"])




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_scaled_fp8_text_encoder_quantised_while_loading_equals_quantising_it_loaded(tiny_model_dir, tmp_path,
                                                                                        dtype):
    """The fp8 values dequantised by blocks into the load dtype, then quantised to int8 by chunks of
    rows, give the codes of the encoder loaded whole and quantised after (the tiny widths are not
    whole int4 groups)."""
    from zimage_native.quantize import quantize_text_encoder

    sd, _ = to_fp8(prefixed_te(tiny_model_dir, lm_head=False), True, per_row=True)
    path = write(tmp_path / "te_fp8.safetensors", sd)
    config = {"max_position_embeddings": 2048}
    want = quantize_text_encoder(load_component("text_encoder", path, dtype, "cpu", config=config), "int8")
    got = load_component("text_encoder", path, dtype, "cpu", config=config, quant="int8")
    want_state, got_state = want.state_dict(), got.state_dict()
    assert want_state.keys() == got_state.keys() and any(k.endswith(".qweight") for k in got_state)
    for key, t in want_state.items():
        assert got_state[key].dtype == t.dtype and torch.equal(got_state[key], t), key


@pytest.mark.parametrize("scaled", [False, True])
def test_a_text_encoder_file_skips_unused_tensors_before_reading_them(tiny_model_dir, tmp_path, monkeypatch, scaled):
    """The last layer, the final norm and lm_head of a text encoder file are not loaded (the engine
    reads hidden_states[-2]): they are not read from the file, so not dequantised either (fp8 files
    dequantised and dropped them: lm_head alone is 151936 x 2560 in Qwen3-4B). The kept keys load
    as before, and strictly: a key the model lacks is still refused."""
    from zimage_native.formats.checkpoint import Checkpoint
    from zimage_native.text_encoder import unused_key

    from .fixtures import TINY_QWEN3

    sd, _ = to_fp8(prefixed_te(tiny_model_dir, lm_head=True), scaled)
    n = TINY_QWEN3["num_hidden_layers"]
    path = write(tmp_path / "te.safetensors", sd)
    config = {"max_position_embeddings": 2048}
    reads = []
    get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: reads.append(key) or get(self, key))
    model = load_component("text_encoder", path, torch.float32, "cpu", config=config)
    unused = {k for k in sd if unused_key(k.removeprefix("model."), n) or k.startswith("lm_head.")}
    assert "lm_head.weight" in unused and f"model.layers.{n - 1}.mlp.up_proj.weight" in unused
    assert not unused & set(reads), sorted(unused & set(reads))
    state = model.state_dict()
    for key, t in state.items():
        file_key = "model." + key
        if file_key in sd and key != "rotary_emb.inv_freq":
            scale = sd.get(file_key[: -len("weight")] + "scale_weight")
            want = sd[file_key].float() * (scale if scale is not None else 1)
            assert torch.equal(t, want), key
    sd["model.layers.0.self_attn.extra.weight"] = torch.ones(3)  # kept (not an unused key): still refused
    with pytest.raises(StateDictMismatchError, match="unexpected.*layers.0.self_attn.extra.weight"):
        load_component("text_encoder", write(tmp_path / "extra.safetensors", sd), torch.float32, "cpu", config=config)


def test_a_text_encoder_missing_a_tensor_is_refused_before_its_weights_are_read(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """A text encoder lacking a tensor (a partial conversion) was read whole (22 of the tiny file's
    35 tensors) before it was refused; its header's keys are checked first now, as the DiT's are: as
    a single file (bf16; int8, whose message named the quantised module's keys, qweight and scale),
    a component folder and a model folder's text_encoder (load_qwen3_encoder)."""
    import shutil

    from safetensors.torch import save_file

    from zimage_native.formats.checkpoint import Checkpoint
    from zimage_native.loading import StateDictMismatchError
    from zimage_native.text_encoder import load_qwen3_encoder

    sd = {k: v for k, v in prefixed_te(tiny_model_dir).items() if "layers.1.mlp.up_proj" not in k}
    path = write(tmp_path / "te-cut.safetensors", sd)
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_model_dir / "text_encoder", folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    save_file(sd, str(folder / "model.safetensors"))
    reads = []
    for name in ("get", "read_rows", "raw_bytes"):  # as stored, by rows (cast), as bytes
        method = getattr(Checkpoint, name)
        monkeypatch.setattr(Checkpoint, name, lambda self, key, *a, _m=method: reads.append(key) or _m(self, key, *a))
    loads = [lambda: load_component("text_encoder", path, torch.bfloat16, "cpu"),
             lambda: load_component("text_encoder", path, torch.float32, "cpu", quant="int8"),
             lambda: load_component("text_encoder", folder, torch.float32, "cpu"),
             lambda: load_qwen3_encoder(folder, torch.float32, "cpu")]
    for load in loads:
        with pytest.raises(StateDictMismatchError, match=r"1 missing keys, e.g. \['layers.1.mlp.up_proj.weight'\]"):
            load()
        assert reads == [], reads


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale", ["none", "scalar", "one-element", "per-row", "per-row-2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_is_dequantised_by_blocks_of_rows_into_the_whole_tensor_result(monkeypatch, fp8_dtype, scale, dtype):
    """Blocks of rows upcast one at a time (3 rows, a last block of 1) give the whole-tensor
    upcast's values bit for bit (each value depends on its row alone), for any scale form."""
    from zimage_native.formats import fp8

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(10, 7, generator=g) * 30).to(fp8_dtype)
    scales = {"none": None, "scalar": torch.tensor(0.37), "one-element": torch.tensor([1.9]),
              "per-row": torch.rand(10, generator=g) + 0.1, "per-row-2d": torch.rand(10, 1, generator=g) + 0.1}
    s = scales[scale]

    def whole(w):  # the slow twin: the whole tensor upcast, times its scale, rounded once
        f = w.to(torch.float32)
        if s is not None:
            f = f * (s.reshape(-1, *([1] * (w.ndim - 1))) if s.ndim == 1 and s.numel() > 1 else s)
        return f.to(dtype)

    monkeypatch.setattr(fp8, "CHUNK_ELEMENTS", 3 * 7)
    got = fp8.dequantize(weight, s, dtype)
    assert got.dtype == dtype and torch.equal(got.view(-1).view(torch.uint8), whole(weight).view(-1).view(torch.uint8))
    conv = weight.reshape(10, 7, 1, 1)  # a 1x1 conv weight: rows along the first dimension
    if scale != "per-row-2d":
        assert torch.equal(fp8.dequantize(conv, s, dtype), whole(conv))
    if s is None or s.numel() == 1:  # no rows: an empty result, as the whole-tensor upcast gives
        assert fp8.dequantize(weight[:0], s, dtype).shape == (0, 7)


_PEAK_SCRIPT = """
import sys, torch
from zimage_native.loading import load_component

warm, big = sys.argv[1:]
config = {"max_position_embeddings": 2048}
load_component("text_encoder", warm, torch.bfloat16, "cpu", config=config)  # imports, first allocations
start = reset_peak()
model = load_component("text_encoder", big, torch.bfloat16, "cpu", config=config)
held = sum(t.nbytes for t in model.state_dict().values())
print(status("VmHWM") - start, held)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
def test_an_fp8_text_encoder_loads_without_an_fp32_copy_of_its_embedding(tiny_model_dir, tmp_path):
    """A scaled-fp8 text encoder loaded in bf16: the embedding (the largest tensor; 151936 x 2560 in
    Qwen3-4B) was upcast whole to fp32, then multiplied by its scale (a second fp32 copy), then cast:
    a real-width file peaked at 3.6 GB above the start for a 0.93 GB bf16 model. It is dequantised
    by blocks of rows into bf16 now: the peak (in a fresh process) stays under the model, the file's
    mapped pages and one fp32 copy of the embedding (measured: 102 MiB against a bound of 336 MiB);
    the whole-tensor path holds two fp32 copies at once (measured: 432 MiB)."""

    sd, _ = to_fp8(prefixed_te(tiny_model_dir, lm_head=False), True)
    warm = write(tmp_path / "warm.safetensors", sd)
    rows, width = 1 << 20, sd["model.embed_tokens.weight"].shape[1]  # 48 Mi values: 48 MiB in fp8, 192 MiB in fp32
    codes = torch.randint(0, 0x78, (rows, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sd["model.embed_tokens.weight"] = codes.view(torch.float8_e4m3fn)
    big = write(tmp_path / "big.safetensors", sd)
    del sd, codes
    peak, held = map(int, run_fresh(_PEAK_SCRIPT, warm, big).split())
    fp32_embedding = rows * width * 4
    bound = held + big.stat().st_size + fp32_embedding  # less than the whole path's two fp32 copies
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"(the model holds {held / 2**20:.0f} MiB)"


QUANT_PEAK_SCRIPT = """
import sys, torch
from zimage_native.loading import load_component

warm, big, dtype = sys.argv[1:]
dtype = getattr(torch, dtype)
config = {"max_position_embeddings": 2048}
load_component("text_encoder", warm, dtype, "cpu", config=config, quant="int8")  # imports, first allocations
start = reset_peak()
model = load_component("text_encoder", big, dtype, "cpu", config=config, quant="int8")
held = sum(t.nbytes for t in model.state_dict().values())
print(status("VmHWM") - start, held)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
def test_an_fp8_text_encoder_quantised_while_loading_never_holds_a_whole_fp32_weight(tiny_model_dir, tmp_path):
    """A scaled-fp8 text encoder quantised to int8 while loading in fp32 (the CPU's dtype): each fp8
    weight was dequantised whole to fp32 before it was quantised by chunks of rows (1.56 GB for
    Qwen3-4B's 151936 x 2560 embedding; a real-width file peaked 2597 MiB above the start for a
    379 MiB model). The fp8 rows are dequantised by the chunks that are quantised now (1145 MiB):
    the peak stays under the model, the file's mapped pages and half the embedding in fp32
    (measured here: 60 MiB against a bound of 200 MiB; the whole-weight path: 316 MiB)."""

    sd, _ = to_fp8(prefixed_te(tiny_model_dir, lm_head=False), True, per_row=True)
    warm = write(tmp_path / "warm.safetensors", sd)
    rows, width = 1 << 20, sd["model.embed_tokens.weight"].shape[1]  # 48 Mi values: 48 MiB in fp8, 192 MiB in fp32
    codes = torch.randint(0, 0x78, (rows, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sd["model.embed_tokens.weight"] = codes.view(torch.float8_e4m3fn)
    sd["model.embed_tokens.scale_weight"] = torch.rand(rows, generator=torch.Generator().manual_seed(1)) + 0.1
    big = write(tmp_path / "big.safetensors", sd)
    del sd, codes
    peak, held = map(int, run_fresh(QUANT_PEAK_SCRIPT, warm, big, "float32").split())
    fp32_embedding = rows * width * 4
    bound = held + big.stat().st_size + fp32_embedding // 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"(the model holds {held / 2**20:.0f} MiB)"


_MAPPED_SCRIPT = """
import sys, torch
from zimage_native.loading import load_component

warm, big = sys.argv[1:]
config = {"max_position_embeddings": 2048}
load_component("text_encoder", warm, torch.bfloat16, "cpu", config=config)  # imports, first allocations
start = reset_peak()
start_file = status("RssFile")
model = load_component("text_encoder", big, torch.bfloat16, "cpu", config=config)
held = sum(t.nbytes for t in model.state_dict().values())
print(status("VmHWM") - start, status("RssFile") - start_file, held)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
@pytest.mark.parametrize("stored", ["fp8", "fp32"])
def test_a_converted_tensor_is_read_by_rows_not_through_the_memory_map(tiny_model_dir, tmp_path, stored):
    """A text encoder whose embedding is converted while loading in bf16 (dequantised from fp8, or
    cast from fp32): it was read through the file's memory map, whose every page read stayed
    resident beside the result, and the norm weights (views of the same map) kept them resident
    after the load: at real width (Qwen3-4B, one layer) the fp8 file peaked 1464 MiB above the
    start for a 934 MiB model with 476 MiB of the file still mapped after it, the fp32 file 2811
    MiB. Converted tensors are read from the file by blocks of rows now (Checkpoint.read_rows):
    the peak stays under the model and half the file, and the file's pages do not stay mapped
    (measured here: fp8 306 MiB with 12 MiB mapped, fp32 112 MiB with none, against bounds of 366
    and 192 MiB; through the map: 500 MiB with 156 mapped, 288 MiB with 192 mapped)."""

    sd = prefixed_te(tiny_model_dir, lm_head=False)
    if stored == "fp8":
        sd, _ = to_fp8(sd, True, per_row=True)
    else:
        sd = {k: v.float() for k, v in sd.items()}
    sd = {k: v.bfloat16() if v.ndim == 1 and v.is_floating_point() else v for k, v in sd.items()}  # kept as views
    warm = write(tmp_path / "warm.safetensors", sd)
    rows = (3 << 20) if stored == "fp8" else (1 << 20)  # 144 MiB of fp8 (288 MiB in bf16), or 192 MiB of fp32
    width = sd["model.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(0)
    if stored == "fp8":
        codes = torch.randint(0, 0x78, (rows, width), dtype=torch.uint8, generator=g)
        sd["model.embed_tokens.weight"] = codes.view(torch.float8_e4m3fn)
        sd["model.embed_tokens.scale_weight"] = torch.rand(rows, generator=g) + 0.1
    else:
        sd["model.embed_tokens.weight"] = torch.randn(rows, width, generator=g)
    big = write(tmp_path / "big.safetensors", sd)
    del sd
    peak, mapped, held = map(int, run_fresh(_MAPPED_SCRIPT, warm, big).split())
    size = big.stat().st_size
    assert peak < held + size // 2, f"peak {peak / 2**20:.0f} MiB above the start, bound " \
                                    f"{(held + size // 2) / 2**20:.0f} MiB (the model holds {held / 2**20:.0f} MiB)"
    assert mapped < size // 4, f"{mapped / 2**20:.0f} MiB of the file still mapped after the load"


_FOLDER_SCRIPT = """
import sys, torch
from zimage_native.text_encoder import load_qwen3_encoder

warm, big = sys.argv[1:]
load_qwen3_encoder(warm, torch.float32, "cpu")  # imports, first allocations
start = reset_peak()
model = load_qwen3_encoder(big, torch.float32, "cpu")
held = sum(t.nbytes for t in model.state_dict().values())
print(status("VmHWM") - start, held)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
def test_a_folder_cast_while_loading_is_read_by_rows(tiny_model_dir, tmp_path):
    """A bf16 component folder loaded in fp32 (the CPU's default dtype; ``iter_tensors``, which
    from_pretrained's folders go through): each tensor was cast through the file's memory map,
    whose pages stayed resident until the whole file was read (a real-width DiT shard of 1.4 GB:
    4190 MiB at the peak for 2790 MiB of weights; 2805 MiB now). Here a 1 Mi x 48 bf16 embedding
    (96 MiB in the file, 192 MiB in fp32): the peak stays under the model and a quarter of the
    file (measured: 201 MiB against a bound of 216 MiB; through the map: 288 MiB)."""
    import json
    import shutil

    for name, rows in (("warm", None), ("big", 1 << 20)):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir / "text_encoder", folder)
        if rows:
            sd = {k: v.bfloat16() for k, v in te_state(tiny_model_dir).items()}
            sd["embed_tokens.weight"] = torch.randn(rows, sd["embed_tokens.weight"].shape[1],
                                                    generator=torch.Generator().manual_seed(0)).bfloat16()
            write(folder / "model.safetensors", sd)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    peak, held = map(int, run_fresh(_FOLDER_SCRIPT, tmp_path / "warm", tmp_path / "big").split())
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    assert peak < held + size // 4, f"peak {peak / 2**20:.0f} MiB above the start, bound " \
                                    f"{(held + size // 4) / 2**20:.0f} MiB (the model holds {held / 2**20:.0f} MiB)"


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_read_by_rows_are_those_read_through_the_map(tmp_path, monkeypatch, stored, dtype):
    """Checkpoint.read_rows, the cast by blocks of rows and the fp8 dequantisation by blocks read
    from the file give the values of the whole tensor read through the memory map, bit for bit
    (blocks of 3 rows and a last one of 1; a 4-D tensor; a scale per row)."""
    from zimage_native.formats import fp8, tensors
    from zimage_native.formats.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": (torch.randn(10, 7, generator=g) * 30).to(stored),
          "b.weight": (torch.randn(10, 3, 1, 2, generator=g) * 30).to(stored),
          "a.scale_weight": torch.rand(10, generator=g) + 0.1}
    path = write(tmp_path / "t.safetensors", sd)
    monkeypatch.setattr(fp8, "CHUNK_ELEMENTS", 3 * 7)
    monkeypatch.setattr(tensors, "CAST_ELEMENTS", 3 * 6)
    with Checkpoint(path) as ckpt:
        for key in ("a.weight", "b.weight"):
            whole = ckpt.get(key)
            assert torch.equal(ckpt.read_rows(key, 2, 9).view(torch.uint8), whole[2:9].view(torch.uint8))
            assert ckpt.read_rows(key, 9, 20).shape == (1, *whole.shape[1:])
            if stored in fp8.TORCH_FP8:
                scale = ckpt.get("a.scale_weight") if key == "a.weight" else None
                got = fp8.dequantize(ckpt.meta(key), scale, dtype, lambda i, j: ckpt.read_rows(key, i, j))
                want = fp8.dequantize(whole, scale, dtype)
            else:
                got, want = tensors.cast_rows(ckpt, key, dtype), whole.to(dtype)
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key


def test_read_rows_refuses_a_buffer_it_cannot_read_into(tmp_path):
    """A too-small (or not uint8) buffer for read_rows failed at the final reshape, after the read,
    with a size message that named neither the buffer nor the tensor."""
    from zimage_native.formats.checkpoint import Checkpoint

    path = write(tmp_path / "t.safetensors", {"a.weight": torch.randn(10, 7)})
    with Checkpoint(path) as ckpt:
        assert torch.equal(ckpt.read_rows("a.weight", 0, 4, torch.empty(4 * 7 * 4, dtype=torch.uint8)),
                           ckpt.get("a.weight")[:4])
        for buffer in (torch.empty(4 * 7 * 4 - 1, dtype=torch.uint8), torch.empty(4 * 7, dtype=torch.float32)):
            with pytest.raises(ValueError, match=r"read_rows\('a.weight', 0, 4\): the buffer must be .* 112 bytes"):
                ckpt.read_rows("a.weight", 0, 4, buffer)


def test_tensors_without_rows_or_columns_are_cast_like_the_others(tmp_path):
    """A stored tensor of 0 rows (or 0 columns) cast while loading: cast_rows took the size of a row
    from the result's first row, and a tensor of no rows has none (IndexError from a folder that
    loaded before the cast by rows)."""
    from zimage_native.formats.checkpoint import Checkpoint
    from zimage_native.formats.tensors import cast_rows
    from zimage_native.loading import iter_tensors

    sd = {"none.weight": torch.randn(0, 7), "empty.weight": torch.randn(5, 0), "some.weight": torch.randn(3, 2)}
    path = write(tmp_path / "t.safetensors", sd)
    with Checkpoint(path) as ckpt:
        for key, value in sd.items():
            got = cast_rows(ckpt, key, torch.bfloat16)
            assert got.dtype == torch.bfloat16 and torch.equal(got, value.to(torch.bfloat16)), key
    loaded = dict(iter_tensors([path], torch.float16))
    assert all(torch.equal(loaded[k], v.half()) for k, v in sd.items())


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale", ["none", "scalar", "per-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rows_quantise_as_the_weight_dequantised_whole(monkeypatch, fp8_dtype, scale, dtype):
    """int8 and int4 codes of a float8 weight read by chunks of rows (each dequantised with its rows
    of the scale) equal those of the weight dequantised whole first (the slow twin), bit for bit."""
    from zimage_native import quantize
    from zimage_native.formats.fp8 import dequantize

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(10, 32, generator=g) * 30).to(fp8_dtype)
    s = {"none": None, "scalar": torch.tensor(0.37), "per-row": torch.rand(10, generator=g) + 0.1}[scale]
    whole = dequantize(weight, s, dtype)
    monkeypatch.setattr(quantize, "CHUNK_ROWS", 3)
    for got, want in ((quantize.int8_rows(weight, dtype, "cpu", s), quantize.int8_rows(whole)),
                      (quantize.int4_groups(weight, 16, dtype, "cpu", s), quantize.int4_groups(whole, 16, dtype))):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------- refused formats


def _small_dit(model_dir):
    return comfy_dit(model_dir, "", norm_final=False)


@pytest.mark.parametrize("case, message", [
    ("comfy_quant", r"comfy_quant.*formats: nvfp4"),
    ("quant_metadata", r"comfy_quant.*formats: float8_e4m3fn"),
    ("nunchaku", "nunchaku SVDQuant"),
    ("bitsandbytes", "bitsandbytes"),
    ("gptq", "GPTQ/AWQ"),
    ("int8", "integer-typed weights"),
    ("lora", "this is a LoRA"),
    ("controlnet", "ControlNet"),
    ("unknown", "not recognised as a Z-Image"),
    ("mixed", "mixes layouts"),
])
def test_unsupported_checkpoints_raise_naming_the_format(tiny_model_dir, tmp_path, case, message):
    sd = _small_dit(tiny_model_dir)
    metadata = None
    if case == "comfy_quant":
        sd["layers.0.attention.qkv.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()),
                                                                dtype=torch.uint8)
    elif case == "quant_metadata":
        metadata = {"_quantization_metadata": json.dumps({"layers": {"layers.0.attention.qkv": {"format": "float8_e4m3fn"}}})}
    elif case == "nunchaku":
        sd["layers.0.attention.to_out.0.qweight"] = torch.zeros(4, 4, dtype=torch.int8)
    elif case == "bitsandbytes":
        sd["layers.0.feed_forward.w1.absmax"] = torch.zeros(4)
    elif case == "gptq":
        sd["layers.0.feed_forward.w1.qzeros"] = torch.zeros(4, dtype=torch.int32)
    elif case == "int8":
        sd["layers.0.feed_forward.w1.weight"] = sd["layers.0.feed_forward.w1.weight"].to(torch.int8)
    elif case == "lora":
        sd = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 64),
              "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(64, 2)}
    elif case == "controlnet":
        sd["control_layers.0.adaLN_modulation.0.weight"] = torch.zeros(4, 4)
    elif case == "unknown":
        sd = {"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}
    elif case == "mixed":
        sd["layers.1.attention.to_q.weight"] = torch.zeros(64, 64)
    path = write(tmp_path / "model.safetensors", sd, metadata)
    with pytest.raises(UnsupportedFormatError, match=message):
        load_component("transformer", path, None, "cpu", config=TINY_AXES)
    assert message.split(".*")[0].split("(")[0] in (describe(path).get("problem") or "this is a LoRA")


def test_gguf_and_pickles_are_refused(tmp_path):
    gguf = tmp_path / "z_image_turbo-Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 32)
    with pytest.raises(UnsupportedFormatError, match="GGUF"):
        load_component("transformer", gguf, None, "cpu")
    assert detect_format(gguf).container == "gguf"
    pt = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(2)}, pt)
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        load_component("transformer", pt, None, "cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(UnsupportedFormatError, match="not a safetensors file"):
        load_component("vae", junk, None, "cpu")


def test_missing_paths_and_model_folders(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_component("vae", tmp_path / "nope.safetensors", None, "cpu")
    with pytest.raises(UnsupportedFormatError, match="whole model folder"):
        load_component("transformer", tiny_model_dir, None, "cpu")
    with pytest.raises(ValueError, match="unknown component"):
        load_component("unet2", tmp_path, None, "cpu")


# ----------------------------------------------------------------------------------- tokenizer


def test_default_tokenizer_fetches_only_the_tokenizer_folder(tiny_model_dir, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_model_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = resolve_tokenizer_folder()
    assert folder == tiny_model_dir / "tokenizer"
    assert calls == [("Tongyi-MAI/Z-Image-Turbo", dict(allow_patterns=["tokenizer/*"], revision=None, cache_dir=None,
                                                       local_files_only=False))]


def test_tokenizer_at_a_repository_root(tiny_model_dir, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, **kwargs):
        calls.append(allow_patterns)
        return str(tiny_model_dir / ("tokenizer" if len(calls) > 1 else "vae"))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_tokenizer_folder("Qwen/Qwen3-4B") == tiny_model_dir / "tokenizer"
    assert calls[0] == ["tokenizer/*"] and "tokenizer.json" in calls[1]


def test_tokenizer_local_folders(tiny_model_dir, tmp_path):
    assert resolve_tokenizer_folder(tiny_model_dir) == tiny_model_dir / "tokenizer"
    assert resolve_tokenizer_folder(tiny_model_dir / "tokenizer") == tiny_model_dir / "tokenizer"
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        resolve_tokenizer_folder(str(tmp_path / "missing"))


@needs_cpu_fp8
def test_adapter_calls_after_fp8_are_refused_before_anything_changes(tiny_model_dir, tmp_path):
    """diffusers' adapter calls refit the LoRAs (unfuse all, fuse the active ones). After fp8, an fp8
    file's side paths can be unfused (their linears become fp8 GEMMs) but nothing can be fused
    again: a refit that needs a LoRA is refused before it unfuses anything, so the adapters that
    get_active_adapters names are the ones that apply, and a refit that only unfuses works."""
    from .fixtures import our_pipeline

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    dit = write(tmp_path / "fp8.safetensors", sd)

    def lora(seed):
        g = torch.Generator().manual_seed(seed)
        return {"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, 64, generator=g) * 0.02,
                "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(192, 4, generator=g) * 0.02}

    plain, pipe = our_pipeline(tiny_model_dir, transformer=dit), our_pipeline(tiny_model_dir, transformer=dit)
    plain.optimize(fp8=True)
    pipe.load_lora_weights(lora(1), adapter_name="a")
    pipe.load_lora_weights(lora(2), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 1.0])
    pipe.optimize(fp8=True)
    both = dit_output(pipe.transformer)
    assert not torch.equal(both, dit_output(plain.transformer))  # the LoRAs apply
    for call in (lambda: pipe.set_adapters("a", 0.5), lambda: pipe.delete_adapters("b"),
                 lambda: pipe.load_lora_weights(lora(3), adapter_name="c")):
        with pytest.raises(ValueError, match=r"The adapters cannot be changed after optimize\(fp8=True\)"):
            call()
        assert pipe.get_active_adapters() == ["a", "b"] and pipe.get_list_adapters() == {"transformer": ["a", "b"]}
        assert len(pipe.lora_stack.loaded) == 2 and torch.equal(dit_output(pipe.transformer), both)
    pipe.disable_lora()  # unfusing only: the DiT fp8 makes without a LoRA
    assert pipe.get_active_adapters() == [] and torch.equal(dit_output(pipe.transformer), dit_output(plain.transformer))
    with pytest.raises(ValueError, match=r"enable_lora: fp8 quantised the DiT's block linears"):
        pipe.enable_lora()
    assert pipe.get_active_adapters() == [] and not pipe.lora_stack.loaded


@needs_cpu_fp8
def test_adapter_calls_after_fp8_on_fused_loras_are_refused_before_anything_changes(tiny_model_dir, tmp_path):
    """A LoRA fused into a bfloat16/fp32 DiT before fp8 cannot be unfused after it: set_adapters and
    disable_lora are refused and leave the adapters as they were (they still apply)."""
    from .fixtures import our_pipeline

    pipe = our_pipeline(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    lora = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.randn(4, 64, generator=g) * 0.02,
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.randn(64, 4, generator=g) * 0.02}
    pipe.load_lora_weights(lora, adapter_name="a")
    pipe.optimize(fp8=True)
    for call in (lambda: pipe.set_adapters("a", 0.5), pipe.disable_lora, lambda: pipe.delete_adapters("a")):
        with pytest.raises(ValueError, match=r"fp8 quantised 1 of the linears the LoRA is fused into"):
            call()
        assert pipe.get_active_adapters() == ["a"] and pipe.get_list_adapters() == {"transformer": ["a"]}
        assert pipe.lora_adapters.enabled and len(pipe.lora_stack.loaded) == pipe.lora_adapters.fused == 1
