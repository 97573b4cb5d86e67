"""The Z-Image single-stream DiT (6.15 B parameters for the released config).

Mirrors diffusers 0.42.1 ``ZImageTransformer2DModel`` (text-to-image path) and the official
Tongyi-MAI ``src/zimage/transformer.py``, with the checkpoint's own parameter names so a diffusers
``transformer/`` folder loads without renaming. The forward takes tensors prepared by
``model.sequence`` (patchified latents, padded caption features, RoPE tables, masks).

Data flow: t -> t_embedder -> c (B, 256). Image tokens: x_embedder, pad rows -> x_pad_token,
2 noise-refiner blocks (modulated by c). Caption tokens: cap_embedder (RMSNorm + Linear), pad rows
-> cap_pad_token, 2 context-refiner blocks (no modulation). Joint [image, caption] sequence:
30 modulated blocks. Final layer on the image rows.

Numerics kept for parity: sandwich RMSNorms (pre and post each sub-layer), scales 1 + s, gates
tanh(g), no shift terms; block adaLN is a bare Linear on c, the final layer's adaLN has a SiLU;
the timestep sinusoid, RMSNorm statistics and RoPE run in fp32.

Shape legend: B batch, Nx image tokens, Lc caption tokens, L = Nx + Lc, D model dim,
H heads, Dh head dim (= sum(axes_dims)).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TransformerConfig
from .attention import attention
from .layers import FeedForward, ModulatedRMSNorm, PostNormResidual, QKNormRoPE, RMSNorm, Rope, TimestepEmbedder
from .sequence import SequenceLayout


class Attention(nn.Module):
    """Self-attention with per-head q/k RMSNorm and RoPE. (B, L, D) -> (B, L, D).

    ``to_qkv`` is an optional load-time fusion (set from outside the model, see
    ``zimage_native.accel.fusions``): one module computing [q | k | v] in one GEMM. It holds no
    state_dict entries; to_q, to_k and to_v stay the checkpoint's parameters.
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # key "to_out.0", as in diffusers
        self.norm_q = RMSNorm(head_dim, eps=1e-5)  # 1e-5 is hard-coded in the reference, not norm_eps
        self.norm_k = RMSNorm(head_dim, eps=1e-5)
        self.qk_norm_rope = QKNormRoPE()
        self.to_qkv: nn.Module | None = None
        self.attn_fn = attention  # the seam that accel/ swaps for another backend

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> torch.Tensor:
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).unflatten(-1, (3 * self.n_heads, -1)).chunk(3, dim=2)  # (B, L, H, Dh)
        else:
            q = self.to_q(x).unflatten(-1, (self.n_heads, -1))  # (B, L, H, Dh)
            k = self.to_k(x).unflatten(-1, (self.n_heads, -1))
            v = self.to_v(x).unflatten(-1, (self.n_heads, -1))
        q, k = self.qk_norm_rope(q, k, self.norm_q, self.norm_k, rope)
        out = self.attn_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, L, Dh)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Attention + SwiGLU with sandwich norms; modulated by c unless it is a context-refiner block.

    Written once, from leaves (``model.layers``): the pre-norms are ModulatedRMSNorm, the
    post-norms with their tanh-gated residual adds are PostNormResidual. Without modulation the
    scales and gates are None (plain norms, plain residual adds).
    """

    def __init__(self, config: TransformerConfig, modulation: bool):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attention = Attention(dim, config.n_heads)
        self.feed_forward = FeedForward(dim, config.ffn_dim)
        self.attention_norm1 = ModulatedRMSNorm(dim, eps)
        self.attention_norm2 = PostNormResidual(dim, eps)
        self.ffn_norm1 = ModulatedRMSNorm(dim, eps)
        self.ffn_norm2 = PostNormResidual(dim, eps)
        self.modulation = modulation
        if modulation:
            # A bare Linear on c (no SiLU in front), unlike the final layer.
            self.adaLN_modulation = nn.Sequential(nn.Linear(config.adaln_dim, 4 * dim))

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: torch.Tensor | None,
        c: torch.Tensor | None = None,
        mod: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mod`` = adaLN_modulation(c), (B or 1, 4D), may be given precomputed instead of ``c``."""
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.modulation:
            if mod is None:
                mod = self.adaLN_modulation(c)
            # (B, 1, D) each, in the order of the checkpoint's rows.
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
        x = self.attention_norm2(x, self.attention(self.attention_norm1(x, scale_msa), rope, mask), gate_msa)
        return self.ffn_norm2(x, self.feed_forward(self.ffn_norm1(x, scale_mlp)), gate_mlp)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) * (1 + scale(c)), then Linear to p*p*C. (B, N, D) -> (B, N, p*p*C)."""

    def __init__(self, dim: int, out_dim: int, adaln_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale`` = 1 + adaLN_modulation(c), (B or 1, D), may be given precomputed instead of ``c``."""
        if scale is None:
            scale = 1.0 + self.adaLN_modulation(c)
        return self.linear(self.norm_final(x) * scale.unsqueeze(1))


