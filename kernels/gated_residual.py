"""Gated post-norm residual (the sandwich norm's second half): ``zimage::gated_rms_norm_residual``.

Formula (the reference is ``TransformerBlock.forward`` in ``zimage_native.model.transformer``)::

    n   = cast(y * rsqrt(mean(y^2, -1) + eps), w.dtype) * w      # RMSNorm, statistics in fp32
    out = x + cast(tanh(gate), gate.dtype) * n                    # modulated blocks
    out = x + n                                      if gate is None (context-refiner blocks)

Every intermediate is rounded to its eager dtype (tanh(gate) to the gate dtype, the product to
the weight dtype, the sum to promote(x, weight)), so bf16 matches eager bit for bit except where a
different fp32 summation order flips a last bit. tanh is Cephes' fp32 tanhf (~2e-7 relative).

Shapes and dtypes: x (the residual stream) and y (the attention or feed-forward output) (..., D)
of the same shape, any strides with a unit stride on D; weight (D,); gate None or broadcastable
to x (the model passes (B, 1, D)), same dtype as weight. out has x's shape and dtype
promote(x.dtype, weight.dtype). One program handles BLOCK_R whole rows (D <= 65536).

Byte budget, N rows: reads x and y once, writes out once: 3 * N * D * bytes (+ D weight, B * D
gate). bf16 at N = 4352, D = 3840: 100 MB, ~30 us at 3.35 TB/s. Eager: the RMSNorm passes plus
tanh, multiply and add, each a full read and write of N * D.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import (
    LAUNCH_OPTIONS,
    as_rows,
    check_float,
    check_same_device,
    count_launch,
    device_guard,
    rms_normalize,
    round_to,
    row_tile,
    tanh_f32,
)

MAX_COLS = 65536


@triton.jit
def _gated_rms_norm_residual_kernel(
    x_ptr, y_ptr, w_ptr, g_ptr, out_ptr,
    n_rows, seq_len, n_cols,
    stride_xb, stride_xl, stride_yb, stride_yl, stride_gb, stride_gl,
    eps,
    HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    b = (rows // seq_len).to(tl.int64)
    l = (rows % seq_len).to(tl.int64)

    y = tl.load(y_ptr + (b * stride_yb + l * stride_yl)[:, None] + cols[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    branch = rms_normalize(y.to(tl.float32), w, eps, n_cols)
    if HAS_GATE:
        g = tl.load(g_ptr + (b * stride_gb + l * stride_gl)[:, None] + cols[None, :], mask=mask, other=0.0)
        tanh_g = round_to(tanh_f32(g.to(tl.float32)), g.dtype)
        branch = round_to(tanh_g.to(tl.float32) * branch.to(tl.float32), w.dtype)
    x = tl.load(x_ptr + (b * stride_xb + l * stride_xl)[:, None] + cols[None, :], mask=mask, other=0.0)
    out = round_to(x.to(tl.float32) + branch.to(tl.float32), out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], out, mask=mask)


def _check(x, y, weight, gate) -> None:
    check_float("gated_rms_norm_residual", x=x, y=y, weight=weight, gate=gate)
    check_same_device("gated_rms_norm_residual", x=x, y=y, weight=weight, gate=gate)
    if x.shape != y.shape:
        raise ValueError(f"zimage::gated_rms_norm_residual: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    if x.ndim < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"zimage::gated_rms_norm_residual: weight {tuple(weight.shape)} does not match "
                         f"{tuple(x.shape)}")
    if x.shape[-1] > MAX_COLS:
        raise ValueError(f"zimage::gated_rms_norm_residual: D = {x.shape[-1]} > {MAX_COLS} does not fit one tile")
    if gate is not None:
        if gate.dtype != weight.dtype:
            raise TypeError(f"zimage::gated_rms_norm_residual: gate dtype {gate.dtype} must equal weight dtype "
                            f"{weight.dtype}")
        if torch.broadcast_shapes(gate.shape, x.shape) != x.shape:
            raise ValueError(f"zimage::gated_rms_norm_residual: gate {tuple(gate.shape)} does not broadcast to "
                             f"{tuple(x.shape)}")


@torch.library.custom_op("zimage::gated_rms_norm_residual", mutates_args=())
def gated_rms_norm_residual(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, gate: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x + tanh(gate) * RMSNorm(y) (x + RMSNorm(y) without a gate); see the module doc."""
    _check(x, y, weight, gate)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if out.numel() == 0:
        return out
    x3, y3 = as_rows(x), as_rows(y)
    g3 = as_rows(gate.expand(x.shape)) if gate is not None else x3
    n_batch, seq_len, n_cols = x3.shape
    block_d, block_r, num_warps = row_tile(n_cols)
    n_rows = n_batch * seq_len
    with device_guard(x):
        _gated_rms_norm_residual_kernel[(triton.cdiv(n_rows, block_r),)](
            x3, y3, weight.contiguous(), g3, out,
            n_rows, seq_len, n_cols,
            x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1), g3.stride(0), g3.stride(1),
            eps,
            HAS_GATE=gate is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps, **LAUNCH_OPTIONS,
        )
    count_launch("gated_rms_norm_residual")
    return out


@gated_rms_norm_residual.register_fake
def _(x, y, weight, eps, gate=None):
    _check(x, y, weight, gate)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
