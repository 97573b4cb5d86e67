"""fp8 weight rows (an fp8 DiT file's linears, kept in fp8) -> float: ``zimage::dequantize_fp8``.

The slow twin is ``zimage_native.formats.fp8.dequantize_rows`` (plain PyTorch): the float8 value
to fp32, times its row's fp32 scale, rounded once to the output dtype. This kernel decodes the
float8 bytes with integer ops, so it needs no float8 support in the GPU (Triton's e4m3 type exists
from sm89 only, and the RTX 30xx cards that keep fp8 files in fp8 are sm86) nor in the CPU
interpreter the tests use:

    e4m3fn  s eeee mmm   bias 7:   normal 2^(e-7) (1 + m/8); e = 0: m 2^-9; e = 15, m = 7: NaN
    e5m2    s eeeee mm   bias 15:  normal 2^(e-15) (1 + m/4); e = 0: m 2^-16; e = 31: inf (m = 0), NaN

Every float8 value is exact in fp32, the product with the scale is one IEEE fp32 multiply in both
(no fma to contract), and the final cast uses ``round_to``, so kernel and twin agree bit for bit
(NaN payloads aside).

Layout: the input is ``(rows, cols)`` uint8 with a unit stride on the columns, the scales
``(rows, 1)`` fp32, the output ``(rows, cols)`` contiguous in fp32, bf16 or fp16. One pass: reads
1 byte and writes 2 (bf16) per value, where the twin's three passes move about 19.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import LAUNCH_OPTIONS, count_launch, device_guard, is_interpreted, round_to, row_tile

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _decode(b, E5M2: tl.constexpr):
    """uint8 codes -> their fp32 values (exact)."""
    b = b.to(tl.uint32)
    sign = (b >> 7) << 31
    if E5M2:
        exp = (b >> 2) & 31
        mant = b & 3
        normal = sign | ((exp + 112) << 23) | (mant << 21)  # 112 = 127 - 15
        small = mant.to(tl.float32) * 1.52587890625e-05  # m 2^-16
        special = tl.where(mant == 0, sign | 0x7F800000, 0x7FC00000)  # inf, NaN
        is_special = exp == 31
    else:
        exp = (b >> 3) & 15
        mant = b & 7
        normal = sign | ((exp + 120) << 23) | (mant << 20)  # 120 = 127 - 7
        small = mant.to(tl.float32) * 0.001953125  # m 2^-9
        special = normal * 0 + 0x7FC00000  # NaN
        is_special = (exp == 15) & (mant == 7)
    value = tl.where(is_special, special, normal).to(tl.float32, bitcast=True)
    small = (small.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)  # its sign (-0.0 too)
    return tl.where(exp == 0, small, value)


@triton.jit
def _dequant_fp8_kernel(src, scale, out, n_rows, n_cols, src_stride, E5M2: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    b = tl.load(src + rows[:, None] * src_stride + cols[None, :], mask=mask, other=0)
    s = tl.load(scale + rows, mask=rows < n_rows, other=0.0)
    y = round_to(_decode(b, E5M2) * s[:, None], out.dtype.element_ty)
    tl.store(out + rows[:, None] * n_cols + cols[None, :], y, mask=mask)


# The CPU interpreter runs programs one after another in Python: far fewer, larger numpy tiles.
_MAX_COLS = 65536 if is_interpreted(_dequant_fp8_kernel) else 1024


def _check(raw: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    if raw.dtype != torch.uint8 or raw.ndim != 2:
        raise TypeError(f"zimage::dequantize_fp8: the codes must be uint8 (rows, cols), got {raw.dtype} of shape "
                        f"{tuple(raw.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (raw.shape[0], 1):
        raise TypeError(f"zimage::dequantize_fp8: the scales must be fp32 ({raw.shape[0]}, 1), got {scale.dtype} of "
                        f"shape {tuple(scale.shape)}")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"zimage::dequantize_fp8: output dtype must be one of {OUT_DTYPES}, got {dtype}")


@torch.library.custom_op("zimage::dequantize_fp8", mutates_args=())
def dequantize_fp8(raw: torch.Tensor, scale: torch.Tensor, e5m2: bool, dtype: torch.dtype) -> torch.Tensor:
    """float8 codes (rows, cols) uint8 (e4m3fn, or e5m2) times their row's scale -> ``dtype``."""
    _check(raw, scale, dtype)
    rows, cols = raw.shape
    out = torch.empty((rows, cols), dtype=dtype, device=raw.device)
    if out.numel() == 0:
        return out
    if raw.stride(1) != 1:
        raw = raw.contiguous()
    block_cols, block_rows, num_warps = row_tile(cols, _MAX_COLS)
    with device_guard(raw):
        _dequant_fp8_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))](
            raw, scale.contiguous(), out, rows, cols, raw.stride(0), E5M2=e5m2,
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps, **LAUNCH_OPTIONS,
        )
    count_launch("dequantize_fp8")
    return out


@dequantize_fp8.register_fake
def _(raw, scale, e5m2, dtype):
    _check(raw, scale, dtype)
    return raw.new_empty(raw.shape, dtype=dtype)
