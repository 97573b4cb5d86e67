"""Safetensors containers read from their headers: what a file is, its tensors, and their bytes on demand.

What a file is comes from its first bytes (:func:`sniff`), never from its name; a safetensors
header (8-byte length + JSON) gives every tensor's dtype, shape and byte range without reading
data. :class:`Checkpoint` is the tensors of one file, or of a component folder (sharded or not),
by name.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

WEIGHT_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class UnsupportedFormatError(ValueError):
    """A checkpoint we recognise but cannot load (the message names the format), or do not recognise."""


class CorruptCheckpointError(UnsupportedFormatError):
    """A file cut short (an interrupted download or copy) or not the container it should be.

    The message is one line: ``PATH: truncated or not a safetensors file (what is wrong, in numbers)``.
    """

    def __init__(self, path: str | os.PathLike, container: str = "safetensors", detail: str = ""):
        self.path, self.container, self.detail = Path(path), container, detail
        super().__init__(f"{path}: truncated or not a {container} file" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]  # byte range inside the file's data section
    data_start: int = 0  # where the data section starts in the file (8 + the header's length)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype)


def sniff(path: Path) -> str:
    """'gguf', 'pickle', 'safetensors' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 200_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip, or a raw pickle stream
        return "pickle"
    return "unknown"


