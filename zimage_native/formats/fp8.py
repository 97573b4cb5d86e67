"""fp8 checkpoints: plain float8 weights, and ComfyUI's "scaled fp8" (``scale_weight`` per Linear).

A plain fp8 file stores float8 weights without scales (upcast while loading). A scaled-fp8 file
stores ``weight = fp8 * scale`` with one ``scale_weight`` (or ``weight_scale``) per Linear, a
scalar or one value per output row, and a ``scaled_fp8`` marker tensor. The scales and markers
describe quantisation rather than hold a weight of the model (:func:`is_aux`).
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
TORCH_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

#: Keys that describe quantisation rather than hold a weight of the model.
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")
MARKER = "scaled_fp8"


def is_aux(key: str) -> bool:
    """A scale or marker key (not a weight of the model)."""
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


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp8 -> fp32: ``weight * scale`` (scale: a scalar, or one value per output row)."""
    w = weight.to(torch.float32)
    if scale is None:
        return w
    s = scale.to(torch.float32)
    if s.numel() > 1 and s.ndim == 1 and w.ndim >= 2:
        s = s.reshape(-1, *([1] * (w.ndim - 1)))
    return w * s


def dequantize_rows(raw: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Float8 codes held as bytes (rows, cols) uint8, times their row's fp32 scale (rows, 1), in
    ``dtype``: fp8 -> fp32, times the scale, rounded once (as loading dequantises). The slow twin of
    ``zimage::dequantize_fp8``."""
    return (raw.view(fp8_dtype).to(torch.float32) * scale).to(dtype)


def read_scales(ckpt: Checkpoint, keys: list[str], keymap, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
    """fp32 scales by canonical weight key (a fused weight's per-tensor scale is given to each part)."""
    scales: dict[str, torch.Tensor] = {}
    for key in keys:
        scale_key = scale_for(ckpt, key)
        if scale_key is None or ckpt.tensors[key].dtype not in FP8_DTYPES:
            continue
        scale = ckpt.get(scale_key).to(torch.float32)
        targets = keymap.canonical_keys(key)
        parts = scale.chunk(len(targets)) if scale.numel() > 1 else [scale] * len(targets)
        for target, part in zip(targets, parts):
            scales[target] = part.to(device)
    return scales
