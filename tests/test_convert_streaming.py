"""``zimage convert`` writes safetensors files one tensor at a time (``converters/streaming.py``):
the same bytes as ``safetensors.torch.save_file`` for every dtype, the same files as the former
write-a-whole-shard-with-save_file writer for every layout and dtype the convert tests cover, and
at most a tensor or two of the output alive at once."""

from __future__ import annotations

import json
import os
import random
import struct
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zimage_native.converters import convert as conv
from zimage_native.converters.convert import convert_checkpoint

from .test_formats import TINY_AXES, comfy_dit, prefixed_te, to_fp8, write


def _split(path) -> tuple[int, dict, bytes]:
    """A safetensors file -> (header length, parsed header, data bytes)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8: 8 + n]), raw[8 + n:]


def assert_same_file(new, old):
    """Equal bytes, but for the order of the ``__metadata__`` entries (random in save_file's output)."""
    n_new, h_new, d_new = _split(new)
    n_old, h_old, d_old = _split(old)
    assert n_new == n_old and n_new % 8 == 0
    assert list(h_new) == list(h_old) and h_new == h_old  # tensors in the same order, same entries
    assert d_new == d_old
    a, b = load_file(str(new)), load_file(str(old))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
    with safe_open(str(new), "pt") as f, safe_open(str(old), "pt") as g:
        assert f.metadata() == g.metadata() and list(f.keys()) == list(g.keys())


# ----------------------------------------------------------------------------------- the writer


def _every_dtype() -> dict[str, torch.Tensor]:
    from zimage_native.converters.streaming import ST_DTYPES

    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(ST_DTYPES):
        for name, shape in ((f"w{i}", (3, 5)), (f"b{i}", (7,)), (f"scalé{i}", ()), (f"empty{i}", (0, 4))):
            values = torch.randn(shape, generator=g) * 10
            out[name] = (values > 0) if dtype == torch.bool else values.to(dtype)
    return out


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"note": 'é\n\x01"\\ \u2028'}])
def test_writer_bytes_equal_save_file_for_every_dtype_in_any_order(tmp_path, metadata):
    from zimage_native.converters.streaming import SafetensorsWriter

    tensors = _every_dtype()
    save_file(tensors, tmp_path / "old.safetensors", metadata=metadata)
    items = list(tensors.items())
    random.Random(0).shuffle(items)
    with SafetensorsWriter(tmp_path / "new.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()],
                           metadata) as w:
        for name, value in items:
            w.write(name, value)
    # one metadata entry at most: save_file's bytes are deterministic, and ours equal them
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()


def test_writer_with_several_metadata_entries_differs_only_in_their_order(tmp_path):
    from zimage_native.converters.streaming import SafetensorsWriter

    tensors = _every_dtype()
    metadata = {"format": "pt", "zimage_native.layout": "comfyui", "a": "1", "b": "2"}
    save_file(tensors, tmp_path / "old.safetensors", metadata=metadata)
    with SafetensorsWriter(tmp_path / "new.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()],
                           metadata) as w:
        for name, value in tensors.items():
            w.write(name, value)
    assert_same_file(tmp_path / "new.safetensors", tmp_path / "old.safetensors")
    assert list(_split(tmp_path / "new.safetensors")[1]["__metadata__"]) == list(metadata)  # ours: as given


def test_writer_refuses_what_the_plan_does_not_hold(tmp_path):
    from zimage_native.converters.streaming import SafetensorsWriter

    plan = [("a", "BF16", (2, 3)), ("b", torch.float32, ())]
    w = SafetensorsWriter(tmp_path / "x.safetensors", plan)
    with pytest.raises(ValueError, match=r"a is planned as BF16 \[2, 3\], got F32 \[2, 3\]"):
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"planned as BF16 \[2, 3\], got BF16 \[3, 2\]"):
        w.write("a", torch.zeros(3, 2, dtype=torch.bfloat16))
    with pytest.raises(KeyError, match="c is not planned"):
        w.write("c", torch.zeros(()))
    w.write("a", torch.ones(3, 2, dtype=torch.bfloat16).t())  # not contiguous: written in logical order
    with pytest.raises(ValueError, match="a is already written"):
        w.write("a", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"1 planned tensor\(s\) not written .* e.g. b"):
        w.close()
    with pytest.raises(ValueError, match="two tensors of one name"):
        SafetensorsWriter(tmp_path / "y.safetensors", [("a", "F32", ()), ("a", "F32", ())])
    with pytest.raises(TypeError, match="must be strings"):
        SafetensorsWriter(tmp_path / "y.safetensors", [("a", "F32", ())], {"n": 1})
    with SafetensorsWriter(tmp_path / "z.safetensors", plan) as w:
        w.write("b", torch.tensor(2.5))
        w.write("a", torch.arange(6, dtype=torch.bfloat16).reshape(3, 2).t())
    out = load_file(tmp_path / "z.safetensors")
    assert torch.equal(out["a"], torch.arange(6, dtype=torch.bfloat16).reshape(3, 2).t()) and out["b"] == 2.5



