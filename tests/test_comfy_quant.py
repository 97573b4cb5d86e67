"""ComfyUI mixed-precision ("comfy_quant") DiT files: float8_e4m3fn / float8_e5m2 / int8_tensorwise
layers load as the model of their dequantised weights (nvfp4 and mxfp8: test_comfy_quant_blocks.py);
other formats are refused naming the layer.

The files are built in code in ComfyUI's layout (comfy/ops.py ``_load_quantized_module``,
comfy/quant_ops.py ``QUANT_ALGOS``, comfy/utils.py ``convert_old_quants``): ``<layer>.weight`` (the
quantised values), ``<layer>.weight_scale`` (fp32), ``<layer>.comfy_quant`` (uint8: the UTF-8 bytes
of a JSON object, ``{"format": ...}``) or, in older files, ``{"layers": {layer: {"format": ...}}}``
in the ``_quantization_metadata`` entry of the safetensors metadata. The DiT is the single-file
(ComfyUI) layout, with its fused ``attention.qkv``.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from click.testing import CliRunner

from zimage_native.converters.keymap import DIT_COMFYUI, convert_state_dict
from zimage_native.formats import UnsupportedFormatError, describe, detect_format
from zimage_native.loading import load_component

from .fresh_process import run_fresh
from .test_formats import (QUANT_PEAK_SCRIPT, TINY_AXES, assert_fusion_lora_held_then_released,
                           assert_kept_dit_runs_as_upcast, comfy_dit, dit_output, fusion_lora, module_kinds,
                           prefixed_te, write)
from .utils import assert_rel, needs_cpu_fp8

PREFIX = "model.diffusion_model."

#: Which layers of the tiny DiT get which format: the blocks' (and refiners') attention and
#: feed-forward linears; the embedders, adaLN and final layer stay in the float dtype (a mixed file).
MIX = {
    "attention.qkv": ("float8_e4m3fn", "tensor"),
    "attention.out": ("int8_tensorwise", "row"),
    "feed_forward.w1": ("int8_tensorwise", "tensor"),
    "feed_forward.w2": ("float8_e5m2", "tensor"),
    "feed_forward.w3": ("float8_e4m3fn", "tensor"),
}


def comfy_quant_tensor(conf: dict) -> torch.Tensor:
    """A layer's config as ComfyUI stores it: uint8 bytes of UTF-8 JSON."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def quantise(v: torch.Tensor, fmt: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, fp32 weight_scale) of ``v`` in ``fmt``: weight = values * scale."""
    amax = v.abs().amax(dim=1, keepdim=True) if granularity == "row" else v.abs().max().reshape(())
    if fmt == "int8_tensorwise":
        scale = (amax / 127.0).float()
        return torch.round(v / scale).clamp(-127, 127).to(torch.int8), scale
    dtype = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[fmt]
    scale = (amax / torch.finfo(dtype).max).float()
    return (v / scale).to(dtype), scale


def to_comfy_quant(sd: dict, form: str = "tensor", mix: dict = MIX, input_scale: bool = True
                   ) -> tuple[dict, dict, dict | None]:
    """(file tensors, expected dequantised fp32 state, safetensors metadata) of a comfy_quant file."""
    out, expected, layers = {}, {}, {}
    for k, v in sd.items():
        match = next((m for m in mix if k.endswith(f".{m}.weight")), None)
        if match is None:
            out[k] = expected[k] = v
            continue
        fmt, granularity = mix[match]
        layer = k[: -len(".weight")]
        q, scale = quantise(v, fmt, granularity)
        out[k], out[f"{layer}.weight_scale"] = q, scale
        expected[k] = q.float() * scale
        if input_scale and fmt.startswith("float8"):
            out[f"{layer}.input_scale"] = torch.tensor(0.05)  # an activation scale: not used here
        layers[layer] = {"format": fmt}
        if form == "tensor":
            out[f"{layer}.comfy_quant"] = comfy_quant_tensor(layers[layer])
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} \
        if form == "metadata" else None
    return out, expected, metadata


