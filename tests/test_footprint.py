"""The resident bytes of docs/formats.md and docs/performance.md (``zimage_native.footprint``):
computed from a config on meta, they equal the bytes of real tiny models stored the engine's way
(bf16, fp8, int8 / int4 text encoder, streamed blocks), and the released models' counts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from zimage_native import footprint as fp
from zimage_native.devices import format_bytes
from zimage_native.cli.config import tomllib  # tomli before Python 3.11
from zimage_native.config import TransformerConfig, VAEConfig
from zimage_native.model.transformer import ZImageTransformer
from zimage_native.model.vae import AutoencoderKL
from zimage_native.offload import stream_blocks, streamed_bytes
from zimage_native.quantize import quantize_text_encoder, weight_bytes
from zimage_native.testing import randomize_

from .dit_configs import TINY_DIT, TINY_FP8_DIT
from .fixtures import TINY_VAE
from .test_comfy_quant import fp8_width_sd  # noqa: F401 - a fixture
from .utils import needs_cpu_fp8

# Widths that are multiples of 128, so that int4 uses its real group size (as test_text_encoder_quant).
QWEN = dict(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512,
            tie_word_embeddings=True)


def tiny_dit(config: dict, dtype=torch.bfloat16):
    return randomize_(ZImageTransformer(TransformerConfig.from_dict(config)), 0).to(dtype).eval()


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_dit_and_vae_bytes_equal_the_built_models(dtype, name):
    cfg = TransformerConfig.from_dict(TINY_DIT)
    assert fp.dit_bytes(cfg, name) == weight_bytes(tiny_dit(TINY_DIT, dtype))
    vcfg = VAEConfig.from_dict(TINY_VAE)
    assert fp.vae_bytes(vcfg, name) == weight_bytes(AutoencoderKL(vcfg).to(dtype))


@needs_cpu_fp8  # optimize(fp8=True) on the CPU
def test_fp8_dit_bytes_equal_the_converted_model():
    from zimage_native.accel import optimize

    model = tiny_dit(TINY_FP8_DIT)
    optimize(model, fp8=True)  # fused q|k|v and w1|w3 quantised as one matrix each (views share it)
    assert any(type(m).__name__ == "Float8Linear" for m in model.modules())
    expected = fp.dit_bytes(TransformerConfig.from_dict(TINY_FP8_DIT), "fp8")
    assert weight_bytes(model) == expected
    assert expected < fp.dit_bytes(TransformerConfig.from_dict(TINY_FP8_DIT), "bf16")


@pytest.mark.parametrize("depth", [1, 2])
def test_streamed_dit_bytes_equal_what_stays_plus_the_blocks_in_flight(depth):
    model = tiny_dit(TINY_DIT)
    resident, largest = streamed_bytes(model)
    assert fp.dit_bytes(TransformerConfig.from_dict(TINY_DIT), "bf16", "blocks", depth) == resident + (depth + 1) * largest
    # And what stream_blocks really leaves on the device ("meta" stands in for it).
    stream_blocks(model, "meta")
    on_device = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.is_meta)
    assert on_device == resident


def tiny_qwen3(dtype=torch.bfloat16):
    from transformers import Qwen3Config

    from zimage_native.text_encoder import build_truncated_qwen3

    model, cfg, _ = build_truncated_qwen3(Qwen3Config(**QWEN))
    model = randomize_(model.to_empty(device="cpu"), 3).to(dtype).eval()
    with torch.device("cpu"):  # built after the cast, in fp32, as the loader does
        model.rotary_emb = type(model.rotary_emb)(config=cfg)
    return model


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_text_encoder_bytes_equal_the_quantised_model(quant):
    model = quantize_text_encoder(tiny_qwen3(), quant)
    assert fp.text_encoder_bytes(QWEN, quant) == weight_bytes(model)
    assert len(model.layers) == QWEN["num_hidden_layers"] - 1  # the last layer is never loaded


def test_ggml_block_sizes_follow_from_the_block_layouts():
    # Bytes of each block's fields (ggml-common.h): fp16 scales, packed quants, high bits, sub-scales.
    fields = {
        "Q8_0": (32, 2 + 32), "Q4_0": (32, 2 + 16), "Q4_1": (32, 2 + 2 + 16), "Q5_0": (32, 2 + 4 + 16),
        "Q5_1": (32, 2 + 2 + 4 + 16), "Q2_K": (256, 16 + 64 + 2 + 2), "Q3_K": (256, 32 + 64 + 12 + 2),
        "Q4_K": (256, 2 + 2 + 12 + 128), "Q5_K": (256, 2 + 2 + 12 + 32 + 128), "Q6_K": (256, 128 + 64 + 16 + 2),
        # i-quants: grid indices (low bytes, high bits), sign bytes or 7-bit patterns, 3- / 4-bit scales
        "IQ2_XXS": (256, 2 + 64), "IQ2_XS": (256, 2 + 64 + 8), "IQ2_S": (256, 2 + 32 + 32 + 8 + 8),
        "IQ3_XXS": (256, 2 + 64 + 32), "IQ3_S": (256, 2 + 64 + 8 + 32 + 4), "IQ1_S": (256, 2 + 32 + 16),
        "IQ1_M": (256, 32 + 16 + 8),
    }
    for qtype, (block, size) in fields.items():
        assert fp.GGML_BLOCKS[qtype] == (block, size), qtype
        assert fp.ggml_bytes(qtype, (3, 2 * block)) == 6 * size
    with pytest.raises(ValueError, match="multiple of 256"):
        fp.ggml_bytes("Q4_K", (4, 64))


def test_gguf_bytes_count_packed_tensors_by_type_and_the_rest_in_the_compute_dtype():
    cfg = TransformerConfig.from_dict(dict(TINY_DIT, dim=256, n_heads=2, axes_dims=[32, 48, 48]))
    tensors = fp.tensors_of(fp.dit_on_meta(cfg))
    types = fp.uniform_types(tensors, "Q8_0", fp.ggml_linear("Q8_0"))
    packed = [t for t in tensors if t.name in types]
    assert "layers.0.attention.to_q.weight" in types and "x_pad_token" not in types
    rest = sum(t.numel for t in tensors if t.name not in types)
    assert fp.gguf_bytes(tensors, types) == sum(t.numel // 32 * 34 for t in packed) + 2 * rest
    assert fp.dit_bytes(cfg, "gguf:Q8_0") == fp.gguf_bytes(tensors, types)
    mixed = dict(types, **{"layers.0.feed_forward.w1.weight": "Q6_K"})  # a file mixing types per tensor
    w1 = next(t for t in tensors if t.name == "layers.0.feed_forward.w1.weight")
    assert fp.gguf_bytes(tensors, mixed) - fp.gguf_bytes(tensors, types) == w1.numel // 256 * 210 - w1.numel // 32 * 34


def test_released_models():
    """The released DiT is 6,154,908,736 parameters (12,309,817,472 bytes in bf16, the size of the
    bf16 files); Qwen3-4B is 4,022,468,096, of which the 35 loaded layers and the embedding hold
    3,921,534,720 (plus 64-entry fp32 RoPE tables: inv_freq, and original_inv_freq where transformers
    keeps it as a buffer, 5.x but not 4.51)."""
    assert fp.dit_bytes(None, "bf16") == 12_309_817_472
    tables = len(list(fp.text_encoder_on_meta().rotary_emb.buffers()))
    assert tables in (1, 2)
    assert fp.text_encoder_bytes(None, "none") == 2 * 3_921_534_720 + tables * 64 * 4
    assert fp.vae_bytes(None, "bf16") == 2 * 83_819_683


def test_profiles_match_the_example_config():
    example = tomllib.loads((Path(__file__).resolve().parents[1] / "zimage_native" / "config.example.toml").read_text())
    for p in fp.PROFILES:
        table = example[p.name]
        assert table.get("offload", "none") == p.offload, p.name
        assert table.get("text_encoder_quant", "none") == p.text_encoder, p.name
        assert table.get("tiled_vae", False) == p.tiled_vae, p.name
        transformer = table.get("transformer")
        if p.dit.startswith("gguf:"):
            assert transformer.endswith(".gguf") and p.dit.split(":")[1].lower() in transformer.lower(), p.name
        else:
            assert transformer is None and table.get("fp8", False) == (p.dit == "fp8"), p.name
        b = fp.profile_bytes(p)
        assert max(b["encode"], b["denoise"]) < 0.75 * p.card_gib * 2**30, (p.name, b)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_dit_bytes_equal_the_loaded_file_resident_and_streamed(tmp_path, qtype):
    """A one-type GGUF DiT loaded in bf16 (packed linears kept packed, the rest cast) holds exactly
    ``dit_bytes(cfg, "gguf:TYPE")``; its packed blocks stream like bf16 ones, with identical output."""
    pytest.importorskip("gguf")
    from zimage_native.loading import load_component

    from .test_formats import dit_output
    from .test_gguf import AXES, GGUF_DIT, write_dit

    path, _ = write_dit(tmp_path / f"z-{qtype}.gguf", qtype)
    cfg = TransformerConfig(**GGUF_DIT)
    model = load_component("transformer", path, torch.bfloat16, "cpu", config=AXES)
    assert weight_bytes(model) == fp.dit_bytes(cfg, f"gguf:{qtype}")
    resident, largest = streamed_bytes(model)
    assert fp.dit_bytes(cfg, f"gguf:{qtype}", "blocks") == resident + 2 * largest

    model = load_component("transformer", path, torch.float32, "cpu", config=AXES)
    want = dit_output(model)
    moved = []
    stream_blocks(model, "cpu", transfer=lambda t: moved.append(t.dtype) or t.clone())
    for _ in range(2):
        assert torch.equal(dit_output(model), want)
    assert torch.uint8 in moved  # the packed weights are what streams


#: Every block linear of a ComfyUI block-scaled DiT in one format (the fused q|k|v split into three layers).
ALL_BLOCK_LINEARS = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_block_scaled_dit_bytes_equal_the_kept_file_resident_and_streamed(fp8_width_sd, tmp_path, fmt):
    """A ComfyUI nvfp4 / mxfp8 DiT whose blocks' attention and feed-forward linears are all in that
    format, the rest fp32 in the file, loaded in bf16 with the layers kept packed (BlockScaledLinear)
    holds exactly ``dit_bytes(cfg, fmt)``: codes (nvfp4 two a byte), a block-scale byte per 16 / 32
    values, an fp32 scale_2 per layer, the rest bf16; streamed, the resident parts and the largest
    block as offload counts them."""
    from zimage_native.loading import load_component
    from zimage_native.quant_linear import BlockScaledLinear, resident_bytes

    from .test_comfy_quant_blocks import block_file
    from .test_formats import TINY_AXES, write

    sd, _ = block_file(fp8_width_sd, mix={}, blocks=dict.fromkeys(ALL_BLOCK_LINEARS, fmt))
    path = write(tmp_path / f"z_image_turbo_{fmt}.safetensors", sd)
    model = load_component("transformer", path, torch.bfloat16, "cpu", config=TINY_AXES, keep_fp8=True)
    cfg = TransformerConfig.from_dict(TINY_FP8_DIT)
    layers = [m for m in model.modules() if isinstance(m, BlockScaledLinear)]
    assert len(layers) == 7 * (cfg.n_layers + 2 * cfg.n_refiner_layers) and {m.fmt for m in layers} == {fmt}
    assert resident_bytes(model) == weight_bytes(model) == fp.dit_bytes(cfg, fmt)
    assert fp.dit_bytes(cfg, fmt) < fp.dit_bytes(cfg, "bf16")
    resident, largest = streamed_bytes(model)
    assert fp.dit_bytes(cfg, fmt, "blocks") == resident + 2 * largest


def test_the_docs_dit_table_is_the_one_footprint_computes():
    """docs/performance.md's DiT table (resident and with --offload blocks): every GB figure and every
    exact byte count equal dit_bytes for the released config, the nvfp4 / mxfp8 rows included (and an
    fp8 file streamed by --offload blocks: the fp8 row's second cell)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    text = text.split("| DiT weights | all resident |", 1)[1].split("\n\n", 1)[0]  # that table alone
    rows = re.findall(r"^\| (fp32|bf16|fp8|mxfp8|nvfp4|GGUF \w+)\b[^|]* \| ([^|]+) \| ([^|]+) \|$", text, re.M)
    formats = [label.replace("GGUF ", "gguf:") for label, _, _ in rows]
    assert {"fp8", "mxfp8", "nvfp4", "gguf:Q4_K"} <= set(formats), formats
    for fmt, (_, *cells) in zip(formats, rows):
        for cell, offload in zip(cells, ("none", "blocks")):
            want = fp.dit_bytes(None, fmt, offload)
            assert cell.split(" GB")[0] == f"{want / 1e9:.2f}", (fmt, offload, cell, want)
            exact = re.search(r"\(([\d,]+) B\)", cell)
            assert exact is None or int(exact.group(1).replace(",", "")) == want, (fmt, offload, cell, want)



def gb_cells(cell: str) -> list[str]:
    """The GB figures of a table cell ("4.17 / 3.22 / 2.21 GB", "3.93 GB / 2.27 GB", "7.84 GB
    (7,843,069,952 B)"), without those in parentheses."""
    return re.findall(r"\d+\.\d\d", re.sub(r"\([^)]*\)", "", cell))


def assert_figure(cell: str, want: int, what) -> None:
    """``cell``'s GB figure (and exact byte count, where it gives one) is ``want``."""
    assert gb_cells(cell) == [f"{want / 1e9:.2f}"], (what, cell, want)
    exact = re.search(r"\(([\d,]+) B\)", cell)
    assert exact is None or int(exact.group(1).replace(",", "")) == want, (what, cell, want)


def test_the_docs_text_encoder_vae_and_profile_figures_are_the_ones_footprint_computes():
    """docs/performance.md's text-encoder table, VAE line and profile table, docs/formats.md's
    "Resident bytes per format" rows of the text encoder and the VAE, and the byte counts in the
    comments of config.example.toml's profiles: each GB / GiB figure and exact byte count equals
    what footprint computes for the released configs."""
    root = Path(__file__).resolve().parents[1]
    perf = (root / "docs" / "performance.md").read_text()
    table = perf.split("| text encoder | bytes |", 1)[1].split("\n\n", 1)[0]
    rows = dict(re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", table, re.M))
    assert_figure(rows["bf16"], fp.text_encoder_bytes(None, "none"), "bf16")
    for quant in ("int8", "int4"):
        assert_figure(rows[f"`--text-encoder-quant {quant}`"], fp.text_encoder_bytes(None, quant), quant)
    gguf = next(cell for label, cell in rows.items() if label.startswith("GGUF Q8_0 / Q6_K / Q4_K"))
    assert gb_cells(gguf) == [f"{fp.text_encoder_bytes(None, 'gguf:' + q) / 1e9:.2f}" for q in ("Q8_0", "Q6_K", "Q4_K")]
    vae = re.search(r"^VAE: (.+) in bf16\.$", perf, re.M).group(1)
    assert_figure(vae, fp.vae_bytes(None, "bf16"), "vae")

    table = perf.split("| profile | DiT | text encoder | offload | encoding |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` [^|]*\|[^|]+\|[^|]+\|[^|]+\| ([^|]+) \| ([^|]+) \|$", table, re.M)
    assert [name for name, _, _ in rows] == [p.name for p in fp.PROFILES]
    for profile, (name, encode, denoise) in zip(fp.PROFILES, rows):
        b = fp.profile_bytes(profile)
        for cell, phase in ((encode, "encode"), (denoise, "denoise")):
            assert_figure(cell, b[phase], (name, phase))
            assert re.search(r"\((\d+\.\d\d) GiB\)", cell).group(1) == f"{b[phase] / 2**30:.2f}", (name, phase, cell)

    formats = (root / "docs" / "formats.md").read_text()
    table = formats.split("| component | format | bytes |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (text encoder[^|]*|VAE) \| ([^|]+) \| ([^|]+) \|$", table, re.M)
    figures = {fmt.strip(): cell for component, fmt, cell in rows if component.startswith("text encoder")}
    assert_figure(figures["bf16"], fp.text_encoder_bytes(None, "none"), "formats.md bf16")
    assert gb_cells(figures["`--text-encoder-quant int8` / `int4`"]) == [
        f"{fp.text_encoder_bytes(None, q) / 1e9:.2f}" for q in ("int8", "int4")]
    checked = 0
    for fmt, cell in figures.items():
        if fmt.startswith("GGUF "):
            types = fmt.split(" (")[0].removeprefix("GGUF ").split(" / ")
            assert gb_cells(cell) == [f"{fp.text_encoder_bytes(None, 'gguf:' + q) / 1e9:.2f}" for q in types], fmt
            checked += len(types)
    assert checked >= 11, figures  # Q8_0 / Q6_K / Q4_K and the eight i-quants
    vae = next(cell for label, fmt, cell in rows if label == "VAE")
    assert_figure(vae, fp.vae_bytes(None, "bf16"), "formats.md vae")

    example = (root / "zimage_native" / "config.example.toml").read_text()
    for profile in fp.PROFILES:
        comment = example.split(f"[{profile.name}]", 1)[0].rsplit("\n\n", 1)[1]
        b = fp.profile_bytes(profile)
        gib = re.findall(r"\((\d+\.\d\d) GiB\)", comment)
        assert gib and gib[0] == f"{b['encode'] / 2**30:.2f}", (profile.name, comment)
        assert gib[-1] == f"{b['denoise'] / 2**30:.2f}", (profile.name, comment)


def test_block_scaled_bytes_follow_from_the_layer_layout():
    """nvfp4: 0.5 byte a value + 1 byte per 16 values; mxfp8: 1 byte a value + 1 byte per 32; 4 bytes of
    fp32 scale_2 a layer (mxfp8's is 1)."""
    assert fp.block_scaled_bytes("nvfp4", (96, 256)) == 96 * 128 + 96 * 16 + 4
    assert fp.block_scaled_bytes("mxfp8", (96, 256)) == 96 * 256 + 96 * 8 + 4
    with pytest.raises(ValueError, match="multiple of 32"):
        fp.block_scaled_bytes("mxfp8", (96, 48))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "IQ3_S", "IQ2_XXS", "IQ1_M"])
