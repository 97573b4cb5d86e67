"""Devices and dtypes: what "auto" means, and where a component's weights live between uses."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def parse_device(device: str | int | torch.device) -> torch.device:
    """A device name read in any case ("CPU", "Cuda:0") as a torch.device, without asking whether it is
    there (:func:`resolve_device` does, and reads "auto"); a name torch does not know is a ValueError
    saying what to give, not torch's list of its 20 device types."""
    if isinstance(device, torch.dtype):  # from_pretrained(path, torch.bfloat16): the device's place
        name = str(device).removeprefix("torch.")
        raise TypeError(f"a dtype ({device}) was given where the device goes: give it by name, dtype=torch.{name} "
                        f"(or torch_dtype=), and the device as device='cuda' / 'cpu' (or leave it out: auto)")
    if isinstance(device, bool) or (isinstance(device, int) and device < 0):
        raise ValueError(f"unknown device {device!r}: give cpu, cuda, cuda:N (or the index N), mps or auto")
    if isinstance(device, int):  # an index, as torch reads it: 0 is cuda:0 (torch.device(0) asks the
        return torch.device("cuda", device)  # accelerator and fails on a CPU-only build instead)
    if isinstance(device, str):
        device = device.strip().lower()
        if device == "gpu" or device.startswith("gpu:"):  # torch calls NVIDIA GPUs cuda
            raise ValueError(f"unknown device {device!r}: a GPU is cuda here ({device.replace('gpu', 'cuda')}); "
                             f"give cpu, cuda, cuda:N, mps or auto")
    try:
        return torch.device(device)
    except RuntimeError:  # "cuda:x", "cuda0", ...
        raise ValueError(f"unknown device {str(device)!r}: give cpu, cuda, cuda:N, mps or auto") from None


