"""ComfyUI's block-scaled comfy_quant formats, ``nvfp4`` and ``mxfp8`` (Z-Image-Turbo-NVFP4 and -MXFP8
files on the Hub mix them with bf16 layers), dequantised while loading.

The layouts are ComfyUI's (comfy/float.py, comfy/ops.py ``_load_quantized_module``, comfy/quant_ops.py
``QUANT_ALGOS``; see zimage_native/formats/microscale.py). The files are built in code from random
codes and scales, and the values they must dequantise to come from a slow twin written from the
format definitions: e2m1 and e4m3 values from their sign, exponent and mantissa bits, e8m0 as
2^(e - 127), the block scales found by the blocked layout's index formula, one value at a time in
numpy float32 (nvfp4: value * (block scale * tensor scale), as comfy-kitchen computes it).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from zimage_native.formats import UnsupportedFormatError, describe, detect_format
from zimage_native.formats.checkpoint import Checkpoint
from zimage_native.formats.microscale import dequantize
from zimage_native.loading import load_component

from .test_comfy_quant import PREFIX, comfy_quant_tensor, fp8_width_sd, in_new_memory, to_comfy_quant  # noqa: F401
from .test_comfy_quant import assert_fp8_converts_as_its_reference
from .test_formats import TINY_AXES, comfy_dit, dit_output, write
from .utils import needs_cpu_fp8


def e2m1(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def e4m3(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 7
    return sign * (m / 8 * 2.0 ** -6 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8))


def blocked_index(r: int, c: int, blocks: int) -> int:
    """Where the scale of row r, block c sits in cuBLAS's blocked layout (128 x 4 tiles, row-major)."""
    tiles_c = -(-blocks // 4)
    return ((r // 128) * tiles_c + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def twin(fmt: str, weight: np.ndarray, scale: np.ndarray, second: float = 1.0) -> np.ndarray:
    """The fp32 weight, one value at a time from the stored bytes (``weight`` and ``scale`` as uint8)."""
    rows = weight.shape[0]
    cols = weight.shape[1] * (2 if fmt == "nvfp4" else 1)
    size = 16 if fmt == "nvfp4" else 32
    flat = scale.reshape(-1)
    out = np.empty((rows, cols), dtype=np.float32)
    for r in range(rows):
        for j in range(cols):
            s = int(flat[blocked_index(r, j // size, cols // size)])
            if fmt == "nvfp4":
                byte = int(weight[r, j // 2])
                code = byte >> 4 if j % 2 == 0 else byte & 0xF
                out[r, j] = np.float32(e2m1(code)) * (np.float32(e4m3(s)) * np.float32(second))
            else:
                block = np.float32(0.0) if s == 0 else np.float32(2.0 ** (s - 127))
                out[r, j] = np.float32(e4m3(int(weight[r, j]))) * block
    return out


def random_layer(fmt: str, rows: int, cols: int, g: torch.Generator) -> tuple[dict, np.ndarray]:
    """(the layer's tensors by suffix, its weight by the twin) of random codes and scales; the blocked
    scales' padding is random too (it must not be read)."""
    size = 16 if fmt == "nvfp4" else 32
    shape = (-(-rows // 128) * 128, -(-(cols // size) // 4) * 4)
    if fmt == "nvfp4":
        weight = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
        scale = torch.randint(0x18, 0x40, shape, generator=g, dtype=torch.uint8)  # e4m3 2^-4 .. 2^0.9, no NaN
        second = float(torch.rand((), generator=g)) * 0.1 + 0.01
        tensors = {"weight": weight, "weight_scale": scale.view(torch.float8_e4m3fn),
                   "weight_scale_2": torch.tensor(second, dtype=torch.float32), "input_scale": torch.tensor(0.1)}
        return tensors, twin(fmt, weight.numpy(), scale.numpy(), second)
    codes = torch.randint(0, 0x7F, (rows, cols), generator=g, dtype=torch.uint8)  # e4m3 without NaN (0x7F, 0xFF)
    weight = (codes | (torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.uint8) << 7))
    scale = torch.randint(118, 130, shape, generator=g, dtype=torch.uint8)  # 2^-9 .. 2^2
    scale.view(-1)[::7] = 0  # e8m0 code 0: an all-zero block, read as 0
    tensors = {"weight": weight.view(torch.float8_e4m3fn), "weight_scale": scale.view(torch.float8_e8m0fnu)}
    return tensors, twin(fmt, weight.numpy(), scale.numpy())


@pytest.mark.parametrize("fmt, rows, cols, scale_dtype", [
    ("nvfp4", 192, 64, "F8_E4M3"), ("nvfp4", 300, 1040, "U8"), ("mxfp8", 64, 64, "F8_E8M0"),
    ("mxfp8", 260, 288, "U8")])
def test_block_scaled_weights_dequantise_to_the_values_of_their_definition(tmp_path, fmt, rows, cols, scale_dtype,
                                                                          monkeypatch):
    """Bit for bit the twin's values, whatever the row blocks read at a time (one tile, several, a part)."""
    from zimage_native.formats import microscale

    g = torch.Generator().manual_seed(rows + cols)
    tensors, want = random_layer(fmt, rows, cols, g)
    if scale_dtype == "U8":
        tensors["weight_scale"] = tensors["weight_scale"].view(torch.uint8)
    path = write(tmp_path / "layer.safetensors", {f"x.{k}": v for k, v in tensors.items()})
    for chunk in (2**20, 100 * cols, 7 * cols):
        monkeypatch.setattr(microscale, "CHUNK_ELEMENTS", chunk)
        with Checkpoint(path) as ckpt:
            assert ckpt.tensors["x.weight_scale"].dtype == scale_dtype
            got = dequantize(ckpt, "x.weight", fmt)
            assert got.dtype == torch.float32 and tuple(got.shape) == (rows, cols)
            assert torch.equal(got.view(torch.int32), torch.from_numpy(want).view(torch.int32))  # -0.0 too
            bf16 = dequantize(ckpt, "x.weight", fmt, torch.bfloat16)
            assert torch.equal(bf16, torch.from_numpy(want).to(torch.bfloat16))  # rounded once


#: nvfp4 on the fused qkv (192 x 64: two tiles of rows, the second padded) and t_embedder.mlp.2 (64 x 1024:
#: 16 tiles of blocks); mxfp8 on attention.out and t_embedder.mlp.0 (1024 x 256: 8 tiles of rows);
#: float8 on feed_forward.w3 (a mixed file as on the Hub); the rest fp32.
BLOCK_MIX = {"attention.qkv": "nvfp4", "t_embedder.mlp.2": "nvfp4", "attention.out": "mxfp8",
             "t_embedder.mlp.0": "mxfp8"}


def block_file(sd: dict, seed: int = 0, mix: dict | None = None, blocks: dict = BLOCK_MIX) -> tuple[dict, dict]:
    """(file tensors, expected fp32 state): the ``blocks`` layers in their formats with random values,
    the ``mix`` layers in to_comfy_quant's formats (default: feed_forward.w3 in float8)."""
    g = torch.Generator().manual_seed(seed)
    out, expected = to_comfy_quant(sd, mix={"feed_forward.w3": ("float8_e4m3fn", "tensor")} if mix is None else mix)[:2]
    for k, v in sd.items():
        match = next((m for m in blocks if k.endswith(f".{m}.weight")), None)
        if match is None:
            continue
        fmt, layer = blocks[match], k[: -len(".weight")]
        tensors, want = random_layer(fmt, *v.shape, g)
        out.update({f"{layer}.{suffix}": t for suffix, t in tensors.items()})
        out[f"{layer}.comfy_quant"] = comfy_quant_tensor({"format": fmt})
        expected[k] = torch.from_numpy(want)
    return out, expected


@pytest.fixture(scope="module")
def comfy_sd(tiny_model_dir):
    return comfy_dit(tiny_model_dir, PREFIX)


def test_an_nvfp4_and_mxfp8_dit_loads_as_the_model_of_its_dequantised_weights(comfy_sd, tmp_path):
    from zimage_native.quant_linear import FP8StoredLinear, PackedLinear

    sd, expected = block_file(comfy_sd)
    path = write(tmp_path / "z_image_turbo_nvfp4.safetensors", sd)
    info = detect_format(path).components[0]
    assert info.quantization == "comfy-quant" and sorted(set(info.comfy_quant.values())) == [
        "float8_e4m3fn", "mxfp8", "nvfp4"]
    reference = load_component("transformer", write(tmp_path / "dequantised.safetensors", expected), torch.float32,
                               "cpu", config=TINY_AXES)
    want = reference.state_dict()
    reference = in_new_memory(reference)
    for keep in (False, None):  # dequantised while loading; or its float8 and block-scaled layers kept (below)
        model = load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=keep)
        stored = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
        fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8StoredLinear)}
        assert all(n.endswith("feed_forward.w3") for n in fp8) and (len(fp8) > 0) == (keep is None)
        assert (len(stored) > len(fp8)) == (keep is None)
        state = model.state_dict()
        for k, v in want.items():
            if not any(s + "." in k for s in stored):
                assert torch.equal(state[k], v), k
        assert torch.equal(dit_output(in_new_memory(model)), dit_output(reference))
    bf16 = load_component("transformer", path, torch.bfloat16, "cpu", config=TINY_AXES, keep_fp8=False)
    qkv = "layers.0.attention.to_q.weight"
    assert bf16.state_dict()[qkv].dtype == torch.bfloat16 and torch.equal(bf16.state_dict()[qkv],
                                                                           want[qkv].to(torch.bfloat16))
    d = describe(path)
    assert "problem" not in d and d["components"]["transformer"]["comfy_quant"]["nvfp4"] > 0
    plain = describe(tmp_path / "dequantised.safetensors")["components"]["transformer"]
    assert d["components"]["transformer"]["parameters"] == plain["parameters"]  # nvfp4: two values a byte
    # an fp8 compute path's view: the float8 layers with their scales; mxfp8 weights (float8 too) come
    # dequantised, so no scale of theirs (their e8m0 block scales are not a weight scale)
    from zimage_native.loading import read_component_state_dict

    state, scales = read_component_state_dict(path, "transformer", dequantize_fp8=False)
    assert sorted({k.rsplit(".", 2)[-2] for k in scales}) == ["w3"]
    assert state["layers.0.attention.to_out.0.weight"].dtype == torch.float32


def _layer(name: str = "layers.0.attention.qkv") -> str:
    return PREFIX + name


@pytest.mark.parametrize("case, message", [
    ("convrot_w4a4", r"attention\.qkv: format 'convrot_w4a4' \(4-bit int weights rotated by a Hadamard transform "
                     r"\(ConvRot\), for comfy-kitchen's W4A4 kernels\) is not supported \(supported: float8_e4m3fn, "
                     r"float8_e5m2, int8_tensorwise, nvfp4, mxfp8\); use a bf16, fp8, scaled-fp8 or GGUF file"),
    ("asym_w4a8_int8", r"attention\.qkv: format 'asym_w4a8_int8' \(asymmetric 4-bit int weights with zero points"),
    ("nvfp4_fp8_weight", r"attention\.qkv: format nvfp4 needs a 2-D U8 weight of whole blocks of 16 values a row, "
                         r"the file has F8_E4M3 \[192, 64\]"),
    ("nvfp4_plain_scales", r"attention\.qkv: format nvfp4 needs .*attention\.qkv\.weight_scale in F8_E4M3 or U8, "
                           r"256 x 4 block scales \(one per 16 values, in cuBLAS's blocked layout\); the file has "
                           r"F8_E4M3 \[192, 4\]"),
    ("nvfp4_no_second", r"attention\.qkv: format nvfp4 needs one floating .*attention\.qkv\.weight_scale_2 \(the "
                        r"per-tensor scale\); the file has none"),
    ("nvfp4_pre_quant", r"attention\.qkv: format nvfp4 with a pre_quant_scale \(activations scaled per channel "
                        r"before the GEMM\) is not supported"),
    ("mxfp8_float_scale", r"attention\.out: format mxfp8 needs .*attention\.out\.weight_scale in F8_E8M0 or U8"),
])
def test_block_scaled_layers_that_do_not_match_their_format_are_refused_naming_it(comfy_sd, tmp_path, case,
                                                                                  message):
    sd, _ = block_file(comfy_sd)
    qkv, out = _layer(), _layer("layers.0.attention.out")
    if case in ("convrot_w4a4", "asym_w4a8_int8"):
        sd[f"{qkv}.comfy_quant"] = comfy_quant_tensor({"format": case})
    elif case == "nvfp4_fp8_weight":
        sd[f"{qkv}.weight"] = torch.zeros(192, 64, dtype=torch.float8_e4m3fn)
    elif case == "nvfp4_plain_scales":  # one scale per block, not in the blocked layout
        sd[f"{qkv}.weight_scale"] = torch.ones(192, 4, dtype=torch.float8_e4m3fn)
    elif case == "nvfp4_no_second":
        del sd[f"{qkv}.weight_scale_2"]
    elif case == "nvfp4_pre_quant":
        sd[f"{qkv}.pre_quant_scale"] = torch.ones(64)
    elif case == "mxfp8_float_scale":
        sd[f"{out}.weight_scale"] = sd[f"{out}.weight_scale"].view(torch.uint8).float()
    path = write(tmp_path / "model.safetensors", sd)
    with pytest.raises(UnsupportedFormatError, match=message):
        load_component("transformer", path, None, "cpu", config=TINY_AXES)
    assert re.search(message, describe(path)["problem"])


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_a_text_encoder_with_nvfp4_and_mxfp8_layers_loads_as_the_encoder_of_its_dequantised_weights(
        tiny_model_dir, tmp_path, quant):
    """As loaded, and quantised while loading (the int8 codes of the dequantised weights)."""
    from .test_formats import prefixed_te

    sd = prefixed_te(tiny_model_dir, lm_head=False)
    g = torch.Generator().manual_seed(1)
    mix = {"self_attn.q_proj": "nvfp4", "mlp.gate_proj": "nvfp4", "mlp.down_proj": "mxfp8"}
    out, expected = {}, {}
    for k, v in sd.items():
        fmt = next((f for m, f in mix.items() if k.endswith(f".{m}.weight")), None)
        if fmt is None:
            out[k] = expected[k] = v
            continue
        tensors, want = random_layer(fmt, *v.shape, g)
        out.update({f"{k[: -len('weight')]}{suffix}": t for suffix, t in tensors.items()})
        out[f"{k[: -len('.weight')]}.comfy_quant"] = comfy_quant_tensor({"format": fmt})
        expected[k] = torch.from_numpy(want)
    config = {"max_position_embeddings": 2048}
    a = load_component("text_encoder", write(tmp_path / "qwen_3_4b_nvfp4.safetensors", out), torch.bfloat16, "cpu",
                       config=config, quant=quant).state_dict()
    b = load_component("text_encoder", write(tmp_path / "dequantised.safetensors", expected), torch.bfloat16, "cpu",
                       config=config, quant=quant).state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


@pytest.mark.parametrize("scale_dtype", ["F8_E8M0", "U8"])
def test_info_check_flags_an_e8m0_block_scale_code_255_of_an_mxfp8_layer(tmp_path, scale_dtype):
    """An mxfp8 block scale of code 255 (NaN in the OCP MX definition) loaded its block as 32 infinite
    values, and ``zimage info --check`` said "all values are finite" (the F8_E8M0 / U8 scales were skipped
    as not floating). It is now counted, in the scales the loader reads (not the blocked layout's padding),
    and the block dequantises to NaN."""
    from click.testing import CliRunner

    from zimage_native.cli import main

    tensors, _ = random_layer("mxfp8", 64, 64, torch.Generator().manual_seed(3))
    codes = tensors["weight_scale"].view(torch.uint8).clone()
    codes.view(-1)[blocked_index(5, 1, 2)] = 255  # row 5, block 1: read by the loader
    codes.view(-1)[blocked_index(100, 3, 2)] = 255  # padding (64 rows, 2 blocks stored as 128 x 4): never read
    tensors["weight_scale"] = codes if scale_dtype == "U8" else codes.view(torch.float8_e8m0fnu)
    layer = {f"x.{k}": v for k, v in tensors.items()} | {"x.comfy_quant": comfy_quant_tensor({"format": "mxfp8"})}
    path = write(tmp_path / "mxfp8.safetensors", layer)
    with Checkpoint(path) as ckpt:
        assert ckpt.tensors["x.weight_scale"].dtype == scale_dtype
        weight = dequantize(ckpt, "x.weight", "mxfp8")
    assert torch.isnan(weight[5, 32:]).all() and torch.isfinite(weight).sum() == 64 * 64 - 32
    result = CliRunner().invoke(main, ["info", str(path), "--check"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{path}: read 2 floating-point tensors ({64 * 64 + 64 * 2:,} values)"
    assert lines[1:] == ["  x.weight_scale: 1 NaN, 0 infinite of 128 values",
                         "  1 tensor(s) hold NaN or infinite values: the file is damaged, or the model it holds diverged"]
    codes.view(-1)[blocked_index(5, 1, 2)] = 127  # the padding alone: clean
    layer["x.weight_scale"] = codes if scale_dtype == "U8" else codes.view(torch.float8_e8m0fnu)
    clean = CliRunner().invoke(main, ["info", str(write(tmp_path / "clean.safetensors", layer)), "--check"])
    assert clean.exit_code == 0 and clean.output.strip().endswith("all values are finite"), clean.output


# ----------------------------------------------------------------------------------- kept packed

#: Mixed files: the BLOCK_MIX layers (nvfp4, mxfp8) beside float8 ones; beside float8 and int8 ones with
#: the unquantised tensors in bf16 (as on the Hub).
KEPT_MIXES = {"fp8": ({"feed_forward.w3": ("float8_e4m3fn", "tensor")}, False),
              "fp8+int8, bf16": ({"feed_forward.w3": ("float8_e4m3fn", "tensor"),
                                  "feed_forward.w1": ("int8_tensorwise", "row")}, True)}


def kept_file(comfy_sd, tmp_path, mix: str = "fp8") -> tuple:
    """(path, file tensors) of a KEPT_MIXES file."""
    layers, bf16 = KEPT_MIXES[mix]
    sd, _ = block_file(comfy_sd, mix=layers)
    if bf16:
        sd = {k: v.to(torch.bfloat16) if v.dtype == torch.float32 and v.ndim >= 1 and not k.endswith(
            ("_scale", "_scale_2")) else v for k, v in sd.items()}
    return write(tmp_path / "z_image_turbo_nvfp4.safetensors", sd), sd


def block_layers(model) -> dict:
    from zimage_native.quant_linear import BlockScaledLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, BlockScaledLinear)}


def expected_formats(model) -> dict:
    """Canonical linear name -> the format BLOCK_MIX gives it (the fused qkv split into to_q / to_k / to_v)."""
    canonical = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
                 "attention.out": ("attention.to_out.0",)}
    out = {}
    for name, _ in model.named_modules():
        for layer, fmt in BLOCK_MIX.items():
            if any(name.endswith("." + c) or name == c for c in canonical.get(layer, (layer,))):
                out[name] = fmt
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", KEPT_MIXES)
def test_a_kept_dit_keeps_its_nvfp4_and_mxfp8_layers_packed_with_the_results_of_the_dequantised_model(
        comfy_sd, tmp_path, mix, dtype):
    """A DiT that keeps its fp8 layers (keep_fp8 True, or None on the CPU) keeps its nvfp4 and mxfp8
    layers as their codes (BlockScaledLinear: uint8 codes, one uint8 block-scale code a block, nvfp4's
    fp32 weight_scale_2), dequantised per forward as the loader does: each weight, and the DiT's output,
    bit for bit those of keep_fp8=False, in fp32 and in bf16. They were dequantised while loading: the
    model held the dtype's bytes (fp32: 2.37 MB for a file of 1.02 MB)."""
    from torch import nn

    from zimage_native.quant_linear import FP8StoredLinear, Int8StoredLinear, quantized_bytes, resident_bytes

    path, sd = kept_file(comfy_sd, tmp_path, mix)
    upcast = in_new_memory(load_component("transformer", path, dtype, "cpu", config=TINY_AXES, keep_fp8=False))
    for keep in (True, None):
        kept = load_component("transformer", path, dtype, "cpu", config=TINY_AXES, keep_fp8=keep)
        blocks = block_layers(kept)
        assert {n: m.fmt for n, m in blocks.items()} == expected_formats(kept) and len(blocks) == 18
    assert any(isinstance(m, FP8StoredLinear) for m in kept.modules())
    assert any(isinstance(m, Int8StoredLinear) for m in kept.modules()) == ("int8" in mix)
    want = upcast.state_dict()
    for name, layer in blocks.items():
        size = 16 if layer.fmt == "nvfp4" else 32
        assert layer.weight.dtype == torch.uint8 and layer.block_scale.dtype == torch.uint8, name
        assert layer.block_scale.shape == (layer.out_features, layer.in_features // size), name
        assert layer.scale_2.dtype == torch.float32 and layer.scale_2.shape == (), name
        got = layer.dequantize(dtype)
        assert got.dtype == dtype and torch.equal(got, want[f"{name}.weight"]), name
    # resident: the codes and block-scale codes, each storage once (a split qkv's parts share theirs)
    packed = sum(m.weight.numel() + m.block_scale.numel() + 4 + (0 if m.bias is None else m.bias.nbytes)
                 for m in blocks.values())
    assert resident_bytes(nn.ModuleList(blocks.values())) == packed
    counted = quantized_bytes(kept)
    for fmt in ("nvfp4", "mxfp8"):
        assert counted[fmt] == sum(m.weight.numel() + m.block_scale.numel() + 4 for m in blocks.values()
                                   if m.fmt == fmt)
    file = sum(v.nbytes for k, v in sd.items() if not k.endswith((".comfy_quant", ".input_scale")))
    if dtype == torch.float32 and mix == "fp8":  # (the file's tensors in fp32, as loaded)
        held = resident_bytes(kept)
        assert 0.99 * file <= held <= file, (held, file)  # (less the blocked scales' padding)
        assert held < 0.45 * resident_bytes(upcast)
    assert torch.equal(dit_output(in_new_memory(kept), dtype), dit_output(upcast, dtype))  # (copies the tensors)


def test_a_dtype_cast_of_a_kept_block_scaled_dit_leaves_its_codes_and_scales_alone(comfy_sd, tmp_path):
    """``model.to(torch.bfloat16)`` (and the state dict) leave the codes as they are (uint8, the same
    storage) and the per-tensor scale in fp32; the cast model gives the outputs of the fp32 dequantised
    model cast to bf16, bit for bit (one rounding of the same fp32 values)."""
    path, _ = kept_file(comfy_sd, tmp_path)
    kept = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=True))
    upcast = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES,
                                          keep_fp8=False))
    layers = block_layers(kept)
    before = {n: (m.weight.data_ptr(), m.block_scale.data_ptr(), m.scale_2.clone()) for n, m in layers.items()}
    kept.to(torch.bfloat16)
    upcast.to(torch.bfloat16)
    state = kept.state_dict()
    for name, m in layers.items():
        assert (m.weight.data_ptr(), m.block_scale.data_ptr()) == before[name][:2], name
        assert m.scale_2.dtype == torch.float32 and torch.equal(m.scale_2, before[name][2]), name
        assert state[f"{name}.weight"].dtype == state[f"{name}.block_scale"].dtype == torch.uint8, name
        assert state[f"{name}.scale_2"].dtype == torch.float32, name
        assert m.fmt in repr(m)
    assert torch.equal(dit_output(kept, torch.bfloat16), dit_output(upcast, torch.bfloat16))


def test_a_lora_on_a_kept_block_scaled_dit_is_a_side_path_equal_to_the_lora_fused_into_the_dequantised_model(
        comfy_sd, tmp_path):
    from zimage_native.lora import LoraMixin
    from zimage_native.quant_linear import BlockScaledLinear

    from .utils import assert_rel

    class Holder(LoraMixin):
        def __init__(self, transformer):
            self.transformer = transformer

    path, _ = kept_file(comfy_sd, tmp_path)
    kept = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=True))
    reference = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES,
                                             keep_fp8=False))
    g = torch.Generator().manual_seed(1)
    lora = {  # the fused qkv (nvfp4): one A, a B split by rows over to_q / to_k / to_v; attention.out (mxfp8)
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, 64, generator=g) * 0.02,
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(192, 4, generator=g) * 0.02,
        "diffusion_model.layers.1.attention.out.lora_A.weight": torch.randn(2, 64, generator=g) * 0.02,
        "diffusion_model.layers.1.attention.out.lora_B.weight": torch.randn(64, 2, generator=g) * 0.02,
    }
    layer, out = kept.layers[0].attention.to_k, kept.layers[1].attention.to_out[0]
    assert isinstance(layer, BlockScaledLinear) and isinstance(out, BlockScaledLinear)
    assert (layer.fmt, out.fmt) == ("nvfp4", "mxfp8")
    before, codes = dit_output(kept), (layer.weight.clone(), layer.block_scale.clone())
    holder = Holder(kept)
    assert holder.load_lora(lora, scale=0.7).weights == 4
    assert torch.equal(layer.weight, codes[0]) and torch.equal(layer.block_scale, codes[1]) and len(layer.lora) == 1
    assert len(out.lora) == 1
    Holder(reference).load_lora(lora, scale=0.7)  # fused into the dequantised weights
    with_lora = dit_output(kept)
    assert not torch.equal(with_lora, before)
    assert_rel(with_lora, dit_output(reference), 1e-6, "nvfp4 / mxfp8 DiT + LoRA")
    assert holder.unload_lora() == 4 and torch.equal(dit_output(kept), before)


