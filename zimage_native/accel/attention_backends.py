"""Attention backends for the DiT, behind the one seam of ``zimage_native.model.attention``.

Every DiT :class:`~zimage_native.model.transformer.Attention` module calls ``self.attn_fn(q, k, v,
mask)`` with q, k, v (B, H, L, Dh) and ``mask`` None or a (B, L) bool key mask (True = may be
attended). :func:`set_attention_backend` checks that the requested backend can run on the
model's device, dtype and head dim *when it is selected*, then sets ``attn_fn`` on each DiT
attention module (never on the VAE's, whose head dim is 512). Nothing is read from the
environment here except by :func:`attention_from_env`, which entry points call once.

    name          needs                                           masks (batch padding)
    sdpa          nothing (default; PyTorch picks flash/cuDNN/    bool mask to SDPA
                  memory-efficient)
    flash_attn_2  flash-attn 2, CUDA sm80+, fp16/bf16, Dh<=256    varlen: cu_seqlens, keys packed
                                                                  (flash_attn_varlen_func)
    flash_attn_3  flash-attn 3 (flash_attn_interface), sm90,      varlen: cu_seqlens + seqused_k
                  fp16/bf16, Dh<=256                              (flash_attn_varlen_func)
    sage          sageattention, CUDA sm80+, fp16/bf16,           not supported: masked calls use SDPA
                  Dh in {64, 96, 128}
    xformers      xformers, CUDA (bf16 from sm80)                 additive -inf bias, broadcast
    auto          the first available of flash_attn_3 > flash_attn_2 > sage > xformers > sdpa

Masks reach this seam only when a batch really mixes caption lengths (``model.sequence``): a
single-image request, with or without CFG, runs mask-free (the engine's shape policy,
docs/performance.md), so the flash kernels run on every call there. The mask-as-lengths
conversion relies on a property of ``model.sequence``: only batch padding is masked, and it is
always the tail of each item's keys, so the valid keys are a prefix. Both FlashAttention paths
take the lengths as a device tensor (no host sync, capturable in a CUDA graph): FA3's varlen call
gets cu_seqlens [0, L, 2L, ...] (every item keeps its L rows) and ``seqused_k`` = the valid key
counts; FA2's varlen call has no ``seqused_k``, so the valid keys are packed on the device
(:func:`pack_keys`, a permutation) and described by cu_seqlens_k.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable

import torch

from ._kernels import AccelerationUnavailable
from torch import nn

from ..model.attention import attention as sdpa_attention
from ..model.transformer import Attention

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

BACKENDS = ("sdpa", "flash_attn_2", "flash_attn_3", "sage", "xformers")
AUTO_PRIORITY = ("flash_attn_3", "flash_attn_2", "sage", "xformers", "sdpa")
ATTENTION_CHOICES = BACKENDS + ("auto",)
ALIASES = {"fa2": "flash_attn_2", "fa3": "flash_attn_3", "sageattention": "sage", "torch": "sdpa"}
ENV_VAR = "ZIMAGE_ATTENTION"

MODULES = {  # import names to try, in order
    "flash_attn_2": ("flash_attn",),
    "flash_attn_3": ("flash_attn_interface", "flash_attn_3.flash_attn_interface"),
    "sage": ("sageattention",),
    "xformers": ("xformers.ops",),
}
HALF = (torch.float16, torch.bfloat16)


def canonical_name(name: str) -> str:
    """'FA3' -> 'flash_attn_3'; raises ValueError for an unknown name."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(ATTENTION_CHOICES)}")
    return key


