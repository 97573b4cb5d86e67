"""Swap the DiT's RMSNorm / RoPE / gated residual / SwiGLU math for the ``zimage::`` Triton ops.

Each swap replaces modules of a built :class:`~zimage_native.model.transformer.ZImageTransformer`
by kernel-backed twins that *adopt* the original children and parameters (by reference, not by
value), so parameter names, ``state_dict()`` keys and the attention seam (``attn_fn``) are
unchanged. Each returns how many modules it replaced; :func:`use_fused_kernels` runs them all and
returns the log lines. The eager modules in ``zimage_native.model`` stay the reference.

    Attention        -> FusedAttention         q/k RMSNorm + RoPE in zimage::qk_norm_rope
    TransformerBlock -> FusedTransformerBlock  norm1 * (1 + scale) in zimage::rms_norm,
                                               x + tanh(gate) * norm2(y) in zimage::gated_rms_norm_residual
    FeedForward      -> FusedFeedForward       SiLU(a) * b in zimage::silu_mul (optionally w1 | w3 as one GEMM)
    RMSNorm (others) -> FusedRMSNorm           zimage::rms_norm (the caption embedder's norm)

The ops must be registered first (``load_kernels()``); the modules call them through ``torch.ops``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..model.layers import FeedForward, RMSNorm
from ..model.transformer import Attention, TransformerBlock
from ._kernels import AccelerationUnavailable, load_kernels

Rope = tuple[torch.Tensor, torch.Tensor]


class FusedRMSNorm(RMSNorm):
    """RMSNorm through ``zimage::rms_norm``; forward(x, scale=None) also fuses ``* (1 + scale)``."""

    @classmethod
    def from_module(cls, norm: RMSNorm) -> "FusedRMSNorm":
        with torch.device("meta"):
            fused = cls(norm.weight.shape[0], norm.eps)
        fused.weight = norm.weight  # the same Parameter: same storage, same state_dict key
        return fused

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.zimage.rms_norm(x, self.weight, self.eps, scale)


class FusedAttention(nn.Module):
    """:class:`Attention` with its q/k RMSNorm and RoPE in one ``zimage::qk_norm_rope`` launch.

    With ``fuse_qkv`` (a load-time fusion), to_q/to_k/to_v become views of one (3D, D) ``wqkv``
    buffer, used as a single GEMM; no extra memory, and the same parameter names. If one of them is
    later replaced by another module (an fp8 swap), the forward calls the three modules again.
    """

    def __init__(self, attention: Attention, fuse_qkv: bool = False):
        super().__init__()
        if attention.norm_q.eps != attention.norm_k.eps:
            raise ValueError(f"norm_q eps {attention.norm_q.eps} != norm_k eps {attention.norm_k.eps}")
        self.n_heads = attention.n_heads
        self.to_q, self.to_k, self.to_v, self.to_out = attention.to_q, attention.to_k, attention.to_v, attention.to_out
        self.norm_q, self.norm_k = attention.norm_q, attention.norm_k
        self.attn_fn = attention.attn_fn  # keep whatever backend was selected
        self.fuse_qkv = fuse_qkv
        if fuse_qkv:
            wqkv = torch.cat([self.to_q.weight.detach(), self.to_k.weight.detach(), self.to_v.weight.detach()])
            d = self.to_q.out_features
            self.to_q.weight.data, self.to_k.weight.data, self.to_v.weight.data = wqkv[:d], wqkv[d:2 * d], wqkv[2 * d:]
            self.register_buffer("wqkv", wqkv, persistent=False)

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> torch.Tensor:
        if self.fuse_qkv and all(type(m) is nn.Linear for m in (self.to_q, self.to_k, self.to_v)):
            q, k, v = F.linear(x, self.wqkv).unflatten(-1, (3 * self.n_heads, -1)).chunk(3, dim=2)  # (B, L, H, Dh)
        else:
            q = self.to_q(x).unflatten(-1, (self.n_heads, -1))  # (B, L, H, Dh)
            k = self.to_k(x).unflatten(-1, (self.n_heads, -1))
            v = self.to_v(x).unflatten(-1, (self.n_heads, -1))
        q, k = torch.ops.zimage.qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, *rope, self.norm_q.eps)
        out = self.attn_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, L, Dh)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class FusedFeedForward(nn.Module):
    """SwiGLU with the gate in ``zimage::silu_mul``; optionally w1 and w3 as one (2F, D) GEMM.

    With ``fuse_gate_up`` (a load-time fusion, off by default), ``w1.weight`` and ``w3.weight``
    stay Parameters (same names and state_dict keys) but become views of a concatenated ``w13``
    buffer: no extra memory, and in-place weight edits (``w1.weight.data.add_``,
    ``load_state_dict``) reach the fused GEMM. Apply it after the model is on its final device and
    dtype (``.to()`` copies the buffer and the parameters separately: still correct, no longer
    shared). If ``w1`` or ``w3`` is later replaced by another module (an fp8 swap), the forward
    calls the two modules again, so the replacement is not silently bypassed.
    """

    def __init__(self, ffn: FeedForward, fuse_gate_up: bool = False):
        super().__init__()
        self.w1, self.w2, self.w3 = ffn.w1, ffn.w2, ffn.w3
        self.hidden_dim = ffn.w1.out_features
        self.fuse_gate_up = fuse_gate_up
        if fuse_gate_up:
            w13 = torch.cat([ffn.w1.weight.detach(), ffn.w3.weight.detach()])
            self.w1.weight.data = w13[: self.hidden_dim]
            self.w3.weight.data = w13[self.hidden_dim :]
            self.register_buffer("w13", w13, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_gate_up and type(self.w1) is nn.Linear and type(self.w3) is nn.Linear:
            gate, up = F.linear(x, self.w13).split(self.hidden_dim, dim=-1)  # two strided views
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(torch.ops.zimage.silu_mul(gate, up))


class FusedTransformerBlock(nn.Module):
    """:class:`TransformerBlock` with its four sandwich norms in ``zimage::rms_norm`` (pre-norms,
    with the (1 + scale) modulation) and ``zimage::gated_rms_norm_residual`` (post-norms)."""

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm1, self.attention_norm2 = block.attention_norm1, block.attention_norm2
        self.ffn_norm1, self.ffn_norm2 = block.ffn_norm1, block.ffn_norm2
        self.modulation = block.modulation
        if block.modulation:
            self.adaLN_modulation = block.adaLN_modulation

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: torch.Tensor | None,
        c: torch.Tensor | None = None,
        mod: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`TransformerBlock.forward`: ``mod`` = adaLN_modulation(c), (B or 1, 4D), or ``c``."""
        rms_norm, residual = torch.ops.zimage.rms_norm, torch.ops.zimage.gated_rms_norm_residual
        n1, n2, f1, f2 = self.attention_norm1, self.attention_norm2, self.ffn_norm1, self.ffn_norm2
        if not self.modulation:
            x = residual(x, self.attention(rms_norm(x, n1.weight, n1.eps), rope, mask), n2.weight, n2.eps)
            return residual(x, self.feed_forward(rms_norm(x, f1.weight, f1.eps)), f2.weight, f2.eps)
        if mod is None:
            mod = self.adaLN_modulation(c)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)  # (B, 1, D) each
        attn = self.attention(rms_norm(x, n1.weight, n1.eps, scale_msa), rope, mask)
        x = residual(x, attn, n2.weight, n2.eps, gate_msa)
        ffn = self.feed_forward(rms_norm(x, f1.weight, f1.eps, scale_mlp))
        return residual(x, ffn, f2.weight, f2.eps, gate_mlp)


