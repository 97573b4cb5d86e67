"""Generation parameters in PNG text chunks, and reading them back.

Two chunks per image:
- ``parameters``: the A1111-style text that image viewers and other tools already show
  (prompt, "Negative prompt: ...", then "Steps: 8, Sampler: ..., Seed: ..., Size: WxH, ...");
- ``zimage``: a JSON object with every field needed to re-run the request exactly.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

JSON_KEY = "zimage"
TEXT_KEY = "parameters"

#: How the engine writes PNGs (the CLI's files, the server's stored images, the Ray replicas'
#: transfers): zlib's run-length strategy at level 1. Measured on the CPU for a 1024x1024 photo
#: (docs/performance.md, "After the DiT"): 67-137 ms and 1.60 MB against Pillow's default (level 6,
#: default strategy) 576-802 ms and 1.59 MB; level 1 with the default strategy 155-160 ms, 1.77 MB.
#: PNG is lossless at every level: only the time and the file size change.
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}


def save_png(image, fp, pnginfo=None) -> None:
    """Write a PIL image as PNG to ``fp`` (a path or a binary file) with :data:`PNG_OPTIONS`."""
    image.save(fp, format="PNG", pnginfo=pnginfo, **PNG_OPTIONS)


def image_record(info: dict[str, Any], index: int, prompt_index: int = 0) -> dict[str, Any]:
    """The metadata of one image of a request (``info`` is ``ZImageOutput.info``).

    When one seed drew the noise of a batch (``num_images_per_prompt`` with one seed, or a list of
    prompts), that seed alone remakes only the first image: the record of image ``index`` says so
    with ``batch_index`` and ``batch_size`` (and ``batch_prompts``, the prompts the batch mixed, when
    more than one). ``noise`` ("generator" or "latents") marks an image whose start the caller gave,
    and ``guidance_changes``, ``callback_replaced`` or ``interrupted_after`` one that a step-end
    callback (or ``pipe._interrupt`` set by another thread) changed part-way
    (``sampling.CALLBACK_RECORD_KEYS``): its record cannot remake it."""
    seeds = info.get("seeds") or []
    record = {k: v for k, v in info.items() if k not in ("prompts", "seeds", "formatted_prompts", "token_counts")}
    record["prompt"] = info["prompts"][prompt_index]
    if isinstance(record.get("negative_prompt"), (list, tuple)):  # one per prompt: this image's prompt's
        record["negative_prompt"] = record["negative_prompt"][prompt_index]
    formatted = info.get("formatted_prompts") or []
    if prompt_index < len(formatted):
        record["formatted_prompt"] = formatted[prompt_index]
    if seeds:
        record["seed"] = seeds[index] if len(seeds) > 1 else seeds[0]
    if record.get("batch_size"):  # one seed for the whole batch (sampling.remake_info)
        record["batch_index"] = index
        if len(info["prompts"]) > 1:
            record["batch_prompts"] = len(info["prompts"])
    return {k: v for k, v in record.items() if v is not None}


def parameters_text(record: dict[str, Any]) -> str:
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    parts = [
        f"Steps: {record.get('steps')}",
        "Sampler: FlowMatch Euler",
        f"CFG scale: {record.get('guidance_scale')}",
        *(["CFG scale set by a callback: " + ", ".join(f"{scale:g} after step {step}"
                                                     for step, scale in record["guidance_changes"])]
          if record.get("guidance_changes") else []),
        *(["Replaced by a callback: " + ", ".join(f"{name} after step {step}"
                                               for step, name in record["callback_replaced"])]
          if record.get("callback_replaced") else []),
        *([f"Interrupted after step {record['interrupted_after']}"] if record.get("interrupted_after") else []),
        f"Seed: {record.get('seed')}",
        *([f"Batch size: {record['batch_size']}, Batch pos: {record.get('batch_index')}"]
          if record.get("batch_size") else []),
        f"Size: {record.get('width')}x{record.get('height')}",
        f"Model: {record.get('model')}",
    ]
    if record.get("noise"):
        parts.append(f"Noise: the caller's {record['noise']}")
    if record.get("strength") is not None:
        parts.append(f"Denoising strength: {record['strength']}")
    if record.get("seed_variance"):
        parts.append(f"Seed variance: {record['seed_variance']} (share {record.get('seed_variance_share')}, "
                     f"steps {record.get('seed_variance_steps')})")
    if record.get("sigmas"):
        parts.append("Sigmas: " + " ".join(f"{s:g}" for s in record["sigmas"]))
    if record.get("first_block_cache"):
        parts.append(f"First block cache: {record['first_block_cache']}")
    if record.get("loras"):
        parts.append("LoRA: " + ", ".join(f"{p}:{s}" for p, s in record["loras"]))
    if record.get("controlnet"):
        name = str(record["controlnet"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        parts.append(f"ControlNet: {name}, Control scale: {record.get('control_scale')}")
    parts.append(f"Version: zimage-native {record.get('version')}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def png_info(record: dict[str, Any]):
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text(TEXT_KEY, parameters_text(record))
    meta.add_text(JSON_KEY, json.dumps(record, ensure_ascii=False))
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``zimage`` JSON record of a PNG written by zimage-native."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.info.get(JSON_KEY) if hasattr(image, "info") else None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image file (a PNG written by zimage-native is needed)") from None
    if not text:
        raise ValueError(f"{path} has no zimage-native generation metadata (no '{JSON_KEY}' PNG text chunk)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the '{JSON_KEY}' metadata is not valid JSON ({e})") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError(f"{path}: the '{JSON_KEY}' metadata has no prompt")
    return record
