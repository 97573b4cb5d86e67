"""A component's tensors streamed under canonical names (our module names), read one at a time.

The path of every tensor: read from the file -> fp8 dequantised to fp32 (unless asked to keep
it) -> renamed / split by the layout's key map (``converters.keymap.to_canonical``). The same
stream runs on meta tensors built from the header alone, which gives the canonical shapes that
config inference reads.

A tensor kept as stored is a view of the file's memory map (no copy). A tensor that is converted
(fp8 dequantised, or cast to another dtype) is read from the file by blocks of rows into its
result instead (``Checkpoint.read_rows``): read through the map, its pages stayed resident beside
the result until the map was dropped, and a kept view (a norm weight) keeps the map to the end.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from ..converters.keymap import to_canonical
from .checkpoint import Checkpoint
from .detect import ComponentInfo
from .fp8 import FP8_DTYPES, TORCH_FP8, dequantize, is_aux, scale_for
from .microscale import BLOCK_FORMATS, block_scales, logical_shape, scaled_values
from .microscale import dequantize as dequantize_blocks


class StoredRows:
    """A tensor of a file, of two or more dimensions, as stored, read by blocks of rows where it is
    used (:func:`~zimage_native.quantize.int8_rows` and ``int4_groups`` quantise it so): taken whole
    from the file's memory map, every page read stayed resident beside the result until the file
    was done. ``shape`` and ``dtype`` are the stored ones; :meth:`rows` reads rows ``i:j`` into the
    checkpoint's scratch buffer (valid until the next read); valid while the checkpoint is open."""

    def __init__(self, ckpt: Checkpoint, key: str):
        self.ckpt, self.key = ckpt, key
        info = ckpt.tensors[key]
        self.shape, self.dtype = torch.Size(info.shape), info.torch_dtype
        self.row_bytes = math.prod(info.shape[1:]) * self.dtype.itemsize

    def rows(self, i: int, j: int) -> torch.Tensor:
        j = min(j, self.shape[0])
        return self.ckpt.read_rows(self.key, i, j, self.ckpt.scratch(max(0, j - i) * self.row_bytes))

    def whole(self) -> torch.Tensor:
        """The tensor in new memory (for a tensor that is not quantised)."""
        return self.rows(0, self.shape[0]).clone()


class DequantizedRows(StoredRows):
    """A ComfyUI ``int8_tensorwise`` weight (int8 values x ``weight_scale``, one value or one per
    row) read by blocks of rows where it is used, each block dequantised to fp32 as
    :func:`~zimage_native.formats.fp8.dequantize` does: the rows of the whole dequantised weight,
    which is never held (quantised while loading, a text encoder's int8 weight was dequantised
    whole to fp32 first). ``dtype`` is fp32."""

    def __init__(self, ckpt: Checkpoint, key: str, scale: torch.Tensor):
        super().__init__(ckpt, key)  # row_bytes of the stored int8 values
        self.scale, self.dtype = scale.to(torch.float32, copy=True), torch.float32  # (not a view of the map)

    def rows(self, i: int, j: int) -> torch.Tensor:
        s = self.scale[i:j] if self.scale.numel() > 1 else self.scale
        return super().rows(i, j).to(torch.float32).mul_(s)

    def whole(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])  # new memory already


