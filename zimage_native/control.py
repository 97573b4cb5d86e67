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
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from .devices import HOST_MEMORY_DEVICES, SMALLER_DIT, InsufficientMemoryError, format_bytes, weight_peak
from .model.controlnet import ZImageControlNet
from .model.sequence import SequenceLayout, patchify
from .offload import RESIDENT, _streamed_tensors, resident_tensors
from .images import preprocess_image, preprocess_mask
from .sampling import Task, TaskContext, latent_multiple, refuse_image_latents, register_task, repeat_to

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- loading
class ControlNetSlot:
    """Holds at most one loaded ControlNet for a pipeline. ``model`` is None when none is loaded."""

    def __init__(self):
        self.model: ZImageControlNet | None = None
        self.path: str | None = None

    def load(self, path: str | os.PathLike, config=None, *, transformer_config, dtype, device,
             accel: dict[str, Any] | None = None, stream_to: torch.device | None = None,
             model_gpu: Callable[[int], str | None] | None = None,
             visits: Callable[[ZImageControlNet], None] | None = None) -> ZImageControlNet:
        """Load ``path`` (diffusers folder or single file; ``config`` overrides the inferred config,
        see ``formats.controlnet``) for a DiT of ``transformer_config``, replacing any loaded one.
        ``accel``: the DiT's acceleration settings (``optimize`` arguments), applied to the branch.
        ``stream_to``: the device its blocks will be streamed to (``offload="blocks"``); on a GPU
        they are read for pinned memory (``formats.controlnet.load_controlnet``, which takes
        ``model_gpu`` and ``visits`` too)."""
        from .formats.controlnet import load_controlnet

        streamed = stream_to is not None and stream_to.type == "cuda"
        try:
            model = load_controlnet(path, config, transformer_config=transformer_config, dtype=dtype, device=device,
                                    pinned=streamed, stream_to=stream_to, model_gpu=model_gpu, visits=visits)
        except InsufficientMemoryError as e:
            if self.model is None or not self._holds(e.device, streamed):
                raise
            # The loaded one is held until this one has loaded: its bytes are not free. Only the library
            # can hold two (the CLI loads one), so the library's advice says so.
            held = (f"the ControlNet loaded now ({Path(self.path).name}, {self._held(e.device, streamed)}) "
                    f"stays in memory until this one has loaded, so its bytes are not free: "
                    f"pipe.unload_controlnet() frees them first")
            raise InsufficientMemoryError(e.cli_message, "; ".join(filter(None, (e.python_advice, held))),
                                          e.device) from None
        if accel:
            from .accel import optimize

            optimize(model, **accel)
        self.model, self.path = model, str(path)
        return model

    def _holds(self, short: torch.device | None, streamed: bool) -> bool:
        """Whether the loaded ControlNet holds memory of the device that is ``short``: not a GPU's where
        it rests in CPU memory between runs (``offload="model"``)."""
        return streamed or short is None or short.type != "cuda" or next(self.model.parameters()).device.type == "cuda"

    def _held(self, short: torch.device | None, streamed: bool) -> str:
        """What the loaded ControlNet holds in the memory that is ``short`` (a refusal's device), in
        words: with its blocks streamed from pinned memory to a GPU (``streamed``), its blocks in the
        RAM and its other tensors on the GPU (:func:`branch_resident`; blocks visit it only while it
        runs, and a load waits for the run); else all of it."""
        from .quantize import storage_bytes, weight_bytes

        if not streamed or short is None or getattr(self.model, "block_streamer", None) is None:
            return format_bytes(weight_bytes(self.model))
        if short.type in HOST_MEMORY_DEVICES:
            blocks = [t for ts in branch_streamed(self.model) for t in ts]
            return f"{format_bytes(storage_bytes(blocks))} in CPU memory: its blocks, pinned for streaming"
        return (f"{format_bytes(storage_bytes(branch_resident(self.model)))} on {short}: its embedder, modulations "
                f"and projections, its blocks resting in CPU memory")

    def unload(self) -> bool:
        """Drop the loaded ControlNet; returns whether one was loaded."""
        loaded = self.model is not None
        self.model = self.path = None
        return loaded

    def require(self) -> ZImageControlNet:
        if self.model is None:
            raise ValueError("control_image needs a ControlNet: load one with pipe.load_controlnet(path) "
                             "(zimage generate / zimage serve: --controlnet FILE)")
        return self.model


