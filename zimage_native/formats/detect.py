"""What a checkpoint holds, from its header alone: components, layouts, quantisation, or why it cannot load.

- which components it holds (DiT, VAE, Qwen3 text encoder; one file may hold all three, as
  ComfyUI's all-in-one checkpoints do under ``model.diffusion_model.`` / ``vae.`` /
  ``text_encoders.qwen3_4b.``) and in which layout (``converters.keymap``);
- its quantisation: none, plain fp8, ComfyUI's "scaled fp8" (:mod:`.fp8`) or ComfyUI's mixed
  precision "comfy_quant" files in the formats :data:`LOADABLE_FORMATS` (:func:`comfy_quant_layers`; the
  block-scaled nvfp4 and mxfp8: :mod:`.microscale`). Formats that need kernels we do not have (the other
  comfy_quant formats: convrot_w4a4, asym_w4a8_int8, ...;
  nunchaku SVDQuant, bitsandbytes, GPTQ/AWQ) are recognised and refused with an error that names
  them (for comfy_quant: the layer and its format);
- LoRAs and ControlNets are recognised and pointed elsewhere.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..converters.keymap import KeyMap, keymap_for
from .checkpoint import (FLOAT_DTYPES, SAFETENSORS_DTYPES, Checkpoint, UnsupportedFormatError,
                         refuse_non_safetensors, sniff)
from .families import foreign_family
from .fp8 import FP8_DTYPES, is_aux, is_scaled
from .microscale import BLOCK_FORMATS, blocked_shape

COMPONENTS = ("transformer", "vae", "text_encoder")
_KIND_ALIASES = {"dit": "transformer", "unet": "transformer", "diffusion_model": "transformer",
                 "text-encoder": "text_encoder", "te": "text_encoder", "encoder": "text_encoder", "ae": "vae"}


@dataclass
class ComponentInfo:
    """One model component found in a checkpoint."""

    component: str  # transformer | vae | text_encoder
    layout: str  # a name from converters.keymap.LAYOUTS
    prefix: str  # the key prefix that selects this component in the file ("" for a plain file)
    keys: list[str]  # the full keys of the component, quantisation keys included
    quantization: str | None = None  # None | "fp8" | "scaled-fp8" | "comfy-quant"
    comfy_quant: dict[str, str] = field(default_factory=dict)  # comfy-quant: weight key -> format
    n_blocks: int | None = None  # VAE only: len(block_out_channels), for the LDM up-block mirror
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> parameter count
    tensors: int = 0
    parameters: int = 0

    @property
    def has_fp8_weights(self) -> bool:
        """Whether the component stores float8 weights, or comfy_quant int8, nvfp4 or mxfp8 ones, that
        a DiT can keep (``keep_fp8``)."""
        if self.quantization == "comfy-quant":
            return any(fmt in LOADABLE_FORMATS for fmt in self.comfy_quant.values())
        return self.quantization in ("fp8", "scaled-fp8")

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
    foreign: tuple[str, str] | None = None  # (family, a key of it) for keys of another model that no component took

    def component(self, kind: str) -> ComponentInfo:
        kind = normalize_kind(kind)
        if self.problem:
            raise UnsupportedFormatError(self.problem)
        for c in self.components:
            if c.component == kind:
                return c
        if self.foreign:  # an SDXL all-in-one's VAE is SDXL's: no hint to load it as Z-Image's
            raise UnsupportedFormatError(f"{self.path}: no {kind} in this checkpoint: it is {self.foreign_text()}")
        found = [c.component for c in self.components]
        hint = ""
        if len(found) == 1:  # a file given as the wrong component (a GGUF text encoder as the DiT, ...)
            words = {"transformer": "the DiT", "vae": "the VAE", "text_encoder": "the text encoder"}
            hint = "; " + "; ".join(f"{words[c]} goes in as {c}= (--{c.replace('_', '-')})" for c in (found[0], kind))
        raise UnsupportedFormatError(f"{self.path}: no {kind} in this checkpoint (found: "
                                     f"{', '.join(found) or 'no Z-Image component'}){hint}")

    def foreign_text(self) -> str:
        """'for FAMILY, not Z-Image (key 'KEY')', of a file with keys of another model (``foreign``)."""
        family, key = self.foreign
        return f"for {family}, not Z-Image (key {key!r})"


def normalize_kind(kind: str) -> str:
    kind = _KIND_ALIASES.get(kind.lower().replace(" ", "_"), kind.lower().replace("-", "_"))
    if kind not in COMPONENTS:
        raise ValueError(f"unknown component {kind!r}; choose one of {list(COMPONENTS)}")
    return kind


#: comfy_quant formats that load, and the safetensors dtype their weights must have. Layouts, from
#: ComfyUI's comfy/ops.py (``_load_quantized_module``) and comfy/quant_ops.py (``QUANT_ALGOS``), and
#: comfy-kitchen's tensor/fp8.py and tensor/int8.py: ``<layer>.weight`` holds the values, ``<layer>.weight_scale``
#: an fp32 scale, and weight = values * scale (per tensor for fp8; per tensor or per output row,
#: shape (out, 1), for int8).
COMFY_QUANT_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int8_tensorwise": "I8"}
#: Every comfy_quant format that loads: those above, and the block-scaled ones (:mod:`.microscale`;
#: kept as their codes where a DiT keeps its fp8 layers, else dequantised while loading).
LOADABLE_FORMATS = (*COMFY_QUANT_FORMATS, *BLOCK_FORMATS)
#: What to say of the formats ComfyUI knows that do not load here: why, beside the usual advice.
REFUSED_FORMATS = {
    "convrot_w4a4": "4-bit int weights rotated by a Hadamard transform (ConvRot), for comfy-kitchen's W4A4 kernels",
    "asym_w4a8_int8": "asymmetric 4-bit int weights with zero points, for comfy-kitchen's W4A8 kernels",
    "awq_w4a16": "AWQ 4-bit int weights, for comfy-kitchen's W4A16 kernels",
}
COMFY_QUANT_SUFFIX = ".comfy_quant"


def comfy_quant_layers(ckpt: Checkpoint) -> dict[str, object]:
    """Layer (file key without ``.weight``) -> its comfy_quant config, as ComfyUI reads it: a
    ``<layer>.comfy_quant`` uint8 tensor holding the UTF-8 bytes of a JSON object, or (older files)
    ``{"layers": {layer: config}}`` in the ``_quantization_metadata`` entry of the safetensors
    metadata, which ComfyUI's ``convert_old_quants`` turns into those tensors (overriding one of
    the same layer). A config that is not JSON is ``None``; metadata naming a layer without its
    prefix is matched to the one weight key that ends with it."""
    keys = ckpt.keys()
    layers: dict[str, object] = {}
    for key in keys:
        if key.endswith(COMFY_QUANT_SUFFIX):
            try:
                layers[key[: -len(COMFY_QUANT_SUFFIX)]] = json.loads(ckpt.raw_bytes(key).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                layers[key[: -len(COMFY_QUANT_SUFFIX)]] = None
    meta = ckpt.metadata.get("_quantization_metadata")
    if meta is not None:
        try:
            entries = json.loads(meta).get("layers")
        except (ValueError, AttributeError):
            entries = None
        if not isinstance(entries, dict):
            layers["_quantization_metadata"] = None
            return layers
        for name, conf in entries.items():
            if name + ".weight" not in ckpt.tensors:
                found = [k[: -len(".weight")] for k in keys if k.endswith("." + name + ".weight")]
                name = found[0] if len(found) == 1 else name
            layers[name] = conf
    return layers


def _comfy_quant_problem(ckpt: Checkpoint, layers: dict[str, object]) -> str | None:
    """Why a comfy_quant file cannot load (naming the layer and its format), or None."""
    path = ckpt.path
    formats = sorted({str(c.get("format")) if isinstance(c, dict) else "?" for c in layers.values()})
    where = f"{path}: ComfyUI mixed-precision 'comfy_quant' file (formats: {', '.join(formats)}): layer"
    for layer, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt is None:
            return f"{where} {layer}: its comfy_quant config is not a JSON object with a format ({conf!r})"
        if fmt not in LOADABLE_FORMATS:
            why = f" ({REFUSED_FORMATS[fmt]})" if isinstance(fmt, str) and fmt in REFUSED_FORMATS else ""
            return (f"{where} {layer}: format {fmt!r}{why} is not supported (supported: "
                    f"{', '.join(LOADABLE_FORMATS)}); use a bf16, fp8, scaled-fp8 or GGUF file")
        weight = ckpt.tensors.get(layer + ".weight")
        if weight is None:
            return f"{where} {layer}: format {fmt} but the file has no {layer}.weight"
        if fmt in BLOCK_FORMATS:
            problem = block_layer_problem(ckpt, layer, fmt, weight)
            if problem:
                return f"{where} {layer}: format {fmt} {problem}"
            continue
        if weight.dtype != COMFY_QUANT_FORMATS[fmt] or len(weight.shape) != 2:
            return (f"{where} {layer}: format {fmt} needs a 2-D {COMFY_QUANT_FORMATS[fmt]} weight, the file has "
                    f"{weight.dtype} {list(weight.shape)}")
        scale = ckpt.tensors.get(layer + ".weight_scale")
        if scale is None or scale.dtype not in FLOAT_DTYPES:
            return f"{where} {layer}: format {fmt} but no floating {layer}.weight_scale"
        per_row = fmt == "int8_tensorwise" and tuple(scale.shape) == (weight.shape[0], 1)
        if scale.numel != 1 and not per_row:
            return (f"{where} {layer}: format {fmt} takes one weight_scale per tensor"
                    f"{' or per output row, shape (out, 1)' if fmt == 'int8_tensorwise' else ''}; the file has "
                    f"shape {list(scale.shape)}")
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        if conf.get("convrot", params.get("convrot", False)):
            return f"{where} {layer}: format {fmt} with ConvRot (Hadamard-rotated weights) is not supported"
    return None


def block_layer_problem(ckpt: Checkpoint, layer: str, fmt: str, weight) -> str | None:
    """Why a block-scaled (nvfp4 / mxfp8) layer's tensors do not match ComfyUI's layout, or None."""
    size, stored, scale_dtypes = BLOCK_FORMATS[fmt]
    values = 2 if fmt == "nvfp4" else 1
    if weight.dtype != stored or len(weight.shape) != 2 or weight.shape[1] * values % size:
        return (f"needs a 2-D {stored} weight of whole blocks of {size} values a row, the file has {weight.dtype} "
                f"{list(weight.shape)}")
    scale = ckpt.tensors.get(layer + ".weight_scale")
    want = blocked_shape(fmt, weight.shape)
    if scale is None or scale.dtype not in scale_dtypes or scale.numel != want[0] * want[1]:
        found = "none" if scale is None else f"{scale.dtype} {list(scale.shape)}"
        return (f"needs {layer}.weight_scale in {' or '.join(scale_dtypes)}, {want[0]} x {want[1]} block scales (one "
                f"per {size} values, in cuBLAS's blocked layout); the file has {found}")
    if fmt == "nvfp4":
        second = ckpt.tensors.get(layer + ".weight_scale_2")
        if second is None or second.dtype not in FLOAT_DTYPES or second.numel != 1:
            found = "none" if second is None else f"{second.dtype} {list(second.shape)}"
            return f"needs one floating {layer}.weight_scale_2 (the per-tensor scale); the file has {found}"
        if layer + ".pre_quant_scale" in ckpt.tensors:
            return ("with a pre_quant_scale (activations scaled per channel before the GEMM) is not supported; use a "
                    "bf16, fp8 or GGUF file")
    return None


def _quantization_problem(ckpt: Checkpoint, comfy: dict[str, object]) -> str | None:
    """A message naming the quantisation format we cannot load, or None."""
    keys = ckpt.keys()
    path = ckpt.path
    if comfy:
        return _comfy_quant_problem(ckpt, comfy)
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
    if any(re.fullmatch(r"layers\.\d+\.adaLN_modulation\.1\.weight", k) for k in stripped):
        # NextDiT (Lumina-Image 2.0 and its finetunes) shares the names, and ComfyUI-GGUF's architecture
        # 'lumina2', with Z-Image's DiT; its blocks' modulation sits behind a SiLU (index 1).
        pads = "" if "x_pad_token" in stripped else ", no x_pad_token"
        raise UnsupportedFormatError(
            f"{path}: a Lumina-Image 2.0 (NextDiT) DiT, not Z-Image's (layers.N.adaLN_modulation.1{pads}); "
            f"use a Z-Image DiT, such as Comfy-Org/z_image_turbo's z_image_turbo_bf16.safetensors or a GGUF build "
            f"from jayn7/Z-Image-Turbo-GGUF")
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


def _analyse(ckpt: Checkpoint, component: str, prefix: str, keys: list[str],
             comfy: dict[str, object]) -> ComponentInfo:
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
    weights = [k for k in keys if not is_aux(k)]
    info.comfy_quant = {k: conf["format"] for k in weights
                        if k.endswith(".weight") and isinstance(conf := comfy.get(k[: -len(".weight")]), dict)}
    if info.comfy_quant:
        info.quantization = "comfy-quant"
    elif any(ckpt.tensors[k].dtype in FP8_DTYPES for k in weights):
        info.quantization = "scaled-fp8" if is_scaled(keys) else "fp8"
    ints = [k for k in weights if ckpt.tensors[k].dtype not in FLOAT_DTYPES + FP8_DTYPES and k not in info.comfy_quant]
    if ints:
        raise UnsupportedFormatError(
            f"{ckpt.path}: integer-typed weights ({ckpt.tensors[ints[0]].dtype} {ints[0]}) without a known "
            f"quantisation marker are not supported")
    for k in keys:
        t = ckpt.tensors[k]
        info.dtypes[t.dtype] = info.dtypes.get(t.dtype, 0) + t.numel
        info.tensors += 1
        info.parameters += 0 if is_aux(k) else t.numel * (2 if info.comfy_quant.get(k) == "nvfp4" else 1)  # 2 a byte
    return info


def inspect_checkpoint(ckpt: Checkpoint) -> FileFormat:
    """Detect components, layouts and quantisation of an open checkpoint (header only)."""
    keys = ckpt.keys()
    fmt = FileFormat(ckpt.path, "safetensors", "model", metadata=dict(ckpt.metadata))
    comfy = comfy_quant_layers(ckpt)
    fmt.problem = _quantization_problem(ckpt, comfy)
    if fmt.problem:
        return fmt
    if keys and all(_LORA_KEY.search(k) for k in keys):
        fmt.kind = "lora"
        fmt.problem = f"{ckpt.path}: this is a LoRA, not a model checkpoint; apply it with pipe.load_lora(...)"
        return fmt
    if any(re.search(r"(^|\.)control_", k) for k in keys):
        fmt.kind = "controlnet"
        fmt.problem = (f"{ckpt.path}: this is a Z-Image ControlNet (control_* keys), not a model checkpoint; "
                       f"load it with pipe.load_controlnet(...) (zimage generate --controlnet FILE)")
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
            fmt.components.append(_analyse(ckpt, component, prefix, comp_keys, comfy))
        except UnsupportedFormatError as e:
            fmt.problem = str(e)
            return fmt
    taken = {k for c in fmt.components for k in c.keys}
    fmt.foreign = foreign_family(k for k in keys if k not in taken)
    if not fmt.components:
        fmt.kind = "unknown"
        fmt.problem = (f"{ckpt.path}: this checkpoint is {fmt.foreign_text()}" if fmt.foreign else
                       f"{ckpt.path}: not recognised as a Z-Image DiT, FLUX-family VAE or Qwen3 text encoder "
                       f"(keys such as {sorted(keys)[:3]})")
    return fmt


def detect_format(path: str | os.PathLike) -> FileFormat:
    """Detect what a file or component folder holds, from headers only.

    A format that cannot be loaded is reported in ``problem``; a damaged file (cut short, or not
    the container its first bytes claim) raises :class:`CorruptCheckpointError`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        container = sniff(path)
        if container == "unknown":
            refuse_non_safetensors(path)  # raises CorruptCheckpointError
        if container == "gguf":
            from .gguf import detect_gguf

            return detect_gguf(path)
        if container != "safetensors":
            fmt = FileFormat(path, container, "unknown")
            try:
                refuse_non_safetensors(path)
            except UnsupportedFormatError as e:
                fmt.problem = str(e)
            return fmt
    with Checkpoint(path) as ckpt:
        return inspect_checkpoint(ckpt)
