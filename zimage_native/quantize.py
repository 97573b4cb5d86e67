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

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 128
#: Rows quantised at a time: each row's codes depend on that row alone, so chunks give the same codes
#: while the fp32 temporaries stay small (the whole 151936 x 2560 token embedding at once took 6x its
#: bf16 bytes, 4.7 GB, on the device that quantises it).
CHUNK_ROWS = 4096


def _by_rows(fn, weight: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    """``fn`` (a per-row quantiser returning tensors with rows first) over chunks of rows, joined."""
    if weight.shape[0] <= CHUNK_ROWS:
        return fn(weight, *args)
    parts = [fn(weight[i:i + CHUNK_ROWS], *args) for i in range(0, weight.shape[0], CHUNK_ROWS)]
    return tuple(torch.cat(tensors) for tensors in zip(*parts))


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> int8 codes (N, K) and fp32 scales (N,), symmetric per row: w ~= q * scale."""
    return _by_rows(_int8_rows, weight.detach())


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


def int4_groups(weight: torch.Tensor, group_size: int, dtype: torch.dtype):
    """(N, K) -> packed codes (N, K/2) uint8 (even column in the low nibble), and a scale and a
    minimum per group of ``group_size`` columns, (N, K/group_size) in ``dtype``."""
    n, k = weight.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"int4 needs the input features ({k}) to be a multiple of the group size "
                         f"({group_size}, even); this layer cannot be quantised to int4")
    return _by_rows(_int4_groups, weight.detach(), group_size, dtype)


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


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers: each storage counted once and whole, so
    views (the fp8 views of a fused GEMM, tied weights) count as the memory they share."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if t.is_meta:
            total += t.numel() * t.element_size()
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