def branch_blocks(model: ZImageControlNet) -> list:
    """The branch's blocks in execution order (refiner stage, then control layers)."""
    return [*(model.control_noise_refiner or []), *model.control_layers]


#: Submodules of the branch's blocks that stay on the GPU when its blocks are streamed
#: (``offload="blocks"``): the projections run outside the blocks, as the modulations do.
BRANCH_RESIDENT = RESIDENT + ("before_proj", "after_proj")


def branch_resident(model: ZImageControlNet) -> list[torch.Tensor]:
    """The branch's tensors that stay on the GPU when its blocks are streamed: its embedder, the
    blocks' modulations and projections (:data:`BRANCH_RESIDENT`)."""
    return resident_tensors(model, branch_blocks(model), BRANCH_RESIDENT)


def branch_streamed(model: ZImageControlNet) -> list[list[torch.Tensor]]:
    """Per block (:func:`branch_blocks`), its tensors that are streamed (all but :data:`BRANCH_RESIDENT`)."""
    return [_streamed_tensors(b, BRANCH_RESIDENT) for b in branch_blocks(model)]


def branch_on_gpu(model: ZImageControlNet, depth: int = 1) -> list[torch.Tensor]:
    """The branch's tensors on the GPU at the peak when its blocks are streamed with prefetch
    ``depth`` (``stream_blocks``' default, the pipeline's): :func:`branch_resident` and ``depth + 1``
    blocks in flight (the running one and its prefetch), the largest block's tensors listed once per
    copy, as ``footprint`` counts the DiT's streamed blocks."""
    blocks = branch_streamed(model)
    largest = max(blocks, key=lambda ts: sum(t.numel() * t.element_size() for t in ts), default=[])
    return [*branch_resident(model), *largest * (depth + 1)]


def check_branch_visit(branch: int, branch_streamed: int, model: dict[str, int], blocks: dict[str, int],
                       placement: dict[str, torch.device]) -> None:
    """Under ``offload="model"`` the branch (``branch`` bytes) rests in CPU memory and visits the DiT's
    GPU with the DiT while a step runs: refuse, before it is read, where the two together exceed the
    GPU's free memory (each alone may fit). ``model`` / ``blocks``: the bytes each component of the
    pipeline holds on its GPU while it runs under ``offload="model"`` / ``"blocks"``; the refusal names
    ``--offload blocks`` where its peak, the branch's part on the GPU then (``branch_streamed``,
    :func:`branch_on_gpu`) counted with the DiT's, fits."""
    from .devices import free_memory  # (read when called: tests fake the card's free memory)
    from .formats.controlnet import SMALLER

    device = placement["transformer"]
    if device.type != "cuda":
        return
    free, total = free_memory(device)
    dit = model["transformer"]
    if dit + branch <= free:
        return
    streamed = weight_peak({**blocks, "transformer": blocks["transformer"] + branch_streamed}, placement, "blocks",
                           device)[0]
    python = "in Python these are from_pretrained's arguments: "
    if streamed <= free:
        fix = f"stream their blocks (--offload blocks: {format_bytes(streamed)} at the peak) or {SMALLER}"
        python += 'offload="blocks"'
    else:
        fix = (f"{SMALLER} or {SMALLER_DIT} (--offload blocks does not fit either: {format_bytes(streamed)} at the "
               f"peak)")
        python += 'transformer="FILE.gguf"'
    raise InsufficientMemoryError(
        f"the DiT ({format_bytes(dit)}) and the ControlNet ({format_bytes(branch)}) visit {device} together while a "
        f"step runs (--offload model), {format_bytes(dit + branch)} of weights, and the GPU has {format_bytes(free)} "
        f"free of {format_bytes(total)}. To fit, {fix}", python, device)


