"""ControlNet-Union as a task: what control adds to a generation, and nothing else.

Semantics are those of diffusers 0.42.1 ``ZImageControlNetPipeline`` and
``ZImageControlNetInpaintPipeline`` (the parity references):

- the control image is resized to the output size (Lanczos, RGB), scaled to [-1, 1] and encoded by
  the VAE in *mode* (the posterior mean: no random draw, so seeds mean the same as in txt2img);
  latents (z - shift) * scaling_factor;
- control context (B, Cc, h, w), by the ControlNet's input width Cc:
  - 16 (1.0): the control latents;
  - 33 (2.x), plain control: the control latents, then 17 zero channels;
  - 33, control inpainting: [control latents (16), 1 - mask (1), masked-image latents (16)], where
    the mask is binarised (>= 0.5 is white = repaint), the masked image is the input image with the
    white pixels set to 0 (grey in [-1, 1]) and encoded in mode like the control image, and
    1 - mask is resized to the latent grid with nearest-neighbour;
- the start latents are pure noise, as in txt2img (control inpainting has no strength and no
  per-step latent blend: the image reaches the model only through the control context);
- per step the ControlNet (``model/controlnet.py``) turns the context into hints that the DiT adds
  after its control layers, scaled by ``controlnet_conditioning_scale``; under CFG the context is
  repeated for the negative half.

What is computed once per request: the context, its embedding (``embed_control``) for the plain and
the guided batch, and every modulation vector of the branch for the whole schedule.

Loading is a small collaborator, :class:`ControlNetSlot`, that the pipeline holds
(``pipe.load_controlnet`` / ``pipe.unload_controlnet``): the branch is loaded for the pipeline's DiT
(its config, dtype and device) and gets the same accelerations as the DiT (``accel.optimize``: the
branch is built from the DiT's block, so kernel, attention and fp8 swaps apply unchanged).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .model.controlnet import ZImageControlNet
from .model.sequence import SequenceLayout, patchify

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- loading
class ControlNetSlot:
    """Holds at most one loaded ControlNet for a pipeline. ``model`` is None when none is loaded."""

    def __init__(self):
        self.model: ZImageControlNet | None = None
        self.path: str | None = None

    def load(self, path: str | os.PathLike, config=None, *, transformer_config, dtype, device,
             accel: dict[str, Any] | None = None) -> ZImageControlNet:
        """Load ``path`` (diffusers folder or single file; ``config`` overrides the inferred config,
        see ``formats.controlnet``) for a DiT of ``transformer_config``, replacing any loaded one.
        ``accel``: the DiT's acceleration settings (``optimize`` arguments), applied to the branch."""
        from .formats.controlnet import load_controlnet

        model = load_controlnet(path, config, transformer_config=transformer_config, dtype=dtype, device=device)
        if accel:
            from .accel import optimize

            optimize(model, **accel)
        self.model, self.path = model, str(path)
        return model

    def unload(self) -> bool:
        """Drop the loaded ControlNet; returns whether one was loaded."""
        loaded = self.model is not None
        self.model = self.path = None
        return loaded

    def require(self) -> ZImageControlNet:
        if self.model is None:
            raise ValueError("control_image needs a ControlNet: call pipe.load_controlnet(path) first "
                             "(or pass --controlnet FILE on the command line)")
        return self.model


