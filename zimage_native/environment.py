"""What this machine offers the engine: ``zimage env`` (and :func:`report`).

The versions of Python, torch and the optional packages; each GPU with its compute capability,
memory and what it supports (bf16 tensor cores, fp8, the attention backends); the RAM; the Hugging
Face cache; then, for each acceleration and the example config's profiles, whether it can run here
and why not. It reads versions from package metadata and imports no optional package (importing a
broken flash-attn build can take long or crash), so it is safe to run when something is wrong,
which is when it is needed.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

#: Distributions whose versions the report lists (name in the report -> distribution names to try).
PACKAGES = {
    "triton": ("triton", "pytorch-triton-rocm", "triton-windows"),
    "transformers": ("transformers",),
    "safetensors": ("safetensors",),
    "huggingface_hub": ("huggingface_hub",),
    "gguf": ("gguf",),
    "flash_attn": ("flash-attn", "flash_attn"),
    "flash_attn_3": ("flash-attn-3", "flash_attn_3", "flash_attn_interface"),
    "sageattention": ("sageattention",),
    "xformers": ("xformers",),
    "fastapi": ("fastapi",),
    "ray": ("ray",),
    "diffusers": ("diffusers",),
}

#: About what a first use of a released model downloads (Z-Image-Turbo, Z-Image: bf16 weights and the rest).
DOWNLOAD_BYTES = 33 * 10**9

#: Accelerations that run on the CPU only as tests and dry runs of their code path: what their "yes"
#: there means.
CPU_NOTES = {
    "--fp8": "on the CPU slowly (torch._scaled_mm's CPU path: for tests and dry runs); on a GPU it needs fp8 "
             "tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell)",
    "--offload blocks (streamed from pinned memory)": "on the CPU as a dry run (the blocks stay in CPU memory: "
                                                      "nothing is saved); on a CUDA GPU it keeps two DiT blocks there "
                                                      "at a time",
}


def package_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def gpu_report(index: int) -> dict[str, Any]:
    """One GPU; where the driver cannot answer (a busy exclusive-mode GPU, a broken driver), the error."""
    from .devices import free_memory

    device = torch.device("cuda", index)
    try:
        major, minor = torch.cuda.get_device_capability(device)
        free, total = free_memory(device)
    except Exception as e:  # whatever the driver raises: the report must still print
        return {"index": index, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    return {"index": index, "name": torch.cuda.get_device_name(device), "capability": f"sm{major}{minor}",
            "compute_capability": [major, minor],
            "free_bytes": free, "total_bytes": total,
            # CUDA capabilities; a ROCm build reports gfx versions there, which say nothing of these
            "bf16_tensor_cores": None if torch.version.hip else (major, minor) >= (8, 0),
            "fp8_tensor_cores": None if torch.version.hip else (major, minor) >= (8, 9)}


def hub_cache() -> dict[str, Any]:
    """Where the Hugging Face cache is, and which released models it already holds."""
    from huggingface_hub import constants, try_to_load_from_cache

    from .hub import DEFAULT_MODEL, free_disk

    cached = {}
    for repo_id in (DEFAULT_MODEL, "Tongyi-MAI/Z-Image"):
        try:
            cached[repo_id] = isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
        except Exception:  # a malformed cache folder: say not cached
            cached[repo_id] = False
    try:
        free = free_disk(constants.HF_HUB_CACHE)
    except OSError:
        free = None
    return {"path": str(constants.HF_HUB_CACHE), "offline": bool(constants.HF_HUB_OFFLINE), "models": cached,
            "free_bytes": free}


def report() -> dict[str, Any]:
    """Everything ``zimage env`` prints, as plain data."""
    from . import __version__
    from .devices import driver_cuda_version, host_memory, nvidia_gpu_present

    cuda = torch.cuda.is_available()
    memory = host_memory()
    mps = getattr(torch.backends, "mps", None)
    return {
        "zimage_native": __version__,
        "zimage_native_path": str(Path(__file__).resolve().parent),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "cuda_available": cuda,
        "nvidia_driver": nvidia_gpu_present(),
        "driver_cuda": driver_cuda_version() if nvidia_gpu_present() else None,
        "gpus": [gpu_report(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps_available": bool(mps is not None and mps.is_available()),
        "ram": None if memory is None else dict(zip(("available_bytes", "swap_free_bytes", "total_bytes"), memory)),
        "packages": {name: package_version(dists) for name, dists in PACKAGES.items()},
        "hub_cache": hub_cache(),
    }


# ----------------------------------------------------------------------------- what runs here


def released_peaks() -> list[tuple[str, int]]:
    """(setting, weight bytes on the GPU at the peak) for the released Z-Image-Turbo in bf16: all
    resident, then the example config's profiles (exact bytes from :mod:`zimage_native.footprint`)."""
    from . import footprint

    resident = footprint.Profile("everything resident (no profile)", "bf16", "none", "none", 0)
    out = []
    for profile in (resident, *footprint.PROFILES):
        phases = footprint.profile_bytes(profile)
        out.append((profile.name, max(phases["encode"], phases["denoise"])))
    return out