# ---------------------------------------------------------------------------------------- context
def control_context(
    encode,
    control: torch.Tensor,
    latent_channels: int,
    control_in_dim: int,
    image: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ControlNet's input (B, control_in_dim, h, w) from pixels (see the module docstring).

    ``encode``: pixels (B, 3, H, W) in [-1, 1] -> scaled latents in mode (B, C, h, w).
    ``control``: the control pixels; ``image`` and ``mask`` ((B, 1, H, W) of 0 / 1, 1 = repaint),
    for control inpainting, the picture to repaint and where. All three with the same batch.
    """
    latents = encode(control)
    if (image is None) != (mask is None):
        raise ValueError("control inpainting needs both image and mask_image")
    if image is None:
        extra = control_in_dim - latents.shape[1]
        if extra < 0:
            raise ValueError(f"the ControlNet takes {control_in_dim} input channels, fewer than the "
                             f"{latents.shape[1]} latent channels")
        if extra:  # 2.x without an inpainting image: zeros for the mask and the masked image
            latents = torch.cat([latents, latents.new_zeros(latents.shape[0], extra, *latents.shape[2:])], dim=1)
        return latents
    check_inpaint_width(control_in_dim, latent_channels)
    masked = encode(image * (mask < 0.5).to(image.dtype))  # repainted pixels -> 0 (grey)
    keep = F.interpolate(1.0 - mask, size=masked.shape[-2:], mode="nearest")
    return torch.cat([latents, keep.to(latents.device, latents.dtype), masked.to(latents.dtype)], dim=1)


def check_inpaint_width(control_in_dim: int, latent_channels: int) -> None:
    if control_in_dim != 2 * latent_channels + 1:
        raise ValueError(f"control inpainting needs a ControlNet with {2 * latent_channels + 1} input channels "
                         f"(Fun-ControlNet-Union 2.0 or 2.1); the loaded one takes {control_in_dim} (version 1.0)")


# ---------------------------------------------------------------------------------------- steps
@dataclass
class ControlHints:
    """The DiT's extra input per step (``Conditioning.extra`` of the sampling core), once planned.

    ``plain`` / ``guided``: the embedded control context (B or 2B, Nx, D) for the unguided and the
    CFG batch; ``scale``: the conditioning scale as a 0-d fp32 device tensor (a value, not a
    constant of a graph: a captured step replays for any scale). The branch's modulation vectors
    of each step travel with the step (``step.extra``).
    """

    model: ZImageControlNet
    dit: Any
    plain: torch.Tensor
    guided: torch.Tensor | None
    scale: torch.Tensor

    def __call__(self, x: torch.Tensor, step, layout: SequenceLayout, tokens: torch.Tensor) -> dict[str, Any]:
        ctx = self.guided if step.guided else self.plain
        return self.model.step(self.dit, x, tokens, ctx, layout, step.mods, step.extra, self.scale)


@dataclass
class ControlInput:
    """The control task's contribution before planning: the context (B, Cc, h, w) and the scale.
    :meth:`plan` (called by the core's plan, with the DiT on its device) makes the per-step hints."""

    model: ZImageControlNet
    context: torch.Tensor
    scale: float

    def plan(self, pipe, plain: SequenceLayout, guided: SequenceLayout | None,
             c: torch.Tensor) -> tuple[ControlHints, list[list[torch.Tensor]]]:
        """Embed the context for both batches, and the branch's modulations for every row of the
        timestep conditioning ``c`` (N steps, 256): all the per-request work of the branch.
        Returns (the per-step extra, the modulation vectors of each schedule step)."""
        dit = pipe.transformer
        x = patchify(self.context.to(c.device, dit.x_pad_token.dtype), dit.config.patch_size)
        ctx = self.model.embed_control(x, plain, dit.x_pad_token)
        ctx_guided = self.model.embed_control(x.repeat(2, 1, 1), guided, dit.x_pad_token) if guided else None
        every = self.model.modulations(c)
        mods = [[m[i:i + 1] for m in every] for i in range(c.shape[0])]
        scale = torch.tensor(float(self.scale), dtype=torch.float32, device=c.device)
        return ControlHints(self.model, dit, ctx, ctx_guided, scale), mods


def check_scale(scale) -> float:
    """The conditioning scale as a float: any real number (numpy's float32 too), finite, not a bool."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale):
        raise ValueError(f"controlnet_conditioning_scale must be a finite number, got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------------------------------- tasks
class Control(Task):
    """ControlNet txt2img (diffusers' ``ZImageControlNetPipeline``): noise start, control hints."""

    name = "control"
    default_scale = 0.75  # controlnet_conditioning_scale, as diffusers' ZImageControlNetPipeline

    def read(self, pipe, r):
        model = pipe.controlnets.require()
        check_scale(r.control_scale if r.control_scale is not None else self.default_scale)
        if r.image is not None:
            raise ValueError("control_image with image= needs mask_image= too (ControlNet inpainting); img2img "
                             "with a ControlNet is not supported (diffusers has no such pipeline either)")
        pixels = preprocess_image(r.control_image, r.width, r.height, latent_multiple(pipe), what="control_image")
        if r.strength is not None and r.strength != 1.0:
            raise ValueError(f"ControlNet generation starts from noise and takes no strength, got {r.strength}")
        return {"model": model, "control": pixels}, pixels.shape[-1], pixels.shape[-2]

    def context(self, ctx: TaskContext) -> torch.Tensor:
        pipe, r, model = ctx.pipe, ctx.request, ctx.inputs["model"]
        context = control_context(lambda x: pipe.encode_image(x, None), ctx.inputs["control"],
                                  pipe.transformer_config.in_channels, model.config.control_in_dim)
        return repeat_to(context, ctx.batch, r.n, "control image")  # each distinct image encoded once

    def condition(self, ctx):
        cond = super().condition(ctx)  # the start noise, drawn as for txt2img
        r = ctx.request
        cond.extra = ControlInput(ctx.inputs["model"], self.context(ctx), r.control_scale)
        cond.info = {"controlnet": ctx.pipe.controlnets.path, "controlnet_version": ctx.inputs["model"].config.version,
                     "control_scale": r.control_scale}
        return cond


class ControlInpaint(Control):
    """ControlNet inpainting (diffusers' ``ZImageControlNetInpaintPipeline``): noise start, no
    strength, no per-step blend; the image and mask reach the model only through the context."""

    name = "control_inpaint"

    def read(self, pipe, r):
        model = pipe.controlnets.require()
        check_inpaint_width(model.config.control_in_dim, pipe.transformer_config.in_channels)
        check_scale(r.control_scale if r.control_scale is not None else self.default_scale)
        if r.strength is not None and r.strength != 1.0:
            raise ValueError(f"ControlNet inpainting starts from noise and takes no strength (as diffusers' "
                             f"ZImageControlNetInpaintPipeline), got {r.strength}")
        refuse_image_latents(pipe, r.image, "ControlNet inpainting")
        image = preprocess_image(r.image, r.width, r.height, latent_multiple(pipe), what="image")
        h, w = image.shape[-2:]
        control = preprocess_image(r.control_image, w, h, latent_multiple(pipe), what="control_image")
        mask = preprocess_mask(r.mask_image, h, w)
        return {"model": model, "control": control, "image": image, "mask": mask}, w, h

    def context(self, ctx):
        pipe, r, model, inputs = ctx.pipe, ctx.request, ctx.inputs["model"], ctx.inputs
        spread = lambda x, what: repeat_to(x, ctx.batch, r.n, what)  # noqa: E731
        return control_context(lambda x: pipe.encode_image(x, None), spread(inputs["control"], "control image"),
                               pipe.transformer_config.in_channels, model.config.control_in_dim,
                               spread(inputs["image"], "image"), spread(inputs["mask"], "mask"))


register_task(Control())
register_task(ControlInpaint())
