"""Devices and dtypes: what "auto" means, and where a component's weights live between uses."""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:  # "gpu", "cuda:x", ...
        raise ValueError(f"unknown device {str(device)!r}: give cpu, cuda, cuda:N, mps or auto ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: this torch {torch.__version__} sees no CUDA GPU "
                         f"(use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} is not available: there are {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r} is not available on this machine (use cpu or auto)")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto': bf16 on accelerators, fp32 on the CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    if DTYPES[dtype] is torch.float16:
        logger.warning("float16 can overflow in the Z-Image DiT; bfloat16 or float32 is recommended")
    return DTYPES[dtype]


#: "text_encoder": the text encoder lives on the CPU except while it encodes; "model": every
#: component lives on the CPU except while it runs; "blocks": the text encoder as with
#: "text_encoder", and the DiT's blocks stream from pinned CPU memory (:mod:`zimage_native.offload`).
OFFLOAD_MODES = ("none", "text_encoder", "model", "blocks")


def check_offload(offload: str) -> str:
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    return offload


def storage_device(name: str, device: torch.device, offload: str) -> torch.device:
    """Where a component's weights live between uses (with "blocks", the DiT's resident parts)."""
    if offload == "model" or (offload in ("text_encoder", "blocks") and name == "text_encoder"):
        return torch.device("cpu")
    return device


def load_device(name: str, device: torch.device, offload: str) -> torch.device:
    """Where a component is loaded: with "blocks" the DiT is read into CPU memory, and
    :func:`zimage_native.offload.stream_blocks` then moves its resident parts to ``device``."""
    if offload == "blocks" and name == "transformer":
        return torch.device("cpu")
    return storage_device(name, device, offload)


# ----------------------------------------------------------------------------- GPU memory

#: What lowers the weights' share of GPU memory, in the words of the CLI (the library's arguments
#: have the same names with underscores); docs/performance.md has the numbers for each.
MEMORY_ADVICE = ("quantise the text encoder (--text-encoder-quant int8), use a GGUF DiT (--transformer "
                 "FILE.gguf), stream the DiT's blocks (--offload blocks) or keep every component in CPU memory "
                 "except while it runs (--offload model); the profiles of config.example.toml fit 8-24 GB cards")


class InsufficientMemoryError(ValueError):
    """The weights placed on a GPU at load time cannot fit in its free memory."""


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device: what the driver reports free plus what PyTorch's caching
    allocator holds without using (freed tensors of an earlier model, which it hands out again)."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def weight_peak(needs: dict[str, int], placement: dict[str, torch.device], offload: str, device: torch.device
                ) -> tuple[int, dict[str, int], dict[str, int]]:
    """(peak bytes of weights on ``device``, the components stored there, those that visit it while
    they run): the stored ones plus the largest visitor (see :func:`check_weights_fit`)."""
    parts = {name: size for name, size in needs.items() if placement[name] == device}
    stay = {n: b for n, b in parts.items() if storage_device(n, device, offload) == device}
    visit = {n: b for n, b in parts.items() if n not in stay}
    return sum(stay.values()) + max(visit.values(), default=0), stay, visit


def check_weights_fit(needs: dict[str, int], placement: dict[str, torch.device], offload: str = "none",
                      advice: Callable[[torch.device, int], str | None] | None = None) -> None:
    """Refuse before loading what cannot fit when it runs: ``needs`` holds, per component, the bytes of
    weights it holds on ``placement[name]`` while it runs (a lower bound is enough: weights cannot be
    smaller). Components stored there between uses count always; an offloaded one (``offload``: see
    :func:`storage_device`) joins them while it runs, so the largest of those counts too. Raises
    :class:`InsufficientMemoryError` naming each part and what to change: ``advice(device, free
    bytes)``, or :data:`MEMORY_ADVICE` where it has none."""
    for device in {d for d in placement.values() if d.type == "cuda"}:
        peak, stay, visit = weight_peak(needs, placement, offload, device)
        if peak == 0:
            continue
        largest = max(visit, key=visit.get, default=None)
        free, total = free_memory(device)
        if peak <= free:
            continue
        listed = ", ".join(f"{name.replace('_', ' ')} {format_bytes(size)}" for name, size in stay.items())
        visitor = f"{largest.replace('_', ' ')}" if largest else ""
        if largest and stay:
            what = f"{listed} stay there and the {visitor} ({format_bytes(visit[largest])}) joins them while it runs"
        elif largest:
            what = f"each component runs there alone and the {visitor} needs {format_bytes(visit[largest])}"
        else:
            what = listed
        fix = (advice and advice(device, free)) or MEMORY_ADVICE
        raise InsufficientMemoryError(
            f"the weights do not fit on {device}: {what}, {format_bytes(peak)} at the peak, and the GPU has "
            f"{format_bytes(free)} free of {format_bytes(total)}. To fit, {fix}")


def check_component_fits(what: str, module: torch.nn.Module, dtype: torch.dtype | None,
                         device: torch.device) -> None:
    """Just before a component built on meta is read onto a GPU: refuse if its weights (its floating
    tensors in ``dtype``, packed ones as they are) exceed the card's free memory now, which the
    components loaded before it have already taken their share of."""
    if device.type != "cuda":
        return
    need = sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in (*module.parameters(), *module.buffers()))
    free, total = free_memory(device)
    if need > free:
        raise InsufficientMemoryError(
            f"the {what} ({format_bytes(need)} of weights) does not fit on {device}: the GPU has "
            f"{format_bytes(free)} free of {format_bytes(total)}, the components loaded before it included. "
            f"To fit, {MEMORY_ADVICE}")


def format_bytes(n: int) -> str:
    """Bytes in GB (10^9), or MB below 0.1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"