# ---------------------------------------------------------------------------------------- inputs
def _as_list(image) -> list:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def image_to_pixels(image, width: int, height: int, what: str = "control_image") -> torch.Tensor:
    """An image input -> (B, 3, height, width) fp32 in [-1, 1].

    Accepted: PIL images (converted to RGB, resized with Lanczos as diffusers' image processor does),
    numpy arrays (H, W, C) or (B, H, W, C) in [0, 1], torch tensors (B, C, H, W) or (C, H, W) in [0, 1]
    (both resized bilinearly when their size differs), or a list of those.
    """
    from PIL import Image

    items = _as_list(image)
    if not items:
        raise ValueError(f"{what} must be an image or a non-empty list of images")
    if all(isinstance(i, Image.Image) for i in items):
        arrays = [np.asarray(i.convert("RGB").resize((width, height), resample=Image.LANCZOS), dtype=np.float32) / 255.0
                  for i in items]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        parts = []
        for i in items:
            if isinstance(i, np.ndarray):
                t = torch.from_numpy(np.asarray(i, dtype=np.float32))
                t = t[None] if t.ndim == 3 else t
                if t.ndim != 4:
                    raise ValueError(f"{what}: a numpy image must be (H, W, C) or (B, H, W, C), got {tuple(i.shape)}")
                t = t.permute(0, 3, 1, 2)
            elif isinstance(i, torch.Tensor):
                t = i.detach().float().cpu()
                t = t[None] if t.ndim == 3 else t
                if t.ndim != 4:
                    raise ValueError(f"{what}: a tensor image must be (C, H, W) or (B, C, H, W), got {tuple(i.shape)}")
            else:
                raise ValueError(f"{what} must be PIL images, numpy arrays or torch tensors, got {type(i).__name__}")
            parts.append(t)
        pixels = torch.cat(parts)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        if pixels.shape[1] != 3:
            raise ValueError(f"{what} must have 1 or 3 channels, got {pixels.shape[1]}")
        if pixels.shape[-2:] != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
    return pixels * 2.0 - 1.0


def mask_to_pixels(mask, width: int, height: int) -> torch.Tensor:
    """A mask input -> (B, 1, height, width) fp32 of 0 (keep) and 1 (repaint): white repaints.

    PIL masks are resized with Lanczos, then turned grey ("L"), then binarised at 0.5, as diffusers'
    mask processor does; arrays and tensors in [0, 1] ((H, W), (H, W, 1), (B, 1, H, W), ...) are
    averaged over channels, resized bilinearly when needed, and binarised the same way.
    """
    from PIL import Image

    items = _as_list(mask)
    if not items:
        raise ValueError("mask_image must be an image or a non-empty list of images")
    if all(isinstance(i, Image.Image) for i in items):
        arrays = [np.asarray(i.resize((width, height), resample=Image.LANCZOS).convert("L"), dtype=np.float32) / 255.0
                  for i in items]
        values = torch.from_numpy(np.stack(arrays))[:, None]
    else:
        parts = []
        for i in items:
            t = torch.from_numpy(np.asarray(i, dtype=np.float32)) if isinstance(i, np.ndarray) else \
                i.detach().float().cpu() if isinstance(i, torch.Tensor) else None
            if t is None:
                raise ValueError(f"mask_image must be PIL images, numpy arrays or torch tensors, got {type(i).__name__}")
            if isinstance(i, np.ndarray):  # (H, W), (H, W, C) or (B, H, W, C)
                t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
            else:  # (H, W), (C, H, W) or (B, C, H, W)
                t = t[None, None] if t.ndim == 2 else t[None] if t.ndim == 3 else t
            parts.append(t.mean(dim=1, keepdim=True))
        values = torch.cat(parts)
        if values.shape[-2:] != (height, width):
            values = F.interpolate(values, size=(height, width), mode="bilinear", align_corners=False)
    return (values >= 0.5).float()


def image_size(image) -> tuple[int, int]:
    """(width, height) of an image input (the first one of a list), as given."""
    first = _as_list(image)[0]
    if isinstance(first, np.ndarray):
        return int(first.shape[-2]), int(first.shape[-3])
    if isinstance(first, torch.Tensor):
        return int(first.shape[-1]), int(first.shape[-2])
    return first.size


def repeat_to(x: torch.Tensor, batch: int, per_prompt: int, what: str) -> torch.Tensor:
    """Spread inputs over the generated batch as diffusers does: one input for every image, or one
    per prompt repeated for each of its ``per_prompt`` images (or already one per image)."""
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    if x.shape[0] * per_prompt == batch:
        return x.repeat_interleave(per_prompt, dim=0)
    if x.shape[0] == batch:
        return x
    raise ValueError(f"got {x.shape[0]} {what}s for {batch // per_prompt} prompts x {per_prompt} images: "
                     f"give one, one per prompt, or one per image")


