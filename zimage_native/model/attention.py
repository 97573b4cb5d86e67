"""The attention seam: every attention call in the model goes through :func:`attention`.

Shapes: q, k, v are (B, H, L, Dh). ``mask`` is None or a bool key mask (B, L) with True on the
positions that may be attended (only batch padding is ever masked). Returns (B, H, L, Dh).

This is the SDPA reference. Faster backends (FlashAttention, SageAttention, ...) are installed
from outside the model by replacing the ``attn_fn`` attribute of an attention module; see
``zimage_native.accel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is not None:
        mask = mask[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
