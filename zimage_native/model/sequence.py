"""The DiT's input layout: patchify/unpatchify, padding to multiples of 32, positions, RoPE, masks.

Everything here runs once per request, outside ``ZImageTransformer.forward``, so the forward
sees fixed-shape tensors only (no per-item lists, loops or boolean-mask writes).

Layout of one batch item (Z-Image reference semantics):

- image tokens: N = (H/16) * (W/16) patches, padded to Nx = ceil32(N) with ``x_pad_token`` rows;
- caption tokens: L real rows, padded to Lc = ceil32(L) with ``cap_pad_token`` rows;
- the pad-to-32 rows are real tokens: attended, with positions. Only *batch* padding (items with
  shorter captions in a batch that mixes 32-token classes) is masked: the engine pads a caption
  to its multiple of 32 and no further, so a single-image request has no mask (the shape policy
  of docs/performance.md; ``caption_tokens`` pads further, for tests and callers that want it);
- positions: caption row j -> (1 + j, 0, 0) for j < Lc; image patch (h, w) -> (Lc + 1, h, w);
  image pad rows -> (0, 0, 0);
- the joint sequence is [image (Nx), caption (Lc_max)]. Because every item of a batch has the
  same image size, this equals the reference's per-item [image, caption] followed by batch padding.

Apple's Metal (device "mps") has no float64, which the RoPE angles need, nor have Intel's Arc GPUs
("xpu"): for such a device the layout is built on the CPU and then moved over, once per request
(every step shares it).

Shape legend: B batch, C latent channels, Nx padded image tokens, Lc padded caption tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.nn import functional as F

from ..config import TransformerConfig
from .rope import rope_cos_sin

SEQ_MULTIPLE = 32
#: Device types that may lack float64 (Apple's Metal; Intel's Arc GPUs, "xpu", have no fp64 hardware):
#: layouts for them are built on the CPU.
NO_FLOAT64 = frozenset({"mps", "xpu"})


def ceil_to(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


@dataclass
class SequenceLayout:
    """Static per-request tensors that the DiT forward reads (see the module docstring)."""

    image_pad: torch.Tensor  # (B, Nx) bool: rows replaced by x_pad_token
    caption_pad: torch.Tensor  # (B, Lc) bool: rows replaced by cap_pad_token
    image_rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, Nx, Dh/2) fp32
    caption_rope: tuple[torch.Tensor, torch.Tensor]  # (B, Lc, Dh/2)
    joint_rope: tuple[torch.Tensor, torch.Tensor]  # (B, Nx + Lc, Dh/2)
    caption_mask: torch.Tensor | None  # (B, Lc) bool key mask, None when nothing is batch padding
    joint_mask: torch.Tensor | None  # (B, Nx + Lc)
    num_patches: int  # N, real image tokens per item
    grid: tuple[int, int]  # (H/16, W/16) in tokens

    def to(self, device: torch.device | str) -> SequenceLayout:
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            return tuple(move(v) for v in value) if isinstance(value, tuple) else value
        return SequenceLayout(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def build_layout(
    config: TransformerConfig,
    caption_lengths: list[int],
    latent_height: int,
    latent_width: int,
    device: torch.device | str = "cpu",
    caption_tokens: int | None = None,
) -> SequenceLayout:
    """Positions, RoPE tables, pad flags and masks for a batch.

    ``caption_lengths`` are the real caption lengths L_i. ``caption_tokens`` (optional) pads the
    caption axis further to a fixed length (a static-shape bucket); those extra rows are masked,
    and the masks are then always tensors (never None), so every prompt gives the same graph.
    """
    p = config.patch_size
    if latent_height % p or latent_width % p:
        raise ValueError(f"latent size {latent_height}x{latent_width} must be divisible by the patch size {p}")
    if not caption_lengths or min(caption_lengths) < 1:
        raise ValueError(f"every caption needs at least one token, got lengths {caption_lengths}")
    gh, gw = latent_height // p, latent_width // p
    n, nx = gh * gw, ceil_to(gh * gw)
    padded = [ceil_to(length) for length in caption_lengths]
    lc = max(padded) if caption_tokens is None else caption_tokens
    if lc < max(padded):
        raise ValueError(f"caption_tokens {lc} is shorter than the longest padded caption {max(padded)}")
    check_positions(config, max(padded), gh, gw)
    if torch.device(device).type in NO_FLOAT64:
        return build_layout(config, caption_lengths, latent_height, latent_width, "cpu", caption_tokens).to(device)
    b = len(caption_lengths)

    rows = torch.arange(lc, device=device)
    real = torch.tensor(caption_lengths, device=device)[:, None]
    lc_i = torch.tensor(padded, device=device)[:, None]
    caption_pad = (rows >= real) & (rows < lc_i)  # (B, Lc)
    caption_valid = rows < lc_i
    caption_pos = torch.zeros(b, lc, 3, dtype=torch.int64, device=device)
    caption_pos[..., 0] = torch.where(caption_valid, rows + 1, 0)

    hh, ww = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    image_pos = torch.zeros(b, nx, 3, dtype=torch.int64, device=device)
    image_pos[:, :n, 0] = lc_i + 1
    image_pos[:, :n, 1] = hh.flatten()
    image_pos[:, :n, 2] = ww.flatten()
    image_pad = (torch.arange(nx, device=device) >= n).expand(b, nx)

    image_rope = rope_cos_sin(image_pos, config.axes_dims, config.rope_theta)
    caption_rope = rope_cos_sin(caption_pos, config.axes_dims, config.rope_theta)
    joint_rope = tuple(torch.cat([i, c], dim=1) for i, c in zip(image_rope, caption_rope))

    if caption_tokens is None and min(padded) == lc:  # from the lengths: no device read
        caption_mask = joint_mask = None
    else:
        caption_mask = caption_valid
        joint_mask = torch.cat([torch.ones(b, nx, dtype=torch.bool, device=device), caption_valid], dim=1)
    return SequenceLayout(
        image_pad=image_pad,
        caption_pad=caption_pad,
        image_rope=image_rope,
        caption_rope=caption_rope,
        joint_rope=joint_rope,
        caption_mask=caption_mask,
        joint_mask=joint_mask,
        num_patches=n,
        grid=(gh, gw),
    )


def check_positions(config: TransformerConfig, padded_caption: int, gh: int, gw: int) -> None:
    """The reference indexes RoPE tables of length axes_lens; stay inside them, with a clear error."""
    needs = (padded_caption + 1, gh - 1, gw - 1)
    for axis, (need, length) in enumerate(zip(needs, config.axes_lens)):
        if need >= length:
            what = ("caption length", "image height", "image width")[axis]
            raise ValueError(
                f"{what} out of range: RoPE axis {axis} needs position {need} but axes_lens[{axis}] is {length}"
            )


def pad_captions(features: list[torch.Tensor], caption_tokens: int) -> torch.Tensor:
    """A list of (L_i, D) caption features -> (B, caption_tokens, D), zero-filled after each L_i.

    The fill is irrelevant: pad-to-32 rows are replaced by cap_pad_token and batch rows are masked.
    """
    return torch.stack([F.pad(f, (0, 0, 0, caption_tokens - f.shape[0])) for f in features])


def patchify(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, Nx, p*p*C) tokens, row-major over the patch grid, channel fastest.

    Inside a token the index is (a*p + b)*C + c for pixel (2i+a, 2j+b) of channel c (not Flux's
    (c, a, b) packing). Rows are zero-padded up to Nx = ceil32(N).
    """
    b, c, h, w = latents.shape
    p = patch_size
    tokens = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    n = tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, ceil_to(n) - n))


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], channels: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, Nx, p*p*C) -> (B, C, H, W), dropping the pad rows."""
    gh, gw = grid
    p = patch_size
    b = tokens.shape[0]
    x = tokens[:, : gh * gw].reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)