def verdicts(rep: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(what, None if it can run here else why not), for the device "auto" picks and the accelerations."""
    from .accel._kernels import triton_unavailable_reason
    from .accel.attention_backends import BACKENDS, unavailable_reason
    from .accel.compile import gpu_compile_problem
    from .accel.fp8 import cpu_fp8_problem, gpu_fp8_problem
    from .devices import gpu_missing_reason

    usable = [g for g in rep["gpus"] if "error" not in g]
    gpu = usable[0] if usable else None
    out: list[tuple[str, str | None]] = []
    if gpu is None and rep["gpus"]:
        out.append(("a CUDA GPU", f"the driver did not answer for GPU {rep['gpus'][0]['index']}: "
                                  f"{rep['gpus'][0]['error']}"))
    elif gpu is None:
        where = "mps (Apple's Metal)" if rep["mps_available"] else "the CPU, minutes per image"
        out.append(("a CUDA GPU", f"{gpu_missing_reason()}; device auto runs on {where}"))
    no_gpu = "needs a CUDA GPU"
    device = torch.device("cuda", gpu["index"]) if gpu else torch.device("cpu")
    triton = triton_unavailable_reason()
    out.append(("--kernels triton", no_gpu if gpu is None else triton))
    if gpu is not None:  # with the default dtype there, bfloat16
        compile_problem = ((triton and f"needs Triton on a GPU: {triton}")
                           or gpu_compile_problem(tuple(gpu["compute_capability"]), gpu["name"], {torch.bfloat16}))
    elif any(shutil.which(cc) for cc in ("c++", "g++", "clang++", "cl")):
        compile_problem = None
    else:
        compile_problem = "torch.compile on the CPU needs a C++ compiler (none found on PATH)"
    out.append(("--compile blocks / full", compile_problem))
    out.append(("--cuda-graphs", no_gpu if gpu is None else None))
    if gpu is not None:
        fp8 = gpu_fp8_problem(tuple(gpu["compute_capability"]), gpu["name"], {torch.bfloat16})
    else:
        fp8 = cpu_fp8_problem()
    out.append(("--fp8", fp8))
    for backend in BACKENDS:
        if backend == "sdpa":
            out.append(("--attention sdpa", None))
            continue
        reason = no_gpu if gpu is None else unavailable_reason(backend, device, torch.bfloat16, 128)
        out.append((f"--attention {backend}", reason))
    out.append(("--offload blocks (streamed from pinned memory)", None))  # on the CPU, a dry run
    return out


def notes(rep: dict[str, Any]) -> dict[str, str]:
    """What a verdict's "yes" means where it needs saying (without a usable GPU: :data:`CPU_NOTES`)."""
    return {} if any("error" not in g for g in rep["gpus"]) else CPU_NOTES


def lines(rep: dict[str, Any]) -> list[str]:
    """The report as ``zimage env`` prints it."""
    from .cli.config import EXAMPLE_CONFIG
    from .devices import HEADROOM, format_bytes

    build = (f"CUDA {rep['torch_cuda']}" if rep["torch_cuda"] else f"ROCm {rep['torch_hip']}" if rep["torch_hip"]
             else "CPU-only build")
    driver = f" (supports CUDA up to {rep['driver_cuda']})" if rep["driver_cuda"] else ""
    out = [f"zimage-native {rep['zimage_native']} ({rep['zimage_native_path']}), Python {rep['python']}, "
           f"{rep['platform']}",
           f"torch {rep['torch']} ({build}); CUDA available: {'yes' if rep['cuda_available'] else 'no'}; "
           f"MPS available: {'yes' if rep['mps_available'] else 'no'}; NVIDIA driver: "
           f"{'yes' if rep['nvidia_driver'] else 'no'}{driver}"]
    for gpu in rep["gpus"]:
        if "error" in gpu:
            out.append(f"GPU {gpu['index']}: cannot be queried: {gpu['error']}")
            continue
        say = {True: "yes", False: "no", None: "unknown (ROCm)"}
        out.append(f"GPU {gpu['index']}: {gpu['name']}, {gpu['capability']}, {format_bytes(gpu['free_bytes'])} free of "
                   f"{format_bytes(gpu['total_bytes'])}; bf16 tensor cores: {say[gpu['bf16_tensor_cores']]}; "
                   f"fp8 tensor cores: {say[gpu['fp8_tensor_cores']]}")
        if gpu["bf16_tensor_cores"] is False:
            out.append("  bf16 on this GPU: slower matmuls, SDPA's math path (run in query slices) and no "
                       "torch.compile; float16 overflows in the DiT (docs/numerics.md)")
    if rep["ram"]:
        ram = rep["ram"]
        out.append(f"RAM: {format_bytes(ram['available_bytes'])} available of {format_bytes(ram['total_bytes'])}, "
                   f"{format_bytes(ram['swap_free_bytes'])} of free swap")
    else:
        out.append("RAM: not reported by this system")
    out.append("packages: " + ", ".join(f"{name} {version or 'not installed'}"
                                        for name, version in rep["packages"].items()))
    cache = rep["hub_cache"]
    held = ", ".join(f"{repo} {'cached' if yes else 'not downloaded'}" for repo, yes in cache["models"].items())
    missing = [repo for repo, yes in cache["models"].items() if not yes]
    if missing:
        short = cache["free_bytes"] is not None and cache["free_bytes"] < DOWNLOAD_BYTES
        room = ", more than is free on that disk: make room, or set HF_HOME to a folder on a larger disk"
        held += f" (about {DOWNLOAD_BYTES / 1e9:.0f} GB {'each ' if len(missing) > 1 else ''}on first use" \
                f"{room if short else ''})"
    free = f", {format_bytes(cache['free_bytes'])} free on its disk" if cache["free_bytes"] is not None else ""
    out.append(f"Hugging Face cache: {cache['path']}{' (offline)' if cache['offline'] else ''}{free}; {held}")
    out.append(f"example config (--profile NAME): {EXAMPLE_CONFIG}")
    out.append("what runs here:")
    said = notes(rep)
    for what, why in verdicts(rep):
        yes = f"yes, {said[what]}" if what in said else "yes"
        out.append(f"  {what}: {yes if why is None else 'no, ' + why}")
    from . import footprint

    reads_gguf = {p.name for p in footprint.PROFILES if p.dit.startswith("gguf") or p.text_encoder.startswith("gguf")}
    no_gguf = rep["packages"].get("gguf") is None
    for gpu in (g for g in rep["gpus"] if "error" not in g):
        room = gpu["total_bytes"] * (1 - HEADROOM)
        fits = [(name, peak) for name, peak in released_peaks() if peak <= room]
        if fits:
            name, peak = fits[0]
            pick = (f"{name}, {format_bytes(peak)} of weights at the peak" if name.startswith("everything")
                    else f"--profile {name} ({format_bytes(peak)} of weights at the peak)")
        else:
            name, pick = "8gb", "none of the example profiles leaves a quarter of this card free; try --profile 8gb"
        if name in reads_gguf and no_gguf:
            pick += "; it reads a GGUF file: pip install 'zimage-native[gguf]' first (gguf is not installed)"
        out.append(f"  Z-Image-Turbo on GPU {gpu['index']} ({format_bytes(gpu['total_bytes'])}): {pick}")
    return out
