"""Linears and embeddings whose weights stay in a GGML block format (GGUF files), in float8 (fp8
files), in int8 (ComfyUI ``int8_tensorwise`` layers) or in ComfyUI's block-scaled ``nvfp4`` /
``mxfp8`` codes (:class:`BlockScaledLinear`) until they are used.

:class:`GGUFLinear` is a linear-layer variant behind the same leaf interface as ``nn.Linear`` and
the fp8 linear (``forward(x) -> y``, ``in_features``, ``out_features``, ``bias``): its weight is
held as the file's packed bytes (a ``uint8`` buffer named ``weight``, ``(out_features, row_bytes)``,
so state-dict keys are the checkpoint's) and dequantised (:func:`zimage_native.formats.ggml.dequantize`)
to the input dtype at every forward, then freed. Resident weight bytes are therefore the file's bytes.

:class:`FP8StoredLinear` holds an fp8 file's float8 weight and its scale as the file has them and
dequantises them per forward exactly as loading would have (fp8 -> fp32, times the scale, -> the
input dtype): the same results as the upcast weights, at about half of their bf16 bytes. Both are
:class:`PackedLinear` s, as is :class:`Int8StoredLinear`, which holds a ComfyUI ``int8_tensorwise``
layer's int8 values and scale the same way.

A LoRA on such a layer is applied unfused, as a low-rank side path ``y += s * (x A^T) B^T``, a
Kronecker one ``y += s * (W1 kron W2) x`` (a LoKr whose second factor is whole: computed from the
two small factors, never formed), or a dense delta (full-delta modules): the packed weights are
never rewritten, and removing the LoRA removes the side paths. A low-rank side path is held at
its rank bucket (:func:`rank_bucket`), and a LoRA stacked on a layer joins its low-rank side
path; past the layer's smaller side the joined factors are held as their delta ``B A`` (fewer
values, one shape), which later LoRAs add to, as to a full delta (a full delta stacked on factors joins
them as ``B A + D``). A and B are non-persistent buffers of the layer, in
the model's compute dtype, with the LoRA's scale folded into one of them (a compiled DiT then holds no
scale to recompile for): every placement (``Module.to``, ``--offload model``, the streamed blocks
of ``--offload blocks``) moves them with the layer, and a forward neither casts nor copies them.
Factors of the shape, dtype and device a side path holds are written into its tensors in place
(a LoRA stacked in the same bucket, or an adapter refit: ``clear_lora(keep=True)``, the LoRAs
added again, ``end_refit``; ``disable_lora`` writes zeros into low-rank and Kronecker ones), so a
captured CUDA graph, which holds their addresses, stays current.

:class:`GGUFEmbedding` keeps a token-embedding table packed and dequantises only the rows looked up.

The GGUF layers call their ``dequantizer`` attribute, ``(packed rows, qtype, dtype) -> values``: by default the
torch function above, on any device. ``zimage_native.accel`` (``kernels="triton"``) sets it, per
module, to the Triton kernel ``zimage::dequantize_ggml``, which gives the same bits on the GPU; this
module never imports Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .formats.fp8 import dequantize_rows
from .formats.ggml import dequantize, row_bytes, type_name
from .formats.microscale import BLOCK_FORMATS, code_scales, scaled_values


MIN_RANK_BUCKET = 16

_lora_changes = 0  # bumped by every add_lora / clear_lora of any packed linear (lora_generation)


def lora_generation() -> int:
    """A number that changes whenever a LoRA side path is added to or cleared from any packed
    linear in the process, or its tensors are replaced (not where new factors are written into them
    in place, see :meth:`PackedLinear.add_lora`): a cache of the side paths' structure
    (``accel.compile``) and captured graphs are current while it is unchanged."""
    return _lora_changes


def _lora_changed() -> None:
    global _lora_changes
    _lora_changes += 1


def rank_bucket(rank: int, in_features: int, out_features: int) -> int:
    """The rank a low-rank side path is held at: the next power of two from 16 up, capped by the
    layer's smaller side (where the factors could not be bigger); a rank at that cap is kept (past
    it, :meth:`PackedLinear.add_lora` holds the delta instead). Padding adds zero rows to A and zero
    columns to B, so ``B A`` is unchanged, and each bucket is one shape for torch.compile (see
    docs/performance.md, "Shape policy")."""
    cap = min(in_features, out_features)
    if rank >= cap:
        return rank
    return min(cap, max(MIN_RANK_BUCKET, 1 << (rank - 1).bit_length()))


class SidePath(NamedTuple):
    """One LoRA side path of a packed linear: ``B A x`` (``b`` None: ``a`` is the dense delta), or
    with ``kron`` ``(A kron B) x`` (A (p, q) and B (c, d), p c x q d the layer). The LoRA's scale is
    in the factors (see :meth:`PackedLinear.add_lora`)."""

    a: torch.Tensor
    b: torch.Tensor | None
    kron: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a.to(x.dtype)  # no-ops in the compute dtype they are kept in
        if self.kron:  # (A kron B) x = vec(A X B^T) for x's (q, d) reshape
            q, d = a.shape[1], self.b.shape[1]
            t = torch.matmul(x.reshape(*x.shape[:-1], q, d), self.b.to(x.dtype).t())  # (..., q, c)
            side = torch.matmul(a, t).flatten(-2)  # (..., p, c) -> (..., p c)
        else:
            side = F.linear(x, a)
            if self.b is not None:
                side = F.linear(side, self.b.to(x.dtype))
        return side


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in a compact form and dequantised to the input dtype at every call.

    Subclasses hold the weight and say how to dequantise it (:meth:`dequantize`). A LoRA on such a
    layer is a list of side paths (see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.lora: list[tuple[str, str | None, bool]] = []  # buffer names of (A, B or None), kron
        self._kept: dict[str, torch.Tensor] | None = None  # during a refit: the side paths' tensors before it
        self._kept_lora: list[tuple[str, str | None, bool]] = []  # and their names

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out_features, in_features) in ``dtype`` (without any LoRA)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.dequantize(x.dtype), bias)
        for side in self.side_paths():
            y = y + side(x)
        return y

    # ---------------------------------------------------------------- LoRA side paths
    def add_lora(self, a: torch.Tensor, b: torch.Tensor | None, scale: float, dtype: torch.dtype | None = None,
                 kron: bool = False) -> None:
        """Add ``scale * B A`` (``b`` None: ``a`` is a dense (out, in) delta), or with ``kron``
        ``scale * (A kron B)``, as a side path, kept on the layer's device in ``dtype`` (the model's
        compute dtype; default: as given), with the scale folded into one factor."""
        if kron:
            rows, cols = a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]
        else:
            rows, cols = (a.shape[0] if b is None else b.shape[0]), a.shape[1]
        if rows != self.out_features or cols != self.in_features:
            raise ValueError(f"LoRA side path of shape ({rows}, {cols}) for a layer of shape "
                             f"({self.out_features}, {self.in_features})")
        # The scale is folded into one factor (in fp32), so the forward holds no Python float that
        # torch.compile would specialise on: a LoRA loaded again at another scale reuses the graph.
        given = {"a": a.dtype, "b": None if b is None else b.dtype}
        index = len(self.lora)
        if kron:
            a = a.float() * scale
        else:
            if b is None:
                a = a.float() * scale
            else:
                b = b.float() * scale
            low = next((i for i, (_, _, k) in enumerate(self.lora) if not k), None)
            if low is not None and self.lora[low][1] is None:
                # Stacked on a delta (a full delta, or factors that went past the cap, below): added to it.
                index, old = low, getattr(self, self.lora[low][0])
                a = a.to(old.device).float() if b is None else b.to(old.device) @ a.to(old.device).float()
                a, b = old.float() + a, None
                given = {"a": old.dtype, "b": None}
            elif low is not None and b is None:
                # A full delta stacked on low-rank factors: held with them as one delta, B A + D.
                index, old_a, old_b = low, getattr(self, self.lora[low][0]), getattr(self, self.lora[low][1])
                a = old_b.float() @ old_a.float() + a.to(old_a.device)
                given = {"a": old_a.dtype, "b": None}
            elif low is not None:
                # A LoRA stacked on the layer's low-rank side path joins it: B1 A1 + B2 A2 = [B1 B2] [A1; A2],
                # without A1's zero rows (its padding; a zero row adds nothing), so stacks too are one
                # side path and one shape per rank bucket, run as two small GEMMs.
                index, old_a, old_b = low, getattr(self, self.lora[low][0]), getattr(self, self.lora[low][1])
                keep = old_a.ne(0).any(dim=1)
                a = torch.cat([old_a[keep].float(), a.to(old_a.device)])
                b = torch.cat([old_b[:, keep].float(), b.to(old_b.device)], dim=1)
                given = {"a": old_a.dtype, "b": old_b.dtype}
            if b is not None and a.shape[0] > min(self.in_features, self.out_features):
                # Past the layer's smaller side the factors hold more than the delta B A itself, and
                # each rank would be a shape of its own (a graph more for every stack): held as the
                # delta, one shape whatever is stacked on it later.
                a, b = b @ a.to(b.device).float(), None
            if b is not None:
                # The rank padded with zeros up to its bucket: dynamo guards the factors' shapes, so a
                # server swapping LoRAs of many ranks compiles one graph per bucket, not per rank.
                pad = rank_bucket(a.shape[0], self.in_features, self.out_features) - a.shape[0]
                if pad:
                    a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
                    b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        if index < len(self.lora) and b is None and self.lora[index][1] is not None:
            delattr(self, self.lora[index][1])  # factors joined past the cap or with a delta: the delta replaces them
        names, written = [], True
        for part, tensor in (("a", a), ("b", b)):
            if tensor is None:
                names.append(None)
                continue
            name = f"lora_{part}{index}"
            written &= self._write_side_tensor(name, tensor.detach(), dtype or given[part])
            names.append(name)
        entry = (names[0], names[1], kron)
        if index == len(self.lora):
            self.lora.append(entry)
            written = False
        elif self.lora[index] != entry:
            self.lora[index] = entry
            written = False
        if not written and self._kept is None:
            _lora_changed()

    def _write_side_tensor(self, name: str, value: torch.Tensor, dtype: torch.dtype) -> bool:
        """Hold ``value`` as the side-path buffer ``name``: written in place (``copy_``) into the
        tensor held under that name (or kept for a refit, :meth:`clear_lora`) where it has the
        value's shape, dtype and device, so a captured CUDA graph (which holds its address) and
        compiled code read the new values; else a new tensor of the layer's own (never the
        caller's: a later in-place write must not reach the LoRA's state dict). Returns whether it
        was written in place."""
        given, value = value, value.to(self.weight.device, dtype)
        for held in ((self._kept or {}).get(name), self._buffers.get(name)):
            if held is not None and (held.shape, held.dtype, held.device) == (value.shape, value.dtype, value.device):
                if held is not value:
                    held.copy_(value)
                self.register_buffer(name, held, persistent=False)
                return True
        self.register_buffer(name, value.clone() if value is given else value, persistent=False)
        return False

    def side_paths(self) -> list[SidePath]:
        """The LoRA side paths."""
        return [SidePath(getattr(self, a), None if b is None else getattr(self, b), k) for a, b, k in self.lora]

    def clear_lora(self, keep: bool = False) -> int:
        """Remove the side paths; returns how many. ``keep``: the start of a refit (the LoRAs added
        again, at other weights or others of the same structure): their tensors are kept for
        :meth:`add_lora` to write the new factors into, and :meth:`end_refit` says whether the
        structure changed."""
        n = len(self.lora)
        if keep and self._kept is None:
            self._kept = {name: getattr(self, name) for side in self.lora for name in side[:2] if name is not None}
            self._kept_lora = list(self.lora)
        for a, b, _ in self.lora:
            delattr(self, a)
            if b is not None:
                delattr(self, b)
        self.lora = []
        if n and self._kept is None:  # (nothing cleared: the structure is unchanged, graphs and compiled code current)
            _lora_changed()
        return n

    def keeps_dense(self) -> bool:
        """Whether a refit (:meth:`clear_lora` with ``keep``) keeps a dense side path here (a delta
        the size of the weight)."""
        return any(b is None and not k for _, b, k in self._kept_lora)

    def end_refit(self, silence: bool = False) -> None:
        """The end of a refit (:meth:`clear_lora` with ``keep``): the LoRA generation moves on unless
        the side paths are those kept, tensor for tensor (written in place: captured graphs and
        compiled code stay current); the kept tensors are let go.

        ``silence`` (``disable_lora``): where the refit added no side path and those kept are all
        low-rank or Kronecker, they stay with zeros written into their factors, so the structure
        and the graphs stay, and the next refit (``enable_lora``) writes the factors back in place.
        A zeroed side path adds exactly +0 (a GEMM of zeros sums from +0) to outputs that are never
        -0. A dense delta is not kept so: zeroed, it would cost a GEMM of the layer's full size on
        every call (docs/lora.md)."""
        if self._kept is None:
            return
        if silence and not self.lora and self._kept_lora and all(b is not None or k for _, b, k in self._kept_lora):
            for name, tensor in self._kept.items():
                self.register_buffer(name, tensor.zero_(), persistent=False)
            self.lora = list(self._kept_lora)
        same = self.lora == self._kept_lora and all(
            self._buffers.get(name) is self._kept.get(name) for side in self.lora for name in side[:2] if name)
        self._kept, self._kept_lora = None, []
        if not same:
            _lora_changed()

    def storage(self) -> str:
        """How the weight is held, for ``extra_repr``."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes of the stored weight (what :func:`quantized_bytes` counts; one byte a stored value)."""
        return self.weight.numel()

    def extra_repr(self) -> str:
        lora = f", {len(self.lora)} LoRA side paths" if self.lora else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.storage()}{lora}")


