"""Load-time GEMM fusions: q|k|v as one (3D, D) GEMM, w1|w3 as one (2F, D) GEMM.

:func:`fuse_projections_` sets the optional ``Attention.to_qkv`` and ``FeedForward.w13`` of a built
DiT to a :class:`FusedLinear` over the original linears. The fused weight is a non-persistent
buffer and the original weights become views of it, so there is no extra memory, the
``state_dict()`` keys and values do not change, and in-place edits of the original weights (a
fused LoRA, ``load_state_dict``) reach the fused GEMM. fp8 (``accel.fp8``) quantises the fused
weight as one matrix, so one activation is quantised once per fusion.

Apply it after the model is on its final dtype. A later ``Module.to()`` copies the buffer and the
parameters separately (no longer shared: a LoRA fused afterwards would not reach the fused GEMM);
the pipeline's placement changes (``pipe.to``, offloading) copy storages instead and keep the
views (``offload.move_``, ``offload.visit``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..model.layers import FeedForward
from ..model.transformer import Attention


class FusedLinear(nn.Module):
    """Bias-free linears on one input as one GEMM: (..., K) -> (..., sum of N_i), outputs in order."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            raise TypeError(f"FusedLinear fuses bias-free nn.Linear modules, got {[type(m).__name__ for m in linears]}")
        weight = torch.cat([m.weight.detach() for m in linears])
        self.register_buffer("weight", weight, persistent=False)
        self.splits = [m.out_features for m in linears]
        start = 0
        for m, n in zip(linears, self.splits):
            m.weight.data = weight[start:start + n]  # the checkpoint's parameter, now a view
            start += n
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def fuse_projections_(model: nn.Module) -> tuple[int, int]:
    """Fuse q|k|v of every DiT attention and w1|w3 of every feed-forward in place.

    Returns (attention modules fused, feed-forwards fused); modules already fused are skipped, and
    so are modules whose linears are not plain ``nn.Linear`` (packed GGUF weights: each keeps its
    own dequantise-and-multiply).
    """
    qkv = ffn = 0

    def plain(*linears: nn.Module) -> bool:
        return all(type(m) is nn.Linear for m in linears)

    for module in model.modules():
        if isinstance(module, Attention) and module.to_qkv is None and plain(module.to_q, module.to_k, module.to_v):
            module.to_qkv = FusedLinear([module.to_q, module.to_k, module.to_v])
            qkv += 1
        elif isinstance(module, FeedForward) and module.w13 is None and plain(module.w1, module.w3):
            module.w13 = FusedLinear([module.w1, module.w3])
            ffn += 1
    return qkv, ffn


def rejoin_fused_views_(model: nn.Module) -> int:
    """The linears of each :class:`FusedLinear` views of its buffer again, where they are copies of
    their own: ``pickle.loads`` of a ``pickle.dumps`` copies every tensor's storage apart (``torch.save``
    and ``copy.deepcopy`` keep shared storages shared), and then a fused LoRA edited the linears'
    weights but not the fused GEMM, and the weights were held twice. Returns the fusions rejoined
    (the values are the fused buffer's, equal to the copies')."""
    rejoined = 0
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.to_qkv, FusedLinear):
            fused, linears = module.to_qkv, (module.to_q, module.to_k, module.to_v)
        elif isinstance(module, FeedForward) and isinstance(module.w13, FusedLinear):
            fused, linears = module.w13, (module.w1, module.w3)
        else:
            continue
        home = fused.weight.untyped_storage().data_ptr()
        if all(m.weight.untyped_storage().data_ptr() == home for m in linears):
            continue
        start = 0
        for m, n in zip(linears, fused.splits):
            m.weight.data = fused.weight[start:start + n]
            start += n
        rejoined += 1
    return rejoined