FUSED_NORMS_PER_MODULE = {FusedRMSNorm: 1, FusedAttention: 2, FusedTransformerBlock: 4}


def _replace(model: nn.Module, match: type, make, skip: frozenset[int] = frozenset()) -> int:
    """Replace every submodule of exactly type ``match`` (not in ``skip``) by ``make(module)``."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is match and name and id(m) not in skip]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(module))  # ModuleList children: by index name
    return len(targets)


def use_fused_attention_(model: nn.Module, fuse_qkv: bool = False) -> int:
    """Attention -> FusedAttention (zimage::qk_norm_rope; with ``fuse_qkv``, q|k|v as one GEMM)."""
    return _replace(model, Attention, lambda attn: FusedAttention(attn, fuse_qkv))


def use_fused_blocks_(model: nn.Module) -> int:
    """TransformerBlock -> FusedTransformerBlock (zimage::rms_norm, zimage::gated_rms_norm_residual)."""
    return _replace(model, TransformerBlock, FusedTransformerBlock)


def use_fused_swiglu_(model: nn.Module, fuse_gate_up: bool = False) -> int:
    """FeedForward -> FusedFeedForward (zimage::silu_mul; with ``fuse_gate_up``, w1|w3 as one GEMM)."""
    return _replace(model, FeedForward, lambda ffn: FusedFeedForward(ffn, fuse_gate_up))


def use_fused_rms_norm_(model: nn.Module) -> int:
    """RMSNorm -> FusedRMSNorm, except the norms whose math a fused block or attention already does."""
    owned = frozenset(
        id(norm)
        for module in model.modules() if isinstance(module, (FusedAttention, FusedTransformerBlock))
        for norm in module.children() if isinstance(norm, RMSNorm)
    )
    return _replace(model, RMSNorm, FusedRMSNorm.from_module, skip=owned)


def count_fused(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{what: (fused, total)} over the model, whether it was swapped once or several times."""
    modules = list(model.modules())
    norms_total = sum(isinstance(m, RMSNorm) for m in modules)
    norms_fused = sum(FUSED_NORMS_PER_MODULE.get(type(m), 0) for m in modules)

    def pair(fused: type, eager: type) -> tuple[int, int]:
        n = sum(type(m) is fused for m in modules)
        return n, n + sum(type(m) is eager for m in modules)

    return {
        "RMSNorm": (norms_fused, norms_total),
        "q/k RMSNorm + RoPE": pair(FusedAttention, Attention),
        "gated post-norm residual": tuple(2 * n for n in pair(FusedTransformerBlock, TransformerBlock)),
        "SwiGLU gate": pair(FusedFeedForward, FeedForward),
    }


