"""GGUF files: Z-Image DiTs (ComfyUI-GGUF / stable-diffusion.cpp) and Qwen3 text encoders (llama.cpp).

A GGUF file is a header (metadata key/values and tensor infos) followed by aligned tensor data;
the ``gguf`` package (``pip install zimage-native[gguf]``) reads it, memory-mapped. What a file
holds comes from its tensor names, not only from ``general.architecture``:

- a **DiT** has the original / ComfyUI names (``x_embedder``, fused ``attention.qkv``,
  ``attention.out``, ``final_layer``, ...), with or without a ``model.diffusion_model.`` prefix;
  ComfyUI-GGUF writes ``general.architecture = lumina2``, stable-diffusion.cpp may write none;
- a **text encoder** has llama.cpp names (``token_embd``, ``blk.N.attn_q``, ``blk.N.attn_q_norm``,
  ``output_norm``, ...) and architecture ``qwen3``. llama.cpp's converter permutes the q/k rows only
  for the ``llama`` architecture family (its rotary embedding is interleaved there); ``qwen3`` uses
  the NEOX (half-split) rotary embedding that transformers uses, and its weights are written
  unpermuted, so they map onto transformers' ``Qwen3Model`` as they are. Other architectures are refused.

Tensors are read as :class:`torch.Tensor`: F32 / F16 / BF16 as values in their own dtype, block
types (:data:`ggml.QUANT_TYPES`) as their packed bytes ``(rows, row_bytes)`` in ``uint8``, which
split by rows like values do (the fused ``attention.qkv``). A file cut short or with a damaged
header raises :class:`CorruptCheckpointError` (``PATH: truncated or not a GGUF file (...)``).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..converters.keymap import KeyMap, Rename, keymap_for, to_canonical
from .checkpoint import CorruptCheckpointError, UnsupportedFormatError
from .detect import ComponentInfo, FileFormat, _dit_layout
from .ggml import FLOAT_TYPES, GGML_TYPES, QUANT_TYPES, dequantize

CONTAINER = "GGUF"
#: The GGML types the engine reads, for messages.
SUPPORTED = ", ".join(FLOAT_TYPES + QUANT_TYPES)

#: Qwen3 as llama.cpp writes it -> the canonical (bare ``Qwen3Model``) names.
TE_LLAMA_CPP = KeyMap(
    name="llama.cpp",
    component="text_encoder",
    rules=(
        Rename("token_embd.{}", "embed_tokens.{}"),
        Rename("output_norm.{}", "norm.{}"),
        Rename("blk.{}.attn_norm.{}", "layers.{}.input_layernorm.{}"),
        Rename("blk.{}.attn_q_norm.{}", "layers.{}.self_attn.q_norm.{}"),
        Rename("blk.{}.attn_k_norm.{}", "layers.{}.self_attn.k_norm.{}"),
        Rename("blk.{}.attn_q.{}", "layers.{}.self_attn.q_proj.{}"),
        Rename("blk.{}.attn_k.{}", "layers.{}.self_attn.k_proj.{}"),
        Rename("blk.{}.attn_v.{}", "layers.{}.self_attn.v_proj.{}"),
        Rename("blk.{}.attn_output.{}", "layers.{}.self_attn.o_proj.{}"),
        Rename("blk.{}.ffn_norm.{}", "layers.{}.post_attention_layernorm.{}"),
        Rename("blk.{}.ffn_gate.{}", "layers.{}.mlp.gate_proj.{}"),
        Rename("blk.{}.ffn_up.{}", "layers.{}.mlp.up_proj.{}"),
        Rename("blk.{}.ffn_down.{}", "layers.{}.mlp.down_proj.{}"),
    ),
    drop=("rope_freqs.weight", "output.weight"),  # computed RoPE frequencies; the LM head (Z-Image reads hidden states)
)

_DIT_MARKERS = ("x_pad_token", "cap_embedder.1.weight", "layers.0.adaLN_modulation.0.weight")
_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_TE_ARCHITECTURES = ("qwen3",)
_TE_HF_PREFIXES = ("text_encoders.qwen3_4b.transformer.model.", "text_encoders.qwen3_4b.model.", "model.", "")


def _require_gguf(path: Path):
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UnsupportedFormatError(f"{path}: a GGUF file; reading it needs the gguf package: "
                                     f"pip install 'zimage-native[gguf]' (or pip install gguf)") from None
    return gguf


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its GGML type, its shape (torch order, values) and its bytes."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    n_bytes: int
    data: Any  # numpy view of the memory-mapped bytes / values
    stored: tuple[int, ...] = ()  # the shape as stored, when ComfyUI-GGUF's orig_shape differs from it
    offset: int = 0  # where its bytes start in the file

    @property
    def row_packed(self) -> bool:
        """Whether the packed rows are the rows of ``shape`` (not a reshape to whole blocks)."""
        return not self.stored or self.stored[-1] == self.shape[-1]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES


def _corrupt(path: Path, e: BaseException) -> CorruptCheckpointError:
    size = path.stat().st_size
    text = str(e)
    if size == 0 or "empty file" in text:
        detail = "the file is empty"
    elif "cannot reshape" in text or "larger dtype" in text or isinstance(e, IndexError):
        detail = f"its header or tensor data is cut short; the file has {size:,} bytes"
    else:
        detail = f"unreadable header: {type(e).__name__}: {text}; {size:,} bytes"
    return CorruptCheckpointError(path, CONTAINER, detail)


#: Values dequantised at a time by :meth:`GGUFCheckpoint.values` (4 MiB of fp32).
DEQUANT_ELEMENTS = 2**20


class GGUFCheckpoint:
    """The tensors and metadata of one GGUF file, by name; data is memory-mapped and read on demand."""

    def __init__(self, path: str | os.PathLike, copies: bool = False):
        self.path, self.copies = Path(path), copies
        gguf = _require_gguf(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = gguf.GGUFReader(str(self.path), mode="c")  # copy-on-write: writable views, file untouched
        except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
            if "GGMLQuantizationType" in str(e):  # a complete file with a tensor type newer than the package
                raise UnsupportedFormatError(
                    f"{self.path}: a GGUF tensor type the installed gguf package ({_gguf_version()}) does not know "
                    f"({e}); supported: {SUPPORTED}") from None
            raise _corrupt(self.path, e) from None
        self._reader = reader
        size = self.path.stat().st_size
        self.metadata: dict[str, Any] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name.startswith("tokenizer.ggml."):
                continue  # container counters; the vocabulary (large, and the tokenizer comes from its folder)
            try:
                self.metadata[name] = field.contents()
            except (ValueError, IndexError, TypeError, UnicodeDecodeError):
                continue
        self.architecture: str | None = self.metadata.get("general.architecture")
        self.tensors: dict[str, GGUFTensor] = {}
        self.unsupported: dict[str, str] = {}
        for t in reader.tensors:
            qtype = t.tensor_type.name if hasattr(t.tensor_type, "name") else str(t.tensor_type)
            if int(t.tensor_type) not in GGML_TYPES:
                self.unsupported[t.name] = qtype
            shape = stored = tuple(int(d) for d in reversed(t.shape.tolist()))
            orig = self.metadata.get(f"comfy.gguf.orig_shape.{t.name}")
            if orig is not None and int(np.prod(orig)) == int(np.prod(shape)):
                shape = tuple(int(d) for d in orig)
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise CorruptCheckpointError(self.path, CONTAINER, f"its tensors need {end:,} bytes, the file has "
                                                                   f"{size:,}")
            self.tensors[t.name] = GGUFTensor(t.name, qtype, shape, int(t.n_bytes), t.data,
                                              stored if stored != shape else (), int(t.data_offset))

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory map (names, types and shapes stay readable)."""
        self._reader = None
        self.tensors = {k: replace(t, data=None) for k, t in self.tensors.items()}

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the values' shape and dtype (fp32 for packed tensors: what they dequantise to)."""
        t = self.tensors[key]
        dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(t.qtype, torch.float32)
        return torch.empty(t.shape, dtype=dtype, device="meta")

    def get(self, key: str) -> torch.Tensor:
        """F32 / F16 / BF16: the values (own dtype). Block types: the packed bytes ``(rows, row_bytes)``
        in uint8, rows being the shape's leading dimensions. A view of the file's memory map (mapped
        copy-on-write: a write to it changes this process's pages only), which it keeps open after
        :meth:`close`: a packed weight kept packed is the file's pages, not a copy of them beside
        them (which doubled the load's peak, and held the weights in anonymous memory). With
        ``copies``, the bytes read from the file into memory of their own instead."""
        t = self.tensors[key]
        if key in self.unsupported:
            raise UnsupportedFormatError(f"{self.path}: tensor {key} has GGML type {t.qtype}, which is not supported")
        if self.copies:  # read from the file, not through the map (see ``Checkpoint``'s ``copies``)
            raw, done = torch.empty(t.n_bytes, dtype=torch.uint8), 0
            with open(self.path, "rb", buffering=0) as f:
                f.seek(t.offset)
                while done < t.n_bytes:
                    got = f.readinto(memoryview(raw.numpy())[done:])
                    if not got:
                        raise CorruptCheckpointError(self.path, CONTAINER, f"{key} ends before its last byte")
                    done += got
        else:
            raw = torch.from_numpy(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8))
        if t.qtype == "F32":
            return raw.view(torch.float32).reshape(t.shape)
        if t.qtype == "F16":
            return raw.view(torch.float16).reshape(t.shape)
        if t.qtype == "BF16":
            return raw.view(torch.bfloat16).reshape(t.shape)
        shape = t.stored or t.shape  # a reshaped tensor's blocks run along its stored rows
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return raw.reshape(rows, -1)

    def values(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor's values (dequantised if packed) in ``dtype``, in its shape. A packed tensor is
        dequantised by blocks of :data:`DEQUANT_ELEMENTS` values into the result: whole, the unpacking's
        fp32 intermediates of every block were held at once (a 10240 x 3840 Q4_K weight: 468 MiB at
        the peak for 150 MiB of fp32 values)."""
        t = self.tensors[key]
        x = self.get(key)
        if not t.quantized:
            return x.to(dtype)
        out = torch.empty(x.shape[0], t.numel // max(1, x.shape[0]), dtype=dtype)
        step = max(1, DEQUANT_ELEMENTS // max(1, out.shape[1]))
        for i in range(0, x.shape[0], step):
            out[i:i + step] = dequantize(x[i:i + step], t.qtype, dtype)
        return out.reshape(t.shape)


# ============================================================================ detection


def _te_problem(ckpt: GGUFCheckpoint, keys: list[str]) -> str | None:
    arch = ckpt.architecture
    if arch is not None and arch not in _TE_ARCHITECTURES:
        note = (" (llama.cpp permutes the q/k weights of the llama family, and Z-Image needs Qwen3 anyway)"
                if arch == "llama" else "")
        return (f"{ckpt.path}: a GGUF text encoder of architecture {arch!r}: Z-Image needs Qwen3-4B "
                f"(architecture 'qwen3'){note}")
    if "blk.0.attn_q_norm.weight" not in keys:
        return f"{ckpt.path}: the text encoder has no attn_q_norm: it is not a Qwen3 model (Z-Image needs Qwen3-4B)"
    return None


def _component(ckpt: GGUFCheckpoint, component: str, layout: str, prefix: str, keys: list[str]) -> ComponentInfo:
    info = ComponentInfo(component, layout, prefix, keys)
    qtypes = {ckpt.tensors[k].qtype for k in keys}
    info.quantization = "gguf" if any(q not in FLOAT_TYPES for q in qtypes) else None
    for k in keys:
        t = ckpt.tensors[k]
        info.dtypes[t.qtype] = info.dtypes.get(t.qtype, 0) + t.numel
        info.tensors += 1
        info.parameters += t.numel
    return info


def inspect_gguf(ckpt: GGUFCheckpoint) -> FileFormat:
    """Which Z-Image component an open GGUF file holds (from its tensor names), or why it cannot load."""
    keys = ckpt.keys()
    meta = {k: str(v) for k, v in ckpt.metadata.items() if k.startswith("general.") and not isinstance(v, list)}
    fmt = FileFormat(ckpt.path, "gguf", "model", metadata=meta)
    arch = ckpt.architecture
    found = []
    for prefix in _DIT_PREFIXES:
        if any(prefix + m in keys for m in _DIT_MARKERS):
            comp_keys = [k for k in keys if k.startswith(prefix)]
            stripped = [k[len(prefix):] for k in comp_keys]
            try:
                layout = _dit_layout(stripped, ckpt.path)
            except UnsupportedFormatError as e:
                fmt.problem = str(e)
                return fmt
            found.append(_component(ckpt, "transformer", layout, prefix, comp_keys))
            break
    hf = next((p for p in _TE_HF_PREFIXES if p + "embed_tokens.weight" in keys), None)
    if hf is not None:  # a Qwen3 in transformers names (some GGUF converters keep them)
        # (and the LM head beside model., which the key map drops, as from a safetensors file: not left
        # out as a tensor of no component)
        head = hf.removesuffix("model.") + "lm_head.weight" if hf.endswith("model.") else None
        te_keys = [k for k in keys if (k.startswith(hf) or k == head) and not k.startswith(_DIT_PREFIXES[:2])]
        if hf + "layers.0.self_attn.q_norm.weight" not in keys:
            fmt.problem = (f"{ckpt.path}: the text encoder has no q_norm: it is not a Qwen3 model "
                           f"(Z-Image needs Qwen3-4B)")
            return fmt
        # The transformers key map strips its prefixes itself.
        found.append(_component(ckpt, "text_encoder", "transformers" if hf else "bare", "", te_keys))
    elif "token_embd.weight" in keys and any(k.startswith("blk.0.attn_q.") for k in keys):
        te_keys = [k for k in keys if k.startswith(("token_embd.", "output_norm.", "output.", "blk.", "rope_freqs."))]
        problem = _te_problem(ckpt, te_keys)
        if problem:
            fmt.problem = problem
            return fmt
        found.append(_component(ckpt, "text_encoder", "llama.cpp", "", te_keys))
    fmt.components = found
    if not found:
        fmt.kind = "unknown"
        fmt.problem = (f"{ckpt.path}: a GGUF file (architecture {arch!r}) that is not a Z-Image DiT or a Qwen3 text "
                       f"encoder (tensors such as {sorted(keys)[:3]}); Z-Image takes its own DiT (GGUF builds such as "
                       f"jayn7/Z-Image-Turbo-GGUF's) and Qwen3-4B as its text encoder (such as Qwen/Qwen3-4B-GGUF's)")
        return fmt
    read = [k for c in found for k in _read_keys(c)]
    bad = [k for k in read if k in ckpt.unsupported]
    if bad:
        counts: dict[str, int] = {}
        for k in bad:
            counts[ckpt.unsupported[k]] = counts.get(ckpt.unsupported[k], 0) + 1
        kinds = ", ".join(f"{q} {n}" for q, n in sorted(counts.items()))
        what = next(("the DiT's" if c.component == "transformer" else "the text encoder's")
                    for c in found if bad[0] in c.keys)
        fmt.problem = (f"{ckpt.path}: {what} tensor {bad[0]} is stored as {ckpt.unsupported[bad[0]]}, a GGML type this "
                       f"engine does not dequantise ({len(bad)} of the {len(read)} tensors it would load: {kinds}); "
                       f"supported: {SUPPORTED}: use a build of the model in one of those (a Q4_K_M, IQ4_XS, Q5_K_M, "
                       f"Q6_K or Q8_0 file; an IQ3_S, IQ2_M or IQ1_M one for less memory)")
    return fmt


def _read_keys(info: ComponentInfo) -> list[str]:
    """The file keys that loading the component reads: not those the key map drops (a DiT's stray
    ``norm_final``, an LM head) nor a text encoder's last layer and final norm, which the truncated
    encoder never reads (``text_encoder.unused_key``)."""
    km = keymap_of(info)
    targets = {k: km.forward_key(km.strip(_strip(info, k)))[1] for k in info.keys}
    if info.component != "text_encoder":
        return [k for k, t in targets.items() if t]
    from ..text_encoder import unused_key

    layers = {int(m.group(1)) for ts in targets.values() for c in ts if (m := re.match(r"layers\.(\d+)\.", c))}
    n = max(layers) + 1 if layers else 0
    return [k for k, ts in targets.items() if any(not unused_key(c, n) for c in ts)]


def detect_gguf(path: str | os.PathLike) -> FileFormat:
    with GGUFCheckpoint(path) as ckpt:
        return inspect_gguf(ckpt)


def check_gguf(path: str | os.PathLike) -> Path:
    """Raise a one-line :class:`CorruptCheckpointError` unless ``path`` is a complete GGUF file."""
    GGUFCheckpoint(path).close()
    return Path(path)


# ============================================================================ canonical stream


def keymap_of(info: ComponentInfo) -> KeyMap:
    if info.component == "text_encoder" and info.layout == "llama.cpp":
        return TE_LLAMA_CPP
    return keymap_for(info.component, info.layout)


def _strip(info: ComponentInfo, key: str) -> str:
    return key[len(info.prefix):] if info.prefix and key.startswith(info.prefix) else key


def canonical_qtypes(ckpt: GGUFCheckpoint, info: ComponentInfo) -> dict[str, str]:
    """Canonical key -> GGML type of every packed (block-type) tensor of the component."""
    km = keymap_of(info)
    out = {}
    for key in info.keys:
        t = ckpt.tensors[key]
        if t.quantized and t.row_packed:  # a tensor reshaped to whole blocks is dequantised while loading
            for canon in km.forward_key(km.strip(_strip(info, key)))[1]:
                out[canon] = t.qtype
    return out


def canonical_items(ckpt: GGUFCheckpoint, info: ComponentInfo, meta: bool = False, packed: set[str] | None = None,
                    dtype: torch.dtype = torch.float32, keep=None, by_rows=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The component as canonical (key, tensor) pairs.

    ``meta``: meta tensors with the values' shapes. Otherwise a packed tensor whose canonical
    key(s) are all in ``packed`` stays packed (uint8 rows); one of two dimensions, packed by rows,
    whose canonical keys ``by_rows`` all accepts comes as a
    :class:`~zimage_native.formats.tensors.ValueRows` of its packed bytes, dequantised to fp32 by
    blocks of rows where used; every other packed tensor is dequantised to ``dtype``; float tensors
    come in their own dtype. ``keep(canonical key)`` skips reading tensors that are not wanted.
    """
    from .tensors import ValueRows

    km = keymap_of(info)
    packed = packed if packed is not None else set()

    def shaped(name: str, x: torch.Tensor) -> torch.Tensor:
        # stable-diffusion.cpp's Z-Image GGUFs store the pad tokens as (dim,); the model's are (1, dim).
        if info.component == "transformer" and name.endswith("pad_token") and x.dim() == 1:
            return x.reshape(1, -1)
        return x

    def raw() -> Iterator[tuple[str, torch.Tensor]]:
        for key in info.keys:
            name = km.strip(_strip(info, key))
            targets = km.forward_key(name)[1]
            if not targets or (keep is not None and not any(keep(t) for t in targets)):
                continue
            t = ckpt.tensors[key]
            if meta:
                yield name, shaped(name, ckpt.meta(key))
            elif t.quantized and all(c in packed for c in targets):
                yield name, ckpt.get(key)
            elif (t.quantized and t.row_packed and len(t.shape) == 2 and by_rows is not None
                  and all(by_rows(c) for c in targets)):
                rows = ckpt.get(key)
                yield name, ValueRows(t.shape, lambda i, j, rows=rows, qtype=t.qtype: dequantize(rows[i:j], qtype))
                del rows
            else:
                yield name, shaped(name, ckpt.values(key, dtype) if t.quantized else ckpt.get(key))

    return to_canonical(raw(), km)


def canonical_shapes(ckpt: GGUFCheckpoint, info: ComponentInfo) -> dict[str, tuple]:
    return {k: tuple(t.shape) for k, t in canonical_items(ckpt, info, meta=True)}


def text_encoder_base(ckpt: GGUFCheckpoint, info: ComponentInfo) -> dict[str, Any]:
    """Qwen3 config values that shapes cannot give, from the llama.cpp metadata (when present)."""
    arch = ckpt.architecture or "qwen3"
    base: dict[str, Any] = {}
    for key, name, cast in (("rope.freq_base", "rope_theta", float),
                            ("attention.layer_norm_rms_epsilon", "rms_norm_eps", float),
                            ("context_length", "max_position_embeddings", int)):
        value = ckpt.metadata.get(f"{arch}.{key}")
        if value is not None:
            base[name] = cast(value)
    base["tie_word_embeddings"] = "output.weight" not in info.keys
    return base


# ============================================================================ zimage info


def describe_gguf(path: str | os.PathLike, fmt: FileFormat) -> dict[str, Any]:
    """The ``zimage info`` description of a GGUF file: components, GGML types with tensor counts and bytes."""
    from .describe import note_config_error, note_missing_keys
    from .infer import infer_config

    out: dict[str, Any] = {"path": str(fmt.path), "container": "gguf", "kind": fmt.kind,
                           "architecture": fmt.metadata.get("general.architecture")}
    if fmt.problem:
        out["problem"] = fmt.problem
    components = {}
    with GGUFCheckpoint(path) as ckpt:
        out["file_bytes"] = ckpt.file_size
        for info in fmt.components:
            types: dict[str, dict[str, int]] = {}
            for k in info.keys:
                t = ckpt.tensors[k]
                entry = types.setdefault(t.qtype, {"tensors": 0, "bytes": 0, "parameters": 0})
                entry["tensors"] += 1
                entry["bytes"] += t.n_bytes
                entry["parameters"] += t.numel
            desc: dict[str, Any] = {
                "layout": info.layout, "prefix": info.prefix, "quantization": info.quantization,
                "tensors": info.tensors, "parameters": info.parameters, "dtypes": info.dtypes,
                "gguf_types": types, "bytes": sum(e["bytes"] for e in types.values()),
            }
            try:
                base = text_encoder_base(ckpt, info) if info.component == "text_encoder" else None
                shapes = canonical_shapes(ckpt, info)
                cfg = infer_config(info.component, shapes, None, base)
                desc["config"] = cfg if isinstance(cfg, dict) else cfg.to_dict()
            except (ValueError, KeyError) as e:
                note_config_error(out, desc, info.component, e, fmt.path)
            else:
                note_missing_keys(out, desc, info.component, cfg, shapes, fmt.path)
            components[info.component] = desc
    out["components"] = components
    return out
