"""``zimage info`` for files and component folders: a JSON-able description read from headers only (but
the one tensor of a ControlNet 2.x file that tells 2.0 from 2.1: ``controlnet.describe_controlnet``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .detect import detect_format
from .infer import folder_config, infer_config
from .tensors import canonical_shapes


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able description of a file or component folder from its headers (used by ``zimage info``;
    a ControlNet's: ``controlnet.describe_controlnet``)."""
    fmt = detect_format(path)
    if fmt.container == "gguf":
        from .gguf import describe_gguf

        return describe_gguf(path, fmt)
    out: dict[str, Any] = {"path": str(fmt.path), "container": fmt.container, "kind": fmt.kind}
    if fmt.kind == "lora" and fmt.container == "safetensors":
        from ..lora import describe_lora_keys

        with Checkpoint(path) as ckpt:
            out["lora"] = describe_lora_keys(ckpt.keys())
            out["tensors"] = len(ckpt.tensors)
            out["parameters"] = sum(t.numel for t in ckpt.tensors.values())
        return out
    if fmt.problem:
        out["problem"] = fmt.problem
    elif fmt.foreign:  # an SDXL all-in-one: its VAE is all that reads as a component
        out["foreign"] = f"{fmt.foreign[0]} (key {fmt.foreign[1]!r})"
    if fmt.kind == "controlnet" and fmt.container == "safetensors":
        from .controlnet import describe_controlnet

        out["controlnet"] = describe_controlnet(path)
        return out
    components = {}
    if fmt.components:
        with Checkpoint(path) as ckpt:
            for info in fmt.components:
                entry: dict[str, Any] = {
                    "layout": info.layout, "prefix": info.prefix, "quantization": info.quantization,
                    "tensors": info.tensors, "parameters": info.parameters, "dtypes": info.dtypes,
                }
                if info.comfy_quant:  # ComfyUI mixed precision: layers per format
                    formats: dict[str, int] = {}
                    for name in info.comfy_quant.values():
                        formats[name] = formats.get(name, 0) + 1
                    entry["comfy_quant"] = dict(sorted(formats.items()))
                try:
                    shapes = canonical_shapes(ckpt, info)
                    cfg = infer_config(info.component, shapes, None, folder_config(Path(path)))
                    entry["config"] = cfg if isinstance(cfg, dict) else cfg.to_dict()
                except (ValueError, KeyError) as e:
                    note_config_error(out, entry, info.component, e, fmt.path)
                else:
                    note_missing_keys(out, entry, info.component, cfg, shapes, fmt.path)
                components[info.component] = entry
    out["components"] = components
    return out


def note_config_error(out: dict[str, Any], entry: dict[str, Any], kind: str, error: Exception, path) -> None:
    """A component whose config cannot be inferred from its header: ``config_error`` says why. A DiT
    or text encoder of that kind cannot load (load_component refuses it; ``zimage info --check`` said
    nothing of a DiT file missing its patch embedder, or with a gap in its layers): ``cannot_load``
    says so too, and ``out["problem"]``, unless the error is a value a config gives (a DiT's RoPE
    axes: the file loads with ``config=``, or beside a model folder's config.json)."""
    from .infer import ConfigNeededError

    entry["config_error"] = str(error)
    if getattr(error, "cli_message", None):  # the same in the command line's words (zimage info shows these)
        entry["config_error_cli"] = error.cli_message
    if kind in ("transformer", "text_encoder") and not isinstance(error, ConfigNeededError):
        entry["cannot_load"] = f"{path}: {error}"
        out.setdefault("problem", entry["cannot_load"])


def note_missing_keys(out: dict[str, Any], entry: dict[str, Any], kind: str, cfg, shapes: dict[str, tuple],
                      path) -> None:
    """A DiT or text encoder whose header lacks tensors of the model, or has others, cannot load
    (load_component refuses it): the component's ``cannot_load`` says which, and so does
    ``out["problem"]`` (unless it holds another problem)."""
    from ..loading import StateDictMismatchError, check_header_keys

    try:
        check_header_keys(kind, cfg, shapes)
    except StateDictMismatchError as e:
        entry["cannot_load"] = str(e.in_file(path))
        out.setdefault("problem", entry["cannot_load"])
