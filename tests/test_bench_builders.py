"""The benchmark's random-weight builders in each stored format (zimage_native/bench.py): what they
hold equals what zimage_native.footprint computes for the same format, the packed blocks dequantise
to finite small values, and a profile's pipeline has the profile's placement and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zimage_native import bench
from zimage_native import footprint as fp
from zimage_native.formats.ggml import dequantize, row_bytes
from zimage_native.quant_linear import GGUFEmbedding, GGUFLinear
from zimage_native.quantize import Int8Embedding, Int8Linear, weight_bytes
from zimage_native.testing import build_tokenizer


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return (*bench.model_configs(len(tokenizer), tiny=True), tokenizer)


@pytest.mark.parametrize("qtype", sorted(bench.GGML_SCALES))
def test_random_ggml_blocks_are_finite_small_and_seeded(qtype):
    packed = torch.empty(8, row_bytes(qtype, 512), dtype=torch.uint8)
    w = dequantize(bench.random_ggml_(packed, qtype, seed=5), qtype)
    assert torch.isfinite(w).all() and 0 < w.abs().max() < 0.1 and w.std() > 1e-3
    again = bench.random_ggml_(torch.empty_like(packed), qtype, seed=5)
    assert torch.equal(again, packed) and not torch.equal(bench.random_ggml_(again, qtype, seed=6), packed)


@pytest.mark.parametrize("weights", ["bf16", "gguf:Q8_0", "gguf:Q6_K", "gguf:Q4_K"])
def test_random_dit_holds_the_bytes_footprint_computes(configs, weights):
    tcfg = configs[0]
    dit = bench.random_dit(tcfg, "cpu", torch.bfloat16, weights)
    assert weight_bytes(dit) == fp.dit_bytes(tcfg, weights)
    packed = [m for m in dit.modules() if isinstance(m, GGUFLinear)]
    assert bool(packed) == weights.startswith("gguf:")
    assert all(m.qtype == weights.split(":")[-1] for m in packed)
    x = torch.randn(4, tcfg.dim, dtype=torch.bfloat16)
    for m in packed:
        if m.in_features == tcfg.dim:
            assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("quant", ["none", "int8", "gguf:Q8_0"])
def test_random_text_encoder_holds_the_bytes_footprint_computes(configs, quant):
    from zimage_native.text_encoder import TextEncoder

    _, _, qcfg, tokenizer = configs
    model = bench.random_text_encoder(qcfg, "cpu", torch.bfloat16, quant)
    assert weight_bytes(model) == fp.text_encoder_bytes(qcfg.to_dict(), quant)
    kinds = {type(m) for m in model.modules()}
    assert (Int8Linear in kinds and Int8Embedding in kinds) == (quant == "int8")
    assert (GGUFLinear in kinds and GGUFEmbedding in kinds) == quant.startswith("gguf:")
    # The RoPE table is computed (as the loader does), not left as uninitialised memory.
    fresh = type(model.rotary_emb)(config=model.config)
    assert torch.equal(model.rotary_emb.inv_freq, fresh.inv_freq)
    features = TextEncoder(model, tokenizer).encode(["a lighthouse at dusk"])[0]
    assert features.shape[-1] == qcfg.hidden_size and torch.isfinite(features).all()


def test_profile_pipelines_take_the_profiles_placement_and_run(configs):
    from zimage_native.text_encoder import TextEncoder

    _, _, qcfg, tokenizer = configs
    shared = TextEncoder(bench.random_text_encoder(qcfg, "cpu", torch.bfloat16, "int8"), tokenizer)
    vae = None
    for profile in fp.PROFILES:
        pipe = bench.profile_pipeline(profile, "cpu", torch.bfloat16, tiny=True, text_encoder=shared, vae=vae)
        vae = pipe.vae
        assert pipe.text_encoder is shared and pipe.offload == profile.offload
        assert (pipe.vae_tiling is not None) == profile.tiled_vae
        assert (getattr(pipe.transformer, "block_streamer", None) is not None) == (profile.offload == "blocks")
        assert weight_bytes(pipe.transformer) == fp.dit_bytes(pipe.transformer_config, profile.dit)
        out = pipe("a lighthouse", width=32, height=32, num_inference_steps=2, seed=0, output_type="np",
                   progress=False)
        assert out.images.shape == (1, 32, 32, 3)


def test_unknown_weight_format_is_refused(configs):
    with pytest.raises(ValueError, match="unknown GGML block type"):
        bench.random_dit(configs[0], "cpu", torch.bfloat16, "gguf:TQ1_0")


def test_each_builder_call_writes_its_tokenizer_to_a_folder_of_its_own_and_removes_it(tmp_path, monkeypatch):
    """build_random_pipeline and profile_pipeline wrote their tokenizer to one fixed
    $TMPDIR/zimage-bench-tokenizer: two benchmark runs at once rewrote each other's files there, and
    the folder stayed. Each call now has a temporary folder of its own, removed once the tokenizer is
    read, and the pipeline runs without it."""
    import zimage_native.testing as testing

    real, folders = testing.build_tokenizer, []

    def recording(folder):
        folders.append(Path(folder))
        return real(folder)

    monkeypatch.setattr(testing, "build_tokenizer", recording)
    pipe, _ = bench.build_random_pipeline(torch.device("cpu"), torch.float32, tiny=True, workdir=tmp_path)
    other = bench.profile_pipeline(fp.PROFILES[0], "cpu", torch.bfloat16, tiny=True, workdir=tmp_path)
    assert len(folders) == 2 and folders[0] != folders[1], folders
    assert all(f.parent == tmp_path for f in folders), folders
    assert list(tmp_path.iterdir()) == []  # removed
    for p in (pipe, other):
        out = p("a lighthouse", width=32, height=32, num_inference_steps=1, seed=0, output_type="np", progress=False)
        assert out.images.shape == (1, 32, 32, 3)