def attention_from_env(default: str = "sdpa") -> str:
    """The backend named by ZIMAGE_ATTENTION, else ``default``. Call it at entry points only."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return canonical_name(default)
    try:
        return canonical_name(value)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={value!r}: {e}") from None


# ---------------------------------------------------------------- availability (mocked in tests)
def _import(names: tuple[str, ...]) -> ModuleType | str:
    """The first importable module of ``names``, or why none is."""
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception as e:  # compiled extensions fail with ImportError, OSError, RuntimeError...
            errors.append(f"import {name}: {type(e).__name__}: {e}")
    return "; ".join(errors)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if backend ``name`` can run attention with these inputs, else the reason it cannot."""
    name = canonical_name(name)
    if name == "sdpa":
        return None
    if name == "auto":
        raise ValueError("'auto' is resolved by resolve_backend, not checked")
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA GPU; the model is on {device}"
    if name != "xformers" and dtype not in HALF:
        return f"supports float16/bfloat16 only; the model is {dtype} (use sdpa or xformers)"
    if getattr(torch.version, "hip", None) and name in ("flash_attn_3", "sage"):
        return ("needs an NVIDIA GPU (Hopper for flash_attn_3; SageAttention's kernels are CUDA only); this is a ROCm "
                "GPU, whose compute capability numbers are gfx versions")
    major_minor = _capability(device)
    if name == "flash_attn_2" and (major_minor < (8, 0) or head_dim > 256):
        return f"needs sm80+ and head dim <= 256; this is sm{major_minor[0]}{major_minor[1]}, head dim {head_dim}"
    if name == "flash_attn_3" and (major_minor[0] != 9 or head_dim > 256):
        return f"needs a Hopper GPU (sm90) and head dim <= 256; this is sm{major_minor[0]}{major_minor[1]}"
    if name == "xformers" and dtype == torch.bfloat16 and major_minor < (8, 0) and not getattr(torch.version, "hip",
                                                                                               None):
        return (f"takes bfloat16 from sm80 only (its CUTLASS and flash kernels); this is sm{major_minor[0]}"
                f"{major_minor[1]} (use sdpa)")
    if name == "sage" and (major_minor < (8, 0) or head_dim not in (64, 96, 128)):
        return (f"needs sm80+ and head dim 64, 96 or 128; this is sm{major_minor[0]}{major_minor[1]}, "
                f"head dim {head_dim}")
    module = _import(MODULES[name])
    return module if isinstance(module, str) else None


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    """(backend, log line). 'auto' picks by priority; an explicit backend that cannot run raises."""
    name = canonical_name(name)
    if name != "auto":
        reason = unavailable_reason(name, device, dtype, head_dim)
        if reason is not None:
            raise AccelerationUnavailable(f"attention backend {name!r} is not available: {reason}")
        return name, f"attention backend: {name}"
    skipped = []
    for candidate in AUTO_PRIORITY:
        reason = unavailable_reason(candidate, device, dtype, head_dim)
        if reason is None:
            why = f" (skipped {'; '.join(skipped)})" if skipped else ""
            return candidate, f"attention backend: auto -> {candidate}{why}"
        skipped.append(f"{candidate}: {reason}")
    raise AssertionError("sdpa is always available")


