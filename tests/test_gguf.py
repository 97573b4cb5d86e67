"""GGUF: bit-exact dequantisation, DiTs and Qwen3 text encoders kept packed, LoRA side paths, errors.

Every file is written here with ``gguf.GGUFWriter`` (tests/gguf_files.py); the reference models are
built from the ``gguf`` package's own dequantisation of the same bytes.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from zimage_native.config import TransformerConfig  # noqa: E402
from zimage_native.converters.keymap import DIT_COMFYUI, from_canonical, to_canonical  # noqa: E402
from zimage_native.formats import UnsupportedFormatError, describe, detect_format  # noqa: E402
from zimage_native.formats.ggml import GGML_TYPES, QUANT_TYPES, dequantize, row_bytes  # noqa: E402
from zimage_native.loading import assign_state_dict, build_on_meta, load_component  # noqa: E402
from zimage_native.model.transformer import ZImageTransformer  # noqa: E402
from zimage_native.quant_linear import GGUFLinear, quantized_bytes, resident_bytes  # noqa: E402

from .gguf_files import ALL_TYPES, BLOCK_TYPES, SCALE_FIELDS, gguf_state, random_blocks, write_gguf  # noqa: E402
from .test_formats import dit_output  # noqa: E402
from .fresh_process import run_fresh  # noqa: E402
from .utils import assert_rel  # noqa: E402

# Rows (input features) that are whole 256-value blocks everywhere except the patch embedder (64):
# dim 768 gives an FFN width of 2048 and an adaLN width of 256; head_dim 128 is the released one.
GGUF_DIT = dict(dim=768, n_heads=6, n_kv_heads=6, n_layers=1, n_refiner_layers=1, cap_feat_dim=256,
                axes_dims=(32, 48, 48))


#: llama.cpp's i-quants with codebook grids (mradermacher's i1 Qwen3-4B builds: IQ3_S, IQ2_M, IQ1_M, ...).
GRID_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")


# ----------------------------------------------------------------------------------- dequantisation


@pytest.mark.parametrize("qtype", sorted({n for n, _, _ in GGML_TYPES.values()} | set(GRID_TYPES)))
def test_dequantisation_is_bit_exact_against_the_gguf_package(qtype):
    rng = np.random.default_rng(sum(map(ord, qtype)))
    q = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[q]
    assert row_bytes(qtype, 512) == 512 // block * size
    rows, cols = 12, 768
    if qtype == "F32":
        raw = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    elif qtype == "F16":
        raw = rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    elif qtype == "BF16":
        raw = rng.integers(0, 2**16, size=(rows, cols), dtype=np.uint16).view(np.uint8)  # every bit pattern
    else:
        raw = random_blocks(qtype, rows, cols, rng, magnitude=False)  # any finite fp16 scale
    expected = np.asarray(gguf.quants.dequantize(raw, q), dtype=np.float32).reshape(rows, cols)
    ours = dequantize(torch.from_numpy(raw.copy()), qtype)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (rows, cols)
    assert np.array_equal(ours.numpy().view(np.uint32), expected.view(np.uint32)), qtype
    # Rows sliced out of a tensor (the fused qkv split) dequantise to the same rows.
    part = dequantize(torch.from_numpy(raw[4:8].copy()), qtype)
    assert torch.equal(part.view(torch.int32), ours[4:8].view(torch.int32))
    assert dequantize(torch.from_numpy(raw.copy()), qtype, torch.bfloat16).dtype == torch.bfloat16


def test_dequantisation_copies_nothing_from_the_host(monkeypatch):
    """Only ops on the packed tensor (scalar shifts and masks): no tensor is built from host data, so
    on a GPU there is no host-to-device copy per forward and the ops can be captured in a CUDA graph.
    The IQ1-IQ3 codebook grids come from the gguf package: the first dequantisation on a device copies
    them there (a CUDA graph captures after a warm-up run), every later one copies nothing."""
    rng = np.random.default_rng(0)
    raws = {q: torch.from_numpy(random_blocks(q, 2, 256, rng)) for q in BLOCK_TYPES}
    assert set(GRID_TYPES) <= set(raws)
    for qtype in GRID_TYPES:
        dequantize(raws[qtype], qtype)  # the warm-up: grids (and sign patterns) reach the device once

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor was built from host data during dequantisation")

    for name in ("tensor", "as_tensor", "from_numpy", "arange"):
        monkeypatch.setattr(torch, name, forbidden)
    for qtype, raw in raws.items():
        assert dequantize(raw, qtype).shape == (2, 256)


def test_iq_grids_are_read_from_the_gguf_package_once_per_device():
    """The IQ1-IQ3 grids and the 128 sign patterns are not copied into the engine: they are the gguf
    package's (``gguf.quants.<TYPE>.grid`` after ``init_grid()``, ``IQ2_XXS.ksigns``), converted once
    to a tensor and kept per device."""
    from zimage_native.formats import ggml

    cpu = torch.device("cpu")
    for qtype in GRID_TYPES:
        cls = getattr(gguf.quants, qtype)
        cls.init_grid()
        table = ggml._table(qtype, cpu)
        assert table is ggml._table(qtype, cpu) and ggml._TABLES[(qtype, cpu)] is table
        assert tuple(table.shape) == tuple(cls.grid_shape) and table.dtype == torch.float32
        assert np.array_equal(table.numpy(), np.asarray(cls.grid).reshape(cls.grid_shape)), qtype
    signs = ggml._table("ksigns", cpu)
    ksigns = np.frombuffer(gguf.quants.IQ2_XXS.ksigns, dtype=np.uint8)
    assert tuple(signs.shape) == (128, 8)
    for i in (0, 1, 3, 77, 127):  # bit j of pattern i set: value j negated; 8 bits of even parity
        assert [1.0 - 2.0 * ((int(ksigns[i]) >> j) & 1) for j in range(8)] == signs[i].tolist()
        assert bin(int(ksigns[i])).count("1") % 2 == 0 and int(ksigns[i]) & 0x7F == i


def test_an_iq_grid_built_by_two_threads_at_once_is_one_table(monkeypatch):
    """Two threads that found a device's table missing both built it, and the later store replaced
    the table the other had already used (and a CUDA graph captured from it would hold, freed):
    the first kept is the one every thread gets."""
    import threading

    from zimage_native.formats import ggml

    monkeypatch.setattr(ggml, "_TABLES", {})
    real, b_done, got = ggml._host_table, threading.Event(), {}

    def host_table(name):
        if threading.current_thread().name == "A":
            assert b_done.wait(30)  # A found the table missing; B builds, keeps and uses its own meanwhile
        return real(name)

    def run(tag):
        got[tag] = ggml._table("IQ3_S", torch.device("cpu"))
        if tag == "B":
            b_done.set()

    monkeypatch.setattr(ggml, "_host_table", host_table)
    threads = [threading.Thread(target=run, args=(tag,), name=tag) for tag in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got["A"] is got["B"] is ggml._TABLES[("IQ3_S", torch.device("cpu"))]


def test_iq_grids_load_on_first_use_inside_a_compiled_call(monkeypatch):
    """A compiled model's first forward on a device with no grid yet: building the grid (numpy, the
    gguf package's bytes) is not traced, so the call gives the eager values instead of failing in
    dynamo ('AssertionError: Expected np.nditer base, got <class 'bytes'>')."""
    from zimage_native.formats import ggml

    raw = torch.from_numpy(random_blocks("IQ3_S", 4, 256, np.random.default_rng(1)))
    want = dequantize(raw, "IQ3_S")
    monkeypatch.setattr(ggml, "_TABLES", {})  # cold: no table on any device,
    monkeypatch.setattr(gguf.quants.IQ3_S, "grid", None)  # nor the package's grid decoded yet
    torch._dynamo.reset()
    compiled = torch.compile(lambda r: dequantize(r, "IQ3_S"), backend="aot_eager")
    assert torch.equal(compiled(raw).view(torch.int32), want.view(torch.int32))
    assert {name for name, _ in ggml._TABLES} == {"IQ3_S", "bits"}
    torch._dynamo.reset()


def test_scale_fields_are_the_fp16_fields_of_the_format():
    # Setting every scale field to 0 must zero the signed types (guards the offsets used to build files;
    # IQ1_M's fp16 is split into four nibbles: bench.put_scale writes it).
    from zimage_native.bench import put_scale

    rng = np.random.default_rng(0)
    for qtype in ("Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K", *GRID_TYPES):
        raw = random_blocks(qtype, 2, 256, rng)
        blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
        assert dequantize(torch.from_numpy(raw.copy()), qtype).any(), qtype
        for off in SCALE_FIELDS[qtype][0]:
            put_scale(blocks, qtype, off, np.zeros((blocks.shape[0], 2), np.uint8))
        assert not dequantize(torch.from_numpy(raw.copy()), qtype).any(), qtype
    # A known IQ1_M scale: d = 1.5 (0x3E00) gives values d * (2 s + 1) * (grid +- 0.125).
    raw = random_blocks("IQ1_M", 1, 256, rng)
    put_scale(raw, "IQ1_M", 48, np.array([[0x00, 0x3E]], np.uint8))
    expected = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.IQ1_M), dtype=np.float32)
    assert np.array_equal(dequantize(torch.from_numpy(raw.copy()), "IQ1_M").numpy(), expected.reshape(1, 256))
    units = np.abs(expected) / np.float32(1.5 * 0.125)  # (2 s + 1) x {1, 7, 9}: odd whole numbers
    assert np.array_equal(units, np.round(units)) and (units % 2 == 1).all()


# ----------------------------------------------------------------------------------- DiT files


def _dit_config() -> TransformerConfig:
    return TransformerConfig(**GGUF_DIT)


def _canonical_random(cfg: TransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = build_on_meta(lambda: ZImageTransformer(cfg))
    return {k: torch.randn(tuple(v.shape), generator=g) * 0.05 for k, v in model.state_dict().items()}


#: Built files of one GGML type (``write_dit`` / ``write_qwen3`` arguments without the path -> the file's
#: bytes and its reference), the last few: a build draws and encodes millions of random values and
#: dequantises them with the gguf package (seconds each on the CI CPU), and many tests take the same file.
_BUILT: OrderedDict = OrderedDict()
_BUILT_KEEP = 4


def _built(key, build):
    """(bytes, reference) for ``key``, from ``build()`` or the last few builds (``key`` None: not kept)."""
    if key is not None and key in _BUILT:
        _BUILT.move_to_end(key)
        return _BUILT[key]
    entry = build()
    if key is not None:
        _BUILT[key] = entry
        while len(_BUILT) > _BUILT_KEEP:
            _BUILT.popitem(last=False)
    return entry


def write_dit(path: Path, types, prefix: str = "", arch: str | None = "lumina2", seed: int = 0
              ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A GGUF DiT in the ComfyUI layout; returns it and the reference canonical fp32 values (a copy of
    their own for each call: tests change them). Files of one type (``types`` a string) are built once
    and written again for each call."""
    key = ("dit", types, prefix, arch, seed) if isinstance(types, str) else None
    data, reference = _built(key, lambda: _build_dit(path, types, prefix, arch, seed))
    path.write_bytes(data)
    return path, {k: v.clone() for k, v in reference.items()}


