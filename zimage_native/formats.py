"""Checkpoint formats: detection from safetensors headers, single-file loading, fp8, config inference.

What a file is comes from its header only (tensor names, dtypes and shapes), never from its name:

- which components it holds (DiT, VAE, Qwen3 text encoder; one file may hold all three, as
  ComfyUI's all-in-one checkpoints do under ``model.diffusion_model.`` / ``vae.`` /
  ``text_encoders.qwen3_4b.``) and in which layout (``converters.keymap``);
- its quantisation: none, plain fp8 (float8 weights, no scales: upcast while loading) or
  ComfyUI's "scaled fp8" (``scale_weight`` per Linear, weight = fp8 * scale). Formats that need
  kernels we do not have (comfy_quant mixed precision, nunchaku SVDQuant, GGUF, bitsandbytes,
  GPTQ/AWQ) are recognised and refused with an error that names them.

A single file carries no config. The released configs (Z-Image-Turbo DiT, FLUX VAE, Qwen3-4B)
are assumed, everything the tensor shapes determine is inferred and checked, and what shapes
cannot tell (RoPE axes, norm groups, scaling factors, ...) can be overridden with
``transformer_config=`` / ``vae_config=`` / ``text_encoder_config=`` (a dict or a config.json).

Public entry points: :func:`detect_format`, :func:`load_component`, :func:`load_tokenizer`,
:class:`SingleFileMixin` (``from_single_files``) and :func:`read_component_state_dict`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .config import SchedulerConfig, TransformerConfig, VAEConfig
from .converters.keymap import KeyMap, keymap_for, to_canonical
from .loading import assign_state_dict, build_on_meta, safetensors_files

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "text_encoder")
_KIND_ALIASES = {"dit": "transformer", "unet": "transformer", "diffusion_model": "transformer",
                 "text-encoder": "text_encoder", "te": "text_encoder", "encoder": "text_encoder", "ae": "vae"}

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

#: Keys that describe quantisation rather than hold a weight of the model.
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")
_MARKER = "scaled_fp8"

#: The released Qwen3-4B text-encoder config (zimage-reference 2.5); shapes override what they determine.
RELEASED_QWEN3: dict[str, Any] = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2560, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=9728, hidden_act="silu",
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_scaling=None, max_position_embeddings=40960,
    vocab_size=151936, tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0,
    bos_token_id=151643, eos_token_id=151645, max_window_layers=36, use_sliding_window=False,
    sliding_window=None,
)


class UnsupportedFormatError(ValueError):
    """A checkpoint we recognise but cannot load (the message names the format), or do not recognise."""


# =========================================================================== headers


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]  # byte range inside the file's data section

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype)


def _sniff(path: Path) -> str:
    """'gguf', 'pickle', 'safetensors' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 200_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip, or a raw pickle stream
        return "pickle"
    return "unknown"


