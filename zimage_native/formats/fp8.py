"""fp8 checkpoints: plain float8 weights, and ComfyUI's "scaled fp8" (``scale_weight`` per Linear).

A plain fp8 file stores float8 weights without scales (upcast while loading). A scaled-fp8 file
stores ``weight = fp8 * scale`` with one ``scale_weight`` (or ``weight_scale``) per Linear, a
scalar or one value per output row, and a ``scaled_fp8`` marker tensor. The scales and markers
describe quantisation rather than hold a weight of the model (:func:`is_aux`).
"""

from __future__ import annotations

from typing import Callable

import torch

from .checkpoint import FLOAT_DTYPES, Checkpoint

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
TORCH_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

#: Keys that describe quantisation rather than hold a weight of the model. ``input_scale`` (a static
#: activation scale: ComfyUI quantises a layer's input to fp8 with it for its fp8 GEMM) is not used
#: here: activations stay in the compute dtype. ``comfy_quant``: a layer's ComfyUI mixed-precision
#: config (:func:`~zimage_native.formats.detect.comfy_quant_layers`). ``weight_scale_2``: nvfp4's
#: per-tensor scale (:mod:`.microscale`).
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".weight_scale_2", ".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"


def is_aux(key: str) -> bool:
    """A scale, marker or quantisation config key (not a weight of the model)."""
    return key.endswith(SCALE_SUFFIXES) or key == MARKER or key.endswith("." + MARKER)


def is_scaled(keys: list[str]) -> bool:
    """Whether the keys carry ComfyUI's weight scales or its ``scaled_fp8`` marker."""
    return any(k.endswith((".scale_weight", ".weight_scale")) for k in keys) or any(
        k == MARKER or k.endswith("." + MARKER) for k in keys)


def scale_for(ckpt: Checkpoint, key: str) -> str | None:
    """The scale key of a weight key, or None."""
    if not key.endswith(".weight"):
        return None
    stem = key[: -len("weight")]
    for name in ("scale_weight", "weight_scale"):
        if stem + name in ckpt.tensors:
            return stem + name
    return None


#: Elements upcast at a time by :func:`dequantize` (4 MiB of fp32).
CHUNK_ELEMENTS = 2**20


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32,
               read: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """fp8 -> ``dtype``: ``weight * scale`` computed in fp32 and rounded once to ``dtype`` (scale: a
    scalar, or one value per output row).

    Blocks of rows of :data:`CHUNK_ELEMENTS` elements are upcast one at a time into the result, so
    the transient memory is one block, not the whole tensor in fp32 twice (the upcast and the
    product): for Qwen3-4B's 151936 x 2560 embedding, 3.1 GB of fp32 for a 0.78 GB bf16 result.
    Each value depends on its row alone, so the result is the whole-tensor one, bit for bit.
    ``read(i, j)``: the stored rows ``i:j``, where ``weight`` gives the shape only (a meta tensor;
    the rows come from :meth:`~zimage_native.formats.checkpoint.Checkpoint.read_rows`, the result is
    on the CPU)."""
    rows_of = read if read is not None else (lambda i, j: weight[i:j])
    device = torch.device("cpu") if read is not None else weight.device
    s = None if scale is None else scale.to(torch.float32)
    per_row = s is not None and s.numel() > 1 and s.ndim == 1 and weight.ndim >= 2
    if per_row:
        s = s.reshape(-1, *([1] * (weight.ndim - 1)))
    rows = s is not None and s.numel() > 1  # a scale per row (else one for all)
    step = max(1, CHUNK_ELEMENTS // max(1, weight[0].numel())) if weight.ndim and weight.numel() else 0
    if step == 0 or weight.shape[0] <= step or (rows and (s.ndim != weight.ndim or s.shape[0] != weight.shape[0])):
        # small, or a scale of another shape: broadcast (or refused) as a whole
        return _upcast(weight if read is None else read(0, weight.shape[0]), s, dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=device)
    for i in range(0, weight.shape[0], step):
        block = rows_of(i, i + step).to(torch.float32)
        if s is not None:
            block.mul_(s[i:i + step] if rows else s)
        out[i:i + step].copy_(block)  # rounded to dtype as .to(dtype) rounds
    return out


def _upcast(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(torch.float32)
    return (w if scale is None else w * scale).to(dtype)


def dequantize_rows(raw: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Float8 codes held as bytes (rows, cols) uint8, times their row's fp32 scale (rows, 1), in
    ``dtype``: fp8 -> fp32, times the scale, rounded once (as loading dequantises). The slow twin of
    ``zimage::dequantize_fp8``."""
    return (raw.view(fp8_dtype).to(torch.float32) * scale).to(dtype)


def read_scales(ckpt: Checkpoint, keys: list[str], keymap, device: torch.device | str = "cpu",
                int8: bool = False) -> dict[str, torch.Tensor]:
    """fp32 scales by canonical weight key (a fused weight's per-tensor scale is given to each part,
    its per-row scales are split with its rows). ``int8``: those of int8 weights too (comfy_quant
    ``int8_tensorwise`` layers, for a DiT that keeps them)."""
    scales: dict[str, torch.Tensor] = {}
    stored = FP8_DTYPES + ("I8",) if int8 else FP8_DTYPES
    for key in keys:
        scale_key = scale_for(ckpt, key)
        if scale_key is None or ckpt.tensors[key].dtype not in stored:
            continue
        if ckpt.tensors[scale_key].dtype not in FLOAT_DTYPES:
            continue  # an mxfp8 weight (float8 too): its e8m0 block scales; it is dequantised while loading
        scale = ckpt.get(scale_key).to(torch.float32)
        targets = keymap.canonical_keys(key)
        parts = scale.chunk(len(targets)) if scale.numel() > 1 else [scale] * len(targets)
        for target, part in zip(targets, parts):
            scales[target] = part.to(device)
    return scales
