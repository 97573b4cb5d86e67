"""Accelerations of a built model, applied from outside ``zimage_native.model`` and ordered here.

    from zimage_native.accel import optimize, attention_from_env
    lines = optimize(pipe.transformer, kernels="triton", attention=attention_from_env())

:func:`optimize` is the one place that orders the transforms: the kernel swaps with the
load-time GEMM fusions (``fusions``: q|k|v and w1|w3 as single GEMMs), the leaf swaps (``fused_ops``), fp8 (``fp8``; quantise before
compiling), the attention backend (``attention_backends``), then torch.compile (``compile``).
CUDA graphs of the whole sampling loop come last, in the pipeline (``cuda_graphs``), because a
capture records whatever ran before it. Each transform reports what it changed. Importing this package never imports Triton; ``kernels="triton"`` does, and
raises a clear error when Triton or a GPU is missing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ._kernels import AccelerationUnavailable, load_kernels, triton_unavailable_reason
from .attention_backends import (
    ATTENTION_CHOICES,
    attention_from_env,
    canonical_name,
    check_attention_backend,
    resolve_backend,
    set_attention_backend,
    unavailable_reason,
)
from .compile import COMPILE_MODES, SHAPE_POLICIES, check_compile_supported, compile_transformer_
from .fp8 import check_fp8_supported, quantize_fp8_
from .fused_ops import check_kernels_can_run, count_fused, use_fused_kernels
from .fusions import fuse_projections_

logger = logging.getLogger(__name__)

KERNEL_CHOICES = ("none", "triton")

__all__ = [
    "optimize", "check_before_loading", "blocks_conflict", "placement_problem", "attention_from_env", "AccelerationUnavailable", "set_attention_backend", "use_fused_kernels", "load_kernels",
    "count_fused", "fuse_projections_", "quantize_fp8_", "resolve_backend", "check_attention_backend", "canonical_name", "unavailable_reason",
    "triton_unavailable_reason", "fp8_quantize_kernel", "ATTENTION_CHOICES", "KERNEL_CHOICES",
]


def optimize(transformer: nn.Module, kernels: str = "none", attention: str = "sdpa", fp8: bool = False,
             compile: str = "off", compile_backend: str | object = "inductor", fp8_fast_accum: bool = True,
             shapes: str = "dynamic", fuse: bool = True, device: str | torch.device | None = None) -> list[str]:
    """Apply, in order, the GEMM fusions, the kernel swaps, fp8, the attention backend and
    torch.compile in place.

    ``kernels``: "none" (eager PyTorch) or "triton" (the zimage:: ops; needs Triton and a GPU).
    ``attention``: one of ATTENTION_CHOICES ("auto" picks the fastest available and says which).
    ``fp8``: the blocks' attention and feed-forward linears in float8 e4m3 (``accel.fp8``), with
    ``fp8_fast_accum`` passed to the fp8 GEMM.
    ``compile``: "off" | "blocks" | "full" (``accel.compile``), with the shape policy ``shapes``
    ("dynamic": the sequence dim is symbolic, one graph for every caption length; or "static").
    With kernels or fp8, q|k|v and w1|w3 are first fused into one GEMM each (``accel.fusions``),
    so fp8 quantises one activation once per fusion (``fuse=False`` leaves them apart: streamed
    blocks, whose copies would carry the fused buffer and its views twice). fp8 always comes before
    compile; its activations are quantised by the Triton kernel where :func:`fp8_quantize_kernel` says.
    ``device``: where the model runs, when its weights rest elsewhere between runs (a pipeline with
    offload="model" keeps them in CPU memory and runs them on its GPU): the checks and choices are
    made for that device. None: the block streamer's device, else where the weights are.
    Returns the log lines, which are also logged once at INFO. Every argument is checked before
    the model is touched.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {list(KERNEL_CHOICES)}")
    canonical_name(attention)  # an unknown name fails first
    device = _device(transformer, device)
    if kernels == "triton":
        check_kernels_can_run(transformer, device)
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {list(COMPILE_MODES)}, got {compile!r}")
    if shapes not in SHAPE_POLICIES:
        raise ValueError(f"shapes must be one of {list(SHAPE_POLICIES)}, got {shapes!r}")
    if compile != "off":
        check_compile_supported(transformer, compile_backend, device=device)
    if fp8:
        check_fp8_supported(transformer, device)
    check_attention_backend(transformer, attention, device)  # all checked before anything is swapped
    lines = []
    if (kernels == "triton" or fp8) and fuse:
        qkv, ffn = fuse_projections_(transformer)
        if qkv or ffn:
            lines.append(f"fused GEMMs: q|k|v in {qkv} attention modules, w1|w3 in {ffn} feed-forwards")
    if kernels == "triton":
        lines += use_fused_kernels(transformer, device)
    if fp8:
        lines.append(quantize_fp8_(transformer, fast_accum=fp8_fast_accum,
                                   kernels=fp8_quantize_kernel(kernels, compile, device), device=device))
    lines.append(set_attention_backend(transformer, attention, device))
    if compile != "off":
        lines.append(compile_transformer_(transformer, compile, compile_backend, shapes))
    for line in lines:
        logger.info(line)
    return lines


