"""3-axis rotary position embedding of the Z-Image DiT, with real cos/sin tables.

Positions are integer triples (axis 0: caption index / image "time", axis 1: latent row,
axis 2: latent column). Axis a with dim d_a contributes d_a / 2 frequencies
w_k = theta ** (-2k / d_a), computed in float64; angles pos * w_k are cast to float32 before
cos/sin, exactly as the reference builds its complex table. For head_dim 128 and axes_dims
(32, 48, 48) a token has 64 (cos, sin) pairs: 16 from axis 0, then 24, then 24.

The rotation is interleaved-pair (GPT-J / Flux style, NOT Qwen's rotate-half): the pair
(x[2p], x[2p+1]) is rotated by angle p. It runs in float32 and is cast back to the input dtype.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n_axes) integer positions -> cos, sin tables of shape (..., sum(axes_dims) / 2), fp32."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
        angles.append((positions[..., axis, None].to(torch.float64) * freqs).float())
    angle = torch.cat(angles, dim=-1)
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x: (B, L, H, Dh); cos, sin: (B, L, Dh/2), shared by every head."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, H, Dh/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
