"""Z-Image Fun-ControlNet-Union (versions 1.0, 2.0 and 2.1): a control branch that hints the DiT.

Mirrors diffusers 0.42.1 ``ZImageControlNetModel`` with the checkpoint's parameter names. The
branch is built from the DiT's own block (:class:`TransformerBlock`), so it runs through the same
attention seam and leaves as the DiT. It has no embedder, refiner or RoPE of its own: it borrows
the DiT's (``x_embedder``, ``x_pad_token``, the noise refiner), which are passed in, never stored,
as diffusers' ``from_transformer`` shares them.

Data flow for one step (c is the DiT's timestep conditioning, s the conditioning scale):

- control context: the control latents (B, Cc, H, W), patchified like the image, through
  ``control_all_x_embedder``, pad rows -> the DiT's ``x_pad_token``. Once per request.
- refiner stage, by version (``add_control_noise_refiner``):
  - 1.0 (None): the context goes through ``control_noise_refiner``, plain modulated DiT blocks;
    the image tokens go through the DiT's noise refiner unchanged;
  - 2.0 ("control_layers"): the control layers run as a chain over the image tokens (see below)
    and their first hints are added after the DiT's noise-refiner blocks
    ``control_refiner_layers_places``;
  - 2.1 ("control_noise_refiner"): the same with the dedicated ``control_noise_refiner`` chain.
  These refiner hints change only the branch's own copy of the image tokens: as in diffusers,
  the DiT itself receives the main-layer hints only.
- main stage: a chain of ``control_layers`` over the joint [image, caption] sequence. A chain
  starts from ctx = before_proj(ctx) + h (h: the tokens it follows) and each block k emits
  after_proj(ctx) * s, the hint that the DiT adds after its layer ``control_layers_places[k]``.

Shapes as in ``model/transformer.py``: B batch, Nx image tokens, Lc caption tokens, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ControlNetConfig, TransformerConfig
from .sequence import SequenceLayout
from .transformer import Rope, TransformerBlock, ZImageTransformer


class ControlTransformerBlock(TransformerBlock):
    """A modulated DiT block (its forward unchanged) that carries zero-initialised projections (in
    the checkpoints they are trained): ``before_proj`` on the first block of a chain only,
    ``after_proj`` on every one. :meth:`ZImageControlNet._chain` applies them around the block, so
    whatever replaces or compiles DiT blocks treats these blocks the same way."""

    def __init__(self, config: TransformerConfig, first: bool):
        super().__init__(config, modulation=True)
        self.before_proj = nn.Linear(config.dim, config.dim) if first else None
        self.after_proj = nn.Linear(config.dim, config.dim)


def _check_fits(config: ControlNetConfig, dit: TransformerConfig) -> None:
    if (config.dim, config.n_heads, config.norm_eps, config.patch_size) != (
            dit.dim, dit.n_heads, dit.norm_eps, dit.patch_size):
        raise ValueError(
            f"the ControlNet (dim {config.dim}, n_heads {config.n_heads}, norm_eps {config.norm_eps}, patch "
            f"{config.patch_size}) does not fit the DiT (dim {dit.dim}, n_heads {dit.n_heads}, norm_eps "
            f"{dit.norm_eps}, patch {dit.patch_size})")
    if max(config.control_layers_places) >= dit.n_layers:
        raise ValueError(f"control_layers_places {list(config.control_layers_places)} reach past the DiT's "
                         f"{dit.n_layers} layers")
    refiner = config.control_refiner_layers_places
    if config.add_control_noise_refiner is not None and max(refiner) >= dit.n_refiner_layers:
        raise ValueError(f"control_refiner_layers_places {list(refiner)} reach past the DiT's "
                         f"{dit.n_refiner_layers} noise-refiner layers")
    if config.control_in_dim < dit.in_channels:
        raise ValueError(f"control_in_dim {config.control_in_dim} is narrower than the DiT's {dit.in_channels} "
                         f"latent channels")


class ZImageControlNet(nn.Module):
    """The control branch for a DiT of config ``transformer_config`` (built with the DiT's blocks).

    Per step: :meth:`step` -> the ``control_hints`` ({DiT layer index: (B, Nx + Lc, D)}) and the
    ``image_tokens`` arguments of :meth:`ZImageTransformer.forward_tokens`. :meth:`forward` does a
    whole step for tests.
    """

    def __init__(self, config: ControlNetConfig, transformer_config: TransformerConfig):
        super().__init__()
        _check_fits(config, transformer_config)
        self.config = config
        blocks = transformer_config
        self.control_layers = nn.ModuleList(
            ControlTransformerBlock(blocks, first=k == 0) for k in range(len(config.control_layers_places)))
        p, f = config.patch_size, config.all_f_patch_size[0]
        self._key = f"{p}-{f}"
        self.control_all_x_embedder = nn.ModuleDict(
            {self._key: nn.Linear(f * p * p * config.control_in_dim, config.dim)})
        variant = config.add_control_noise_refiner
        if variant is None:
            self.control_noise_refiner = nn.ModuleList(
                TransformerBlock(blocks, modulation=True) for _ in range(config.n_refiner_layers))
        elif variant == "control_noise_refiner":
            self.control_noise_refiner = nn.ModuleList(
                ControlTransformerBlock(blocks, first=k == 0) for k in range(config.n_refiner_layers))
        else:  # "control_layers": the control layers double as the refiner stage
            self.control_noise_refiner = None

    @property
    def control_x_embedder(self) -> nn.Linear:
        return self.control_all_x_embedder[self._key]

    def _refiner_blocks(self) -> list[nn.Module]:
        return list(self.control_noise_refiner) if self.control_noise_refiner is not None else []

    def modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Every modulation vector for conditioning c (B, 256): one (B, 4D) per refiner block, then
        one per control layer, in that order (what :meth:`step` takes as ``mods``)."""
        return [b.adaLN_modulation(c) for b in (*self._refiner_blocks(), *self.control_layers)]

    def embed_control(self, control: torch.Tensor, layout: SequenceLayout, x_pad_token: torch.Tensor) -> torch.Tensor:
        """Patchified control latents (B, Nx, p*p*Cc) -> control context (B, Nx, D); pad rows get the
        DiT's ``x_pad_token``, as the image tokens do. Independent of t: once per request."""
        ctx = self.control_x_embedder(control)
        return torch.where(layout.image_pad[..., None], x_pad_token, ctx)

    @staticmethod
    def _chain(blocks, mods, ctx: torch.Tensor, h: torch.Tensor, rope: Rope, mask: torch.Tensor | None,
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Control blocks over (control state, the tokens the chain follows), all (B, L, D): the
        first adds before_proj(state) to h, each emits after_proj(its output) as a hint.
        Returns (final state, hints)."""
        hints = []
        for block, mod in zip(blocks, mods):
            if block.before_proj is not None:
                ctx = block.before_proj(ctx) + h
            ctx = block(ctx, rope, mask, mod=mod)
            hints.append(block.after_proj(ctx))
        return ctx, hints

    def step(
        self,
        dit: ZImageTransformer,
        x: torch.Tensor,
        cap_tokens: torch.Tensor,
        ctx: torch.Tensor,
        layout: SequenceLayout,
        dit_mods: list[torch.Tensor],
        mods: list[torch.Tensor],
        scale: float | torch.Tensor = 1.0,
    ) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """One step of the branch. ``x``: image tokens (B, Nx, p*p*C) as the DiT gets them;
        ``cap_tokens``: the refined caption tokens (B, Lc, D); ``ctx``: :meth:`embed_control`;
        ``dit_mods``: the DiT's modulations (``dit.modulations(c)``); ``mods``: :meth:`modulations`.

        Returns the keyword arguments of ``dit.forward_tokens``: ``control_hints`` {DiT layer index:
        hint * scale}, each (B, Nx + Lc, D), and ``image_tokens``, the DiT's own refined image tokens
        (B, Nx, D). The branch needs the DiT's image embedding and noise refiner too (2.x: with its
        refiner hints added), so the part both compute alike runs once here: the embedding and the
        refiner blocks up to the first block with a hint (1.0: all of them)."""
        config, n_ref = self.config, len(self._refiner_blocks())
        refiner_mods, layer_mods = mods[:n_ref], mods[n_ref:]
        variant = config.add_control_noise_refiner
        image = dit.embed_image(x, layout)
        refiner_hints = None
        if variant is None:
            for block, mod in zip(self.control_noise_refiner, refiner_mods):
                ctx = block(ctx, layout.image_rope, None, mod=mod)
        else:
            chain = (self.control_layers, layer_mods) if variant == "control_layers" else \
                (self.control_noise_refiner, refiner_mods)
            ctx, out = self._chain(*chain, ctx, image, layout.image_rope, None)
            refiner_hints = {i: out[k] * scale for k, i in enumerate(config.control_refiner_layers_places)}
        # The DiT's refiner blocks up to the first one with a hint are the same for both: run once.
        shared = len(dit.noise_refiner) if variant is None else min(config.control_refiner_layers_places) + 1
        image = dit.refine_image(image, layout, dit_mods, stop=shared)
        own = dit.refine_image(image, layout, dit_mods, start=shared)
        if variant is not None:
            image = dit.refine_image(image + refiner_hints[shared - 1], layout, dit_mods, refiner_hints, start=shared)
        h = torch.cat([image, cap_tokens], dim=1)  # the DiT's joint sequence (with these refiner hints)
        ctx = torch.cat([ctx, cap_tokens], dim=1)
        _, out = self._chain(self.control_layers, layer_mods, ctx, h, layout.joint_rope, layout.joint_mask)
        return {"control_hints": {i: out[k] * scale for k, i in enumerate(config.control_layers_places)},
                "image_tokens": own}

    def forward(
        self,
        dit: ZImageTransformer,
        x: torch.Tensor,
        cap: torch.Tensor,
        t: torch.Tensor,
        control: torch.Tensor,
        layout: SequenceLayout,
        scale: float | torch.Tensor = 1.0,
    ) -> dict[int, torch.Tensor]:
        """A whole step from raw inputs (the DiT's ``forward`` arguments plus the patchified control
        latents (B, Nx, p*p*Cc)): :meth:`step`'s keyword arguments for ``dit.forward_tokens``."""
        c = dit.time_embedding(t, x.dtype)
        ctx = self.embed_control(control, layout, dit.x_pad_token)
        return self.step(dit, x, dit.encode_caption(cap, layout), ctx, layout, dit.modulations(c),
                         self.modulations(c), scale)