def test_gguf_text_encoder_bytes_equal_the_loaded_file(tiny_model_dir, tmp_path, qtype):
    """A one-type llama.cpp GGUF Qwen3 loaded in bf16 holds ``text_encoder_bytes(cfg, "gguf:TYPE")``
    (its 35-of-36-style truncation included: the last layer and the LM head are not loaded)."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from zimage_native.loading import load_component

    from .test_gguf import GGUF_QWEN3, write_qwen3

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer"))
    path, _ = write_qwen3(tmp_path / f"qwen3-{qtype}.gguf", vocab, qtype)
    model = load_component("text_encoder", path, torch.bfloat16, "cpu")
    assert weight_bytes(model) == fp.text_encoder_bytes(dict(GGUF_QWEN3, vocab_size=vocab), f"gguf:{qtype}")


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="'int8', 'int4' or 'gguf:TYPE', got 'int3'"):
        fp.text_encoder_bytes(QWEN, "int3")
    with pytest.raises(ValueError, match="multiple of 128"):
        fp.text_encoder_bytes(dict(QWEN, hidden_size=96, head_dim=24), "int4")
    with pytest.raises(ValueError, match="unknown GGML type 'Q7_K'"):
        fp.dit_bytes(TransformerConfig.from_dict(TINY_DIT), "gguf:Q7_K")


# ----------------------------------------------------------------------------------- a DiT file, layer by layer


@pytest.fixture(scope="module")
def comfy_sd(tiny_model_dir):
    from .test_comfy_quant import PREFIX
    from .test_formats import comfy_dit

    return comfy_dit(tiny_model_dir, PREFIX)


def no_weight_reads(monkeypatch) -> None:
    """Any read of a tensor's values (safetensors or GGUF) fails: the header alone must do (and a
    comfy_quant layer's config, the few bytes of JSON that say its format)."""
    from zimage_native.formats.checkpoint import Checkpoint
    from zimage_native.formats.gguf import GGUFCheckpoint

    def refuse(*args, **kwargs):
        raise AssertionError(f"a weight was read: {args[1:]}")

    raw_bytes = Checkpoint.raw_bytes
    for cls, names in ((Checkpoint, ("get", "read_rows")), (GGUFCheckpoint, ("get", "values"))):
        for name in names:
            monkeypatch.setattr(cls, name, refuse)
    monkeypatch.setattr(Checkpoint, "raw_bytes", lambda self, key: raw_bytes(self, key)
                        if key.endswith(".comfy_quant") else refuse(self, key))