def refuse_non_safetensors(path: Path) -> None:
    """Raise :class:`UnsupportedFormatError` naming what ``path`` is, unless it is a safetensors file."""
    kind = sniff(path)
    if kind == "gguf":
        raise UnsupportedFormatError(
            f"{path}: a GGUF file, where a safetensors file is needed; GGUF DiTs and Qwen3 text encoders load "
            f"as components (load_component, from_pretrained(transformer=/text_encoder=), --transformer, "
            f"--text-encoder)")
    if kind == "pickle":
        raise UnsupportedFormatError(
            f"{path}: pickled PyTorch checkpoint (.pt/.ckpt/.bin) is refused (pickle can run code); "
            f"convert it to safetensors first")
    if kind != "safetensors":
        size = path.stat().st_size
        raise CorruptCheckpointError(path, detail="the file is empty" if size == 0 else
                                     f"unrecognised header; {size:,} bytes")


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header (8-byte length + JSON): tensor infos and ``__metadata__``.

    No tensor data is read, but the file must be long enough for every tensor the header lists and
    the header must be well formed; otherwise :class:`CorruptCheckpointError` says what is wrong.
    """
    path = Path(path)
    refuse_non_safetensors(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise CorruptCheckpointError(path, detail=f"the header needs {8 + n:,} bytes, the file has {size:,}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        tensors = {k: TensorInfo(v["dtype"], tuple(v["shape"]), path, tuple(v["data_offsets"]), 8 + n)
                   for k, v in header.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSON, or entries of the wrong form
        raise CorruptCheckpointError(path, detail=f"unreadable header: {type(e).__name__}: {e}") from None
    end = max((t.offsets[1] for t in tensors.values()), default=0)
    if 8 + n + end > size:
        raise CorruptCheckpointError(path, detail=f"its tensors need {8 + n + end:,} bytes, the file has {size:,}")
    return tensors, metadata


def check_safetensors(path: str | os.PathLike) -> Path:
    """Raise a one-line :class:`UnsupportedFormatError` (:class:`CorruptCheckpointError` for a cut or
    damaged file) unless ``path`` is a complete safetensors file; returns the path. Reads the header only.

    Every loader calls this (or :func:`read_header`) before handing a file to ``safetensors``, whose
    own errors are tracebacks.
    """
    read_header(path)
    return Path(path)


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a component: a file, or a folder with an index json or one weight file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such weight file or folder: {path}")
    for name in WEIGHT_INDEX_NAMES:
        index = path / name
        if index.is_file():
            from ..config import read_json

            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map: the index is damaged; download or copy it again")
            files = [path / shard for shard in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(
                    f"{index} lists shards that are not there: {absent}; the folder is incomplete (a download "
                    f"or copy that stopped part way): download the missing files again (for a Hub id, a run "
                    f"with the network completes the cache)")
            return files
    for name in WEIGHT_FILE_NAMES:
        if (path / name).is_file():
            return [path / name]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return [path / found[0]]
    raise FileNotFoundError(
        f"no safetensors weights in {path}: expected one of {list(WEIGHT_FILE_NAMES + WEIGHT_INDEX_NAMES)}"
        + (f", found several files without an index: {found}" if found else "")
    )


def _component_files(path: Path) -> list[Path]:
    if path.is_dir() and (path / "model_index.json").is_file():
        component = f"give one component (a file, or a folder such as {path / 'transformer'})"
        error = UnsupportedFormatError(f"{path} is a whole model folder (diffusers layout): load it with "
                                       f"ZImagePipeline.from_pretrained, or {component}")
        # the command line has no from_pretrained: generate and info take the folder as --model / MODEL, and
        # convert takes one component
        error.cli_message = (f"{path} is a whole model folder (diffusers layout): {component} (zimage generate "
                             f"takes the whole folder as --model)")
        raise error
    return safetensors_files(path)


class Checkpoint:
    """The tensors of one file, or of a component folder (sharded or not), by name. Data is read on demand.

    ``copies``: :meth:`get` reads a tensor of two or more dimensions into memory of its own
    (:meth:`read_rows`) rather than handing out a view of the file's memory map, for a load whose
    weights are copied again at once (into the pinned slabs of ``offload="blocks"``): the pages a
    copy reads from the map stay resident until the map is closed, so the file and the copies were
    held together at the end of the load."""

    def __init__(self, path: str | os.PathLike, copies: bool = False):
        self.path, self.copies = Path(path), copies
        self.files = _component_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            tensors, metadata = read_header(file)
            twice = sorted(set(tensors) & set(self.tensors))
            if twice:
                raise ValueError(f"{self.path}: tensors stored in two files, e.g. {twice[:3]}")
            self.tensors.update(tensors)
            self.metadata.update(metadata)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._files: dict[Path, Any] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        self._files.clear()
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def scratch(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` for :meth:`read_rows`, one per checkpoint, reused
        (and grown) from tensor to tensor until :meth:`close`: a block buffer allocated per tensor
        left the allocator's heap fragmented (190 MiB kept after a 2.8 GB fp32 load)."""
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(0, dtype=torch.uint8)  # the old one freed first
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        return self._scratch

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[key]
        if self.copies and len(info.shape) >= 2 and info.torch_dtype is not None:
            return self.read_rows(key, 0, info.shape[0])
        if info.file not in self._handles:
            handle = safe_open(str(info.file), framework="pt", device="cpu")
            self._handles[info.file] = self._stack.enter_context(handle)
        return self._handles[info.file].get_tensor(key)

    def read_rows(self, key: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of a tensor of two or more dimensions, as
        stored, read from the file into new memory.

        :meth:`get` hands out views of a memory map of the whole file: every page a conversion reads
        (a dequantisation, a cast) stays in the process's resident memory until the last view of the
        map is gone, which a kept tensor (a norm weight) makes the end of the process. Read here, a
        tensor that is converted costs one block of rows at a time and maps nothing. ``buffer``: a
        uint8 tensor of enough bytes to read into (reused by a caller reading block after block:
        fresh memory for each block costs page faults); the result is then a view of it."""
        info = self.tensors[key]
        dtype = info.torch_dtype
        if dtype is None or len(info.shape) < 2:
            raise ValueError(f"{self.path}: {key} ({info.dtype}, shape {info.shape}) is not read by rows")
        stop = min(stop, info.shape[0])
        row = math.prod(info.shape[1:]) * dtype.itemsize
        size = max(0, stop - start) * row
        if buffer is not None and (buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < size):
            raise ValueError(f"read_rows({key!r}, {start}, {stop}): the buffer must be a 1-d uint8 tensor of at "
                             f"least {size} bytes, got {buffer.dtype} of shape {tuple(buffer.shape)}")
        out = torch.empty(size, dtype=torch.uint8) if buffer is None else buffer[:size]
        if info.file not in self._files:
            self._files[info.file] = self._stack.enter_context(open(info.file, "rb", buffering=0))
        f, view, done = self._files[info.file], memoryview(out.numpy()), 0
        f.seek(info.data_start + info.offsets[0] + start * row)
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CorruptCheckpointError(info.file, detail=f"{key} ends before its last row")
            done += got
        return out.view(dtype).reshape(max(0, stop - start), *info.shape[1:])

    def meta(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        dtype = info.torch_dtype
        if dtype is None:
            raise UnsupportedFormatError(f"{self.path}: tensor {key} has dtype {info.dtype}, which is not supported")
        return torch.empty(info.shape, dtype=dtype, device="meta")

    def raw_bytes(self, key: str) -> bytes:
        """The stored bytes of a (small) tensor, without torch: used for quantisation markers."""
        info = self.tensors[key]
        with open(info.file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n + info.offsets[0])
            return f.read(info.offsets[1] - info.offsets[0])

