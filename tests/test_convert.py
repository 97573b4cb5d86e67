"""``zimage convert``: bit-exact layout round trips, dtype casts, fp8 with scales, sharding, LoRA baking,
atomic writes and overwrite refusal; ``zimage info`` on single files."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from zimage_native.cli import main
from zimage_native.converters.convert import convert_checkpoint, parse_size, plan_conversion
from zimage_native.converters.keymap import DIT_COMFYUI, convert_state_dict, from_canonical, keymap_for, to_canonical
from zimage_native.formats import detect_format
from zimage_native.loading import load_component

from .test_formats import TINY_AXES, comfy_dit, dit_state, ldm_vae, prefixed_te, te_state, to_fp8, vae_state, write


def read(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_folder(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_round_trips_are_bit_exact(tiny_model_dir, tmp_path, dtype):
    original = {k: v.to(dtype) for k, v in comfy_dit(tiny_model_dir, "", norm_final=False).items()}
    src = write(tmp_path / "comfy.safetensors", original)
    convert_checkpoint(src, tmp_path / "diffusers", "diffusers", config=TINY_AXES)
    convert_checkpoint(tmp_path / "diffusers", tmp_path / "fused.safetensors", "native-fused")
    convert_checkpoint(tmp_path / "fused.safetensors", tmp_path / "back.safetensors", "comfyui")
    assert_identical(read(tmp_path / "back.safetensors"), original)
    diffusers = read_folder(tmp_path / "diffusers")
    assert_identical(diffusers, {k: v.to(dtype) for k, v in dit_state(tiny_model_dir).items()})
    assert detect_format(tmp_path / "fused.safetensors").components[0].layout == "native-fused"
    with safe_open(str(tmp_path / "fused.safetensors"), "pt") as f:
        assert f.metadata()["zimage_native.layout"] == "native-fused"


def test_converted_diffusers_folder_loads_in_diffusers(tiny_model_dir, tmp_path):
    """The config.json we write is a real diffusers config: diffusers' own class reads the folder."""
    import diffusers

    src = write(tmp_path / "comfy.safetensors", comfy_dit(tiny_model_dir))
    with pytest.raises(ValueError, match="RoPE axes cannot be read from shapes"):  # a folder needs a config.json
        convert_checkpoint(src, tmp_path / "transformer", "diffusers")
    convert_checkpoint(src, tmp_path / "transformer", "diffusers", config=TINY_AXES)
    model = diffusers.ZImageTransformer2DModel.from_pretrained(tmp_path / "transformer")
    ref = dit_state(tiny_model_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_vae_and_text_encoder_round_trips(tiny_model_dir, tmp_path):
    ldm = ldm_vae(tiny_model_dir)
    convert_checkpoint(write(tmp_path / "ae.safetensors", ldm), tmp_path / "vae", "diffusers")
    assert_identical(read_folder(tmp_path / "vae"), vae_state(tiny_model_dir))
    convert_checkpoint(tmp_path / "vae", tmp_path / "ae2.safetensors", "bfl")
    assert_identical(read(tmp_path / "ae2.safetensors"), ldm)
    te = prefixed_te(tiny_model_dir, lm_head=False)
    convert_checkpoint(write(tmp_path / "te.safetensors", te), tmp_path / "bare.safetensors", "bare")
    assert_identical(read(tmp_path / "bare.safetensors"), te_state(tiny_model_dir))
    convert_checkpoint(tmp_path / "bare.safetensors", tmp_path / "te2.safetensors", "comfyui")
    assert_identical(read(tmp_path / "te2.safetensors"), te)


def test_norm_final_is_dropped_and_listed(tiny_model_dir, tmp_path):
    src = write(tmp_path / "comfy.safetensors", comfy_dit(tiny_model_dir))
    plan = plan_conversion(src, tmp_path / "out.safetensors", "diffusers")
    assert plan.dropped == ["model.diffusion_model.norm_final.weight"]
    assert any("(dropped) model.diffusion_model.norm_final.weight" in line for line in plan.lines())


def test_tensors_of_no_component_are_named_not_left_out_unsaid(tiny_model_dir, tmp_path, caplog):
    """A recognised file with tensors outside its component (a ComfyUI DiT under model.diffusion_model.
    with unprefixed extras) was converted without them and without a word. They are warned about now,
    the count and up to five names, and listed by --dry-run; nothing else changes in what is written.
    Another family's tensors (named with --component) and quantisation markers are not counted."""
    extras = {f"my_extra_{i}.embedding": torch.full((2, 3), float(i)) for i in range(7)}
    dit = comfy_dit(tiny_model_dir)
    plain = convert_checkpoint(write(tmp_path / "plain.safetensors", dit), tmp_path / "plain-out.safetensors",
                               "diffusers")
    for count in (1, 7):
        stray = dict(list(extras.items())[:count])
        src = write(tmp_path / f"stray{count}.safetensors", {**dit, **stray})
        with caplog.at_level("WARNING", logger="zimage_native.converters.convert"):
            caplog.clear()
            plan = convert_checkpoint(src, tmp_path / f"out{count}.safetensors", "diffusers")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and plan.left_out == list(stray), warnings
        assert f"{count} tensor{'s' if count > 1 else ''} of no Z-Image component" in warnings[0]
        assert all((name in warnings[0]) == (i < 5) for i, name in enumerate(stray)) and \
            warnings[0].endswith(", ...") == (count > 5)
        assert_identical(read(tmp_path / f"out{count}.safetensors"), read(tmp_path / "plain-out.safetensors"))
        assert plan.dropped == plain.dropped and [t.key for t in plan.tensors] == [t.key for t in plain.tensors]
    result = run("convert", src, tmp_path / "dry.safetensors", "--to", "diffusers", "--dry-run")
    assert result.exit_code == 0 and "(left out: no Z-Image component) my_extra_6.embedding" in result.output, \
        result.output
    caplog.clear()
    fp8, _ = to_fp8(dit, True)  # its scaled_fp8 marker is outside the prefix
    sdxl_key = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    src = write(tmp_path / "fp8.safetensors", {**fp8, sdxl_key: torch.zeros(4, 8)})
    with caplog.at_level("WARNING", logger="zimage_native.converters.convert"):
        plan = convert_checkpoint(src, tmp_path / "fp8-out.safetensors", "diffusers", component="transformer",
                                  dtype="bf16")
    assert plan.left_out == [] and not caplog.records


# ----------------------------------------------------------------------------------- sharding and dtypes


def test_sharding_writes_an_index_and_loads(tiny_model_dir, tiny_pipe, tmp_path):
    src = tiny_model_dir / "transformer"
    plan = convert_checkpoint(src, tmp_path / "sharded", "comfyui", shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) == len(plan.shards) > 2 and files[0] == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in read_folder(tmp_path / "sharded").values())
    for name in files:
        sizes = sum(t.numel() * t.element_size() for t in read(tmp_path / "sharded" / name).values())
        assert sizes <= 100_000 or len(read(tmp_path / "sharded" / name)) == 1
    model = load_component("transformer", tmp_path / "sharded", torch.float32, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_pipe.transformer.state_dict()[k]), k
    with pytest.raises(ValueError, match="need a folder as the destination"):
        convert_checkpoint(src, tmp_path / "one.safetensors", "comfyui", shard_size="100KB")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100kb") == 100_000
    assert parse_size(123) == 123 and parse_size(None) is None
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_bf16_cast(tiny_model_dir, tmp_path):
    convert_checkpoint(tiny_model_dir / "transformer", tmp_path / "bf16.safetensors", "comfyui", dtype="bf16")
    out = read(tmp_path / "bf16.safetensors")
    want = convert_state_dict(dit_state(tiny_model_dir), None, DIT_COMFYUI)
    assert_identical(out, {k: v.to(torch.bfloat16) for k, v in want.items()})