def in_new_memory(model):
    """``model`` with every tensor copied out of its file's memory map: a GEMM's rounding depends on
    its operands' alignment, so models of the same weights read from two files (views of two maps,
    at other offsets) differ by about 1e-6 (3e-6 of 3.4 here), and match bit for bit in new memory."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model


@pytest.fixture(scope="module")
def comfy_sd(tiny_model_dir):
    return comfy_dit(tiny_model_dir, PREFIX)


@pytest.mark.parametrize("form", ["tensor", "metadata"])
def test_a_comfy_quant_dit_loads_as_the_model_of_its_dequantised_weights(comfy_sd, tmp_path, form):
    from zimage_native.quant_linear import FP8StoredLinear

    sd, expected, metadata = to_comfy_quant(comfy_sd, form)
    path = write(tmp_path / "z_image_turbo_fp8mix.safetensors", sd, metadata)
    reference = load_component("transformer", write(tmp_path / "dequantised.safetensors", expected), torch.float32,
                               "cpu", config=TINY_AXES)
    info = detect_format(path).components[0]
    assert info.quantization == "comfy-quant" and info.prefix == PREFIX
    assert sorted(set(info.comfy_quant.values())) == ["float8_e4m3fn", "float8_e5m2", "int8_tensorwise"]

    upcast = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=False)
    want = reference.state_dict()
    assert upcast.state_dict().keys() == want.keys()
    for k, v in upcast.state_dict().items():
        assert torch.equal(v, want[k]), k
    reference = in_new_memory(reference)
    assert torch.equal(dit_output(in_new_memory(upcast)), dit_output(reference))

    kept = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES)  # fp8 layers stay fp8
    stored = sorted(n for n, m in kept.named_modules() if isinstance(m, FP8StoredLinear))
    fp8 = [n for n in (m.rsplit(".", 1)[0] for m in convert_state_dict(
        {k[len(PREFIX):]: v for k, v in sd.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)},
        DIT_COMFYUI, None))]
    assert stored == sorted(fp8) and len(stored) > 0  # the fused qkv's parts, w2, w3 (the int8 layers: below)
    assert torch.equal(dit_output(in_new_memory(kept)), dit_output(reference))

    d = describe(path)["components"]["transformer"]
    assert d["quantization"] == "comfy-quant" and "problem" not in describe(path)
    n_layers = len(reference.layers) + len(reference.noise_refiner) + len(reference.context_refiner)
    assert d["comfy_quant"] == {"float8_e4m3fn": 2 * n_layers, "float8_e5m2": n_layers,
                                "int8_tensorwise": 2 * n_layers}


def test_zimage_info_names_the_comfy_quant_formats(comfy_sd, tmp_path):
    from zimage_native.cli import main

    sd, _, _ = to_comfy_quant(comfy_sd)
    path = write(tmp_path / "fp8mix.safetensors", sd)
    result = CliRunner().invoke(main, ["info", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "comfy-quant" in result.output and "cannot load" not in result.output
    assert re.search(r"comfy_quant formats: float8_e4m3fn \d+ layers, float8_e5m2 \d+ layers, "
                     r"int8_tensorwise \d+ layers", result.output), result.output


def test_a_comfy_quant_file_of_float8_layers_only_keeps_them_as_a_scaled_fp8_file_does(comfy_sd, tmp_path):
    """float8_e4m3fn with a per-tensor weight_scale is ComfyUI's scaled fp8 (``convert_old_quants``
    turns a scaled-fp8 file into it): the same values load from either file."""
    mix = {m: ("float8_e4m3fn", "tensor") for m in MIX}
    sd, expected, _ = to_comfy_quant(comfy_sd, mix=mix, input_scale=False)
    comfy = write(tmp_path / "comfy.safetensors", sd)
    scaled = {k.replace(".weight_scale", ".scale_weight"): v for k, v in sd.items() if not k.endswith(".comfy_quant")}
    scaled = write(tmp_path / "scaled.safetensors", {**scaled, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)})
    assert detect_format(scaled).components[0].quantization == "scaled-fp8"
    a = load_component("transformer", comfy, torch.float32, "cpu", config=TINY_AXES)
    b = load_component("transformer", scaled, torch.float32, "cpu", config=TINY_AXES)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():  # the kept float8 bytes, their scales, the other tensors
        assert v.dtype == b.state_dict()[k].dtype and torch.equal(v, b.state_dict()[k]), k
    assert torch.equal(dit_output(in_new_memory(a)), dit_output(in_new_memory(b)))


def _layer(name: str = "layers.0.attention.qkv") -> str:
    return PREFIX + name


@pytest.mark.parametrize("case, message", [
    ("nvfp4", r"layer model\.diffusion_model\.layers\.0\.attention\.qkv: format nvfp4 needs a 2-D U8 weight"),
    ("mxfp8", r"layer model\.diffusion_model\.layers\.0\.attention\.qkv: format mxfp8 needs "
              r"model\.diffusion_model\.layers\.0\.attention\.qkv\.weight_scale in F8_E8M0 or U8"),
    ("unknown", r"layer model\.diffusion_model\.layers\.0\.attention\.qkv: format 'int4_magic' is not supported"),
    ("no_format", r"attention\.qkv: its comfy_quant config is not a JSON object with a format"),
    ("not_json", r"attention\.qkv: its comfy_quant config is not a JSON object"),
    ("convrot", r"attention\.out: format int8_tensorwise with ConvRot"),
    ("no_scale", r"attention\.qkv: format float8_e4m3fn but no floating .*attention\.qkv\.weight_scale"),
    ("fp8_row_scale", r"attention\.qkv: format float8_e4m3fn takes one weight_scale per tensor"),
    ("int8_flat_scale", r"attention\.out: format int8_tensorwise takes one weight_scale per tensor or per output row"),
    ("wrong_dtype", r"attention\.qkv: format float8_e5m2 needs a 2-D F8_E5M2 weight, the file has F8_E4M3"),
    ("metadata_fp32_weight", r"layers\.0\.attention\.qkv: format float8_e4m3fn needs a 2-D F8_E4M3 weight, the "
                             r"file has F32"),
    ("metadata_no_layer", r"layer layers\.9\.nothing: format float8_e4m3fn but the file has no "
                          r"layers\.9\.nothing\.weight"),
])
def test_comfy_quant_formats_that_cannot_load_are_refused_naming_the_layer(comfy_sd, tmp_path, case, message):
    sd, _, _ = to_comfy_quant(comfy_sd)
    metadata = None
    qkv, out = _layer(), _layer("layers.0.attention.out")
    if case in ("nvfp4", "mxfp8", "unknown"):
        sd[f"{qkv}.comfy_quant"] = comfy_quant_tensor({"format": {"unknown": "int4_magic"}.get(case, case)})
    elif case == "no_format":
        sd[f"{qkv}.comfy_quant"] = comfy_quant_tensor({"group_size": 16})
    elif case == "not_json":
        sd[f"{qkv}.comfy_quant"] = torch.tensor(list(b"\xff{"), dtype=torch.uint8)
    elif case == "convrot":
        sd[f"{out}.comfy_quant"] = comfy_quant_tensor({"format": "int8_tensorwise", "convrot": True,
                                                       "convrot_groupsize": 256})
    elif case == "no_scale":
        del sd[f"{qkv}.weight_scale"]
    elif case == "fp8_row_scale":
        sd[f"{qkv}.weight_scale"] = torch.ones(sd[f"{qkv}.weight"].shape[0], 1)
    elif case == "int8_flat_scale":
        sd[f"{out}.weight_scale"] = sd[f"{out}.weight_scale"].reshape(-1)
    elif case == "wrong_dtype":
        sd[f"{qkv}.comfy_quant"] = comfy_quant_tensor({"format": "float8_e5m2"})
    elif case.startswith("metadata"):
        sd = {k[len(PREFIX):]: v for k, v in comfy_sd.items()}  # an unprefixed file
        name = "layers.0.attention.qkv" if case == "metadata_fp32_weight" else "layers.9.nothing"
        metadata = {"_quantization_metadata": json.dumps({"layers": {name: {"format": "float8_e4m3fn"}}})}
    path = write(tmp_path / "model.safetensors", sd, metadata)
    with pytest.raises(UnsupportedFormatError, match=message):
        load_component("transformer", path, None, "cpu", config=TINY_AXES)
    assert re.search(message, describe(path)["problem"])
    assert "comfy_quant" in describe(path)["problem"]


def test_metadata_naming_layers_without_the_files_prefix_finds_them(comfy_sd, tmp_path):
    """Older files name their layers in ``_quantization_metadata`` as their keys are, or without the
    component's prefix (as some converters write them): both load."""
    sd, expected, metadata = to_comfy_quant(comfy_sd, "metadata")
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    bare = {"_quantization_metadata": json.dumps({"layers": {k[len(PREFIX):]: v for k, v in layers.items()}})}
    a = load_component("transformer", write(tmp_path / "a.safetensors", sd, metadata), torch.float32, "cpu",
                       config=TINY_AXES, keep_fp8=False)
    b = load_component("transformer", write(tmp_path / "b.safetensors", sd, bare), torch.float32, "cpu",
                       config=TINY_AXES, keep_fp8=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident size (Linux)")
def test_a_comfy_quant_int8_text_encoder_quantised_while_loading_never_holds_a_whole_fp32_weight(tiny_model_dir,
                                                                                                 tmp_path):
    """A text encoder whose int8_tensorwise weights are quantised while loading (quant="int8"): each
    was dequantised whole to fp32 before it was quantised by chunks of rows (a 1 Mi x 48 embedding
    here, 192 MiB in fp32: 251 MiB above the start for a 52 MiB model, where the same model from a
    bf16 file peaks at 56 MiB). It is read and dequantised by the chunks that are quantised now
    (measured: 58 to 68 MiB), with the same codes (the int8 encoder equals that of the dequantised
    file)."""
    sd = prefixed_te(tiny_model_dir, lm_head=False)
    mix = {"embed_tokens": ("int8_tensorwise", "row"), "self_attn.q_proj": ("int8_tensorwise", "tensor"),
           "mlp.down_proj": ("int8_tensorwise", "row")}
    small, expected, _ = to_comfy_quant(sd, mix=mix)
    config = {"max_position_embeddings": 2048}
    warm = write(tmp_path / "warm.safetensors", small)
    reference = write(tmp_path / "dequantised.safetensors", expected)
    a = load_component("text_encoder", warm, torch.bfloat16, "cpu", config=config, quant="int8").state_dict()
    b = load_component("text_encoder", reference, torch.bfloat16, "cpu", config=config, quant="int8").state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
    rows, width = 1 << 20, sd["model.embed_tokens.weight"].shape[1]  # 48 Mi values: 48 MiB in int8, 192 in fp32
    g = torch.Generator().manual_seed(0)
    small["model.embed_tokens.weight"] = torch.randint(-127, 128, (rows, width), dtype=torch.int8, generator=g)
    small["model.embed_tokens.weight_scale"] = (torch.rand(rows, 1, generator=g) + 0.1) / 127
    big = write(tmp_path / "big.safetensors", small)
    del small
    peak, held = map(int, run_fresh(QUANT_PEAK_SCRIPT, warm, big, "bfloat16").split())
    bound = held + big.stat().st_size + rows * width * 4 // 2  # under half the embedding in fp32
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"(the model holds {held / 2**20:.0f} MiB)"


def test_a_dit_upcast_in_bf16_dequantises_its_int8_layers_into_the_dtype_and_a_kept_one_not_at_all(
        comfy_sd, tmp_path, monkeypatch):
    """A DiT loaded in bf16 without keeping its fp8 layers (keep_fp8=False) dequantises its
    int8_tensorwise layers by rows into bf16, never whole in fp32 (a transient fp32 copy of each,
    157 MB for a released feed-forward linear); one that keeps its fp8 layers (the default on the
    CPU) keeps its int8 layers too and dequantises none of them while loading."""
    from zimage_native.formats import tensors
    from zimage_native.quant_linear import Int8StoredLinear

    sd, _, _ = to_comfy_quant(comfy_sd)
    path = write(tmp_path / "fp8mix.safetensors", sd)
    made = []
    real = tensors.dequantize

    def spy(weight, scale, dtype=torch.float32, read=None):
        out = real(weight, scale, dtype, read)
        made.append((tuple(out.shape), out.dtype))
        return out

    monkeypatch.setattr(tensors, "dequantize", spy)
    upcast = load_component("transformer", path, torch.bfloat16, "cpu", config=TINY_AXES, keep_fp8=False)
    formats = detect_format(path).components[0].comfy_quant.values()
    int8 = sum(1 for fmt in formats if fmt == "int8_tensorwise")
    assert len(made) == len(formats) and all(dtype == torch.bfloat16 for _, dtype in made), made  # fp8 and int8
    made.clear()
    kept = load_component("transformer", path, torch.bfloat16, "cpu", config=TINY_AXES, keep_fp8=True)
    assert made == [] and sum(isinstance(m, Int8StoredLinear) for m in kept.modules()) == int8
    upcast = upcast.state_dict()
    for name, m in kept.named_modules():
        if isinstance(m, Int8StoredLinear):
            assert torch.equal(m.dequantize(torch.bfloat16), upcast[f"{name}.weight"]), name

#: The int8 layers' mixes: the fused qkv with per-row scales (split with its rows into to_q / to_k / to_v),
#: per-tensor and per-row layers, beside an fp8 layer; and a file of int8 layers alone (no float8 weight).
INT8_MIXES = {
    "int8+fp8": {"attention.qkv": ("int8_tensorwise", "row"), "attention.out": ("int8_tensorwise", "tensor"),
                 "feed_forward.w1": ("int8_tensorwise", "row"), "feed_forward.w2": ("float8_e4m3fn", "tensor"),
                 "feed_forward.w3": ("int8_tensorwise", "tensor")},
    "int8 only": {"attention.qkv": ("int8_tensorwise", "tensor"), "attention.out": ("int8_tensorwise", "row"),
                  "feed_forward.w1": ("int8_tensorwise", "tensor"), "feed_forward.w2": ("int8_tensorwise", "row"),
                  "feed_forward.w3": ("int8_tensorwise", "row")},
}


def file_bytes(sd: dict) -> int:
    """The bytes of a comfy_quant file's weights and scales (not its configs or activation scales)."""
    return sum(v.numel() * v.element_size() for k, v in sd.items() if not k.endswith((".comfy_quant", ".input_scale")))


@pytest.mark.parametrize("mix", INT8_MIXES)
def test_a_kept_dit_keeps_its_int8_layers_in_int8_with_the_results_of_the_dequantised_model(comfy_sd, tmp_path, mix):
    """A DiT that keeps its fp8 layers (keep_fp8, the default on the CPU) keeps its int8_tensorwise
    layers too: Int8StoredLinear, the file's int8 values and fp32 scales (per row, or the tensor's
    repeated; a fused qkv's per-row scales split with its rows), dequantised per forward as loading
    does. They were dequantised while loading: an int8 file held the bytes of the dequantised model."""
    from zimage_native.quant_linear import Int8StoredLinear, resident_bytes

    sd, expected, _ = to_comfy_quant(comfy_sd, mix=INT8_MIXES[mix])
    path = write(tmp_path / "int8mix.safetensors", sd)
    reference = load_component("transformer", write(tmp_path / "dequantised.safetensors", expected), torch.float32,
                               "cpu", config=TINY_AXES)
    kept = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES)
    int8 = convert_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if v.dtype == torch.int8}, DIT_COMFYUI, None)
    stored = {n: m for n, m in kept.named_modules() if isinstance(m, Int8StoredLinear)}
    assert sorted(stored) == sorted(k.rsplit(".", 1)[0] for k in int8) and len(stored) > 0
    want = reference.state_dict()
    for name, layer in stored.items():
        assert layer.weight.dtype == torch.int8 and layer.scale.dtype == torch.float32, name
        assert layer.scale.shape == (layer.out_features, 1), name
        assert torch.equal(layer.weight, int8[f"{name}.weight"]), name
        assert torch.equal(layer.dequantize(torch.float32), want[f"{name}.weight"]), name
    assert torch.equal(dit_output(in_new_memory(kept)), dit_output(in_new_memory(reference)))
    file, held = file_bytes(sd), resident_bytes(kept)
    assert file <= held < 1.01 * file, (held, file)  # (a per-tensor scale is held once per row)
    assert held < 0.8 * resident_bytes(reference)
    block = lambda m: resident_bytes(m.layers[0])  # noqa: E731
    assert block(kept) < 0.5 * block(reference)  # 1 byte per value in the int8 and fp8 layers, against 4 (and
    # the adaLN linear and norms in fp32: 119504 bytes against 263936)
    layer = stored["layers.0.attention.to_k"]
    before = layer.dequantize(torch.float32)
    kept.to(torch.bfloat16)  # a dtype cast of the model leaves the int8 values and fp32 scales alone
    assert layer.weight.dtype == torch.int8 and layer.scale.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before) and "int8" in repr(layer)


