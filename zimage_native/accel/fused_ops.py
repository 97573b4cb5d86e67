"""Triton twins of the DiT's leaf modules: each ``zimage::`` op replaces exactly one leaf.

The block is written once, in ``zimage_native.model.transformer``, from the leaves of
``zimage_native.model.layers``. A swap replaces every module of exactly one leaf type by its
twin, which *adopts* the original parameter (by reference, not by value), so parameter names,
``state_dict()`` keys and everything around the leaf are unchanged (Liger-Kernel's pattern):

    leaf (model.layers)   twin                     op
    RMSNorm               TritonRMSNorm            zimage::rms_norm
    ModulatedRMSNorm      TritonModulatedRMSNorm   zimage::rms_norm with the (1 + scale)
    PostNormResidual      TritonPostNormResidual   zimage::gated_rms_norm_residual
    QKNormRoPE            TritonQKNormRoPE         zimage::qk_norm_rope
    SwiGLU                TritonSwiGLU             zimage::silu_mul

The ops must be registered first (``load_kernels()``); the twins call them through ``torch.ops``.

Packed GGUF layers (``quant_linear.GGUFLinear`` / ``GGUFEmbedding``) keep their class: their
``dequantizer`` attribute, the torch twin ``formats.ggml.dequantize`` by default, is set to
:func:`triton_dequantize` (``zimage::dequantize_ggml``, the same bits), and set back by
:func:`use_torch_dequant_`. The same for an fp8 file's layers (``quant_linear.FP8StoredLinear``):
:func:`triton_dequantize_fp8` (``zimage::dequantize_fp8``) in place of ``formats.fp8.dequantize_rows``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.fp8 import dequantize_rows
from ..formats.ggml import dequantize
from ..model.layers import ModulatedRMSNorm, PostNormResidual, QKNormRoPE, RMSNorm, Rope, SwiGLU
from ..quant_linear import FP8StoredLinear, GGUFEmbedding, GGUFLinear
from ._kernels import AccelerationUnavailable, load_kernels


class TritonRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.zimage.rms_norm(x, self.weight, self.eps, None)


class TritonModulatedRMSNorm(ModulatedRMSNorm):
    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.zimage.rms_norm(x, self.weight, self.eps, scale)


class TritonPostNormResidual(PostNormResidual):
    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.zimage.gated_rms_norm_residual(x, y, self.weight, self.eps, gate)


class TritonQKNormRoPE(QKNormRoPE):
    def forward(self, q: torch.Tensor, k: torch.Tensor, norm_q: RMSNorm, norm_k: RMSNorm,
                rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        if norm_q.eps != norm_k.eps:
            raise ValueError(f"zimage::qk_norm_rope takes one eps; norm_q has {norm_q.eps}, norm_k {norm_k.eps}")
        return torch.ops.zimage.qk_norm_rope(q, k, norm_q.weight, norm_k.weight, *rope, norm_q.eps)


class TritonSwiGLU(SwiGLU):
    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.ops.zimage.silu_mul(gate, up)


# leaf type -> (twin type, op), in the order the swaps are applied and reported
TWINS: dict[type, tuple[type, str]] = {
    RMSNorm: (TritonRMSNorm, "zimage::rms_norm"),
    ModulatedRMSNorm: (TritonModulatedRMSNorm, "zimage::rms_norm"),
    PostNormResidual: (TritonPostNormResidual, "zimage::gated_rms_norm_residual"),
    QKNormRoPE: (TritonQKNormRoPE, "zimage::qk_norm_rope"),
    SwiGLU: (TritonSwiGLU, "zimage::silu_mul"),
}


def twin_of(leaf: nn.Module, twin: type) -> nn.Module:
    """A ``twin`` module sharing ``leaf``'s parameter (same Parameter object) and settings."""
    if isinstance(leaf, RMSNorm):
        with torch.device("meta"):
            new = twin(leaf.weight.shape[0], leaf.eps)
        new.weight = leaf.weight
        return new
    return twin()


def swap_leaf_(model: nn.Module, leaf: type) -> int:
    """Replace every submodule of exactly type ``leaf`` by its Triton twin; returns how many."""
    twin = TWINS[leaf][0]
    targets = [name for name, m in model.named_modules() if type(m) is leaf and name]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, twin_of(getattr(parent, child), twin))  # ModuleList children: by index name
    return len(targets)


