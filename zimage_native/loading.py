"""Weight loading: safetensors (single file or sharded with an index) into modules built on meta.

The policy, stated once:
- modules are built on the ``meta`` device (no memory, no init cost) and weights are assigned;
- every tensor is cast to the requested dtype as it is read, one tensor at a time, so a 24.6 GB
  fp32 checkpoint loads into 12.3 GB of bf16 without ever holding two full copies;
- loading is strict: missing or unexpected keys raise :class:`StateDictMismatchError`, which
  names the first few of each and the counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

WEIGHT_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class StateDictMismatchError(KeyError):
    """Raised when a checkpoint's keys do not match the module's parameters."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], shape_errors: list[str] = ()):
        self.missing, self.unexpected, self.shape_errors = missing, unexpected, list(shape_errors)
        parts = [f"{what}: the checkpoint does not match the model."]
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        if self.shape_errors:
            parts.append(f"{len(self.shape_errors)} shape mismatches, e.g. {self.shape_errors[:3]}")
        self.message = " ".join(parts)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a component: a file, or a folder with an index json or one weight file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such weight file or folder: {path}")
    for name in WEIGHT_INDEX_NAMES:
        index = path / name
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = [path / shard for shard in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} lists shards that are not there: {absent}")
            return files
    for name in WEIGHT_FILE_NAMES:
        if (path / name).is_file():
            return [path / name]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return [path / found[0]]
    raise FileNotFoundError(
        f"no safetensors weights in {path}: expected one of {list(WEIGHT_FILE_NAMES + WEIGHT_INDEX_NAMES)}"
        + (f", found several files without an index: {found}" if found else "")
    )


def read_header_keys(files: Iterable[Path]) -> list[str]:
    keys: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.extend(f.keys())
    return keys


def iter_tensors(
    files: Iterable[Path],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one tensor at a time, cast to ``dtype`` (floating tensors only) on ``device``."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if keep is not None and not keep(key):
                    continue
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                yield key, t.to(device)


def load_state_dict(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a whole component (file or folder, sharded or not) into a dict, casting as it goes."""
    return dict(iter_tensors(safetensors_files(path), dtype, device, keep))


def assign_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "model") -> nn.Module:
    """Strictly assign ``state_dict`` to a module built on meta (or anywhere). Returns the module."""
    expected = dict(module.state_dict(keep_vars=True))
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    shape_errors = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shape_errors:
        raise StateDictMismatchError(what, missing, unexpected, shape_errors)
    module.load_state_dict(state_dict, strict=True, assign=True)
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"{what}: tensors left on the meta device after loading: {still_meta[:5]}")
    return module


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def load_module(
    factory: Callable[[], nn.Module],
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    device: torch.device | str,
    what: str,
) -> nn.Module:
    """Build ``factory()`` on meta and strictly load the weights at ``path`` into it."""
    module = build_on_meta(factory)
    state_dict = load_state_dict(path, dtype=dtype, device=device)
    return assign_state_dict(module, state_dict, what).eval().requires_grad_(False)


def inspect_weights(path: str | os.PathLike) -> dict:
    """Tensor count, parameter count and dtypes of a component, read from the safetensors headers only."""
    files = safetensors_files(path)
    tensors, params, dtypes = 0, 0, {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                n = 1
                for d in s.get_shape():
                    n *= d
                tensors += 1
                params += n
                dt = s.get_dtype()
                dtypes[dt] = dtypes.get(dt, 0) + n
    return {"files": len(files), "tensors": tensors, "parameters": params, "dtypes": dtypes}
