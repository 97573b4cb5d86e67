"""fp8 (float8 e4m3) linears for the DiT's large projections.

Weights are quantised once with one scale per output row (amax / 448); activations are quantised
on the fly with one scale per token. The matmul is ``torch._scaled_mm`` (fp8 tensor cores on
Hopper and Ada, sm89+; PyTorch also has a CPU implementation, which the tests use), with the
output in the activation dtype. ``torch._scaled_mm`` is used directly rather than torchao: it is
one call, it is in every PyTorch the engine supports, and it needs no extra dependency.

The per-token activation quantisation is one pass: the Triton kernel ``zimage::quantize_fp8_rows``
(``kernels/quantize_fp8.py``) where ``accel.fp8_quantize_kernel`` chooses it (the kernels on, or a
CUDA GPU with nothing compiled), else :func:`quantize_rows` in PyTorch (which compile fuses).
The fused q|k|v and w1|w3 GEMMs (``accel.fusions``) stay fused: the fused weight is quantised as
one matrix (its rows keep their own scales), so one activation is quantised once per fusion, and
the original linears become fp8 views of it (same names, no extra memory). The layers a file keeps
stored (:data:`STORED`: an fp8 file's ``FP8StoredLinear``, a ComfyUI comfy_quant file's int8
``Int8StoredLinear`` and nvfp4 / mxfp8 ``BlockScaledLinear``), which ``fuse_projections_`` leaves
apart, are converted and fused here: e4m3 values and scales as they are, int8, e5m2, nvfp4 and
mxfp8 values dequantised in fp32 and quantised per row as a bf16 weight is, stacked into one fp8
GEMM the same way, in any mix.

The slow twin is :meth:`Float8Linear.reference`: it quantises the activation by its own code (in
float64) and multiplies the dequantised values in fp64. Only the attention and feed-forward
linears inside the blocks are converted; the embedders, the final layer and the adaLN projections
stay in bf16 (they are small and sensitive). fp8 is lossy: every speed number with fp8 is reported
with an image-quality number against bf16.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import nn

from ..model.layers import FeedForward
from ..model.transformer import Attention
from ..quant_linear import BlockScaledLinear, FP8StoredLinear, GGUFLinear, ScaledStoredLinear
from ._kernels import AccelerationUnavailable
from .fusions import FusedLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_CAPABILITY = (8, 9)  # Ada (sm89) and Hopper (sm90) have fp8 tensor cores

#: A file's layers held as stored (fp8, int8, nvfp4, mxfp8), which fp8 converts as their dequantised weights.
STORED = (ScaledStoredLinear, BlockScaledLinear)

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> fp8 values and fp32 scales (M, 1) with x ~= q * scale, one scale per row."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.lru_cache(maxsize=None)
def cpu_rowwise_scaled_mm() -> bool:
    """Whether this PyTorch's CPU ``torch._scaled_mm`` takes per-row scales (2.13 does; 2.11's CPU
    implementation takes per-tensor scales only and fails an internal assert otherwise)."""
    a = torch.ones(16, 16).to(FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def check_fp8_supported(model: nn.Module, device: torch.device | None = None) -> None:
    """fp8 GEMMs need fp8 tensor cores on a GPU (sm89+) and a bfloat16 DiT there; the CPU path (for
    tests and dry runs) needs a PyTorch whose CPU ``_scaled_mm`` takes per-row scales. ``device``:
    where the model runs (None: where its weights are). Raises clearly."""
    param = next(model.parameters(), None)
    if param is None:
        return
    packed = gguf_problem(model)
    if packed:
        raise AccelerationUnavailable(packed)
    device = torch.device(device) if device is not None else param.device
    if device.type == "cpu" and cpu_fp8_problem():
        raise AccelerationUnavailable(cpu_fp8_problem())
    if device.type != "cuda":
        return
    dtypes = {m.weight.dtype for name, m in model.named_modules() if type(m) is nn.Linear and _in_block(name)}
    if any(isinstance(m, STORED) and _in_block(name) for name, m in model.named_modules()):
        dtypes.add(param.dtype)  # a file's stored layers (fp8, int8) compute in the model's dtype
    problem = gpu_fp8_problem(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device), dtypes)
    if problem:
        raise AccelerationUnavailable(problem)


def gguf_problem(model: nn.Module) -> str | None:
    """Why fp8 would change nothing in this DiT (None if it converts its blocks): GGUF-packed block
    linears (``quant_linear.GGUFLinear``) have no fp8 form here, so they would stay packed and run as
    without fp8, silently."""
    packed: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, GGUFLinear) and _in_block(name):
            packed[m.qtype] = packed.get(m.qtype, 0) + 1
    if not packed:
        return None
    types = ", ".join(f"{n} {qtype}" for qtype, n in sorted(packed.items()))
    return (f"fp8 converts the blocks' bf16, fp16 or fp32 linears (or a file's fp8 or int8 ones); this DiT's block "
            f"linears are GGUF-packed ({types}) and would run as they do without fp8. Run without fp8 (the GGUF file "
            f"already keeps the DiT small), or load a bf16, fp8 or int8 (comfy_quant) DiT to use fp8")


def cpu_fp8_problem() -> str | None:
    """Why fp8 cannot run on the CPU (None if it can, slowly: for tests and dry runs)."""
    if cpu_rowwise_scaled_mm():
        return None
    return (f"fp8 on the CPU needs a PyTorch whose CPU torch._scaled_mm takes per-row scales (2.13 does; this is "
            f"{torch.__version__}); fp8 is meant for GPUs with fp8 tensor cores (Ada, Hopper, Blackwell)")


def gpu_fp8_problem(capability: tuple[int, int], name: str, dtypes: set[torch.dtype]) -> str | None:
    """Why fp8 cannot run on this GPU (None if it can): fp8 tensor cores need compute capability 8.9 or
    newer, and PyTorch's per-row scaled fp8 GEMM writes bfloat16 only (float16 never; float32 only
    through cuBLAS on some Hopper builds), so the block linears must be bfloat16."""
    major, minor = capability
    if getattr(torch.version, "hip", None):  # ROCm reports gfx numbers (9.4: MI300), not CUDA capabilities
        return (f"fp8 here is CUDA's float8 e4m3fn with the per-row scaled GEMM; {name} is a ROCm GPU (MI300's fp8 "
                f"is the e4m3fnuz format), which this engine does not support for fp8. Run without fp8")
    if (major, minor) < MIN_CAPABILITY:
        return (f"fp8 needs a GPU with fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
                f"{name} is sm{major}{minor}. Run without fp8 on this GPU")
    other = sorted(str(d).removeprefix("torch.") for d in dtypes if d != torch.bfloat16)
    if other:
        return (f"fp8 on a GPU needs the DiT in bfloat16 (the per-row scaled fp8 GEMM writes bfloat16 only); its "
                f"linears are {', '.join(other)}: load it with dtype bfloat16 (--dtype bfloat16)")
    return None


class Float8Linear(nn.Module):
    """y = x W^T + b with W in fp8 (per-row scales) and x quantised per token. (..., K) -> (..., N).

    ``persistent=False`` keeps the buffers out of ``state_dict()`` (the fused GEMMs, whose
    weights are also held, as views, by the checkpoint-named linears).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 fast_accum: bool = True, quantize: Quantizer = quantize_rows, persistent: bool = True):
        super().__init__()
        self.register_buffer("weight", weight, persistent=persistent)  # (N, K) float8_e4m3fn
        self.register_buffer("weight_scale", scale, persistent=persistent)  # (N, 1) fp32
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.fast_accum = fast_accum
        self.quantize = quantize

    @classmethod
    def from_linear(cls, linear: nn.Module, **kwargs) -> "Float8Linear":
        """From an ``nn.Linear`` (quantised per row), or from a file's stored layer
        (:data:`STORED`): an fp8 file's e4m3 values and their scales as they are,
        with no second rounding and no copy; e5m2, int8, nvfp4 or mxfp8 values dequantised in fp32 and
        quantised per row as an ``nn.Linear``'s weight is."""
        if isinstance(linear, FP8StoredLinear) and linear.fp8_dtype == FP8:
            return cls(linear.values(), linear.scale, linear.bias, **kwargs)
        weight = linear.dequantize(torch.float32) if isinstance(linear, STORED) else linear.weight.detach()
        weight, scale = quantize_rows(weight)
        return cls(weight, scale, getattr(linear, "bias", None), **kwargs)

    @classmethod
    def stack(cls, layers: list["Float8Linear"], **kwargs) -> "Float8Linear":
        """Bias-free layers on one input as one layer: their rows, each with its own scale, in order."""
        return cls(torch.cat([m.weight for m in layers]), torch.cat([m.weight_scale for m in layers]), None, **kwargs)

    def view(self, start: int, stop: int) -> "Float8Linear":
        """Rows start:stop of this layer, sharing its storage (the checkpoint-named parts of a fusion)."""
        return Float8Linear(self.weight[start:stop], self.weight_scale[start:stop], None, self.fast_accum,
                            self.quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = self.quantize(x.reshape(-1, shape[-1]))
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.t(),
                               bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype,
                               use_fast_accum=self.fast_accum)
        return out.reshape(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The slow twin of forward: its own per-token quantisation in float64, dequantised GEMM in fp64."""
        x64 = x.reshape(-1, x.shape[-1]).double()
        amax = torch.max(x64.abs(), dim=1, keepdim=True).values
        scale = torch.where(amax > 1e-12, amax, torch.full_like(amax, 1e-12)) / 448.0
        xq = torch.clamp(x64 / scale, -448.0, 448.0).to(FP8).double() * scale
        w = self.weight.double() * self.weight_scale.double()
        out = xq @ w.t()
        if self.bias is not None:
            out = out + self.bias.double()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


# The fusions of a file's stored layers: module type -> (fused attribute, the linears it stacks).
_STORED = {Attention: ("to_qkv", ("to_q", "to_k", "to_v")), FeedForward: ("w13", ("w1", "w3"))}


def _in_block(name: str) -> bool:
    """The big GEMMs inside the blocks: attention q/k/v/out and the feed-forward projections (of the
    DiT's blocks and of the ControlNet branch's, which are DiT blocks)."""
    in_block = name.startswith(("layers.", "noise_refiner.", "context_refiner.", "control_layers.",
                                "control_noise_refiner."))
    return in_block and "adaLN" not in name and (".attention." in name or ".feed_forward." in name)


def _eligible(module: nn.Module) -> bool:
    return module.in_features % 16 == 0 and module.out_features % 16 == 0  # _scaled_mm needs multiples of 16


def fp8_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The bytes of ``model`` (built on meta, its floating tensors to be read in ``dtype``) once
    :func:`quantize_fp8_` has converted it: the blocks' eligible linears one byte a value and an fp32
    scale a row (``footprint.scaled_rows_bytes``; a fused GEMM's matrix is its parts' rows), the rest
    in ``dtype``. Weighs a ControlNet branch before it is read, which the DiT's fp8 converts after."""
    from ..footprint import scaled_rows_bytes

    total = 0
    for name, module in model.named_modules():
        converted = type(module) is nn.Linear and _in_block(name) and _eligible(module)
        for key, t in (*module._parameters.items(), *module._buffers.items()):
            if t is None:
                continue
            if converted and key == "weight":
                total += scaled_rows_bytes(tuple(t.shape))
            else:
                total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total


def quantize_fp8_(transformer: nn.Module, fast_accum: bool = True, kernels: bool = False,
                  device: torch.device | None = None) -> str:
    """Replace the blocks' linears (and fused GEMMs) by :class:`Float8Linear` in place; returns the log line.

    A fused GEMM (``accel.fusions.FusedLinear``), or the q|k|v / w1|w3 of a file's stored layers
    (fp8 or int8), becomes one fp8 matrix and the linears it fuses become fp8 views of it (see
    :func:`_fusions`). ``kernels=True`` quantises activations with the Triton kernel (on ``device``,
    where the model runs; None: where its weights are). The log line counts the linears converted
    and those kept: ``nn.Linear`` s in the model's dtype, and a file's stored layers left as they are
    (a LoRA side path on them, outside the blocks, or a width fp8 cannot take) by storage.
    """
    quantize = quantize_rows
    if kernels:
        from .fused_ops import check_kernels_can_run

        check_kernels_can_run(transformer, device)
        quantize = torch.ops.zimage.quantize_fp8_rows
    options = dict(fast_accum=fast_accum, quantize=quantize)
    deferred: set[str] = set()
    converted, kept, fused, stored = _convert(transformer, options, deferred)
    transformer.__dict__["_zimage_fp8"] = (options, deferred)  # for requantize_fp8_ after an unload_lora
    dtype = next((p.dtype for p in transformer.parameters()), None)
    accum = "fast accumulation" if fast_accum else "fp32 accumulation"
    held = [f"{kept} kept in {str(dtype).removeprefix('torch.')}"] if kept or not stored else []
    if stored:
        held.append(f"{sum(stored.values())} kept as stored layers ("
                    + ", ".join(f"{kind} {n}" for kind, n in sorted(stored.items())) + "; dequantised per call)")
    return (f"fp8: {converted} linears in float8 e4m3 ({fused} as fused GEMMs, {accum}, activations quantised by "
            f"{'zimage::quantize_fp8_rows' if kernels else 'PyTorch'}), {', '.join(held)}")


def fp8_applied(transformer: nn.Module) -> bool:
    """Whether :func:`quantize_fp8_` has quantised this DiT."""
    return "_zimage_fp8" in transformer.__dict__


def fp8_waiting(transformer: nn.Module) -> list[str]:
    """What fp8 left undone in a DiT it quantised, for LoRA side paths that are gone now (after
    ``unload_lora``): the block linears of a file still held as stored layers (fp8 or int8;
    weight-only, dequantised per call), and the modules whose q|k|v or w1|w3 are not one fp8 GEMM yet, that
    :func:`requantize_fp8_` converts. Empty for a DiT fp8 has not quantised."""
    record = transformer.__dict__.get("_zimage_fp8")
    if record is None:
        return []
    modules = dict(transformer.named_modules())
    fusions = [name for name in sorted(record[1])
               if not any(getattr(getattr(modules[name], n), "lora", None) for n in _STORED[type(modules[name])][1])]
    return fusions + [name for name, m in modules.items()
                      if isinstance(m, STORED) and not m.lora and _in_block(name) and _eligible(m)]


def requantize_fp8_(transformer: nn.Module) -> str | None:
    """Convert what :func:`fp8_waiting` names as :func:`quantize_fp8_` converted the rest (same
    options; q|k|v and w1|w3 stacked into one fp8 GEMM from the same values and scales), so that
    after ``unload_lora`` the DiT is the one fp8 makes without a LoRA: the same modules and the same
    results, bit for bit. Returns the log line, or None if there was nothing to do. A compiled DiT
    must be uncompiled first (``accel.compile.uncompile_``) and compiled again after."""
    if not fp8_waiting(transformer):
        return None
    options, deferred = transformer.__dict__["_zimage_fp8"]
    converted, _, fused, _ = _convert(transformer, options, deferred)
    return (f"fp8: {converted} linears freed of their LoRA side paths now in float8 e4m3 ({fused} fused GEMMs "
            f"made)")


def _convert(transformer: nn.Module, options: dict, deferred: set[str]
             ) -> tuple[int, int, int, dict[str, int]]:
    """The conversion of :func:`quantize_fp8_`: (linears converted, ``nn.Linear`` s kept, fused GEMMs
    made, a file's stored layers kept by storage). The q|k|v or w1|w3 fusions of a file's stored
    layers that a LoRA side path holds apart are added to ``deferred`` (module names), and those named
    there whose parts are free of side paths now are made, from their parts as fp8 converted them
    (the same values and scales)."""
    converted = kept = fused = 0
    stored_kept: dict[str, int] = {}
    for name, module in list(transformer.named_modules()):
        parts_of = {}
        fusions = _fusions(module)
        stored = _STORED.get(type(module))
        if stored and name in deferred and getattr(module, stored[0]) is None:
            sources = [(n, getattr(module, n)) for n in stored[1]]
            if not any(getattr(m, "lora", None) for _, m in sources):
                fusions.append((stored[0], sources))
                deferred.discard(name)
        for attr, sources in fusions:
            full = f"{name}.{attr}" if name else attr
            if not (_in_block(full) and all(_eligible(s) for _, s in sources)):
                continue
            parts = [source if isinstance(source, Float8Linear) else Float8Linear.from_linear(source, **options)
                     for _, source in sources]
            fp8 = Float8Linear.stack(parts, persistent=False, **options)
            setattr(module, attr, fp8)
            start = 0
            for (source_name, source), part in zip(sources, parts):
                parts_of[source_name] = fp8.view(start, start + part.out_features)
                start += part.out_features
            fused += 1
        if stored and getattr(module, stored[0]) is None and _in_block(f"{name}.{stored[0]}"):
            sources = [getattr(module, n) for n in stored[1]]
            if _stored_fusion(sources) and all(_eligible(m) for m in sources) and any(
                    getattr(m, "lora", None) for m in sources):
                deferred.add(name)  # one fp8 GEMM once the side paths are gone (requantize_fp8_)
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if child_name in parts_of:
                setattr(module, child_name, parts_of[child_name])
                converted += int(not isinstance(child, Float8Linear))
            elif type(child) is nn.Linear or isinstance(child, STORED):
                if _in_block(full) and _eligible(child) and not getattr(child, "lora", None):
                    setattr(module, child_name, Float8Linear.from_linear(child, **options))
                    converted += 1
                elif isinstance(child, STORED):  # (side paths, a LoRA on a file's weights, stay on it)
                    stored_kept[child.storage()] = stored_kept.get(child.storage(), 0) + 1
                else:
                    kept += 1
    return converted, kept, fused, stored_kept


def lora_problem(transformer: nn.Module, restore: Iterable[str] | None = None) -> str | None:
    """Why a LoRA cannot be loaded into a DiT whose block linears fp8 has replaced by
    :class:`Float8Linear` (None if it has none), or, with ``restore`` (the names of the linears a
    loaded LoRA was fused into), why it cannot be removed: a Float8Linear holds only the rounded fp8
    values, neither a weight to fuse a LoRA into nor the weight to restore."""
    if restore is not None:
        modules = dict(transformer.named_modules())
        lost = [name for name in restore if isinstance(modules.get(name), Float8Linear)]
        if not lost:
            return None
        return (f"fp8 quantised {len(lost)} of the linears the LoRA is fused into (e.g. {lost[0]}): their weights "
                f"without it are not kept; reload the pipeline to remove it")
    n = sum(isinstance(m, Float8Linear) for m in transformer.modules())
    if not n:
        return None
    return (f"fp8 quantised the DiT's block linears ({n} in float8): a LoRA cannot be fused into them now. Load "
            f"LoRAs before fp8 (pipe.load_lora, then pipe.optimize(fp8=True)), or bake one in with "
            f"`zimage convert SRC DST --lora PATH --dtype fp8`")


def _fusions(module: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """(attribute, [(name, linear) in output order]) of each GEMM fusion of ``module`` that fp8 keeps:
    the fused GEMMs of ``accel.fusions`` (their linears are views of the fused weight), and an
    attention's q|k|v or a feed-forward's w1|w3 held as a file's stored layers without a LoRA
    (:func:`_stored_fusion`)."""
    found = []
    for attr, fusion in module.named_children():
        if isinstance(fusion, FusedLinear):
            base = fusion.weight.untyped_storage().data_ptr()
            sources = [(n, m) for n, m in module.named_children() if type(m) is nn.Linear
                       and m.weight.untyped_storage().data_ptr() == base]
            sources.sort(key=lambda item: item[1].weight.storage_offset())
            found.append((attr, sources))
    stored = _STORED.get(type(module))
    if stored and getattr(module, stored[0]) is None:
        sources = [(n, getattr(module, n)) for n in stored[1]]
        if _stored_fusion([m for _, m in sources]) and not any(getattr(m, "lora", None) for _, m in sources):
            found.append((stored[0], sources))
    return found


def _stored_fusion(parts: list[nn.Module]) -> bool:
    """Whether q|k|v or w1|w3 parts are fused here: bias-free, each a file's stored layer (fp8 or int8,
    in any mix: each part's rows keep their own scales in the stacked matrix) or an ``nn.Linear``
    (a layer the file left in bf16 beside stored ones, quantised per row as a fused bf16 weight is),
    at least one of them stored (``nn.Linear`` s alone are ``accel.fusions``' to fuse)."""
    return (all((isinstance(m, STORED) or type(m) is nn.Linear) and m.bias is None for m in parts)
            and any(isinstance(m, STORED) for m in parts))