def test_a_fused_weight_fused_again_is_its_own_memory_not_a_copy():
    """A fused q|k|v split into its canonical parts and fused again for the same layout is the
    original tensor's memory (no second copy at the peak of a conversion), with its values; parts
    that do not lie one after the other in one storage in their order are joined by a copy."""
    qkv = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    parts = list(to_canonical([("layers.0.attention.qkv.weight", qkv)], DIT_COMFYUI))
    [(key, joined)] = from_canonical(parts, DIT_COMFYUI)
    assert key == "layers.0.attention.qkv.weight" and joined.data_ptr() == qkv.data_ptr()
    assert joined.shape == qkv.shape and joined.is_contiguous() and torch.equal(joined, qkv)
    for swapped in ([(parts[0][0], parts[1][1]), (parts[1][0], parts[0][1]), parts[2]],  # views out of order
                    [(k, t.clone()) for k, t in parts]):  # separate memory
        [(_, copied)] = from_canonical(swapped, DIT_COMFYUI)
        assert copied.data_ptr() != qkv.data_ptr()
        assert torch.equal(copied, torch.cat([t for _, t in swapped]))


@pytest.mark.parametrize("dtype", ["keep", "bf16", "fp16", "fp8"])
def test_a_comfyui_file_to_comfyui_keeps_the_fused_values(tiny_model_dir, tmp_path, dtype):
    """ComfyUI to ComfyUI (the q|k|v passed on as it was read, not joined again): the values of the
    file cast to the output dtype, bit for bit (fp8: those of quantising the fused weight whole)."""
    from zimage_native.converters.convert import quantize_fp8

    original = comfy_dit(tiny_model_dir, "", norm_final=False)
    src = write(tmp_path / "comfy.safetensors", original)
    convert_checkpoint(src, tmp_path / "out.safetensors", "comfyui", dtype=dtype)
    out = read(tmp_path / "out.safetensors")
    key = "layers.0.attention.qkv.weight"
    if dtype == "fp8":
        q, scale = quantize_fp8(original[key])
        assert torch.equal(out[key].view(torch.uint8), q.view(torch.uint8)) and torch.equal(
            out[key[:-len("weight")] + "scale_weight"], scale)
    else:
        want = {k: v if dtype == "keep" else v.to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
                for k, v in original.items()}
        assert_identical(out, want)


