"""Write a safetensors file one tensor at a time, from a plan of names, dtypes and shapes.

``safetensors.torch.save_file`` needs every tensor of the file in memory at once; this writer needs
only the tensor being written. It lays the file out as ``save_file`` does (safetensors 0.4 - 0.8):

* 8 bytes: the header length, little-endian u64;
* the header: compact JSON (``__metadata__`` first, then one entry per tensor with ``dtype``,
  ``shape`` and ``data_offsets`` relative to the end of the header), padded with spaces to a
  multiple of 8 bytes, so every tensor's data is 8-byte aligned in the file;
* the data, in the library's order: by dtype, widest first in the order of its ``Dtype`` enum
  (``_ORDER`` below), then by name.

So the bytes equal ``save_file``'s for the same tensors, except for the order of the
``__metadata__`` entries, which ``save_file`` writes in a Rust ``HashMap``'s random order (it changes
from one process to the next); here they keep the order of the given dict. The tensors can come in
any order: each is written at its planned offset.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Iterable, Mapping, Sequence

import torch

#: safetensors' dtype names (the spec's strings), for the dtypes torch can hold.
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("complex64", "C64")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _st
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8}
#: The order of safetensors' ``Dtype`` enum (increasing alignment); ``save_file`` writes the data in
#: the reverse of this order, and by name within one dtype.
_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
          "F64", "I64", "U64"]


def save_order(entries: Iterable[tuple[str, str]]) -> list[str]:
    """The names of ``(name, safetensors dtype)`` pairs in the order ``save_file`` lays them out."""
    return [name for name, st in sorted(entries, key=lambda e: (-_ORDER.index(e[1]), e[0].encode()))]


def build_header(tensors: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """``(name, dtype, shape)`` triples -> (the file's first bytes: length and padded JSON header,
    the data offsets of every tensor relative to the end of those bytes)."""
    info = {name: (st, [int(d) for d in shape]) for name, st, shape in tensors}
    if len(info) != len(tensors):
        raise ValueError("a safetensors file cannot hold two tensors of one name")
    if metadata is not None and "__metadata__" in info:
        raise ValueError("'__metadata__' is not a tensor name")
    header: dict = {}
    if metadata is not None:  # save_file(metadata=None) writes no __metadata__ entry; {} writes an empty one
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata keys and values must be strings")
        header["__metadata__"] = dict(metadata)
    offsets = {}
    offset = 0
    for name in save_order((name, st) for name, (st, _) in info.items()):
        st, shape = info[name]
        n = ITEM_SIZES[st]
        for d in shape:
            n *= d
        offsets[name] = (offset, offset + n)
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    # serde_json's compact output: no spaces, non-ASCII text as UTF-8, the same escapes as json.dumps.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class SafetensorsWriter:
    """``with SafetensorsWriter(path, [(name, dtype, shape), ...], metadata) as w: w.write(name, t)``,
    once per planned tensor, in any order; the file is complete when the block ends without error
    (a missing tensor is an error). ``dtype`` is a safetensors name (``"BF16"``) or a torch dtype."""

    def __init__(self, path: str | os.PathLike, tensors: Sequence[tuple[str, str | torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this writer needs a little-endian machine")
        planned = [(name, st if isinstance(st, str) else ST_DTYPES[st], tuple(shape)) for name, st, shape in tensors]
        self._info = {name: (st, shape) for name, st, shape in planned}
        head, self._offsets = build_header(planned, metadata)
        self._base = len(head)
        self._pending = set(self._info)
        self._rows: dict[str, list[tuple[int, int]]] = {}  # the row blocks written of the tensors begun
        self.path = path
        self._file = open(path, "wb")
        try:
            self._file.write(head)
        except BaseException:
            self._file.close()
            raise

    def write(self, name: str, tensor: torch.Tensor, row: int | None = None) -> bool:
        """Write one planned tensor's bytes at its offset (from CPU; other devices are copied there).
        ``row``: ``tensor`` is the block of the planned tensor's rows (along its first dim) that
        begins at ``row``, written at its place: the blocks come in any order, each row once (the
        parts of a fused q|k|v, placed without a join). Returns whether the tensor is complete."""
        if name not in self._info:
            raise KeyError(f"{name} is not planned for {self.path}")
        if name not in self._pending:
            raise ValueError(f"{name} is already written")
        st, shape = self._info[name]
        got = ST_DTYPES.get(tensor.dtype)
        rows = shape[0] if shape else 0
        first, n = (0, rows) if row is None else (row, tensor.shape[0] if tensor.ndim else 0)
        inside = row is None or (len(shape) > 0 and 0 <= first and first + n <= rows)
        if got != st or tuple(tensor.shape) != (shape if row is None else (n, *shape[1:])) or not inside:
            at = "" if row is None else f" at row {row}"
            raise ValueError(f"{name} is planned as {st} {list(shape)}, got {got or tensor.dtype} "
                             f"{list(tensor.shape)}{at}")
        written = self._rows.setdefault(name, [])
        if any(a < first + n and first < b for a, b in written):
            raise ValueError(f"{name}: rows {first} to {first + n - 1} are written already in part")
        start, end = self._offsets[name]
        if end > start and (n or row is None):
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.seek(self._base + start + (0 if row is None else first * ((end - start) // rows)))
            self._file.write(memoryview(data))
            del data
        written.append((first, first + n))
        if sum(b - a for a, b in written) < rows:
            return False
        del self._rows[name]
        self._pending.discard(name)
        return True

    def close(self) -> None:
        """Close the file; an error when a planned tensor was not written."""
        if self._file.closed:
            return
        self._file.close()
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"{len(missing)} planned tensor(s) not written to {self.path}, e.g. {missing[0]}")

    def abort(self) -> None:
        """Close the file as it is (incomplete when tensors are missing); removing it is the caller's part."""
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
