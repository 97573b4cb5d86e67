"""GGML block formats (the tensor types of GGUF files), dequantised in plain PyTorch on any device.

A quantised GGML tensor is a sequence of rows; each row is a run of fixed-size blocks, each block
``type_size`` bytes holding ``block_size`` values (32 for the legacy types, 256 for the K-quants)
with their scales. A row of ``n`` values therefore takes ``n / block_size * type_size`` bytes, and
splitting a tensor by rows (the fused ``attention.qkv`` of a GGUF DiT) is slicing its bytes by rows.

:func:`dequantize` turns the bytes of such rows, as a ``uint8`` tensor ``(rows, row_bytes)``, into
fp32 values ``(rows, row_values)``, bit for bit what the ``gguf`` package's reference
``gguf.quants.dequantize`` gives (same operations in the same order, all in fp32), then casts them
to the requested dtype. Only integer, gather and elementwise float ops are used, so it runs on the
CPU, CUDA, MPS, ... alike. The ``gguf`` package is needed only for the codebook grids of IQ1-IQ3.

Supported: F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, and
llama.cpp's i-quants (common in Qwen3 GGUF text encoders, such as mradermacher's i1 builds):
IQ4_NL and IQ4_XS (4-bit indices into a table of 16 int8 values, the ``kvalues_iq4nl`` of
ggml-common.h), and IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S (indices into codebook
grids of 256 to 2048 entries of 8 or 4 values, with sign patterns and per-group scales; the grids
are read from the ``gguf`` package, see :func:`_table`). TQ1_0 / TQ2_0, MXFP4 and Q8_K are not.
"""

from __future__ import annotations

import torch

#: GGML type id -> (name, values per block, bytes per block), as in ggml.h / gguf.constants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
}
TYPE_IDS: dict[str, int] = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
FLOAT_TYPES = ("F32", "F16", "BF16")
#: The quantised (block) types: kept packed in memory and dequantised when used.
QUANT_TYPES = tuple(name for name, _, _ in GGML_TYPES.values() if name not in FLOAT_TYPES)


class UnsupportedGGMLType(ValueError):
    """A GGML tensor type this engine does not dequantise (TQ1_0 / TQ2_0, MXFP4, Q8_K, ...)."""


def type_name(qtype: int | str) -> str:
    if isinstance(qtype, str):
        if qtype not in TYPE_IDS:
            raise UnsupportedGGMLType(f"GGML type {qtype} is not supported; supported: {sorted(TYPE_IDS)}")
        return qtype
    if int(qtype) not in GGML_TYPES:
        raise UnsupportedGGMLType(f"GGML type id {int(qtype)} is not supported; supported: {sorted(TYPE_IDS)}")
    return GGML_TYPES[int(qtype)][0]


def block_info(qtype: int | str) -> tuple[int, int]:
    """(values per block, bytes per block) of a type."""
    _, block, size = GGML_TYPES[TYPE_IDS[type_name(qtype)]]
    return block, size


