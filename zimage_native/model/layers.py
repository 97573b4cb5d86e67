"""The leaf modules of the Z-Image DiT, and the timestep embedder.

The transformer block (``model.transformer``) is written once, from these leaves; each
acceleration replaces exactly one leaf by a twin with the same parameters (the Triton kernels in
``zimage_native.kernels`` through ``zimage_native.accel.kernel_swaps``), Liger-Kernel style:

    RMSNorm            y = RMSNorm(x)                                  (q/k norms, caption embedder)
    ModulatedRMSNorm   y = RMSNorm(x) * (1 + scale)                    (the block's pre-norms)
    PostNormResidual   out = x + tanh(gate) * RMSNorm(y)               (the block's post-norms)
    QKNormRoPE         q, k = RoPE(norm_q(q)), RoPE(norm_k(k))         (stateless; the norms are passed in)
    SwiGLU             SiLU(gate) * up                                 (stateless; inside FeedForward)

These eager versions are the semantics that the parity tests pin against diffusers 0.42.1 and the
references that the kernel twins are tested against, leaf against leaf.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """cast(x * rsqrt(mean(x^2) + eps), weight.dtype) * weight over the last dim.

    The statistics are taken in fp32 and the normalised value is cast to the weight dtype
    *before* the weight multiply: diffusers' rounding order, which the parity tests rely on.
    """
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)  # bf16 * fp32 promotes: normalised in fp32
    return x.to(weight.dtype) * weight


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (parameter ``weight``). (..., D) -> (..., D)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ModulatedRMSNorm(RMSNorm):
    """RMSNorm(x) * (1 + scale); without a scale (context-refiner blocks) a plain RMSNorm.

    scale: None or broadcastable to x (the blocks pass (B, 1, D)), in the weight dtype.
    """

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = rms_norm(x, self.weight, self.eps)
        return y if scale is None else y * (1.0 + scale)


class PostNormResidual(RMSNorm):
    """The sandwich norm's second half: x + tanh(gate) * RMSNorm(y), or x + RMSNorm(y) without a gate.

    x is the residual stream, y the attention or feed-forward output (same shape); gate None or
    broadcastable to x, in the weight dtype. The parameter is this norm's ``weight``.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = rms_norm(y, self.weight, self.eps)
        return x + (y if gate is None else gate.tanh() * y)


class QKNormRoPE(nn.Module):
    """Per-head RMSNorm of q and k, then the 3-axis RoPE. Stateless: the norms are the attention's.

    q, k: (B, L, H, Dh); rope: cos, sin (B or 1, L, Dh/2) fp32. Returns q, k (B, L, H, Dh).
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, norm_q: RMSNorm, norm_k: RMSNorm,
                rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(norm_q(q), *rope), apply_rope(norm_k(k), *rope)  # RoPE after the qk-norm


class SwiGLU(nn.Module):
    """The SwiGLU gate SiLU(gate) * up. Stateless. (..., F), (..., F) -> (..., F)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class FeedForward(nn.Module):
    """SwiGLU feed-forward: w2(SiLU(w1 x) * w3 x). (..., D) -> (..., D).

    ``w13`` is an optional load-time fusion (set from outside the model, see
    ``zimage_native.accel.fusions``): one module computing [w1 x | w3 x] in one GEMM. It holds no
    state_dict entries; w1 and w3 stay the checkpoint's parameters.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.act = SwiGLU()
        self.w13: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)  # two strided views of one GEMM output
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(self.act(gate, up))


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of a (B,) float tensor, always in fp32: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, then sin
    if dim % 2:
        features = F.pad(features, (0, 1))
    return features


class TimestepEmbedder(nn.Module):
    """(B,) model time (already scaled by t_scale) -> (B, out_dim) conditioning vector."""

    def __init__(self, out_dim: int, mid_dim: int = 1024, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The sinusoid is an fp32 island; it is cast to the layer's dtype only at the MLP input. (The
        # bias gives that dtype: a packed-weight linear variant keeps its weight in another one.)
        return self.mlp(timestep_features(t, self.frequency_dim).to(self.mlp[0].bias.dtype))