def count_fused(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{leaf name: (swapped, total)} over the model."""
    types = [type(m) for m in model.modules()]
    return {leaf.__name__: (types.count(twin), types.count(twin) + types.count(leaf))
            for leaf, (twin, _) in TWINS.items()}


def check_kernels_can_run(model: nn.Module, device: torch.device | None = None) -> None:
    """Import the kernels (registering the ops) and check the device the model runs on (``device``;
    None: where its weights are); raises RuntimeError."""
    kernels = load_kernels()
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else param.device if param is not None else None
    if device is not None and device.type != "cuda" and not kernels.INTERPRETED:
        raise AccelerationUnavailable(
            f"kernels='triton' runs on a CUDA (or ROCm) GPU, but the transformer is on {device}; use "
            "kernels='none' there (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for tests)"
        )


def use_fused_kernels(model: nn.Module, device: torch.device | None = None) -> list[str]:
    """Swap every leaf for its Triton twin in place; returns one log line per leaf type.

    Raises RuntimeError (before touching the model) when Triton is missing, or when the model does
    not run on a CUDA device (``device``; None: where its weights are) and the kernels were not built
    by the CPU interpreter.
    """
    check_kernels_can_run(model, device)
    for leaf in TWINS:
        swap_leaf_(model, leaf)
    counts = count_fused(model)
    lines = [f"kernels: {fused}/{total} {name} -> {TWINS_BY_NAME[name]}" for name, (fused, total) in counts.items()]
    return lines + use_triton_dequant_(model)


TWINS_BY_NAME = {leaf.__name__: op for leaf, (_, op) in TWINS.items()}


# ------------------------------------------------------------------ packed GGUF layers

PACKED = (GGUFLinear, GGUFEmbedding, FP8StoredLinear)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_state = {"kernel_types": (), "interpreted": False}  # filled by use_triton_dequant_ (after load_kernels)


def triton_dequantize(raw: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """``formats.ggml.dequantize`` through ``zimage::dequantize_ggml`` where there is a kernel for the
    type and dtype (fp32, bf16, fp16) and the rows are on a GPU (or the kernels are interpreted);
    otherwise the torch twin (float types, a CPU tensor without the interpreter). Same bits either way."""
    if qtype in _state["kernel_types"] and dtype in OUT_DTYPES and (raw.is_cuda or _state["interpreted"]):
        lead = raw.shape[:-1]
        return torch.ops.zimage.dequantize_ggml(raw.reshape(-1, raw.shape[-1]), qtype, dtype).reshape(*lead, -1)
    return dequantize(raw, qtype, dtype)


def triton_dequantize_fp8(raw: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """``formats.fp8.dequantize_rows`` through ``zimage::dequantize_fp8`` for rows on a GPU (or with
    the kernels interpreted) and an fp32, bf16 or fp16 output; otherwise the torch twin. Same bits."""
    if dtype in OUT_DTYPES and (raw.is_cuda or _state["interpreted"]):
        return torch.ops.zimage.dequantize_fp8(raw, scale, fp8_dtype == torch.float8_e5m2, dtype)
    return dequantize_rows(raw, fp8_dtype, scale, dtype)


def _kernel_for(m: nn.Module):
    return triton_dequantize_fp8 if isinstance(m, FP8StoredLinear) else triton_dequantize


def _on_kernel(m: nn.Module) -> bool:
    """Whether a packed layer dequantises with its kernel (GGML types without one stay on the twin)."""
    return m.dequantizer is _kernel_for(m) and (isinstance(m, FP8StoredLinear) or m.qtype in _state["kernel_types"])


def count_dequant(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{packed layer type: (layers dequantising with the kernel, all of them)}, for types present."""
    out = {}
    for kind in PACKED:
        layers = [m for m in model.modules() if type(m) is kind]
        if layers:
            out[kind.__name__] = (sum(1 for m in layers if _on_kernel(m)), len(layers))
    return out


def use_triton_dequant_(model: nn.Module) -> list[str]:
    """Make every packed GGUF layer dequantise with ``zimage::dequantize_ggml``; one log line per layer
    type present (none for a model without packed layers). Types without a kernel stay on the torch twin."""
    kernels = load_kernels()
    _state["kernel_types"], _state["interpreted"] = tuple(kernels.DEQUANT_TYPES), kernels.INTERPRETED
    for m in model.modules():
        if type(m) in PACKED:
            m.dequantizer = _kernel_for(m)
    op = {"FP8StoredLinear": "zimage::dequantize_fp8"}
    return [f"kernels: {fused}/{total} {name} -> {op.get(name, 'zimage::dequantize_ggml')}" for name, (fused, total) in
            count_dequant(model).items()]


def use_torch_dequant_(model: nn.Module) -> int:
    """Undo :func:`use_triton_dequant_`: every packed layer back on the torch twin; returns how many."""
    layers = [m for m in model.modules() if type(m) in PACKED and "dequantizer" in vars(m)]
    for m in layers:
        del m.dequantizer  # the class attribute, formats.ggml.dequantize, shows through again
    return len(layers)