class ValueRows:
    """A quantised 2-d weight whose fp32 values are computed by blocks of rows where they are used
    (``values[i:j]``: rows ``i:j`` in new memory, ``read(i, j)`` of the whole weight), never held
    whole: ``zimage convert`` to fp8 quantises them so (``converters.convert.fp8_blocks``, whose
    amax pass and codes read rows like a tensor's). Dequantised whole to fp32 first, a real-width
    11520 x 3840 q|k|v was 169 MiB at once for a 42 MiB fp8 result. :meth:`chunk` splits it along
    its rows as ``torch.chunk`` does (the parts of a fused weight, ``keymap.to_canonical``); a part
    reads its rows of the weight. Each value depends on its row alone, so the blocks are the rows of
    the whole dequantisation, bit for bit."""

    dtype, device, is_meta, ndim = torch.float32, torch.device("cpu"), False, 2

    def __init__(self, shape: tuple[int, int], read: Callable[[int, int], torch.Tensor], start: int = 0):
        self.shape, self.read, self.start = torch.Size(shape), read, start

    def numel(self) -> int:
        return self.shape.numel()

    def __getitem__(self, rows: slice) -> torch.Tensor:
        i, j, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("ValueRows reads consecutive rows only")
        return self.read(self.start + i, self.start + max(i, j))

    def chunk(self, n: int, dim: int = 0) -> list["ValueRows"]:
        if dim != 0:
            raise ValueError("ValueRows splits along its rows only")
        size = -(-self.shape[0] // n)
        return [ValueRows((min(size, self.shape[0] - i), self.shape[1]), self.read, self.start + i)
                for i in range(0, self.shape[0], size)]


def _value_rows(ckpt: Checkpoint, key: str, fmt: str | None) -> ValueRows | None:
    """The rows of a 2-d fp8, int8 or block-scaled (``fmt``) weight of the file, dequantised to fp32
    by blocks as read (``Checkpoint.read_rows``); ``None`` for a weight of another shape or with a
    scale that is neither one value nor one a row (dequantised whole, broadcast)."""
    t_info = ckpt.tensors[key]
    if len(t_info.shape) != 2:
        return None
    row_bytes = t_info.numel // max(1, t_info.shape[0])  # 1 byte a value, or an nvfp4 pair

    def codes(i: int, j: int) -> torch.Tensor:
        return ckpt.read_rows(key, i, j, ckpt.scratch((j - i) * row_bytes))

    if fmt in BLOCK_FORMATS:
        scales = block_scales(ckpt, key, fmt)
        return ValueRows(logical_shape(fmt, t_info.shape),
                         lambda i, j: scaled_values(codes(i, j), scales[i:j], fmt))
    scale_key = scale_for(ckpt, key)
    scale = ckpt.get(scale_key).to(torch.float32, copy=True) if scale_key else None  # (not a view of the map)
    if scale is None or scale.numel() == 1:
        return ValueRows(t_info.shape, lambda i, j: dequantize(codes(i, j), scale, torch.float32))
    if scale.shape[0] == t_info.shape[0] and scale.numel() == t_info.shape[0]:  # one a row
        return ValueRows(t_info.shape, lambda i, j: dequantize(codes(i, j), scale[i:j], torch.float32))
    return None


def raw_items(ckpt: Checkpoint, info: ComponentInfo, meta: bool, dequant: bool = True,
              dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None, rows: bool = False,
              keep_stored: bool = False, by_rows: Callable[[str], bool] | None = None
              ) -> Iterator[tuple[str, torch.Tensor]]:
    """The component's weights in file order (quantisation keys consumed), as stored or dequantised
    to ``dtype`` (fp32 when None; meta tensors say fp32); comfy_quant nvfp4 and mxfp8 weights (by
    blocks of rows, :mod:`.microscale`) and int8 weights are dequantised whatever ``dequant`` says,
    unless ``keep_stored``: then they come as stored (int8, nvfp4's uint8 code pairs, mxfp8's e4m3
    values; meta tensors say so too) for a DiT that keeps them (``loading.load_kept_fp8``), their
    scales read apart; other floating tensors of two or more
    dimensions are cast to ``dtype`` (when given) as they are read. A key that the key map drops (a
    tied ``lm_head``), or none of whose canonical keys ``keep`` accepts, is not read at all.
    ``rows``: a tensor of two or more dimensions kept as stored comes as :class:`StoredRows` (for a
    key map that only renames: the text encoder's), not as a view of the file's memory map, and
    with ``dequant=False`` a comfy_quant int8 weight as :class:`DequantizedRows`. ``by_rows``: a
    quantised 2-d weight (fp8, int8, nvfp4, mxfp8) all of whose canonical keys it accepts comes as
    :class:`ValueRows`, dequantised by blocks of rows where used, not whole."""
    keymap = info.keymap()
    for key in info.keys:
        if is_aux(key):
            continue
        targets = keymap.canonical_keys(key)
        if not targets or (keep is not None and not any(keep(t) for t in targets)):
            continue
        t_info = ckpt.tensors[key]
        fmt = info.comfy_quant.get(key)
        int8 = fmt == "int8_tensorwise"  # dequantised (int8 values * weight_scale)...
        quantised = fmt in BLOCK_FORMATS or int8 or (t_info.dtype in FP8_DTYPES and dequant)
        lazy = (_value_rows(ckpt, key, fmt) if quantised and not keep_stored and not meta and by_rows is not None
                and all(by_rows(t) for t in targets) else None)
        if lazy is not None:
            yield key, lazy
        elif fmt in BLOCK_FORMATS and keep_stored:  # nvfp4 / mxfp8 kept...
            yield key, ckpt.meta(key) if meta else ckpt.get(key)
        elif fmt in BLOCK_FORMATS:  # ... or dequantised, by blocks of rows
            yield key, (torch.empty(logical_shape(fmt, t_info.shape), dtype=torch.float32, device="meta") if meta
                        else dequantize_blocks(ckpt, key, fmt, dtype or torch.float32))
        elif int8 and keep_stored:  # ... unless kept
            yield key, ckpt.meta(key) if meta else ckpt.get(key)
        elif int8 and rows and not dequant and not meta and len(t_info.shape) >= 2:
            yield key, DequantizedRows(ckpt, key, ckpt.get(scale_for(ckpt, key)))
        elif (t_info.dtype in FP8_DTYPES and dequant) or int8:
            if meta:
                yield key, torch.empty(t_info.shape, dtype=torch.float32, device="meta")
            else:
                scale_key = scale_for(ckpt, key)
                scale = ckpt.get(scale_key) if scale_key else None
                read = (lambda i, j, key=key, row=t_info.numel // max(1, t_info.shape[0]):  # (1 byte a value)
                        ckpt.read_rows(key, i, j, ckpt.scratch((j - i) * row))) if len(t_info.shape) >= 2 else None
                yield key, dequantize(ckpt.meta(key) if read else ckpt.get(key), scale, dtype or torch.float32, read)
        elif meta:
            yield key, ckpt.meta(key)
        elif converted(t_info, dtype):
            yield key, cast_rows(ckpt, key, dtype)
        elif rows and len(t_info.shape) >= 2 and t_info.torch_dtype is not None:
            yield key, StoredRows(ckpt, key)
        else:
            yield key, ckpt.get(key)


#: Elements read and cast at a time by :func:`cast_rows` (16 MiB of fp32).
CAST_ELEMENTS = 2**22


def converted(info, dtype: torch.dtype | None) -> bool:
    """Whether a stored (non-fp8) tensor is cast to ``dtype`` by rows as it is read."""
    stored = info.torch_dtype
    return (dtype is not None and stored is not None and stored.is_floating_point and stored not in TORCH_FP8
            and stored != dtype and len(info.shape) >= 2)


def cast_rows(ckpt: Checkpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the file cast to ``dtype``, read by blocks of :data:`CAST_ELEMENTS` elements into
    the checkpoint's scratch buffer (``Checkpoint.read_rows``): the values of ``ckpt.get(key).to(dtype)``."""
    info = ckpt.tensors[key]
    out = torch.empty(info.shape, dtype=dtype)
    row = math.prod(info.shape[1:])  # (not out[0]: a tensor may have no rows)
    step = max(1, CAST_ELEMENTS // max(1, row))
    buffer = ckpt.scratch(min(step, info.shape[0]) * row * info.torch_dtype.itemsize)
    for i in range(0, info.shape[0], step):
        out[i:i + step].copy_(ckpt.read_rows(key, i, i + step, buffer))
    return out


def canonical_items(ckpt: Checkpoint, info: ComponentInfo, meta: bool = False, dequant: bool = True,
                    dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None, rows: bool = False,
                    keep_stored: bool = False, by_rows: Callable[[str], bool] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the component as canonical (our module names) tensors; fp8 is dequantised to ``dtype``
    (fp32 when None) by blocks of rows (:func:`~zimage_native.formats.fp8.dequantize`), never whole in fp32.
    ``keep(canonical key)``: tensors it refuses are skipped before they are read (a file tensor split
    into several canonical ones is read when any of them is kept, and yields all of them).
    ``by_rows``: quantised weights whose canonical keys it accepts come as :class:`ValueRows`."""
    return to_canonical(raw_items(ckpt, info, meta, dequant, dtype, keep, rows, keep_stored, by_rows),
                        info.keymap())


def canonical_shapes(ckpt: Checkpoint, info: ComponentInfo) -> dict[str, tuple]:
    """Canonical key -> shape, computed on meta tensors from the header alone."""
    return {k: tuple(t.shape) for k, t in canonical_items(ckpt, info, meta=True)}


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating tensors to ``dtype``; fp8 tensors (only present when not dequantised) stay fp8."""
    if dtype is None or not t.is_floating_point() or t.dtype in TORCH_FP8:
        return t
    return t.to(dtype)
