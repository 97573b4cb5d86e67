"""The sampling core: one request type, one run (encode -> plan -> step loop -> decode), and tasks.

Every generation, whoever asks for it (``ZImagePipeline.__call__`` / ``img2img`` / ``inpaint``,
``zimage generate``, the server's engine), is a :class:`GenerationRequest` run by :func:`generate`:

1. resolve: unset settings from the template's suggestions, then the variant's defaults; the
   task's inputs are read and checked before any model runs;
2. encode: the prompts (and, with CFG, the negative prompts in the same text-encoder batch);
3. condition: the task (:data:`TASKS`) gives its start latents, its first step, an optional
   per-step latent blend and optional extra DiT inputs (:class:`Conditioning`);
4. plan: everything the step loop reads, once per request (:func:`plan`);
5. step loop: :func:`run_steps` (or the pipeline's graphed replay of it), the same for every task;
6. decode to the requested output type.

Semantics are those of diffusers 0.42.1 (``ZImagePipeline``, ``ZImageImg2ImgPipeline``,
``ZImageInpaintPipeline``): fp32 latents, noise drawn on the generator's device, the DiT output
is the negative velocity, CFG ``pos + g * (pos - neg)`` in fp32; img2img and inpaint draw the VAE
posterior sample before the noise, from the same generator, and form their start latents in the
text encoder's dtype; inpaint re-noises the clean image latents to the next sigma after every
step and keeps them where the mask is black (white = repaint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .accel.block_cache import FirstBlockCache, check_threshold, pipeline_cache_problem
from .devices import check_decode_fits
from .finite import check_finite, finite_all, finite_rows, refuse_nonfinite_input
from .images import check_side
from .images import preprocess_image, preprocess_mask, to_pil, to_uint8, uint8_to_pil  # noqa: F401  (re-exported)
from .model.sequence import SequenceLayout, build_layout, pad_captions, patchify, unpatchify
from .offload import release_streamed, runs_next, streamed_pass
from .scheduler import Schedule, euler_step, make_schedule, sigma_values

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PROMPT_FIELDS = ("system_prompt", "thinking_content", "assistant_content", "force_think_block", "strip_quotes")


# =========================================================================== the request


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, as the library, the CLI and the server describe it.

    Left unset (None), ``width``/``height``/``steps``/``guidance_scale``/``negative_prompt`` come
    from the template's suggested settings, then from the model variant; the size of an input
    image sets an unset size. ``seeds``: one for all images, or one per image (their count then
    sets the images per prompt); None draws one. ``generator`` (a torch.Generator or one per
    image) replaces ``seeds``. The task follows from the inputs: ``image`` alone is img2img,
    ``image`` + ``mask_image`` inpainting, ``control_image`` ControlNet (see :func:`task_name`).
    """

    prompt: str | list[str] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seeds: list[int] | None = None
    negative_prompt: str | list[str] | None = None
    template: Any = None  # a template name or a Template
    fields: dict[str, Any] = field(default_factory=dict)  # the chat-format fields (PROMPT_FIELDS) that are set
    cfg_normalization: float = 0.0
    cfg_truncation: float | None = 1.0
    max_sequence_length: int = 512
    shift: float | None = None  # the scheduler shift; None: the model's
    seed_variance: float = 0.0  # noise amplitude on the prompt features of the first steps (0 = off)
    seed_variance_share: float | None = None  # the fraction of the feature values that get noise (None: 0.5)
    seed_variance_steps: float | None = None  # the fraction of the schedule (its first steps) that sees them (0.2)
    first_block_cache: float = 0.0  # reuse the main layers' work below this change of the first's (0 = off)
    strength: float | None = None  # img2img / inpaint; None: 0.6 for img2img, 1.0 for inpaint
    image: Any = None  # img2img / inpaint input: PIL, numpy (H, W, C) in [0, 1] or torch (B, C, H, W)
    mask_image: Any = None  # inpaint: white = repaint, black = keep
    control_image: Any = None  # ControlNet conditioning image
    control_scale: float | None = None  # None: 0.75 where a ControlNet runs; refused without control_image
    num_images_per_prompt: int | None = None
    generator: Any = None
    latents: torch.Tensor | None = None  # the initial noise (txt2img) or the start latents (img2img, inpaint)
    sigmas: list[float] | None = None
    prompt_embeds: list[torch.Tensor] | None = None
    negative_prompt_embeds: list[torch.Tensor] | None = None
    output_type: str = "pil"

    def __post_init__(self):
        # A generator or other one-shot iterator (map(), iter(), a file's lines) is read once, here, into
        # a list: the request reads its prompts several times (the image count, the checks, the encode),
        # and the second read of an iterator found it empty ("prompt must be a non-empty string ...").
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if isinstance(value, Iterator):
                object.__setattr__(self, name, list(value))

    @property
    def prompts(self) -> list[str]:
        return text_list(self.prompt, "prompt")

    @property
    def n(self) -> int:
        """Images per prompt: given, else one per seed (with one prompt), else 1."""
        if self.num_images_per_prompt is not None:
            return self.num_images_per_prompt
        count = max(len(self.prompts) or len(self.prompt_embeds or ()), 1)
        seeds = self.seeds or []
        return len(seeds) // count if len(seeds) > count and len(seeds) % count == 0 else 1

    @property
    def task(self) -> str:
        return task_name(self)

    def params(self) -> dict[str, Any]:
        """JSON-able parameters, as the server records them (input images as flags only)."""
        keep = ("prompt", "width", "height", "steps", "guidance_scale", "seeds", "negative_prompt", "template",
                "cfg_normalization", "cfg_truncation", "max_sequence_length", "shift", "strength")
        out = {k: getattr(self, k) for k in keep}
        out.update(self.fields)
        out["n"] = len(self.seeds) if self.seeds else self.n
        out["img2img"] = self.image is not None
        if self.mask_image is not None:
            out["inpaint"] = True
        if self.control_image is not None:
            out["control_scale"] = self.control_scale
        out.update(optional_settings(self))
        return {k: v for k, v in out.items() if v is not None}


def task_name(r: GenerationRequest) -> str:
    if r.mask_image is not None and r.image is None:
        raise ValueError("mask_image needs image= (the picture to inpaint)")
    if r.control_image is not None:
        return "control_inpaint" if r.mask_image is not None else "control"
    if r.image is None:
        return "txt2img"
    return "inpaint" if r.mask_image is not None else "img2img"


# =========================================================================== tasks


@dataclass
class Conditioning:
    """What a task contributes to the core: start latents at schedule index ``start``, an optional
    per-step latent blend ``blend(latents, sigma_next) -> latents`` (run after each Euler step,
    with the sigma that step reached), and optional extra DiT inputs ``extra(x, step, layout, cap_tokens) -> dict``
    (keyword arguments of ``forward_tokens``, e.g. ControlNet hints). ``blend`` and ``extra``
    should be dataclasses of tensors, so a graphed loop copies their tensors in.

    An ``extra`` that needs the plan's per-request work (the layouts, the timestep conditioning)
    has a method ``plan(pipe, plain_layout, guided_layout, c) -> (extra, per_step)``, called by
    :func:`plan` with the DiT on its device: it returns the extra the loop calls and one value per
    schedule step (or None), which the loop finds as ``step.extra`` (per-step tensors travel with
    the step, so a per-step graph copies in only its own)."""

    latents: torch.Tensor
    start: int = 0
    blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    extra: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskContext:
    pipe: Any
    request: GenerationRequest  # resolved
    inputs: dict[str, Any]  # what the task's ``read`` returned
    schedule: Schedule
    generators: list[torch.Generator] | None
    batch: int
    dtype: torch.dtype  # the text features' dtype (the reference forms image latents in it)