def row_bytes(qtype: int | str, n: int) -> int:
    """Bytes of one row of ``n`` values; ``n`` must be a multiple of the block size."""
    block, size = block_info(qtype)
    if n % block:
        raise ValueError(f"a {type_name(qtype)} row holds a multiple of {block} values, got {n}")
    return n // block * size


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at bytes start:start+2 of every block, as fp32, shape (n, 1)."""
    return b[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _split(q: torch.Tensor, n: int, groups: int, width: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """``groups`` runs of ``width`` bytes, each shifted right by every amount in ``shifts`` and masked:
    (n, groups, len(shifts), width). Python-scalar shifts only: no host-to-device copy, so it runs
    inside CUDA graphs and compiled code."""
    q = q.reshape(n, groups, width)
    return torch.stack([(q >> s) & mask if s else q & mask for s in shifts], dim=2)


def _nibbles(qs: torch.Tensor, n: int, groups: int, width: int) -> torch.Tensor:
    """Low then high nibbles of ``groups`` runs of ``width`` bytes: (n, groups, 2, width)."""
    return _split(qs, n, groups, width, (0, 4), 0x0F)


def _bits(qh: torch.Tensor, n: int, groups: int, width: int) -> torch.Tensor:
    """Bits 0..7 of ``groups`` runs of ``width`` bytes: (n, groups, 8, width)."""
    return _split(qh, n, groups, width, tuple(range(8)), 1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18], n, 1, 16).reshape(n, 32).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20], n, 1, 16).reshape(n, 32).to(torch.float32)
    return d * q + m


def _q5(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """The 5-bit codes of Q5_0 / Q5_1: 16 bytes of low nibbles and a 32-bit mask of high bits."""
    n = b.shape[0]
    high = _bits(b[:, qh_at:qh_at + 4], n, 1, 4).transpose(2, 3).reshape(n, 32)  # bit i of the LE uint32
    low = _nibbles(b[:, qh_at + 4:qh_at + 20], n, 1, 16).reshape(n, 32)
    return low | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _q5(b, 2).to(torch.int8) - 16
    return _f16(b, 0) * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _q5(b, 4).to(torch.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].view(torch.int8).to(torch.float32) * _f16(b, 0)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _split(qs, n, 2, 32, (0, 2, 4, 6), 3).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _split(scales[:, :8], n, 1, 8, (0, 4), 0x0F).reshape(n, 16)
    high = _split(scales[:, 8:12], n, 1, 4, (0, 2, 4, 6), 3).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.int16) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = _split(qs, n, 2, 32, (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = (_bits(hmask, n, 1, 32).reshape(n, 16, 16)) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2)).to(torch.float32)
    return (dl * q).reshape(n, 256)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and minimums packed in 12 bytes (Q4_K, Q5_K): (n, 8) each."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144], n, 4, 32).reshape(n, 8, 32).to(torch.float32)
    return (ds * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:176], n, 4, 32).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], n, 1, 32).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32)
    return (ds * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    ds = (d * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = _nibbles(ql, n, 2, 64).reshape(n, 8, 32)
    high = _split(qh, n, 2, 32, (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16).to(torch.float32)
    return (ds * q).reshape(n, 256)


#: The 16 values of IQ4_NL / IQ4_XS codes (``kvalues_iq4nl``), non-linear in the code.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_values(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 -> their IQ4_VALUES, as fp32, looked up in a table filled on ``q``'s device from
    Python scalars (no tensor built from host data, so no host-to-device copy: see :func:`_split`)."""
    table = q.new_empty(16, dtype=torch.float32)
    for k, value in enumerate(IQ4_VALUES):
        table[k] = value
    return table[q.long()]


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # Q4_0's block: fp16 d, then 16 bytes of codes (low nibbles: values 0..15, high: 16..31)
    return _f16(b, 0) * _iq4_values(_nibbles(b[:, 2:18], n, 1, 16).reshape(n, 32))


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # fp16 d, uint16 high scale bits, 4 bytes of low scale nibbles, 128 bytes of codes
    d = _f16(b, 0)
    high = _split(b[:, 2:4], n, 1, 2, (0, 2, 4, 6), 3).transpose(2, 3).reshape(n, 8)  # 2 bits per sub-block
    low = _nibbles(b[:, 4:8], n, 1, 4).transpose(2, 3).reshape(n, 8)  # sub-block 2i: low nibble of byte i
    ls = (low | (high << 4)).to(torch.float32) - 32
    dl = (d * ls).reshape(n, 8, 1)
    q = _iq4_values(_nibbles(b[:, 8:136], n, 8, 16).reshape(n, 8, 32))  # per 32 values: 16 low, 16 high nibbles
    return (dl * q).reshape(n, 256)


# ----------------------------------------------------------------------- i-quants with codebook grids
# IQ1_S / IQ1_M / IQ2_XXS / IQ2_XS / IQ2_S / IQ3_XXS / IQ3_S: indices into codebook grids of 256 to
# 2048 entries of 8 (4 for IQ3) values, with per-group signs and scales. The grids (and the 128
# sign patterns ``ksigns_iq2xs``) are large constants of ggml; they are not copied here but read from
# the installed ``gguf`` package (``gguf.quants.<TYPE>.init_grid()`` / ``.grid``, ``IQ2_XXS.ksigns``,
# the same in every gguf release from 0.17 to 0.19), converted once to a tensor and kept per device:
# the first dequantisation on a device copies them there (a CUDA graph captures after a warm-up
# run, so not during capture), the later ones copy nothing.

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _gguf_quants():
    try:
        from gguf import quants
    except ImportError:
        raise UnsupportedGGMLType("the IQ1-IQ3 GGML types need the gguf package for their codebook grids: "
                                  "pip install 'zimage-native[gguf]' (or pip install gguf)") from None
    return quants


def _host_table(name: str) -> torch.Tensor:
    """Table ``name`` in fp32 on the host: a type's grid (entries, values per entry); ``"ksigns"``: the
    128 sign patterns of IQ2 / IQ3 as (128, 8) factors +1 / -1 (bit j of pattern i set: value j is
    negated); ``"bits"``: the same for the 256 byte values (IQ2_S / IQ3_S store plain sign bytes)."""
    import numpy as np

    if name == "bits":  # arithmetic, not a ggml constant
        bits = np.unpackbits(np.arange(256, dtype=np.uint8).reshape(256, 1), axis=1, bitorder="little")
        return torch.from_numpy(np.where(bits == 0, np.float32(1), np.float32(-1)))
    quants = _gguf_quants()
    if name == "ksigns":
        bits = np.unpackbits(np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).reshape(128, 1), axis=1,
                             bitorder="little")
        return torch.from_numpy(np.where(bits == 0, np.float32(1), np.float32(-1)))
    cls = getattr(quants, name)
    cls.init_grid()
    return torch.from_numpy(np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape).copy())


