"""Resident weight bytes of each component in each low-VRAM setting, computed from tensor shapes.

The numbers in docs/formats.md and docs/performance.md come from here (``python -m
zimage_native.footprint`` prints them). Each model is built on the ``meta`` device from its config
(no memory, no weights), and each tensor's bytes follow from its shape and the storage the engine
gives it:

- ``bf16`` / ``fp16`` / ``fp32``: every tensor in that dtype;
- ``fp8`` (DiT, ``--fp8``, :mod:`zimage_native.accel.fp8`): the attention and feed-forward linears
  inside the blocks as float8 (1 byte) with one fp32 scale per output row, the rest in bf16;
- ``nvfp4`` / ``mxfp8`` (a ComfyUI block-scaled DiT kept packed, ``quant_linear.BlockScaledLinear``):
  the same linears as their codes (nvfp4: two per byte; mxfp8: one byte each), one byte of block
  scale per 16 (nvfp4) or 32 (mxfp8) values of a row and one fp32 ``scale_2`` per layer (a fused
  q|k|v is split into three layers), the rest in bf16. That is a file storing all of those linears
  in that format;
- ``int8`` / ``int4`` (text encoder, ``--text-encoder-quant``, :mod:`zimage_native.quantize`):
  int8 linears with one fp32 scale per row; int4 codes two per byte with a scale and a minimum per
  group of 128 inputs in the model dtype; in both the token embedding in int8 with one fp32 scale
  per row; norms in the model dtype;
- ``gguf:TYPE`` (GGUF files, kept packed): every linear weight whose rows are a multiple of the
  type's block in the GGML block type ``TYPE`` (``Q8_0``: 34 bytes per 32 values, ``Q4_K``: 144
  bytes per 256, ...), every other tensor in the compute dtype. That is a file with one type for
  all its linears.

Real files mix formats per layer (a ``Q4_K_M`` GGUF file: Q4_K, Q6_K and F32 tensors; a ComfyUI
comfy_quant file: nvfp4, mxfp8, float8, int8 and bf16 layers). :func:`dit_file_bytes` counts a DiT
file's own mix from its header alone, each tensor by the same per-tensor rules
(:func:`stored_bytes`) in the format the loader keeps it in (``zimage info FILE`` prints it).

``offload="blocks"`` (:mod:`zimage_native.offload`) keeps on the device only what is outside the
streamed parts of the blocks plus ``depth + 1`` blocks in flight (the running block and its
prefetch); the text encoder then lives on the CPU except while it encodes. Activations, the CUDA
context and the allocator's cache come on top of every number here: they are not weights and are
measured, not computed (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .formats.ggml import GGML_TYPES
from .formats.microscale import BLOCK_FORMATS
from .quantize import INT4_GROUP

#: GGML type -> (values per block, bytes per block): the types the GGUF loader reads (formats.ggml).
GGML_BLOCKS: dict[str, tuple[int, int]] = {name: (block, size) for name, block, size in GGML_TYPES.values()}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a built model: its qualified name, shape, and the module type that holds it."""

    name: str
    shape: tuple[int, ...]
    owner: type
    buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensors_of(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``module`` (meta or not) with the module type holding it."""
    out = []
    for prefix, sub in module.named_modules():
        for table, buffer in ((sub._parameters, False), (sub._buffers, True)):
            for name, t in table.items():
                if t is not None:
                    out.append(Tensor(f"{prefix}.{name}" if prefix else name, tuple(t.shape), type(sub), buffer))
    return out


# ----------------------------------------------------------------------------- models on meta


def dit_on_meta(config=None) -> nn.Module:
    from .config import TransformerConfig
    from .model.transformer import ZImageTransformer

    with torch.device("meta"):
        return ZImageTransformer(config or TransformerConfig())


def vae_on_meta(config=None) -> nn.Module:
    from .config import VAEConfig
    from .model.vae import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(config or VAEConfig())


@functools.lru_cache(maxsize=1)
def _released_text_encoder_tensors() -> tuple[list[Tensor], int]:
    model = text_encoder_on_meta()
    return [t for t in tensors_of(model) if not t.buffer], _unique_buffer_bytes(model)


def text_encoder_on_meta(config: dict | None = None) -> nn.Module:
    """The truncated Qwen3 the engine loads (N-1 layers, no final norm) on meta, from a full Qwen3
    config (default: the released Qwen3-4B); its RoPE table is built for real, as the loader does."""
    from transformers import Qwen3Config

    from .formats.infer import RELEASED_QWEN3
    from .text_encoder import build_truncated_qwen3

    data = {k: v for k, v in (config or RELEASED_QWEN3).items() if k not in ("model_type", "transformers_version")}
    model, cfg, _ = build_truncated_qwen3(Qwen3Config(**data))
    with torch.device("cpu"):
        model.rotary_emb = type(model.rotary_emb)(config=cfg)
    return model


# ----------------------------------------------------------------------------- bytes per tensor


def _unique_buffer_bytes(module: nn.Module) -> int:
    """Bytes of the real (non-meta) buffers, each storage once (RoPE tables alias each other)."""
    seen, total = set(), 0
    for b in module.buffers():
        if b.is_meta:
            continue
        key = b.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += b.numel() * b.element_size()
    return total


def dit_block_linear(t: Tensor) -> bool:
    """A weight that fp8 and GGUF quantise: the attention / feed-forward linears inside the blocks
    (not the adaLN projections, embedders or final layer)."""
    in_block = t.name.startswith(("layers.", "noise_refiner.", "context_refiner."))
    return (in_block and t.owner is nn.Linear and t.name.endswith(".weight") and "adaLN" not in t.name
            and (".attention." in t.name or ".feed_forward." in t.name))


def ggml_bytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor stored in GGML type ``qtype`` (rows along the last dimension)."""
    block, size = GGML_BLOCKS[qtype]
    n = 1
    for d in shape:
        n *= d
    if shape[-1] % block:
        raise ValueError(f"a {qtype} row holds a multiple of {block} values; a row of {shape[-1]} cannot be {qtype}")
    return n // block * size


def gguf_bytes(tensors: list[Tensor], types: dict[str, str], dtype: str = "bf16") -> int:
    """Resident bytes with the named tensors kept packed in their GGML type (``{name: type}``, a
    float type counts as the compute ``dtype``), every other tensor in ``dtype``."""
    total = 0
    for t in tensors:
        qtype = types.get(t.name)
        if qtype is None or qtype in ("F32", "F16", "BF16"):
            total += t.numel * (4 if t.buffer else DTYPE_BYTES[dtype])
        else:
            total += ggml_bytes(qtype, t.shape)
    return total


def uniform_types(tensors: list[Tensor], qtype: str, select: Callable[[Tensor], bool]) -> dict[str, str]:
    """``{name: qtype}`` for the selected tensors (a file with one type for all its linears)."""
    return {t.name: qtype for t in tensors if select(t)}


def _weights(fmt: str) -> tuple[str, str | None]:
    """'bf16' -> ('bf16', None); 'gguf:Q4_K' -> ('bf16', 'Q4_K'); 'fp8' -> ('bf16', 'fp8')."""
    if fmt.startswith("gguf:"):
        qtype = fmt.split(":", 1)[1]
        if qtype not in GGML_BLOCKS:
            raise ValueError(f"unknown GGML type {qtype!r}; known: {sorted(GGML_BLOCKS)}")
        return "bf16", qtype
    if fmt == "fp8" or fmt in BLOCK_FORMATS:
        return "bf16", fmt
    if fmt not in DTYPE_BYTES:
        raise ValueError(f"weights must be one of {sorted(DTYPE_BYTES)}, 'fp8', {', '.join(map(repr, BLOCK_FORMATS))} "
                         f"or 'gguf:TYPE', got {fmt!r}")
    return fmt, None


def ggml_linear(qtype: str) -> Callable[[Tensor], bool]:
    """The tensors a one-type GGUF file packs: linear weights whose rows fit the type's blocks."""
    block = GGML_BLOCKS[qtype][0]
    return lambda t: t.owner is nn.Linear and t.name.endswith(".weight") and t.shape[-1] % block == 0


def block_scaled_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes of a linear weight kept as a BlockScaledLinear in ``fmt`` ("nvfp4" / "mxfp8"): its codes
    (nvfp4: two a byte), one block-scale code (a byte) per block of a row, and the fp32 ``scale_2``."""
    block = BLOCK_FORMATS[fmt][0]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"a {fmt} row holds a multiple of {block} values; a row of {cols} cannot be {fmt}")
    return rows * cols // (2 if fmt == "nvfp4" else 1) + rows * (cols // block) + 4


def scaled_rows_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of a linear weight kept as one-byte values (float8, or a comfy_quant int8 layer) with one
    fp32 scale per output row (``FP8StoredLinear``, ``Int8StoredLinear``, ``--fp8``'s linears)."""
    return math.prod(shape) + 4 * shape[0]


def int4_bytes(shape: tuple[int, ...], dtype: str = "bf16") -> int:
    """Bytes of a linear weight quantised to int4 (``quantize.Int4Linear``): codes two per byte, a
    scale and a minimum per group of :data:`~zimage_native.quantize.INT4_GROUP` inputs in ``dtype``."""
    rows, cols = shape
    if cols % INT4_GROUP:
        raise ValueError(f"int4 needs the input features ({cols}) to be a multiple of {INT4_GROUP}")
    return rows * cols // 2 + 2 * DTYPE_BYTES[dtype] * rows * (cols // INT4_GROUP)


def stored_bytes(t: Tensor, storage: str | None, dtype: str = "bf16") -> int:
    """Bytes of ``t`` held as ``storage``: None (in ``dtype``), a GGML type, "nvfp4" / "mxfp8",
    one-byte values with a scale per row ("fp8", a float8 dtype's name, "int8"), or "int4"."""
    if storage is None:
        return t.numel * DTYPE_BYTES[dtype]
    if storage in GGML_BLOCKS:
        return ggml_bytes(storage, t.shape)
    if storage in BLOCK_FORMATS:
        return block_scaled_bytes(storage, t.shape)
    if storage in ("fp8", "int8") or storage.startswith("float8"):
        return scaled_rows_bytes(t.shape)
    if storage == "int4":
        try:
            return int4_bytes(t.shape, dtype)
        except ValueError as e:
            raise ValueError(f"{t.name}: {e}") from None
    raise ValueError(f"unknown storage {storage!r} for {t.name}")


def dit_tensor_storage(t: Tensor, quant: str | None) -> str | None:
    """How a DiT stored all in one format (``quant``: "fp8", "nvfp4", "mxfp8", a GGML type or None)
    holds ``t``: in that format, or None (in the compute dtype)."""
    if quant == "fp8":
        return quant if dit_block_linear(t) and t.shape[0] % 16 == 0 and t.shape[1] % 16 == 0 else None
    if quant in BLOCK_FORMATS:  # a file's layers are padded to whole blocks in both dimensions
        block = BLOCK_FORMATS[quant][0]
        return quant if dit_block_linear(t) and t.shape[0] % block == 0 and t.shape[1] % block == 0 else None
    if quant is not None and ggml_linear(quant)(t):
        return quant
    return None


def dit_tensor_bytes(t: Tensor, fmt: str) -> int:
    dtype, quant = _weights(fmt)
    return stored_bytes(t, dit_tensor_storage(t, quant), dtype)


# ----------------------------------------------------------------------------- components


def streamed(t: Tensor) -> bool:
    """A tensor that ``offload="blocks"`` streams: inside a block, outside its adaLN projection."""
    from .offload import RESIDENT

    parts = t.name.split(".")
    return parts[0] in ("layers", "noise_refiner", "context_refiner") and not any(p in RESIDENT for p in parts)


def placed_bytes(tensors: list[Tensor], bytes_of: Callable[[Tensor], int], offload: str = "none",
                 depth: int = 1) -> int:
    """Bytes of a DiT's ``tensors`` on its device: all of them, or with ``offload="blocks"`` those that
    stay resident plus ``depth + 1`` of the largest streamed blocks."""
    if offload not in ("none", "blocks"):
        raise ValueError(f"offload must be 'none' or 'blocks' for the DiT, got {offload!r}")
    if offload == "none":
        return sum(bytes_of(t) for t in tensors)
    resident = sum(bytes_of(t) for t in tensors if not streamed(t))
    blocks: dict[str, int] = {}
    for t in tensors:
        if streamed(t):
            key = ".".join(t.name.split(".")[:2])
            blocks[key] = blocks.get(key, 0) + bytes_of(t)
    return resident + (depth + 1) * max(blocks.values())


def dit_bytes(config=None, weights: str = "bf16", offload: str = "none", depth: int = 1) -> int:
    """Bytes of the DiT on its device: all of it, or with ``offload="blocks"`` what stays resident
    plus ``depth + 1`` of the largest streamed blocks."""
    return placed_bytes(tensors_of(dit_on_meta(config)), lambda t: dit_tensor_bytes(t, weights), offload, depth)


# ----------------------------------------------------------------------------- a DiT file, layer by layer


def dit_file_layers(path, keep_fp8: bool = True, config=None) -> tuple[list[Tensor], dict[str, str]]:
    """(the tensors of the DiT that a file loads into, ``{name: storage}`` of those the loader keeps
    packed in the file's own format, layer by layer), from the file's header alone.

    The model is built on meta from the config the loader infers (``config`` overrides, as
    ``load_component``'s). What stays packed follows the loader's rules: in a GGUF file, every
    ``nn.Linear`` weight stored in a block type (``canonical_qtypes``: rows of whole blocks), in that
    type; in a safetensors file with float8 weights or comfy_quant int8 / nvfp4 / mxfp8 layers, with
    ``keep_fp8`` (``load_component``'s default on the CPU, with ``offload="blocks"``, and on a GPU
    where the dequantised DiT does not fit), every ``nn.Linear`` weight of those (``kept_formats``);
    everything else is cast or dequantised to the compute dtype (``keep_fp8=False``: all of it)."""
    from pathlib import Path

    from .formats import Checkpoint, canonical_shapes, folder_config, infer_transformer_config, inspect_checkpoint
    from .formats.checkpoint import sniff

    path = Path(path).expanduser()
    if path.is_file() and sniff(path) == "gguf":
        from .formats.gguf import GGUFCheckpoint, canonical_qtypes, inspect_gguf
        from .formats.gguf import canonical_shapes as gguf_shapes

        with GGUFCheckpoint(path) as ckpt:
            info = inspect_gguf(ckpt).component("transformer")
            packed, shapes = canonical_qtypes(ckpt, info), gguf_shapes(ckpt, info)
        owners = (nn.Linear, nn.Embedding)  # (swap_quantized_modules_)
    else:
        from .loading import kept_formats

        with Checkpoint(path) as ckpt:
            info = inspect_checkpoint(ckpt).component("transformer")
            shapes = canonical_shapes(ckpt, info)
            kept = kept_formats(ckpt, info) if keep_fp8 and info.has_fp8_weights else {}
        packed = {k: v if isinstance(v, str) else str(v).removeprefix("torch.") for k, v in kept.items()}
        owners = (nn.Linear,)  # (swap_fp8_linears_)
    tensors = tensors_of(dit_on_meta(infer_transformer_config(shapes, config, folder_config(path))))
    return tensors, {t.name: packed[t.name] for t in tensors if t.name in packed and t.owner in owners}


def dit_file_bytes(path, dtype: str = "bf16", offload: str = "none", keep_fp8: bool = True, depth: int = 1,
                   config=None) -> int:
    """Bytes the DiT of a file holds on its device once loaded in ``dtype``, each layer in the format
    the loader keeps it in (:func:`dit_file_layers`: a file mixing formats is counted layer by layer),
    all resident or with ``offload="blocks"`` (as :func:`dit_bytes`). From the header alone."""
    tensors, storage = dit_file_layers(path, keep_fp8, config)
    return placed_bytes(tensors, lambda t: stored_bytes(t, storage.get(t.name), dtype), offload, depth)


def dit_file_formats(path, dtype: str = "bf16", keep_fp8: bool = True, config=None) -> dict[str, dict[str, int]]:
    """The resident DiT of :func:`dit_file_bytes` by storage: ``{format: {"tensors": n, "bytes": b}}``,
    the packed formats (a GGML type, "nvfp4", "mxfp8", a float8 dtype, "int8": linear weights) first,
    largest first, then ``dtype`` (every other tensor)."""
    return _by_storage(*dit_file_layers(path, keep_fp8, config), dtype)


def dit_file_summary(path, dtype: str = "bf16", config=None) -> dict:
    """What ``zimage info FILE`` prints for a DiT file, from its header: ``{"resident": bytes,
    "offload_blocks": bytes, "formats": dit_file_formats(...)}`` with the file's packed layers kept
    packed (GGUF: always; fp8 / comfy_quant files: ``keep_fp8``), and for a file whose layers may
    also be dequantised while loading (``keep_fp8=False``, or a GPU where they fit dequantised) the
    same under ``"dequantised"``."""
    out = {}
    for keep in (True, False):
        tensors, storage = dit_file_layers(path, keep, config)
        size = lambda t: stored_bytes(t, storage.get(t.name), dtype)  # noqa: E731
        out[keep] = {"resident": placed_bytes(tensors, size), "offload_blocks": placed_bytes(tensors, size, "blocks"),
                     "formats": _by_storage(tensors, storage, dtype)}
    return out[True] if out[True] == out[False] else {**out[True], "dequantised": out[False]}


def _by_storage(tensors: list[Tensor], storage: dict[str, str], dtype: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in tensors:
        entry = out.setdefault(storage.get(t.name, dtype), {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += stored_bytes(t, storage.get(t.name), dtype)
    rest = out.pop(dtype, None)
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))
    return {**out, dtype: rest} if rest else out


def text_encoder_storage(t: Tensor, quant: str = "none", packed: dict[str, str] | None = None) -> str | None:
    """How the truncated Qwen3 holds ``t`` (:func:`stored_bytes`' ``storage``): a weight that a GGUF file
    stores in a block type (``packed``: ``{name: GGML type}``) stays packed if it is an ``nn.Linear`` or
    ``nn.Embedding`` weight (``swap_quantized_modules_``); with ``--text-encoder-quant`` ``quant``
    ("int8" / "int4", ``quantize.swap_for_quantized_``) every other linear weight is quantised to
    ``quant`` and the embedding to int8; the rest (norms, and everything with "none") is in the
    compute dtype (None)."""
    if t.buffer or t.owner not in (nn.Linear, nn.Embedding) or not t.name.endswith("weight"):
        return None
    if packed and t.name in packed:
        return packed[t.name]
    if quant == "none":
        return None
    return "int8" if t.owner is nn.Embedding else quant


def text_encoder_bytes(config: dict | None = None, quant: str = "none", dtype: str = "bf16") -> int:
    """Bytes of the truncated Qwen3 (``config``: a full Qwen3 config dict, default Qwen3-4B) with
    ``--text-encoder-quant quant`` ("none", "int8", "int4") or as a GGUF file ("gguf:TYPE": every
    linear and the token embedding in TYPE, norms in ``dtype``)."""
    if config is None:
        params, buffers = _released_text_encoder_tensors()
    else:
        model = text_encoder_on_meta(config)
        params, buffers = [t for t in tensors_of(model) if not t.buffer], _unique_buffer_bytes(model)
    if quant not in ("none", "int8", "int4") and not quant.startswith("gguf:"):
        raise ValueError(f"text encoder quant must be 'none', 'int8', 'int4' or 'gguf:TYPE', got {quant!r}")
    packed = None
    if quant.startswith("gguf:"):
        qtype = _weights(quant)[1]
        packed = {t.name: qtype for t in params if len(t.shape) == 2 and t.shape[-1] % GGML_BLOCKS[qtype][0] == 0}
        quant = "none"
    return buffers + sum(stored_bytes(t, text_encoder_storage(t, quant, packed), dtype) for t in params)


# ----------------------------------------------------------------------------- a text encoder file, layer by layer


def text_encoder_file_layers(path, quant: str = "none", config=None) -> tuple[list[Tensor], int, dict[str, str]]:
    """(the parameters of the truncated Qwen3 that a file's text encoder loads into, the bytes of its
    computed buffers (the fp32 RoPE table), ``{name: storage}`` of the weights not held in the compute
    dtype), from the file's header alone.

    The model is built on meta from the config the loader infers (``config`` overrides, as
    ``load_component``'s), without the last layer, the final norm and the LM head (never loaded).
    A GGUF file's ``nn.Linear`` / ``nn.Embedding`` weights stored in a block type (rows of whole
    blocks) stay packed in that type, layer by layer; every other tensor, and every tensor of a
    safetensors file (bf16, fp16, fp32, float8: dequantised while loading), is cast to the compute
    dtype, or with ``quant`` quantised as :func:`text_encoder_storage` says."""
    from pathlib import Path

    from .formats import Checkpoint, canonical_shapes, folder_config, infer_text_encoder_config, inspect_checkpoint
    from .formats.checkpoint import sniff

    if quant not in ("none", "int8", "int4"):
        raise ValueError(f"text encoder quant must be 'none', 'int8' or 'int4', got {quant!r}")
    path = Path(path).expanduser()
    base = folder_config(path) or {}
    packed: dict[str, str] = {}
    if path.is_file() and sniff(path) == "gguf":
        from .formats.gguf import GGUFCheckpoint, canonical_qtypes, inspect_gguf, text_encoder_base
        from .formats.gguf import canonical_shapes as gguf_shapes

        with GGUFCheckpoint(path) as ckpt:
            info = inspect_gguf(ckpt).component("text_encoder")
            packed, shapes = canonical_qtypes(ckpt, info), gguf_shapes(ckpt, info)
            base = {**base, **text_encoder_base(ckpt, info)}
    else:
        with Checkpoint(path) as ckpt:
            shapes = canonical_shapes(ckpt, inspect_checkpoint(ckpt).component("text_encoder"))
    model = text_encoder_on_meta(infer_text_encoder_config(shapes, config, base))
    params = [t for t in tensors_of(model) if not t.buffer]
    storage = {t.name: s for t in params if (s := text_encoder_storage(t, quant, packed)) is not None}
    return params, _unique_buffer_bytes(model), storage


def text_encoder_file_bytes(path, dtype: str = "bf16", quant: str = "none", config=None) -> int:
    """Bytes the text encoder of a file (a Qwen3 safetensors or GGUF file, or the one inside an
    all-in-one file) holds once loaded in ``dtype``, each layer in the format the loader keeps it in
    (:func:`text_encoder_file_layers`), from the header alone."""
    params, buffers, storage = text_encoder_file_layers(path, quant, config)
    return buffers + sum(stored_bytes(t, storage.get(t.name), dtype) for t in params)


def text_encoder_file_summary(path, dtype: str = "bf16", config=None) -> dict:
    """What ``zimage info FILE`` prints for a text encoder, from the header: ``{"resident": bytes,
    "formats": {format: {"tensors": n, "bytes": b}}, "rope_table": bytes}`` (the formats' bytes and
    the fp32 RoPE table add up to ``resident``), and ``"text_encoder_quant": {"int8": bytes, "int4":
    bytes}``, what ``--text-encoder-quant`` makes of it (int4 only where the widths allow it)."""
    params, buffers, storage = text_encoder_file_layers(path, "none", config)
    formats = _by_storage(params, storage, dtype)
    out = {"resident": buffers + sum(e["bytes"] for e in formats.values()), "formats": formats, "rope_table": buffers,
           "text_encoder_quant": {}}
    for quant in ("int8", "int4"):
        try:
            out["text_encoder_quant"][quant] = text_encoder_file_bytes(path, dtype, quant, config)
        except ValueError:  # int4 needs widths of whole groups
            pass
    return out


def vae_bytes(config=None, dtype: str = "bf16") -> int:
    return sum(t.numel * DTYPE_BYTES[dtype] for t in tensors_of(vae_on_meta(config)))


def vae_file_bytes(path, dtype: str = "bf16", config=None) -> int:
    """Bytes the VAE of a file (a VAE safetensors file or folder, or the one inside an all-in-one
    file) holds once loaded in ``dtype`` (every tensor in ``dtype``, as the loader casts them), built
    on meta from the config the loader infers from the header (``config`` overrides, as
    ``load_component``'s). From the header alone."""
    from pathlib import Path

    from .formats import Checkpoint, canonical_shapes, folder_config, infer_vae_config, inspect_checkpoint

    path = Path(path).expanduser()
    with Checkpoint(path) as ckpt:
        shapes = canonical_shapes(ckpt, inspect_checkpoint(ckpt).component("vae"))
    return vae_bytes(infer_vae_config(shapes, config, folder_config(path)), dtype)


# ----------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """A low-VRAM setting: the DiT's weights, the text encoder's, the offload mode, the card size it
    targets and whether the VAE decodes in tiles (``tiled_vae``, which changes no weight bytes)."""

    name: str
    dit: str  # "bf16" | "fp8" | "nvfp4" | "mxfp8" | "gguf:TYPE"
    text_encoder: str  # "none" (bf16) | "int8" | "int4" | "gguf:TYPE"
    offload: str  # "none" | "text_encoder" | "blocks"
    card_gib: float
    tiled_vae: bool = False


#: The profiles of zimage_native/config.example.toml (``--profile NAME``).
PROFILES = (
    Profile("rtx4090", "bf16", "int8", "none", 24),
    Profile("16gb", "gguf:Q8_0", "int8", "none", 16, tiled_vae=True),
    Profile("12gb", "gguf:Q6_K", "int8", "none", 12, tiled_vae=True),
    Profile("8gb", "gguf:Q4_K", "int8", "blocks", 8, tiled_vae=True),  # a Q4_K_M file: mostly Q4_K (see the module doc)
)


def profile_bytes(profile: Profile, dit_config=None, te_config: dict | None = None, vae_config=None) -> dict[str, int]:
    """Weight bytes on the GPU per phase: while encoding the prompt, and while denoising and
    decoding (the text encoder has left the GPU when it is offloaded)."""
    dit = dit_bytes(dit_config, profile.dit, "blocks" if profile.offload == "blocks" else "none")
    te = text_encoder_bytes(te_config, profile.text_encoder)
    vae = vae_bytes(vae_config)
    offloaded = profile.offload in ("text_encoder", "blocks")
    return {"dit": dit, "text_encoder": te, "vae": vae, "encode": dit + te + vae,
            "denoise": dit + vae + (0 if offloaded else te)}


def report() -> str:
    """The tables of docs/formats.md and docs/performance.md, for the released models."""
    from .config import TransformerConfig

    cfg = TransformerConfig()
    gb = lambda n: f"{n / 1e9:.2f} GB ({n:,} B)"  # noqa: E731
    lines = ["DiT (6,154,908,736 parameters):"]
    for fmt in ("fp32", "bf16", "fp8", "mxfp8", "nvfp4", "gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_K", "gguf:Q4_K",
                "gguf:Q4_0", "gguf:Q3_K", "gguf:Q2_K"):
        lines.append(f"  {fmt:<10} resident {gb(dit_bytes(cfg, fmt))}   offload=blocks {gb(dit_bytes(cfg, fmt, 'blocks'))}")
    lines.append("Text encoder (Qwen3-4B, 35 of 36 layers loaded):")
    for quant in ("none", "int8", "int4", "gguf:Q8_0", "gguf:Q6_K", "gguf:Q4_K"):
        lines.append(f"  {quant:<10} {gb(text_encoder_bytes(quant=quant))}")
    lines.append(f"VAE bf16: {gb(vae_bytes())}")
    lines.append("Profiles (weights on the GPU while encoding / while denoising and decoding):")
    for p in PROFILES:
        b = profile_bytes(p, cfg)
        lines.append(f"  {p.name:<8} {p.dit:<10} te={p.text_encoder:<5} offload={p.offload:<12} "
                     f"encode {b['encode'] / 2**30:.2f} GiB  denoise {b['denoise'] / 2**30:.2f} GiB "
                     f"({b['encode']:,} / {b['denoise']:,} B) of {p.card_gib} GB")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(report())