def resolve_device(device: str | int | torch.device | None) -> torch.device:
    if isinstance(device, str):
        device = device.strip().lower()  # "CPU", "Cuda:0", " auto"
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = parse_device(device)
    if isinstance(device, int):
        device = dev  # named as cuda:N below
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: this torch {torch.__version__} sees no CUDA GPU "
                         f"(use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} is not available: there are {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r} is not available on this machine (use cpu or auto)")
    if dev.type not in ("cpu", "cuda", "mps", "meta"):  # xpu, hpu, ...: torch's backend, if this build has it
        available = getattr(getattr(torch, dev.type, None), "is_available", None)
        if not (callable(available) and available()):
            raise ValueError(f"device {str(device)!r} is not available in this torch {torch.__version__}: give cpu, "
                             f"cuda, cuda:N, mps or auto")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, warn: bool = True) -> torch.dtype:
    """None/'auto': bf16 on accelerators, fp32 on the CPU (bf16 matmuls are slow there). ``warn``:
    give the advice for this device and dtype (the load does; a check before it does not)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; choose torch.bfloat16, torch.float32 or torch.float16")
        dtype = str(dtype).removeprefix("torch.")
    if dtype is None or dtype == "auto":
        if warn and device.type == "cuda" and not getattr(torch.version, "hip", None):
            try:
                major, minor = torch.cuda.get_device_capability(device)
            except (RuntimeError, AssertionError):  # no driver answer: the load says so; this is only advice
                major, minor = 8, 0
            if (major, minor) < (8, 0):
                logger.warning("%s (sm%d%d) has no bfloat16 tensor cores: bfloat16, the default on a GPU, runs there "
                               "but slower than on newer cards (float16 would use the tensor cores, but the DiT's "
                               "activations overflow it)", torch.cuda.get_device_name(device), major, minor)
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    if warn and DTYPES[dtype] is torch.float16:
        logger.warning("float16 can overflow in the Z-Image DiT (a run that does stops with an error); bfloat16 or "
                       "float32 is recommended")
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
                 "except while it runs (--offload model); the example profiles (--profile 8gb, 12gb, 16gb, rtx4090) fit 8-24 GB cards")


#: The share of a card the example profiles leave free for activations, the CUDA context and the decode.
HEADROOM = 0.25


#: The same settings in the library's words, added for a Python caller (the CLI prints its message
#: without it): diffusers' habit of loading, then ``enable_model_cpu_offload()``, fails here at the
#: load, which places the weights on the GPU as it reads them.
PYTHON_MEMORY_ADVICE = ("in Python these are from_pretrained's arguments: text_encoder_quant=\"int8\", "
                        "transformer=\"FILE.gguf\", offload=\"blocks\", offload=\"model\" (diffusers' "
                        "enable_model_cpu_offload(): from_pretrained places the weights on the GPU as it loads, so "
                        "choose it there, or load with device=\"cpu\" and then call pipe.enable_model_cpu_offload())")


class InsufficientMemoryError(ValueError):
    """The weights placed on a GPU at load time cannot fit in its free memory. ``python_advice`` is
    added to the message for a library caller (kept as ``python_advice``); ``cli_message`` is the
    message without it. ``device``: the memory that is short, a GPU's or the RAM's
    (``torch.device("cpu")``, also for Apple silicon's GPU, which shares it), where the check knows it."""

    def __init__(self, message: str, python_advice: str | None = None, device: torch.device | None = None):
        super().__init__(f"{message}; {python_advice}" if python_advice else message)
        self.cli_message, self.python_advice, self.device = message, python_advice, device


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device: what the driver reports free plus what PyTorch's caching
    allocator holds without using (freed tensors of an earlier model, which it hands out again)."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def keeps_fp8_here(upcast_bytes: int, device: torch.device) -> bool:
    """Whether an fp8 DiT file keeps its float8 weights (and a ComfyUI comfy_quant file its int8, nvfp4
    and mxfp8 ones) on ``device`` when not told (``load_component(keep_fp8=None)``): in CPU memory
    always (half the RAM, and half the bytes an offloaded DiT copies to the GPU); on a CUDA GPU only
    when its upcast weights (``upcast_bytes``) would not fit there with :data:`HEADROOM` of the card
    left free, since upcast weights need no dequantisation per forward; elsewhere never (Apple's Metal has no float8 types)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    free, total = free_memory(device)
    return upcast_bytes > free - HEADROOM * total


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
            if peak > (1 - HEADROOM) * total:
                logger.warning("the weights take %s of %s's %s at the peak, more than %d%%; activations come on top "
                               "(not counted): if generating runs out of memory, use the profile for this card "
                               "(`zimage env` names it) or --tiled-vae", format_bytes(peak), device,
                               format_bytes(total), round(100 * (1 - HEADROOM)))
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
            f"{format_bytes(free)} free of {format_bytes(total)}. To fit, {fix}", PYTHON_MEMORY_ADVICE, device)


def bytes_in(tensors, dtype: torch.dtype | None) -> int:
    """Bytes of ``tensors`` once read: floating ones in ``dtype`` (when given), the others as they are."""
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in tensors)


def check_component_fits(what: str, module: torch.nn.Module, dtype: torch.dtype | None,
                         device: torch.device, pinned: bool = False, advice: str | None = None,
                         python_advice: str | None = None, tensors: list[torch.Tensor] | None = None,
                         model_gpu: Callable[[int], str | None] | None = None) -> None:
    """Just before a component built on meta is read onto a GPU (or into CPU memory): refuse if its
    weights (its floating tensors in ``dtype``, packed ones as they are) exceed the card's free memory
    now (the machine's available RAM and swap), which the components loaded before it have already
    taken their share of. ``pinned``: read into CPU memory to be page-locked for streaming
    (``offload="blocks"`` on a GPU), so the RAM alone must hold it (:func:`check_host_memory`).
    ``advice`` / ``python_advice``: what to change in the CLI's words / the library's, in place of the
    advice for a pipeline's components (a ControlNet's own). ``tensors``: those of the module that
    go to ``device`` (by default all of them). ``model_gpu(bytes)``: why ``--offload model`` would not
    fit on the GPU with the component's bytes (:func:`model_offload_gpu_short`), for the pinned refusal's
    advice (:func:`pinned_advice`), asked where ``pinned``."""
    if device.type not in ("cuda", "cpu", "mps"):
        return
    need = bytes_in((*module.parameters(), *module.buffers()) if tensors is None else tensors, dtype)
    if device.type in HOST_MEMORY_DEVICES:
        check_host_memory({what: need}, {what: device}, (what,) if pinned else (), advice, python_advice,
                          model_gpu=model_gpu(need) if model_gpu is not None and pinned else None)
        return
    free, total = free_memory(device)
    if need > free:
        raise InsufficientMemoryError(
            f"the {what} ({format_bytes(need)} of weights) does not fit on {device}: the GPU has "
            f"{format_bytes(free)} free of {format_bytes(total)}, the components loaded before it included. "
            f"To fit, {advice or MEMORY_ADVICE}", python_advice if advice else PYTHON_MEMORY_ADVICE, device)


def format_bytes(n: int) -> str:
    """Bytes in GB (10^9), MB below 0.1 GB, KB below 1 MB and bytes below 1 KB ("1 byte"; a small figure, a
    tiny model's weights or no free memory at all, read "0.0 MB" or "0.1 MB" for 121,872 bytes)."""
    if n >= 10**8:
        return f"{n / 1e9:.2f} GB"
    if n >= 10**6 - 50:  # (999,950 bytes and up round to 1.0 MB, not 1000.0 KB)
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} KB" if n >= 10**3 else f"{n:,} byte" if n == 1 else f"{n:,} bytes"


# ----------------------------------------------------------------------------- CPU memory

#: Devices whose weights take the machine's RAM: the CPU, and Apple silicon's GPU (unified memory).
HOST_MEMORY_DEVICES = ("cpu", "mps")
#: What lowers the weights' share of CPU memory, in the words of the CLI.
HOST_MEMORY_ADVICE = ("load in bfloat16 (--dtype bfloat16), quantise the text encoder (--text-encoder-quant int8), "
                      "use a GGUF DiT (--transformer FILE.gguf), or, with a GPU, offload less (--offload none)")


def host_memory(meminfo: str | Path = "/proc/meminfo", cgroup: str | Path = "/sys/fs/cgroup"
                ) -> tuple[int, int, int] | None:
    """(available RAM, free swap, total RAM) in bytes: on Linux from ``meminfo``, where a container's
    limit (cgroup v2 ``memory.max``) caps the RAM and its reclaimable page cache (``inactive_file``)
    counts as available, as the kernel would free it; elsewhere (macOS, Windows) from psutil when it
    is installed; else None (not known)."""
    try:
        lines = Path(meminfo).read_text().splitlines()
        info = {k.strip(): int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        available, total, swap = info["MemAvailable"], info["MemTotal"], info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            import psutil
        except ImportError:
            return None
        memory = psutil.virtual_memory()
        return memory.available, psutil.swap_memory().free, memory.total
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in Path(cgroup, "memory.stat").read_text().splitlines())
            used = int(Path(cgroup, "memory.current").read_text()) - int(stat.get("inactive_file", 0))
            available, total = min(available, int(limit) - used), min(total, int(limit))
            swap_limit = Path(cgroup, "memory.swap.max").read_text().strip()
            if swap_limit != "max":
                swap = min(swap, int(swap_limit) - int(Path(cgroup, "memory.swap.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(available, 0), max(swap, 0), total


#: What makes a DiT streamed from pinned memory smaller, in the CLI's words and the library's.
SMALLER_DIT, PYTHON_SMALLER_DIT = "use a smaller DiT (a GGUF file, --transformer FILE.gguf)", 'transformer="FILE.gguf"'


def pinned_advice(everything: int, need: int, locked: int, available: int, swap: int, smaller: str,
                  python_smaller: str | None, model_gpu: str | None = None) -> tuple[str, str | None]:
    """The routes, in the CLI's words and the library's, to fit ``need`` bytes kept in CPU memory of
    which the ``locked`` ones (one component's) are pinned and exceed the ``available`` RAM: only
    those that fit beside ``swap`` bytes of free swap. ``--offload model`` keeps every component
    (``everything`` bytes) pageable, so it fits when the RAM and swap together hold them; a smaller
    pinned component (``smaller`` / ``python_smaller``) is given the largest size that fits; and
    freeing RAM (the bytes the RAM lacks for both the pinned weights and the rest) always fits.
    ``model_gpu``: why ``--offload model`` does not fit on the GPU (:func:`model_offload_gpu_short`),
    where it does not: it is not named then either."""
    short = max(locked - available, need - available - swap)
    model = everything <= available + swap and model_gpu is None
    routes = ["keep it in pageable CPU memory, which swap can hold (--offload model)"] if model else []
    python = ['offload="model"'] if model else []
    if locked > short:
        routes.append(f"{smaller} whose weights take at most {format_bytes(locked - short)}")
        python += [python_smaller] if python_smaller else []
    routes.append(f"free {format_bytes(short)} of RAM")
    text = f"{', '.join(routes[:-1])} or {routes[-1]}" if len(routes) > 1 else routes[0]
    if model_gpu is not None:
        text += f" (--offload model does not fit either: {model_gpu})"
    elif not model:
        text += (f" (--offload model does not fit either: it keeps {format_bytes(everything)} of weights in pageable "
                 f"CPU memory, more than the RAM and free swap hold together, {format_bytes(available + swap)})")
    return text, f"in Python these are from_pretrained's arguments: {', '.join(python)}" if python else None


def model_offload_gpu_short(needs: dict[str, int], placement: dict[str, torch.device]) -> str | None:
    """Why ``offload="model"`` would not fit on a GPU of ``placement`` (``needs``: the bytes each
    component holds there while it runs, from the headers): each component visits its GPU alone, so
    the largest must fit in the free memory (:func:`free_memory`); None where it does."""
    for device in {d for d in placement.values() if d.type == "cuda"}:
        peak, _, visit = weight_peak(needs, placement, "model", device)
        free, _ = free_memory(device)
        if peak > free:
            largest = max(visit, key=visit.get)
            return (f"the {largest.replace('_', ' ')} visits {device} whole, {format_bytes(peak)}, and the GPU has "
                    f"{format_bytes(free)} free")
    return None


def check_host_memory(needs: dict[str, int], storage: dict[str, torch.device], pinned: tuple[str, ...] = (),
                      advice: str | None = None, python_advice: str | None = None,
                      model_gpu: str | None = None) -> None:
    """Refuse before loading the weights that would stay in CPU memory (``needs``: bytes per component;
    those whose ``storage`` device is the CPU, or Apple silicon's GPU, which shares the RAM, count) when they exceed the available RAM and free swap
    together, or when the ``pinned`` ones (page-locked for streaming: swap cannot hold them) exceed
    the RAM alone; warn when they all exceed the RAM (the system would swap). Quiet where the system
    does not report its memory. ``advice`` / ``python_advice``: what to change in the CLI's words /
    the library's, in place of the advice for a pipeline's components; for pinned weights, the smaller
    weights to load in their place (:func:`pinned_advice` adds the largest size that fits and the other
    routes; ``model_gpu``: why ``--offload model`` does not fit on the GPU, :func:`pinned_advice`)."""
    parts = {name: size for name, size in needs.items() if storage[name].type in HOST_MEMORY_DEVICES}
    need, memory = sum(parts.values()), host_memory()
    if not need or memory is None:
        return
    available, swap, total = memory
    where_kept = ("memory (Apple silicon's GPU shares the RAM)" if any(storage[n].type == "mps" for n in parts)
                  else "CPU memory")
    listed = ", ".join(f"{name.replace('_', ' ')} {format_bytes(size)}" for name, size in parts.items())
    where = f"{listed}, {format_bytes(need)} in all" if len(parts) > 1 else listed
    locked = sum(size for name, size in parts.items() if name in pinned)
    if locked > available:
        routes, python = pinned_advice(sum(needs.values()), need, locked, available, swap,
                                       advice or SMALLER_DIT, python_advice if advice else PYTHON_SMALLER_DIT, model_gpu)
        raise InsufficientMemoryError(
            f"the weights do not fit in {where_kept}: {where}, of which the {' and '.join(pinned).replace('_', ' ')} "
            f"({format_bytes(locked)}) is pinned for streaming, which swap cannot hold, and this machine has "
            f"{format_bytes(available)} of RAM available of {format_bytes(total)}. To fit, "
            f"{routes}", python, torch.device("cpu"))
    if need > available + swap:
        raise InsufficientMemoryError(
            f"the weights do not fit in {where_kept}: {where}, and this machine has {format_bytes(available)} of RAM "
            f"available of {format_bytes(total)} and {format_bytes(swap)} of free swap. To fit, "
            f"{advice or HOST_MEMORY_ADVICE}", python_advice, torch.device("cpu"))
    if need > available:
        logger.warning("the weights kept in %s (%s) exceed the available RAM (%s of %s): the system will swap, "
                       "and loading and generating will be slow", where_kept, where, format_bytes(available),
                       format_bytes(total))


# Bytes per output pixel of an untiled VAE decode on the CPU, per channel of the decoder's full-resolution
# block: 7 activations in the VAE's dtype and one in fp32 (32 B in fp32, 18 B in bf16). Measured, peak RSS
# above the weights (released VAE config, random weights, torch 2.13.0, docs/performance.md): 30.0 B in fp32
# (3.84 kB per pixel: 0.95 GiB at 512x512, 3.75 GiB at 1024x1024, 15.0 GiB at 2048x2048) and 17.1 B in bf16
# (2.19 kB per pixel, 2.13 GiB at 1024x1024: more than half of fp32's). The VAE encode of img2img and
# inpainting peaks lower (24.0 B in fp32, 12.0 B in bf16, per input pixel; at most one input image per output
# image, at the output size), so this bounds it too.
DECODE_DTYPE_ACTIVATIONS, DECODE_FP32_ACTIVATIONS = 7, 1


def blend_bytes(images: int) -> int:
    """Bytes per output pixel of a tiled decode's blend (:func:`zimage_native.tiling.tiled_apply`):
    the fp32 sum of the tiles and its normalised copy (3 channels per image each), and the fp32 weights."""
    return 2 * 3 * 4 * images + 4


_swap_warned: set[tuple[int, int, int]] = set()  # (bytes, width, height) of the decodes warned about


def decode_bytes(width: int, height: int, images: int, channels: int, dtype: torch.dtype) -> int:
    """The estimated peak bytes of an untiled VAE decode of ``images`` images of ``width`` x ``height``
    whose decoder's full-resolution block has ``channels`` channels (128 for the released VAE)."""
    per_channel = DECODE_DTYPE_ACTIVATIONS * dtype.itemsize + DECODE_FP32_ACTIVATIONS * 4
    return per_channel * channels * width * height * images


def check_decode_fits(device: torch.device, dtype: torch.dtype, channels: int, width: int, height: int,
                      images: int, tile: int | None = None) -> None:
    """Before sampling, for a VAE decode on the CPU (:func:`decode_bytes`): refuse one that the available
    RAM and free swap cannot hold (the system would kill the process at the very end of sampling, a
    server with every queued job), and warn once per size about one that needs swap; both say what to
    change. ``tile``: the tile size in pixels of a tiled decode, which decodes tiles of at most
    ``tile`` x ``tile`` (the whole image when the tile is not smaller) and blends them into fp32
    buffers of the image's size. Quiet elsewhere (a GPU raises its own out-of-memory error) and where
    the system does not report its memory."""
    memory = host_memory() if device.type == "cpu" else None
    if memory is None:
        return
    available, swap, total = memory
    images_ = f"{images} image{'s' if images > 1 else ''} at {width}x{height}"
    if tile is None:
        need = decode_bytes(width, height, images, channels, dtype)
        what = f"the VAE decode of {images_} in one piece needs about {format_bytes(need)} of CPU memory"
        advice = ("use --tiled-vae (the decode in tiles: about 1.2 GB at 2048x2048; pipe.enable_vae_tiling() in "
                  "Python, zimage serve --tiled-vae for a server), or a smaller --batch-size or size")
    else:
        tw, th = min(tile, width), min(tile, height)
        need = decode_bytes(tw, th, images, channels, dtype) + blend_bytes(images) * width * height
        pieces = ("in one tile (the tile size is not smaller than the image)" if (tw, th) == (width, height) else
                  f"in tiles of {tw}x{th}")
        what = f"the VAE decode of {images_} {pieces} needs about {format_bytes(need)} of CPU memory"
        advice = ("use a smaller --tile-size (512 needs about 1.2 GB at 2048x2048; pipe.enable_vae_tiling(tile_size) "
                  "in Python), or a smaller --batch-size or size")
    if need > available + swap:
        raise InsufficientMemoryError(f"{what}, and this machine has {format_bytes(available)} of RAM available (of "
                                      f"{format_bytes(total)}) and {format_bytes(swap)} of free swap: the system would "
                                      f"stop the run at the end of sampling; {advice}")
    if need > available and (need, width, height) not in _swap_warned:  # once: a CLI run or a server has many batches
        _swap_warned.add((need, width, height))
        logger.warning("%s, more than the %s of RAM available: the system will swap at the end of sampling; %s",
                       what, format_bytes(available), advice)


def nvidia_gpu_present() -> bool:
    """Whether the machine has an NVIDIA driver (whatever torch makes of it)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def driver_cuda_version() -> str | None:
    """The newest CUDA version the NVIDIA driver supports, as ``nvidia-smi`` prints it, or None."""
    import re
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+\.\d+)", out)
    return found[1] if found else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


def gpu_missing_reason() -> str:
    """Why torch sees no CUDA GPU, as far as the machine tells: the usual cause, where there is an
    NVIDIA driver, is a CPU-only build of torch; the next, a torch built for a newer CUDA than the
    driver supports."""
    if nvidia_gpu_present() and torch.version.cuda is None:
        return (f"this machine has an NVIDIA GPU but torch {torch.__version__} is a CPU-only build: install a CUDA "
                f"build of torch (https://pytorch.org/get-started/locally/) to use it")
    if nvidia_gpu_present():
        driver = driver_cuda_version()
        if driver is not None and _version(driver) < _version(torch.version.cuda):
            return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, newer than the {driver} this "
                    f"machine's NVIDIA driver supports: update the driver, or install a torch built for CUDA {driver} "
                    f"or older (https://pytorch.org/get-started/locally/)")
        return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but cannot use this machine's "
                f"NVIDIA GPU: check the driver with nvidia-smi (it must support CUDA {torch.version.cuda})")
    return "no CUDA GPU is visible to torch"


def warn_if_cpu_fallback(requested: str | torch.device | None, device: torch.device) -> None:
    """When ``device`` "auto" (or None) came out as the CPU, say so and why, once per load: a full-size
    model there takes minutes per image."""
    if device.type != "cpu" or (requested is not None and str(requested) != "auto"):
        return
    logger.warning("the model runs on the CPU, which takes minutes per image at 1024x1024 (pass --device cpu, or "
                   "device=\"cpu\" in Python, to silence this warning): %s", gpu_missing_reason())