class GGUFLinear(PackedLinear):
    """The weight stored packed in a GGML block format (``qtype``), dequantised per call."""

    #: (packed rows, qtype, dtype) -> values: the torch twin unless an acceleration set another one.
    dequantizer = staticmethod(dequantize)

    def __init__(self, in_features: int, out_features: int, qtype: int | str, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.qtype = type_name(qtype)
        self.register_buffer("weight", torch.empty(out_features, row_bytes(self.qtype, in_features),
                                                   dtype=torch.uint8, device=device))

    @classmethod
    def like(cls, linear: nn.Module, qtype: int | str) -> "GGUFLinear":
        """An empty GGUFLinear with the geometry of ``linear`` (on its device, meta included)."""
        bias = getattr(linear, "bias", None)
        return cls(linear.in_features, linear.out_features, qtype, bias is not None,
                   device=linear.weight.device, dtype=bias.dtype if bias is not None else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantizer(self.weight, self.qtype, dtype)

    def storage(self) -> str:
        return self.qtype


class ScaledStoredLinear(PackedLinear):
    """A PackedLinear whose weight is stored values (``weight``, (out, in), in ``stored_dtype``) times
    a per-row fp32 ``scale`` ((out, 1)): the values are not floating, so a dtype cast of the model
    leaves them alone, and the scale stays fp32 whatever the cast and follows the weight's device."""

    stored_dtype = torch.uint8

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=self.stored_dtype, device=device))
        self.register_buffer("scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))

    @classmethod
    def like(cls, linear: nn.Module, *args) -> "ScaledStoredLinear":
        """An empty one with the geometry of ``linear`` (on its device, meta included); ``args``: the
        class's own arguments before ``bias`` (FP8StoredLinear: the float8 dtype)."""
        bias = getattr(linear, "bias", None)
        return cls(linear.in_features, linear.out_features, *args, bias is not None,
                   device=linear.weight.device, dtype=bias.dtype if bias is not None else None)

    def _apply(self, fn, recurse=True):
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.weight.device)  # fp32 whatever the cast
        return self


