"""Tiny GGUF files written in code with ``gguf.GGUFWriter``: a Z-Image DiT in the ComfyUI-GGUF layout
and a Qwen3 text encoder in the llama.cpp layout, every block type built from random bytes with
finite fp16 scales (the ``gguf`` package cannot quantise the K-quants, only dequantise them).

The expected values of every tensor come from the ``gguf`` package's own ``dequantize``, so the
reference models built from them are independent of the engine's dequantisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zimage_native.bench import GGML_SCALES, put_scale

#: Byte offsets of the fp16 scale fields in one block, and a magnitude for them that keeps the
#: dequantised weights around 0.01-0.05 (so a random model stays finite): the engine's random-weight
#: table, checked against the format in test_gguf.py.
SCALE_FIELDS = GGML_SCALES
BLOCK_TYPES = tuple(SCALE_FIELDS)
ALL_TYPES = ("F32", "F16", "BF16", *BLOCK_TYPES)


def finite_f16(rng: np.random.Generator, n: int, magnitude: float | None) -> np.ndarray:
    """n fp16 values as bytes: uniform in +-magnitude, or any finite bit pattern (``None``)."""
    if magnitude is not None:
        return rng.uniform(-magnitude, magnitude, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    bits = rng.integers(0, 2**16, size=n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).astype(np.uint16)  # inf/NaN -> finite
    return bits.view(np.uint8).reshape(n, 2)


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator, magnitude: bool = True) -> np.ndarray:
    """Packed rows (rows, row_bytes) of a block type: random bytes, with finite fp16 scales (no
    ``gguf`` package needed: the block sizes are checked against it in test_gguf.py)."""
    from zimage_native.formats.ggml import block_info

    block, size = block_info(qtype)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    offsets, mag = SCALE_FIELDS[qtype]
    for off in offsets:
        put_scale(raw, qtype, off, finite_f16(rng, raw.shape[0], mag if magnitude else None))
    return raw.reshape(rows, cols // block * size)


def encode(value: torch.Tensor, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """(what the file stores, the values the package's reference dequantises it to) for one tensor.

    Block types ignore ``value`` except for its shape (random bytes); float types store it.
    """
    import gguf

    v = value.detach().float().numpy()
    q = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        data = v.astype(np.float32)
    elif qtype == "F16":
        data = v.astype(np.float16)
    elif qtype == "BF16":
        data = gguf.quants.quantize(v.astype(np.float32), q)
    else:
        data = random_blocks(qtype, int(np.prod(v.shape[:-1])), v.shape[-1], rng).reshape(*v.shape[:-1], -1)
    expected = gguf.quants.dequantize(data, q) if qtype not in ("F32",) else data
    return data, torch.from_numpy(np.array(expected, dtype=np.float32)).reshape(value.shape)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]], arch: str | None,
               metadata: dict | None = None) -> Path:
    """Write ``name -> (data, type)`` with GGUFWriter (``arch`` None: no general.architecture)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch or "unset")
    if arch is None:
        writer.kv_data[0].pop("general.architecture", None)
    for key, value in (metadata or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    for name, (data, qtype) in tensors.items():
        q = gguf.GGMLQuantizationType[qtype]
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q)
        else:
            writer.add_tensor(name, data, raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantizable(name: str, shape: tuple[int, ...], qtype: str) -> bool:
    """Whether a converter would store this tensor in ``qtype``: 2-D weights whose rows are whole blocks."""
    import gguf

    if qtype in ("F32", "F16", "BF16"):
        return len(shape) >= 2 or qtype == "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    return len(shape) == 2 and name.endswith(".weight") and shape[-1] % block == 0 and "pad_token" not in name


def gguf_state(state: dict[str, torch.Tensor], types, rng: np.random.Generator, fallback: str = "F32"
               ) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, torch.Tensor]]:
    """(file tensors, reference values) for a foreign-layout state dict. ``types``: one GGML type,
    or a callable name -> type (mixed files); tensors a type cannot hold fall back to ``fallback``."""
    file, values = {}, {}
    for i, (name, value) in enumerate(state.items()):
        qtype = types(name, i) if callable(types) else types
        if not quantizable(name, tuple(value.shape), qtype):
            qtype = fallback
        data, expected = encode(value, qtype, rng)
        file[name] = (data, qtype)
        values[name] = expected
    return file, values