def test_a_dit_that_does_not_keep_its_fp8_layers_dequantises_its_int8_layers_too(comfy_sd, tmp_path):
    from zimage_native.quant_linear import PackedLinear

    sd, expected, _ = to_comfy_quant(comfy_sd, mix=INT8_MIXES["int8 only"])
    upcast = load_component("transformer", write(tmp_path / "int8.safetensors", sd), torch.float32, "cpu",
                            config=TINY_AXES, keep_fp8=False)
    assert not any(isinstance(m, PackedLinear) for m in upcast.modules())
    reference = load_component("transformer", write(tmp_path / "dequantised.safetensors", expected), torch.float32,
                               "cpu", config=TINY_AXES)
    for k, v in reference.state_dict().items():
        assert torch.equal(upcast.state_dict()[k], v), k


def test_a_lora_on_a_kept_int8_dit_is_a_side_path_equal_to_the_lora_fused_into_the_dequantised_model(comfy_sd,
                                                                                                    tmp_path):
    from zimage_native.lora import LoraMixin
    from zimage_native.quant_linear import Int8StoredLinear

    class Holder(LoraMixin):
        def __init__(self, transformer):
            self.transformer = transformer

    sd, expected, _ = to_comfy_quant(comfy_sd, mix=INT8_MIXES["int8+fp8"])
    kept = in_new_memory(load_component("transformer", write(tmp_path / "int8mix.safetensors", sd), torch.float32,
                                        "cpu", config=TINY_AXES))
    reference = in_new_memory(load_component("transformer", write(tmp_path / "dequantised.safetensors", expected),
                                             torch.float32, "cpu", config=TINY_AXES))
    g = torch.Generator().manual_seed(1)
    lora = {  # the fused qkv (int8, per-row scales): one A, a B split by rows over to_q / to_k / to_v; w1 int8
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, 64, generator=g) * 0.02,
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(192, 4, generator=g) * 0.02,
        "diffusion_model.layers.1.feed_forward.w1.lora_A.weight": torch.randn(2, 64, generator=g) * 0.02,
        "diffusion_model.layers.1.feed_forward.w1.lora_B.weight": torch.randn(170, 2, generator=g) * 0.02,
    }
    layer = kept.layers[0].attention.to_k
    assert isinstance(layer, Int8StoredLinear) and isinstance(kept.layers[1].feed_forward.w1, Int8StoredLinear)
    before, values = dit_output(kept), layer.weight.clone()
    holder = Holder(kept)
    assert holder.load_lora(lora, scale=0.7).weights == 4
    assert torch.equal(layer.weight, values) and len(layer.lora) == 1
    Holder(reference).load_lora(lora, scale=0.7)  # fused into the dequantised weights
    assert_rel(dit_output(kept), dit_output(reference), 1e-6, "int8 DiT + LoRA")
    assert holder.unload_lora() == 4 and torch.equal(dit_output(kept), before)


