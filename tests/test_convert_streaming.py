"""``converters/streaming.py``: safetensors files written one tensor at a time, with the same bytes
as ``safetensors.torch.save_file`` for every dtype."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file



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