class FP8StoredLinear(ScaledStoredLinear):
    """The weight as an fp8 file stores it: float8 values (``weight``, held as their bytes, uint8
    (out, in)) times ``scale`` (fp32 (out, 1): the file's per-row scales, or its per-tensor scale
    repeated, or 1 for a file without scales), dequantised per call as the loader would have done
    once (fp8 -> fp32, times the scale, -> the input dtype), so the results are those of the upcast
    weights, bit for bit.

    The bytes keep a dtype cast of the model (``module.to(torch.bfloat16)``) away from the fp8
    values, as GGUFLinear's packed bytes are; the scale stays fp32 and follows the weight's device.
    """

    #: (codes, fp8 dtype, scales, dtype) -> values: the torch twin unless an acceleration set another one
    #: (``kernels="triton"``: ``zimage::dequantize_fp8``, the same bits in one pass).
    dequantizer = staticmethod(dequantize_rows)

    def __init__(self, in_features: int, out_features: int, fp8_dtype: torch.dtype, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.fp8_dtype = fp8_dtype

    def values(self) -> torch.Tensor:
        """The stored float8 values (a view of the bytes)."""
        return self.weight.view(self.fp8_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantizer(self.weight, self.fp8_dtype, self.scale, dtype)

    def storage(self) -> str:
        return str(self.fp8_dtype).removeprefix("torch.")


class Int8StoredLinear(ScaledStoredLinear):
    """The weight as a ComfyUI ``int8_tensorwise`` layer stores it: int8 values (``weight``, (out, in))
    times ``scale`` (fp32 (out, 1): the file's per-row scales, or its per-tensor scale repeated),
    dequantised per call as the loader would have done once (int8 -> fp32, times the scale, -> the
    input dtype), so the results are those of the dequantised weights, bit for bit.

    int8 is not a floating dtype, so a dtype cast of the model leaves the values alone; the scale
    stays fp32 and follows the weight's device."""

    stored_dtype = torch.int8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale).to(dtype)

    def storage(self) -> str:
        return "int8"


class BlockScaledLinear(PackedLinear):
    """The weight as a ComfyUI block-scaled (``nvfp4`` / ``mxfp8``) layer stores it, dequantised per
    call as the loader would have done once (:func:`~zimage_native.formats.microscale.scaled_values`:
    each code's value times its block's scale in fp32, rounded once to the input dtype), so the
    results are those of the weights dequantised while loading, bit for bit.

    - ``weight``: the codes, uint8: nvfp4 (out, in / 2), two e2m1 codes a byte; mxfp8 (out, in), the
      e4m3 values' bytes;
    - ``block_scale``: the block-scale codes, uint8 (out, in / block), one byte a block (nvfp4: e4m3
      bits, one per 16 values; mxfp8: e8m0 exponents, one per 32), unblocked from the file's tiles;
    - ``scale_2``: nvfp4's per-tensor ``weight_scale_2``, fp32, one value (mxfp8: 1).

    Held so (0.5625 byte a value in nvfp4, 1.03 in mxfp8), not as fp32 block scales (4 bytes a block:
    0.75 byte a value in nvfp4). Codes are not floating, so a dtype cast of the model leaves them
    alone; ``scale_2`` stays fp32 whatever the cast and follows the weight's device. Torch only: no
    Triton kernel (as IQ4 GGUF types)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.fmt = fmt
        per_byte = 2 if fmt == "nvfp4" else 1
        self.register_buffer("weight", torch.empty(out_features, in_features // per_byte, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("block_scale", torch.empty(out_features, in_features // BLOCK_FORMATS[fmt][0],
                                                        dtype=torch.uint8, device=device))
        self.register_buffer("scale_2", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    def like(cls, linear: nn.Module, fmt: str) -> "BlockScaledLinear":
        """An empty one in ``fmt`` with the geometry of ``linear`` (on its device, meta included)."""
        bias = getattr(linear, "bias", None)
        return cls(linear.in_features, linear.out_features, fmt, bias is not None, device=linear.weight.device,
                   dtype=bias.dtype if bias is not None else None)

    def _apply(self, fn, recurse=True):
        scale_2 = self.scale_2
        super()._apply(fn, recurse)
        self.scale_2 = scale_2.to(self.weight.device)  # fp32 whatever the cast
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scales = code_scales(self.block_scale, self.fmt, self.scale_2)
        return scaled_values(self.weight, scales, self.fmt).to(dtype)

    def stored_bytes(self) -> int:
        return self.weight.numel() + self.block_scale.numel() + 4

    def storage(self) -> str:
        return self.fmt


class GGUFEmbedding(nn.Module):
    """An embedding table stored packed (``weight``: uint8 rows); looked-up rows come out in ``dtype``."""

    dequantizer = staticmethod(dequantize)  # as GGUFLinear.dequantizer

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int | str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.qtype = type_name(qtype)
        self.register_buffer("weight", torch.empty(num_embeddings, row_bytes(self.qtype, embedding_dim),
                                                   dtype=torch.uint8, device=device))
        # An empty tensor in the output dtype: it follows .to(dtype) / .half() as the model's other floats do.
        # (Never on meta: nothing is loaded into it. It moves with .to(device) like the rest.)
        self.register_buffer("dtype_of_output", torch.empty(0, dtype=dtype, device="cpu"), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_of_output.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantizer(self.weight[ids], self.qtype, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype}"


def swap_quantized_modules_(model: nn.Module, qtypes: dict[str, str], dtype: torch.dtype | None = None) -> set[str]:
    """Replace, in place, every ``nn.Linear`` / ``nn.Embedding`` whose ``<name>.weight`` is in ``qtypes``
    (canonical weight key -> GGML type name) by a :class:`GGUFLinear` / :class:`GGUFEmbedding` of that type.

    Returns the keys that were swapped; the others (weights of other module kinds, or rows that are
    not whole blocks) must be dequantised while loading.
    """
    swapped = set()
    for name, module in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if key not in qtypes:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            new: nn.Module = GGUFLinear.like(module, qtypes[key])
        elif isinstance(module, nn.Embedding):
            new = GGUFEmbedding(module.num_embeddings, module.embedding_dim, qtypes[key],
                                dtype or module.weight.dtype, device=module.weight.device)
        else:
            continue
        setattr(parent, child, new)
        swapped.add(key)
    return swapped


def swap_fp8_linears_(model: nn.Module, fp8: dict[str, torch.dtype | str]) -> set[str]:
    """Replace, in place, every ``nn.Linear`` whose ``<name>.weight`` is in ``fp8`` (canonical weight
    key -> float8 dtype, ``torch.int8`` for a comfy_quant int8 layer, or "nvfp4" / "mxfp8" for a
    block-scaled one) by an :class:`FP8StoredLinear` (an :class:`Int8StoredLinear`, a
    :class:`BlockScaledLinear`); returns the keys that were swapped."""
    swapped = set()
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        if key in fp8 and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            if isinstance(fp8[key], str):
                new = BlockScaledLinear.like(module, fp8[key])
            else:
                new = (Int8StoredLinear.like(module) if fp8[key] == torch.int8 else
                       FP8StoredLinear.like(module, fp8[key]))
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            swapped.add(key)
    return swapped


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """Storage (GGML type, float8 dtype, int8, nvfp4, mxfp8) -> bytes held by the model's packed layers
    (their stored values; a block-scaled layer's block-scale codes too, part of its format's bytes)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (PackedLinear, GGUFEmbedding)):
            kind = m.storage() if isinstance(m, PackedLinear) else m.qtype
            out[kind] = out.get(kind, 0) + (m.stored_bytes() if isinstance(m, PackedLinear) else m.weight.numel())
    return out


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the storages behind a module's parameters and buffers, each storage counted once
    (views such as the q/k/v rows of one packed qkv tensor share theirs)."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