def _refuse_non_safetensors(path: Path) -> None:
    kind = _sniff(path)
    if kind == "gguf":
        raise UnsupportedFormatError(
            f"{path}: GGUF file (llama.cpp / ComfyUI-GGUF quantisation) is not supported; use a safetensors "
            f"checkpoint (bf16, fp8 or scaled fp8)")
    if kind == "pickle":
        raise UnsupportedFormatError(
            f"{path}: pickled PyTorch checkpoint (.pt/.ckpt/.bin) is refused (pickle can run code); "
            f"convert it to safetensors first")
    if kind != "safetensors":
        raise UnsupportedFormatError(f"{path}: not a safetensors file (unrecognised header)")


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors header (8-byte length + JSON): tensor infos and ``__metadata__``. No data is read."""
    path = Path(path)
    _refuse_non_safetensors(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    tensors = {k: TensorInfo(v["dtype"], tuple(v["shape"]), path, tuple(v["data_offsets"])) for k, v in header.items()}
    return tensors, metadata


def _component_files(path: Path) -> list[Path]:
    if path.is_dir() and (path / "model_index.json").is_file():
        raise UnsupportedFormatError(
            f"{path} is a whole model folder (diffusers layout): load it with ZImagePipeline.from_pretrained, "
            f"or give one component (a file, or a folder such as {path / 'transformer'})")
    return safetensors_files(path)


class Checkpoint:
    """The tensors of one file, or of a component folder (sharded or not), by name. Data is read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = _component_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            tensors, metadata = read_header(file)
            twice = sorted(set(tensors) & set(self.tensors))
            if twice:
                raise ValueError(f"{self.path}: tensors stored in two files, e.g. {twice[:3]}")
            self.tensors.update(tensors)
            self.metadata.update(metadata)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[key]
        if info.file not in self._handles:
            handle = safe_open(str(info.file), framework="pt", device="cpu")
            self._handles[info.file] = self._stack.enter_context(handle)
        return self._handles[info.file].get_tensor(key)

    def meta(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        dtype = info.torch_dtype
        if dtype is None:
            raise UnsupportedFormatError(f"{self.path}: tensor {key} has dtype {info.dtype}, which is not supported")
        return torch.empty(info.shape, dtype=dtype, device="meta")

    def raw_bytes(self, key: str) -> bytes:
        """The stored bytes of a (small) tensor, without torch: used for quantisation markers."""
        info = self.tensors[key]
        with open(info.file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n + info.offsets[0])
            return f.read(info.offsets[1] - info.offsets[0])


# =========================================================================== detection


@dataclass
class ComponentInfo:
    """One model component found in a checkpoint."""

    component: str  # transformer | vae | text_encoder
    layout: str  # a name from converters.keymap.LAYOUTS
    prefix: str  # the key prefix that selects this component in the file ("" for a plain file)
    keys: list[str]  # the full keys of the component, quantisation keys included
    quantization: str | None = None  # None | "fp8" | "scaled-fp8"
    n_blocks: int | None = None  # VAE only: len(block_out_channels), for the LDM up-block mirror
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> parameter count
    tensors: int = 0
    parameters: int = 0

    def keymap(self) -> KeyMap:
        """The key map of this layout (its ``prefixes`` cover every prefix that detection accepts)."""
        return keymap_for(self.component, self.layout, self.n_blocks)


@dataclass
class FileFormat:
    """What :func:`detect_format` found. ``problem`` says why it cannot be loaded (None if it can)."""

    path: Path
    container: str  # safetensors | gguf | pickle | unknown
    kind: str  # model | lora | controlnet | unknown
    components: list[ComponentInfo] = field(default_factory=list)
    problem: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def component(self, kind: str) -> ComponentInfo:
        kind = normalize_kind(kind)
        if self.problem:
            raise UnsupportedFormatError(self.problem)
        for c in self.components:
            if c.component == kind:
                return c
        found = ", ".join(c.component for c in self.components) or "no Z-Image component"
        raise UnsupportedFormatError(f"{self.path}: no {kind} in this checkpoint (found: {found})")


def normalize_kind(kind: str) -> str:
    kind = _KIND_ALIASES.get(kind.lower().replace(" ", "_"), kind.lower().replace("-", "_"))
    if kind not in COMPONENTS:
        raise ValueError(f"unknown component {kind!r}; choose one of {list(COMPONENTS)}")
    return kind


def _is_aux(key: str) -> bool:
    return key.endswith(_SCALE_SUFFIXES) or key == _MARKER or key.endswith("." + _MARKER)


def _comfy_quant_formats(ckpt: Checkpoint, keys: list[str]) -> list[str]:
    formats = set()
    for key in keys:
        if key.endswith(".comfy_quant"):
            try:
                formats.add(str(json.loads(ckpt.raw_bytes(key).decode("utf-8")).get("format", "?")))
            except (ValueError, UnicodeDecodeError, AttributeError):
                formats.add("?")
    meta = ckpt.metadata.get("_quantization_metadata")
    if meta:
        try:
            layers = json.loads(meta).get("layers", {})
            formats.update(str(v.get("format", "?")) for v in layers.values() if isinstance(v, dict))
        except (ValueError, AttributeError):
            formats.add("?")
    return sorted(formats)


def _quantization_problem(ckpt: Checkpoint) -> str | None:
    """A message naming the quantisation format we cannot load, or None."""
    keys = ckpt.keys()
    path = ckpt.path
    if any(k.endswith(".comfy_quant") for k in keys) or "_quantization_metadata" in ckpt.metadata:
        formats = ", ".join(_comfy_quant_formats(ckpt, keys)) or "?"
        return (f"{path}: ComfyUI mixed-precision 'comfy_quant' quantisation (formats: {formats}) is not supported; "
                f"use a bf16, plain fp8 or legacy scaled-fp8 file")
    if any(k.endswith((".qweight", ".wscales", ".smooth_factor", ".wtscale")) for k in keys):
        return (f"{path}: nunchaku SVDQuant (W4A4 int4/fp4, 'qweight') checkpoint is not supported: it needs the "
                f"nunchaku CUDA kernels")
    if any(k.endswith((".absmax", ".quant_map", ".nested_absmax")) or ".quant_state." in k for k in keys):
        return f"{path}: bitsandbytes-quantised checkpoint (absmax/quant_state) is not supported"
    if any(k.endswith((".qzeros", ".g_idx")) for k in keys):
        return f"{path}: GPTQ/AWQ-quantised checkpoint (qzeros/g_idx) is not supported"
    odd = sorted({i.dtype for k, i in ckpt.tensors.items() if i.dtype not in SAFETENSORS_DTYPES})
    if odd:
        return f"{path}: tensor dtypes {odd} (a packed quantisation format) are not supported"
    return None


_LORA_KEY = re.compile(r"(lora_|\.lora\.|lokr_|hada_|\.alpha$|dora_scale|lora_magnitude)")

_DIT_MARKERS = ("x_pad_token", "cap_embedder.1.weight", "layers.0.adaLN_modulation.0.weight")
_CANDIDATES = {
    # (outer prefix, marker keys relative to it). Prefixed candidates are claimed before bare ones.
    "transformer": [(p, _DIT_MARKERS) for p in ("model.diffusion_model.", "diffusion_model.", "")],
    "vae": [(p, ("decoder.conv_in.weight", "encoder.conv_in.weight")) for p in ("vae.", "first_stage_model.", "")],
    "text_encoder": [(p, ("model.embed_tokens.weight", "embed_tokens.weight"))
                     for p in ("text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_4b.", "")],
}


def _dit_layout(stripped: list[str], path: Path) -> str:
    comfy = any(k.endswith(".attention.qkv.weight") for k in stripped)
    fused = any(k.endswith((".attention.to_qkv.weight", ".feed_forward.w13.weight")) for k in stripped)
    split = any(k.endswith(".attention.to_q.weight") for k in stripped)
    if sum((comfy, fused, split)) > 1:
        raise UnsupportedFormatError(f"{path}: the DiT mixes layouts (fused attention.qkv and split to_q keys)")
    if comfy or any(k.startswith("x_embedder.") for k in stripped):
        return "comfyui"
    if fused:
        return "native-fused"
    return "diffusers"


def _analyse(ckpt: Checkpoint, component: str, prefix: str, keys: list[str]) -> ComponentInfo:
    km_probe = keymap_for(component, {"transformer": "diffusers", "vae": "diffusers",
                                      "text_encoder": "bare"}[component])
    stripped = [km_probe.strip(k[len(prefix):]) for k in keys]
    n_blocks = None
    if component == "transformer":
        layout = _dit_layout(stripped, ckpt.path)
    elif component == "vae":
        ldm = any(k.startswith(("decoder.mid.", "encoder.mid.", "decoder.up.", "encoder.down.")) for k in stripped)
        layout = "ldm" if ldm else "diffusers"
        blocks = r"(?:decoder\.up|encoder\.down)" if ldm else r"(?:decoder\.up_blocks|encoder\.down_blocks)"
        pat = re.compile(rf"^{blocks}\.(\d+)\.")
        idx = {int(m.group(1)) for k in stripped if (m := pat.match(k))}
        n_blocks = max(idx) + 1 if idx else None
    else:
        layout = "transformers" if any(k[len(prefix):].startswith("model.") for k in keys) else "bare"
        if not any(k.endswith("layers.0.self_attn.q_norm.weight") for k in stripped):
            raise UnsupportedFormatError(
                f"{ckpt.path}: the text encoder has no q_norm: it is not a Qwen3 model (Z-Image needs Qwen3-4B)")
    info = ComponentInfo(component, layout, prefix, keys, n_blocks=n_blocks)
    weights = [k for k in keys if not _is_aux(k)]
    fp8 = [k for k in weights if ckpt.tensors[k].dtype in FP8_DTYPES]
    scaled = any(k.endswith((".scale_weight", ".weight_scale")) for k in keys) or any(
        k == _MARKER or k.endswith("." + _MARKER) for k in keys)
    if fp8:
        info.quantization = "scaled-fp8" if scaled else "fp8"
    ints = [k for k in weights if ckpt.tensors[k].dtype not in FLOAT_DTYPES + FP8_DTYPES]
    if ints:
        raise UnsupportedFormatError(
            f"{ckpt.path}: integer-typed weights ({ckpt.tensors[ints[0]].dtype} {ints[0]}) without a known "
            f"quantisation marker are not supported")
    for k in keys:
        t = ckpt.tensors[k]
        info.dtypes[t.dtype] = info.dtypes.get(t.dtype, 0) + t.numel
        info.tensors += 1
        info.parameters += 0 if _is_aux(k) else t.numel
    return info


def inspect_checkpoint(ckpt: Checkpoint) -> FileFormat:
    """Detect components, layouts and quantisation of an open checkpoint (header only)."""
    keys = ckpt.keys()
    fmt = FileFormat(ckpt.path, "safetensors", "model", metadata=dict(ckpt.metadata))
    fmt.problem = _quantization_problem(ckpt)
    if fmt.problem:
        return fmt
    if keys and all(_LORA_KEY.search(k) for k in keys):
        fmt.kind = "lora"
        fmt.problem = f"{ckpt.path}: this is a LoRA, not a model checkpoint; apply it with pipe.load_lora(...)"
        return fmt
    if any(re.search(r"(^|\.)control_", k) for k in keys):
        fmt.kind = "controlnet"
        fmt.problem = f"{ckpt.path}: a Z-Image ControlNet (control_* keys) is not supported"
        return fmt
    unclaimed = set(keys)
    found: list[tuple[str, str]] = []
    for bare in (False, True):
        for component, candidates in _CANDIDATES.items():
            for prefix, markers in candidates:
                if (prefix == "") != bare or any(c == component for c, _ in found):
                    continue
                if any(prefix + m in unclaimed for m in markers):
                    found.append((component, prefix))
                    if prefix:
                        unclaimed -= {k for k in unclaimed if k.startswith(prefix)}
    bare_found = [c for c, p in found if p == ""]
    if len(bare_found) > 1:
        fmt.problem = f"{ckpt.path}: ambiguous checkpoint: unprefixed keys of several components {bare_found}"
        return fmt
    for component, prefix in found:
        comp_keys = [k for k in keys if k.startswith(prefix)] if prefix else [
            k for k in keys if k in unclaimed]
        try:
            fmt.components.append(_analyse(ckpt, component, prefix, comp_keys))
        except UnsupportedFormatError as e:
            fmt.problem = str(e)
            return fmt
    if not fmt.components:
        fmt.kind = "unknown"
        fmt.problem = (f"{ckpt.path}: not recognised as a Z-Image DiT, FLUX-family VAE or Qwen3 text encoder "
                       f"(keys such as {sorted(keys)[:3]})")
    return fmt


def detect_format(path: str | os.PathLike) -> FileFormat:
    """Detect what a file or component folder holds, from headers only. Never raises on a readable path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        container = _sniff(path)
        if container != "safetensors":
            fmt = FileFormat(path, container, "unknown")
            try:
                _refuse_non_safetensors(path)
            except UnsupportedFormatError as e:
                fmt.problem = str(e)
            return fmt
    with Checkpoint(path) as ckpt:
        return inspect_checkpoint(ckpt)


# =========================================================================== config inference


def read_overrides(overrides: dict | str | os.PathLike | None) -> dict[str, Any]:
    """A config override: None, a dict, or a path to a config.json (keys starting with '_' are dropped)."""
    if overrides is None:
        return {}
    if isinstance(overrides, (str, os.PathLike)):
        path = Path(overrides)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            overrides = json.load(f)
    elif hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    if not isinstance(overrides, dict):
        raise TypeError(f"a config override must be a dict or a path to a config.json, got {type(overrides).__name__}")
    return {k: v for k, v in overrides.items() if not k.startswith("_")}


def _merge_checked(what: str, base: dict, inferred: dict, overrides: dict) -> dict:
    """base < inferred < overrides, where an override of an inferred value must agree with it."""
    for key, value in overrides.items():
        if key in inferred and _norm(value) != _norm(inferred[key]):
            raise ValueError(
                f"{what}: config value {key}={value!r} does not match the checkpoint, whose tensor shapes give "
                f"{key}={inferred[key]!r}")
    return {**base, **inferred, **overrides}


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


def _count(shapes: dict[str, tuple], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in shapes if (m := rx.match(k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise ValueError(f"block indices are not contiguous for {pattern}: {sorted(idx)}")
    return len(idx)


def _need(shapes: dict[str, tuple], key: str, what: str) -> tuple:
    if key not in shapes:
        raise UnsupportedFormatError(f"{what}: the checkpoint has no {key}; cannot infer its config")
    return tuple(shapes[key])


def infer_transformer_config(shapes: dict[str, tuple], overrides: dict | str | os.PathLike | None = None,
                             base: dict | None = None) -> TransformerConfig:
    """The DiT config: released Turbo values, with what canonical tensor shapes determine inferred and checked."""
    what = "transformer"
    overrides = read_overrides(overrides)
    base = {**TransformerConfig().to_dict(), **(base or {})}
    embed = [k for k in shapes if re.fullmatch(r"all_x_embedder\.\d+-\d+\.weight", k)]
    if len(embed) != 1:
        raise UnsupportedFormatError(f"{what}: expected one patch embedder, found {embed or 'none'}")
    patch, f_patch = (int(v) for v in embed[0].split(".")[1].split("-"))
    dim, patch_dim = _need(shapes, embed[0], what)
    inferred: dict[str, Any] = {"dim": dim, "all_patch_size": [patch], "all_f_patch_size": [f_patch]}
    if patch_dim % (patch * patch * f_patch):
        raise ValueError(f"{what}: patch embedder input {patch_dim} is not a multiple of {patch}*{patch}*{f_patch}")
    inferred["in_channels"] = patch_dim // (patch * patch * f_patch)
    inferred["cap_feat_dim"] = _need(shapes, "cap_embedder.0.weight", what)[0]
    inferred["n_layers"] = _count(shapes, r"^layers\.(\d+)\.")
    refiners = _count(shapes, r"^noise_refiner\.(\d+)\.")
    context = _count(shapes, r"^context_refiner\.(\d+)\.")
    if refiners != context:
        raise ValueError(f"{what}: {refiners} noise-refiner blocks but {context} context-refiner blocks")
    inferred["n_refiner_layers"] = refiners
    head_dim = _need(shapes, "layers.0.attention.norm_q.weight", what)[0]
    if dim % head_dim:
        raise ValueError(f"{what}: dim {dim} is not a multiple of the q/k-norm size (head dim) {head_dim}")
    inferred["n_heads"] = dim // head_dim
    merged = _merge_checked(what, base, inferred, overrides)
    if "n_kv_heads" not in overrides:  # unused by the model; the released config sets it to n_heads
        merged["n_kv_heads"] = merged["n_heads"]
    try:
        config = TransformerConfig.from_dict(merged)
    except ValueError as e:
        hint = ""
        if head_dim != sum(merged["axes_dims"]):
            hint = (f" The checkpoint's head dim is {head_dim} (the q/k-norm size) but axes_dims "
                    f"{list(merged['axes_dims'])} sums to {sum(merged['axes_dims'])}: RoPE axes cannot be read from "
                    f"shapes, pass transformer_config={{'axes_dims': [...]}} (zimage convert: --config FILE).")
        raise ValueError(f"{what}: {e}.{hint}") from None
    _check_shapes(what, shapes, {
        "layers.0.feed_forward.w1.weight": (config.ffn_dim, dim),
        "layers.0.adaLN_modulation.0.weight": (4 * dim, config.adaln_dim),
        "t_embedder.mlp.2.weight": (config.adaln_dim, 1024),
        f"all_final_layer.{embed[0].split('.')[1]}.linear.weight": (config.patch_dim, dim),
        "cap_embedder.1.weight": (dim, config.cap_feat_dim),
    })
    return config


def _check_shapes(what: str, shapes: dict[str, tuple], expected: dict[str, tuple]) -> None:
    for key, shape in expected.items():
        if key in shapes and tuple(shapes[key]) != tuple(shape):
            raise ValueError(f"{what}: {key} has shape {tuple(shapes[key])}, the config implies {tuple(shape)}")


def infer_vae_config(shapes: dict[str, tuple], overrides: dict | str | os.PathLike | None = None,
                     base: dict | None = None) -> VAEConfig:
    """The VAE config: released FLUX-VAE values, with widths, depth and channels read from the shapes."""
    what = "vae"
    overrides = read_overrides(overrides)
    base = {**VAEConfig().to_dict(), **(base or {})}
    n = _count(shapes, r"^encoder\.down_blocks\.(\d+)\.")
    if not n:
        raise UnsupportedFormatError(f"{what}: no encoder down blocks found")
    widths = [_need(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", what)[0] for i in range(n)]
    layers = _count(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    up_layers = _count(shapes, r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.")
    if up_layers != layers + 1:
        raise ValueError(f"{what}: decoder blocks have {up_layers} resnets, expected layers_per_block + 1 = "
                         f"{layers + 1}")
    inferred = {
        "block_out_channels": widths,
        "layers_per_block": layers,
        "in_channels": _need(shapes, "encoder.conv_in.weight", what)[1],
        "out_channels": _need(shapes, "decoder.conv_out.weight", what)[0],
        "latent_channels": _need(shapes, "decoder.conv_in.weight", what)[1],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "mid_block_add_attention": "decoder.mid_block.attentions.0.to_q.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }
    merged = _merge_checked(what, base, inferred, overrides)
    try:
        config = VAEConfig.from_dict(merged)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    _check_shapes(what, shapes, {"encoder.conv_out.weight": (2 * config.latent_channels, widths[-1], 3, 3)})
    return config


def infer_text_encoder_config(shapes: dict[str, tuple], overrides: dict | str | os.PathLike | None = None,
                              base: dict | None = None) -> dict[str, Any]:
    """Qwen3Config keyword arguments: released Qwen3-4B values, with sizes read from the shapes."""
    what = "text_encoder"
    overrides = read_overrides(overrides)
    base = {**RELEASED_QWEN3, **(base or {})}
    vocab, hidden = _need(shapes, "embed_tokens.weight", what)
    head_dim = _need(shapes, "layers.0.self_attn.q_norm.weight", what)[0]
    q_rows = _need(shapes, "layers.0.self_attn.q_proj.weight", what)[0]
    kv_rows = _need(shapes, "layers.0.self_attn.k_proj.weight", what)[0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise ValueError(f"{what}: q/k projections ({q_rows}, {kv_rows} rows) are not multiples of head_dim {head_dim}")
    n_layers = _count(shapes, r"^layers\.(\d+)\.")
    if "norm.weight" not in shapes:
        raise ValueError(f"{what}: the checkpoint has no final norm.weight: it looks truncated; Z-Image needs the "
                         f"full Qwen3 (it reads hidden_states[-2])")
    inferred = {
        "vocab_size": vocab, "hidden_size": hidden, "head_dim": head_dim, "num_hidden_layers": n_layers,
        "num_attention_heads": q_rows // head_dim, "num_key_value_heads": kv_rows // head_dim,
        "intermediate_size": _need(shapes, "layers.0.mlp.gate_proj.weight", what)[0],
        "attention_bias": "layers.0.self_attn.q_proj.bias" in shapes,
    }
    merged = _merge_checked(what, base, inferred, overrides)
    if merged.get("max_window_layers", 0) > n_layers and "max_window_layers" not in overrides:
        merged["max_window_layers"] = n_layers
    if merged.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"{what}: expected model_type 'qwen3', got {merged['model_type']!r}")
    return merged


# =========================================================================== reading tensors


def _scale_for(ckpt: Checkpoint, key: str) -> str | None:
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


def _raw_items(ckpt: Checkpoint, info: ComponentInfo, meta: bool, dequant: bool = True
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """The component's weights in file order (quantisation keys consumed), as stored or dequantised to fp32."""
    for key in info.keys:
        if _is_aux(key):
            continue
        t_info = ckpt.tensors[key]
        if t_info.dtype in FP8_DTYPES and dequant:
            if meta:
                yield key, torch.empty(t_info.shape, dtype=torch.float32, device="meta")
            else:
                scale_key = _scale_for(ckpt, key)
                yield key, dequantize(ckpt.get(key), ckpt.get(scale_key) if scale_key else None)
        else:
            yield key, ckpt.meta(key) if meta else ckpt.get(key)


def canonical_items(ckpt: Checkpoint, info: ComponentInfo, meta: bool = False
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the component as canonical (our module names) tensors; fp8 is dequantised to fp32."""
    return to_canonical(_raw_items(ckpt, info, meta), info.keymap())


def canonical_shapes(ckpt: Checkpoint, info: ComponentInfo) -> dict[str, tuple]:
    """Canonical key -> shape, computed on meta tensors from the header alone."""
    return {k: tuple(t.shape) for k, t in canonical_items(ckpt, info, meta=True)}


def _folder_config(path: Path) -> dict | None:
    if path.is_dir() and (path / "config.json").is_file():
        return read_overrides(path / "config.json")
    return None


def infer_config(kind: str, shapes: dict[str, tuple], overrides=None, base: dict | None = None):
    kind = normalize_kind(kind)
    fn = {"transformer": infer_transformer_config, "vae": infer_vae_config,
          "text_encoder": infer_text_encoder_config}[kind]
    return fn(shapes, overrides, base)


def read_component_state_dict(path: str | os.PathLike, kind: str, *, dequantize_fp8: bool = True,
                              dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical state dict, fp8 scales by canonical weight key) of one component of a checkpoint.

    With ``dequantize_fp8=False`` fp8 weights stay fp8 (for an fp8 compute path) and their scales are
    returned separately (a fused weight's per-tensor scale is given to each part). ``dtype`` casts
    the floating, non-fp8 tensors.
    """
    with Checkpoint(path) as ckpt:
        info = inspect_checkpoint(ckpt).component(kind)
        km = info.keymap()
        state: dict[str, torch.Tensor] = {}
        scales: dict[str, torch.Tensor] = {}
        for key, tensor in to_canonical(_raw_items(ckpt, info, False, dequant=dequantize_fp8), km):
            state[key] = _cast(tensor, dtype).to(device)
        if not dequantize_fp8 and info.quantization == "scaled-fp8":
            for key in info.keys:
                scale_key = _scale_for(ckpt, key)
                if scale_key is None or ckpt.tensors[key].dtype not in FP8_DTYPES:
                    continue
                scale = ckpt.get(scale_key).to(torch.float32)
                targets = km.canonical_keys(key)
                parts = scale.chunk(len(targets)) if scale.numel() > 1 else [scale] * len(targets)
                for target, part in zip(targets, parts):
                    scales[target] = part.to(device)
        return state, scales


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating tensors to ``dtype``; fp8 tensors (only present when not dequantised) stay fp8."""
    if dtype is None or not t.is_floating_point() or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t
    return t.to(dtype)


# =========================================================================== building modules


def build_text_encoder(config_kwargs: dict[str, Any]) -> tuple[nn.Module, Any, int]:
    """A Qwen3 model with the first N-1 layers and no final norm (what Z-Image reads), built on meta."""
    from transformers import Qwen3Config

    from .text_encoder import build_truncated_qwen3

    kwargs = {k: v for k, v in config_kwargs.items() if k not in ("model_type", "transformers_version")}
    return build_truncated_qwen3(Qwen3Config(**kwargs))


def load_component(kind: str, path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", config: dict | str | os.PathLike | None = None) -> nn.Module:
    """Load one component from a single file (any supported layout / fp8 form) or a component folder.

    ``kind``: 'transformer' | 'vae' | 'text_encoder'. Returns a ``ZImageTransformer``, an
    ``AutoencoderKL`` (its ``.config`` is the VAEConfig) or the truncated Qwen3 ``nn.Module`` (wrap it
    with ``TextEncoder(module, tokenizer)``). ``config`` overrides what shapes cannot tell (a dict or
    a config.json path); a component folder's own config.json is the base. Weights are dequantised
    (fp8), renamed, cast to ``dtype`` and moved to ``device`` one tensor at a time; loading is strict.
    """
    kind = normalize_kind(kind)
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{kind}: no such file or folder: {path}")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    with Checkpoint(path) as ckpt:
        fmt = inspect_checkpoint(ckpt)
        info = fmt.component(kind)
        if info.quantization:
            logger.info("%s: %s weights in %s, dequantised to %s while loading", kind, info.quantization, path,
                        dtype or "float32")
        shapes = canonical_shapes(ckpt, info)
        base = _folder_config(path)
        if kind == "text_encoder":
            return _load_text_encoder(ckpt, info, shapes, dtype, device, config, base)
        if kind == "transformer":
            from .model.transformer import ZImageTransformer

            cfg = infer_transformer_config(shapes, config, base)
            module = build_on_meta(lambda: ZImageTransformer(cfg))
        else:
            from .model.vae import AutoencoderKL

            cfg = infer_vae_config(shapes, config, base)
            module = build_on_meta(lambda: AutoencoderKL(cfg))
        state = {k: _cast(t, dtype).to(device) for k, t in canonical_items(ckpt, info)}
        assign_state_dict(module, state, kind)
        logger.info("%s: loaded %s (%s layout%s)", kind, path, info.layout,
                    f", {info.quantization}" if info.quantization else "")
        return module.eval().requires_grad_(False)


def _load_text_encoder(ckpt, info, shapes, dtype, device, overrides, base) -> nn.Module:
    kwargs = infer_text_encoder_config(shapes, overrides, base)
    model, config, n = build_text_encoder(kwargs)

    def keep(key: str) -> bool:
        return not (key.startswith(f"layers.{n - 1}.") or key == "norm.weight")

    state = {k: _cast(t, dtype).to(device) for k, t in canonical_items(ckpt, info) if keep(k)}
    rotary = model.rotary_emb
    model.rotary_emb = None  # inv_freq is computed, not loaded: rebuilt on the device below
    assign_state_dict(model, state, "text_encoder")
    with torch.device(device):
        model.rotary_emb = type(rotary)(config=config)
    return model.eval().requires_grad_(False)


# =========================================================================== tokenizer

TOKENIZER_PATTERNS = ["tokenizer/*"]
_ROOT_TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                            "special_tokens_map.json", "added_tokens.json"]


def resolve_tokenizer_folder(tokenizer: str | os.PathLike | None = None, *, revision: str | None = None,
                             cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A tokenizer folder: a local folder (or a model folder with tokenizer/), or a Hub id.

    For a Hub id only the ``tokenizer/`` folder is fetched (default: that of Tongyi-MAI/Z-Image-Turbo,
    a few MB); a repository with the tokenizer files at its root is fetched with those files alone.
    """
    from .hub import _HUB_ID, DEFAULT_MODEL

    tokenizer = DEFAULT_MODEL if tokenizer is None else tokenizer
    path = Path(tokenizer).expanduser()
    if path.exists():
        if (path / "tokenizer").is_dir():
            return path / "tokenizer"
        if path.is_dir():
            return path
        raise FileNotFoundError(f"tokenizer: {path} is a file; give a tokenizer folder or a Hub id")
    text = str(tokenizer)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer folder not found: {text} (give a folder or a Hub id such as "
                                f"{DEFAULT_MODEL})")
    from huggingface_hub import snapshot_download

    kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    folder = Path(snapshot_download(text, allow_patterns=TOKENIZER_PATTERNS, **kwargs))
    if (folder / "tokenizer").is_dir():
        return folder / "tokenizer"
    folder = Path(snapshot_download(text, allow_patterns=_ROOT_TOKENIZER_PATTERNS, **kwargs))
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"tokenizer: the Hub repository {text} has no tokenizer/ folder or tokenizer files")
    return folder


def load_tokenizer(tokenizer: str | os.PathLike | None = None, **kwargs):
    """A transformers tokenizer from :func:`resolve_tokenizer_folder`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_tokenizer_folder(tokenizer, **kwargs))


def read_scheduler_config(scheduler_config: SchedulerConfig | dict | str | os.PathLike | None) -> SchedulerConfig:
    """None: the released Turbo scheduler (shift 3.0); else a SchedulerConfig, a dict or a scheduler_config.json."""
    if scheduler_config is None:
        return SchedulerConfig()
    if isinstance(scheduler_config, SchedulerConfig):
        return scheduler_config
    if isinstance(scheduler_config, (str, os.PathLike)) and Path(scheduler_config).is_dir():
        scheduler_config = Path(scheduler_config) / "scheduler_config.json"
    return SchedulerConfig.from_dict(read_overrides(scheduler_config))


# =========================================================================== the pipeline mixin


class SingleFileMixin:
    """Adds ``from_single_files`` to a pipeline class whose __init__ is
    ``(transformer, vae, text_encoder, scheduler_config, vae_config, source=None)``."""

    @classmethod
    def from_single_files(
        cls,
        transformer: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        transformer_config: dict | str | os.PathLike | None = None,
        vae_config: dict | str | os.PathLike | None = None,
        text_encoder_config: dict | str | os.PathLike | None = None,
        scheduler_config: SchedulerConfig | dict | str | os.PathLike | None = None,
        **pipeline_kwargs,
    ):
        """Build a pipeline from single files (ComfyUI split files, all-in-one files, fp8 files, component folders).

        A component left out is taken from ``transformer``'s file when that file also holds it
        (all-in-one checkpoints). ``tokenizer``: a folder or Hub id (default: the tokenizer/ folder of
        Tongyi-MAI/Z-Image-Turbo, fetched alone). The scheduler defaults to the released Turbo one
        (pass the Base one, shift 6.0, for Z-Image Base). ``pipeline_kwargs`` (e.g. ``variant=``) go
        to the pipeline's constructor.
        """
        from .devices import resolve_device, resolve_dtype
        from .text_encoder import TextEncoder

        if transformer is None:
            raise ValueError("from_single_files needs transformer= (a DiT file or folder)")
        given = {"vae": vae, "text_encoder": text_encoder}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            fmt = detect_format(transformer)
            present = {c.component for c in fmt.components}
            for name in missing:
                if name in present:
                    given[name] = transformer
            still = [name for name in missing if given[name] is None]
            if still:
                raise ValueError(f"from_single_files: no {' or '.join(still)} given, and {transformer} does not "
                                 f"contain one; pass {', '.join(n + '=' for n in still)}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        scfg = read_scheduler_config(scheduler_config)
        tok = load_tokenizer(tokenizer)
        dit = load_component("transformer", transformer, dtype, device, transformer_config)
        ae = load_component("vae", given["vae"], dtype, device, vae_config)
        te = load_component("text_encoder", given["text_encoder"], dtype, device, text_encoder_config)
        if te.config.hidden_size != dit.config.cap_feat_dim:
            raise ValueError(f"text encoder hidden size {te.config.hidden_size} does not match the transformer's "
                             f"cap_feat_dim {dit.config.cap_feat_dim}")
        source = f"single files: transformer={transformer}, vae={given['vae']}, text_encoder={given['text_encoder']}"
        return cls(dit, ae, TextEncoder(te, tok), scfg, ae.config, source=source, **pipeline_kwargs)


# =========================================================================== description (zimage info)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able, header-only description of a file or component folder (used by ``zimage info``)."""
    fmt = detect_format(path)
    out: dict[str, Any] = {"path": str(fmt.path), "container": fmt.container, "kind": fmt.kind}
    if fmt.kind == "lora" and fmt.container == "safetensors":
        from .lora import describe_lora_keys

        with Checkpoint(path) as ckpt:
            out["lora"] = describe_lora_keys(ckpt.keys())
            out["tensors"] = len(ckpt.tensors)
            out["parameters"] = sum(t.numel for t in ckpt.tensors.values())
        return out
    if fmt.problem:
        out["problem"] = fmt.problem
    components = {}
    if fmt.components:
        with Checkpoint(path) as ckpt:
            for info in fmt.components:
                entry: dict[str, Any] = {
                    "layout": info.layout, "prefix": info.prefix, "quantization": info.quantization,
                    "tensors": info.tensors, "parameters": info.parameters, "dtypes": info.dtypes,
                }
                try:
                    cfg = infer_config(info.component, canonical_shapes(ckpt, info), None, _folder_config(Path(path)))
                    entry["config"] = cfg if isinstance(cfg, dict) else cfg.to_dict()
                except (ValueError, KeyError) as e:
                    entry["config_error"] = str(e)
                components[info.component] = entry
    out["components"] = components
    return out
