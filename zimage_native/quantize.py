"""Weight-only int8 and int4 quantisation of the Qwen3 text encoder (``--text-encoder-quant``).

The predecessor's ``quantization = "8bit" | "4bit"`` setting, written in plain PyTorch so that it
runs on every device, the CPU included:

- ``int8``: each linear's weight is stored as int8 with one fp32 scale per output row
  (symmetric, amax / 127). The forward is ``F.linear(x, q) * scale``: the int8 values are exact in
  bf16 and fp32, so the only loss is the rounding of the weights. In fp16, whose range ``x q^T``
  (the output divided by the scale) would overflow, the weight is dequantised first.
- ``int4``: each linear's weight is stored as 4-bit codes, two per byte, in groups of
  ``group_size`` (128) input columns with a scale and a minimum per group (asymmetric,
  ``w = code * scale + minimum``, 16 levels), both in the model dtype. The forward dequantises the
  weight to the input dtype and multiplies.
- In both modes the token embedding is stored as int8 with one scale per row, and only the rows
  that a prompt looks up are dequantised.

Norms stay in the model dtype. Why not torchao: see docs/performance.md ("Quantised text
encoder"). In short, torchao 0.18 (the newest) does int8 weight-only on the CPU, but its int4
configurations need a separate kernel package, it is not installed on the GPU machines, and its
compiled extensions are built for one torch release; the engine supports several.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .formats.fp8 import TORCH_FP8, dequantize
from .formats.tensors import StoredRows

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 128
#: Rows quantised at a time: each row's codes depend on that row alone, so chunks give the same codes
#: while the fp32 temporaries stay small (the whole 151936 x 2560 token embedding at once took 6x its
#: bf16 bytes, 4.7 GB, on the device that quantises it).
CHUNK_ROWS = 4096


def _by_rows(fn, weight: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None,
             *args, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``fn`` (a per-row quantiser returning tensors with rows first) over chunks of rows, each chunk
    moved to ``device`` and cast to ``dtype`` first (None: as it is), written into the outputs.

    A float8 ``weight`` (as a file stores it) is the row source of its dequantised values: each
    chunk is moved, then dequantised to ``dtype`` (fp32 when None) times its rows of ``scale`` (a
    scalar, one value per row, or None) as loading dequantises (:func:`~zimage_native.formats.fp8.dequantize`),
    so the weight is never whole in ``dtype``: the codes are those of the weight dequantised whole.
    A :class:`~zimage_native.formats.tensors.StoredRows` ``weight`` is read from its file by the
    same chunks (each consumed before the next is read), never whole nor through the file's map."""
    n = weight.shape[0]
    rows = weight.rows if isinstance(weight, StoredRows) else lambda i, j: weight[i:j]
    if weight.dtype in TORCH_FP8:
        per_row = scale is not None and scale.numel() > 1

        def take(i: int, j: int) -> torch.Tensor:
            part = scale[i:j] if per_row else scale
            return dequantize(rows(i, j).to(device), None if part is None else part.to(device),
                              dtype or torch.float32)
    else:
        def take(i: int, j: int) -> torch.Tensor:
            return rows(i, j).to(device=device, dtype=dtype)
    if n <= CHUNK_ROWS:
        return fn(take(0, n), *args)
    out = None
    for i in range(0, n, CHUNK_ROWS):
        part = fn(take(i, i + CHUNK_ROWS), *args)
        if out is None:
            out = tuple(torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in part)
        for whole, t in zip(out, part):
            whole[i:i + t.shape[0]] = t
    return out


def _detached(weight):
    return weight if isinstance(weight, StoredRows) else weight.detach()


