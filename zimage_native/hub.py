"""Where a model comes from: a local diffusers-layout folder, or a Hub id fetched with huggingface_hub.

Only the files the engine reads are downloaded (configs, safetensors weights, the tokenizer), into
huggingface_hub's usual cache. A tokenizer alone (for single files) is a folder or a Hub id too:
only its ``tokenizer/`` folder is fetched.
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
    skip_weights: tuple[str, ...] = (),
) -> Path:
    """A local folder as is; an ``owner/name`` Hub id through ``huggingface_hub.snapshot_download``.

    ``skip_weights``: components ("transformer", "vae", "text_encoder") whose weights come from
    elsewhere (a single file, a remote encoder): only their configs are fetched.
    """
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
        text, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
        allow_patterns=[p for p in HUB_FILES if p not in {f"{c}/*.safetensors" for c in skip_weights}],
    )
    return check_model_folder(Path(folder))


TOKENIZER_PATTERNS = ["tokenizer/*"]
_ROOT_TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                            "special_tokens_map.json", "added_tokens.json"]


def resolve_tokenizer_folder(tokenizer: str | os.PathLike | None = None, *, revision: str | None = None,
                             cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A tokenizer folder: a local folder (or a model folder with tokenizer/), or a Hub id.

    For a Hub id only the ``tokenizer/`` folder is fetched (default: that of Tongyi-MAI/Z-Image-Turbo,
    a few MB); a repository with the tokenizer files at its root is fetched with those files alone.
    """
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
