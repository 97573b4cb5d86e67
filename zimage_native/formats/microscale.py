"""ComfyUI's block-scaled ("microscaling") comfy_quant formats, ``nvfp4`` and ``mxfp8``: dequantised
while loading (:func:`dequantize`), or kept as their codes by a DiT (:func:`read_block_codes`,
``quant_linear.BlockScaledLinear``), both through :func:`code_scales` and :func:`scaled_values`.

Layouts, as ComfyUI writes and reads them (comfy/float.py ``stochastic_round_quantize_nvfp4*``,
``stochastic_round_quantize_mxfp8_by_block``, ``to_blocked``; comfy/ops.py ``_load_quantized_module``;
comfy/quant_ops.py ``QUANT_ALGOS``) and comfy-kitchen dequantises them
(backends/eager/quantization.py ``dequantize_nvfp4``, ``dequantize_mxfp8``; float_utils.py
``from_blocked``, ``e8m0_to_f32``):

- ``nvfp4``: ``<layer>.weight`` uint8 (rows, cols / 2), two float4 e2m1 codes a byte, the even column
  in the high nibble; ``<layer>.weight_scale`` float8 e4m3 (stored as F8_E4M3 or U8), one scale per
  16 values of a row, in the blocked layout below; ``<layer>.weight_scale_2`` fp32, one value.
  weight = e2m1 value * (weight_scale_2 * block scale), in fp32.
- ``mxfp8``: ``<layer>.weight`` float8 e4m3 (rows, cols); ``<layer>.weight_scale`` e8m0 (stored as
  F8_E8M0 or U8), one power of two 2^(e - 127) per 32 values of a row, blocked; code 0 reads as 0 (as
  comfy-kitchen's ``e8m0_to_f32`` reads it: ComfyUI writes it for all-zero blocks), code 255 as NaN
  (the OCP MX definition, and torch's float8_e8m0fnu; ``zimage info --check`` counts it). weight = value *
  block scale (exact in fp32).

The blocked layout (cuBLAS's block-scaling-factor layout): the (rows, blocks) scales, padded with
zeros to (a multiple of 128, a multiple of 4), are cut into 128 x 4 tiles, stored tile after tile
(tiles in row-major order), and inside a tile the scale of row r and block c sits at
``(r % 32) * 16 + (r // 32) * 4 + c``. Both formats pad the weight itself to multiples of 16
(nvfp4) or 32 (mxfp8) in both dimensions; the Z-Image DiT's and Qwen3's linears are such
multiples, so the stored shape is the weight's.
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint

#: comfy_quant format -> (values per block scale, stored weight dtype, stored block-scale dtypes).
BLOCK_FORMATS = {"nvfp4": (16, "U8", ("F8_E4M3", "U8")), "mxfp8": (32, "F8_E4M3", ("F8_E8M0", "U8"))}

#: float4 e2m1 code (sign bit 3, exponent bits 2..1, mantissa bit 0) -> value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: Values dequantised at a time (4 MiB of fp32), as formats.fp8.dequantize does.
CHUNK_ELEMENTS = 2**20


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def logical_shape(fmt: str, stored: tuple[int, ...]) -> tuple[int, int]:
    """The weight's (out, in) from its stored shape."""
    rows, cols = stored
    return (rows, cols * 2) if fmt == "nvfp4" else (rows, cols)