class ZImageTransformer(nn.Module):
    """The DiT. forward(x (B, Nx, p*p*C), cap (B, Lc, cap_feat_dim), t (B,), layout) -> (B, Nx, p*p*C).

    ``t`` is the model time in [0, 1): 0 is pure noise (the pipeline passes 1 - sigma).
    The output approximates x0 - noise (the negative of the flow velocity).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim, key = config.dim, f"{config.patch_size}-{config.all_f_patch_size[0]}"
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(config.patch_dim, dim)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(dim, config.patch_dim, config.adaln_dim)})
        self.t_embedder = TimestepEmbedder(config.adaln_dim, mid_dim=1024)
        self.cap_embedder = nn.Sequential(
            RMSNorm(config.cap_feat_dim, eps=config.norm_eps), nn.Linear(config.cap_feat_dim, dim)
        )
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.noise_refiner = nn.ModuleList(TransformerBlock(config, True) for _ in range(config.n_refiner_layers))
        self.context_refiner = nn.ModuleList(
            TransformerBlock(config, False) for _ in range(config.n_refiner_layers)
        )
        self.layers = nn.ModuleList(TransformerBlock(config, True) for _ in range(config.n_layers))
        self._key = key

    @property
    def in_channels(self) -> int:
        """The latent channels it takes (``config.in_channels``), as diffusers' model exposes it."""
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        """The latent channels it predicts: as many as it takes (diffusers' ``out_channels``)."""
        return self.config.in_channels

    @property
    def x_embedder(self) -> nn.Linear:
        return self.all_x_embedder[self._key]

    @property
    def final_layer(self) -> FinalLayer:
        return self.all_final_layer[self._key]

    # The forward in stages, so that per-request and per-schedule work can be done once
    # (caption tokens do not depend on t; the modulation vectors depend only on t).
    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B,) model time -> c (B, 256) in ``dtype``; t * t_scale and the sinusoid stay in fp32."""
        return self.t_embedder(t * self.config.t_scale).to(dtype)

    def modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Every modulation vector for conditioning c: one (B, 4D) per noise-refiner block and main
        block, in execution order, then the final layer's (B, D) scale 1 + s."""
        blocks = [b.adaLN_modulation(c) for b in (*self.noise_refiner, *self.layers)]
        return blocks + [1.0 + self.final_layer.adaLN_modulation(c)]

    def encode_caption(self, cap: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Caption features (B, Lc, cap_feat_dim) -> refined caption tokens (B, Lc, D)."""
        cap = self.cap_embedder(cap)
        cap = torch.where(layout.caption_pad[..., None], self.cap_pad_token, cap)  # pad rows are learned tokens
        for block in self.context_refiner:
            cap = block(cap, layout.caption_rope, layout.caption_mask)
        return cap

    def embed_image(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Image tokens (B, Nx, p*p*C) -> (B, Nx, D); pad rows are the learned ``x_pad_token``."""
        x = self.x_embedder(x)
        return torch.where(layout.image_pad[..., None], self.x_pad_token, x)

    def refine_image(
        self,
        x: torch.Tensor,
        layout: SequenceLayout,
        mods: list[torch.Tensor],
        control_hints: dict[int, torch.Tensor] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Noise-refiner blocks ``start`` to ``stop`` (all by default) over embedded image tokens
        (B, Nx, D); ``mods`` holds one modulation per block from block 0 (the DiT's ``mods`` do).
        ``control_hints`` {block index: (B, Nx, D)} are added after those blocks (ControlNet 2.x)."""
        for i in range(start, len(self.noise_refiner) if stop is None else stop):
            x = self.noise_refiner[i](x, layout.image_rope, None, mod=mods[i])  # one Nx for all: no mask
            if control_hints is not None and i in control_hints:
                x = x + control_hints[i]
        return x

    def forward_tokens(
        self,
        x: torch.Tensor,
        cap_tokens: torch.Tensor,
        c: torch.Tensor | None,
        layout: SequenceLayout,
        mods: list[torch.Tensor] | None = None,
        control_hints: dict[int, torch.Tensor] | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image tokens (B, Nx, p*p*C) + refined caption tokens -> (B, Nx, p*p*C).

        Conditioning is ``c`` or, precomputed, ``mods = self.modulations(c)``. ``control_hints``
        {main layer index: (B, Nx + Lc, D)} are added to the joint sequence after those layers: the
        ControlNet hook (``model/controlnet.py``); the static dict keys keep the loop graph-friendly.
        ``image_tokens``: ``x`` already embedded and refined (B, Nx, D), by the ControlNet's step,
        which needs them too.
        The three stages (joint sequence, main layers, final layer) are also methods, for callers
        that run the main layers in parts (the first-block cache, ``accel/block_cache.py``).
        """
        if mods is None:
            mods = self.modulations(c)
        h = self.joint_tokens(x, cap_tokens, layout, mods, image_tokens)
        return self.final_tokens(self.run_layers(h, layout, mods, control_hints), x.shape[1], mods)

    def joint_tokens(self, x: torch.Tensor, cap_tokens: torch.Tensor, layout: SequenceLayout,
                     mods: list[torch.Tensor], image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens (B, Nx, p*p*C), embedded and refined (or ``image_tokens``, already so), then
        the caption tokens: (B, L, D)."""
        if image_tokens is None:
            image_tokens = self.refine_image(self.embed_image(x, layout), layout, mods)
        return torch.cat([image_tokens, cap_tokens], dim=1)  # [image, caption]

    def run_layers(self, h: torch.Tensor, layout: SequenceLayout, mods: list[torch.Tensor],
                   control_hints: dict[int, torch.Tensor] | None = None, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        """Main layers ``start`` to ``stop`` (all by default) over the joint sequence (B, L, D),
        each followed by its control hint, if any."""
        n = len(self.noise_refiner)
        for i in range(start, len(self.layers) if stop is None else stop):
            h = self.layers[i](h, layout.joint_rope, layout.joint_mask, mod=mods[n + i])
            if control_hints is not None and i in control_hints:
                h = h + control_hints[i]
        return h

    def final_tokens(self, h: torch.Tensor, num_image: int, mods: list[torch.Tensor]) -> torch.Tensor:
        """The final layer on the first ``num_image`` rows (the image; the layer is row-wise)."""
        return self.final_layer(h[:, :num_image], scale=mods[-1])

    def forward(self, x: torch.Tensor, cap: torch.Tensor, t: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        c = self.time_embedding(t, x.dtype)  # (B, 256)
        return self.forward_tokens(x, self.encode_caption(cap, layout), c, layout)