def _build_dit(path: Path, types, prefix: str, arch: str | None, seed: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    cfg = _dit_config()
    comfy = dict(from_canonical(_canonical_random(cfg, seed).items(), DIT_COMFYUI))
    comfy["norm_final.weight"] = torch.ones(cfg.dim)
    file, values = gguf_state(comfy, types, np.random.default_rng(seed))
    write_gguf(path, {prefix + k: v for k, v in file.items()}, arch)
    reference = dict(to_canonical(((k, v) for k, v in values.items()), DIT_COMFYUI))
    return path.read_bytes(), reference


def reference_dit(reference: dict[str, torch.Tensor]) -> ZImageTransformer:
    model = build_on_meta(lambda: ZImageTransformer(_dit_config()))
    return assign_state_dict(model, dict(reference), "reference").eval()


AXES = {"axes_dims": [32, 48, 48]}


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dit_of_every_type_equals_the_model_built_from_the_dequantised_weights(tmp_path, qtype):
    path, reference = write_dit(tmp_path / f"z_image_turbo-{qtype}.gguf", qtype)
    model = load_component("transformer", path, torch.float32, "cpu", config=AXES)
    packed = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    if qtype in QUANT_TYPES:
        # Every linear whose rows are whole blocks stays packed (the patch embedder's 64 only for 32-blocks).
        n_linear = sum(1 for m in reference_dit(reference).modules() if isinstance(m, torch.nn.Linear))
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
        assert len(packed) == n_linear - (1 if block == 256 else 0)
        assert {m.qtype for m in packed} == {qtype}
        assert model.layers[0].attention.to_q.weight.dtype == torch.uint8
    else:
        assert not packed
    ref = reference_dit(reference)
    assert_rel(dit_output(model), dit_output(ref), 1e-6, f"{qtype} DiT")


def test_mixed_types_resident_bytes_and_prefix(tmp_path):
    # A Q4_K_M-like mix: the types rotate tensor by tensor; a prefix, and no general.architecture
    # (stable-diffusion.cpp): the DiT is recognised from its tensor names.
    mix = ("Q4_K", "Q6_K", "Q5_K", "Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_1", "Q5_0", "F16", "BF16")
    path, reference = write_dit(tmp_path / "mixed.gguf", lambda name, i: mix[i % len(mix)],
                                prefix="model.diffusion_model.", arch=None)
    fmt = detect_format(path)
    assert fmt.container == "gguf" and not fmt.problem
    assert [(c.component, c.layout, c.prefix) for c in fmt.components] == [
        ("transformer", "comfyui", "model.diffusion_model.")]
    assert len(set(fmt.components[0].dtypes) & set(BLOCK_TYPES)) >= 8
    model = load_component("transformer", path, torch.float32, "cpu", config=AXES)
    assert_rel(dit_output(model), dit_output(reference_dit(reference)), 1e-6, "mixed DiT")
    # Packed weights are held as the file's bytes: the resident bytes of the packed layers equal the
    # file's bytes for those tensors, and the whole model is no larger than the file (fp32 file
    # tensors stay fp32 here).
    from zimage_native.formats.gguf import GGUFCheckpoint

    with GGUFCheckpoint(path) as ckpt:
        file_packed = sum(t.n_bytes for t in ckpt.tensors.values() if t.quantized)
        file_float = {k: t for k, t in ckpt.tensors.items() if not t.quantized}
        float_as_fp32 = sum(t.numel * 4 for t in file_float.values())
        norm_final = ckpt.tensors["model.diffusion_model.norm_final.weight"].n_bytes  # dropped on load
    assert sum(quantized_bytes(model).values()) == file_packed
    assert resident_bytes(model) == file_packed + float_as_fp32 - norm_final
    # In bf16, the model is smaller than the file.
    small = load_component("transformer", path, torch.bfloat16, "cpu", config=AXES)
    assert resident_bytes(small) <= path.stat().st_size
    assert sum(quantized_bytes(small).values()) == file_packed


def test_bf16_compute_dequantises_to_bf16(tmp_path):
    path, reference = write_dit(tmp_path / "q4k.gguf", "Q4_K")
    model = load_component("transformer", path, torch.bfloat16, "cpu", config=AXES)
    layer = model.layers[0].feed_forward.w1
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w = reference["layers.0.feed_forward.w1.weight"].to(torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    # The load-time q|k|v and w1|w3 GEMM fusions leave packed linears alone (each dequantises itself).
    from zimage_native.accel import fuse_projections_

    before = dit_output(model.float())
    assert fuse_projections_(model) == (0, 0)
    assert model.layers[0].attention.to_qkv is None and torch.equal(dit_output(model), before)


def test_pad_tokens_stored_as_vectors_load(tmp_path):
    # stable-diffusion.cpp's Z-Image GGUFs (leejet/Z-Image-Turbo-GGUF) store x_pad_token and
    # cap_pad_token as (dim,), the released checkpoint and the model as (1, dim).
    path, reference = write_dit(tmp_path / "sdcpp.gguf", "Q4_K", prefix="model.diffusion_model.", arch=None)
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith("pad_token"):
            assert data.shape == (1, GGUF_DIT["dim"])
            data = data.reshape(-1)
        tensors[t.name] = (data, t.tensor_type.name)
    del reader
    flat = write_gguf(tmp_path / "sdcpp-flat.gguf", tensors, None)
    assert describe(flat)["components"]["transformer"]["config"]["dim"] == GGUF_DIT["dim"]
    model = load_component("transformer", flat, torch.float32, "cpu", config=AXES)
    assert tuple(model.x_pad_token.shape) == (1, GGUF_DIT["dim"])
    assert torch.equal(dit_output(model), dit_output(load_component("transformer", path, torch.float32, "cpu",
                                                                    config=AXES)))
    assert_rel(dit_output(model), dit_output(reference_dit(reference)), 1e-6, "DiT with vector pad tokens")


def test_attention_backend_sees_the_compute_dtype_and_device_of_a_packed_or_streamed_dit(tmp_path, monkeypatch):
    """A GGUF DiT's to_q.weight holds packed uint8 bytes, and with offload='blocks' every block
    weight rests in CPU memory: the backend check must see the compute dtype and the device the
    blocks run on (else flash / sage are refused for "uint8" or "cpu" and 'auto' falls back)."""
    import zimage_native.accel.attention_backends as ab
    from zimage_native.offload import stream_blocks

    path, _ = write_dit(tmp_path / "q8.gguf", "Q8_0")
    model = load_component("transformer", path, torch.bfloat16, "cpu", config=AXES)
    assert model.layers[0].attention.to_q.weight.dtype == torch.uint8
    seen = []
    real = ab.resolve_backend
    monkeypatch.setattr(ab, "resolve_backend", lambda name, device, dtype, head_dim: (
        seen.append((torch.device(device), dtype, head_dim)) or real(name, device, dtype, head_dim)))
    assert ab.check_attention_backend(model, "sdpa")[0] == "sdpa"
    assert seen[-1] == (torch.device("cpu"), torch.bfloat16, 128)
    streamer = stream_blocks(model, "cpu", transfer=lambda t: t.clone())
    streamer.device = torch.device("cuda", 0)  # what a GPU streamer holds (no GPU here); the blocks rest on the CPU
    ab.check_attention_backend(model, "sdpa")
    assert seen[-1] == (torch.device("cuda", 0), torch.bfloat16, 128)


def test_fp8_on_a_gguf_dit_is_refused_before_anything_changes(tmp_path):
    """fp8 converts nn.Linear (and an fp8 file's) layers; a GGUF DiT's packed block linears have no fp8
    form, so fp8=True converted none of them and the DiT ran as without it (one INFO line: "0 linears in
    float8"). It is refused by name, before the fusions or any other transform touch the model."""
    from zimage_native.accel import AccelerationUnavailable, optimize
    from zimage_native.accel.fusions import FusedLinear

    path, _ = write_dit(tmp_path / "mixed.gguf", lambda name, i: ("Q8_0", "Q4_K")[i % 2])
    model = load_component("transformer", path, torch.bfloat16, "cpu", config=AXES)
    before = [type(m) for m in model.modules()]
    with pytest.raises(AccelerationUnavailable, match=r"GGUF-packed \(\d+ Q4_K, \d+ Q8_0\).*Run without fp8"):
        optimize(model, fp8=True, kernels="none")
    assert [type(m) for m in model.modules()] == before and FusedLinear not in before


def test_without_a_dtype_a_mixed_file_loads_in_one_compute_dtype(tmp_path):
    # Real GGUF files mix F32 norms, F16 / BF16 unquantised weights and packed ones: with dtype=None
    # the float tensors must not keep their file dtypes (fp32 activations meet bf16 weights).
    mix = ("Q4_K", "F16", "BF16")
    path, reference = write_dit(tmp_path / "mixed.gguf", lambda name, i: mix[i % len(mix)])
    model = load_component("transformer", path, None, "cpu", config=AXES)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert_rel(dit_output(model), dit_output(reference_dit(reference)), 1e-6, "mixed DiT, dtype None")
    te_path, te_reference = write_qwen3(tmp_path / "qwen3-mixed.gguf", 64, lambda name, i: mix[i % len(mix)])
    te = load_component("text_encoder", te_path, None, "cpu")
    assert {p.dtype for p in te.parameters()} == {torch.float32}
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        ours = te(input_ids=ids).last_hidden_state
        want = te_reference(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    assert_rel(ours, want, 1e-6, "mixed Qwen3, dtype None")


def test_a_tensor_reshaped_to_whole_blocks_with_comfy_orig_shape_loads(tmp_path):
    # ComfyUI-GGUF's converter may store a weight whose rows are not whole 256-blocks reshaped to
    # (-1, 256) and quantised, with its shape in comfy.gguf.orig_shape.NAME: the blocks run along the
    # stored rows, so it is dequantised as stored, then given its shape (the patch embedder, 64 wide).
    path, reference = write_dit(tmp_path / "q4k.gguf", "Q4_K")
    name = "x_embedder.weight"
    shape = tuple(reference["all_x_embedder.2-1.weight"].shape)
    assert shape[-1] % 256
    raw = random_blocks("Q4_K", shape[0] * shape[1] // 256, 256, np.random.default_rng(7))
    expected = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K), dtype=np.float32)
    reference["all_x_embedder.2-1.weight"] = torch.from_numpy(expected.reshape(shape).copy())
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "reshaped.gguf"), arch="lumina2")
    writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
    for t in reader.tensors:
        data, qtype = np.array(t.data), t.tensor_type
        if t.name == name:
            data, qtype = raw, gguf.GGMLQuantizationType.Q4_K
        writer.add_tensor(t.name, data, raw_shape=data.shape if data.dtype == np.uint8 else None, raw_dtype=qtype)
    del reader
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load_component("transformer", tmp_path / "reshaped.gguf", torch.float32, "cpu", config=AXES)
    assert not isinstance(model.all_x_embedder["2-1"], GGUFLinear)  # dequantised while loading
    assert torch.equal(model.all_x_embedder["2-1"].weight, reference["all_x_embedder.2-1.weight"])
    assert_rel(dit_output(model), dit_output(reference_dit(reference)), 1e-6, "DiT with a reshaped tensor")


