"""Where a model comes from: a local diffusers-layout folder, or a Hub id fetched with huggingface_hub.

Only the files the engine reads are downloaded (configs, safetensors weights, the tokenizer), into
huggingface_hub's usual cache. A tokenizer alone (for single files) is a folder or a Hub id too:
only its ``tokenizer/`` folder is fetched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Mapping
from fnmatch import fnmatch
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

#: The components a model folder holds and the CLI flags that give one from its own file.
COMPONENT_FLAGS = {"transformer": "--transformer", "vae": "--vae", "text_encoder": "--text-encoder"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(RuntimeError):
    """A model or tokenizer could not be fetched from the Hugging Face Hub. The message names the
    repository, says why (no network, offline with an incomplete cache, not found, gated, disk full)
    and what to do; it is one line, so the CLI prints it whole."""


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


LOCAL_HINT = "give a local folder instead (--model /path/to/folder on the command line)"
LORA_HINT = "give the path of a LoRA file instead (download it on a connected machine)"
TOKENIZER_HINT = ("give a local tokenizer folder instead (--tokenizer FOLDER on the command line: a model folder or "
                  "its tokenizer/)")


def explain_hub_error(e: BaseException, repo_id: str, what: str = "model", *, cache_dir=None,
                      local_files_only: bool = False) -> HubError | None:
    """A :class:`HubError` explaining why ``snapshot_download`` of ``repo_id`` failed with ``e``, or
    None when ``e`` is not a download failure."""
    from huggingface_hub import constants, errors

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    local = TOKENIZER_HINT if what.startswith("tokenizer") else LORA_HINT if what == "LoRA" else LOCAL_HINT
    head = f"cannot fetch the {what} {repo_id} from the Hugging Face Hub"
    chain = list(_chain(e))
    kinds = {type(x).__name__ for x in chain}
    full = next((x for x in chain if isinstance(x, OSError) and x.errno == errno.ENOSPC), None)
    if full is not None:
        return HubError(f"{head}: the disk is full ({_first_line(full)}) while writing to the cache {cache}; free "
                        f"space there, or set HF_HUB_CACHE to a folder on a larger disk, or {local}")
    if isinstance(e, errors.GatedRepoError):
        return HubError(f"{head}: it is a gated repository; accept its terms at https://huggingface.co/{repo_id} "
                        f"and set HF_TOKEN to a read token of that account (or run `hf auth login`), or {local}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return HubError(f"{head}: no such repository (check the id; a private one needs HF_TOKEN set to a token "
                        f"that can read it), or {local}")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"{head}: the repository has no such revision (branch, tag or commit), or {local}")
    offline_mode = local_files_only or "OfflineModeIsEnabled" in kinds or (
        constants.HF_HUB_OFFLINE and len(chain) == 1)
    if isinstance(e, errors.LocalEntryNotFoundError) and offline_mode:
        switch = "local_files_only is set" if local_files_only else "HF_HUB_OFFLINE=1 is set"
        return HubError(f"{head}: {switch} and the cache {cache} has no complete copy of it; download it once "
                        f"on a connected machine (unset HF_HUB_OFFLINE) into that cache, or {local}")
    network = next((x for x in chain[1:] if type(x).__name__ in {"ConnectError", "ConnectTimeout", "ConnectionError",
                                                                 "TimeoutException", "ReadTimeout", "gaierror",
                                                                 "TimeoutError", "ProxyError", "NetworkError"}
                    or isinstance(x, (ConnectionError, TimeoutError))), None)
    if isinstance(e, errors.LocalEntryNotFoundError) or network is not None:
        why = f" ({_first_line(network)})" if network is not None else ""
        return HubError(f"{head}: no network connection{why} and no complete copy in the cache {cache}; "
                        f"{local}, or fill that cache on a connected machine and run with HF_HUB_OFFLINE=1")
    if isinstance(e, errors.HfHubHTTPError):
        return HubError(f"{head}: the Hub answered {_first_line(e)}; try again later, or {local}")
    return None


def hub_snapshot(repo_id: str, what: str = "model", **kwargs) -> Path:
    """``huggingface_hub.snapshot_download(repo_id, **kwargs)``; a download the cache's disk cannot
    hold is refused first (:func:`check_download_space`), and a failure raises :class:`HubError`
    (see :func:`explain_hub_error`)."""
    from huggingface_hub import snapshot_download

    if not kwargs.get("local_files_only"):
        check_download_space(repo_id, kwargs.get("allow_patterns") or ["*"], kwargs.get("revision"),
                             kwargs.get("cache_dir"), what)
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:
        explained = explain_hub_error(e, repo_id, what, cache_dir=kwargs.get("cache_dir"),
                                      local_files_only=bool(kwargs.get("local_files_only")))
        if explained is None:
            raise
        raise explained from e


def free_disk(folder: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``folder``, or will once it is made."""
    existing = Path(folder).expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_download_space(repo_id: str, allow_patterns: list[str], revision: str | None = None,
                         cache_dir: str | os.PathLike | None = None, what: str = "model") -> None:
    """Refuse, before it starts, a download the cache's disk cannot hold: the Hub lists each file's
    size, and the files the cache already holds (by blob) do not count. Offline, or when the Hub
    cannot be asked, nothing is checked here: the download itself then says why it fails."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception:  # noqa: BLE001 - explained by the download's own error (explain_hub_error)
        return
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    blobs = cache / f"models--{repo_id.replace('/', '--')}" / "blobs"
    need = 0
    for sibling in info.siblings or []:
        if not any(fnmatch(sibling.rfilename, pattern) for pattern in allow_patterns):
            continue
        blob = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
        if blob is None or not (blobs / blob).exists():
            need += (sibling.lfs.size if sibling.lfs else sibling.size) or 0
    free = free_disk(cache)
    if need > free:
        from .devices import format_bytes

        raise HubError(f"cannot fetch the {what} {repo_id} from the Hugging Face Hub: it needs {format_bytes(need)} "
                       f"in the cache {cache}, and that disk has {format_bytes(free)} free; free space there, or "
                       f"set HF_HUB_CACHE to a folder on a larger disk, or {LOCAL_HINT}")


def check_model_folder(folder: Path, given: tuple[str, ...] = ()) -> Path:
    """``folder`` if it holds a model in the diffusers layout; the components in ``given`` (whose files
    come from elsewhere) may be missing from it."""
    missing = [name for name in REQUIRED if not (folder / name).exists() and name.split("/")[0] not in given]
    if missing:
        hint = ""
        parent = folder.resolve().parent
        parts = [name.split("/")[0] for name in missing if name.split("/")[0] in COMPONENT_FLAGS]
        if all((parent / name).exists() for name in REQUIRED):  # a component folder of a model folder
            hint = f"; it is a part of the model folder {parent}: give that folder"
        elif any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):  # a folder of single files
            hint = ("; for single-file checkpoints (ComfyUI, GGUF) give the DiT file as transformer=FILE "
                    "(--transformer FILE), and the others with --vae and --text-encoder")
        elif parts and len(parts) < len(COMPONENT_FLAGS) and (folder / "scheduler").is_dir():  # a partial folder
            hint = (f"; give {' and '.join(f'{c}=FILE ({COMPONENT_FLAGS[c]} FILE)' for c in parts)} for what it "
                    f"lacks, or fetch the whole folder again")
        raise FileNotFoundError(
            f"{folder} is not a Z-Image model folder (diffusers layout): missing {missing}{hint}"
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
    elsewhere (a single file, a remote encoder): only their configs are fetched; a local folder may
    lack them, and the tokenizer where ``skip_weights`` names it too.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; expected a model folder (diffusers layout) or a Hub id. A "
                                    f"single-file checkpoint (ComfyUI, GGUF) goes in as transformer=FILE "
                                    f"(--transformer FILE), with the other components from a model folder or "
                                    f"their own files (--vae, --text-encoder)")
        return check_model_folder(path, skip_weights)
    text = str(path_or_id)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {text} (give a diffusers-layout folder or a Hub id "
                                f"such as {DEFAULT_MODEL})")
    allow = [p for p in HUB_FILES if p not in {f"{c}/*.safetensors" for c in skip_weights}]
    folder = hub_snapshot(text, "model", revision=revision, cache_dir=cache_dir, allow_patterns=allow,
                          local_files_only=local_files_only)
    return check_model_folder(folder, skip_weights)


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
    kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    folder = hub_snapshot(text, "tokenizer of", allow_patterns=TOKENIZER_PATTERNS, **kwargs)
    if (folder / "tokenizer").is_dir():
        return folder / "tokenizer"
    folder = hub_snapshot(text, "tokenizer of", allow_patterns=_ROOT_TOKENIZER_PATTERNS, **kwargs)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"tokenizer: the Hub repository {text} has no tokenizer/ folder or tokenizer files")
    return folder


def resolve_lora_source(path, weight_name: str | None = None, subfolder: str | None = None, *,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False):
    """What a LoRA given as diffusers' ``load_lora_weights`` takes it refers to: a state dict as it
    is; a local file or folder (``subfolder`` and ``weight_name`` inside it); else a Hub repository
    id, of which only ``weight_name`` (else the .safetensors files) is downloaded. A path that is
    neither raises FileNotFoundError."""
    if isinstance(path, Mapping):
        return path
    text = str(path)
    local = Path(text).expanduser() / (subfolder or "")
    file_like = text.lower().endswith((".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin"))  # a local file
    if local.exists() or file_like or not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        if not local.exists():
            raise FileNotFoundError(f"LoRA not found: {local} (give a LoRA file, a folder holding one, a state dict "
                                    f"or a Hub repository id such as owner/name)")
        return local / weight_name if weight_name else local
    inner = f"{subfolder.strip('/')}/" if subfolder else ""
    folder = hub_snapshot(text, "LoRA", allow_patterns=[f"{inner}{weight_name or '*.safetensors'}"],
                          revision=revision, cache_dir=cache_dir, local_files_only=local_files_only) / inner
    return folder / weight_name if weight_name else folder


def load_tokenizer(tokenizer: str | os.PathLike | None = None, **kwargs):
    """A transformers tokenizer from :func:`resolve_tokenizer_folder`."""
    return tokenizer_from_folder(resolve_tokenizer_folder(tokenizer, **kwargs))


def tokenizer_from_folder(folder: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(folder)``; a cut or damaged JSON file of the folder (a download or
    copy that stopped part way) is named, with what to do, not the parser's bare "Unterminated string
    starting at: line 3 column 3 (char 24)" that transformers passes on."""
    from transformers import AutoTokenizer

    from .config import read_json

    try:
        return AutoTokenizer.from_pretrained(folder)
    except ValueError:  # json.JSONDecodeError is one; which file, transformers does not say
        if Path(folder).is_dir():
            for path in sorted(Path(folder).glob("*.json")):
                read_json(path)  # raises, naming the file, for the one that does not parse
        raise