def test_writer_places_blocks_of_rows_in_any_order(tmp_path):
    """``write(name, block, row=)``: the parts of a fused tensor, written at their rows as they come
    (the parts of a diffusers q|k|v, without their join): the file equals ``save_file``'s of the
    whole tensor, the tensor is complete when its last row is, and a block that overlaps rows
    written, leaves the tensor or is not of its columns is refused."""
    from zimage_native.converters.streaming import SafetensorsWriter

    g = torch.Generator().manual_seed(0)
    whole = {"qkv": torch.randn(6, 4, generator=g).bfloat16(), "b": torch.randn(3, generator=g)}
    save_file(whole, tmp_path / "old.safetensors")
    plan = [(k, v.dtype, v.shape) for k, v in whole.items()]
    with SafetensorsWriter(tmp_path / "new.safetensors", plan) as w:
        assert w.write("qkv", whole["qkv"][4:], row=4) is False
        with pytest.raises(ValueError, match="qkv: rows 3 to 4 are written already in part"):
            w.write("qkv", whole["qkv"][3:5], row=3)
        with pytest.raises(ValueError, match=r"qkv is planned as BF16 \[6, 4\], got BF16 \[2, 4\] at row 5"):
            w.write("qkv", whole["qkv"][:2], row=5)
        with pytest.raises(ValueError, match=r"got BF16 \[2, 3\] at row 0"):
            w.write("qkv", whole["qkv"][:2, :3], row=0)
        assert w.write("b", whole["b"]) is True
        assert w.write("qkv", whole["qkv"][:2], row=0) is False
        assert w.write("qkv", whole["qkv"][2:4], row=2) is True
        with pytest.raises(ValueError, match="qkv is already written"):
            w.write("qkv", whole["qkv"][:2], row=0)
    assert_same_file(tmp_path / "new.safetensors", tmp_path / "old.safetensors")
    w = SafetensorsWriter(tmp_path / "x.safetensors", plan)
    w.write("b", whole["b"])
    w.write("qkv", whole["qkv"][:4], row=0)
    with pytest.raises(RuntimeError, match=r"1 planned tensor\(s\) not written .* e.g. qkv"):  # rows 4 and 5 missing
        w.close()


# ----------------------------------------------------------------------------------- old writer vs new


def _old_write(plan, folder, ckpt, info, dst_km, out_dtype, baker, metadata):
    """The former ``convert._write``: each shard collected in a dict, then ``save_file``."""
    shard_of = {k: i for i, keys in enumerate(plan.shards) for k in keys}
    remaining = [len(keys) for keys in plan.shards]
    buffers = [{} for _ in plan.shards]
    for key, tensor, _ in conv._stream(ckpt, info, dst_km, plan.component, out_dtype, baker, meta=False, join=True):
        i = shard_of[key]
        buffers[i][key] = tensor.contiguous()
        remaining[i] -= 1
        if remaining[i] == 0:
            save_file(buffers[i], str(folder / plan.shard_files[i]), metadata=metadata)
            buffers[i] = {}
    assert not any(remaining)


def _lora_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_layers_0_attention_qkv.lora_down.weight": torch.randn(4, 64, generator=g) * 0.1,
          "lora_unet_layers_0_attention_qkv.lora_up.weight": torch.randn(192, 4, generator=g) * 0.1,
          "lora_unet_layers_0_attention_qkv.alpha": torch.tensor(2.0)}
    return write(tmp_path / "lora.safetensors", sd)


def _gguf_dit(tmp_path):
    pytest.importorskip("gguf")
    from .test_gguf import write_dit

    mix = ("Q4_K", "Q6_K", "Q8_0", "F16")
    return write_dit(tmp_path / "dit.gguf", lambda name, i: mix[i % 4])[0]