def test_a_kept_int8_dit_runs_the_pipeline_as_its_dequantised_weights_resident_and_streamed(tiny_model_dir, tmp_path):
    from zimage_native.quant_linear import Int8StoredLinear

    sd, _, _ = to_comfy_quant(comfy_dit(tiny_model_dir, "", norm_final=False), mix=INT8_MIXES["int8+fp8"])
    dit = write(tmp_path / "z_image_turbo_int8mix.safetensors", sd)
    assert_kept_dit_runs_as_upcast(tiny_model_dir, dit, lambda t: t.layers[0].attention.to_v, Int8StoredLinear)


#: ``--fp8`` on a kept DiT: the int8 layers' mixes above, the first file's (fp8 and int8 stored layers in one
#: w1|w3 fusion, e5m2 beside), and int8 layers beside layers the file left in the float dtype (w1 int8, w3 not).
FP8_MIXES = {**INT8_MIXES, "fp8mix": MIX,
             "int8 beside fp32": {"attention.qkv": ("int8_tensorwise", "row"),
                                  "feed_forward.w1": ("int8_tensorwise", "tensor")}}


@pytest.fixture(scope="module")
def fp8_width_sd():
    """The comfy layout of a tiny DiT whose every block linear fp8 can take (TINY_FP8_DIT: widths of 16s)."""
    from zimage_native.config import TransformerConfig
    from zimage_native.model.transformer import ZImageTransformer
    from zimage_native.testing import randomize_

    from .dit_configs import TINY_FP8_DIT

    source = randomize_(ZImageTransformer(TransformerConfig.from_dict(TINY_FP8_DIT)))
    return convert_state_dict(source.state_dict(), None, DIT_COMFYUI)