def test_streamed_blocks_move_a_kept_block_scaled_layers_codes_and_scales(comfy_sd, tmp_path):
    """offload="blocks": each block's codes, block-scale codes and per-tensor scales are among the
    tensors copied to the execution device before it runs (a fake move that records every copy) and
    the output is the resident model's."""
    from zimage_native.offload import RESIDENT, _streamed_tensors, stream_blocks

    path, _ = kept_file(comfy_sd, tmp_path)
    resident = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES,
                                            keep_fp8=True))
    want = dit_output(resident)
    model = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=True))
    copied = set()

    def transfer(t):
        copied.add(t.data_ptr())
        return t.clone()

    streamer = stream_blocks(model, "cpu", depth=1, transfer=transfer)
    homes = {t.data_ptr() for block in streamer.blocks for t in _streamed_tensors(block, RESIDENT)}
    layers = [m for block in streamer.blocks for m in block_layers(block).values()]
    assert len(layers) == 16  # 4 blocks (2 layers, 2 refiners) x (q, k, v, out); the t_embedder's are resident
    buffers = {t.data_ptr() for m in layers for t in (m.weight, m.block_scale, m.scale_2)}
    assert buffers <= homes
    for _ in range(2):
        assert torch.equal(dit_output(model), want)
    assert homes <= copied