CASES = {  # name: (source, destination, layout, options)
    "dit-comfyui-keep": (lambda d, t: d / "transformer", "o.safetensors", "comfyui", {}),
    "dit-comfyui-bf16": (lambda d, t: d / "transformer", "o.safetensors", "comfyui", {"dtype": "bf16"}),
    "dit-comfyui-fp16": (lambda d, t: d / "transformer", "o.safetensors", "comfyui", {"dtype": "fp16"}),
    "dit-comfyui-fp8": (lambda d, t: d / "transformer", "o.safetensors", "comfyui", {"dtype": "fp8"}),
    "dit-fused-bf16": (lambda d, t: d / "transformer", "o.safetensors", "native-fused", {"dtype": "bf16"}),
    "dit-sharded": (lambda d, t: d / "transformer", "o", "comfyui", {"shard_size": "100KB"}),
    "dit-diffusers-folder": (lambda d, t: write(t / "c.safetensors", comfy_dit(d)), "o", "diffusers",
                             {"config": TINY_AXES, "dtype": "bf16"}),
    "dit-fp8-source-fp32": (lambda d, t: write(t / "f8.safetensors", to_fp8(comfy_dit(d, "", norm_final=False),
                                                                             True)[0]),
                            "o.safetensors", "diffusers", {"dtype": "fp32"}),
    "dit-lora-fp8": (lambda d, t: d / "transformer", "o.safetensors", "comfyui",
                     {"dtype": "fp8", "loras": lambda t: [(str(_lora_file(t)), 0.7)]}),
    "dit-gguf-bf16": (lambda d, t: _gguf_dit(t), "o.safetensors", "comfyui", {"dtype": "bf16"}),
    "vae-ldm": (lambda d, t: d / "vae", "o.safetensors", "ldm", {}),
    "vae-diffusers-fp16": (lambda d, t: d / "vae", "o", "diffusers", {"dtype": "fp16"}),
    "te-comfyui-fp8": (lambda d, t: write(t / "te.safetensors", prefixed_te(d, lm_head=False)), "o.safetensors",
                       "bare", {"dtype": "fp8"}),
    "te-transformers-keep": (lambda d, t: d / "text_encoder", "o.safetensors", "transformers", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_files_equal_the_former_writers(tiny_model_dir, tmp_path, monkeypatch, case):
    source, dst, layout, options = CASES[case]
    options = dict(options)
    if "loras" in options:
        options["loras"] = options["loras"](tmp_path)
    src = source(tiny_model_dir, tmp_path)
    new_plan = convert_checkpoint(src, tmp_path / "new" / dst, layout, **options)
    monkeypatch.setattr(conv, "_write", _old_write)
    old_plan = convert_checkpoint(src, tmp_path / "old" / dst, layout, **options)
    assert new_plan.shard_files == old_plan.shard_files
    new_dir, old_dir = (tmp_path / "new" / dst, tmp_path / "old" / dst) if new_plan.folder else (
        tmp_path / "new", tmp_path / "old")
    assert sorted(os.listdir(new_dir)) == sorted(os.listdir(old_dir))
    for name in new_plan.shard_files:
        assert_same_file(new_dir / name, old_dir / name)


# ----------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("dst, options", [("bf16.safetensors", {"dtype": "bf16"}),
                                          ("fp8.safetensors", {"dtype": "fp8"}),
                                          ("keep.safetensors", {}),
                                          ("sharded", {"shard_size": "300KB"})])
def test_one_output_tensor_is_alive_at_a_time(tiny_model_dir, tmp_path, monkeypatch, dst, options):
    """Every tensor the conversion makes is watched (a weakref): when the next one is made, none
    made before it may still be alive. The former writer kept a whole shard (here the whole file,
    60-odd tensors) alive until ``save_file``; then the streaming generators still held the tensor
    they had last passed on while the next one was read (two at once)."""
    stream = conv._stream
    alive_peak = [0]
    made, keys = [], set()

    def watched(*args, meta, **kwargs):
        for key, tensor, row in stream(*args, meta=meta, **kwargs):
            if not meta:
                made.append(weakref.ref(tensor))
                keys.add(key)
                alive_peak[0] = max(alive_peak[0], sum(r() is not None for r in made))
            yield key, tensor, row

    monkeypatch.setattr(conv, "_stream", watched)
    plan = convert_checkpoint(tiny_model_dir / "transformer", tmp_path / dst, "comfyui", **options)
    assert len(keys) == len(plan.tensors) > 60
    assert alive_peak[0] <= 1, f"{alive_peak[0]} of {len(made)} output tensors alive at once"