def assert_fp8_converts_as_its_reference(kept, reference) -> None:
    """``--fp8`` on a kept DiT (stored layers) gives the modules and log line of the dequantised DiT
    ``reference`` under fp8 (its projections fused first, as optimize does): 4 blocks x (q, k, v, out,
    w1, w2, w3), each block's q|k|v and w1|w3 one fp8 GEMM however they are stored, none left packed."""
    from zimage_native.accel.fp8 import quantize_fp8_
    from zimage_native.accel.fusions import fuse_projections_
    from zimage_native.quant_linear import PackedLinear

    fuse_projections_(reference)
    line = quantize_fp8_(kept)
    assert line.startswith("fp8: 28 linears in float8 e4m3 (8 as fused GEMMs"), line
    assert line == quantize_fp8_(reference)
    assert not any(isinstance(m, PackedLinear) for m in kept.modules())
    assert module_kinds(kept) == module_kinds(reference)


@needs_cpu_fp8
@pytest.mark.parametrize("mix", FP8_MIXES)
def test_fp8_converts_a_kept_dits_int8_layers_as_it_converts_their_dequantised_weights(fp8_width_sd, tmp_path, mix):
    """``--fp8`` on a DiT that keeps its int8 layers (Int8StoredLinear) left them int8, dequantised per
    call, and its q|k|v and w1|w3 apart (an int8-only file: "0 linears in float8 e4m3"). Each becomes
    the Float8Linear of its dequantised weight (fp32 rows quantised to e4m3 with their own scales, as
    an nn.Linear's are), fused with its neighbours whatever they are stored as: the same modules and
    log line as the dequantised model under fp8, e4m3 layers' values as they are, and for a file
    without e4m3 layers the same outputs, bit for bit."""
    from torch import nn
    from torch.nn import functional as F

    from zimage_native.accel.fp8 import Float8Linear
    from zimage_native.quant_linear import FP8StoredLinear, Int8StoredLinear

    sd, expected, _ = to_comfy_quant(fp8_width_sd, mix=FP8_MIXES[mix])
    kept = in_new_memory(load_component("transformer", write(tmp_path / "mix.safetensors", sd), torch.float32,
                                        "cpu", config=TINY_AXES))
    reference = in_new_memory(load_component("transformer", write(tmp_path / "dequantised.safetensors", expected),
                                             torch.float32, "cpu", config=TINY_AXES))
    int8 = {n: m.dequantize(torch.float32) for n, m in kept.named_modules() if isinstance(m, Int8StoredLinear)}
    e4m3 = {n: (m.values().clone(), m.scale.clone()) for n, m in kept.named_modules()
            if isinstance(m, FP8StoredLinear) and m.fp8_dtype == torch.float8_e4m3fn}
    assert len(int8) >= 8
    assert_fp8_converts_as_its_reference(kept, reference)
    g = torch.Generator().manual_seed(2)
    for name, weight in int8.items():
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        layer, twin = kept.get_submodule(name), Float8Linear.from_linear(plain)  # the path an nn.Linear takes
        assert isinstance(layer, Float8Linear), name
        assert torch.equal(layer.weight.view(torch.uint8), twin.weight.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, twin.weight_scale), name
        x = torch.randn(3, 11, layer.in_features, generator=g)
        assert_rel(layer(x), layer.reference(x), 1e-2, f"{name}: fp8 GEMM against its slow twin")
        assert_rel(layer(x), F.linear(x, weight), 0.06, f"{name}: fp8 against the dequantised weight")
    for name, (values, scale) in e4m3.items():  # fused beside int8 rows, taken as they are
        layer = kept.get_submodule(name)
        assert torch.equal(layer.weight.view(torch.uint8), values.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, scale), name
    if not e4m3:
        assert torch.equal(dit_output(kept), dit_output(reference))



