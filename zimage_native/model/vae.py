"""The Z-Image VAE: the FLUX-family 16-channel ``AutoencoderKL``.

Shapes (``s = config.scale_factor = 2 ** (len(block_out_channels) - 1)``, 8 for the released VAE):

- ``encode``: image in [-1, 1], (B, 3, H, W) -> (mean, logvar), each (B, 16, H/s, W/s);
- ``decode``: latent (B, 16, h, w) -> image (B, 3, s*h, s*w), roughly in [-1, 1].

The two methods take diffusers' call forms, as scripts that decode by hand call them:
``decode(z).sample`` (or ``decode(z)[0]``) and ``decode(z, return_dict=False)[0]`` are the image
batch; ``encode(x)`` is a :class:`Moments` (``mean, logvar = vae.encode(x)``) whose ``latent_dist``
is diffusers' posterior (:class:`Gaussian`), and ``encode(x, return_dict=False)`` is
``(latent_dist,)``.

The released VAE has no quant_conv / post_quant_conv; a config with ``use_quant_conv`` /
``use_post_quant_conv`` gets them (1x1 convolutions after the encoder and before the decoder, as in
diffusers). There is no latent scaling here: the pipeline applies ``z / scaling_factor +
shift_factor`` before ``decode`` (and the inverse after ``encode``).

Parameter names are those of diffusers' ``AutoencoderKL`` state dict, so a diffusers ``vae/``
folder loads without renaming. Numerics mirror diffusers 0.42.1 (``Encoder``/``Decoder``,
``ResnetBlock2D``, ``Downsample2D``/``Upsample2D``, the mid-block ``Attention`` run by
``AttnProcessor2_0``) with tiling and slicing off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .attention import attention

NORM_EPS = 1e-6  # every GroupNorm in this VAE, including the attention's


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """Two GroupNorm -> SiLU -> 3x3 conv stages added to the input (through a 1x1 conv if the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The checkpoint was trained with padding only on the right and bottom (the original LDM
        # code), not a symmetric padding=1: the two differ in which pixels each output sees.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a pre-GroupNorm and a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # ".0" in the key names
        # The attention seam; swappable from outside like every other attention module. Note the
        # head dim is the full width (512) and L = H*W, which some fast kernels do not support.
        self.attn_fn = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # One head of width C: (B, 1, HW, C); the seam's default scale is 1/sqrt(C).
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](self.attn_fn(q, k, v).squeeze(1))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResnetBlock -> (optional) self-attention -> ResnetBlock at constant width."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """Encoder stage: ResnetBlocks, then an optional Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """Decoder stage: ResnetBlocks, then an optional Upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/s, W/s): mean then logvar."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups, i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, s*h, s*w)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        # Each up block has one more resnet than a down block, as in the original LDM decoder.
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.conv_norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class DecoderOutput:
    """What ``decode(z)`` returns: ``.sample`` (and ``[0]``) is the image batch (B, 3, H, W), as diffusers'."""

    sample: torch.Tensor

    def __getitem__(self, index):
        return (self.sample,)[index]

    def __getattr__(self, name: str):
        # Only names the class does not have reach here. decode(z) was the image tensor itself up to
        # now: a tensor's name on its result says where the tensor went.
        if not name.startswith("__") and hasattr(torch.Tensor, name):
            raise AttributeError(f"'DecoderOutput' object has no attribute {name!r}: vae.decode(z) returns "
                                 f"diffusers' output, whose .sample is the image tensor (B, 3, H, W) "
                                 f"(or decode(z, return_dict=False)[0])")
        raise AttributeError(f"'DecoderOutput' object has no attribute {name!r}")


def _normal(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' ``randn_tensor``: on the generator's device, then
    moved; a list of generators draws one batch row each (a list of one is one generator)."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"latent_dist.sample: {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([_normal((1, *shape[1:]), g, device, dtype) for g in generator])
    where = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


class Gaussian:
    """The latent posterior (diffusers' ``latent_dist``): ``mean``, ``logvar`` (clamped by ``encode``),
    ``std``, ``var``, ``mode()`` and ``sample(generator)``. Its latents are unscaled: diffusers scales
    them with ``(z - shift_factor) * scaling_factor``."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        return self.mean + self.std * _normal(self.mean.shape, generator, self.mean.device, self.mean.dtype)


class Moments(NamedTuple):
    """What ``encode(x)`` returns: the pair ``(mean, logvar)``, with diffusers' ``latent_dist``."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def latent_dist(self) -> Gaussian:
        return Gaussian(self.mean, self.logvar)


class AutoencoderKL(nn.Module):
    """The KL autoencoder: ``encode`` gives the latent Gaussian's (mean, logvar), ``decode`` maps latents to images."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments, latent = 2 * config.latent_channels, config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (diffusers' ``vae.dtype``, which its pipeline casts the latents to)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the weights are (with ``offload="model"`` the CPU between runs, as diffusers')."""
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Moments | tuple[Gaussian]:
        """(B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, H/s, W/s), as a
        :class:`Moments`; ``return_dict=False``: ``(latent_dist,)``, as diffusers."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        # Same clamp as diffusers' DiagonalGaussianDistribution, so exp(0.5 * logvar) stays finite.
        moments = Moments(mean, logvar.clamp(-30.0, 20.0))
        return moments if return_dict else (moments.latent_dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """(B, latent_channels, h, w), already un-scaled by the caller -> (B, 3, s*h, s*w): a
        :class:`DecoderOutput` (``.sample``), or with ``return_dict=False`` the tuple ``(image,)``."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)
        return DecoderOutput(image) if return_dict else (image,)