def test_a_kept_block_scaled_dit_runs_the_pipeline_as_its_dequantised_weights_resident_and_streamed(tiny_model_dir,
                                                                                                    tmp_path):
    from zimage_native.quant_linear import BlockScaledLinear

    from .test_formats import assert_kept_dit_runs_as_upcast

    sd, _ = block_file(comfy_dit(tiny_model_dir, PREFIX))
    dit = write(tmp_path / "z_image_turbo_nvfp4.safetensors", sd)
    assert_kept_dit_runs_as_upcast(tiny_model_dir, dit, lambda t: t.layers[0].attention.to_q, BlockScaledLinear)


def test_fusing_projections_leaves_kept_block_scaled_layers_apart(comfy_sd, tmp_path):
    """accel.fusions.fuse_projections_ fuses plain nn.Linear q|k|v and w1|w3 only: a block-scaled q|k|v
    stays three layers, each dequantising its own codes, and the output is unchanged."""
    from zimage_native.accel.fusions import fuse_projections_

    path, _ = kept_file(comfy_sd, tmp_path)
    kept = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=True))
    before, layers = dit_output(kept), block_layers(kept)
    assert fuse_projections_(kept) == (0, 0)  # q|k|v nvfp4 everywhere, and every w3 float8
    assert block_layers(kept) == layers and all(m.attention.to_qkv is None for m in kept.layers)
    assert torch.equal(dit_output(kept), before)