def int8_rows(weight: torch.Tensor, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, fp8_scale: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> int8 codes (N, K) and fp32 scales (N,), symmetric per row: w ~= q * scale; the codes
    of ``weight`` cast to ``dtype``, computed on ``device`` (both None: as it is). A float8 ``weight``
    is dequantised (times ``fp8_scale``) by chunks of rows first (see :func:`_by_rows`)."""
    return _by_rows(_int8_rows, _detached(weight), dtype, device, scale=fp8_scale)


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = (x Q^T) * scale + b with Q int8 (N, K) and one fp32 scale per output row."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*int8_rows(linear.weight), linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:  # x Q^T is y / scale (up to 127 / amax larger): it overflows float16
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def int4_groups(weight: torch.Tensor, group_size: int, dtype: torch.dtype, device: torch.device | str | None = None,
                fp8_scale: torch.Tensor | None = None):
    """(N, K) -> packed codes (N, K/2) uint8 (even column in the low nibble), and a scale and a
    minimum per group of ``group_size`` columns, (N, K/group_size) in ``dtype``: the codes of
    ``weight`` cast to ``dtype``, computed on ``device`` (None: where it is). A float8 ``weight`` is
    dequantised (times ``fp8_scale``) by chunks of rows first (see :func:`_by_rows`)."""
    check_int4_width(weight.shape[1], group_size)
    return _by_rows(_int4_groups, _detached(weight), dtype, device, group_size, dtype, scale=fp8_scale)


def check_int4_width(in_features: int, group_size: int) -> None:
    if in_features % group_size or group_size % 2:
        raise ValueError(f"int4 needs the input features ({in_features}) to be a multiple of the group size "
                         f"({group_size}, even); this layer cannot be quantised to int4")


def _int4_groups(weight: torch.Tensor, group_size: int, dtype: torch.dtype):
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = ((high - low) / 15.0).to(dtype).float()
    low = low.to(dtype).float()
    codes = torch.round((w - low[..., None]) / scale.clamp(min=1e-12)[..., None]).clamp(0, 15).to(torch.uint8)
    codes = codes.reshape(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scale.to(dtype), low.to(dtype)


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored in 4 bits: ``w = code * scale + minimum`` per group of columns."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = self.in_features // scale.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP) -> "Int4Linear":
        return cls(*int4_groups(linear.weight, group_size, linear.weight.dtype), linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, groups = self.scale.shape
        codes = torch.stack((self.packed & 15, self.packed >> 4), dim=-1).reshape(n, groups, self.group_size)
        w = codes.to(dtype) * self.scale.to(dtype)[..., None] + self.minimum.to(dtype)[..., None]
        return w.reshape(n, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 groups of {self.group_size}")


class Int8Embedding(nn.Module):
    """An embedding table in int8 with one scale per row; looked-up rows come out in ``dtype``."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = qweight.shape

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        return cls(*int8_rows(embedding.weight), embedding.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].float() * self.scale[ids][..., None]).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def quantize_text_encoder(model: nn.Module, mode: str, device: torch.device | str | None = None,
                          group_size: int = INT4_GROUP) -> nn.Module:
    """Quantise a (truncated) Qwen3 text encoder in place: every linear to ``mode`` ("int8" or
    "int4"), the token embedding to int8; norms are kept. Returns the model, on ``device``.

    Each weight is moved to ``device`` and quantised there, one at a time and in chunks of
    :data:`CHUNK_ROWS` rows, so a GPU never holds more than the quantised model plus one
    module's full-precision weights and a chunk's temporaries; the replaced layers of one module (an
    attention's q, k, v, o) are dropped once that module is done (the caller must not keep the
    weights elsewhere). "none" only moves the model.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"text encoder quantisation must be one of {QUANT_MODES}, got {mode!r}")
    device = torch.device(device) if device is not None else None
    if mode == "none":
        return model if device is None else model.to(device)

    def convert(module: nn.Module) -> nn.Module:
        if device is not None:
            module = module.to(device)
        if isinstance(module, nn.Embedding):
            return Int8Embedding.from_embedding(module)
        if mode == "int8":
            return Int8Linear.from_linear(module)
        return Int4Linear.from_linear(module, group_size)

    for path in [path for path, _ in model.named_modules()]:  # names, not modules: a replaced layer dies at once
        parent = model.get_submodule(path)
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, nn.Embedding)):
                setattr(parent, name, convert(child))
    return model if device is None else model.to(device)


def swap_for_quantized_(model: nn.Module, mode: str, group_size: int = INT4_GROUP) -> dict[str, nn.Module]:
    """Replace every ``nn.Linear`` of ``model`` (built on meta) by an empty ``mode`` ("int8" or "int4")
    linear and every ``nn.Embedding`` by an empty :class:`Int8Embedding`, on meta, for
    :func:`quantize_items` to fill; returns the new modules by path. An int4 width that is not a
    multiple of ``group_size`` is refused here, before any weight is read."""
    meta = torch.device("meta")
    swapped = {}
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding):
                n, k = child.weight.shape
                new = Int8Embedding(torch.empty(n, k, dtype=torch.int8, device=meta),
                                    torch.empty(n, device=meta), child.weight.dtype)
            elif isinstance(child, nn.Linear) and mode == "int8":
                n, k = child.weight.shape
                new = Int8Linear(torch.empty(n, k, dtype=torch.int8, device=meta), torch.empty(n, device=meta),
                                 child.bias)
            elif isinstance(child, nn.Linear):
                n, k = child.weight.shape
                check_int4_width(k, group_size)
                groups = torch.empty(n, k // group_size, dtype=child.weight.dtype, device=meta)
                new = Int4Linear(torch.empty(n, k // 2, dtype=torch.uint8, device=meta), groups, groups.clone(),
                                 child.bias)
            else:
                continue
            setattr(parent, name, new)
            swapped[f"{path}.{name}" if path else name] = new
    return swapped


def quantize_items(items: Iterable[tuple[str, torch.Tensor]], swapped: dict[str, nn.Module],
                   device: torch.device | str, dtype: torch.dtype | None,
                   fp8_scales: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The (key, tensor) pairs of a state dict as read (any floating dtype), turned into those of the
    model that :func:`swap_for_quantized_` made, in ``dtype`` on ``device``. Each swapped module's
    weight is quantised as it arrives, in chunks of :data:`CHUNK_ROWS` rows, each chunk cast to
    ``dtype`` and moved to ``device`` first (the codes of the weight cast whole), so no weight is
    ever held in ``dtype`` whole, let alone the encoder. Float8 tensors (an fp8 file read without
    dequantising) are dequantised with their scale in ``fp8_scales`` (by key; none: unscaled) to
    ``dtype`` (fp32 when None) as loading would: a quantised weight by the same chunks of rows,
    so not even an fp8 weight is ever whole in ``dtype``. A weight that comes as
    :class:`~zimage_native.formats.tensors.StoredRows` is read from its file by those chunks (never
    through the file's memory map, whose pages stayed resident beside the result until the file was
    done: a real-width Qwen3 read that way peaked at 744 MiB for a 213 MiB int8 model, 430 MiB of it the
    file's pages). The other tensors (norms, biases, packed
    GGUF bytes) are cast and moved; floating ones are copied, so that none keeps the file it was
    read from mapped."""
    from .formats.tensors import cast

    device = torch.device(device)
    fp8_scales = fp8_scales or {}
    for key, t in items:
        path, _, leaf = key.rpartition(".")
        module = swapped.get(path)
        if isinstance(t, StoredRows) and (module is None or leaf != "weight"):
            t = t.whole()  # not quantised: in new memory, cast below
        if module is None or leaf != "weight":
            if t.dtype in TORCH_FP8:
                yield key, dequantize(t, fp8_scales.get(key), dtype or torch.float32).to(device)
                continue
            moved = cast(t, dtype).to(device)
            yield key, moved.clone() if moved is t and t.is_floating_point() else moved
            continue
        target = dtype or (torch.float32 if t.dtype in TORCH_FP8 else t.dtype)
        scale = fp8_scales.get(key)
        if isinstance(module, Int4Linear):
            names, tensors = ("packed", "scale", "minimum"), int4_groups(t, module.group_size, target, device, scale)
        else:
            names, tensors = ("qweight", "scale"), int8_rows(t, target, device, scale)
            if isinstance(module, Int8Embedding):
                module.dtype = target
        del t
        for name, tensor in zip(names, tensors):
            yield f"{path}.{name}", tensor


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers: each storage counted once and whole, so
    views (the fp8 views of a fused GEMM, tied weights) count as the memory they share."""
    return storage_bytes((*module.parameters(), *module.buffers()))


def storage_bytes(tensors) -> int:
    """Bytes held by ``tensors`` (:func:`weight_bytes` of a part of a module): each storage counted
    once and whole (the pinned slab that streamed blocks are packed into counts as the slab)."""
    seen, total = set(), 0
    for t in tensors:
        if t.is_meta:
            total += t.numel() * t.element_size()
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
