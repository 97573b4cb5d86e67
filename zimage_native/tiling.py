"""Tiled VAE decode and encode, for images too large to run through the VAE in one piece.

The image (or latent) is cut into overlapping square tiles; each tile runs through the VAE alone,
and the outputs are blended with weights that ramp linearly across each overlap, so there are no
seams. Memory then scales with the tile, not the image. GroupNorm statistics are per tile, so the
result is close to, but not equal to, the untiled one; it is an opt-in.

Sizes are in pixels: ``tile_size`` 512 and ``overlap`` 64 mean 512x512 image tiles (64x64
latent tiles) that share 64-pixel borders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TileConfig:
    tile_size: int = 512  # pixels
    overlap: int = 64  # pixels

    def __post_init__(self):
        if self.tile_size < 64 or self.tile_size % 16:
            raise ValueError(f"tile_size must be a multiple of 16 and at least 64, got {self.tile_size}")
        if self.overlap < 0 or self.overlap % 16 or self.overlap >= self.tile_size // 2:
            raise ValueError(
                f"overlap must be a multiple of 16, >= 0 and smaller than half the tile size "
                f"({self.tile_size // 2}), got {self.overlap}"
            )


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering [0, length) with tiles of ``tile`` that overlap by at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(size: int, lead: int, trail: int, device) -> torch.Tensor:
    """1-D blend weights: rising over ``lead`` samples, falling over ``trail`` samples, 1 in between."""
    w = torch.ones(size, device=device)
    if lead:
        w[:lead] = torch.arange(1, lead + 1, device=device) / (lead + 1)
    if trail:
        w[size - trail:] = torch.arange(trail, 0, -1, device=device) / (trail + 1)
    return w


def _shared(starts: list[int], a: int, b: int, tile: int, scale: float) -> int:
    """Overlap (in output units) between tiles a and b of a row of starts; 0 if either is missing."""
    if a < 0 or b >= len(starts):
        return 0
    return max(0, round((starts[a] + tile - starts[b]) * scale))


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: float
) -> torch.Tensor:
    """Apply a spatial map ``fn`` (output size = input size * scale) tile by tile and blend.

    ``tile`` and ``overlap`` are in input units. Weights ramp across the overlap with each
    neighbour and are normalised, so a constant field stays constant.
    """
    b, _, h, w = x.shape
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    out = weight = None
    for iy, y in enumerate(ys):
        for ix, x0 in enumerate(xs):
            th, tw = min(tile, h - y), min(tile, w - x0)
            piece = fn(x[:, :, y:y + th, x0:x0 + tw]).float()
            if out is None:
                out = torch.zeros(b, piece.shape[1], round(h * scale), round(w * scale), device=piece.device)
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=piece.device)
            oy, ox, ph, pw = round(y * scale), round(x0 * scale), piece.shape[2], piece.shape[3]
            # Ramp across the real overlap with each neighbour (none at the image border): two
            # neighbours ramp over the same region in opposite directions, so the blend is smooth.
            wy = _ramp(ph, _shared(ys, iy - 1, iy, tile, scale), _shared(ys, iy, iy + 1, tile, scale), piece.device)
            wx = _ramp(pw, _shared(xs, ix - 1, ix, tile, scale), _shared(xs, ix, ix + 1, tile, scale), piece.device)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, oy:oy + ph, ox:ox + pw] += piece * mask
            weight[:, :, oy:oy + ph, ox:ox + pw] += mask
    return out / weight


def tiled_decode(vae, z: torch.Tensor, config: TileConfig, scale_factor: int = 8) -> torch.Tensor:
    """VAE decode (B, C, h, w) -> (B, 3, 8h, 8w) tile by tile; returns fp32."""
    tile, overlap = config.tile_size // scale_factor, config.overlap // scale_factor
    return tiled_apply(lambda t: vae.decode(t, return_dict=False)[0], z, tile, overlap, scale_factor)


def tiled_encode(vae, x: torch.Tensor, config: TileConfig, scale_factor: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE encode (B, 3, H, W) -> (mean, logvar) tile by tile; returns fp32."""
    moments = tiled_apply(lambda t: torch.cat(vae.encode(t), dim=1), x, config.tile_size, config.overlap,
                          1 / scale_factor)
    return moments.chunk(2, dim=1)
