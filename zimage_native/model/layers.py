"""Reference layers of the Z-Image DiT: RMSNorm, the SwiGLU feed-forward, the timestep embedder.

These are the eager semantics that the parity tests pin against diffusers 0.42.1, and the
references that the fused kernels in ``zimage_native.kernels`` are tested against.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """y = cast(x * rsqrt(mean(x^2) + eps), weight.dtype) * weight over the last dim.

    The statistics are taken in fp32 and the normalised value is cast to the weight dtype
    *before* the weight multiply: diffusers' rounding order, which the parity tests rely on.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # bf16 * fp32 promotes: normalised in fp32
        return x.to(self.weight.dtype) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(SiLU(w1 x) * w3 x). (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
        # The sinusoid is an fp32 island; it is cast to the weight dtype only at the MLP input.
        return self.mlp(timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype))