@torch.compiler.disable
def _load_table(name: str, device: torch.device) -> torch.Tensor:
    """Build table ``name`` on ``device`` and keep it; not traced by torch.compile (numpy and the
    gguf package's bytes), so a compiled model's first call on a cold device runs it eagerly. Where
    another thread kept one first, that one is returned (and this one dropped): a table once used is
    never replaced, so a captured CUDA graph's table stays alive."""
    return _TABLES.setdefault((name, device), _host_table(name).to(device))


def _table(name: str, device: torch.device) -> torch.Tensor:
    table = _TABLES.get((name, device))
    return _load_table(name, device) if table is None else table


def _lookup(name: str, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (any integer shape) of table ``name``: shape ``(*idx.shape, row length)``."""
    table = _table(name, idx.device)
    return table.index_select(0, idx.reshape(-1).long()).reshape(*idx.shape, table.shape[1])


def _u32(b: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``count`` little-endian 32-bit words from byte ``start`` of every block, as int32 (n, count):
    bits are read with an arithmetic shift and a mask, so the sign of the top bit does not matter."""
    return b[:, start:start + 4 * count].contiguous().view(torch.int32)


def _u16(b: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``count`` little-endian 16-bit words from byte ``start`` of every block, as int32 (n, count)."""
    w = b[:, start:start + 2 * count].reshape(-1, count, 2).to(torch.int32)
    return w[..., 0] | (w[..., 1] << 8)


def _sign_factors(signs: torch.Tensor) -> torch.Tensor:
    """+1 / -1 from the bits of sign bytes (n, width) (bit j of byte i: value 8i + j): (n, width, 8) fp32."""
    return _lookup("bits", signs)


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # fp16 d; per 32 values, 4 grid bytes and a uint32: 4 x 7-bit sign patterns, 4-bit scale
    d = _f16(b, 0)
    words = _u32(b, 2, 16).reshape(n, 8, 2)
    aux = words[..., 1]
    db = (d * (0.5 + ((aux >> 28) & 0xF).to(torch.float32)) * 0.25).reshape(n, 8, 1, 1)
    values = db * _lookup("IQ2_XXS", b[:, 2:66].reshape(n, 8, 8)[:, :, :4])
    values *= _lookup("ksigns", _split(aux, n, 8, 1, (0, 7, 14, 21), 0x7F).reshape(n, 8, 4))
    return values.reshape(n, 256)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # fp16 d, 32 uint16 (9-bit grid index, 7-bit sign pattern), 16 4-bit scales
    d = _f16(b, 0)
    qs = _u16(b, 2, 32)
    sc = _nibbles(b[:, 66:74], n, 1, 8).transpose(2, 3).reshape(n, 16).to(torch.float32)
    db = (d * (0.5 + sc) * 0.25).reshape(n, 16, 1, 1)
    values = db * _lookup("IQ2_XS", qs & 511).reshape(n, 16, 2, 8)
    values *= _lookup("ksigns", qs >> 9).reshape(n, 16, 2, 8)
    return values.reshape(n, 256)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # fp16 d, 32 low grid index bytes, 32 sign bytes, 8 bytes of 2-bit high index bits, 16 scales
    d = _f16(b, 0)
    sc = _nibbles(b[:, 74:82], n, 1, 8).transpose(2, 3).reshape(n, 16).to(torch.float32)
    db = (d * (0.5 + sc) * 0.25).reshape(n, 16, 1, 1)
    high = _split(b[:, 66:74], n, 1, 8, (0, 2, 4, 6), 3).transpose(2, 3).reshape(n, 32).to(torch.int32)
    values = db * _lookup("IQ2_S", b[:, 2:34].to(torch.int32) | (high << 8)).reshape(n, 16, 2, 8)
    values *= _sign_factors(b[:, 34:66]).reshape(n, 16, 2, 8)
    return values.reshape(n, 256)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # fp16 d, 64 grid bytes (4 values each), per 32 values a uint32: 4 sign patterns, 4-bit scale
    d = _f16(b, 0)
    aux = _u32(b, 66, 8)
    db = (d * (0.5 + ((aux >> 28) & 0xF).to(torch.float32)) * 0.5).reshape(n, 8, 1, 1)
    values = db * _lookup("IQ3_XXS", b[:, 2:66]).reshape(n, 8, 4, 8)
    values *= _lookup("ksigns", _split(aux, n, 8, 1, (0, 7, 14, 21), 0x7F).reshape(n, 8, 4))
    return values.reshape(n, 256)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # fp16 d, 64 low grid index bytes, 8 bytes of high index bits, 32 sign bytes, 8 scales
    d = _f16(b, 0)
    sc = _nibbles(b[:, 106:110], n, 1, 4).transpose(2, 3).reshape(n, 8)
    db = (d * (1 + 2 * sc).to(torch.float32)).reshape(n, 8, 1, 1)
    high = _bits(b[:, 66:74], n, 1, 8).transpose(2, 3).reshape(n, 64).to(torch.int32)
    values = db * _lookup("IQ3_S", b[:, 2:66].to(torch.int32) | (high << 8)).reshape(n, 8, 4, 8)
    values *= _sign_factors(b[:, 74:106]).reshape(n, 8, 4, 8)
    return values.reshape(n, 256)


def _iq1_values(qs: torch.Tensor, high: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """IQ1 grid values (-1, 0, 1) of 11-bit indices: 8 low bits in ``qs``, 3 high bits in ``high``."""
    return _lookup(name, qs.to(torch.int32) | (high.to(torch.int32) << 8)).reshape(shape)


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # fp16 d, 32 low index bytes, per 32 values a uint16: 4 x 3 high index bits,
    # a 3-bit scale and the sign of the delta
    d = _f16(b, 0)
    qh = _u16(b, 34, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(n, 8, 1, 1)
    delta = (0.125 - 0.25 * ((qh >> 15) & 1).to(torch.float32)).reshape(n, 8, 1, 1)
    high = _split(qh, n, 8, 1, (0, 3, 6, 9), 7).reshape(n, 32)
    values = _iq1_values(b[:, 2:34], high, "IQ1_S", (n, 8, 4, 8))
    values += delta
    values *= dl  # dl * (grid + delta), as the reference
    return values.reshape(n, 256)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]  # 32 low index bytes, 16 bytes of (3 high index bits, delta sign) nibbles, 4 uint16 of
    # 3-bit scales whose top nibbles are the fp16 d (bits 0-3 in the first word, 12-15 in the last)
    words = _u16(b, 48, 4)
    top = (words >> 12) & 0xF
    lo = (top[:, 0] | (top[:, 1] << 4)).to(torch.uint8)
    hi = (top[:, 2] | (top[:, 3] << 4)).to(torch.uint8)
    d = torch.stack([lo, hi], dim=1).view(torch.float16).to(torch.float32)
    sc = _split(words, n, 4, 1, (0, 3, 6, 9), 7).reshape(n, 16)
    dl = (d * (2 * sc + 1).to(torch.float32)).reshape(n, 8, 2, 1, 1)
    qh = _nibbles(b[:, 32:48], n, 1, 16).transpose(2, 3).reshape(n, 32)  # index i: low then high nibble of byte i // 2
    delta = (0.125 - 0.25 * ((qh >> 3) & 1).to(torch.float32)).reshape(n, 8, 2, 2, 1)
    values = _iq1_values(b[:, 0:32], qh & 7, "IQ1_M", (n, 8, 2, 2, 8))
    values += delta
    values *= dl
    return values.reshape(n, 256)


_BLOCK_DEQUANT = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "IQ1_S": _iq1_s, "IQ1_M": _iq1_m, "IQ2_XXS": _iq2_xxs,
    "IQ2_XS": _iq2_xs, "IQ2_S": _iq2_s, "IQ3_XXS": _iq3_xxs, "IQ3_S": _iq3_s,
}


def dequantize(raw: torch.Tensor, qtype: int | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed GGML rows ``(..., row_bytes)`` (``uint8``) -> values ``(..., row_values)`` in ``dtype``.

    The values are computed in fp32 exactly as ``gguf.quants.dequantize`` computes them, then cast.
    """
    name = type_name(qtype)
    if raw.dtype != torch.uint8:
        raise TypeError(f"packed GGML data must be uint8, got {raw.dtype}")
    block, size = block_info(name)
    lead, nbytes = tuple(raw.shape[:-1]), raw.shape[-1]
    if nbytes % size:
        raise ValueError(f"{name} rows are a multiple of {size} bytes, got {nbytes}")
    values = nbytes // size * block
    if name == "F32":
        out = raw.contiguous().view(torch.float32)
    elif name == "F16":
        out = raw.contiguous().view(torch.float16).to(torch.float32)
    elif name == "BF16":  # the top half of an fp32: exact, NaN payloads included
        out = (raw.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    else:
        blocks = raw.reshape(-1, size)
        out = _BLOCK_DEQUANT[name](blocks)
    return out.reshape(*lead, values).to(dtype)