def check_kernels_can_run(model: nn.Module) -> None:
    """Import the kernels (registering the ops) and check the model's device; raises RuntimeError."""
    kernels = load_kernels()
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cuda" and not kernels.INTERPRETED:
        raise AccelerationUnavailable(
            f"kernels='triton' runs on a CUDA (or ROCm) GPU, but the transformer is on {param.device}; use "
            "kernels='none' there (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for tests)"
        )


def drop_unused_fusions_(model: nn.Module) -> int:
    """After an fp8 swap of q/k/v or w1/w3, free the fused bf16 buffers that no longer serve."""
    dropped = 0
    for module in model.modules():
        if isinstance(module, FusedAttention) and module.fuse_qkv and not all(
                type(m) is nn.Linear for m in (module.to_q, module.to_k, module.to_v)):
            module.fuse_qkv = False
            del module._buffers["wqkv"]
            dropped += 1
        if isinstance(module, FusedFeedForward) and module.fuse_gate_up and not all(
                type(m) is nn.Linear for m in (module.w1, module.w3)):
            module.fuse_gate_up = False
            del module._buffers["w13"]
            dropped += 1
    return dropped


def use_fused_kernels(model: nn.Module, fuse_gate_up: bool = False, fuse_qkv: bool = False) -> list[str]:
    """Apply every kernel swap in place, in dependency order; returns one log line per fusion.

    Raises RuntimeError (before touching the model) when Triton is missing, or when the model is
    not on a CUDA device and the kernels were not built by the CPU interpreter.
    """
    check_kernels_can_run(model)
    use_fused_attention_(model, fuse_qkv)  # before the blocks: the blocks adopt whatever attention module they hold
    use_fused_blocks_(model)
    use_fused_swiglu_(model, fuse_gate_up)
    use_fused_rms_norm_(model)
    counts = count_fused(model)
    ops = {
        "RMSNorm": "zimage::rms_norm, zimage::gated_rms_norm_residual, zimage::qk_norm_rope",
        "q/k RMSNorm + RoPE": "zimage::qk_norm_rope" + (", q|k|v in one GEMM" if fuse_qkv else ""),
        "gated post-norm residual": "zimage::gated_rms_norm_residual",
        "SwiGLU gate": "zimage::silu_mul" + (", w1|w3 in one GEMM" if fuse_gate_up else ""),
    }
    return [f"fused {fused}/{total} {what} ({ops[what]})" for what, (fused, total) in counts.items()]