def control_context(
    encode,
    control: torch.Tensor,
    latent_channels: int,
    control_in_dim: int,
    image: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ControlNet's input (B, control_in_dim, h, w) from pixels (see the module docstring).

    ``encode``: pixels (B, 3, H, W) in [-1, 1] -> scaled latents in mode, (B, C, h, w).
    ``control``: control pixels; ``image`` and ``mask`` (B, 1, H, W of 0/1), for control inpainting,
    are the image to repaint and where (both already spread over the batch).
    """
    latents = encode(control)
    if (image is None) != (mask is None):
        raise ValueError("control inpainting needs both image and mask_image")
    if image is None:
        extra = control_in_dim - latents.shape[1]
        if extra < 0:
            raise ValueError(f"the ControlNet takes {control_in_dim} input channels, fewer than the "
                             f"{latents.shape[1]} latent channels")
        if extra:  # 2.x run without an inpainting image: zeros for the mask and the masked image
            latents = torch.cat([latents, latents.new_zeros(latents.shape[0], extra, *latents.shape[2:])], dim=1)
        return latents
    if control_in_dim != 2 * latent_channels + 1:
        raise ValueError(f"control inpainting needs a ControlNet with {2 * latent_channels + 1} input channels "
                         f"(Fun-ControlNet-Union 2.0 or 2.1); this one takes {control_in_dim} (version 1.0)")
    masked = encode(image * (mask < 0.5).to(image.dtype))
    keep = F.interpolate(1.0 - mask, size=masked.shape[-2:], mode="nearest").to(latents.dtype)
    return torch.cat([latents, keep.to(latents.device), masked.to(latents.dtype)], dim=1)


# ---------------------------------------------------------------------------------------- steps
@dataclass
class ControlPlan:
    """What the step loop reads for control, computed once per request.

    ``plain`` / ``guided``: the embedded control context (B or 2B, Nx, D) for the unguided and the
    CFG batch; ``mods``: the branch's modulation vectors, one list per step of the schedule (sliced
    like the DiT's); ``scale``: the conditioning scale as a 0-d fp32 device tensor (a value, not a
    shape: a captured graph replays for any scale).
    """

    plain: torch.Tensor
    guided: torch.Tensor | None
    mods: list[list[torch.Tensor]]
    scale: torch.Tensor


def plan_control(
    model: ZImageControlNet,
    dit,
    context: torch.Tensor,
    plain_layout: SequenceLayout,
    guided_layout: SequenceLayout | None,
    c: torch.Tensor,
    scale: float,
) -> ControlPlan:
    """Embed the context for both batches and precompute the branch's modulations for every row of
    the timestep conditioning ``c`` (N steps, 256)."""
    if not isinstance(scale, (int, float)):
        raise ValueError(f"controlnet_conditioning_scale must be a number, got {scale!r}")
    p = dit.config.patch_size
    x = patchify(context.to(dit.x_pad_token.dtype), p)
    plain = model.embed_control(x, plain_layout, dit.x_pad_token)
    guided = model.embed_control(x.repeat(2, 1, 1), guided_layout, dit.x_pad_token) if guided_layout else None
    every = model.modulations(c)
    mods = [[m[i:i + 1] for m in every] for i in range(c.shape[0])]
    return ControlPlan(plain, guided, mods, torch.tensor(float(scale), device=c.device))


def control_hints(model: ZImageControlNet, dit, control: ControlPlan, index: int, guided: bool, x: torch.Tensor,
                  tokens: torch.Tensor, layout: SequenceLayout, dit_mods: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """The hints for one DiT forward: step ``index`` of the schedule, on the CFG batch or not."""
    ctx = control.guided if guided else control.plain
    return model.hints(dit, x, tokens, ctx, layout, dit_mods, control.mods[index], control.scale)


def describe(model: ZImageControlNet | None, path: str | None) -> str | None:
    if model is None:
        return None
    return f"{Path(path).name} (version {model.config.version}, {len(model.config.control_layers_places)} control layers)"