class Task:
    """A task: ``read`` its inputs (before any model runs; may set the size), ``condition`` the core."""

    name = "txt2img"
    draws_with_latents = False  # whether the task draws from the generators when ``latents=`` are given

    def read(self, pipe, r: GenerationRequest) -> tuple[dict[str, Any], int | None, int | None]:
        """(inputs, width, height): the preprocessed inputs and the size they imply (None: no opinion)."""
        if r.strength is not None:  # text to image has no input to keep
            raise ValueError(f"strength needs image= (img2img or inpainting), got strength={r.strength!r} "
                             f"without an image")
        return {}, None, None

    def check(self, pipe, r: GenerationRequest, schedule: Schedule) -> None:
        """Refuse what the resolved request cannot run, before any model runs."""

    def condition(self, ctx: TaskContext) -> Conditioning:
        r, pipe = ctx.request, ctx.pipe
        shape = latent_shape(pipe, ctx.batch, r.height, r.width)
        if r.latents is None:
            return Conditioning(randn(shape, ctx.generators, torch.float32))
        if tuple(r.latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(r.latents.shape)}")
        return Conditioning(r.latents)


def repeat_to(x: torch.Tensor, batch: int, per_prompt: int, what: str) -> torch.Tensor:
    """Spread inputs over the generated batch ([p0, p0, p1, p1] for 2 prompts x 2 images): one input
    for every image, one per prompt repeated for each of its ``per_prompt`` images (diffusers'
    ControlNet pipelines pair them so; its img2img and inpainting tile them, giving prompt 0 the
    second image), or one per image."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    if x.shape[0] * per_prompt == batch:
        return x.repeat_interleave(per_prompt, dim=0)
    raise ValueError(f"got {x.shape[0]} {what}s for {batch // per_prompt} prompts x {per_prompt} images: "
                     f"give one, one per prompt, or one per image")


def start_index(num_steps: int, strength: float) -> int:
    """The first schedule step of a run at ``strength`` (the reference's ``get_timesteps``)."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def is_image_latents(pipe, image) -> bool:
    """Whether ``image=`` is a batch of image latents (B, C, h, w) with the DiT's C latent channels
    (16 for Z-Image; an image tensor has 1 or 3)."""
    channels = pipe.transformer_config.in_channels
    return (isinstance(image, torch.Tensor) and image.ndim == 4 and channels not in (1, 3)
            and image.shape[1] == channels)


def refuse_image_latents(pipe, image, task: str) -> None:
    """Refuse image latents (:func:`is_image_latents`) as the image of ``task`` (inpainting, with a
    ControlNet or not), which needs the image's pixels; diffusers' fails on them too."""
    if is_image_latents(pipe, image):
        raise ValueError(f"{task} takes an image, not image latents (image= of shape {tuple(image.shape)}; "
                         f"diffusers' {task} fails on them too): decode them first (pipe.decode(latents)), "
                         f"or use img2img, which takes image latents")


def read_image_latents(pipe, r: GenerationRequest) -> tuple[dict[str, Any], int, int]:
    """img2img's ``image=`` given as scaled image latents (what ``output_type="latent"`` returns, or
    ``(posterior.sample() - shift_factor) * scaling_factor``), taken as the clean latents, as
    diffusers' img2img takes them: the image they make is the size, and they are not resized."""
    x, f, patch = r.image, pipe.vae_scale_factor, pipe.transformer_config.patch_size
    if not x.is_floating_point():
        raise ValueError(f"image latents (image= of {x.shape[1]} channels) must be a float tensor, got {x.dtype}")
    h, w = x.shape[-2:]
    if h < patch or w < patch or h % patch or w % patch:
        raise ValueError(f"image latents (image= of {x.shape[1]} channels) need sides that are positive multiples "
                         f"of {patch} (the DiT's patch size), got {w}x{h} (width x height)")
    refuse_nonfinite_input(x, "the image latents given as image=")
    for name, given, side in (("width", r.width, w * f), ("height", r.height, h * f)):
        if given is not None and given != side:
            raise ValueError(f"image latents of shape {tuple(x.shape)} make a {w * f}x{h * f} image and are not "
                             f"resized; got {name}={given}: leave width= and height= out, or decode the latents "
                             f"(pipe.decode) and pass the image")
    return {"image_latents": x}, w * f, h * f


class ImageToImage(Task):
    name = "img2img"
    default_strength = 0.6

    def read(self, pipe, r):
        if is_image_latents(pipe, r.image):
            return read_image_latents(pipe, r)
        pixels = preprocess_image(r.image, r.width, r.height, latent_multiple(pipe), what="image")
        return {"pixels": pixels}, pixels.shape[-1], pixels.shape[-2]

    def check(self, pipe, r, schedule):
        if isinstance(r.strength, bool) or not isinstance(r.strength, numbers.Real) or not 0 <= r.strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1], got {r.strength!r}")
        n = schedule.num_steps
        if n - start_index(n, r.strength) < 1:
            raise ValueError(f"strength {r.strength} with {n} steps leaves no step to run; raise strength or steps")

    def encode(self, ctx: TaskContext, noise_first: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(clean image latents, noise, start), from the same generators: the posterior sample, then
        the noise (or the noise first, as the reference's inpainting draws them when given latents)."""
        pipe, gens, r = ctx.pipe, ctx.generators, ctx.request
        spread = lambda x: repeat_to(x, ctx.batch, r.n, "input image")  # noqa: E731
        start = start_index(ctx.schedule.num_steps, r.strength)
        if "image_latents" in ctx.inputs:  # given as image=: no encode, no posterior draw (only the noise)
            z = spread(ctx.inputs["image_latents"].to(pipe.device, ctx.dtype))
            return z, randn(z.shape, gens, ctx.dtype).to(pipe.device), start
        pixels = ctx.inputs["pixels"]
        shape = latent_shape(pipe, ctx.batch, r.height, r.width)
        noise = randn(shape, gens, ctx.dtype).to(pipe.device) if noise_first else None
        if r.generator is None and len(gens) == ctx.batch:
            # one seed per image: each image draws its own posterior sample, so its seed alone remakes it
            z = pipe.encode_image(pixels, gens, ctx.dtype, spread=spread)
        else:  # one generator, or diffusers' generator list, whose first ones draw the samples that are spread
            z = spread(pipe.encode_image(pixels, gens if len(gens) == 1 else gens[: pixels.shape[0]], ctx.dtype))
        z = z.to(ctx.dtype)
        if noise is None:
            noise = randn(z.shape, gens, ctx.dtype).to(pipe.device)
        return z, noise, start

    def given_latents(self, ctx: TaskContext) -> torch.Tensor | None:
        """``latents=``, checked and in the features' dtype, as the reference takes them (no noising)."""
        r = ctx.request
        if r.latents is None:
            return None
        shape = latent_shape(ctx.pipe, ctx.batch, r.height, r.width)
        if tuple(r.latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(r.latents.shape)}")
        return r.latents.to(ctx.pipe.device, ctx.dtype)

    def condition(self, ctx):
        start = start_index(ctx.schedule.num_steps, ctx.request.strength)
        info = {"strength": ctx.request.strength}
        given = self.given_latents(ctx)
        if given is not None:  # the reference starts there and encodes nothing
            return Conditioning(given, start, info=info)
        z, noise, start = self.encode(ctx)
        sigma = ctx.schedule.sigmas.to(ctx.pipe.device, ctx.dtype)[start]
        return Conditioning(sigma * noise + (1.0 - sigma) * z, start, info=info)


@dataclass
class InpaintBlend:
    """After each step: the clean image latents, re-noised to the next sigma, where the mask is 0."""

    mask: torch.Tensor  # (B, 1, h, w), 1 = repaint
    image_latents: torch.Tensor
    noise: torch.Tensor

    def __call__(self, latents: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        sigma = sigma_next.to(self.image_latents.dtype)  # as the reference's scale_noise casts it
        known = sigma * self.noise + (1.0 - sigma) * self.image_latents
        return (1 - self.mask) * known + self.mask * latents


class Inpaint(ImageToImage):
    name = "inpaint"
    default_strength = 1.0
    draws_with_latents = True  # the blend's noise and the image's posterior sample

    def read(self, pipe, r):
        refuse_image_latents(pipe, r.image, "inpainting")
        inputs, w, h = super().read(pipe, r)
        inputs["mask"] = preprocess_mask(r.mask_image, h, w)
        return inputs, w, h

    def condition(self, ctx):
        pipe, r = ctx.pipe, ctx.request
        latents = self.given_latents(ctx)
        z, noise, start = self.encode(ctx, noise_first=latents is not None)  # the blend needs both
        if latents is None:
            sigma = ctx.schedule.sigmas.to(pipe.device, ctx.dtype)[start]
            latents = sigma * noise + (1.0 - sigma) * z
        mask = torch.nn.functional.interpolate(ctx.inputs["mask"], size=z.shape[-2:], mode="nearest")
        mask = repeat_to(mask.to(pipe.device, ctx.dtype), ctx.batch, r.n, "mask").contiguous()  # a callback may edit it
        return Conditioning(latents, start, InpaintBlend(mask, z, noise), info={"strength": r.strength})


#: The tasks by name; ControlNet registers "control" and "control_inpaint" (see :func:`register_task`).
TASKS: dict[str, Task] = {"txt2img": Task(), "img2img": ImageToImage(), "inpaint": Inpaint()}


def register_task(task: Task) -> None:
    TASKS[task.name] = task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"no {name!r} task is available (control tasks need ControlNet support)")
    return TASKS[name]


# =========================================================================== plan and step loop


@dataclass
class Step:
    index: int  # into the schedule
    guided: bool  # CFG on for this step
    mods: list[torch.Tensor]  # precomputed modulation vectors, (1, 4D) per block and (1, D) final
    extra: Any = None  # this step's inputs of the task's extra DiT inputs (see Conditioning)
    varied: bool = False  # the positives' caption tokens are the seed-varied ones (``SamplingPlan.varied``)


@dataclass
class SamplingPlan:
    """The static inputs of the step loop for one request (see :func:`plan`).

    With CFG a guided step runs two forwards, positives (``plain``) then negatives (``negative``),
    each with its own layout: a single-image request never carries an attention mask."""

    steps: list[Step]
    plain: tuple[SequenceLayout, torch.Tensor]  # layout and refined caption tokens of the positives
    negative: tuple[SequenceLayout, torch.Tensor] | None  # the same for the negatives (CFG only)
    sigmas: torch.Tensor
    guidance_scale: float
    norm_limit: float
    blend: Any = None  # the task's per-step latent blend (see Conditioning)
    extra: Any = None  # the task's extra DiT inputs (see Conditioning)
    varied: tuple[SequenceLayout, torch.Tensor] | None = None  # the positives with seed variance (``vary``)
    cache: FirstBlockCache | None = None  # the request's first-block cache (``accel.block_cache``)


@torch.no_grad()
def plan(pipe, size, prompt_embeds, negative_embeds, schedule: Schedule, guidance_scale=0.0,
         cfg_normalization=False, cfg_truncation=1.0, start=0, blend=None, extra=None, varied=None,
         varied_steps=0.0, cache: float = 0.0) -> SamplingPlan:
    """Everything the step loop reads, computed once per request: layouts, refined caption tokens
    (the context refiner does not depend on t) and every modulation vector of the schedule.
    The DiT must be on its execution device (see ``pipe._running``).

    Shape policy (docs/performance.md): captions are padded only to their multiple of 32 (those
    rows are learned pad tokens and are attended, as in the reference); positives and negatives
    get separate layouts, so a mask appears only when one of them mixes caption lengths.
    ``cache`` > 0: the first-block cache threshold (``accel.block_cache``), a fresh cache per plan."""
    cfg, device, dtype, dit = pipe.transformer_config, pipe.device, pipe.dtype, pipe.transformer
    use_cfg = guidance_scale > 0 and negative_embeds is not None

    def encode(cap, layout, another: bool):
        """The caption tokens; ``another``: another caption pass follows (streamed blocks prefetch
        its first block, not the image's: :func:`offload.runs_next`)."""
        if not len(dit.context_refiner):  # (a DiT without refiner blocks: nothing to name)
            return dit.encode_caption(cap, layout)
        with runs_next(dit, dit.context_refiner[-1], dit.context_refiner[0] if another else dit.noise_refiner[0]):
            return dit.encode_caption(cap, layout)

    def prepare(embeds, another):
        layout = build_layout(cfg, [e.shape[0] for e in embeds], size[0], size[1], device)
        return layout, encode(pad_captions(embeds, layout.caption_pad.shape[1]), layout, another)

    plain = prepare(prompt_embeds, use_cfg or varied is not None)
    negative = prepare(negative_embeds, varied is not None) if use_cfg else None
    if varied is not None:  # the same layout: only the features differ
        varied = plain[0], encode(pad_captions(varied, plain[0].caption_pad.shape[1]), plain[0], False)
    times = schedule.model_times()
    c = dit.time_embedding(times.to(device), dtype)  # (N, 256): one row per step
    mods = dit.modulations(c)
    per_step = [None] * schedule.num_steps
    if extra is not None and hasattr(extra, "plan"):  # e.g. the ControlNet: embeds and modulations
        # Both CFG forwards have the positives' batch size: the branch's unguided context serves both.
        extra, per_step = extra.plan(pipe, plain[0], None, c)
    truncate = cfg_truncation is not None and float(cfg_truncation) <= 1  # late steps run without CFG
    steps = []
    for i in range(start, schedule.num_steps):
        on = use_cfg and not (truncate and times[i].item() > cfg_truncation)
        early = varied is not None and i < varied_steps * schedule.num_steps
        steps.append(Step(i, on, [m[i:i + 1] for m in mods], per_step[i], early))
    if varied is not None and not any(step.varied for step in steps):
        logger.warning("seed_variance has no effect here: the run starts at step %d of %d (img2img / inpainting "
                       "strength), after the varied steps (the first %d, seed_variance_steps %g); raise "
                       "seed_variance_steps or the strength", start, schedule.num_steps,
                       math.ceil(varied_steps * schedule.num_steps), varied_steps)
    return SamplingPlan(steps, plain, negative, schedule.sigmas.to(device), float(guidance_scale),
                        float(cfg_normalization) if cfg_normalization else 0.0, blend, extra, varied,
                        FirstBlockCache(float(cache)) if cache else None)


def cfg_combine(pos: torch.Tensor, neg: torch.Tensor, scale: float | torch.Tensor,
                norm_limit: float | torch.Tensor) -> torch.Tensor:
    """pos + scale * (pos - neg) in fp32, its norm capped at norm_limit * |pos| per item when the
    limit is > 0. ``scale`` and ``norm_limit`` may be fp32 device scalars (the CUDA-graph path copies
    them in): then the cap is applied by ``torch.where`` on the limit, with no host sync."""
    pred = pos + scale * (pos - neg)
    if isinstance(norm_limit, torch.Tensor) or norm_limit > 0:
        limit = torch.linalg.vector_norm(pos, dim=(1, 2, 3), keepdim=True) * norm_limit
        norm = torch.linalg.vector_norm(pred, dim=(1, 2, 3), keepdim=True)
        capped = torch.where(norm > limit, pred * (limit / norm), pred)
        pred = torch.where(norm_limit > 0, capped, pred) if isinstance(norm_limit, torch.Tensor) else capped
    return pred


def denoise_bar(pipe, progress: bool, steps=None, **kwargs):
    """The per-step progress bar (tqdm) with the pipeline's ``set_progress_bar_config`` options;
    ``progress=False`` disables it whatever those say."""
    options = {"desc": "denoise", **getattr(pipe, "progress_bar_config", {}), **kwargs, "disable": not progress}
    return tqdm(steps, **options)


def run_steps(pipe, latents: torch.Tensor, plan: SamplingPlan, progress: bool = False,
              callback: Callable[[int, int], None] | None = None,
              on_step_end: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
              info: dict | None = None, interruptible: bool = True) -> torch.Tensor:
    """The sampling loop over fp32 ``latents``: only tensor work, no host syncs.

    After each step: the task's blend, then ``on_step_end(k, index, latents) -> latents`` (may
    replace the latents, and set ``pipe._guidance_scale`` for the later steps, as diffusers'
    callbacks do: :func:`guidance_after_step_end`), then ``callback(k + 1, total)``, then the stop
    on ``pipe._interrupt`` (:func:`interrupted`). ``interruptible=False``: the flag is not read (a
    captured graph's loop: a graph replays no Python, so a stop seen while it was captured would cut
    every later replay short)."""
    cfg, dtype = pipe.transformer_config, pipe.dtype
    scale = None  # a guidance scale a step-end callback set (a number), else the plan's (a device scalar when graphed)

    def forward(x, step, side, last):
        """One forward; ``last``: the run's last, where streamed blocks prefetch no next step's."""
        layout, tokens = side
        branch = "negative" if side is plan.negative else "positive"  # (the cache's residuals of each)
        deciding = plan.cache.deciding(pipe.transformer, branch) if plan.cache is not None else contextlib.nullcontext()
        with streamed_pass(pipe.transformer, pipe.controlnet, last=last), deciding:
            extra = plan.extra(x, step, layout, tokens) if plan.extra is not None else {}
            if plan.cache is not None:  # each branch (positives, negatives) keeps its own residuals
                out = plan.cache.forward(pipe.transformer, branch, x, tokens, layout, step.mods, **extra)
            else:
                out = pipe.transformer.forward_tokens(x, tokens, None, layout, step.mods, **extra)
        return unpatchify(out, layout.grid, cfg.in_channels, cfg.patch_size).float()

    for k, step in enumerate(denoise_bar(pipe, progress, plan.steps)):
        x = patchify(latents.to(dtype), cfg.patch_size)
        one = dataclasses.replace(step, guided=False) if step.guided else step  # each forward has batch B
        guided, final = step.guided and scale != 0, k == len(plan.steps) - 1
        pred = forward(x, one, plan.varied if step.varied else plan.plain, final and not guided)
        if guided:  # CFG: a second forward for the negatives, mask-free at batch 1
            pred = cfg_combine(pred, forward(x, one, plan.negative, final),
                               plan.guidance_scale if scale is None else scale, plan.norm_limit)
        # The model predicts the negative velocity.
        sigma_next = plan.sigmas[step.index + 1]
        latents = euler_step(latents, -pred, plan.sigmas[step.index], sigma_next)
        if plan.blend is not None:
            latents = plan.blend(latents, sigma_next)
        if on_step_end is not None:
            before = getattr(pipe, "_guidance_scale", None)
            latents = on_step_end(k, step.index, latents)
            scale = guidance_after_step_end(pipe, plan, before, scale)
        if callback is not None:
            callback(k + 1, len(plan.steps))
        if interruptible and interrupted(pipe, k, len(plan.steps), info):
            break
    return latents


def interrupted(pipe, k: int, total: int, info: dict | None) -> bool:
    """Whether the run stops after its step ``k``: diffusers' flag ``pipe._interrupt``, set by a
    ``callback_on_step_end`` or by another thread (it is a Python attribute: reading it costs no host
    sync). A stop that leaves steps unrun is recorded in ``info["interrupted_after"]``, whoever set
    the flag; one after the last step is none (the run is whole)."""
    if not getattr(pipe, "_interrupt", False):
        return False
    if info is not None and k + 1 < total:
        info.setdefault("interrupted_after", k + 1)
    return True


#: What a step-end callback did that the request's settings do not say (``output.info`` keys):
#: ``guidance_changes`` [[steps run, new scale], ...], ``callback_replaced`` [[steps run, "latents"
#: or "mask"], ...] and ``interrupted_after`` (steps run). The image's record (and its PNG text)
#: carries them, and a re-run from the record, which has no callback, is refused rather than
#: silently different.
CALLBACK_RECORD_KEYS = ("guidance_changes", "callback_replaced", "interrupted_after")


def note_guidance_change(info: dict, steps_run: int, before, after) -> None:
    """Record in the run's ``info`` that a step-end callback set ``pipe._guidance_scale`` after
    ``steps_run`` steps: ``info["guidance_changes"]`` lists ``[steps_run, scale]`` (see
    :data:`CALLBACK_RECORD_KEYS`). A value that is not a number is left to
    :func:`guidance_after_step_end` to refuse."""
    if after is before or after == before or isinstance(after, bool) or not isinstance(after, numbers.Real):
        return
    info.setdefault("guidance_changes", []).append([steps_run, float(after)])


def guidance_after_step_end(pipe, plan: SamplingPlan, before, scale: float | None) -> float | None:
    """The guidance scale of the later steps: ``pipe._guidance_scale`` if a step-end callback changed
    it (diffusers' way to turn CFG off part-way: ``pipe._guidance_scale = 0.0``), else ``scale``
    (None: the plan's).
    CFG truncation still applies to the later steps. Turning CFG on in a run that started without it
    is refused: there are no negative features to guide with."""
    after = getattr(pipe, "_guidance_scale", None)
    if after is before or after == before:
        return scale
    if isinstance(after, bool) or not isinstance(after, numbers.Real) or not after >= 0:
        raise ValueError(f"callback_on_step_end set pipe._guidance_scale to {after!r}; it must be a number >= 0 "
                         f"(0 turns CFG off for the later steps)")
    if after > 0 and plan.negative is None:
        raise ValueError(f"callback_on_step_end set pipe._guidance_scale to {after:g}, but the run started without "
                         f"classifier-free guidance (guidance_scale 0): there are no negative prompt features; start "
                         f"with guidance_scale > 0 and lower it in the callback instead")
    return float(after)


@torch.no_grad()
def denoise(pipe, latents, prompt_embeds, negative_embeds, schedule: Schedule, guidance_scale=0.0,
            cfg_normalization=False, cfg_truncation=1.0, progress=True, start=0, callback=None, blend=None,
            extra=None, on_step_end=None, varied=None, varied_steps=0.0, cache=0.0,
            info: dict | None = None) -> torch.Tensor:
    """Plan and run the step loop from ``latents`` at schedule step ``start``; the final fp32 latents.
    The pipeline's graphed loop (``cuda_graphs``) runs it, ``on_step_end`` after each step's replay
    (in loop mode too: such a run replays step graphs), unless the first-block cache (``cache`` > 0;
    its counts go to ``info["first_block_cache_forwards"]``) is on. With ``offload="blocks"`` the
    last forward prefetches no block for a step that does not come (:func:`offload.streamed_pass`), and
    what is still held at the end (the DiT's, the ControlNet branch's: an interrupted or failed run's
    prefetch) is dropped: nothing stays on the device between requests
    (:func:`offload.release_streamed`)."""
    with pipe._running("transformer"):
        try:
            p = plan(pipe, latents.shape[-2:], prompt_embeds, negative_embeds, schedule, guidance_scale,
                     cfg_normalization, cfg_truncation, start, blend, extra, varied, varied_steps, cache)
            latents = latents.to(pipe.device, torch.float32)
            if pipe._graphed is not None and p.cache is None:
                return pipe._graphed(latents, p, progress, callback, on_step_end, info)
            latents = run_steps(pipe, latents, p, progress, callback, on_step_end, info)
            if p.cache is not None and info is not None:
                info["first_block_cache_forwards"] = p.cache.counts()
            return latents
        finally:
            release_streamed(pipe.transformer, pipe.controlnet)


# =========================================================================== the run


def latent_multiple(pipe) -> int:
    """Image sizes are multiples of this: the VAE's downscale times the DiT's patch size."""
    return pipe.vae_scale_factor * pipe.transformer_config.patch_size


def latent_shape(pipe, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = pipe.vae_scale_factor
    return (batch, pipe.transformer_config.in_channels, height // f, width // f)


def randn(shape, generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """Noise as diffusers draws it: one draw of the whole shape from a single generator, or one
    draw per item from a list of generators; on the generator's device."""
    if len(generators) == 1:
        g = generators[0]
        return torch.randn(shape, generator=g, device=g.device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).cpu()
                      for g in generators])


def make_generators(seeds, generator, batch: int) -> tuple[list[torch.Generator], list[int] | None]:
    """One generator (shared, as diffusers) or one per image for a list of seeds."""
    if generator is not None:
        generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
        if len(generators) not in (1, batch):  # before the prompts are encoded, not where the noise is drawn
            raise ValueError(f"got {len(generators)} generators for {batch} images: give one generator or one per "
                             f"image (the prompts times num_images_per_prompt)")
        return generators, None
    seeds = list(seeds) if seeds else [random.randrange(2**63)]
    if len(seeds) not in (1, batch):
        raise ValueError(f"got {len(seeds)} seeds for {batch} images: give one seed or one per image")
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds], seeds


#: Added to an image's seed for its seed-variance noise, so that this noise never shares a stream with
#: the initial noise of a neighbouring seed (--num-images draws consecutive seeds).
VARIANCE_SEED_OFFSET = 0x9E3779B97F4A7C15


def check_seed_variance(amount, share=None, steps=None) -> None:
    """Refuse seed-variance settings out of range (ValueError naming the argument); None: unset."""
    for name, value in (("seed_variance", amount), ("seed_variance_share", share), ("seed_variance_steps", steps)):
        if value is None and name != "seed_variance":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if amount < 0:
        raise ValueError(f"seed_variance must be >= 0 (0 turns it off), got {amount}")
    if share is not None and not 0 < share <= 1:
        raise ValueError(f"seed_variance_share must be > 0 and <= 1 (the fraction of feature values varied), got {share}")
    if steps is not None and not 0 < steps <= 1:
        raise ValueError(f"seed_variance_steps must be > 0 and <= 1 (the fraction of the steps that see the varied "
                         f"features), got {steps}")


#: The seed-variance settings used when seed variance is on and they are unset.
SEED_VARIANCE_DEFAULTS = {"seed_variance_share": 0.5, "seed_variance_steps": 0.2}


def check_seed_variance_given(amount, share, steps, flags: bool = False) -> None:
    """Refuse a share or steps setting without seed variance (``amount`` 0 or unset), where it would
    change nothing; ``flags``: name the CLI's flags."""
    for name, value in (("seed_variance_share", share), ("seed_variance_steps", steps)):
        if value is not None and not amount:
            given, needs = (f"--{name.replace('_', '-')}", "--seed-variance A") if flags else \
                (name, "seed_variance > 0")
            raise ValueError(f"{given} {value!r} needs {needs} (seed variance is off, so it would change nothing)")


def seed_variance_default(r: GenerationRequest, name: str) -> float | None:
    """A seed-variance setting as given, else its default while seed variance is on (None when off)."""
    value = getattr(r, name)
    return SEED_VARIANCE_DEFAULTS[name] if value is None and r.seed_variance else value


def vary(embeds: list[torch.Tensor], amount: float, share: float, seeds: list[int]) -> list[torch.Tensor]:
    """Seed variance (what ComfyUI's SeedVarianceEnhancer node does for Z-Image-Turbo, whose images
    change little with the seed): each image's prompt features with uniform noise in
    [-amount, amount] added to a random ``share`` of their values. The noise is drawn on the CPU in
    fp32 from a generator seeded with the image's seed plus :data:`VARIANCE_SEED_OFFSET` (one seed for
    a batch: one generator, drawn image after image, as the initial noise), so a seed reproduces it
    on every device. Per image: a (L, D) draw that picks the values, then one for the noise."""
    gens = [torch.Generator("cpu").manual_seed((int(s) + VARIANCE_SEED_OFFSET) % 2**64) for s in seeds]
    out = []
    for i, e in enumerate(embeds):
        g = gens[i] if len(gens) > 1 else gens[0]
        picked = torch.rand(tuple(e.shape), generator=g) < share
        noise = (torch.rand(tuple(e.shape), generator=g) * 2 - 1) * amount
        out.append((e.float() + torch.where(picked, noise, 0.0).to(e.device)).to(e.dtype))
    return out


def text_list(value, name: str) -> list:
    """A prompt or negative prompt as a list: a string is one, None none, a list, tuple or numpy array
    of strings as it is. pipe(5) is a TypeError naming the type, not "'int' object is not iterable";
    bytes (not one prompt per byte) and a dict too; a numpy array is not asked its truth value."""
    if isinstance(value, str):
        return [value]
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    return list(value)


def check_request(prompt, width=1024, height=1024, steps=8, seed=None, generator=None, guidance_scale=0.0, n=1,
                  output_type="pil", max_len=512, multiple: int = 16, prompt_embeds=None,
                  cfg_normalization=0.0) -> list[str]:
    """Validate a generation request before any work is done; returns the prompts as a list."""
    prompts = text_list(prompt, "prompt")
    if prompt_embeds is not None:
        if prompts:
            raise ValueError("give either prompt or prompt_embeds, not both")
        check_embeds("prompt_embeds", prompt_embeds)
    elif not prompts:
        raise ValueError("prompt must be a non-empty string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("every prompt must be a string")
    for name, value in (("width", width), ("height", height)):
        check_side(name, value, multiple)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    check_generator(generator)
    # NaN compared as "not > 0" and ran without CFG; inf ran into a NaN error blaming the weights.
    if (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
            or not math.isfinite(guidance_scale) or guidance_scale < 0):
        raise ValueError(f"guidance_scale must be >= 0, a finite number (0 turns CFG off), got {guidance_scale!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
    if output_type is None:  # diffusers reads None as "np", with a deprecation warning
        raise ValueError(f"output_type=None: give output_type='np' for numpy arrays (what diffusers returns for None, "
                         f"with a deprecation warning), or one of {OUTPUT_TYPES}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_len!r}")
    norm = float(cfg_normalization or 0.0)
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"cfg_normalization must be >= 0 (a multiple of the positive prediction's norm; 0 = off), "
                         f"got {cfg_normalization}")
    return prompts


def check_generator(generator) -> None:
    """``generator``: None, a ``torch.Generator`` or a non-empty list of them (one per image), as in
    diffusers; a number given there (a seed) is refused naming ``seed=``, not "'int' object is not
    iterable" from where the noise is drawn."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and generator and all(isinstance(g, torch.Generator) for g in generator):
        return
    seed = (f"; for a seed, give seed={generator!r}" if isinstance(generator, numbers.Integral)
            and not isinstance(generator, bool) else "")
    raise TypeError(f"generator must be a torch.Generator or a list of them (one per image), got "
                    f"{generator!r:.80}{seed}")


def check_callback(name: str, fn, args: tuple, signature: str) -> None:
    """Refuse a callback that is not callable or cannot take ``args`` (how the run calls it) before any
    model runs, saying how it is called, rather than with a TypeError from inside the first step."""
    if fn is None:
        return
    if not callable(fn):
        raise TypeError(f"{name} must be a function called as {signature}, got {type(fn).__name__}")
    import inspect

    try:
        inspect.signature(fn).bind(*args)
    except ValueError:  # no signature to read (some builtins): left to the call
        return
    except TypeError:
        label = getattr(fn, "__qualname__", type(fn).__name__)
        raise TypeError(f"{name}: {label}{inspect.signature(fn)} cannot take the arguments it is called with; it "
                        f"is called as {signature}") from None


def empty_embeds(embeds) -> bool:
    """Whether ``embeds`` is an empty list (or tuple): diffusers' ``encode_prompt`` returns ``[]`` as the
    negative embeddings when CFG is off, and scripts pass it on; it stands for none given."""
    return isinstance(embeds, (list, tuple)) and not embeds


def check_embeds(name: str, embeds, width: int | None = None) -> None:
    """``prompt_embeds`` / ``negative_prompt_embeds``: a non-empty list of (tokens, features) tensors,
    one per prompt, as ``encode_prompt`` returns them (real tokens only, each its own length);
    ``width``: the features the DiT takes (``cap_feat_dim``). A (B, L, D) tensor is refused, not
    split: other pipelines pad their rows, and pad rows read as tokens would change the image."""
    if isinstance(embeds, torch.Tensor):
        raise ValueError(f"{name} must be a list of (tokens, features) tensors, one per prompt, got one tensor of "
                         f"shape {tuple(embeds.shape)}; pipe.encode_prompt(prompts) gives such a list (for a "
                         f"(B, L, D) tensor whose rows are all real tokens, pass list(tensor))")
    if not isinstance(embeds, (list, tuple)) or not embeds:
        raise ValueError(f"{name} must be a non-empty list of (tokens, features) tensors, one per prompt")
    for i, e in enumerate(embeds):
        if not isinstance(e, torch.Tensor) or e.ndim != 2:
            got = f"shape {tuple(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name}[{i}] must be a (tokens, features) tensor, got {got}; {name} is a list of them, "
                             f"one per prompt, as pipe.encode_prompt(prompts) gives it")
    wrong = sorted({e.shape[1] for e in embeds} - {width}) if width is not None else []
    if wrong:
        raise ValueError(f"{name} hold {wrong[0]} features per token, the DiT takes {width} (Qwen3's hidden "
                         f"size): encode them with this pipeline's text encoder (pipe.encode_prompt)")


def check_seeds(seeds) -> list[int] | None:
    """Seeds as Python ints in [0, 2**64) (numpy integers too); a float, a bool or -1 is refused
    rather than turned into another seed (the CLI's and server's -1, "random", is None here)."""
    if seeds is None:
        return None
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < 2**64:
            raise ValueError(f"a seed must be an integer in [0, 2**64), got {s!r} (leave seed unset for a random one)")
    return [int(s) for s in seeds]


def _integer(value):
    """numpy and other integral scalars, and 0-d integer tensors and arrays (as diffusers takes them), as
    Python ints (a size or step count from an array); anything else as it is, for the checks to refuse
    by name."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        number = value.item()  # (a float or bool one stays a tensor, refused as given)
        value = number if isinstance(number, int) and not isinstance(number, bool) else value
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


#: The request's number settings, made plain Python numbers by :func:`resolve` (:func:`_number`).
NUMBER_SETTINGS = ("guidance_scale", "shift", "strength", "cfg_normalization", "cfg_truncation", "control_scale",
                   "seed_variance", "seed_variance_share", "seed_variance_steps", "first_block_cache")


def _number(value):
    """A numpy number or a one-value (0-d) array or tensor as a Python int or float, so that the run's
    record (``out.info``, the PNG and server records) holds plain JSON numbers; anything else (a
    bool, a string, a list) as it is, for the checks to refuse by name."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


def check_size_fits(width: int, height: int, axes_lens, multiple: int = 16) -> None:
    """The DiT's RoPE tables hold ``axes_lens[1]`` rows and ``axes_lens[2]`` columns of patches (the
    released models: 512 each, so sides up to 8192 pixels); a larger side is refused by name."""
    for name, value, patches in (("height", height, axes_lens[1]), ("width", width, axes_lens[2])):
        if value > patches * multiple:
            raise ValueError(f"{name} must be at most {patches * multiple} pixels for this model (its position "
                             f"table covers {patches} patches of {multiple} pixels), got {value}")


def check_caption_fits(max_len: int, axes_lens, name: str = "max_sequence_length") -> None:
    """The DiT's first RoPE axis numbers the caption rows (padded to a multiple of 32), then the
    image: a larger token limit would let a long prompt fail inside the DiT after encoding, so it is
    refused (the released models: 1536 positions, at most 1504 tokens)."""
    most = (axes_lens[0] - 2) // 32 * 32
    if max_len > most:
        raise ValueError(f"{name} must be at most {most} for this model (its position table holds {axes_lens[0]} "
                         f"caption positions), got {max_len}")


def resolve(pipe, r: GenerationRequest) -> tuple[GenerationRequest, Task, dict[str, Any]]:
    """Fill unset settings (task inputs, template suggestions, variant defaults) and check
    everything, before any model runs. Returns (resolved request, task, task inputs)."""
    width = pipe.transformer_config.cap_feat_dim
    no_negatives = empty_embeds(r.negative_prompt_embeds)  # diffusers' encode_prompt without CFG returns []
    if no_negatives:
        r = dataclasses.replace(r, negative_prompt_embeds=None)
    for name in ("prompt_embeds", "negative_prompt_embeds"):  # before r.n counts them
        if getattr(r, name) is not None:
            check_embeds(name, getattr(r, name), width)
    r = dataclasses.replace(r, **{name: _number(getattr(r, name)) for name in NUMBER_SETTINGS})
    task = get_task(task_name(r))
    if r.control_scale is not None and r.control_image is None:  # it would change nothing
        raise ValueError(f"controlnet_conditioning_scale needs control_image= (and a ControlNet loaded), got "
                         f"{r.control_scale!r} without a control image")
    check_seed_variance_given(r.seed_variance, r.seed_variance_share, r.seed_variance_steps)
    inputs, w, h = task.read(pipe, r)
    suggested = dict(getattr(pipe._template(r.template), "settings", None) or {})
    defaults = pipe.defaults
    sigma_count = sigma_values(r.sigmas).numel() if r.sigmas is not None else 0
    if r.latents is not None and not isinstance(r.latents, torch.Tensor):  # (else "... has no attribute 'to'")
        numpy = "; torch.from_numpy(array) makes one" if isinstance(r.latents, np.ndarray) else ""
        raise TypeError(f"latents must be a torch tensor (batch, {pipe.transformer_config.in_channels}, height/"
                        f"{pipe.vae_scale_factor}, width/{pipe.vae_scale_factor}), got {type(r.latents).__name__}"
                        f"{numpy}")
    r = dataclasses.replace(
        r,
        width=_integer(r.width if r.width is not None else w if w is not None else suggested.get("width", 1024)),
        height=_integer(r.height if r.height is not None else h if h is not None else suggested.get("height", 1024)),
        steps=_integer(sigma_count if sigma_count else r.steps if r.steps is not None  # sigmas set the step count
                       else suggested.get("steps", defaults.num_inference_steps)),
        seeds=check_seeds(r.seeds),
        guidance_scale=_number(r.guidance_scale if r.guidance_scale is not None
                               else suggested.get("guidance_scale", defaults.guidance_scale)),
        negative_prompt=r.negative_prompt if r.negative_prompt is not None else suggested.get("negative_prompt"),
        strength=r.strength if r.strength is not None else getattr(task, "default_strength", None),
        control_scale=r.control_scale if r.control_scale is not None else getattr(task, "default_scale", None),
        num_images_per_prompt=_integer(r.n),
        max_sequence_length=_integer(r.max_sequence_length),
        seed_variance_share=seed_variance_default(r, "seed_variance_share"),
        seed_variance_steps=seed_variance_default(r, "seed_variance_steps"),
        fields={k: v for k, v in r.fields.items() if v is not None},
    )
    check_request(r.prompt, r.width, r.height, r.steps, r.seeds, r.generator, r.guidance_scale, r.n, r.output_type,
                  r.max_sequence_length, latent_multiple(pipe), r.prompt_embeds, r.cfg_normalization)
    check_size_fits(r.width, r.height, pipe.transformer_config.axes_lens, latent_multiple(pipe))
    check_caption_fits(r.max_sequence_length, pipe.transformer_config.axes_lens)
    if r.cfg_truncation is not None and (isinstance(r.cfg_truncation, bool)
                                         or not isinstance(r.cfg_truncation, numbers.Real)):
        raise ValueError(f"cfg_truncation must be a number (CFG stops once 1 - sigma exceeds it; 1 or None: never), "
                         f"got {r.cfg_truncation!r}")
    unknown = set(r.fields) - set(PROMPT_FIELDS)
    if unknown:
        raise ValueError(f"unknown prompt fields {sorted(unknown)}; known: {list(PROMPT_FIELDS)}")
    if no_negatives and r.guidance_scale > 0:
        raise ValueError(f"negative_prompt_embeds=[] holds no negative embeddings (what diffusers' encode_prompt "
                         f"returns with CFG off), but guidance_scale {r.guidance_scale} turns CFG on: give one per "
                         f"prompt (pipe.encode_prompt(negative_prompts)), or guidance_scale=0")
    if r.prompt_embeds is not None and r.guidance_scale > 0 and r.negative_prompt_embeds is None:
        raise ValueError("with prompt_embeds and guidance_scale > 0, give negative_prompt_embeds too")
    check_seed_variance(r.seed_variance, r.seed_variance_share, r.seed_variance_steps)
    check_threshold(r.first_block_cache)
    problem = pipeline_cache_problem(pipe) if r.first_block_cache else None
    if problem:
        raise ValueError(problem)
    return r, task, inputs


def schedule_for(pipe, r: GenerationRequest) -> Schedule:
    f = latent_multiple(pipe)
    return make_schedule(pipe.scheduler_config, None if r.sigmas is not None else r.steps, r.sigmas,
                         image_seq_len=(r.height // f) * (r.width // f), shift=r.shift)


def encode(pipe, r: GenerationRequest, info: dict) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Prompt features (and, with CFG, negative ones: both in one text-encoder call), repeated per image."""
    n, use_cfg = r.n, r.guidance_scale > 0
    if r.prompt_embeds is not None:
        embeds = [e.to(pipe.device) for e in r.prompt_embeds]
        negative = [e.to(pipe.device) for e in r.negative_prompt_embeds] if use_cfg else None
    else:
        texts = pipe.format_prompts(r.prompts, r.template, **r.fields)
        info["formatted_prompts"] = texts
        own_negatives = use_cfg and r.negative_prompt_embeds is None
        negatives = pipe.format_prompts(negative_prompts(r.negative_prompt, len(r.prompts))) if own_negatives else []
        features = pipe.encode_texts(texts + negatives, r.max_sequence_length)
        embeds, negative = features[: len(texts)], features[len(texts):] if own_negatives else None
        if use_cfg and not own_negatives:
            negative = [e.to(pipe.device) for e in r.negative_prompt_embeds]
    if negative is not None and len(negative) != len(embeds):
        raise ValueError(f"got {len(negative)} negative prompt embeddings for {len(embeds)} prompts")
    if n > 1:  # [p0, p0, p1, p1, ...], as the reference repeats them
        embeds = [e for e in embeds for _ in range(n)]
        negative = [e for e in negative for _ in range(n)] if negative is not None else None
    info["token_counts"] = [int(e.shape[0]) for e in embeds]
    return embeds, negative


def negative_prompts(negative_prompt, n: int) -> list[str]:
    """One negative prompt per prompt: None is "" for each, one string serves every prompt (the
    CLI's --negative-prompt with --batch-size; diffusers asserts here), a list must match."""
    if negative_prompt is None:
        negative_prompt = ""
    negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else text_list(negative_prompt,
                                                                                          "negative_prompt")
    if len(negatives) != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts")
    return negatives


def negative_given(request: GenerationRequest) -> bool:
    """Whether the caller gave a negative prompt (a template's suggested one is not given)."""
    negative = request.negative_prompt
    given = negative != "" if isinstance(negative, str) else len(text_list(negative, "negative_prompt")) > 0
    return given or (request.negative_prompt_embeds is not None and not empty_embeds(request.negative_prompt_embeds))


def request_advice(variant: str, guidance_scale: float, steps: int | None, negative: bool) -> list[str]:
    """What a request should be told: habits of other tools that cost time here or change nothing
    (CFG or 9 steps on Turbo, a negative prompt without CFG). ``steps`` None: given as sigmas."""
    said = (turbo_cfg_advice(variant, guidance_scale), unused_negative_advice(negative, guidance_scale),
            turbo_steps_advice(variant, steps) if steps is not None else None)
    return [text for text in said if text]


def unused_negative_advice(given: bool, guidance_scale: float) -> str | None:
    """What to say when a negative prompt was given but CFG is off (None otherwise): it acts only
    through classifier-free guidance."""
    if not given or guidance_scale > 0:
        return None
    return ("the negative prompt is not used: it acts through classifier-free guidance, which is off "
            "(guidance_scale 0, the default for Z-Image-Turbo); guidance_scale > 0 turns it on, at two DiT "
            "forwards per step")


def turbo_steps_advice(variant: str, steps: int) -> str | None:
    """What to say for 9 steps on Turbo (None otherwise): the model card's example asked diffusers
    for 9 to get 8 DiT forwards, before diffusers dropped its redundant last step (PR 13730); here,
    as in diffusers 0.42.1, steps are forwards, so 9 runs one more than Turbo is distilled for."""
    if variant != "turbo" or steps != 9:
        return None
    return ("9 steps run 9 DiT forwards here (as in diffusers 0.42.1), one more than Z-Image-Turbo is distilled "
            "for: the model card's example used 9 to get 8 forwards in older diffusers. 8, the default, is "
            "Turbo's schedule")


def turbo_cfg_advice(variant: str, guidance_scale: float) -> str | None:
    """What to say when CFG is on for Z-Image-Turbo (None otherwise): it is distilled to run without
    CFG, which doubles the DiT forwards; guidance 1 is most often ComfyUI's "cfg 1" (off there)."""
    if variant != "turbo" or not guidance_scale > 0:
        return None
    if guidance_scale == 1:
        return ("guidance_scale 1 turns classifier-free guidance on: two DiT forwards per step (about twice the "
                "time) and a push away from the negative prompt. Z-Image-Turbo is distilled to run without it "
                "(guidance_scale 0, its default). In ComfyUI and stable-diffusion.cpp cfg 1 means off; here that "
                "is guidance_scale 0 (their cfg is this scale + 1)")
    return (f"guidance_scale {guidance_scale:g} turns classifier-free guidance on for Z-Image-Turbo, which is "
            f"distilled to run without it: two DiT forwards per step, about twice the time (guidance_scale 0, "
            f"the default, turns it off)")


def optional_settings(r: GenerationRequest) -> dict[str, Any]:
    """The request's settings that are off by default, for its record (those that are on): seed
    variance, the first-block cache, CFG normalisation and truncation, a token limit other than 512,
    and custom ``sigmas`` (as given, before the shift; a re-run with them draws the same schedule)."""
    names = ("seed_variance", "seed_variance_share", "seed_variance_steps") if r.seed_variance else ()
    out = {name: seed_variance_default(r, name) if name in SEED_VARIANCE_DEFAULTS else getattr(r, name)
           for name in (*names, "first_block_cache")}  # (the share and steps in effect, given or not)
    out = {name: value for name, value in out.items() if value}
    if r.cfg_normalization:
        out["cfg_normalization"] = float(r.cfg_normalization)  # True (diffusers' flag) is 1 here
    if r.cfg_truncation is not None and r.cfg_truncation < 1:  # 1 and None never truncate
        out["cfg_truncation"] = r.cfg_truncation
    if r.max_sequence_length != 512:
        out["max_sequence_length"] = r.max_sequence_length
    if r.sigmas is not None:
        out["sigmas"] = torch.as_tensor(r.sigmas, dtype=torch.float64).flatten().tolist()
    return out


def request_info(pipe, r: GenerationRequest, seeds, **extra) -> dict[str, Any]:
    from . import __version__

    prompts = r.prompts or [None] * len(r.prompt_embeds or ())
    return {"prompts": prompts, "negative_prompt": r.negative_prompt, "width": r.width, "height": r.height,
            "steps": r.steps, "guidance_scale": r.guidance_scale, "seeds": seeds,
            "template": getattr(r.template, "name", r.template), **r.fields,
            "shift": r.shift, "model": pipe.source, "variant": pipe.variant, "version": __version__,
            **optional_settings(r),
            "loras": [[lr.path, lr.scale] for lr in pipe.loras] or None, **extra}


def remake_info(r: GenerationRequest, seeds: list[int] | None, batch: int) -> dict[str, Any]:
    """What an image's seed alone does not say, for its record: ``noise`` "generator" or "latents"
    when the caller gave the start (no seed remakes the image), ``batch_size`` when one seed drew
    the noise of several images (image k is the k-th of a run of that many; see
    ``metadata.image_record``)."""
    if r.latents is not None or r.generator is not None:
        return {"noise": "latents" if r.latents is not None else "generator"}
    return {"batch_size": batch} if seeds is not None and len(seeds) == 1 and batch > 1 else {}


STEP_END_TENSORS = ("latents", "prompt_embeds")  # prompt_embeds: read only
INPAINT_STEP_END_TENSORS = STEP_END_TENSORS + ("mask",)  # the blend's mask (B, 1, h, w), 1 = repaint
StepEndCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


@torch.no_grad()
def generate(pipe, request: GenerationRequest, *, progress: bool | None = None,
             callback: Callable[[int, int], None] | None = None,
             callback_on_step_end: StepEndCallback | None = None,
             callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)):
    """Run one request on ``pipe`` (a ZImagePipeline): encode -> condition -> plan -> steps -> decode.

    ``callback(step, total)`` runs after each step (raise in it to stop the run).
    ``callback_on_step_end(pipe, i, t, tensors)`` as in diffusers: ``i`` counts the steps run,
    ``t`` is the step's timestep, ``tensors`` holds the names of
    ``callback_on_step_end_tensor_inputs`` ("latents", "prompt_embeds"); it returns a dict whose
    ``latents``, if present, replace the current latents (prompt_embeds are read only; inpainting
    also gives and takes ``mask``, its latent-grid mask, as diffusers' inpainting does); setting
    ``pipe._interrupt = True`` in it stops the run after that step, and the latents so far are
    decoded, as diffusers does. With CUDA graphs it runs after each step's replay, on a copy of the
    latents (the graph's own are overwritten by the next replay); in loop mode such a run replays
    step graphs (one loop replay runs every step).
    """
    from .pipeline import ZImageOutput

    pipe._interrupt = False
    r, task, inputs = resolve(pipe, request)
    known = INPAINT_STEP_END_TENSORS if task.name == "inpaint" else STEP_END_TENSORS
    if isinstance(callback_on_step_end_tensor_inputs, str):  # (else refused letter by letter)
        raise ValueError(f"callback_on_step_end_tensor_inputs is a list of names, such as ['latents']; got the "
                         f"string {callback_on_step_end_tensor_inputs!r}")
    bad = [k for k in callback_on_step_end_tensor_inputs if k not in known]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs can hold {known} here, got {bad}")
    check_callback("callback_on_step_end", callback_on_step_end, (pipe, 0, 0, {}),
                   "fn(pipe, step, timestep, callback_kwargs), returning a dict (diffusers' signature)")
    check_callback("callback", callback, (1, 1),
                   "fn(step, total) after each step; diffusers' callback(step, timestep, latents) is "
                   "callback_on_step_end=fn(pipe, step, timestep, callback_kwargs) here, with callback_kwargs['latents']")
    schedule = schedule_for(pipe, r)
    task.check(pipe, r, schedule)
    for advice in request_advice(pipe.variant, r.guidance_scale, r.steps if r.sigmas is None else None,
                                 negative_given(request)):
        if advice not in pipe.advised:  # once per pipeline and value: a server runs many requests
            pipe.advised.add(advice)
            logger.warning(advice)
    batch = len(r.prompts or r.prompt_embeds) * r.n
    if r.output_type != "latent" and pipe.vae is not None:  # before any model runs; a tile as large as the image too
        check_decode_fits(pipe.placement["vae"], next(pipe.vae.parameters()).dtype,
                          pipe.vae_config.block_out_channels[0], r.width, r.height,
                          1 if getattr(pipe, "vae_slicing", False) else batch,  # sliced: one image at a time
                          pipe.vae_tiling.tile_size if pipe.vae_tiling is not None else None)
    needs_noise = r.latents is None or task.draws_with_latents or r.seed_variance > 0  # (the variance is seeded)
    generators, seeds = make_generators(r.seeds, r.generator, batch) if needs_noise else (None, None)
    info = request_info(pipe, r, seeds, **remake_info(r, seeds, batch))
    embeds, negative = encode(pipe, r, info)
    ctx = TaskContext(pipe, r, inputs, schedule, generators, batch, embeds[0].dtype)
    cond = task.condition(ctx)
    info.update(cond.info)
    # diffusers' run state, read (and _guidance_scale set) by callbacks: pipe.guidance_scale, num_timesteps
    pipe._guidance_scale, pipe._num_timesteps = r.guidance_scale, schedule.num_steps - cond.start

    on_step_end = None
    if callback_on_step_end is not None:
        # The timesteps the callback is given, on the loop's device, copied there once, before the loop: a
        # copy per step (host to device, not non_blocking) made the host wait for the GPU at each step.
        timesteps = schedule.timesteps.to(pipe.device)

        def on_step_end(k, index, latents):
            given = {"latents": latents, "prompt_embeds": embeds}
            if task.name == "inpaint":
                given["mask"] = cond.blend.mask
            tensors = {name: given[name] for name in callback_on_step_end_tensor_inputs}
            before = pipe._guidance_scale
            out = callback_on_step_end(pipe, k, timesteps[index], tensors)
            if out is None:
                out = {}
            elif not isinstance(out, Mapping):  # (the latents themselves: "Boolean value of Tensor ... ambiguous")
                raise TypeError(f"callback_on_step_end returned a {type(out).__name__} after step {k + 1}; it returns "
                                f"a dict (callback_kwargs, or {{'latents': tensor}} to replace the latents; None or "
                                f"{{}} changes nothing)")
            note_guidance_change(info, k + 1, before, pipe._guidance_scale)
            replaceable = [name for name in given if name != "prompt_embeds"]
            if out.get("prompt_embeds", embeds) is not embeds:
                raise ValueError(f"callback_on_step_end: replacing prompt_embeds mid-run is not supported (the "
                                 f"caption tokens are refined once per request); only {replaceable} can be replaced")
            unknown = sorted(set(out) - set(given))
            if unknown:  # diffusers would use negative_prompt_embeds; ignoring them would hide that
                raise ValueError(f"callback_on_step_end returned {unknown}; only {replaceable} can be replaced here")
            for name in ("latents", "mask"):  # what the record cannot remake (note_callback_changes)
                if name in out and out[name] is not given[name]:
                    # (else the DiT or a graph capture fails on a device mismatch; not a tensor: refused below)
                    if isinstance(out[name], torch.Tensor) and out[name].device != given[name].device:
                        raise ValueError(f"callback_on_step_end returned {name} on {out[name].device} after step "
                                         f"{k + 1}; the run's are on {given[name].device}: return them there "
                                         f"(.to(callback_kwargs[{name!r}].device))")
                    info.setdefault("callback_replaced", []).append([k + 1, name])
            if "mask" in out:  # the blend reads it from the next step on
                cond.blend.mask = out["mask"]
            new = out.get("latents", latents)
            if not isinstance(new, torch.Tensor) or new.shape != latents.shape:  # (else a shape error in the DiT)
                got = f"shape {tuple(new.shape)}" if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"callback_on_step_end returned latents of {got} after step {k + 1}; they replace "
                                 f"the run's latents, of shape {tuple(latents.shape)}: return a tensor of that shape "
                                 f"(callback_kwargs['latents'] changed in place, or a new one)")
            return new

    varied = None
    if r.seed_variance > 0:  # a generator given: its seed stands for the image's
        varied = vary(embeds, r.seed_variance, r.seed_variance_share,
                      seeds if seeds is not None else [g.initial_seed() for g in generators])
    text_ok = finite_all(embeds + (negative or []))  # read at the end (no sync here)
    latents = denoise(pipe, cond.latents, embeds, negative, schedule, r.guidance_scale, r.cfg_normalization,
                      r.cfg_truncation, pipe.progress if progress is None else progress, cond.start, callback,
                      cond.blend, cond.extra, on_step_end, varied, r.seed_variance_steps, r.first_block_cache, info)
    return ZImageOutput(images=finish(pipe, latents, r.output_type, text_ok, seeds, r.prompt_embeds is not None),
                        seeds=seeds, info=info)


def finish(pipe, latents: torch.Tensor, output_type: str, text_ok: torch.Tensor | None = None,
           seeds: list[int] | None = None, given_embeds: bool = False):
    """Decode to ``output_type`` and refuse NaN or inf (:func:`finite.check_finite`); the check reads
    its flags after the copy to the host ("np", "pil"), which waits for the run anyway."""
    latents_ok = finite_rows(latents)
    if output_type == "latent":
        check_finite(pipe, text_ok, latents_ok, None, seeds, given_embeds)
        return latents
    images = pipe.decode(latents)
    images_ok = finite_rows(images)
    if output_type == "pil":  # made 8-bit where it was decoded: no float image on the host
        images = to_uint8(images).cpu()
    elif output_type == "np":
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    check_finite(pipe, text_ok, latents_ok, images_ok, seeds, given_embeds)
    return uint8_to_pil(images) if output_type == "pil" else images
