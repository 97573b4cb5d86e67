"""fp8 (float8 e4m3) linears for the DiT's large projections.

Weights are quantised once with one scale per output row (amax / 448); activations are quantised
on the fly with one scale per token. The matmul is ``torch._scaled_mm`` (fp8 tensor cores on
Hopper and Ada; PyTorch also has a CPU implementation, which the tests use), with the output in
the activation dtype. ``torch._scaled_mm`` is used directly rather than torchao: it is one call,
it is in every PyTorch the engine supports, and it needs no extra dependency.

The slow twin is ``Float8Linear.reference``: the same quantisation, dequantised and multiplied in
fp32. Only the attention and feed-forward linears inside the blocks are converted; the embedders,
the final layer and the adaLN projections stay in bf16 (they are small and sensitive). fp8 is
lossy: every speed number with fp8 is reported with an image-quality number against bf16.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> fp8 values and fp32 scales (M, 1) with x ~= q * scale, one scale per row."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(nn.Module):
    """y = x W^T + b with W in fp8 (per-row scales) and x quantised per token. (..., K) -> (..., N)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)  # (N, K) float8_e4m3fn
        self.register_buffer("weight_scale", scale)  # (N, 1) fp32
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        weight, scale = quantize_rows(linear.weight)
        bias = None if linear.bias is None else linear.bias
        return cls(weight, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_rows(x2)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.t(),
                               bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantisation, dequantised, in fp32 (the slow twin of forward)."""
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_rows(x2)
        out = (xq.float() * xs) @ (self.weight.float() * self.weight_scale).t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _eligible(name: str, module: nn.Module) -> bool:
    """The big GEMMs inside the blocks: attention q/k/v/out and the feed-forward projections."""
    if not isinstance(module, nn.Linear) or "adaLN" in name:
        return False
    in_block = name.startswith(("layers.", "noise_refiner.", "context_refiner."))
    return in_block and (".attention." in name or ".feed_forward." in name)


def quantize_fp8_(transformer: nn.Module) -> tuple[int, int]:
    """Replace eligible linears by :class:`Float8Linear` in place; returns (converted, kept)."""
    converted = kept = 0
    for name, module in list(transformer.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear):
                continue
            if _eligible(full, child):
                if child.in_features % 16 or child.out_features % 16:
                    kept += 1  # _scaled_mm needs multiples of 16
                    continue
                setattr(module, child_name, Float8Linear.from_linear(child))
                converted += 1
            else:
                kept += 1
    return converted, kept