@pytest.mark.parametrize("shape", [(8, 0), (0, 8), (0, 0)])
def test_a_weight_without_values_quantises_to_fp8_as_an_empty_tensor_with_scale_one(tmp_path, shape):
    """A weight of rows without columns made quantize_fp8 fail (the max of an empty block); one
    without rows gave scale 1. Both give an empty fp8 tensor and scale 1 (as an all-zero weight
    does), also through a conversion to fp8."""
    from zimage_native.converters.convert import quantize_fp8

    q, scale = quantize_fp8(torch.empty(shape, dtype=torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert scale.dtype == torch.float32 and scale.shape == () and scale.item() == 1.0
    src = write(tmp_path / "empty.safetensors", {"x_pad_token": torch.zeros(1, 8, dtype=torch.bfloat16),
                                                 "layers.0.feed_forward.w1.weight": torch.empty(shape,
                                                                                                dtype=torch.bfloat16)})
    convert_checkpoint(src, tmp_path / "fp8.safetensors", "comfyui", dtype="fp8")
    out = read(tmp_path / "fp8.safetensors")
    assert out["layers.0.feed_forward.w1.weight"].dtype == torch.float8_e4m3fn
    assert out["layers.0.feed_forward.w1.weight"].shape == shape
    assert out["layers.0.feed_forward.w1.scale_weight"].item() == 1.0


def test_fp8_output_has_scales_and_loads(tiny_model_dir, tmp_path):
    plan = convert_checkpoint(tiny_model_dir / "transformer", tmp_path / "fp8.safetensors", "comfyui", dtype="fp8")
    out = read(tmp_path / "fp8.safetensors")
    assert out["scaled_fp8"].dtype == torch.float8_e4m3fn and out["scaled_fp8"].numel() == 0
    q, s = out["layers.0.attention.qkv.weight"], out["layers.0.attention.qkv.scale_weight"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ()
    assert out["x_embedder.weight"].dtype == torch.bfloat16 and out["layers.0.attention_norm1.weight"].dtype == torch.bfloat16
    assert "scale_weight" in " ".join(t.key for t in plan.tensors)
    src = convert_state_dict(dit_state(tiny_model_dir), None, DIT_COMFYUI)["layers.0.attention.qkv.weight"]
    assert s == src.abs().max() / 448
    info = detect_format(tmp_path / "fp8.safetensors").components[0]
    assert info.quantization == "scaled-fp8"
    model = load_component("transformer", tmp_path / "fp8.safetensors", torch.float32, "cpu", config=TINY_AXES)
    to_k = model.layers[0].attention.to_k.dequantize(torch.float32)  # kept in fp8, dequantised per forward
    assert torch.equal(to_k, (q.float() * s).chunk(3)[1])
    torch.testing.assert_close(to_k, src.chunk(3)[1], rtol=0.07, atol=1e-3)


def test_fp8_sources_and_targets(tiny_model_dir, tmp_path):
    fp8, expected = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    src = write(tmp_path / "fp8.safetensors", fp8)
    with pytest.raises(ValueError, match="is scaled-fp8: choose an output --dtype"):
        convert_checkpoint(src, tmp_path / "out.safetensors", "diffusers")
    convert_checkpoint(src, tmp_path / "out.safetensors", "diffusers", dtype="fp32")
    assert_identical(read(tmp_path / "out.safetensors"), convert_state_dict(expected, DIT_COMFYUI, None))
    with pytest.raises(ValueError, match="fp8 output is for the transformer and the text encoder, not the vae"):
        convert_checkpoint(tiny_model_dir / "vae", tmp_path / "vae8.safetensors", "ldm", dtype="fp8")


def _quantised_dit(kind: str, tiny_model_dir, tmp_path):
    """(a quantised tiny DiT file, its dequantised fp32 values in the same layout as a file)."""
    import numpy as np

    from .gguf_files import gguf_state, write_gguf
    from .test_comfy_quant import to_comfy_quant
    from .test_comfy_quant_blocks import block_file

    comfy = comfy_dit(tiny_model_dir, "", norm_final=False)
    if kind == "gguf":
        types = lambda name, i: ("Q8_0", "Q4_K", "F16")[i % 3]  # noqa: E731
        file, values = gguf_state(comfy, types, np.random.default_rng(0))
        src = write_gguf(tmp_path / "dit.gguf", file, "lumina2")
        expected = {k: v.reshape(comfy[k].shape) for k, v in values.items()}
    elif kind == "comfy_quant int8 / fp8":
        mix = {"attention.qkv": ("int8_tensorwise", "row"), "feed_forward.w1": ("float8_e4m3fn", "tensor"),
               "feed_forward.w3": ("int8_tensorwise", "tensor"), "attention.out": ("float8_e4m3fn", "tensor")}
        sd, expected, _ = to_comfy_quant(comfy, mix=mix)
        src = write(tmp_path / "dit.safetensors", sd)
    elif kind == "comfy_quant nvfp4 / mxfp8":
        sd, expected = block_file(comfy)
        src = write(tmp_path / "dit.safetensors", sd)
    else:  # scaled fp8, a scale per row, in the diffusers layout: q, k, v and w1, w3 stored apart
        sd, expected = to_fp8(dit_state(tiny_model_dir), True, per_row=True)
        src = write(tmp_path / "dit.safetensors", sd)
    return src, write(tmp_path / "values.safetensors", expected)


@pytest.mark.parametrize("kind", ["gguf", "comfy_quant int8 / fp8", "comfy_quant nvfp4 / mxfp8", "scaled fp8"])
@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "native-fused"])
def test_fp8_from_a_quantised_source_is_the_fp8_of_its_dequantised_values(tiny_model_dir, tmp_path, kind, layout):
    """A quantised weight is dequantised by blocks of rows where it is quantised to fp8 again
    (``formats.tensors.ValueRows``), the parts of a fused one written at their rows with the amax
    of a first pass: every code and scale those of the same conversion of its dequantised fp32
    values, whatever the source fuses (a fused q|k|v split, separate q, k, v fused, w1 and w3 apart)."""
    src, values = _quantised_dit(kind, tiny_model_dir, tmp_path)
    convert_checkpoint(src, tmp_path / "out.safetensors", layout, dtype="fp8")
    convert_checkpoint(values, tmp_path / "want.safetensors", layout, dtype="fp8")
    got, want = read(tmp_path / "out.safetensors"), read(tmp_path / "want.safetensors")
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].reshape(-1).view(torch.uint8),
                                                             want[k].reshape(-1).view(torch.uint8)), k
    assert sum(k.endswith("scale_weight") for k in got) > 4