def test_info_shows_types_and_bytes(tmp_path):
    from click.testing import CliRunner

    from zimage_native.cli import main

    mix = ("Q4_K", "Q6_K", "F16")
    path, _ = write_dit(tmp_path / "mixed.gguf", lambda name, i: mix[i % 3])
    report = describe(path)
    entry = report["components"]["transformer"]
    assert report["container"] == "gguf" and report["architecture"] == "lumina2"
    assert set(entry["gguf_types"]) == {"Q4_K", "Q6_K", "F16", "F32"}
    assert entry["config"]["dim"] == 768 and entry["quantization"] == "gguf"
    from zimage_native.formats.gguf import GGUFCheckpoint

    with GGUFCheckpoint(path) as ckpt:
        q4 = sum(t.n_bytes for t in ckpt.tensors.values() if t.qtype == "Q4_K")
    assert entry["gguf_types"]["Q4_K"]["bytes"] == q4
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "Q4_K" in result.output and f"{q4:,} bytes" in result.output


def test_gguf_files_that_are_not_z_image(tmp_path):
    rng = np.random.default_rng(0)
    other = write_gguf(tmp_path / "flux.gguf", {"double_blocks.0.img_attn.qkv.weight":
                                                 (random_blocks("Q4_0", 96, 64, rng), "Q4_0")}, "flux")
    fmt = detect_format(other)
    assert fmt.problem and "not a Z-Image DiT" in fmt.problem and "'flux'" in fmt.problem
    assert fmt.problem.endswith("; Z-Image takes its own DiT (GGUF builds such as jayn7/Z-Image-Turbo-GGUF's) and "
                                "Qwen3-4B as its text encoder (such as Qwen/Qwen3-4B-GGUF's)")
    with pytest.raises(UnsupportedFormatError, match="not a Z-Image DiT"):
        load_component("transformer", other, None, "cpu")
    # A tensor type we do not dequantise is named.
    path, _ = write_dit(tmp_path / "ok.gguf", "Q8_0")
    iq = write_gguf(tmp_path / "iq.gguf", {"x_pad_token": (np.zeros((1, 256), np.float32), "F32"),
                                           "layers.0.attention.qkv.weight":
                                               (np.zeros((4, 66), np.uint8), "TQ2_0")}, "lumina2")
    with pytest.raises(UnsupportedFormatError, match="TQ2_0"):
        load_component("transformer", iq, None, "cpu")
    # A type id the gguf package does not know (a newer file) is named as such, not as damage.
    data = bytearray(iq.read_bytes())
    at = data.find(b"layers.0.attention.qkv.weight") + len(b"layers.0.attention.qkv.weight") + 4 + 16
    assert int.from_bytes(data[at:at + 4], "little") == gguf.GGMLQuantizationType.TQ2_0
    data[at:at + 4] = (250).to_bytes(4, "little")
    iq.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormatError, match="tensor type the installed gguf package") as err:
        detect_format(iq)
    assert "truncated" not in str(err.value)