def blocked_shape(fmt: str, stored: tuple[int, ...]) -> tuple[int, int]:
    """The stored shape of a weight's block scales: (rows, blocks) padded to (128k, 4k)."""
    rows, cols = logical_shape(fmt, stored)
    return _up(rows, 128), _up(cols // BLOCK_FORMATS[fmt][0], 4)


def unblock(blocked: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """(rows, blocks) scales from their blocked layout (any 1-byte dtype, any shape of the padded size)."""
    tiles_r, tiles_c = _up(rows, 128) // 128, _up(blocks, 4) // 4
    t = blocked.reshape(tiles_r, tiles_c, 32, 4, 4)  # tile, then (r % 32, r // 32, c)
    t = t.permute(0, 3, 2, 1, 4)  # (tile row, r // 32, r % 32, tile column, c)
    return t.reshape(tiles_r * 128, tiles_c * 4)[:rows, :blocks]


def block_codes(ckpt: Checkpoint, key: str, fmt: str) -> torch.Tensor:
    """The block-scale codes of weight ``key``, unblocked: uint8 (rows, blocks), one byte a block (nvfp4:
    e4m3 bits, mxfp8: e8m0 exponents), in new memory of their own size."""
    stem = key[: -len("weight")]
    rows, cols = logical_shape(fmt, ckpt.tensors[key].shape)
    raw = torch.frombuffer(bytearray(ckpt.raw_bytes(stem + "weight_scale")), dtype=torch.uint8)
    return unblock(raw, rows, cols // BLOCK_FORMATS[fmt][0]).clone()  # (not a view of the padded tiles)


def tensor_scale(ckpt: Checkpoint, key: str, fmt: str) -> torch.Tensor:
    """nvfp4's per-tensor ``weight_scale_2`` of weight ``key`` as a 0-d fp32 tensor (mxfp8 has none: 1)."""
    if fmt != "nvfp4":
        return torch.ones((), dtype=torch.float32)
    return ckpt.get(key[: -len("weight")] + "weight_scale_2").float().reshape(()).clone()


def code_scales(codes: torch.Tensor, fmt: str, second: torch.Tensor | None = None) -> torch.Tensor:
    """Block-scale codes (uint8 (rows, blocks)) -> the fp32 scale of every block: nvfp4's e4m3 block
    scales times its per-tensor ``second`` (``weight_scale_2``), mxfp8's powers of two."""
    if fmt == "nvfp4":
        return codes.view(torch.float8_e4m3fn).to(torch.float32) * second.to(torch.float32).reshape(())
    exponent = codes.to(torch.int32)
    bits = torch.where(exponent == 255, 0x7FC00000, exponent << 23)  # 255: NaN, as in OCP MX and torch's e8m0
    return torch.where(exponent == 0, 0, bits).view(torch.float32)


def block_scales(ckpt: Checkpoint, key: str, fmt: str) -> torch.Tensor:
    """The fp32 scale of every block of weight ``key``, (rows, blocks): nvfp4's e4m3 block scales times
    its ``weight_scale_2``, mxfp8's powers of two."""
    return code_scales(block_codes(ckpt, key, fmt), fmt, tensor_scale(ckpt, key, fmt))


def decode(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """Stored rows -> their unscaled values in fp32: e2m1 codes (two a byte, high nibble first) or e4m3
    (as float8 or as its bytes)."""
    if fmt == "mxfp8":
        return (raw.view(torch.float8_e4m3fn) if raw.dtype == torch.uint8 else raw).to(torch.float32)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=raw.device)
    pairs = torch.stack([values.repeat_interleave(16), values.repeat(16)], dim=-1)  # byte -> (high, low) values
    return torch.index_select(pairs, 0, raw.reshape(-1).int()).reshape(raw.shape[0], -1)


def scaled_values(raw: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Stored rows (rows, stored cols) times their blocks' fp32 ``scales`` (rows, blocks): the weight's
    rows in fp32, each value its code's value times its block's scale (the one computation of the
    values, for the loader and for :class:`~zimage_native.quant_linear.BlockScaledLinear`)."""
    values = decode(raw, fmt)
    values.view(values.shape[0], -1, BLOCK_FORMATS[fmt][0]).mul_(scales.unsqueeze(-1))
    return values


def dequantize(ckpt: Checkpoint, key: str, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A block-scaled weight of the file in ``dtype``: read by blocks of rows (``Checkpoint.read_rows``),
    each computed in fp32 and rounded once into the result, never whole in fp32."""
    info = ckpt.tensors[key]
    rows, cols = logical_shape(fmt, info.shape)
    scales = block_scales(ckpt, key, fmt)
    out = torch.empty(rows, cols, dtype=dtype)
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    stored_row = info.numel // max(1, rows)  # bytes: both formats store 1 byte a value or a pair
    buffer = ckpt.scratch(min(step, rows) * stored_row)
    for i in range(0, rows, step):
        out[i:i + step].copy_(scaled_values(ckpt.read_rows(key, i, i + step, buffer), scales[i:i + step], fmt))
    return out  # (copy_ rounds to dtype as .to(dtype) rounds)


def read_block_codes(ckpt: Checkpoint, formats: dict[str, str], keymap, device: torch.device | str = "cpu"
                     ) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """Canonical weight key -> (format, block-scale codes (rows, blocks) uint8, per-tensor scale fp32)
    of every block-scaled weight of ``formats`` (file weight key -> comfy_quant format), for a DiT
    that keeps them (``quant_linear.BlockScaledLinear``): a fused weight's codes are split with its
    rows, its per-tensor scale given to each part."""
    out = {}
    for key, fmt in formats.items():
        if fmt not in BLOCK_FORMATS:
            continue
        targets = keymap.canonical_keys(key)
        codes, second = block_codes(ckpt, key, fmt).to(device), tensor_scale(ckpt, key, fmt).to(device)
        for target, part in zip(targets, codes.chunk(len(targets))):
            out[target] = (fmt, part.contiguous(), second.clone())
    return out
