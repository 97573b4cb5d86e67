"""Weight-only int8 / int4 text encoder (``--text-encoder-quant``): the quantised linears against
their dequantised weights, the rounding bounds, the bytes, and the caption features of a tiny
Qwen3 against fp32 and bf16."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zimage_native.quantize import (Int4Linear, Int8Embedding, Int8Linear, int4_groups, quantize_text_encoder,
                                    weight_bytes)
from zimage_native.testing import randomize_

from .fresh_process import run_fresh

# K multiple of 128 so that int4 uses its real group size.
QWEN = dict(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512,
            tie_word_embeddings=True)


def tiny_qwen3(dtype=torch.float32):
    from transformers import Qwen3Config

    from zimage_native.text_encoder import build_truncated_qwen3

    model, _, _ = build_truncated_qwen3(Qwen3Config(**QWEN))
    model = model.to_empty(device="cpu")
    with torch.device("cpu"):
        model.rotary_emb = type(model.rotary_emb)(config=model.config)
    return randomize_(model, 7).to(dtype).eval()


def features(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).last_hidden_state.float()


def test_int8_rows_round_within_half_a_step_and_forward_matches_dequantised():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=True)
    q = Int8Linear.from_linear(lin)
    w = q.dequantize()
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (24,)
    assert ((w - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    assert q.qweight.abs().amax(dim=1).eq(127).all()  # the row's largest weight uses the full range
    x = torch.randn(5, 64)
    ref = F.linear(x, w, lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-6)


def test_int8_linear_in_float16_does_not_overflow():
    """x Q^T is the output divided by the row scale (up to 127 / amax larger): in float16 (the
    text encoder on a GPU without bf16) it overflows where the output itself is small."""
    torch.manual_seed(3)
    lin = nn.Linear(256, 4, bias=False)
    with torch.no_grad():
        lin.weight.uniform_(0.0, 0.01)
        lin.weight[:, 0] = 0.01
    q = Int8Linear.from_linear(lin)
    x = torch.full((2, 256), 30.0).half()
    x[1] = -x[1]
    ref = F.linear(x.float(), q.dequantize())  # about 40 in magnitude: representable in float16
    assert ref.abs().max() < 100 and (x.float() @ q.qweight.float().T).abs().max() > 65504
    y = q(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_int4_codes_pack_two_per_byte_and_round_within_half_a_step():
    torch.manual_seed(1)
    lin = nn.Linear(256, 8, bias=False)
    q = Int4Linear.from_linear(lin, group_size=128)
    assert q.packed.shape == (8, 128) and q.packed.dtype == torch.uint8 and q.scale.shape == (8, 2)
    w = q.dequantize()
    step = q.scale.repeat_interleave(128, dim=1)
    assert ((w - lin.weight).abs() <= step / 2 + 1e-6).all()
    # Each group's extremes are representable: code 0 is the minimum, code 15 the maximum.
    groups = lin.weight.detach().reshape(8, 2, 128)
    torch.testing.assert_close(w.reshape(8, 2, 128).amin(dim=2), groups.amin(dim=2), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.reshape(8, 2, 128).amax(dim=2), groups.amax(dim=2), rtol=0, atol=1e-5)
    x = torch.randn(3, 256)
    torch.testing.assert_close(q(x), F.linear(x, w), rtol=1e-5, atol=1e-6)


def test_int4_nibble_order_is_even_column_low():
    w = torch.arange(16, dtype=torch.float32).repeat(2, 2)  # (2, 32): codes 0..15 twice per row
    q = Int4Linear(*int4_groups(w, 32, torch.float32))
    assert q.packed[0, 0].item() == 0 | (1 << 4) and q.packed[0, 7].item() == 14 | (15 << 4)
    torch.testing.assert_close(q.dequantize(), w)


def test_int4_rejects_a_width_that_is_not_a_multiple_of_the_group():
    with pytest.raises(ValueError, match=r"input features \(96\).*group size \(128"):
        Int4Linear.from_linear(nn.Linear(96, 4))


def test_int8_embedding_looks_up_dequantised_rows():
    torch.manual_seed(2)
    emb = nn.Embedding(50, 16)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[3, 49, 0, 3]])
    full = q.qweight.float() * q.scale[:, None]
    torch.testing.assert_close(q(ids), full[ids])
    assert ((full - emb.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_encoder_equals_the_encoder_built_from_its_dequantised_weights(mode):
    model = tiny_qwen3()
    quant = quantize_text_encoder(copy.deepcopy(model), mode)
    # Put the dequantised weights back into a plain model: the forward of the quantised modules
    # must then give the same features (only the weights were rounded).
    plain = copy.deepcopy(model)
    qmods = dict(quant.named_modules())
    for name, module in plain.named_modules():
        if isinstance(module, nn.Linear):
            module.weight.data = qmods[name].dequantize()
        elif isinstance(module, nn.Embedding):
            module.weight.data = qmods[name].qweight.float() * qmods[name].scale[:, None]
    ids = torch.randint(0, QWEN["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    a, b = features(quant, ids), features(plain, ids)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    kinds = {type(m).__name__ for m in quant.modules()}
    assert "Linear" not in kinds and "Embedding" not in kinds


def test_quantised_bytes_and_embedding_error_against_fp32_and_bf16():
    """The measurement in docs/performance.md: bytes and caption-feature error of a tiny Qwen3."""
    fp32 = tiny_qwen3()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = torch.randint(0, QWEN["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(1))
    ref = features(fp32, ids)
    linears = [m for m in fp32.modules() if isinstance(m, nn.Linear)]
    lin_params = sum(m.weight.numel() for m in linears)
    rows = sum(m.out_features for m in linears)
    vocab, hidden = QWEN["vocab_size"], QWEN["hidden_size"]
    other = weight_bytes(bf16) - 2 * (lin_params + vocab * hidden)  # norms and the RoPE table
    expected = {
        "bf16": weight_bytes(bf16),
        "int8": lin_params + 4 * rows + vocab * hidden + 4 * vocab + other,
        "int4": lin_params // 2 + 2 * 2 * (lin_params // 128) + vocab * hidden + 4 * vocab + other,
    }
    # Per-token cosine against fp32, (min, mean). Measured: bf16 0.9998/0.9999, int8 0.9991/0.9996,
    # int4 0.906/0.953 (a random 3-layer model compounds the int4 rounding more than a trained one).
    bounds = {"bf16": (0.9995, 0.9998), "int8": (0.998, 0.999), "int4": (0.85, 0.93)}
    for mode in ("bf16", "int8", "int4"):
        model = bf16 if mode == "bf16" else quantize_text_encoder(copy.deepcopy(bf16), mode)
        assert weight_bytes(model) == expected[mode], mode
        out = features(model, ids)
        cos = F.cosine_similarity(out.flatten(0, 1), ref.flatten(0, 1), dim=1)
        assert cos.min() >= bounds[mode][0] and cos.mean() >= bounds[mode][1], (mode, cos.min(), cos.mean())
    assert expected["int8"] < 0.55 * expected["bf16"] and expected["int4"] < 0.35 * expected["bf16"]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="one of .*'int8'.*got 'int3'"):
        quantize_text_encoder(nn.Linear(2, 2), "int3")


def test_load_qwen3_encoder_quantises_while_loading(tmp_path):
    from transformers import Qwen3Config, Qwen3Model

    from zimage_native.text_encoder import TextEncoder, load_qwen3_encoder

    randomize_(Qwen3Model(Qwen3Config(**QWEN)), 3).save_pretrained(tmp_path)
    plain = load_qwen3_encoder(tmp_path, torch.float32, "cpu")
    quant = load_qwen3_encoder(tmp_path, torch.float32, "cpu", quant="int8")
    assert isinstance(quant.layers[0].mlp.down_proj, Int8Linear) and isinstance(quant.embed_tokens, Int8Embedding)
    assert len(quant.layers) == QWEN["num_hidden_layers"] - 1
    ids = torch.randint(0, QWEN["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(4))
    want = features(quantize_text_encoder(plain, "int8"), ids)
    torch.testing.assert_close(features(quant, ids), want, rtol=0, atol=0)
    te = TextEncoder(quant, tokenizer=None)
    assert te.dtype == torch.float32 and te.device == torch.device("cpu")


def test_embedding_error_against_bf16():
    """The numbers in docs/performance.md: caption features of the int8 / int4 encoder against the
    bf16 one (the unquantised setting on a GPU). Measured on this tiny random Qwen3 (features of
    std 1.25, largest magnitude 4.97): int8 per-token cosine min 0.9989 / mean 0.9996, max abs
    difference 0.24; int4 0.904 / 0.952, max abs 1.40. Bytes: int8 0.514x, int4 0.289x of bf16
    here (the embedding table, kept in int8 by both, weighs more in a tiny model)."""
    bf16 = tiny_qwen3().to(torch.bfloat16)
    ids = torch.randint(0, QWEN["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(1))
    ref = features(bf16, ids)
    bounds = {"int8": (0.998, 0.9993, 0.3, 0.52), "int4": (0.88, 0.94, 1.8, 0.30)}
    for mode, (cos_min, cos_mean, max_abs, size) in bounds.items():
        model = quantize_text_encoder(copy.deepcopy(bf16), mode)
        out = features(model, ids)
        cos = F.cosine_similarity(out.flatten(0, 1), ref.flatten(0, 1), dim=1)
        err = (out - ref).abs().max().item()
        assert cos.min() >= cos_min and cos.mean() >= cos_mean and err <= max_abs, (mode, cos.min(), cos.mean(), err)
        assert weight_bytes(model) <= size * weight_bytes(bf16), mode


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_chunked_quantisation_gives_the_same_codes(monkeypatch, mode):
    """Rows are quantised in chunks (small fp32 temporaries on the quantising device); each row's
    codes depend on that row alone, so chunks of 3 rows give the codes of one pass, bit for bit."""
    import zimage_native.quantize as q

    weight = torch.randn(10, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    run = (lambda: q.int8_rows(weight)) if mode == "int8" else (lambda: q.int4_groups(weight, 128, torch.bfloat16))
    whole = run()
    monkeypatch.setattr(q, "CHUNK_ROWS", 3)
    chunked = run()
    assert len(chunked) == len(whole) and all(torch.equal(a, b) for a, b in zip(chunked, whole))
    empty = weight[:0]  # no rows: empty codes and scales, as one pass gives
    assert [t.shape[0] for t in (q.int8_rows(empty) if mode == "int8" else q.int4_groups(empty, 128, torch.bfloat16))] \
        == [0] * len(whole)


def save_qwen3(folder, dtype):
    from transformers import Qwen3Config, Qwen3Model

    model = randomize_(Qwen3Model(Qwen3Config(**QWEN)), 3).to(dtype)
    model.save_pretrained(folder)
    del model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_a_quantised_encoder_never_holds_a_weight_in_the_load_dtype(tmp_path, monkeypatch, mode):
    """A bf16 file loaded in fp32 (the CPU's default dtype) and quantised: each weight is read as
    stored and quantised by chunks of rows, each chunk cast on its own, so no weight is ever whole in
    fp32 and at most one read weight is alive (the loader used to read the whole encoder in the load
    dtype before quantising it: 6.9 GB at the peak for a 1.5 GB int8 result in a real-width
    measurement, 15.7 GB for Qwen3-4B)."""
    import gc

    import zimage_native.quantize as q
    from zimage_native.text_encoder import load_qwen3_encoder

    save_qwen3(tmp_path, torch.bfloat16)
    gc.collect()
    monkeypatch.setattr(q, "CHUNK_ROWS", 32)  # every weight of the tiny model has more rows than this
    name = "_int8_rows" if mode == "int8" else "_int4_groups"
    quantise, chunks, whole = getattr(q, name), [], []
    # The tensors of other tests, held for this one so that their ids and storages are not reused.
    before = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    old = {id(o) for o in before}

    def watched(chunk, *args):
        chunks.append((chunk.shape[0], chunk.dtype))
        if len(chunks) % 4 == 1:  # (gc.get_objects is slow) the storages of whole weights alive, in any dtype
            gc.collect()
            whole.append(len({(o.dtype, o.untyped_storage().data_ptr()) for o in gc.get_objects()
                              if isinstance(o, torch.Tensor) and id(o) not in old and o.dtype.is_floating_point
                              and o.dim() == 2 and o.shape[0] > 32 and o.shape[1] >= 64}))
        return quantise(chunk, *args)

    monkeypatch.setattr(q, name, watched)
    model = load_qwen3_encoder(tmp_path, torch.float32, "cpu", quant=mode)
    assert chunks and all(rows <= 32 and dtype == torch.float32 for rows, dtype in chunks), chunks
    assert len(whole) > 10 and max(whole) <= 1, whole  # the weight being quantised, as read (bf16)
    assert (mode == "int4") == isinstance(model.layers[0].mlp.up_proj, Int4Linear)
    assert model.layers[0].input_layernorm.weight.dtype == torch.float32


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("stored, dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.bfloat16)])
def test_quantised_while_loading_equals_quantising_the_loaded_encoder(tmp_path, mode, stored, dtype):
    """Quantising by chunks of rows cast on their own gives the codes of the weights cast whole."""
    from zimage_native.text_encoder import load_qwen3_encoder

    save_qwen3(tmp_path, stored)
    want = quantize_text_encoder(load_qwen3_encoder(tmp_path, dtype, "cpu"), mode)
    got = load_qwen3_encoder(tmp_path, dtype, "cpu", quant=mode)
    want_state, got_state = want.state_dict(), got.state_dict()
    assert want_state.keys() == got_state.keys()
    for key, t in want_state.items():
        assert got_state[key].dtype == t.dtype and torch.equal(got_state[key], t), key
    assert got.embed_tokens.dtype == want.embed_tokens.dtype == dtype


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_a_quantised_encoder_does_not_keep_its_file_mapped(tmp_path):
    """The norms of a quantised encoder read in the file's dtype were views of the file mapped by
    safetensors: the whole file stayed mapped (and its pages counted in the process's memory) as
    long as the encoder lived. They are copies now."""
    import gc

    from zimage_native.text_encoder import load_qwen3_encoder

    save_qwen3(tmp_path, torch.float32)
    model = load_qwen3_encoder(tmp_path, torch.float32, "cpu", quant="int8")
    gc.collect()
    assert str(tmp_path) not in Path("/proc/self/maps").read_text()
    assert model.layers[0].input_layernorm.weight.dtype == torch.float32


_MAPPED_QUANT_SCRIPT = """
import sys, torch
import zimage_native.quantize as q
from pathlib import Path
from zimage_native.loading import load_component
from zimage_native.text_encoder import load_qwen3_encoder

q.CHUNK_ROWS = 256  # small chunk temporaries (10 MiB of fp32 at most), so that the file's pages show
how, warm, big = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
load = {"folder": lambda p: load_qwen3_encoder(p, torch.bfloat16, "cpu", "int8"),
        "file": lambda p: load_component("text_encoder", p / "model.safetensors", torch.bfloat16, "cpu",
                                         config={"max_position_embeddings": 2048}, quant="int8")}[how]
load(warm)  # imports, first allocations
start = reset_peak()
model = load(big)
print(status("VmHWM") - start, sum(t.nbytes for t in model.state_dict().values()))
"""


def wide_qwen3_layer() -> dict[str, torch.Tensor]:
    """The linear weights of one Qwen3-4B layer (random, bf16: 200 MB)."""
    hidden, mlp, heads, kv, head = 2560, 9728, 32, 8, 128
    g = torch.Generator().manual_seed(1)
    shapes = {"self_attn.q_proj.weight": (heads * head, hidden), "self_attn.k_proj.weight": (kv * head, hidden),
              "self_attn.v_proj.weight": (kv * head, hidden), "self_attn.o_proj.weight": (hidden, heads * head),
              "mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
              "mlp.down_proj.weight": (hidden, mlp)}
    return {k: (torch.randn(*shape, generator=g) * 0.02).bfloat16() for k, shape in shapes.items()}


def save_wide_qwen3(folder: Path, layers: int, vocab: int, layer: dict[str, torch.Tensor]) -> Path:
    """A Qwen3 of the released widths (hidden 2560, MLP 9728, 32 / 8 heads of 128) with ``layers``
    layers and ``vocab`` tokens, bf16, as a transformers folder (random weights, written directly).
    Every layer holds a copy of the linear weights ``layer`` (:func:`wide_qwen3_layer`: drawing
    200 MB of random values per layer took seconds; the peak tests measure bytes, not values)."""
    import json

    from safetensors.torch import save_file

    hidden, mlp, heads, kv, head = 2560, 9728, 32, 8, 128
    g = torch.Generator().manual_seed(0)
    state = {"embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
             "norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        state.update({f"layers.{i}.{k}": v.clone() for k, v in layer.items()})
        state.update({f"layers.{i}.{k}": torch.ones(n, dtype=torch.bfloat16) for k, n in {
            "self_attn.q_norm.weight": head, "self_attn.k_norm.weight": head, "input_layernorm.weight": hidden,
            "post_attention_layernorm.weight": hidden}.items()})
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen3Model"], model_type="qwen3", hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head, intermediate_size=mlp, hidden_act="silu",
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=2048, vocab_size=vocab, tie_word_embeddings=True,
        attention_bias=False)))
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
def test_a_text_encoder_quantised_while_loading_is_read_by_rows_not_through_the_memory_map(tmp_path):
    """A bf16 text encoder quantised to int8 while loading (a transformers folder, or a single file)
    read its weights through the file's memory map, whose every page read stayed resident beside
    the result until the file was done: at real width (Qwen3-4B's layers; 3 layers, 2 loaded, in a
    650 MB file) 744 MiB at the peak for a 213 MiB int8 model (413 MiB now), the file 750 MiB (464).
    The weights are read from the file by the chunks of rows that are quantised now
    (Checkpoint.read_rows), bit for bit the same codes. Here (1 layer loaded, 198 MiB of weights
    read, chunks of 256 rows) the peak stays under the model and a quarter of what is read
    (measured: folder 111 to 121 MiB, file 111 to 123 MiB, against a bound of 148 MiB; through the
    map: 309 and 310 MiB)."""

    from zimage_native.formats.checkpoint import read_header

    layer = wide_qwen3_layer()
    save_wide_qwen3(tmp_path / "warm", 2, 256, layer)
    save_wide_qwen3(tmp_path / "big", 2, 1024, layer)
    del layer
    tensors, _ = read_header(tmp_path / "big" / "model.safetensors")
    read = sum(t.offsets[1] - t.offsets[0] for k, t in tensors.items() if k.startswith(("layers.0.", "embed_tokens.")))
    for how in ("folder", "file"):
        peak, held = map(int, run_fresh(_MAPPED_QUANT_SCRIPT, how, tmp_path / "warm", tmp_path / "big").split())
        assert peak < held + read // 4, f"{how}: peak {peak / 2**20:.0f} MiB above the start, bound " \
                                        f"{(held + read // 4) / 2**20:.0f} MiB (the model holds {held / 2**20:.0f} MiB)"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("stored, dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_a_text_encoder_file_quantised_while_loading_equals_quantising_it_loaded(tmp_path, mode, stored, dtype):
    """A single text encoder file quantised while loading (its weights read by rows from the file)
    gives the codes of the encoder loaded, then quantised."""
    from zimage_native.loading import load_component

    save_qwen3(tmp_path, stored)
    path = tmp_path / "model.safetensors"
    config = {"max_position_embeddings": 512}
    want = quantize_text_encoder(load_component("text_encoder", path, dtype, "cpu", config=config), mode)
    got = load_component("text_encoder", path, dtype, "cpu", config=config, quant=mode)
    want_state, got_state = want.state_dict(), got.state_dict()
    assert want_state.keys() == got_state.keys()
    for key, t in want_state.items():
        assert got_state[key].dtype == t.dtype and torch.equal(got_state[key], t), key