# ----------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("keep", [0.5, 0.999, 200, 40, 0])
def test_a_cut_gguf_fails_in_one_line_naming_the_file(tmp_path, keep):
    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.formats import CorruptCheckpointError

    path, _ = write_dit(tmp_path / "z_image_turbo-Q4_K.gguf", "Q4_K")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    if keep == 0:
        problem = f"{path}: truncated or not a safetensors file (the file is empty)"  # no magic left to tell
    else:
        problem = f"{path}: truncated or not a GGUF file ("
    with pytest.raises(CorruptCheckpointError) as err:
        load_component("transformer", path, None, "cpu", config=AXES)
    message = str(err.value)
    assert "\n" not in message and message.startswith(problem), message
    with pytest.raises(CorruptCheckpointError):
        detect_format(path)
    out = tmp_path / "out.png"
    for args in (["info", str(path)],
                 ["generate", "a cat", "--transformer", str(path), "--device", "cpu", "-o", str(out)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == [f"Error: {message}"], result.output
    assert not out.exists()


# ----------------------------------------------------------------------------------- LoRA


class LoraHolder:
    """A GGUF test DiT with the pipeline's LoRA methods, its dequantised reference, and random LoRA
    factors of ``std``."""

    def __init__(self, tmp_path, qtype: str, seed: int, std: float):
        from zimage_native.lora import LoraMixin

        class Holder(LoraMixin):
            def __init__(self, transformer):
                self.transformer = transformer

        path, self.reference = write_dit(tmp_path / f"{qtype}.gguf", qtype)
        self.model = load_component("transformer", path, torch.float32, "cpu", config=AXES)
        self.pipe, self.wrap = Holder(self.model), Holder
        self.g, self.std = torch.Generator().manual_seed(seed), std

    def r(self, *shape):
        return torch.randn(*shape, generator=self.g) * self.std

    def fused_reference(self, lora, scale):
        """The DiT built from the dequantised weights with ``lora`` fused into them."""
        ref = self.wrap(reference_dit(self.reference))
        ref.load_lora(lora, scale=scale)
        return ref.transformer


def test_lora_on_a_gguf_dit_is_a_side_path_equal_to_the_fused_lora(tmp_path):
    held = LoraHolder(tmp_path, "Q4_K", 1, 0.02)
    model, pipe, r = held.model, held.pipe, held.r
    dim, ffn = 768, 2048
    lora = {
        # the original module tree's fused qkv (one A, B split by rows) on packed to_q/k/v
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": r(4, dim),
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": r(3 * dim, 4),
        # kohya names with an alpha on a packed feed-forward projection
        "lora_unet_layers_0_feed_forward_w2.lora_down.weight": r(8, ffn),
        "lora_unet_layers_0_feed_forward_w2.lora_up.weight": r(dim, 8),
        "lora_unet_layers_0_feed_forward_w2.alpha": torch.tensor(4.0),
        # a LoKr on a packed refiner projection (a dense side path)
        "lycoris_context_refiner_0_attention_to_out_0.lokr_w1": r(4, 4),
        "lycoris_context_refiner_0_attention_to_out_0.lokr_w2": r(dim // 4, dim // 4),
        # the patch embedder is not packed (64 inputs are not a 256-block): fused into its weight
        "diffusion_model.x_embedder.lora_A.weight": r(2, 64),
        "diffusion_model.x_embedder.lora_B.weight": r(dim, 2),
    }
    before = dit_output(model)
    packed_before = model.layers[0].attention.to_k.weight.clone()
    report = pipe.load_lora(lora, scale=0.7)
    assert report.matched == 4 and report.weights == 6 and not report.unmatched
    assert torch.equal(model.layers[0].attention.to_k.weight, packed_before)  # the packed bytes are untouched
    assert len(model.layers[0].attention.to_k.lora) == 1 and len(model.layers[0].feed_forward.w2.lora) == 1
    assert_rel(dit_output(model), dit_output(held.fused_reference(lora, 0.7)), 1e-6, "GGUF DiT + LoRA")
    assert pipe.unload_lora() == 6
    assert not model.layers[0].attention.to_k.lora
    assert torch.equal(dit_output(model), before)


def test_factored_lokr_and_loha_on_a_gguf_dit_stay_low_rank(tmp_path, caplog):
    """A LoKr with a low-rank second factor and a LoHa keep low-rank side paths on packed layers
    (their exact factors: Kronecker mixed product, face-splitting product), a LoKr with a whole
    second factor a Kronecker side path of its two factors, each a fraction of the dense delta's
    bytes, and all give the output of the LoRA fused into the dequantised weights; a full delta
    has no smaller form and is logged with its bytes."""
    from zimage_native.lora import LoraModule

    held = LoraHolder(tmp_path, "Q8_0", 3, 0.05)
    model, r = held.model, held.r
    dim, ffn = 768, 2048
    lora = {
        "lycoris_layers_0_attention_to_q.lokr_w1": r(4, 4),  # W1 whole, W2 = U V of rank 4
        "lycoris_layers_0_attention_to_q.lokr_w2_a": r(dim // 4, 4),
        "lycoris_layers_0_attention_to_q.lokr_w2_b": r(4, dim // 4),
        "lycoris_layers_0_attention_to_q.alpha": torch.tensor(2.0),
        "lycoris_layers_0_feed_forward_w2.lokr_w1_a": r(2, 1),  # W1 factored too
        "lycoris_layers_0_feed_forward_w2.lokr_w1_b": r(1, 8),
        "lycoris_layers_0_feed_forward_w2.lokr_w2_a": r(dim // 2, 4),
        "lycoris_layers_0_feed_forward_w2.lokr_w2_b": r(4, ffn // 8),
        "lycoris_layers_0_attention_to_k.hada_w1_a": r(dim, 4), "lycoris_layers_0_attention_to_k.hada_w1_b": r(4, dim),
        "lycoris_layers_0_attention_to_k.hada_w2_a": r(dim, 4), "lycoris_layers_0_attention_to_k.hada_w2_b": r(4, dim),
        "lycoris_layers_0_attention_to_k.alpha": torch.tensor(8.0),
        "lycoris_layers_0_attention_to_v.lokr_w1": r(4, 4),  # a whole W2: W1 kron W2 from the factors
        "lycoris_layers_0_attention_to_v.lokr_w2": r(dim // 4, dim // 4),
        "lycoris_layers_0_attention_to_v.alpha": torch.tensor(3.0),
        "lycoris_layers_0_attention_to_out_0.diff": r(dim, dim),  # a full delta: dense, and said so
        # a whole-W2 LoKr on the original tree's fused qkv: W1's rows split over the packed q, k, v
        "diffusion_model.noise_refiner.0.attention.qkv.lokr_w1": r(6, 4),
        "diffusion_model.noise_refiner.0.attention.qkv.lokr_w2": r(dim // 2, dim // 4),
    }
    with caplog.at_level("WARNING", logger="zimage_native.lora"):
        report = held.pipe.load_lora(lora, scale=0.8)
    assert report.matched == 6 and not report.unmatched
    for name in ("to_q", "to_k", "to_v"):
        (w1, w2, kron), = getattr(model.noise_refiner[0].attention, name).side_paths()
        assert kron and w1.shape == (2, 4) and w2.shape == (dim // 2, dim // 4)
    attention, w2 = model.layers[0].attention, model.layers[0].feed_forward.w2
    for layer in (attention.to_q, attention.to_k, w2, attention.to_v):
        (a, b, kron), = layer.side_paths()
        assert kron == (layer is attention.to_v), layer
        assert b is not None and (a.numel() + b.numel()) * 4 < layer.out_features * layer.in_features, layer
    (a, b, kron), = attention.to_out[0].side_paths()
    assert b is None and not kron and a.shape == (dim, dim)
    assert "1 LoRA modules (full deltas) have no smaller form" in caplog.text
    expected = dit_output(held.fused_reference(lora, 0.8))  # fused from the dense deltas
    assert_rel(dit_output(model), expected, 1e-6, "GGUF DiT + LoKr / LoHa side paths")
    for key in ("lycoris_layers_0_attention_to_q", "lycoris_layers_0_feed_forward_w2", "lycoris_layers_0_attention_to_k"):
        tensors = {k.split(".", 1)[1]: v for k, v in lora.items() if k.startswith(key + ".")}
        module = LoraModule(key, None, tensors, [])
        down, up = module.factors()
        assert_rel(up @ down, module.delta(), 1e-6, f"{key}: B A against the dense delta")


def test_lora_side_paths_move_with_their_layer_in_the_compute_dtype():
    """A LoRA's side paths are buffers of the packed layer, in the model's compute dtype: every
    placement moves them with the layer's own tensors (the streamer of offload='blocks' moves a
    block's parameters and buffers, ``--offload model`` the same, ``Module.to`` too), so a forward
    neither copies them from the CPU nor casts them. They stay out of the state dict."""
    from zimage_native.offload import _streamed_tensors

    layer = GGUFLinear(256, 8, "Q8_0", bias=True)
    layer.weight.copy_(torch.from_numpy(random_blocks("Q8_0", 8, 256, np.random.default_rng(3))))
    layer.bias.copy_(torch.randn(8))
    keys = set(layer.state_dict())
    given = [(torch.randn(4, 256), torch.randn(8, 4)), (torch.randn(8, 256), None),  # a dense delta (a full delta)
             (torch.randn(2, 16), torch.randn(4, 16))]  # a LoKr's W1 kron W2
    for (a, b), scale in zip(given, (0.5, 0.25, 0.75)):
        layer.add_lora(a, b, scale, kron=a.shape == (2, 16))
    x = torch.randn(2, 256)
    (d, none, _), (w1, w2, kron) = layer.side_paths()  # (the dense delta holds the low-rank one with it)
    assert kron and none is None
    (a0, b0), (d0, _), (w10, w20) = given
    expected = (torch.nn.functional.linear(x, layer.dequantize(), layer.bias) + 0.5 * (x @ a0.T @ b0.T)
                + 0.25 * (x @ d0.T) + 0.75 * (x @ torch.kron(w10, w20).T))
    assert_rel(layer(x), expected, 1e-6, "GGUFLinear with side paths")
    assert set(layer.state_dict()) == keys
    assert {id(t) for t in (d, w1, w2)} <= {id(t) for t in _streamed_tensors(layer, ())}
    with pytest.raises(ValueError, match="side path of shape"):
        layer.add_lora(torch.randn(2, 16), torch.randn(4, 8), 0.75, kron=True)  # 8 x 128 is not 8 x 256
    layer.to("meta")  # meta stands for the GPU
    assert all(p.a.device.type == "meta" for p in layer.side_paths())
    assert layer(x.to("meta")).device.type == "meta"
    half = GGUFLinear(256, 8, "Q8_0", dtype=torch.bfloat16)
    half.add_lora(torch.randn(4, 256), torch.randn(8, 4), 0.5, torch.bfloat16)
    (a, b, _), = half.side_paths()
    assert a.dtype == b.dtype == torch.bfloat16
    assert {id(a), id(b)} <= {id(t) for t in _streamed_tensors(half, ())}
    assert half.clear_lora() == 1 and not half.side_paths() and not dict(half.named_buffers()).keys() - {"weight"}


# ----------------------------------------------------------------------------------- Qwen3 text encoder

#: A tiny Qwen3 whose rows are whole 256-value blocks: hidden 256, 2 heads of 128, 1 KV head, FFN 512.
GGUF_QWEN3 = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=2048, tie_word_embeddings=False)


def write_qwen3(path: Path, tokenizer_len: int, types, arch: str | None = "qwen3", seed: int = 0):
    """A GGUF Qwen3 in llama.cpp names; returns it and the reference full transformers Qwen3Model (one
    of its own for each call). Files of one type are built once and written again for each call."""
    key = ("qwen3", tokenizer_len, types, arch, seed) if isinstance(types, str) else None
    data, reference = _built(key, lambda: _build_qwen3(path, tokenizer_len, types, arch, seed))
    path.write_bytes(data)
    return path, copy.deepcopy(reference)


def _build_qwen3(path: Path, tokenizer_len: int, types, arch: str | None, seed: int):
    from transformers import Qwen3Config, Qwen3Model

    from zimage_native.formats.gguf import TE_LLAMA_CPP

    config = Qwen3Config(vocab_size=tokenizer_len, **GGUF_QWEN3)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3Model(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    canonical = {k: (torch.randn(s, generator=g) * 0.05 + (1.0 if k.endswith("norm.weight") else 0.0))
                 for k, s in shapes.items()}
    llama = dict(from_canonical(canonical.items(), TE_LLAMA_CPP))
    llama["output.weight"] = torch.randn(tokenizer_len, 256, generator=g) * 0.05  # the LM head, untied
    assert "blk.0.attn_q_norm.weight" in llama and "output.weight" in llama and "token_embd.weight" in llama
    file, values = gguf_state(llama, types, np.random.default_rng(seed))
    meta = {"qwen3.rope.freq_base": 1e6, "qwen3.attention.layer_norm_rms_epsilon": 1e-6,
            "qwen3.context_length": 2048, "qwen3.block_count": 3} if arch else None
    write_gguf(path, file, arch, meta)
    state = dict(to_canonical(values.items(), TE_LLAMA_CPP))  # the LM head is dropped
    reference = Qwen3Model(config).eval()
    reference.load_state_dict(state, strict=True)
    return path.read_bytes(), reference


def reference_features(reference, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out.append(reference(input_ids=ids, output_hidden_states=True).hidden_states[-2][0])
    return out


@pytest.mark.parametrize("types", ["Q4_K", "Q8_0", "mixed"])
def test_gguf_qwen3_encoder_kept_packed_equals_the_dequantised_model(tiny_model_dir, tmp_path, types):
    from transformers import AutoTokenizer

    from zimage_native.formats.gguf import GGUFCheckpoint
    from zimage_native.quant_linear import GGUFEmbedding
    from zimage_native.text_encoder import TextEncoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    mix = ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "Q8_0", "Q4_0", "Q5_1", "F16", "BF16")
    chosen = (lambda name, i: mix[i % len(mix)]) if types == "mixed" else types
    path, reference = write_qwen3(tmp_path / f"Qwen3-tiny-{types}.gguf", len(tok), chosen)
    fmt = detect_format(path)
    assert [(c.component, c.layout) for c in fmt.components] == [("text_encoder", "llama.cpp")]
    model = load_component("text_encoder", path, torch.float32, "cpu")
    assert len(model.layers) == 2 and model.config.num_hidden_layers == 2  # 3 - 1: hidden_states[-2]
    assert isinstance(model.embed_tokens, GGUFEmbedding)  # packed in every case (Q4_K first in the mix)
    assert model.embed_tokens.weight.dtype == torch.uint8
    assert model.embed_tokens(torch.tensor([1, 2])).dtype == torch.float32
    packed = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert packed and all(m.weight.dtype == torch.uint8 for m in packed)
    if types != "mixed":
        assert len(packed) == 2 * 7 and {m.qtype for m in packed} == {types}
    texts = ["a cat on a chair", "mountains at dawn, soft light"]
    ours = TextEncoder(model, tok).encode(texts)
    for a, b in zip(ours, reference_features(reference, tok, texts)):
        assert_rel(a, b, 1e-6, f"{types} text features")
    # Packed tensors stay as the file's bytes (the last layer and the LM head are not loaded).
    with GGUFCheckpoint(path) as ckpt:
        loaded = sum(t.n_bytes for k, t in ckpt.tensors.items()
                     if t.quantized and not k.startswith(("blk.2.", "output.")))
    assert sum(quantized_bytes(model).values()) == loaded
    model.to(torch.bfloat16)  # the embedding's output dtype follows a cast of the model; the packed bytes do not
    assert model.embed_tokens(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert sum(quantized_bytes(model).values()) == loaded


_GGUF_PEAK_SCRIPT = """
import sys, torch
from zimage_native.loading import load_component

warm, big = sys.argv[1:]
load_component("text_encoder", warm, torch.float32, "cpu")  # imports, first allocations
start = reset_peak()
anon = status("RssAnon")
model = load_component("text_encoder", big, torch.float32, "cpu")
model.embed_tokens.weight.max()  # every packed byte of the embedding read once
print(status("VmHWM") - start, status("RssAnon") - anon, model.embed_tokens.weight.nbytes)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
def test_packed_gguf_weights_are_the_files_pages_not_a_copy(tiny_model_dir, tmp_path):
    """A GGUF tensor was copied out of the file's memory map as it was read, so a packed weight kept
    packed was held twice at the load's peak (the copy, and the mapped pages read to make it) and
    in anonymous memory after it: at real width (Qwen3-4B, Q8_0, one loaded layer) the load peaked
    1001 MiB above the start for 496 MiB of weights, all of them anonymous. The file is mapped
    copy-on-write now and a packed weight is a view of it: here, a 1 Mi x 256 Q8_0 embedding (272
    MiB) read once after the load peaks at 272 MiB with 0 MiB of anonymous memory (the copy: 545 MiB
    with 272 MiB anonymous)."""

    from .gguf_files import gguf_state

    write_qwen3(tmp_path / "warm.gguf", 300, "Q8_0")
    from transformers import Qwen3Config, Qwen3Model

    from zimage_native.formats.gguf import TE_LLAMA_CPP

    rows = 1 << 20
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(vocab_size=rows, **GGUF_QWEN3))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    small = {k: torch.randn(shape) * 0.05 for k, shape in shapes.items() if k != "embed_tokens.weight"}
    file, _ = gguf_state(dict(from_canonical(small.items(), TE_LLAMA_CPP)), "Q8_0", rng)
    file["token_embd.weight"] = (random_blocks("Q8_0", rows, 256, rng), "Q8_0")
    meta = {"qwen3.rope.freq_base": 1e6, "qwen3.attention.layer_norm_rms_epsilon": 1e-6, "qwen3.context_length": 2048}
    big = write_gguf(tmp_path / "big.gguf", file, "qwen3", meta)
    del file
    peak, anon, embedding = map(int, run_fresh(_GGUF_PEAK_SCRIPT, tmp_path / "warm.gguf", big).split())
    assert anon < embedding // 4, f"{anon / 2**20:.0f} MiB of anonymous memory for a {embedding / 2**20:.0f} MiB " \
                                  f"packed embedding"
    assert peak < embedding * 3 // 2, f"peak {peak / 2**20:.0f} MiB above the start for {embedding / 2**20:.0f} MiB"


_VALUES_PEAK_SCRIPT = """
import sys, torch
from zimage_native.formats.gguf import GGUFCheckpoint

path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
with GGUFCheckpoint(path) as ckpt:
    ckpt.values("w", dtype)  # imports, first allocations
    start = reset_peak()
    values = ckpt.values("w", dtype)
    print(status("VmHWM") - start, values.nbytes, ckpt.tensors["w"].n_bytes)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_packed_tensor_is_dequantised_by_blocks_of_rows(tmp_path, dtype):
    """A packed tensor dequantised whole (``GGUFCheckpoint.values``: ``zimage convert`` of a GGUF, the
    packed tensors a load does not keep packed) held the unpacking's fp32 intermediates of every
    block at once: the released DiT's 10240 x 3840 Q4_K feed-forward weight peaked at 468 MiB for
    150 MiB of fp32 values, 467 MiB for 75 MiB of bf16, and converting a Q4_K DiT of 296 MiB to
    bf16 peaked at 1079 MiB. It is dequantised by blocks of rows into its result now: the peak stays
    under the result, the packed bytes and half the result in fp32 (here a 4096 x 4096 Q4_K tensor)."""
    rows = cols = 4096
    path = write_gguf(tmp_path / "w.gguf", {"w": (random_blocks("Q4_K", rows, cols, np.random.default_rng(0)),
                                                  "Q4_K")}, None)
    peak, result, packed = map(int, run_fresh(_VALUES_PEAK_SCRIPT, path, dtype).split())
    bound = result + packed + rows * cols * 4 // 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({result / 2**20:.0f} MiB of values)"


def test_gguf_text_encoder_errors_and_cli(tiny_model_dir, tmp_path):
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from zimage_native.cli import main

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    llama, _ = write_qwen3(tmp_path / "llama.gguf", len(tok), "Q8_0", arch="llama")
    with pytest.raises(UnsupportedFormatError, match="architecture 'llama'.*permutes the q/k"):
        load_component("text_encoder", llama, None, "cpu")
    # No general.architecture: recognised from the tensor names.
    bare, reference = write_qwen3(tmp_path / "bare.gguf", len(tok), "Q6_K", arch=None)
    assert detect_format(bare).components[0].component == "text_encoder"
    report = describe(bare)["components"]["text_encoder"]
    assert report["config"]["hidden_size"] == 256 and "Q6_K" in report["gguf_types"]
    with pytest.raises(UnsupportedFormatError, match="no transformer"):
        load_component("transformer", bare, None, "cpu")
    # `--text-encoder FILE.gguf` replaces the model folder's encoder, checked against the folder's config
    # (the tiny folder's encoder has head_dim 12).
    with pytest.raises(ValueError, match="head_dim=12 does not match the checkpoint"):
        load_component("text_encoder", bare, None, "cpu", tiny_model_dir / "text_encoder" / "config.json")
    # From the command line its hidden size (256) is refused first, against the DiT's caption width (48),
    # before any weight is read.
    out = tmp_path / "out.png"
    base = ["--device", "cpu", "--steps", "1", "--width", "32", "--height", "32", "--no-progress"]
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--text-encoder",
                                       str(bare), "-o", str(out), *base])
    assert result.exit_code == 1 and "text encoder hidden size 256" in result.output, result.output
    assert "cap_feat_dim 48" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    # GGUF DiT + GGUF text encoder as single files (tokenizer and VAE from the tiny folder) generate an image.
    dit, _ = write_dit(tmp_path / "dit-Q4_K.gguf", "Q4_K")
    result = CliRunner().invoke(main, ["generate", "a cat", "--transformer", str(dit), "--text-encoder", str(bare),
                                       "--vae", str(tiny_model_dir / "vae"), "--tokenizer",
                                       str(tiny_model_dir / "tokenizer"), "-o", str(out), *base])
    assert result.exit_code == 0, result.output
    assert out.is_file()


# ----------------------------------------------------------------------------------- the pipeline


def test_from_pretrained_takes_a_gguf_transformer_like_other_single_files(tiny_model_dir, tmp_path):
    """The tiny folder's own DiT as a Q8_0 GGUF (its 64-wide rows are whole 32-blocks; the 170-wide
    FFN rows fall back to F32, as a converter does): the pipeline equals the one given the same
    dequantised weights as a safetensors file."""
    from zimage_native import ZImagePipeline

    from .test_formats import comfy_dit, write

    comfy = comfy_dit(tiny_model_dir, prefix="")
    file, values = gguf_state(comfy, "Q8_0", np.random.default_rng(3))
    assert {q for _, q in file.values()} == {"Q8_0", "F32"}
    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", file, "lumina2")
    dequantised = write(tmp_path / "tiny-dequantised.safetensors", values)
    kw = dict(device="cpu", dtype=torch.float32)
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, transformer=path, **kw)
    ref = ZImagePipeline.from_pretrained(tiny_model_dir, transformer=dequantised, **kw)
    assert any(isinstance(m, GGUFLinear) for m in pipe.transformer.modules())
    run = dict(width=32, height=32, num_inference_steps=2, seed=0, output_type="latent")
    assert_rel(pipe("a cat on a chair", **run).images, ref("a cat on a chair", **run).images, 1e-6, "latents")


def test_gguf_qwen3_in_transformers_names(tiny_model_dir, tmp_path):
    """Some converters keep the transformers names (``model.layers.N.self_attn.q_proj``) in GGUF."""
    from transformers import AutoTokenizer

    from zimage_native.converters.keymap import TE_TRANSFORMERS
    from zimage_native.formats.gguf import TE_LLAMA_CPP, GGUFCheckpoint
    from zimage_native.text_encoder import TextEncoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    llama_path, reference = write_qwen3(tmp_path / "llama-names.gguf", len(tok), "Q5_K")
    with GGUFCheckpoint(llama_path) as ckpt:  # the same bytes, renamed
        tensors = {k: (np.array(t.data), t.qtype) for k, t in ckpt.tensors.items()}
    renamed = {}
    for key, value in tensors.items():
        for canon in TE_LLAMA_CPP.canonical_keys(key):  # the LM head has none
            renamed[TE_TRANSFORMERS.foreign_key(canon)] = value
    path = write_gguf(tmp_path / "hf-names.gguf", renamed, "qwen3")
    assert [(c.component, c.layout) for c in detect_format(path).components] == [("text_encoder", "transformers")]
    model = load_component("text_encoder", path, torch.float32, "cpu", config={"max_position_embeddings": 2048})
    assert isinstance(model.layers[0].self_attn.q_proj, GGUFLinear)
    texts = ["a cat on a chair"]
    for a, b in zip(TextEncoder(model, tok).encode(texts), reference_features(reference, tok, texts)):
        assert_rel(a, b, 1e-6, "text features")



@pytest.mark.parametrize("prefix", ["", "text_encoders.qwen3_4b.transformer."])
def test_the_lm_head_of_a_gguf_qwen3_in_transformers_names_is_the_text_encoders(tiny_model_dir, tmp_path, caplog,
                                                                               prefix):
    """A Qwen3 GGUF in transformers names with its LM head (``lm_head.weight`` beside ``model.``, as in
    ComfyUI's qwen_3_4b.safetensors) is the text encoder's, dropped by its key map as from a safetensors
    file: it was left out of the component, so ``zimage convert`` warned of "1 tensor of no Z-Image
    component" and --dry-run listed it so, where the safetensors file lists it as dropped."""
    from transformers import AutoTokenizer

    from zimage_native.converters.convert import plan_conversion
    from zimage_native.converters.keymap import TE_TRANSFORMERS
    from zimage_native.formats.gguf import TE_LLAMA_CPP, GGUFCheckpoint

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    llama_path, _ = write_qwen3(tmp_path / "llama-names.gguf", len(tok), "Q8_0")
    with GGUFCheckpoint(llama_path) as ckpt:
        tensors = {k: (np.array(t.data), t.qtype) for k, t in ckpt.tensors.items()}
    renamed = {prefix + TE_TRANSFORMERS.foreign_key(c): v for k, v in tensors.items()
               for c in TE_LLAMA_CPP.canonical_keys(k)}
    renamed[prefix + "lm_head.weight"] = tensors["output.weight"]
    path = write_gguf(tmp_path / "hf-names.gguf", renamed, "qwen3")
    with caplog.at_level("WARNING", logger="zimage_native.converters.convert"):
        plan = plan_conversion(path, tmp_path / "out.safetensors", "transformers", dtype="bf16")
    assert plan.left_out == [] and plan.dropped == [prefix + "lm_head.weight"]
    assert not [r for r in caplog.records if "no Z-Image component" in r.getMessage()]
    model = load_component("text_encoder", path, torch.float32, "cpu", config={"max_position_embeddings": 2048})
    assert isinstance(model.layers[0].self_attn.q_proj, GGUFLinear)


def test_gguf_benchmark_smoke():
    """The GPU benchmark of packed linears runs its code path on the CPU (tiny shapes)."""
    from .utils import benchmark_script

    assert benchmark_script("bench_gguf").main(["--smoke"]) == 0


@pytest.mark.slow
def test_packed_linear_compiles(tmp_path):
    """torch.compile (the engine's compile modes) traces the dequantisation: same output as eager."""
    rng = np.random.default_rng(0)
    layer = GGUFLinear(512, 256, "Q4_K", bias=True)
    layer.weight.copy_(torch.from_numpy(random_blocks("Q4_K", 256, 512, rng)))
    layer.bias.copy_(torch.randn(256))
    layer.add_lora(torch.randn(4, 512) * 0.01, torch.randn(256, 4) * 0.01, 0.5)
    x = torch.randn(3, 512)
    eager = layer(x)
    torch._dynamo.reset()
    assert_rel(torch.compile(layer)(x), eager, 1e-6, "compiled packed linear")


def test_zimage_convert_dequantises_a_gguf(tiny_model_dir, tmp_path):
    """`zimage convert FILE.gguf OUT.safetensors --to LAYOUT --dtype D`: the dequantised weights, renamed."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from zimage_native.cli import main

    mix = ("Q4_K", "Q6_K", "Q8_0", "F16")
    path, reference = write_dit(tmp_path / "dit.gguf", lambda name, i: mix[i % 4])
    out = tmp_path / "dit.safetensors"
    result = CliRunner().invoke(main, ["convert", str(path), str(out), "--to", "diffusers"])
    assert result.exit_code == 1 and "choose an output --dtype" in result.output  # 'keep' cannot re-encode
    result = CliRunner().invoke(main, ["convert", str(path), str(out), "--to", "diffusers", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    converted = load_file(out)
    assert converted.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(converted[key], value), key
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    te, qwen = write_qwen3(tmp_path / "te.gguf", len(tok), "Q5_0")
    out = tmp_path / "qwen.safetensors"
    result = CliRunner().invoke(main, ["convert", str(te), str(out), "--to", "transformers", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    converted = load_file(out)
    expected = {"model." + k: v for k, v in qwen.state_dict().items()}
    # The LM head (llama.cpp's output.weight) is dropped.
    assert set(converted) == set(expected), set(converted) ^ set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_a_gguf_text_encoder_skips_its_unused_tensors_before_reading_them(tiny_model_dir, tmp_path, monkeypatch,
                                                                          quant):
    """The GGUF twin of the safetensors check: the last layer (blk.2.*), the final norm and the LM head (output.weight)
    are neither read nor dequantised, with or without --text-encoder-quant (the F16 tensors are the
    ones int8 quantises)."""
    from transformers import AutoTokenizer

    from zimage_native.formats.gguf import GGUFCheckpoint

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    path, _ = write_qwen3(tmp_path / "te.gguf", len(tok), lambda name, i: ("Q8_0", "F16")[i % 2])
    reads = []
    for name in ("get", "values"):
        method = getattr(GGUFCheckpoint, name)
        monkeypatch.setattr(GGUFCheckpoint, name,
                            lambda self, key, *a, _m=method, **k: reads.append(key) or _m(self, key, *a, **k))
    load_component("text_encoder", path, torch.float32, "cpu", quant=quant)
    with GGUFCheckpoint(path) as ckpt:
        unused = {k for k in ckpt.tensors if k.startswith(("blk.2.", "output.", "output_norm."))}
    assert "output.weight" in unused and len(unused) > 1 and reads
    assert not unused & set(reads), sorted(unused & set(reads))


def test_without_the_gguf_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from zimage_native.cli import main

    path, _ = write_dit(tmp_path / "q8.gguf", "Q8_0")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(UnsupportedFormatError, match=r"needs the gguf package: pip install 'zimage-native\[gguf\]'"):
        load_component("transformer", path, None, "cpu")
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "pip install 'zimage-native[gguf]'" in result.output


def test_gguf_text_encoder_with_int8_quantises_only_its_unpacked_linears(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from zimage_native.quantize import Int8Linear
    from zimage_native.text_encoder import TextEncoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    mix = ("Q4_K", "F16")  # alternate tensors packed and fp16
    path, _ = write_qwen3(tmp_path / "te.gguf", len(tok), lambda name, i: mix[i % 2])
    model = load_component("text_encoder", path, torch.float32, "cpu", quant="int8")
    packed = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert packed and int8 and len(packed) + len(int8) == 2 * 7
    plain = load_component("text_encoder", path, torch.float32, "cpu")
    texts = ["a cat on a chair"]
    a, = TextEncoder(model, tok).encode(texts)
    b, = TextEncoder(plain, tok).encode(texts)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.999, cos  # int8 rounding of the fp16 linears only


# ----------------------------------------------------------------------------------- the wrong file


def retyped(src: Path, dst: Path, qtype: str, which) -> Path:
    """``src`` with the packed tensors ``which(name)`` selects rewritten as ``qtype`` (random bytes of
    that type's block size: only the type matters to these tests)."""
    from zimage_native.formats.gguf import GGUFCheckpoint

    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    with GGUFCheckpoint(src) as ckpt:
        tensors = {}
        for key, t in ckpt.tensors.items():
            if t.quantized and which(key):
                rows = int(np.prod(t.shape[:-1]))
                tensors[key] = (rng.integers(0, 256, (rows, t.shape[-1] // block * size), dtype=np.uint8), qtype)
            else:
                tensors[key] = (np.array(t.data), t.qtype)
        meta = {k: v for k, v in ckpt.metadata.items() if k.startswith(f"{ckpt.architecture}.")}
        arch = ckpt.architecture
    return write_gguf(dst, tensors, arch, meta)


SUPPORTED_TYPES = ("supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ2_XXS, "
                   "IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, IQ1_M")


def test_an_unsupported_ggml_type_names_the_tensor_the_type_and_the_supported_types(tiny_model_dir, tmp_path):
    """TQ1_0 / TQ2_0 (ternary), Q8_K, MXFP4 builds: one line naming the
    component, the first such tensor, its type, how many there are and the supported types, from
    load_component, `zimage info` and `zimage generate` (before any weight is read)."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from zimage_native.cli import main

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    dit, _ = write_dit(tmp_path / "dit.gguf", "Q4_K")
    te, _ = write_qwen3(tmp_path / "te.gguf", len(tok), "Q4_K")
    out = tmp_path / "out.png"
    for qtype in ("TQ1_0", "TQ2_0", "Q8_K", "MXFP4"):
        cases = (("transformer", retyped(dit, tmp_path / f"dit-{qtype}.gguf", qtype, lambda k: ".feed_forward." in k),
                  "the DiT's tensor noise_refiner.0.feed_forward.w1.weight", "(9 of the 52 tensors"),
                 ("text_encoder", retyped(te, tmp_path / f"te-{qtype}.gguf", qtype, lambda k: "ffn_down" in k),
                  "the text encoder's tensor blk.0.ffn_down.weight", "(2 of the 23 tensors"))
        for kind, path, tensor, count in cases:
            want = f"{path}: {tensor} is stored as {qtype}, a GGML type this engine does not dequantise {count}"
            with pytest.raises(UnsupportedFormatError) as err:
                load_component(kind, path, None, "cpu")
            message = str(err.value)
            assert message.startswith(want) and SUPPORTED_TYPES in message and "\n" not in message, message
            result = CliRunner().invoke(main, ["info", str(path)])
            assert f"cannot load: {message}" in result.output, result.output
            flag = "--transformer" if kind == "transformer" else "--text-encoder"
            other = te if kind == "transformer" else dit
            result = CliRunner().invoke(main, ["generate", "a cat", flag, str(path),
                                               "--text-encoder" if kind == "transformer" else "--transformer",
                                               str(other), "--vae", str(tiny_model_dir / "vae"), "--tokenizer",
                                               str(tiny_model_dir / "tokenizer"), "--device", "cpu", "-o", str(out)])
            assert result.exit_code == 1 and result.output.strip().splitlines() == [f"Error: {message}"], \
                result.output
    assert not out.exists()


def test_an_unsupported_type_in_tensors_the_encoder_never_reads_loads(tiny_model_dir, tmp_path):
    """The truncated encoder reads neither the last layer nor the LM head: a TQ1_0 in those alone
    is no reason to refuse the file, which gives the features of the same file without them."""
    from transformers import AutoTokenizer

    from zimage_native.text_encoder import TextEncoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    te, reference = write_qwen3(tmp_path / "te.gguf", len(tok), "Q4_K")
    path = retyped(te, tmp_path / "te-tq-head.gguf", "TQ1_0", lambda k: k.startswith(("blk.2.", "output.")))
    assert detect_format(path).problem is None
    model = load_component("text_encoder", path, torch.float32, "cpu")
    texts = ["a cat on a chair"]
    for a, b in zip(TextEncoder(model, tok).encode(texts), reference_features(reference, tok, texts)):
        assert_rel(a, b, 1e-6, "text features")


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS", *GRID_TYPES])
def test_an_iq_text_encoder_gives_the_features_of_its_dequantised_weights(tiny_model_dir, tmp_path, qtype):
    """llama.cpp's i-quant Qwen3 builds (Qwen3-4B.i1-IQ4_XS.gguf, mradermacher's i1-IQ3_S, i1-IQ2_M,
    i1-IQ1_M, ...): every linear and the embedding in the type, kept packed, against the encoder built
    from the gguf package's values; `zimage info` names the type with its tensors and bytes."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from zimage_native.cli import main
    from zimage_native.formats.gguf import GGUFCheckpoint
    from zimage_native.quant_linear import GGUFEmbedding, GGUFLinear
    from zimage_native.text_encoder import TextEncoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    path, reference = write_qwen3(tmp_path / f"Qwen3-4B-{qtype}.gguf", len(tok), qtype)
    model = load_component("text_encoder", path, torch.float32, "cpu")
    packed = [m for m in model.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))]
    assert packed and {m.qtype for m in packed} == {qtype}
    texts = ["a cat on a chair", "two dogs"]
    for a, b in zip(TextEncoder(model, tok).encode(texts), reference_features(reference, tok, texts)):
        assert_rel(a, b, 1e-6, f"{qtype} text features")
    with GGUFCheckpoint(path) as ckpt:
        typed = [t for t in ckpt.tensors.values() if t.qtype == qtype]
        assert all(t.n_bytes == int(np.prod(t.shape[:-1])) * row_bytes(qtype, t.shape[-1]) for t in typed)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "cannot load" not in result.output, result.output
    assert f"{qtype} {len(typed)} tensors {sum(t.n_bytes for t in typed):,} bytes" in result.output, result.output


def test_a_lumina_image_2_dit_is_named_as_such(tiny_model_dir, tmp_path):
    """Lumina-Image 2.0 (NextDiT) DiTs share Z-Image's tensor names, and ComfyUI-GGUF writes both as
    architecture 'lumina2'; its blocks' modulation is adaLN_modulation.1 and it has no pad tokens.
    Such a file is named for what it is, as GGUF and as safetensors, not a shape error deep in loading."""
    from click.testing import CliRunner

    from zimage_native.cli import main

    from .test_formats import comfy_dit, write

    def lumina(state: dict) -> dict:
        return {k.replace(".adaLN_modulation.0.", ".adaLN_modulation.1."): v for k, v in state.items()
                if "pad_token" not in k}

    from zimage_native.formats.gguf import GGUFCheckpoint

    with GGUFCheckpoint(write_dit(tmp_path / "z.gguf", "Q4_K")[0]) as ckpt:
        tensors = {k: (np.array(t.data), t.qtype) for k, t in ckpt.tensors.items()}
    gguf_file = write_gguf(tmp_path / "lumina2-Q4_K.gguf", lumina(tensors), "lumina2")
    st_file = write(tmp_path / "lumina_2_model_bf16.safetensors", lumina(comfy_dit(tiny_model_dir)))
    for path in (gguf_file, st_file):
        want = (f"{path}: a Lumina-Image 2.0 (NextDiT) DiT, not Z-Image's (layers.N.adaLN_modulation.1, no "
                f"x_pad_token); use a Z-Image DiT")
        assert detect_format(path).problem.startswith(want)
        with pytest.raises(UnsupportedFormatError) as err:
            load_component("transformer", path, None, "cpu", config=AXES)
        assert str(err.value).startswith(want)
        result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--transformer",
                                           str(path), "--device", "cpu", "-o", str(tmp_path / "out.png")])
        assert result.exit_code == 1 and result.output.strip().splitlines() == [f"Error: {err.value}"], result.output



def test_a_text_encoder_with_fewer_rows_than_the_tokenizer_is_refused_before_loading(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """A text encoder of another vocabulary than the tokenizer's: the first prompt with a token past
    its embedding failed with 'IndexError: index 346 is out of bounds for dimension 0 with size 200'
    after every component had loaded. Now one line from the headers, before any weight is read."""
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from zimage_native import ZImagePipeline, loading
    from zimage_native.cli import main
    from zimage_native.text_encoder import TextEncoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    small, _ = write_qwen3(tmp_path / "te-small-vocab.gguf", len(tok) // 2, "Q8_0")
    good, _ = write_qwen3(tmp_path / "te.gguf", len(tok), "Q8_0")
    dit, _ = write_dit(tmp_path / "dit.gguf", "Q8_0")
    state = load_file(str(tiny_model_dir / "text_encoder" / "model.safetensors"))
    state["embed_tokens.weight"] = state["embed_tokens.weight"][: len(tok) // 2].clone()
    small_st = tmp_path / "te-small-vocab.safetensors"
    save_file(state, str(small_st))
    want = f"the tokenizer has {len(tok):,} tokens but the embedding of {{}} has {len(tok) // 2:,} rows: they are"
    # The whole model as loaded stands beside it: a text encoder of the tokenizer's size is taken.
    TextEncoder(load_component("text_encoder", good, torch.float32, "cpu"), tok)
    with pytest.raises(ValueError, match=want.format("the text encoder")):
        TextEncoder(load_component("text_encoder", small, torch.float32, "cpu"), tok)

    def no_loading(*args, **kwargs):
        raise AssertionError("a component was loaded before the check")

    monkeypatch.setattr(loading, "load_component", no_loading)
    monkeypatch.setattr(loading, "load_module", no_loading)
    with pytest.raises(ValueError, match=want.format(small)):
        ZImagePipeline.from_single_files(transformer=dit, vae=tiny_model_dir / "vae", text_encoder=small,
                                         tokenizer=tiny_model_dir / "tokenizer", device="cpu")
    with pytest.raises(ValueError, match=want.format(small_st)):
        ZImagePipeline.from_pretrained(tiny_model_dir, text_encoder=small_st, device="cpu")
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a cat", "--transformer", str(dit), "--text-encoder", str(small),
                                       "--vae", str(tiny_model_dir / "vae"), "--tokenizer",
                                       str(tiny_model_dir / "tokenizer"), "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: " + want.format(small)), result.output
    assert not out.exists()


def test_a_file_missing_tensors_names_itself_before_its_weights_are_read(tiny_model_dir, tmp_path, monkeypatch):
    """A DiT lacking a tensor (a partial conversion) was read whole, then refused with
    'transformer: the checkpoint does not match the model. 1 missing keys ...', naming no file.
    Now the header's keys are checked before any weight is read, and the message names the file and
    what to do; the same for a safetensors DiT and for a GGUF text encoder."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from zimage_native.cli import main
    from zimage_native.formats.gguf import GGUFCheckpoint
    from zimage_native.loading import StateDictMismatchError

    from .test_formats import comfy_dit, write

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    with GGUFCheckpoint(write_dit(tmp_path / "dit.gguf", "Q4_K")[0]) as ckpt:
        dit = {k: (np.array(t.data), t.qtype) for k, t in ckpt.tensors.items()}
    with GGUFCheckpoint(write_qwen3(tmp_path / "te.gguf", len(tok), "Q4_K")[0]) as ckpt:
        te = {k: (np.array(t.data), t.qtype) for k, t in ckpt.tensors.items()}
        meta = {k: v for k, v in ckpt.metadata.items() if k.startswith("qwen3.")}
    gguf_dit = write_gguf(tmp_path / "dit-cut.gguf",
                          {k: v for k, v in dit.items() if "layers.0.feed_forward.w2" not in k}, "lumina2")
    gguf_te = write_gguf(tmp_path / "te-cut.gguf", {k: v for k, v in te.items() if "blk.1.ffn_up" not in k},
                         "qwen3", meta)
    st_dit = write(tmp_path / "dit-cut.safetensors", {k: v for k, v in comfy_dit(tiny_model_dir).items()
                                                       if "layers.0.feed_forward.w2" not in k})
    reads = []
    for name in ("get", "values"):
        method = getattr(GGUFCheckpoint, name)
        monkeypatch.setattr(GGUFCheckpoint, name,
                            lambda self, key, *a, _m=method, **k: reads.append(key) or _m(self, key, *a, **k))
    tail = (". The file is incomplete (a partial conversion or download) or holds another model: download it again "
            "or use another file")
    for kind, path, key, config in (("transformer", gguf_dit, "layers.0.feed_forward.w2.weight", AXES),
                                    ("transformer", st_dit, "layers.0.feed_forward.w2.weight",
                                     tiny_model_dir / "transformer" / "config.json"),
                                    ("text_encoder", gguf_te, "layers.1.mlp.up_proj.weight", None)):
        with pytest.raises(StateDictMismatchError) as err:
            load_component(kind, path, None, "cpu", config=config)
        assert str(err.value) == (f"{path}: {kind}: the checkpoint does not match the model. 1 missing keys, e.g. "
                                  f"['{key}']{tail}"), str(err.value)
    assert not [k for k in reads if k in dit], reads  # the DiT's weights were not read
    assert not [k for k in reads if k in te], reads  # nor the text encoder's
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--transformer",
                                       str(st_dit), "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: {st_dit}: transformer: the checkpoint does not match the model. 1 missing keys, e.g. "
        f"['layers.0.feed_forward.w2.weight']{tail}"], result.output


def test_a_wrong_file_for_a_component_is_refused_before_any_weight_is_read(tiny_model_dir, tmp_path, monkeypatch):
    """A GGUF text encoder given as the DiT and the reverse, or an encoder of an unsupported type after
    a good DiT: the files given are checked from their headers before any component loads (the DiT
    used to load whole before a wrong --text-encoder was refused), and the message says where each
    file goes."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from zimage_native import ZImagePipeline, loading
    from zimage_native.cli import main

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    dit, _ = write_dit(tmp_path / "dit.gguf", "Q4_K")
    te, _ = write_qwen3(tmp_path / "te.gguf", len(tok), "Q4_K")
    iq = retyped(te, tmp_path / "te-TQ1_0.gguf", "TQ1_0", lambda k: "ffn_down" in k)

    def no_loading(*args, **kwargs):
        raise AssertionError("a component was loaded before the check")

    monkeypatch.setattr(loading, "load_component", no_loading)
    monkeypatch.setattr(loading, "load_module", no_loading)
    swapped = (f"{te}: no transformer in this checkpoint (found: text_encoder); the text encoder goes in as "
               f"text_encoder= (--text-encoder); the DiT goes in as transformer= (--transformer)")
    single = dict(vae=tiny_model_dir / "vae", tokenizer=tiny_model_dir / "tokenizer", device="cpu")
    for files, message in ((dict(transformer=te, text_encoder=dit), swapped),
                           (dict(transformer=dit, text_encoder=iq), "the text encoder's tensor blk.0.ffn_down.weight "
                                                                    "is stored as TQ1_0")):
        with pytest.raises(UnsupportedFormatError) as err:
            ZImagePipeline.from_single_files(**files, **single)
        assert message in str(err.value)
        result = CliRunner().invoke(main, ["generate", "a cat", "--transformer", str(files["transformer"]),
                                           "--text-encoder", str(files["text_encoder"]), "--vae", str(single["vae"]),
                                           "--tokenizer", str(single["tokenizer"]), "--device", "cpu",
                                           "-o", str(tmp_path / "out.png")])
        assert result.exit_code == 1 and result.output.strip().splitlines() == [f"Error: {err.value}"], result.output
    with pytest.raises(UnsupportedFormatError, match=r"dit.gguf: no text_encoder in this checkpoint \(found: "
                                                     r"transformer\); the DiT goes in as transformer="):
        ZImagePipeline.from_pretrained(tiny_model_dir, text_encoder=dit, device="cpu")


def test_a_file_that_contradicts_the_model_folders_config_is_named_with_that_config(tiny_model_dir, tmp_path):
    """`--model FOLDER --transformer FILE` checks the file's shapes against the folder's config; a
    contradiction said 'transformer: config value cap_feat_dim=48 does not match the checkpoint ...',
    naming neither the file nor the config. Now both, and what to do."""
    from transformers import AutoTokenizer

    from zimage_native import ZImagePipeline
    from zimage_native.formats.infer import ConfigMismatchError

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    dit, _ = write_dit(tmp_path / "dit.gguf", "Q4_K")  # cap_feat_dim 256, the tiny folder's 48
    te, _ = write_qwen3(tmp_path / "te.gguf", len(tok), "Q4_K")
    config = tiny_model_dir / "transformer" / "config.json"
    with pytest.raises(ConfigMismatchError) as err:
        ZImagePipeline.from_pretrained(tiny_model_dir, transformer=dit, text_encoder=te, device="cpu")
    assert str(err.value) == (
        f"{dit}: transformer: config value cap_feat_dim=48 does not match the checkpoint, whose tensor shapes give "
        f"cap_feat_dim=256 (the config: {config}): the file holds another model than the config describes; give a "
        f"file of that model, or a model folder (--model) of the file's model")
    with pytest.raises(ConfigMismatchError, match=rf"^{dit}: transformer: config value dim=64 "):
        load_component("transformer", dit, None, "cpu", config={"dim": 64})


def test_the_checks_before_a_load_read_each_gguf_header_once(tiny_model_dir, tmp_path, monkeypatch):
    """A GGUF header takes seconds to parse (a Qwen3 GGUF holds its 151k-token tokenizer: 9-10 s an
    open on the shared CI CPU). The component, width and vocabulary checks opened the text encoder
    three times and the DiT twice before the load; now once each (then once more for the load, and
    once for the check that the file is whole)."""
    from transformers import AutoTokenizer

    from zimage_native import ZImagePipeline
    from zimage_native.formats import gguf

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    te, _ = write_qwen3(tmp_path / "te.gguf", len(tok), "Q8_0")
    dit, _ = write_dit(tmp_path / "dit.gguf", "Q8_0")
    opened: list[str] = []
    init = gguf.GGUFCheckpoint.__init__

    def counting(self, path, *args, **kwargs):
        opened.append(Path(path).name)
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFCheckpoint, "__init__", counting)
    ZImagePipeline.from_single_files(transformer=dit, vae=tiny_model_dir / "vae", text_encoder=te,
                                     tokenizer=tiny_model_dir / "tokenizer", device="cpu")
    assert (opened.count("dit.gguf"), opened.count("te.gguf")) == (3, 3), opened