# ----------------------------------------------------------------------------------- LoRA baking


def _lora(tiny_model_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_layers_0_attention_qkv.lora_down.weight": torch.randn(4, 64, generator=g) * 0.1,
          "lora_unet_layers_0_attention_qkv.lora_up.weight": torch.randn(192, 4, generator=g) * 0.1,
          "lora_unet_layers_0_attention_qkv.alpha": torch.tensor(2.0),
          "diffusion_model.layers.1.feed_forward.w2.lora_A.weight": torch.randn(4, 170, generator=g) * 0.1,
          "diffusion_model.layers.1.feed_forward.w2.lora_B.weight": torch.randn(64, 4, generator=g) * 0.1}
    return write(tmp_path / "lora.safetensors", sd), sd


def test_lora_is_baked_in_like_load_lora(tiny_model_dir, tmp_path):
    from zimage_native.lora import LoraMixin

    path, sd = _lora(tiny_model_dir, tmp_path)
    convert_checkpoint(tiny_model_dir / "transformer", tmp_path / "baked", "diffusers", loras=[(str(path), 0.8)])
    baked = read_folder(tmp_path / "baked")

    class P(LoraMixin):
        transformer = load_component("transformer", tiny_model_dir / "transformer", torch.float32, "cpu")

    p = P()
    p.load_lora(path, 0.8)
    for k, v in p.transformer.state_dict().items():
        assert torch.equal(baked[k], v), k
    assert not torch.equal(baked["layers.0.attention.to_q.weight"], dit_state(tiny_model_dir)["layers.0.attention.to_q.weight"])