@needs_cpu_fp8
def test_a_lora_on_a_kept_int8_dit_under_fp8_is_held_and_released_as_on_an_fp8_files(tiny_model_dir, tmp_path):
    """As an fp8 file's (test_formats.test_unload_lora_after_fp8_gives_the_dit_fp8_makes_without_a_lora):
    int8 layers with LoRA side paths stay stored layers (weight-only, named in the fp8 line) and their
    q|k|v stays apart; after unload_lora they become fp8 GEMMs, fused as without the LoRA, with the same
    results bit for bit; a LoRA after fp8 is refused. Before, the int8 layers stayed int8 with or
    without a LoRA, and a LoRA after fp8 loaded as a side path on them."""
    from zimage_native.quant_linear import Int8StoredLinear

    from .fixtures import our_pipeline

    sd, _, _ = to_comfy_quant(comfy_dit(tiny_model_dir, "", norm_final=False), mix=INT8_MIXES["int8 only"])
    dit = write(tmp_path / "int8.safetensors", sd)
    lora = fusion_lora()
    plain, pipe = our_pipeline(tiny_model_dir, transformer=dit), our_pipeline(tiny_model_dir, transformer=dit)
    # TINY_DIT: 4 attentions' q, k, v, out (its feed-forward width, 170, is no multiple of 16: kept in int8)
    line = next(line for line in plain.optimize(fp8=True) if line.startswith("fp8:"))
    # the feed-forward linears (width 170, no multiple of 16) named as kept in int8 (before: "9 kept in float32")
    assert "16 linears in float8 e4m3 (4 as fused GEMMs" in line, line
    assert line.endswith("9 kept in float32, 12 kept as stored layers (int8 12; dequantised per call)"), line
    with pytest.raises(ValueError, match=r"load_lora: fp8 quantised the DiT's block linears"):
        plain.load_lora(lora)
    pipe.load_lora(lora, scale=0.7)
    line = next(line for line in pipe.optimize(fp8=True) if line.startswith("fp8:"))
    # the refiners' q|k|v fused, layers.0's held apart (to_out converted), layers.1's to_k, to_v, to_out converted;
    # kept in int8: the 4 linears with side paths and the 12 feed-forward ones
    assert "12 linears in float8 e4m3 (2 as fused GEMMs" in line, line
    assert line.endswith("9 kept in float32, 16 kept as stored layers (int8 16; dequantised per call)"), line
    assert_fusion_lora_held_then_released(plain, pipe, Int8StoredLinear)