#: Every block linear of the fp8-width DiT stored: q|k|v nvfp4, out and w1 mxfp8, w2 nvfp4 (and w3 int8).
FP8_BLOCKS = {"attention.qkv": "nvfp4", "attention.out": "mxfp8", "feed_forward.w1": "mxfp8",
              "feed_forward.w2": "nvfp4"}


@needs_cpu_fp8
def test_fp8_converts_a_kept_dits_block_scaled_layers_as_it_converts_their_dequantised_weights(fp8_width_sd,
                                                                                               tmp_path):
    """``--fp8`` takes a kept nvfp4 / mxfp8 layer as it takes an int8 one: its weight dequantised in fp32
    and quantised per row as an nn.Linear's is, q|k|v and w1|w3 stacked into one fp8 GEMM whatever
    their parts are stored as. Without it the block-scaled layers stayed packed, dequantised per call,
    and their fusions apart, silently (before the layers were kept they were nn.Linear and converted):
    the same modules, line and outputs, bit for bit, as the dequantised model under fp8."""
    sd, _ = block_file(fp8_width_sd, mix={"feed_forward.w3": ("int8_tensorwise", "row")}, blocks=FP8_BLOCKS)
    path = write(tmp_path / "z_image_turbo_nvfp4.safetensors", sd)
    kept = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES, keep_fp8=True))
    reference = in_new_memory(load_component("transformer", path, torch.float32, "cpu", config=TINY_AXES,
                                             keep_fp8=False))
    assert len(block_layers(kept)) == 4 * 6  # 4 blocks x (q, k, v, out, w1, w2)
    assert_fp8_converts_as_its_reference(kept, reference)
    assert torch.equal(dit_output(kept), dit_output(reference))