def test_lora_is_fused_before_fp8_quantisation(tiny_model_dir, tmp_path):
    from zimage_native.converters.convert import quantize_fp8
    from zimage_native.lora import LoraMixin

    path, _ = _lora(tiny_model_dir, tmp_path)
    convert_checkpoint(tiny_model_dir / "transformer", tmp_path / "fp8.safetensors", "comfyui", dtype="fp8",
                       loras=[(str(path), 1.0)])
    out = read(tmp_path / "fp8.safetensors")

    class P(LoraMixin):
        transformer = load_component("transformer", tiny_model_dir / "transformer", torch.float32, "cpu")

    p = P()
    p.load_lora(path)
    fused = convert_state_dict(p.transformer.state_dict(), None, DIT_COMFYUI)
    q, s = quantize_fp8(fused["layers.0.attention.qkv.weight"])
    assert torch.equal(out["layers.0.attention.qkv.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out["layers.0.attention.qkv.scale_weight"], s)
    with pytest.raises(ValueError, match="LoRAs can be baked into the transformer only"):
        convert_checkpoint(tiny_model_dir / "vae", tmp_path / "v.safetensors", "ldm", loras=[(str(path), 1.0)])


def _reference_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8 of a whole weight, written here apart from the converter: the scale is
    max|w| / 448 in fp32 (1 for a weight of zeros), the codes w / scale clamped to +-448, rounded to
    float8_e4m3fn; the loader reads codes * scale."""
    w = weight.float()
    amax = w.abs().max()
    scale = amax / 448 if amax > 0 else torch.tensor(1.0)
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale.float()


_FUSED_PARTS = {  # output layout -> (pattern of a fused fp8 weight, the canonical names of its parts in order)
    "comfyui": [(r"(.+)\.attention\.qkv\.weight", [".attention.to_q.weight", ".attention.to_k.weight",
                                                     ".attention.to_v.weight"]),
                (r"(.+)\.attention\.out\.weight", [".attention.to_out.0.weight"])],
    "native-fused": [(r"(.+)\.attention\.to_qkv\.weight", [".attention.to_q.weight", ".attention.to_k.weight",
                                                             ".attention.to_v.weight"]),
                     (r"(.+)\.feed_forward\.w13\.weight", [".feed_forward.w1.weight", ".feed_forward.w3.weight"])],
}


@pytest.mark.parametrize("source", ["diffusers", "comfyui", "native-fused"])
def test_fp8_output_equals_a_whole_tensor_reference_for_fused_and_separate_parts(tiny_model_dir, tmp_path, monkeypatch,
                                                                                  source):
    """fp8 output quantises each fused weight (q|k|v, w1|w3) with one scale, its parts' amax from a
    first pass, by blocks of rows (here 5 rows of the tiny DiT's 64 columns, plus 3 values: no part is
    a multiple of the block), its parts written at their rows. Against the whole-tensor reference
    above, on the joined canonical weights: every fp8 weight of the three output layouts, from a
    source storing the parts apart (diffusers) or fused (ComfyUI q|k|v, native-fused q|k|v and w1|w3),
    with parts of three dtypes, all-zero parts and a whole all-zero q|k|v, parts of ranges 1e4 apart,
    and a LoRA baked in; codes and scale bit for bit."""
    import re

    from zimage_native.converters import convert as converter
    from zimage_native.converters.keymap import DIT_NATIVE_FUSED
    from zimage_native.lora import LoraMixin

    monkeypatch.setattr(converter, "CHUNK_ELEMENTS", 64 * 5 + 3)
    canonical = dit_state(tiny_model_dir)
    for key in list(canonical):
        if key.startswith("layers.0.attention.to_") and not key.startswith("layers.0.attention.to_out"):
            canonical[key] = torch.zeros_like(canonical[key])  # the whole q|k|v zero: scale 1
        elif key in ("layers.1.attention.to_q.weight", "layers.1.feed_forward.w1.weight"):
            canonical[key] = torch.zeros_like(canonical[key])
        elif key.endswith(("attention.to_v.weight", "feed_forward.w3.weight")):
            canonical[key] = (canonical[key] * 1e4).half() if "refiner" in key else canonical[key] * 1e4
        elif key.endswith("attention.to_k.weight"):
            canonical[key] = canonical[key].bfloat16()
    stored = {"diffusers": canonical, "comfyui": convert_state_dict(canonical, None, DIT_COMFYUI),
              "native-fused": convert_state_dict(canonical, None, DIT_NATIVE_FUSED)}[source]
    src = write(tmp_path / "src.safetensors", stored)
    lora, _ = _lora(tiny_model_dir, tmp_path)

    class P(LoraMixin):  # the canonical weights with the LoRA fused, in fp32
        transformer = load_component("transformer", src, torch.float32, "cpu", config=TINY_AXES)

    baked = P()
    baked.load_lora(lora, 0.7)
    weights = baked.transformer.state_dict()
    for layout in ("comfyui", "native-fused", "diffusers"):
        convert_checkpoint(src, tmp_path / f"{layout}.safetensors", layout, dtype="fp8", loras=[(str(lora), 0.7)])
        out = read(tmp_path / f"{layout}.safetensors")
        quantised = {k for k, v in out.items() if v.dtype == torch.float8_e4m3fn and k != "scaled_fp8"}
        dst = keymap_for("transformer", layout)
        assert quantised == {dst.foreign_key(k) for k in canonical if converter._FP8_TARGETS["transformer"].match(k)}
        for key in quantised:
            parts = [key]
            for pattern, names in _FUSED_PARTS.get(layout, []):
                if (m := re.fullmatch(pattern, key)) is not None:
                    parts = [m[1] + name for name in names]
            codes, scale = _reference_fp8(torch.cat([weights[part].float() for part in parts]))
            assert torch.equal(out[key].view(torch.uint8), codes.view(torch.uint8)), (source, layout, key)
            assert torch.equal(out[key[: -len("weight")] + "scale_weight"], scale), (source, layout, key)


# ----------------------------------------------------------------------------------- safety


def test_existing_output_is_refused_unless_forced(tiny_model_dir, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="pass --force"):
        convert_checkpoint(tiny_model_dir / "vae", out, "ldm")
    assert out.read_bytes() == b"keep me"
    convert_checkpoint(tiny_model_dir / "vae", out, "ldm", force=True)
    assert detect_format(out).components[0].layout == "ldm"
    folder = tmp_path / "vae"
    convert_checkpoint(out, folder, "diffusers")
    (folder / "stale.txt").write_text("old")
    convert_checkpoint(out, folder, "diffusers", force=True)
    assert not (folder / "stale.txt").exists() and (folder / "config.json").is_file()
    with pytest.raises(ValueError, match="must not be the input"):
        convert_checkpoint(out, out, "ldm", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "vae"]  # no temporary leftovers


def test_outputs_get_the_umask_permissions(tiny_model_dir, tmp_path, umask_027):
    """A converted file or folder is written next to its destination and renamed into place: it has
    the permissions any new file or folder gets under the umask (not tempfile's private 0600 / 0700)."""
    convert_checkpoint(tiny_model_dir / "vae", tmp_path / "ae.safetensors", "ldm")
    convert_checkpoint(tiny_model_dir / "vae", tmp_path / "vae", "diffusers")
    assert (tmp_path / "ae.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask_027
    assert (tmp_path / "vae").stat().st_mode & 0o777 == 0o777 & ~umask_027
    for f in (tmp_path / "vae").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask_027, f.name


@pytest.mark.parametrize("dst", ["out.safetensors", "folder"])
def test_failed_write_leaves_nothing_and_keeps_the_old_output(tiny_model_dir, tmp_path, monkeypatch, dst):
    from zimage_native.converters.streaming import SafetensorsWriter

    target = tmp_path / dst
    if dst == "folder":
        target.mkdir()
        (target / "old.txt").write_text("old")
    else:
        target.write_bytes(b"old")
    write = SafetensorsWriter.write
    calls = []

    def broken(self, name, tensor, row=None):  # the disk fills up after the header and a few tensors
        calls.append(name)
        if len(calls) > 3:
            raise OSError("disk full")
        return write(self, name, tensor, row)

    monkeypatch.setattr(SafetensorsWriter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tiny_model_dir / "vae", target, "ldm", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst]
    assert (target / "old.txt").read_text() == "old" if dst == "folder" else target.read_bytes() == b"old"


def test_dry_run_prints_the_key_map_and_sizes_and_writes_nothing(tiny_model_dir, tmp_path):
    result = run("convert", tiny_model_dir / "transformer", tmp_path / "out", "--to", "comfyui", "--dry-run",
                 "--shard-size", "200KB")
    assert result.exit_code == 0, result.output
    out = result.output
    assert ("layers.0.attention.qkv.weight <- layers.0.attention.to_q.weight, layers.0.attention.to_k.weight, "
            "layers.0.attention.to_v.weight  [192, 64] F32") in out
    assert "x_embedder.weight <- all_x_embedder.2-1.weight" in out and "layers.0.ffn_norm1.weight = " in out
    assert "file diffusion_pytorch_model-00001-of-" in out and "total: 65 tensors" in out
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- CLI


def test_cli_convert_and_errors(tiny_model_dir, tmp_path):
    src = write(tmp_path / "comfy.safetensors", comfy_dit(tiny_model_dir))
    cfg = tmp_path / "axes.json"
    cfg.write_text(json.dumps(TINY_AXES))
    result = run("convert", src, tmp_path / "d", "--to", "diffusers", "--config", cfg)
    assert result.exit_code == 0 and "wrote" in result.output and "73 tensors" in result.output, result.output
    assert_identical(read_folder(tmp_path / "d"), dit_state(tiny_model_dir))
    for dst, args, message in [
        ("d", ["--to", "diffusers"], "exists; pass --force"),
        ("new", ["--to", "sideways"], "unknown transformer layout 'sideways'"),
        ("new", ["--to", "diffusers", "--shard-size", "x"], "cannot read size"),
    ]:
        result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / dst), *args])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    aio = dict(comfy_dit(tiny_model_dir))
    aio.update(ldm_vae(tiny_model_dir, "vae."))
    aio_path = write(tmp_path / "aio.safetensors", aio)
    result = CliRunner().invoke(main, ["convert", str(aio_path), str(tmp_path / "x.safetensors"), "--to", "diffusers"])
    assert result.exit_code != 0 and "choose one with --component" in result.output
    result = run("convert", aio_path, tmp_path / "v.safetensors", "--to", "diffusers", "--component", "vae")
    assert result.exit_code == 0
    assert_identical(read(tmp_path / "v.safetensors"), vae_state(tiny_model_dir))
    result = run("convert", tiny_model_dir / "transformer", tmp_path / "l.safetensors", "--to", "comfyui",
                 "--lora", f"{_lora(tiny_model_dir, tmp_path)[0]}:0.5")
    assert result.exit_code == 0, result.output


def test_rope_axes_that_shapes_cannot_tell_are_asked_for_in_each_callers_words(tiny_model_dir, tmp_path):
    """A DiT whose head dim is not the released 128 (the tiny one: 32) needs its RoPE axes from a
    config. Python is told of transformer_config=; the command line (convert, info on what convert
    wrote) of the ways it has, which work: convert --config, a component folder with a config.json."""
    import shutil

    from zimage_native.formats.infer import ConfigNeededError

    from .dit_configs import TINY_DIT

    comfy = tmp_path / "comfy.safetensors"
    assert run("convert", tiny_model_dir / "transformer", comfy, "--to", "comfyui").exit_code == 0
    with pytest.raises(ConfigNeededError, match=r"RoPE axes cannot be read from shapes, pass "
                                                r"transformer_config=\{'axes_dims': \[\.\.\.\]\}\.$"):
        load_component("transformer", comfy, torch.float32, "cpu")
    cli = 'RoPE axes cannot be read from shapes; give them in a config.json ({"axes_dims": [...]}): zimage convert '
    result = CliRunner().invoke(main, ["convert", str(comfy), str(tmp_path / "d"), "--to", "diffusers"])
    assert result.exit_code == 1 and cli in result.output and "transformer_config" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    text = run("info", comfy).output
    assert "config: transformer: head_dim " in text and cli in text and "transformer_config" not in text, text
    dit = json.loads(run("info", comfy, "--json").output)["components"]["transformer"]
    assert cli in dit["config_error"] and "transformer_config" not in json.dumps(dit), dit
    # the ways it names: a component folder holding the file and its config.json, convert --config
    folder = tmp_path / "component"
    folder.mkdir()
    shutil.copy(comfy, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(TINY_AXES))
    assert f"dim={TINY_DIT['dim']} n_layers={TINY_DIT['n_layers']} " in run("info", folder).output
    (tmp_path / "axes.json").write_text(json.dumps(TINY_AXES))
    result = run("convert", comfy, tmp_path / "d", "--to", "diffusers", "--config", tmp_path / "axes.json")
    assert result.exit_code == 0, result.output


def test_info_on_single_files(tiny_model_dir, tmp_path):
    src = write(tmp_path / "dit.safetensors", comfy_dit(tiny_model_dir))
    report = json.loads(run("info", src, "--json").output)
    dit = report["components"]["transformer"]
    assert (dit["layout"], dit["prefix"], dit["quantization"]) == ("comfyui", "model.diffusion_model.", None)
    assert "head dim is 32" in dit["config_error"]
    fp8 = write(tmp_path / "fp8.safetensors", to_fp8(comfy_dit(tiny_model_dir, ""), True)[0])
    text = run("info", fp8).output
    assert "comfyui" in text and "scaled-fp8" in text and "F8_E4M3" in text
    ae = write(tmp_path / "ae.safetensors", ldm_vae(tiny_model_dir))
    text = run("info", ae).output
    assert "vae" in text and "ldm" in text and "block_out_channels=[32, 32, 32, 32]" in text
    lora, _ = _lora(tiny_model_dir, tmp_path)
    text = run("info", lora).output
    assert "LoRA: 2 modules" in text and "kohya" in text
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))  # version 3, no tensors: not Z-Image
    text = run("info", gguf).output
    assert "cannot load" in text and "GGUF" in text
    folder = json.loads(run("info", tiny_model_dir, "--json").output)
    assert folder["transformer"]["layout"] == "diffusers" and folder["vae"]["quantization"] is None
    assert folder["text_encoder"]["layout"] == "bare"
    text = run("info", tiny_model_dir / "vae").output  # a component folder
    assert "vae" in text and "diffusers" in text


def test_conversion_progress_counts_every_planned_byte(tiny_model_dir, tmp_path, monkeypatch):
    import tqdm.auto

    import zimage_native.loading as loading
    from zimage_native.converters.convert import convert_checkpoint

    from .test_loading import RecordingBar

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    monkeypatch.setattr(loading, "PROGRESS_MIN_BYTES", 0)
    RecordingBar.bars = []
    convert_checkpoint(tiny_model_dir / "transformer", tmp_path / "dit.safetensors", "comfyui")
    (bar,) = RecordingBar.bars
    assert bar.desc == "converting transformer" and bar.disable is None and bar.n == bar.total > 0
