"""GGML block dequantisation (the packed weights of GGUF files): ``zimage::dequantize_ggml``.

The slow twin is ``zimage_native.formats.ggml.dequantize`` (plain PyTorch, bit-equal to the ``gguf``
package's reference). This kernel does the same fp32 arithmetic on the same integers, then rounds
once to the output dtype, so the two agree bit for bit:

    type   block  bytes  value of element j of a block (all products and sums in fp32)
    Q8_0    32     34    d * int8
    Q4_0    32     18    d * (nibble - 8)
    Q4_1    32     20    d * nibble + m
    Q5_0    32     22    d * (5-bit - 16)
    Q5_1    32     24    d * 5-bit + m
    Q2_K   256     84    (d * sc_g) * 2-bit - (dmin * mn_g)           16 groups of 16
    Q3_K   256    110    (d * (6-bit sc_g - 32)) * (2-bit - 4 * !hbit) 16 groups of 16
    Q4_K   256    144    (d * sc_g) * nibble - (dmin * mn_g)          8 groups of 32, 6-bit sc/mn
    Q5_K   256    176    (d * sc_g) * 5-bit - (dmin * mn_g)           8 groups of 32, 6-bit sc/mn
    Q6_K   256    210    (d * int8 sc_g) * (6-bit - 32)               16 groups of 16

The unpacking of each type is spelled out next to its branch below, with the twin's layout.

Layout: the input is ``(rows, row_bytes)`` uint8, any row stride with a unit stride on the bytes
(a row slice of a fused q|k|v tensor is read in place); the output is ``(rows, n)`` contiguous in
fp32, bf16 or fp16. Each program dequantises ``BLOCK_B`` whole blocks (a tile of ~4096 values) and
gathers, for every output value, the bytes it needs (its code byte(s) and its block's scale bytes):
a byte is read by several lanes, but from L1, so DRAM traffic stays one read of the packed bytes
and one write of the output.

Rounding: the products and sums are IEEE fp32 in both the twin and the kernel, provided the GPU
compiler does not contract ``a * b - c`` into one fma (which rounds once instead of twice): the
launch passes ``enable_fp_fusion=False`` (ptxas ``--fmad=false``). The final cast uses
``round_to`` (bf16 rounded with integer ops, since the CPU interpreter truncates that cast).

Byte budget (10240 x 3840 weight, Q4_K, bf16 out): reads 22 MB, writes 79 MB; at 3.35 TB/s that is
~30 us (an estimate, not a measurement). The twin makes ~10-20 elementwise passes with int16/fp32
temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import LAUNCH_OPTIONS as NO_FMA, TILE_ELEMENTS, count_launch, device_guard, is_interpreted, round_to

#: Types with a kernel: name -> (kernel id, values per block, bytes per block). Same table as
#: ``formats.ggml.GGML_TYPES``; the float types (F32/F16/BF16) are a view or a cast, not a kernel.
KERNEL_TYPES: dict[str, tuple[int, int, int]] = {
    "Q8_0": (0, 32, 34), "Q4_0": (1, 32, 18), "Q4_1": (2, 32, 20), "Q5_0": (3, 32, 22), "Q5_1": (4, 32, 24),
    "Q2_K": (5, 256, 84), "Q3_K": (6, 256, 110), "Q4_K": (7, 256, 144), "Q5_K": (8, 256, 176),
    "Q6_K": (9, 256, 210),
}
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: No fma contraction (ptxas --fmad=false, as every launch): ``a * b - c`` rounds twice, as in the twin.
LAUNCH_OPTIONS = {"num_warps": 8, **NO_FMA}


@triton.jit
def _byte(src, base, off, mask):
    """Bytes ``base[b] + off[j]`` as int32, a (BLOCK_B, BLOCK) tile (masked blocks read 0)."""
    return tl.load(src + base[:, None] + off[None, :], mask=mask[:, None], other=0).to(tl.int32)


@triton.jit
def _half(src, base, at: tl.constexpr, mask):
    """The little-endian fp16 at byte ``at`` of each block, exactly as fp32: (BLOCK_B, 1)."""
    lo = tl.load(src + base + at, mask=mask, other=0).to(tl.int32)
    hi = tl.load(src + base + at + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)[:, None]


@triton.jit
def _signed(v):
    """A byte (int32 0..255) read as int8."""
    return tl.where(v >= 128, v - 256, v)


@triton.jit
def _k_scale_min(src, base, g, mask):
    """Q4_K / Q5_K: the 6-bit scale and min of group ``g`` (0..7) from the 12 bytes at 4..15.

    The twin's ``_k_scales``: bytes s[0:4] = d, s[4:8] = m, s[8:12] = md;
    g < 4: sc = d[g] & 63, mn = m[g] & 63;
    g >= 4: sc = (md[g-4] & 15) | ((d[g-4] >> 2) & 0x30), mn = (md[g-4] >> 4) | ((m[g-4] >> 2) & 0x30).
    """
    lo = g < 4
    g4 = g % 4
    d_ = _byte(src, base, 4 + g4, mask)
    m_ = _byte(src, base, 8 + g4, mask)
    md = _byte(src, base, 12 + g4, mask)
    sc = tl.where(lo, d_ & 63, (md & 15) | ((d_ >> 2) & 0x30))
    mn = tl.where(lo, m_ & 63, (md >> 4) | ((m_ >> 2) & 0x30))
    return sc, mn


@triton.jit
def _dequant_ggml_kernel(
    src, out, n_blocks, blocks_per_row, stride_row,
    KIND: tl.constexpr, BLOCK: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = blk < n_blocks
    base = (blk // blocks_per_row) * stride_row + (blk % blocks_per_row) * TYPE_SIZE
    j = tl.arange(0, BLOCK)
    if KIND == 0:  # Q8_0: d @0, 32 int8 @2
        val = _signed(_byte(src, base, 2 + j, mask)).to(tl.float32) * _half(src, base, 0, mask)
    elif KIND == 1 or KIND == 2:  # Q4_0 / Q4_1: d @0 (m @2), 16 bytes @2 / @4: j<16 low nibbles, j>=16 high
        at = 2 if KIND == 1 else 4
        q = (_byte(src, base, at + j % 16, mask) >> (4 * (j // 16))[None, :]) & 15
        d = _half(src, base, 0, mask)
        if KIND == 1:
            val = d * (q - 8).to(tl.float32)
        else:
            val = d * q.to(tl.float32) + _half(src, base, 2, mask)
    elif KIND == 3 or KIND == 4:  # Q5_0 / Q5_1: qh (LE uint32) @2 / @4, then 16 nibble bytes
        at = 2 if KIND == 3 else 4
        high = (_byte(src, base, at + j // 8, mask) >> (j % 8)[None, :]) & 1  # bit j of the uint32
        low = (_byte(src, base, at + 4 + j % 16, mask) >> (4 * (j // 16))[None, :]) & 15
        q = low | (high << 4)
        d = _half(src, base, 0, mask)
        if KIND == 3:
            val = d * (q - 16).to(tl.float32)
        else:
            val = d * q.to(tl.float32) + _half(src, base, 2, mask)
    elif KIND == 5:  # Q2_K: scales @0 (16), qs @16 (64), d @80, dmin @82
        # j = h*128 + s*32 + k: (qs[h*32 + k] >> 2s) & 3; group g = j // 16
        sc = _byte(src, base, j // 16, mask)
        dl = _half(src, base, 80, mask) * (sc & 15).to(tl.float32)
        ml = _half(src, base, 82, mask) * (sc >> 4).to(tl.float32)
        q = (_byte(src, base, 16 + (j // 128) * 32 + j % 32, mask) >> (2 * ((j // 32) % 4))[None, :]) & 3
        val = dl * q.to(tl.float32) - ml
    elif KIND == 6:  # Q3_K: hmask @0 (32), qs @32 (64), scales @96 (12), d @108
        g = j // 16
        # 6-bit scale g: g<8 low nibble of byte g, g>=8 high nibble of byte g-8; bits 4-5 from
        # (byte 8 + g%4) >> 2*(g//4)
        low = (_byte(src, base, 96 + g % 8, mask) >> (4 * (g // 8))[None, :]) & 15
        high = (_byte(src, base, 104 + g % 4, mask) >> (2 * (g // 4))[None, :]) & 3
        dl = _half(src, base, 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        ql = (_byte(src, base, 32 + (j // 128) * 32 + j % 32, mask) >> (2 * ((j // 32) % 4))[None, :]) & 3
        qh = ((_byte(src, base, j % 32, mask) >> (j // 32)[None, :]) & 1) ^ 1  # bit j//32 of hmask[j%32]
        val = dl * (ql - (qh << 2)).to(tl.float32)
    elif KIND == 7 or KIND == 8:  # Q4_K / Q5_K: d @0, dmin @2, scales @4 (12); Q5_K: qh @16 (32); qs @16 / @48
        g = j // 32
        sc, mn = _k_scale_min(src, base, g, mask)
        ds = _half(src, base, 0, mask) * sc.to(tl.float32)
        dm = _half(src, base, 2, mask) * mn.to(tl.float32)
        at = 16 if KIND == 7 else 48
        # j = c*64 + s*32 + k: (qs[c*32 + k] >> 4s) & 15
        q = (_byte(src, base, at + (j // 64) * 32 + j % 32, mask) >> (4 * ((j // 32) % 2))[None, :]) & 15
        if KIND == 8:
            q = q | (((_byte(src, base, 16 + j % 32, mask) >> g[None, :]) & 1) << 4)  # bit g of qh[j%32]
        val = ds * q.to(tl.float32) - dm
    else:  # Q6_K: ql @0 (128), qh @128 (64), int8 scales @192 (16), d @208
        ds = _half(src, base, 208, mask) * _signed(_byte(src, base, 192 + j // 16, mask)).to(tl.float32)
        h = j // 128
        # low: j = h*128 + s*64 + k, (ql[h*64 + k] >> 4s) & 15; high: j = h*128 + s*32 + k, (qh[h*32 + k] >> 2s) & 3
        low = (_byte(src, base, h * 64 + j % 64, mask) >> (4 * ((j // 64) % 2))[None, :]) & 15
        high = (_byte(src, base, 128 + h * 32 + j % 32, mask) >> (2 * ((j // 32) % 4))[None, :]) & 3
        val = ds * ((low | (high << 4)) - 32).to(tl.float32)
    y = round_to(val, out.dtype.element_ty)
    tl.store(out + blk[:, None] * BLOCK + j[None, :], y, mask=mask[:, None])


# Values per program: ~4096 on the GPU (16 per thread at 8 warps); the CPU interpreter runs programs
# one after another in Python, so it gets far fewer, larger numpy tiles (same values, 10-20x faster).
_TILE = 262144 if is_interpreted(_dequant_ggml_kernel) else TILE_ELEMENTS


def _check(raw: torch.Tensor, qtype: str, dtype: torch.dtype) -> tuple[int, int, int]:
    if qtype not in KERNEL_TYPES:
        raise ValueError(f"zimage::dequantize_ggml: no kernel for GGML type {qtype!r}; kernels for {list(KERNEL_TYPES)}")
    if raw.dtype != torch.uint8 or raw.ndim != 2:
        raise TypeError(f"zimage::dequantize_ggml: packed rows must be uint8 (rows, row_bytes), "
                        f"got {raw.dtype} of shape {tuple(raw.shape)}")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"zimage::dequantize_ggml: output dtype must be one of {OUT_DTYPES}, got {dtype}")
    kind, block, size = KERNEL_TYPES[qtype]
    if raw.shape[1] % size:
        raise ValueError(f"zimage::dequantize_ggml: {qtype} rows are a multiple of {size} bytes, got {raw.shape[1]}")
    return kind, block, size


@torch.library.custom_op("zimage::dequantize_ggml", mutates_args=())
def dequantize_ggml(raw: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """Packed GGML rows (rows, row_bytes) uint8 -> (rows, row_bytes / type_size * block) in ``dtype``."""
    kind, block, size = _check(raw, qtype, dtype)
    rows, nbytes = raw.shape
    per_row = nbytes // size
    out = torch.empty((rows, per_row * block), dtype=dtype, device=raw.device)
    n_blocks = rows * per_row
    if n_blocks == 0:
        return out
    if raw.stride(1) != 1:
        raw = raw.contiguous()
    block_b = max(1, _TILE // block)
    with device_guard(raw):
        _dequant_ggml_kernel[(triton.cdiv(n_blocks, block_b),)](
            raw, out, n_blocks, per_row, raw.stride(0),
            KIND=kind, BLOCK=block, TYPE_SIZE=size, BLOCK_B=block_b, **LAUNCH_OPTIONS,
        )
    count_launch("dequantize_ggml")
    return out


@dequantize_ggml.register_fake
def _(raw, qtype, dtype):
    _, block, size = _check(raw, qtype, dtype)
    return raw.new_empty((raw.shape[0], raw.shape[1] // size * block), dtype=dtype)