@pytest.fixture(scope="module")
def fp8_width_model_dir(tmp_path_factory):
    from .dit_configs import TINY_FP8_DIT
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny-fp8-width"), TINY_FP8_DIT)


@needs_cpu_fp8
def test_a_lora_on_the_int8_part_of_a_w1_w3_beside_a_bf16_part_defers_the_fusion_until_unload(fp8_width_model_dir,
                                                                                               tmp_path):
    """w1 int8 (a LoRA side path on it) beside w3 as the file left it: under fp8 w3 is converted alone and
    w1 held; unload_lora fuses w1|w3 into one fp8 GEMM, and the DiT is the one fp8 makes without the LoRA."""
    from zimage_native.accel.fp8 import Float8Linear, fp8_waiting
    from zimage_native.quant_linear import Int8StoredLinear

    from .fixtures import our_pipeline

    sd, _, _ = to_comfy_quant(comfy_dit(fp8_width_model_dir, "", norm_final=False),
                              mix=FP8_MIXES["int8 beside fp32"])
    dit = write(tmp_path / "int8.safetensors", sd)
    g = torch.Generator().manual_seed(1)
    lora = {"diffusion_model.layers.0.feed_forward.w1.lora_A.weight": torch.randn(4, 96, generator=g) * 0.02,
            "diffusion_model.layers.0.feed_forward.w1.lora_B.weight": torch.randn(256, 4, generator=g) * 0.02}
    plain, pipe = our_pipeline(fp8_width_model_dir, transformer=dit), our_pipeline(fp8_width_model_dir, transformer=dit)
    assert next(line for line in plain.optimize(fp8=True) if line.startswith("fp8:")).startswith(
        "fp8: 28 linears in float8 e4m3 (8 as fused GEMMs")
    pipe.load_lora(lora, scale=0.7)
    line = next(line for line in pipe.optimize(fp8=True) if line.startswith("fp8:"))
    assert line.startswith("fp8: 27 linears in float8 e4m3 (7 as fused GEMMs"), line
    assert line.endswith("1 kept as stored layers (int8 1; dequantised per call)"), line
    ff = pipe.transformer.layers[0].feed_forward
    assert isinstance(ff.w1, Int8StoredLinear) and ff.w1.lora and isinstance(ff.w3, Float8Linear) and ff.w13 is None
    want = dit_output(plain.transformer)
    assert not torch.equal(dit_output(pipe.transformer), want)  # the LoRA is in effect
    pipe.unload_lora()
    assert isinstance(ff.w13, Float8Linear) and ff.w1.weight.data_ptr() == ff.w13.weight.data_ptr()
    assert module_kinds(pipe.transformer) == module_kinds(plain.transformer) and not fp8_waiting(pipe.transformer)
    assert torch.equal(dit_output(pipe.transformer), want)