@needs_cpu_fp8
def test_a_lora_on_a_kept_block_scaled_dit_under_fp8_is_held_and_released_as_on_an_fp8_files(tiny_model_dir,
                                                                                             tmp_path):
    """As an fp8 file's and an int8 one's: block-scaled layers with LoRA side paths stay packed under
    fp8 (weight-only, named in the fp8 line) and their q|k|v stays apart; after unload_lora they become
    fp8 GEMMs, fused as without the LoRA, with the same results bit for bit."""
    from zimage_native.quant_linear import BlockScaledLinear

    from .fixtures import our_pipeline
    from .test_formats import assert_fusion_lora_held_then_released, fusion_lora

    sd, _ = block_file(comfy_dit(tiny_model_dir, "", norm_final=False), mix={})
    dit = write(tmp_path / "z_image_turbo_nvfp4.safetensors", sd)
    plain, pipe = our_pipeline(tiny_model_dir, transformer=dit), our_pipeline(tiny_model_dir, transformer=dit)
    line = next(line for line in plain.optimize(fp8=True) if line.startswith("fp8:"))
    assert "16 linears in float8 e4m3 (4 as fused GEMMs" in line, line  # 4 attentions' q, k, v, out
    pipe.load_lora(fusion_lora(), scale=0.7)
    line = next(line for line in pipe.optimize(fp8=True) if line.startswith("fp8:"))
    assert "12 linears in float8 e4m3 (2 as fused GEMMs" in line, line
    assert line.endswith("4 kept as stored layers (nvfp4 4; dequantised per call)"), line
    assert_fusion_lora_held_then_released(plain, pipe, BlockScaledLinear)