# ---------------------------------------------------------------- the backends
def _key_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) prefix key mask -> (B,) int32 valid-key counts, on the device (no host sync)."""
    return mask.sum(-1, dtype=torch.int32)


def pack_keys(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """(B, L, H, Dh) keys and values with a (B, L) prefix key mask -> the packed varlen layout.

    Returns (k, v) of (B*L, H, Dh) with the valid keys of item i at rows cu_seqlens_k[i] ...
    cu_seqlens_k[i+1] (the masked keys after all of them), and cu_seqlens_k (B+1,) int32. A
    device-side permutation (index_copy_): no host sync, the shapes do not depend on the mask.
    """
    b, n = mask.shape
    lengths = _key_lengths(mask)
    cu_seqlens_k = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    flat = mask.flatten()
    packed = (cu_seqlens_k[:-1, None] + torch.arange(n, device=mask.device)).flatten()
    tail = cu_seqlens_k[-1] + torch.cumsum((~flat).to(torch.int64), 0) - 1
    dest = torch.where(flat, packed, tail)
    k2, v2 = k.flatten(0, 1), v.flatten(0, 1)
    return (torch.empty_like(k2).index_copy_(0, dest, k2), torch.empty_like(v2).index_copy_(0, dest, v2),
            cu_seqlens_k)


def _flash_attn_2() -> AttnFn:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    def flash_attn_2(q, k, v, mask=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, Dh): FlashAttention's layout
        if mask is None:
            out = flash_attn_func(q, k, v)
        else:  # varlen: every item keeps its L query rows; its valid keys packed (cu_seqlens_k)
            b, n = q.shape[:2]
            cu_seqlens_q = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
            kp, vp, cu_seqlens_k = pack_keys(k, v, mask)
            out = flash_attn_varlen_func(q.flatten(0, 1), kp, vp, cu_seqlens_q, cu_seqlens_k, n, n)
            out = out.unflatten(0, (b, n))
        return out.transpose(1, 2)

    return flash_attn_2


def _flash_attn_3() -> AttnFn:
    fa3 = _import(MODULES["flash_attn_3"])

    def flash_attn_3(q, k, v, mask=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if mask is None:
            out = fa3.flash_attn_func(q, k, v)
        else:  # varlen: item i is rows [i*L, (i+1)*L) of the flat batch, of which the first len_i keys count
            b, n = q.shape[:2]
            cu_seqlens = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
            out = fa3.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens,
                                             cu_seqlens, n, n, seqused_k=_key_lengths(mask))
            out = (out[0] if isinstance(out, tuple) else out).unflatten(0, (b, n))
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        return out.transpose(1, 2)

    return flash_attn_3


def _sage() -> AttnFn:
    from sageattention import sageattn

    def sage(q, k, v, mask=None):
        if mask is not None:  # SageAttention has no key mask: batches with caption padding use SDPA
            return sdpa_attention(q, k, v, mask)
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)

    return sage


def _xformers() -> AttnFn:
    import xformers.ops as xops

    def xformers(q, k, v, mask=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, Dh)
        bias = None
        if mask is not None:
            b, n_keys = mask.shape
            padded = -(-n_keys // 8) * 8  # xFormers wants the bias rows allocated in multiples of 8
            bias = torch.zeros(b, 1, 1, padded, dtype=q.dtype, device=q.device)[..., :n_keys]
            # in place: an out-of-place masked_fill would return a compact copy (row stride n_keys)
            bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
            bias = bias.expand(b, q.shape[2], q.shape[1], n_keys)  # broadcast over heads and queries
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)

    return xformers


# ---------------------------------------------------------------- SDPA with its math path only
#: fp32 score bytes one SDPA call may hold where PyTorch has only its math path (:func:`sdpa_math_only`).
MATH_SCORE_BUDGET = 256 * 2**20


def sdpa_math_only(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why PyTorch's SDPA has only its math path for these inputs (None if a fused kernel takes them):
    on a CUDA GPU below sm80 in bfloat16, its flash, memory-efficient (CUTLASS) and cuDNN kernels do
    not take bfloat16. The math path holds the (B, H, Lq, Lk) scores in fp32 and its softmax as
    much again: 5.09 GB for one DiT attention call at 1024x1024 (4224 tokens; measured on the CPU's
    math path, docs/performance.md)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype != torch.bfloat16 or getattr(torch.version, "hip", None):
        return None
    major, minor = _capability(device)
    if (major, minor) >= (8, 0):
        return None
    return (f"sm{major}{minor} in bfloat16: SDPA's fused kernels take bfloat16 from sm80 only, so its math path "
            f"runs; the queries go in slices of at most {MATH_SCORE_BUDGET // 2**20} MiB of fp32 scores")


def bounded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over slices of the queries, each holding at most :data:`MATH_SCORE_BUDGET` bytes of fp32
    scores. Query rows do not interact, so the result is SDPA's."""
    b, h, n_queries = q.shape[:3]
    rows = max(1, MATH_SCORE_BUDGET // (b * h * k.shape[2] * 4))
    if rows >= n_queries:
        return sdpa_attention(q, k, v, mask)
    return torch.cat([sdpa_attention(part, k, v, mask) for part in q.split(rows, dim=2)], dim=2)


def fit_sdpa_(model: nn.Module, device: torch.device) -> str | None:
    """Give every attention module of ``model`` (the DiT's, the ControlNet's or the VAE's) that uses
    SDPA the variant for ``device``, where it runs: :func:`bounded_sdpa` where SDPA has only its math
    path, else plain SDPA. Other backends are left alone. Returns a log line when it bounds any."""
    bounded = 0
    for module in model.modules():
        if getattr(module, "attn_fn", None) not in (sdpa_attention, bounded_sdpa):
            continue
        norm = getattr(module, "norm_q", None)  # the DiT's compute dtype (to_q may be packed or fp8)
        reason = sdpa_math_only(device, (norm if norm is not None else module.to_q).weight.dtype)
        module.attn_fn = bounded_sdpa if reason else sdpa_attention
        bounded += reason is not None
    if not bounded:
        return None
    return f"attention: {bounded} {type(model).__name__} attention modules bounded ({reason})"


FACTORIES: dict[str, Callable[[], AttnFn]] = {
    "sdpa": lambda: sdpa_attention,
    "flash_attn_2": _flash_attn_2,
    "flash_attn_3": _flash_attn_3,
    "sage": _sage,
    "xformers": _xformers,
}
NOTES = {"sage": " (masked batches fall back to sdpa: SageAttention has no key mask)"}
_made: dict[Callable[[], AttnFn], AttnFn] = {}  # factory -> the one function it made in this process


def attention_function(backend: str) -> AttnFn:
    """Backend ``backend``'s attention function, made by its factory once per process: installing the
    same backend again installs the same function object, so ``ZImagePipeline.optimize`` sees it in
    place and keeps the compiled blocks and the captured CUDA graphs. FlashAttention, Sage and
    xFormers build a closure over their library; a new one at each install made
    optimize(attention="auto") where auto picks the backend already there undo compile, compile
    again and capture the graphs again. Keyed by the factory: a replaced factory (a test's
    stand-in) makes its own."""
    factory = FACTORIES[backend]
    if factory not in _made:
        _made[factory] = factory()
    return _made[factory]


# ---------------------------------------------------------------- installing on a model
def dit_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The DiT's attention modules (eager or fused); never the VAE's single-head attention."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def backend_in_place(model: nn.Module) -> str | None:
    """The name of the backend every DiT attention module of ``model`` runs ("sdpa" for SDPA and its
    bounded variant), or None: no such modules, several backends, or a function no backend here made."""
    functions = {module.attn_fn for module in dit_attention_modules(model)}
    if len(functions) != 1:
        return None
    fn = functions.pop()
    if fn in (sdpa_attention, bounded_sdpa):
        return "sdpa"
    return next((name for name, factory in FACTORIES.items() if _made.get(factory) is fn), None)


def check_attention_backend(model: nn.Module, name: str = "sdpa",
                            device: torch.device | None = None) -> tuple[str, str]:
    """Resolve ``name`` for this model's device (``device``: where it runs, if not where its weights
    are, see :func:`_run_device`), dtype and head dim without changing the model.

    Returns (backend, log line); raises RuntimeError when an explicitly named backend cannot run.
    """
    modules = dit_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no DiT attention modules to set a backend on")
    head_dim = modules[0].to_q.weight.shape[0] // modules[0].n_heads
    # The compute dtype from the q norm: to_q.weight may be packed GGUF bytes (uint8) or fp8.
    backend, line = resolve_backend(name, _run_device(model, device), modules[0].norm_q.weight.dtype, head_dim)
    return backend, line + NOTES.get(backend, "")


def _run_device(model: nn.Module, device: torch.device | None = None) -> torch.device:
    """Where the DiT's attention runs: ``device`` if given (a pipeline with offload="model" keeps the
    weights in CPU memory between runs and runs them on its GPU); with offload="blocks" the block
    weights rest on the CPU and run on the streamer's device; else where the weights are."""
    if device is not None:
        return torch.device(device)
    streamer = getattr(model, "block_streamer", None)
    return streamer.device if streamer is not None else dit_attention_modules(model)[0].norm_q.weight.device


def set_attention_backend(model: nn.Module, name: str = "sdpa", device: torch.device | None = None) -> str:
    """Check and install backend ``name`` on every DiT attention module, for the device it runs on
    (``device``, see :func:`_run_device`); returns the log line."""
    backend, line = check_attention_backend(model, name, device)
    fn = attention_function(backend)
    for module in dit_attention_modules(model):
        module.attn_fn = fn
    bounded = fit_sdpa_(model, _run_device(model, device)) if backend == "sdpa" else None
    return line + (f"; {bounded}" if bounded else "")