@pytest.mark.parametrize("fmt", ["int8_tensorwise", "float8_e4m3fn"])
def test_fp8_on_a_gpu_refuses_a_float16_dit_whose_block_linears_are_all_stored(tiny_model_dir, tmp_path, monkeypatch,
                                                                               fmt):
    """The per-row scaled fp8 GEMM writes bfloat16 only; the GPU check read the dtype of the blocks'
    nn.Linear s, and a DiT whose block linears a file keeps stored (int8 or fp8) has none, so a float16
    one passed it (and, its stored layers now converted, would fail at its first GEMM)."""
    from zimage_native.accel import AccelerationUnavailable
    from zimage_native.accel.fp8 import check_fp8_supported

    sd, _, _ = to_comfy_quant(comfy_dit(tiny_model_dir, "", norm_final=False), mix={m: (fmt, "tensor") for m in MIX})
    path = write(tmp_path / "stored.safetensors", sd)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    half = load_component("transformer", path, torch.float16, "cpu", config=TINY_AXES, keep_fp8=True)
    with pytest.raises(AccelerationUnavailable, match=r"needs the DiT in bfloat16 .* its linears are float16"):
        check_fp8_supported(half, torch.device("cuda", 0))
    check_fp8_supported(half.to(torch.bfloat16), torch.device("cuda", 0))  # the stored values stay as they are
