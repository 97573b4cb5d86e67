"""Where a model comes from: a local diffusers-layout folder, or a Hub id fetched with huggingface_hub.

Only the files the engine reads are downloaded (configs, safetensors weights, the tokenizer), into
huggingface_hub's usual cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"

# What from_pretrained reads; nothing else is downloaded (no .bin or .pth duplicates, no READMEs).
HUB_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "tokenizer/*",
]

REQUIRED = [
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer",
    "scheduler/scheduler_config.json",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_folder(folder: Path) -> Path:
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a Z-Image model folder (diffusers layout): missing {missing}"
        )
    return folder


def resolve_model_folder(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as is; an ``owner/name`` Hub id through ``huggingface_hub.snapshot_download``."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; expected a model folder (diffusers layout) or a Hub id")
        return check_model_folder(path)
    text = str(path_or_id)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {text} (give a diffusers-layout folder or a Hub id "
                                f"such as {DEFAULT_MODEL})")
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        text, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES, local_files_only=local_files_only
    )
    return check_model_folder(Path(folder))