def assert_file_bytes_are_the_loaded_models(path, dtype, keep_fp8, config, monkeypatch) -> dict:
    """dit_file_bytes (header only) == the resident bytes of the loaded DiT, all resident and streamed
    (what stays plus two blocks, as offload counts them); returns the header's breakdown by format."""
    from zimage_native.loading import load_component
    from zimage_native.quant_linear import resident_bytes

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    model = load_component("transformer", path, dtype, "cpu", config=config, keep_fp8=keep_fp8)
    with monkeypatch.context() as m:
        no_weight_reads(m)
        header = {offload: fp.dit_file_bytes(path, name, offload, keep_fp8 is not False, config=config)
                  for offload in ("none", "blocks")}
        formats = fp.dit_file_formats(path, name, keep_fp8 is not False, config=config)
    assert header["none"] == resident_bytes(model) == weight_bytes(model)
    resident, largest = streamed_bytes(model)
    assert header["blocks"] == resident + 2 * largest
    assert sum(e["bytes"] for e in formats.values()) == header["none"]
    return formats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keep_fp8", [True, False])
@pytest.mark.parametrize("mix", ["fp8", "fp8+int8, bf16"])
def test_a_mixed_comfy_quant_dit_files_header_gives_the_loaded_models_bytes(comfy_sd, tmp_path, monkeypatch, mix,
                                                                           keep_fp8, dtype):
    """A ComfyUI mixed-precision DiT (nvfp4 on the fused qkv and t_embedder.mlp.2, mxfp8 on attention.out and
    t_embedder.mlp.0, float8 on feed_forward.w3, int8 on w1 in the second mix, the rest fp32 or bf16): the
    bytes counted layer by layer from its header equal the loaded model's, kept packed or dequantised."""
    from .test_comfy_quant_blocks import kept_file
    from .test_formats import TINY_AXES

    path, _ = kept_file(comfy_sd, tmp_path, mix)
    formats = assert_file_bytes_are_the_loaded_models(path, dtype, keep_fp8, TINY_AXES, monkeypatch)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    n = 7 * 2 + 7 * 2 * 1  # the tiny DiT's blocks: 2 layers and 2 refiners of 1
    if keep_fp8:  # nvfp4: 3 * n / 7 q, k, v parts of the fused qkv + t_embedder.mlp.2; mxfp8: n / 7 + 1
        counts = {fmt: e["tensors"] for fmt, e in formats.items() if fmt != name}
        want = {"nvfp4": 3 * n // 7 + 1, "mxfp8": n // 7 + 1, "float8_e4m3fn": n // 7}
        assert counts == (dict(want, int8=n // 7) if "int8" in mix else want)
    else:
        assert list(formats) == [name]



@pytest.mark.parametrize("keep_fp8", [True, False])
@pytest.mark.parametrize("scaled, per_row", [(False, False), (True, False), (True, True)])
def test_an_fp8_dit_files_header_gives_the_loaded_models_bytes(comfy_sd, tmp_path, monkeypatch, scaled, per_row,
                                                               keep_fp8):
    """A plain fp8 file (every 2-D weight in float8, no scales) and a scaled-fp8 one (per tensor, per
    row): its float8 linears kept with a scale per row, its other float8 tensors dequantised."""
    from .test_formats import TINY_AXES, to_fp8, write

    sd, _ = to_fp8(comfy_sd, scaled, per_row=per_row)
    if scaled:
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = write(tmp_path / "z_image_turbo_fp8.safetensors", sd)
    formats = assert_file_bytes_are_the_loaded_models(path, torch.bfloat16, keep_fp8, TINY_AXES, monkeypatch)
    assert list(formats) == (["float8_e4m3fn", "bf16"] if keep_fp8 else ["bf16"])

def test_a_mixed_gguf_dit_files_header_gives_the_loaded_models_bytes(tmp_path, monkeypatch):
    """A Q4_K_M-like GGUF DiT (ten block types and F16 / BF16 rotating tensor by tensor): counted
    per tensor in its own type from the header, the loaded model's bytes, in bf16 and fp32."""
    pytest.importorskip("gguf")
    from .test_gguf import AXES

    mix = ("Q4_K", "Q6_K", "Q5_K", "Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_1", "Q5_0", "F16", "BF16")
    from .test_gguf import write_dit

    path, _ = write_dit(tmp_path / "mixed.gguf", lambda name, i: mix[i % len(mix)])
    for dtype in (torch.bfloat16, torch.float32):
        formats = assert_file_bytes_are_the_loaded_models(path, dtype, None, AXES, monkeypatch)
        assert len(set(formats) & set(mix)) >= 8, formats



@pytest.mark.parametrize("kind", ["comfy_quant", "gguf"])
def test_zimage_info_shows_a_mixed_dit_files_gpu_weights_layer_by_layer(comfy_sd, tiny_model_dir, tmp_path, kind):
    """``zimage info`` on a mixed comfy_quant DiT (in a component folder: its config.json gives the RoPE
    axes) and on a mixed GGUF DiT: the bytes the loaded bf16 model holds, all resident and streamed,
    kept packed and (comfy_quant only) dequantised, with the bytes of each format."""
    import json
    import shutil

    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.loading import load_component

    if kind == "gguf":
        pytest.importorskip("gguf")
        from .test_gguf import write_dit

        mix = ("Q4_K", "Q6_K", "Q8_0", "F16")
        path = write_dit(tmp_path / "mixed.gguf", lambda name, i: mix[i % len(mix)])[0]
    else:
        from .test_comfy_quant_blocks import kept_file

        path = tmp_path / "transformer"
        path.mkdir()
        kept_file(comfy_sd, tmp_path, "fp8+int8, bf16")[0].rename(path / "diffusion_pytorch_model.safetensors")
        shutil.copy(tiny_model_dir / "transformer" / "config.json", path / "config.json")
    result = CliRunner().invoke(main, ["info", str(path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["components"]["transformer"]["gpu_weights_bf16"]
    settings = {True: shown, False: shown.get("dequantised")}
    assert (settings[False] is None) == (kind == "gguf")  # (a GGUF file's packed layers always stay packed)
    for keep, entry in settings.items():
        if entry is not None:
            model = load_component("transformer", path, torch.bfloat16, "cpu", keep_fp8=keep)
            resident, largest = streamed_bytes(model)
            assert entry["resident"] == weight_bytes(model) and entry["offload_blocks"] == resident + 2 * largest
            assert sum(e["bytes"] for e in entry["formats"].values()) == entry["resident"]
    assert len(shown["formats"]) == (5 if kind == "comfy_quant" else 4), shown["formats"]
    table = CliRunner().invoke(main, ["info", str(path)], catch_exceptions=False).output
    assert "GPU weights in bf16" in table and "with --offload blocks" in table, table
    assert ("dequantised while loading (keep_fp8=False" in table) == (kind == "comfy_quant"), table
    for fmt, e in shown["formats"].items():
        assert re.search(rf"\b{fmt} {e['tensors']} (linear|tensor)s? ", table), (fmt, table)


# -------------------------------------------------------------------------------- a text encoder file, layer by layer

#: A Q4_K_M-like mix (and i1-style IQ types) rotating tensor by tensor; F32 / F16 / BF16 among them.
TE_MIX = ("Q4_K", "Q6_K", "F32", "IQ4_XS", "Q8_0", "IQ3_S", "F16", "Q5_K", "BF16", "IQ2_XXS")


def assert_te_file_bytes_are_the_loaded_models(path, monkeypatch, config=None, quants=("none", "int8", "int4"),
                                               dtypes=(torch.bfloat16, torch.float32)) -> dict:
    """text_encoder_file_bytes (header only) == the bytes of the loaded truncated Qwen3, for each
    dtype and --text-encoder-quant; returns the header's bf16 summary."""
    from zimage_native.loading import load_component
    from zimage_native.quant_linear import resident_bytes

    for dtype in dtypes:
        name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        for quant in quants:
            model = load_component("text_encoder", path, dtype, "cpu", config=config, quant=quant)
            with monkeypatch.context() as m:
                no_weight_reads(m)
                header = fp.text_encoder_file_bytes(path, name, quant, config)
            assert header == resident_bytes(model) == weight_bytes(model), (name, quant)
    with monkeypatch.context() as m:
        no_weight_reads(m)
        summary = fp.text_encoder_file_summary(path, config=config)
    assert sum(e["bytes"] for e in summary["formats"].values()) + summary["rope_table"] == summary["resident"]
    return summary


def test_a_mixed_gguf_text_encoder_files_header_gives_the_loaded_models_bytes(tiny_model_dir, tmp_path, monkeypatch):
    """A llama.cpp Qwen3 GGUF mixing block types (K and IQ) with F32 / F16 / BF16 tensor by tensor: counted
    per tensor in its own type from the header (the last layer and the LM head not loaded), the loaded
    encoder's bytes in bf16 and fp32, as stored and with --text-encoder-quant int8 / int4."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from .test_gguf import write_qwen3

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer"))
    path, _ = write_qwen3(tmp_path / "qwen3-mixed.gguf", vocab, lambda name, i: TE_MIX[i % len(TE_MIX)])
    summary = assert_te_file_bytes_are_the_loaded_models(path, monkeypatch)
    assert len(set(summary["formats"]) & set(TE_MIX)) >= 6, summary["formats"]
    assert set(summary["text_encoder_quant"]) == {"int8", "int4"}
    # (only the F32 / F16 / BF16 linears and embedding are quantised: the packed ones stay packed)
    assert summary["text_encoder_quant"]["int4"] < summary["text_encoder_quant"]["int8"] < summary["resident"]


@pytest.mark.parametrize("stored", ["fp32", "bf16", "fp8", "scaled-fp8", "all-in-one"])
def test_a_safetensors_text_encoder_files_header_gives_the_loaded_models_bytes(tiny_model_dir, tmp_path, monkeypatch,
                                                                              stored):
    """A ``qwen_3_4b.safetensors``-style file (with its tied LM head) in fp32, bf16, float8 (dequantised
    while loading) or inside an all-in-one file: the header's count is the loaded encoder's bytes."""
    from .test_formats import comfy_dit, ldm_vae, prefixed_te, to_fp8, write

    sd = prefixed_te(tiny_model_dir)
    if stored == "bf16":
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    elif stored in ("fp8", "scaled-fp8"):
        sd, _ = to_fp8(sd, stored == "scaled-fp8")
    elif stored == "all-in-one":
        sd = {**comfy_dit(tiny_model_dir), **ldm_vae(tiny_model_dir, "vae."),
              **{"text_encoders.qwen3_4b.transformer." + k: v for k, v in sd.items()}}
    path = write(tmp_path / "qwen_3_4b.safetensors", sd)
    config = {"max_position_embeddings": 2048}
    summary = assert_te_file_bytes_are_the_loaded_models(path, monkeypatch, config, quants=("none", "int8"))
    assert list(summary["formats"]) == ["bf16"]  # nothing stays packed: float8 is dequantised while loading
    assert list(summary["text_encoder_quant"]) == ["int8"]  # the tiny widths are not whole int4 groups


def test_zimage_info_shows_a_text_encoder_files_gpu_weights(tiny_model_dir, tmp_path):
    """``zimage info`` on a mixed GGUF Qwen3: the bytes the loaded bf16 encoder holds, by format, and with
    --text-encoder-quant int8 / int4, in JSON and in the table."""
    import json

    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from zimage_native.cli import main
    from zimage_native.loading import load_component

    pytest.importorskip("gguf")
    from .test_gguf import write_qwen3

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer"))
    path, _ = write_qwen3(tmp_path / "qwen3-mixed.gguf", vocab, lambda name, i: TE_MIX[i % len(TE_MIX)])
    result = CliRunner().invoke(main, ["info", str(path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["components"]["text_encoder"]["gpu_weights_bf16"]
    assert shown["resident"] == weight_bytes(load_component("text_encoder", path, torch.bfloat16, "cpu"))
    for quant, size in shown["text_encoder_quant"].items():
        assert size == weight_bytes(load_component("text_encoder", path, torch.bfloat16, "cpu", quant=quant))
    table = CliRunner().invoke(main, ["info", str(path)], catch_exceptions=False).output
    assert f"GPU weights in bf16 (the layers loaded; each in the format it is kept in; activations come on top): " \
           f"{format_bytes(shown['resident'])}" in table, table
    for quant, size in shown["text_encoder_quant"].items():
        assert f"{format_bytes(size)} with --text-encoder-quant {quant}" in table, table
    for fmt, e in shown["formats"].items():
        assert re.search(rf"\b{fmt} {e['tensors']} (weight|tensor)s? ", table), (fmt, table)


#: A size as `zimage info` prints it, and the bytes of its unit.
PRINTED_SIZE = re.compile(r"(?<![\w.])([\d,]+(?:\.\d+)?) (bytes|KB|MB|GB)\b")
UNIT = {"bytes": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def printed_sizes(table: str) -> list[tuple[float, float]]:
    """Every size in ``table``: (its value in bytes, half of the unit of its last digit)."""
    out = []
    for number, unit in PRINTED_SIZE.findall(table):
        decimals = len(number.split(".")[1]) if "." in number else 0
        out.append((float(number.replace(",", "")) * UNIT[unit], 0.5 * 10**-decimals * UNIT[unit]))
    return out


def byte_counts(entry) -> list[int]:
    """The byte counts of a GPU weight entry of ``zimage info --json`` (all its numbers but tensor counts)."""
    if isinstance(entry, dict):
        return [n for k, v in entry.items() if k != "tensors" for n in byte_counts(v)]
    if isinstance(entry, list):
        return [n for e in entry for n in byte_counts(e)]
    return [entry] if isinstance(entry, int) else []


@pytest.mark.parametrize("where", ["", "transformer", "text_encoder", "vae"])
def test_zimage_info_prints_each_size_in_a_unit_that_shows_it(tiny_model_dir, where):
    """`zimage info` on the tiny model printed its small figures as '0.0 MB' (the text encoder's RoPE
    table: 48 bytes) and others with one digit ('0.1 MB' for 122 kB): each byte count of the JSON is
    printed in a unit that shows it, to within the rounding of its last digit and 5%."""
    import json

    from click.testing import CliRunner

    from zimage_native.cli import main

    path = str(tiny_model_dir / where) if where else str(tiny_model_dir)
    report = json.loads(CliRunner().invoke(main, ["info", path, "--json"], catch_exceptions=False).output)
    table = CliRunner().invoke(main, ["info", path], catch_exceptions=False).output
    weights = [report["gpu_weights_bf16"]] if not where else [c["gpu_weights_bf16"] for c in
                                                               report["components"].values()]
    counts, sizes = byte_counts(weights), printed_sizes(table)
    assert counts and sizes, (report, table)
    for n in counts:
        assert any(abs(value - n) <= half and abs(value - n) <= 0.05 * n for value, half in sizes), (n, table)


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.float16, "float16")])
def test_zimage_info_dtype_gives_the_figures_of_that_dtype(tiny_model_dir, dtype, name):
    """`zimage info` counted every figure in bf16, with no way to ask for another dtype (fp32 is what
    `zimage generate` loads on the CPU): --dtype gives the loaded model's bytes in that dtype, for a
    model folder's peaks and for a DiT / text encoder / VAE component, under the dtype's name."""
    import json

    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.devices import format_bytes
    from zimage_native.loading import folder_weight_bytes, load_component

    short = {torch.float32: "fp32", torch.float16: "fp16"}[dtype]

    def shown(*args):
        result = CliRunner().invoke(main, ["info", *map(str, args), "--dtype", name], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    peaks = json.loads(shown(tiny_model_dir, "--json"))[f"gpu_weights_{short}"]
    assert peaks["everything resident"] == sum(folder_weight_bytes(tiny_model_dir, [], dtype).values())
    assert f"GPU weights at the peak in {short}" in shown(tiny_model_dir)
    for component in ("transformer", "text_encoder"):
        entry = json.loads(shown(tiny_model_dir / component, "--json"))["components"][component][f"gpu_weights_{short}"]
        assert entry["resident"] == weight_bytes(load_component(component, tiny_model_dir / component, dtype, "cpu"))
        assert list(entry["formats"]) == [short]
        assert f"GPU weights in {short}" in shown(tiny_model_dir / component)
    # A VAE, as a component folder or its file: --dtype was ignored there (no figure at all).
    want = weight_bytes(load_component("vae", tiny_model_dir / "vae", dtype, "cpu"))
    for where in (tiny_model_dir / "vae", tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"):
        entry = json.loads(shown(where, "--json"))["components"]["vae"]
        assert entry[f"gpu_weights_{short}"] == {"resident": want} and "gpu_weights_bf16" not in entry
        assert f"GPU weights in {short} (activations come on top): {format_bytes(want)}" in shown(where)


def test_zimage_info_dtype_is_refused_where_no_weight_figure_is_shown(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from .test_cli_errors import one_line_error

    assert one_line_error("info", str(tiny_model_dir), "--check", "--dtype", "fp32") == (
        "Error: --dtype sets the dtype of the weight figures, which --check does not show; leave it out")
    # a LoRA or a ControlNet shows none: --dtype was taken and changed nothing
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.layers.0.attention.to_k.lora_A.weight": torch.zeros(2, 32),
               "transformer.layers.0.attention.to_k.lora_B.weight": torch.zeros(32, 2)}, str(lora))
    from .test_controlnet_loading import control_state_dict, write

    controlnet = write(tmp_path, "cn.safetensors", control_state_dict("1.0"))
    for path, what in ((lora, "a LoRA"), (controlnet, "a ControlNet")):
        assert one_line_error("info", str(path), "--dtype", "fp32") == (
            f"Error: --dtype sets the dtype of the weight figures, which {what} does not show (a model folder, "
            f"a DiT, a text encoder or a VAE does); leave it out")