def fp8_quantize_kernel(kernels: str, compile: str, device: torch.device) -> bool:
    """Whether fp8 quantises its activations with ``zimage::quantize_fp8_rows`` (one pass) rather than
    ``accel.fp8.quantize_rows`` (eager PyTorch: nine passes over each activation, with an fp32 copy).
    With the kernels always; without them too on a CUDA GPU where Triton imports, nothing compiles
    the blocks (compiled, Inductor fuses the eager code into one pass) and the kernel builds and runs
    (tried once on a small input; if not, a warning and the eager twin). The two give the same bits."""
    if kernels == "triton":
        return True
    if compile != "off" or device.type != "cuda" or triton_unavailable_reason() is not None:
        return False
    problem = quantizer_problem(device)  # not asked for: it must build and run here, or the eager twin stays
    if problem:
        logger.warning("fp8: the one-pass activation quantiser zimage::quantize_fp8_rows does not run here (%s); "
                       "using the eager PyTorch twin", problem)
    return problem is None


def quantizer_problem(device: torch.device) -> str | None:
    """Why ``zimage::quantize_fp8_rows`` does not build or run on ``device`` (tried on a 16 x 16 input),
    or None."""
    try:
        load_kernels()
        torch.ops.zimage.quantize_fp8_rows(torch.ones(16, 16, device=device, dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001 - a Triton that cannot build for this GPU, a missing op
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """Where ``model`` runs: ``device`` if given, else its block streamer's device (offload="blocks"),
    else where its weights are."""
    if device is not None:
        return torch.device(device)
    streamer = getattr(model, "block_streamer", None)
    if streamer is not None:
        return streamer.device
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def placement_problem(transformer: nn.Module, settings: dict, device: str | torch.device,
                      compile_backend: str | object = "inductor") -> str | None:
    """Why the accelerations applied to ``transformer`` (``settings``: a pipeline's kernels, attention,
    fp8, compile) cannot run on ``device``, where a move (``pipe.to``, ``enable_model_cpu_offload``)
    would run it (None if they can). An attention backend named explicitly is checked there ("auto"
    is chosen again after the move); the Triton kernels, fp8 (whose activations may go through a
    Triton kernel) and compile are checked as ``optimize`` would check them for that device."""
    from .fp8 import Float8Linear, quantize_rows

    device = torch.device(device)
    problems = []
    attention = canonical_name(settings.get("attention", "sdpa"))
    if attention not in ("sdpa", "auto"):
        try:
            check_attention_backend(transformer, attention, device)
        except AccelerationUnavailable as e:
            problems.append(f"{e}; pipe.optimize(attention='sdpa') first to move it")
    checks = []
    triton_quantizer = any(isinstance(m, Float8Linear) and m.quantize is not quantize_rows
                           for m in transformer.modules())
    if settings.get("kernels") == "triton" or triton_quantizer:
        checks.append(lambda: check_kernels_can_run(transformer, device))
    if settings.get("fp8"):
        checks.append(lambda: check_fp8_supported(transformer, device))
    if settings.get("compile", "off") != "off":
        checks.append(lambda: check_compile_supported(transformer, compile_backend, device=device))
    for check in checks:
        try:
            check()
        except AccelerationUnavailable as e:
            problems.append(f"{e} (reload the pipeline without it to run it there)")
    return "; ".join(problems) or None


def blocks_conflict(offload: str, settings: dict) -> str | None:
    """Why these settings (compile, fp8) cannot go with ``offload`` (None if they can). The Triton
    kernels can: their leaf twins adopt the blocks' parameters, and streamed blocks keep q|k|v and
    w1|w3 apart (``optimize(fuse=False)``)."""
    refused = [f"{k}={settings[k]!r}" for k in ("compile", "fp8") if settings.get(k) not in (None, "none", "off", False)]
    if offload == "blocks" and refused:
        return (f"offload='blocks' streams the DiT's blocks as they are loaded; {', '.join(refused)} would change or "
                f"compile them: use offload='none' (or 'text_encoder') with it")
    return None


class _Probe(nn.Module):
    """Stands for the DiT in the acceleration checks before its weights exist: one block linear
    (16 x 16) on the DiT's device, in its dtype: what the checks read."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__()
        block = nn.Module()
        block.attention = nn.Module()
        block.attention.to_q = nn.Linear(16, 16, bias=False, device=device, dtype=dtype)
        self.layers = nn.ModuleList([block])


def check_before_loading(dit_device, dtype, offload: str = "none", *, kernels: str = "none",
                         compile: str = "off", fp8: bool = False, cuda_graphs: bool = False,
                         vae_compile: bool = False, compile_backend: str | object = "inductor",
                         attention: str | None = None) -> None:
    """The checks of the asked accelerations that need only the DiT's device and the dtype, made
    before any weights are read or downloaded, so that a flag that cannot run here fails in seconds
    rather than after the load (Triton for the kernels and for compile on a GPU, bfloat16 support
    for compile, fp8 tensor cores, a CUDA device for graphs, conflicts with ``offload``, the
    attention backend's name and whether it can run here, at the released head dim 128). The
    transforms check the loaded model again. Raises :class:`AccelerationUnavailable` or ValueError."""
    from ..devices import resolve_device, resolve_dtype
    from .cuda_graphs import graphs_problem

    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {list(KERNEL_CHOICES)}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {list(COMPILE_MODES)}, got {compile!r}")
    device = resolve_device(dit_device)
    problem = (cuda_graphs and graphs_problem(device, offload)
               or blocks_conflict(offload, {"kernels": kernels, "compile": compile, "fp8": fp8}))
    if problem:
        raise ValueError(problem)
    if attention is not None and canonical_name(attention) != "auto":
        reason = unavailable_reason(attention, device, resolve_dtype(dtype, device, warn=False), 128)
        if reason is not None:
            raise AccelerationUnavailable(f"attention backend {canonical_name(attention)!r} is not available: {reason}")
    if kernels == "triton" or compile != "off" or fp8 or vae_compile:
        probe = _Probe(device, resolve_dtype(dtype, device, warn=False))
        if kernels == "triton":
            check_kernels_can_run(probe)
        if compile != "off":
            check_compile_supported(probe, compile_backend)
        if vae_compile:
            check_compile_supported(probe, compile_backend, "the VAE decode")
        if fp8:
            check_fp8_supported(probe)


def _dtype(module: nn.Module) -> str:
    param = next(module.parameters(), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "?"
