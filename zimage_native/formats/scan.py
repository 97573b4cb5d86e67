"""Tensors that hold NaN or infinite values (``zimage info --check``): a damaged download, a bad merge
or a fine-tune that diverged. Unlike the rest of ``zimage info`` this reads every tensor's data, one
tensor at a time (GGUF blocks dequantised, fp8 widened), in slices of at most 16M values.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, sniff
from .detect import block_layer_problem, comfy_quant_layers
from .microscale import BLOCK_FORMATS, block_scales

#: The components of a diffusers model folder, scanned in this order.
FOLDER_COMPONENTS = ("transformer", "vae", "text_encoder")
SLICE = 1 << 24


@dataclass
class BadTensor:
    name: str
    nan: int
    inf: int
    numel: int


@dataclass
class ScanReport:
    tensors: int = 0  # floating-point tensors read (integer ones cannot hold NaN)
    values: int = 0
    bad: list[BadTensor] = field(default_factory=list)
    unread: dict[str, str] = field(default_factory=dict)  # GGUF tensors of a type the engine cannot dequantise

    def to_dict(self) -> dict:
        return {"tensors": self.tensors, "values": self.values, "nonfinite": [asdict(b) for b in self.bad],
                "unread": self.unread}


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, infinite count) of a floating-point tensor of any dtype, fp8 included."""
    nan = inf = 0
    for part in t.reshape(-1).split(SLICE):
        part = part.float()
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return nan, inf


def _check(report: ScanReport, name: str, values: torch.Tensor) -> None:
    report.tensors += 1
    report.values += values.numel()
    nan, inf = count_nonfinite(values)
    if nan or inf:
        report.bad.append(BadTensor(name, nan, inf, values.numel()))


def _scan_one(path: Path, report: ScanReport, prefix: str, progress: bool) -> None:
    if path.is_file() and sniff(path) == "gguf":
        from .gguf import GGUFCheckpoint

        with GGUFCheckpoint(path) as ckpt:
            for key in tqdm(ckpt.keys(), desc=f"checking {path.name}", unit="tensor", disable=not progress):
                if key in ckpt.unsupported:
                    report.unread[prefix + key] = ckpt.unsupported[key]
                else:
                    _check(report, prefix + key, ckpt.values(key))
        return
    with Checkpoint(path) as ckpt:
        blocks = _block_layers(ckpt)
        for key in tqdm(ckpt.keys(), desc=f"checking {path.name}", unit="tensor", disable=not progress):
            if key[: -len(".weight_scale")] in blocks and key.endswith(".weight_scale"):
                continue  # read below as the loader reads it
            dtype = ckpt.tensors[key].torch_dtype
            if dtype is not None and dtype.is_floating_point:
                _check(report, prefix + key, ckpt.get(key))
        for layer, fmt in blocks.items():
            _check(report, prefix + layer + ".weight_scale", block_scales(ckpt, layer + ".weight", fmt))


def _block_layers(ckpt: Checkpoint) -> dict[str, str]:
    """The comfy_quant nvfp4 / mxfp8 layers of a file that loads -> their format. Their block scales
    (F8_E8M0 or U8 bytes, which a dtype test skips) are read without the blocked layout's padding, as
    values: an e8m0 code 255 or an e4m3 NaN is a NaN scale, whose block loads as NaN."""
    layers = {}
    for layer, conf in comfy_quant_layers(ckpt).items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        weight = ckpt.tensors.get(layer + ".weight")
        if fmt in BLOCK_FORMATS and weight is not None and block_layer_problem(ckpt, layer, fmt, weight) is None:
            layers[layer] = fmt
    return layers


def scan_nonfinite(path: str | os.PathLike, progress: bool = False) -> ScanReport:
    """Read every floating-point tensor of a file, a component folder or a diffusers model folder (its
    transformer, vae and text_encoder; names then start with the component) and list those holding
    NaN or infinite values."""
    path = Path(path)
    report = ScanReport()
    if path.is_dir() and (path / "model_index.json").is_file():
        for name in FOLDER_COMPONENTS:
            _scan_one(path / name, report, f"{name}/", progress)
    else:
        _scan_one(path, report, "", progress)
    return report
