"""ZImagePipeline: prompt -> caption features -> FlowMatch Euler sampling with the DiT -> VAE decode.

Semantics are those of diffusers 0.42.1 ``ZImagePipeline`` and ``ZImageImg2ImgPipeline`` (the
parity references):
- prompts are wrapped in the Qwen3 chat format and encoded to hidden_states[-2];
- the initial noise is fp32, drawn on the generator's device (the CPU for ``seed=``), shape
  (B, 16, H/8, W/8); latents stay fp32 and are cast to the DiT dtype only as model input;
- the DiT output is the negative velocity; CFG (guidance_scale > 0) is pos + g * (pos - neg) in fp32;
- decode: z / scaling_factor + shift_factor in the VAE dtype, then (x * 0.5 + 0.5).clamp(0, 1);
- img2img: a VAE posterior *sample* is drawn before the noise, from the same generator, and the
  start latents sigma * noise + (1 - sigma) * z are formed in the text encoder's dtype.

Per-request work (tokenising, padding, positions, RoPE tables, masks, the sigma schedule) happens
once before the step loop; the loop itself has no host syncs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .control import ControlInput, ControlNetSlot, check_scale, control_context, repeat_to
from .config import SchedulerConfig, TransformerConfig, VAEConfig
from .devices import OFFLOAD_MODES, load_device, resolve_device, resolve_dtype, storage_device
from .hub import DEFAULT_MODEL, load_tokenizer, resolve_model_folder
from .loading import load_component, load_module, load_single_files
from .lora import LoraMixin
from .model.sequence import SequenceLayout, build_layout, ceil_to, pad_captions, patchify, unpatchify
from .model.transformer import ZImageTransformer
from .model.vae import AutoencoderKL
from .prompt.format import format_prompt
from .prompt.rewriter import RewriterMixin
from .scheduler import Schedule, euler_step, make_schedule
from .text_encoder import TextEncoder, load_qwen3_encoder
from .tiling import TileConfig, tiled_decode, tiled_encode

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")
CAPTION_BUCKETS = (64, 128, 256, 512)


@dataclass(frozen=True)
class VariantDefaults:
    num_inference_steps: int
    guidance_scale: float


# Turbo is distilled for 8 forwards without CFG; the base model card recommends 50 steps, guidance 4.
VARIANTS = {"turbo": VariantDefaults(8, 0.0), "base": VariantDefaults(50, 4.0)}


@dataclass
class Step:
    index: int  # into the schedule
    guided: bool  # CFG on for this step
    mods: list[torch.Tensor]  # precomputed modulation vectors, (1, 4D) per block and (1, D) final


@dataclass
class SamplingPlan:
    """The static inputs of the step loop for one request (see ``ZImagePipeline.plan``)."""

    steps: list[Step]
    plain: tuple[SequenceLayout, torch.Tensor]  # layout and refined caption tokens, positives only
    guided: tuple[SequenceLayout, torch.Tensor] | None  # positives then negatives
    sigmas: torch.Tensor
    guidance_scale: float
    norm_limit: float
    extra: Any = None  # the ControlNet task's per-request inputs (zimage_native.control)


@dataclass
class Request:
    """A generation request after defaults are resolved and inputs checked."""

    prompts: list[str]
    width: int
    height: int
    steps: int
    guidance_scale: float
    negative_prompt: str | list[str] | None
    fields: dict[str, Any]  # the chat-format fields (system_prompt, thinking_content, ...)
    progress: bool
    batch: int


@dataclass
class ZImageOutput:
    """``images``: PIL images, an (N, H, W, 3) array in [0, 1], or the final fp32 latents.

    ``seeds`` holds the seed of each image when seeds were used; ``info`` the request as run
    (formatted prompts, token counts, settings), which the CLI writes into PNG metadata.
    """

    images: Any
    seeds: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def detect_variant(source: str, scheduler_config: SchedulerConfig) -> str:
    """'turbo' or 'base' from the model's name, else from the scheduler shift (Turbo 3, base 6)."""
    name = str(source).lower().rstrip("/")
    if "turbo" in name:
        return "turbo"
    if scheduler_config.shift == 6.0 or name.endswith("z-image"):
        return "base"
    return "turbo"


class ZImagePipeline(LoraMixin, RewriterMixin):
    """Text-to-image (and img2img) with Z-Image. Build with :meth:`from_pretrained`, call like a function.

    ``from_single_files`` builds one from ComfyUI / all-in-one / fp8 files
    (:func:`zimage_native.loading.load_single_files`).
    Mixed in: ``load_lora``/``unload_lora`` (:mod:`zimage_native.lora`) and ``rewrite`` (the prompt rewriter,
    :mod:`zimage_native.prompt.rewriter`).
    """

    def __init__(
        self,
        transformer: ZImageTransformer,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        scheduler_config: SchedulerConfig,
        vae_config: VAEConfig,
        source: str | None = None,
        variant: str | None = None,
        model_folder: str | os.PathLike | None = None,
        placement: dict[str, torch.device] | None = None,
        offload: str = "none",
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = scheduler_config
        self.vae_config = vae_config
        self.source = source
        self.model_folder = Path(model_folder) if model_folder is not None else None
        self.variant = variant or detect_variant(source or "", scheduler_config)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        here = transformer.x_pad_token.device
        self.placement = {"text_encoder": here, "transformer": here, "vae": here, **(placement or {})}
        self.offload = offload
        if offload == "blocks" and getattr(transformer, "block_streamer", None) is None:
            from .offload import stream_blocks

            stream_blocks(transformer, self.placement["transformer"])  # the resident parts move there
        self.vae_tiling: TileConfig | None = None
        # Static caption lengths (multiples of 32) for compiled/graphed runs; None = exact lengths.
        self.caption_buckets: tuple[int, ...] | None = None
        self._accel = {"kernels": "none", "attention": "sdpa", "compile": "off", "fp8": False, "cuda_graphs": False}
        self._graphed = None
        self.templates_dirs: list[str] = []
        self.progress = True
        self.controlnets = ControlNetSlot()

    @property
    def controlnet(self):
        """The loaded ControlNet-Union branch (``load_controlnet``), or None."""
        return self.controlnets.model

    def load_controlnet(self, path: str | os.PathLike, config=None):
        """Load a Fun-ControlNet-Union (a diffusers folder or a published single file, versions 1.0,
        2.0, 2.1) for this pipeline's DiT, replacing any loaded one; ``config`` (a dict, config.json
        or folder) overrides what is inferred from the tensors. The branch gets the DiT's dtype,
        device and accelerations. Returns the branch (``pipe.controlnet``)."""
        state = self._accel
        accel = {"kernels": state["kernels"], "attention": state["attention"], "fp8": state["fp8"],
                 "compile": state["compile"]}
        model = self.controlnets.load(path, config, transformer_config=self.transformer_config, dtype=self.dtype,
                                      device=self.transformer.x_pad_token.device, accel=accel)
        if self._graphed is not None:
            self._graphed.clear()
        return model

    def unload_controlnet(self) -> bool:
        """Drop the loaded ControlNet; returns whether one was loaded."""
        if self._graphed is not None:
            self._graphed.clear()
        return self.controlnets.unload()

    @property
    def template_registry(self):
        """The shipped templates plus ``templates_dirs`` (cached per set of folders)."""
        from .prompt.templates import default_registry

        return default_registry(self.templates_dirs)

    @property
    def defaults(self) -> VariantDefaults:
        return VARIANTS[self.variant]

    @property
    def transformer_config(self) -> TransformerConfig:
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        """Where the DiT runs (its execution device, also with offloading)."""
        return self.placement["transformer"]

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_pad_token.dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        variant: str | None = None,
        text_encoder_device: str | torch.device | None = None,
        dit_device: str | torch.device | None = None,
        vae_device: str | torch.device | None = None,
        offload: str = "none",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        transformer: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        kernels: str = "none",
        attention: str | None = None,
        compile: str = "off",
        cuda_graphs: bool = False,
        fp8: bool = False,
        text_encoder_url: str | None = None,
        text_encoder_token: str | None = None,
        text_encoder_quant: str = "none",
    ) -> "ZImagePipeline":
        """Load a diffusers-layout folder or a Hub id (only the needed files are downloaded).

        ``dtype`` applies to all three components (default: bf16 on GPU, fp32 on CPU); weights are
        cast tensor by tensor while loading. ``*_device`` place one component elsewhere than
        ``device``. ``offload``: "text_encoder" keeps the text encoder on the CPU except while it
        encodes; "model" keeps every component on the CPU except while it runs; "blocks" offloads
        the text encoder as "text_encoder" does and streams the DiT's blocks from (pinned) CPU
        memory one block ahead of their use (:mod:`zimage_native.offload`).
        ``text_encoder_quant`` "none" | "int8" | "int4": weight-only quantisation of the Qwen3
        text encoder (:mod:`zimage_native.quantize`). ``transformer``,
        ``vae``, ``text_encoder`` (files in any supported format, see docs/formats.md) and
        ``tokenizer`` (a folder or Hub id) replace that component of the model folder.

        Accelerations (see :meth:`optimize` and docs/performance.md): ``kernels`` "none" | "triton",
        ``attention`` a backend name or "auto" (default: $ZIMAGE_ATTENTION, else "sdpa"),
        ``compile`` "off" | "blocks" | "full", ``cuda_graphs``, ``fp8``.

        ``text_encoder_url``: encode prompts on a remote ``zimage serve`` (its ``/api/encode``)
        instead of loading Qwen3 here (the distributed mode; docs/server.md).
        """
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        check_quant(text_encoder_quant, text_encoder_url)
        folder = resolve_model_folder(path_or_id, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only)
        main = resolve_device(device)
        dtype = resolve_dtype(dtype, main)
        placement = {
            "text_encoder": resolve_device(text_encoder_device) if text_encoder_device else main,
            "transformer": resolve_device(dit_device) if dit_device else main,
            "vae": resolve_device(vae_device) if vae_device else main,
        }
        storage = {name: load_device(name, dev, offload) for name, dev in placement.items()}
        scfg = SchedulerConfig.from_json(folder / "scheduler" / "scheduler_config.json")
        logger.info("loading %s in %s, placement %s, offload %s", folder, dtype, placement, offload)
        if transformer is not None:
            dit = load_component("transformer", transformer, dtype, storage["transformer"],
                                 folder / "transformer" / "config.json")
        else:
            tcfg = TransformerConfig.from_json(folder / "transformer" / "config.json")
            dit = load_module(lambda: ZImageTransformer(tcfg), folder / "transformer", dtype,
                              storage["transformer"], "transformer")
        if vae is not None:
            ae = load_component("vae", vae, dtype, storage["vae"], folder / "vae" / "config.json")
            vcfg = ae.config
        else:
            vcfg = VAEConfig.from_json(folder / "vae" / "config.json")
            ae = load_module(lambda: AutoencoderKL(vcfg), folder / "vae", dtype, storage["vae"], "vae")
        if text_encoder_url is not None:
            from .server.remote import RemoteTextEncoder

            te = RemoteTextEncoder(text_encoder_url, text_encoder_token, dtype=dtype)
            hidden = te.hidden_size
        else:
            tok = load_tokenizer(tokenizer if tokenizer is not None else folder / "tokenizer")
            if text_encoder is not None:
                te = TextEncoder(load_component("text_encoder", text_encoder, dtype, storage["text_encoder"],
                                                folder / "text_encoder" / "config.json", quant=text_encoder_quant), tok)
            else:
                te = TextEncoder(load_qwen3_encoder(folder / "text_encoder", dtype, storage["text_encoder"],
                                                    text_encoder_quant), tok)
            hidden = te.model.config.hidden_size
        if hidden != dit.config.cap_feat_dim:
            raise ValueError(
                f"text encoder hidden size {hidden} does not match the transformer's cap_feat_dim {dit.config.cap_feat_dim}"
            )
        pipe = cls(dit, ae, te, scfg, vcfg, source=str(path_or_id), variant=variant,
                   model_folder=folder, placement=placement, offload=offload)
        if variant is None:
            logger.info("variant %s (defaults: %s)", pipe.variant, pipe.defaults)
        from .accel import attention_from_env

        pipe.optimize(kernels=kernels, attention=attention or attention_from_env(), compile=compile,
                      cuda_graphs=cuda_graphs, fp8=fp8)
        return pipe

    @classmethod
    def from_single_files(cls, transformer=None, vae=None, text_encoder=None, tokenizer=None, device=None, dtype=None,
                          **kwargs) -> "ZImagePipeline":
        """Build from single files (ComfyUI split, all-in-one, fp8) or component folders; see
        :func:`zimage_native.loading.load_single_files` for the arguments. Other keyword arguments
        (``variant=``, ...) go to the constructor."""
        names = ("transformer_config", "vae_config", "text_encoder_config", "scheduler_config", "text_encoder_quant")
        loaded = load_single_files(transformer, vae, text_encoder, tokenizer, device, dtype,
                                   **{k: kwargs.pop(k) for k in names if k in kwargs})
        return cls(**loaded, **kwargs)

    # ------------------------------------------------------------------ placement
    def _module(self, name: str) -> torch.nn.Module:
        if name == "transformer" and self.controlnet is not None:
            return torch.nn.ModuleList([self.transformer, self.controlnet])  # the branch runs with the DiT
        return self.text_encoder.model if name == "text_encoder" else getattr(self, name)

    @contextlib.contextmanager
    def _running(self, name: str):
        """Put a component on its execution device while it runs; offloaded ones go back to the CPU."""
        device = self.placement[name]
        storage = storage_device(name, device, self.offload)
        if self._module(name) is None:  # a remote text encoder: nothing to move
            storage = device
        if storage != device:
            self._module(name).to(device)
        try:
            yield device
        finally:
            if storage != device:
                self._module(name).to(storage)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ acceleration
    def optimize(
        self,
        kernels: str | None = None,
        attention: str | None = None,
        compile: str | None = None,
        cuda_graphs: bool | None = None,
        fp8: bool | None = None,
        compile_backend: str | object = "inductor",
    ) -> list[str]:
        """Apply accelerations to the DiT in place, in the one order of ``accel.optimize`` (kernel
        swaps, fp8, attention backend, torch.compile), then CUDA graphs of the sampling loop.

        Calls are cumulative: ``None`` keeps the current setting, and a transform already applied is
        not applied again. Turning one off again needs a reload. Returns the log lines.
        """
        from .accel import optimize as optimize_dit
        from .accel.cuda_graphs import GraphedSampler

        state = self._accel
        wanted = {"kernels": kernels, "attention": attention, "compile": compile, "fp8": fp8,
                  "cuda_graphs": cuda_graphs}
        changes = {k: v for k, v in wanted.items() if v is not None and v != state[k]}
        for key in ("kernels", "compile", "fp8", "cuda_graphs"):
            if key in changes and state[key] not in ("none", "off", False):
                raise ValueError(f"{key} is already {state[key]!r}; reload the pipeline to change it")
        if changes.get("cuda_graphs"):
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs needs the DiT on a CUDA device; it is on {self.device}")
            if self.offload != "none":
                raise ValueError("cuda_graphs needs the DiT to stay on the GPU: use offload='none'")
        if self.offload == "blocks":
            refused = [f"{k}={changes[k]!r}" for k in ("kernels", "compile", "fp8") if changes.get(k) not in
                       (None, "none", "off", False)]
            if refused:
                raise ValueError(f"offload='blocks' streams the DiT's blocks as they are loaded; {', '.join(refused)} "
                                 f"would change or compile them: use offload='none' (or 'text_encoder') with it")
        lines = optimize_dit(
            self.transformer,
            kernels=changes.get("kernels", "none"),
            attention=changes.get("attention", state["attention"]),
            fp8=bool(changes.get("fp8", False)),
            compile=changes.get("compile", "off"),
            compile_backend=compile_backend,
        ) if any(k in changes for k in ("kernels", "attention", "fp8", "compile")) else []
        if self.controlnet is not None and any(k in changes for k in ("kernels", "attention", "fp8", "compile")):
            optimize_dit(self.controlnet, kernels=changes.get("kernels", "none"),
                         attention=changes.get("attention", state["attention"]), fp8=bool(changes.get("fp8", False)),
                         compile=changes.get("compile", "off"), compile_backend=compile_backend)
        if changes.get("compile", "off") != "off" or changes.get("cuda_graphs"):
            self.caption_buckets = CAPTION_BUCKETS  # static shapes: a new prompt does not recompile
        if changes.get("cuda_graphs"):
            self._graphed = GraphedSampler(self)
            lines.append("cuda graphs: the whole sampling loop, captured once per shape")
        elif self._graphed is not None and ("fp8" in changes or "kernels" in changes):
            self._graphed.clear()  # captured graphs hold the old modules
        state.update(changes)
        return lines

    def load_lora(self, *args, **kwargs):
        """Fuse LoRA weights into the DiT (see :meth:`LoraMixin.load_lora`); captured graphs are dropped."""
        report = super().load_lora(*args, **kwargs)
        if self._graphed is not None:
            self._graphed.clear()
        return report

    def rewrite(self, prompt: str, *args, **kwargs) -> str:
        """Expand a prompt with the Qwen3 weights (see :class:`RewriterMixin`); with a remote text
        encoder, the remote server rewrites."""
        if getattr(self.text_encoder, "model", None) is None:
            return self.text_encoder.rewrite(prompt, *args, **kwargs)
        return super().rewrite(prompt, *args, **kwargs)

    def unload_lora(self, *args, **kwargs):
        restored = super().unload_lora(*args, **kwargs)
        if self._graphed is not None:
            self._graphed.clear()
        return restored

    def enable_vae_tiling(self, tile_size: int = 512, overlap: int = 64) -> None:
        """Decode (and encode) through the VAE in overlapping tiles; for 2K+ images."""
        self.vae_tiling = TileConfig(tile_size, overlap)

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    # ------------------------------------------------------------------ stages
    def format_prompts(self, prompts: list[str], template=None, **fields) -> list[str]:
        """The chat text for each prompt: template fields, overridden by explicit non-None fields."""
        template = self._template(template)
        if template is not None:
            merged = template.prompt_fields(**fields)
        else:
            merged = {k: v for k, v in fields.items() if v is not None}
        return [format_prompt(p, **merged) for p in prompts]

    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], max_sequence_length: int = 512, template=None, **fields
    ) -> list[torch.Tensor]:
        """Chat-format and encode prompts: a list of (L_i, cap_feat_dim) features on the DiT device."""
        texts = self.format_prompts(prompts, template, **fields)
        with self._running("text_encoder"):
            features = self.text_encoder.encode(texts, max_sequence_length)
        return [f.to(self.device) for f in features]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [0, 1]."""
        with self._running("vae") as device:
            dtype = next(self.vae.parameters()).dtype
            z = latents.to(device, dtype)
            z = z / self.vae_config.scaling_factor + (self.vae_config.shift_factor or 0.0)  # in the VAE dtype
            if self.vae_tiling is not None:
                image = tiled_decode(self.vae, z, self.vae_tiling, self.vae_config.scale_factor).to(dtype)
            else:
                image = self.vae.decode(z)
            return (image * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents, a posterior *sample* (one draw per generator)."""
        with self._running("vae") as device:
            vae_dtype = next(self.vae.parameters()).dtype
            x = image.to(device, dtype).to(vae_dtype)
            if self.vae_tiling is not None:
                mean, logvar = (t.to(vae_dtype) for t in tiled_encode(self.vae, x, self.vae_tiling,
                                                                    self.vae_config.scale_factor))
            else:
                mean, logvar = self.vae.encode(x)
            eps = _randn(mean.shape, generators, vae_dtype).to(device)
            z = mean + torch.exp(0.5 * logvar) * eps
            shift = self.vae_config.shift_factor or 0.0
            return ((z - shift) * self.vae_config.scaling_factor).to(self.device)

    @torch.no_grad()
    def encode_mode(self, image: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents, the posterior *mode* (no random draw)."""
        with self._running("vae") as device:
            vae_dtype = next(self.vae.parameters()).dtype
            x = image.to(device, vae_dtype)
            if self.vae_tiling is not None:
                mean, _ = tiled_encode(self.vae, x, self.vae_tiling, self.vae_config.scale_factor)
                mean = mean.to(vae_dtype)
            else:
                mean, _ = self.vae.encode(x)
            shift = self.vae_config.shift_factor or 0.0
            return ((mean - shift) * self.vae_config.scaling_factor).to(self.device)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds: list[torch.Tensor],
        negative_embeds: list[torch.Tensor] | None,
        schedule: Schedule,
        guidance_scale: float = 0.0,
        cfg_normalization: float | bool = False,
        cfg_truncation: float | None = 1.0,
        progress: bool = True,
        start: int = 0,
        callback: Callable[[int, int], None] | None = None,
        control: tuple[torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """Run the sampling loop from ``latents`` at step ``start``; returns the final fp32 latents.

        ``callback(step, total)`` runs after each step (raise in it to stop the run).
        ``control``: (control context (B, Cc, h, w), conditioning scale) for the loaded ControlNet.
        """
        with self._running("transformer"):
            plan = self.plan(latents.shape[-2:], prompt_embeds, negative_embeds, schedule, guidance_scale,
                             cfg_normalization, cfg_truncation, start, control)
            run = self._graphed if self._graphed is not None else self.run_steps
            return run(latents.to(self.device, torch.float32), plan, progress, callback)

    @torch.no_grad()
    def plan(self, size, prompt_embeds, negative_embeds, schedule: Schedule, guidance_scale=0.0,
             cfg_normalization=False, cfg_truncation=1.0, start=0, control=None) -> "SamplingPlan":
        """Everything the step loop reads, computed once per request: layouts, refined caption tokens
        (the context refiner does not depend on t) and every modulation vector of the schedule.
        The DiT must be on its execution device (see ``_running``)."""
        cfg, device, dtype = self.transformer_config, self.device, self.dtype
        use_cfg = guidance_scale > 0 and negative_embeds is not None

        def prepare(embeds):
            longest = max(ceil_to(e.shape[0]) for e in embeds)
            bucket = next((b for b in self.caption_buckets or () if b >= longest), None)
            layout = build_layout(cfg, [e.shape[0] for e in embeds], size[0], size[1], device, bucket)
            cap = pad_captions(embeds, layout.caption_pad.shape[1])
            return layout, self.transformer.encode_caption(cap, layout)

        plain = prepare(prompt_embeds)
        guided = prepare(prompt_embeds + negative_embeds) if use_cfg else None
        times = schedule.model_times()
        c = self.transformer.time_embedding(times.to(device), dtype)  # (N, 256): one row per step
        mods = self.transformer.modulations(c)
        truncate = cfg_truncation is not None and float(cfg_truncation) <= 1  # late steps run without CFG
        steps = []
        for i in range(start, schedule.num_steps):
            on = use_cfg and not (truncate and times[i].item() > cfg_truncation)
            steps.append(Step(i, on, [m[i:i + 1] for m in mods]))
        control_plan = None
        if control is not None:
            context, scale = control
            control_plan = ControlInput(self.controlnets.require(), context, scale).plan(
                self, plain[0], guided[0] if guided is not None else None, c)
        return SamplingPlan(steps, plain, guided, schedule.sigmas.to(device), float(guidance_scale),
                            float(cfg_normalization) if cfg_normalization else 0.0, control_plan)

    def run_steps(self, latents: torch.Tensor, plan: "SamplingPlan", progress: bool = False,
                  callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The sampling loop over fp32 ``latents``: only tensor work, no host syncs."""
        cfg, dtype = self.transformer_config, self.dtype
        for k, step in enumerate(tqdm(plan.steps, disable=not progress, desc="denoise")):
            layout, tokens = plan.guided if step.guided else plan.plain
            x = latents.to(dtype)
            if step.guided:
                x = x.repeat(2, 1, 1, 1)
            x = patchify(x, cfg.patch_size)
            extra = plan.extra(x, step, layout, tokens) if plan.extra is not None else {}
            out = self.transformer.forward_tokens(x, tokens, None, layout, step.mods, **extra)
            pred = unpatchify(out, layout.grid, cfg.in_channels, cfg.patch_size).float()
            if step.guided:
                pos, neg = pred.chunk(2)
                pred = pos + plan.guidance_scale * (pos - neg)
                if plan.norm_limit > 0:
                    limit = torch.linalg.vector_norm(pos, dim=(1, 2, 3), keepdim=True) * plan.norm_limit
                    norm = torch.linalg.vector_norm(pred, dim=(1, 2, 3), keepdim=True)
                    pred = torch.where(norm > limit, pred * (limit / norm), pred)
            # The model predicts the negative velocity.
            latents = euler_step(latents, -pred, plan.sigmas[step.index], plan.sigmas[step.index + 1])
            if callback is not None:
                callback(k + 1, len(plan.steps))
        return latents

    # ------------------------------------------------------------------ requests
    def _template(self, template):
        if template is None or not isinstance(template, str):
            return template
        return self.template_registry.get(template)

    def _resolve(self, template, width, height, steps, guidance_scale, negative_prompt):
        """Fill unset settings: the template's suggestions first, then the variant defaults."""
        suggested = dict(getattr(self._template(template), "settings", None) or {})
        width = width if width is not None else suggested.get("width", 1024)
        height = height if height is not None else suggested.get("height", 1024)
        steps = steps if steps is not None else suggested.get("steps", self.defaults.num_inference_steps)
        if guidance_scale is None:
            guidance_scale = suggested.get("guidance_scale", self.defaults.guidance_scale)
        if negative_prompt is None:
            negative_prompt = suggested.get("negative_prompt")
        return width, height, steps, guidance_scale, negative_prompt

    def _request(self, prompt, width, height, steps, seed, generator, guidance_scale, negative_prompt, n,
                 output_type, max_len, template, progress, **fields) -> "Request":
        """Resolve unset settings (template, then variant), validate everything, before any work."""
        width, height, steps, guidance_scale, negative_prompt = self._resolve(
            template, width, height, steps, guidance_scale, negative_prompt)
        prompts = check_request(prompt, width, height, steps, seed, generator, guidance_scale, n, output_type,
                                max_len)
        return Request(prompts, width, height, steps, guidance_scale, negative_prompt, fields,
                       self.progress if progress is None else progress, len(prompts) * n)

    def _schedule(self, r: "Request", sigmas) -> Schedule:
        return make_schedule(self.scheduler_config, None if sigmas is not None else r.steps, sigmas,
                             image_seq_len=(r.height // 16) * (r.width // 16))

    def _prepare_embeds(self, r: "Request", n, max_len, template, info):
        embeds = self.encode_prompt(r.prompts, max_len, template, **r.fields)
        info["formatted_prompts"] = self.format_prompts(r.prompts, template, **r.fields)
        negative = None
        if r.guidance_scale > 0:
            negative = self.encode_prompt(_negatives(r.negative_prompt, len(r.prompts)), max_len)
        if n > 1:  # [p0, p0, p1, p1, ...], as the reference repeats them
            embeds = [e for e in embeds for _ in range(n)]
            if negative is not None:
                negative = [e for e in negative for _ in range(n)]
        info["token_counts"] = [int(e.shape[0]) for e in embeds]
        return embeds, negative

    @staticmethod
    def _generators(seed, generator, batch: int) -> tuple[list[torch.Generator], list[int] | None]:
        """One generator (shared, as diffusers) or one per image for a list of seeds."""
        if generator is not None:
            return ([generator] if isinstance(generator, torch.Generator) else list(generator)), None
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [random.randrange(2**63) if seed is None else seed]
        if len(seeds) not in (1, batch):
            raise ValueError(f"got {len(seeds)} seeds for {batch} images: give one seed or one per image")
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds], seeds

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        sigmas: list[float] | None = None,
        cfg_normalization: float | bool = False,
        cfg_truncation: float | None = 1.0,
        max_sequence_length: int = 512,
        template: str | Any | None = None,
        system_prompt: str | None = None,
        thinking_content: str | None = None,
        assistant_content: str | None = None,
        force_think_block: bool | None = None,
        strip_quotes: bool | None = None,
        progress: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
        control_image=None,
        controlnet_conditioning_scale: float = 0.75,
    ) -> ZImageOutput:
        """Generate images. Unset ``width``/``height``/``num_inference_steps``/``guidance_scale`` come
        from the template's suggested settings, then from the variant (Turbo: 8 steps, guidance 0;
        base: 50 steps, guidance 4). ``seed`` may be a list with one seed per image.

        ``control_image`` (with a ControlNet loaded, :meth:`load_controlnet`): a pose / depth / edge
        image that steers the layout, weighted by ``controlnet_conditioning_scale``; unset
        ``width``/``height`` then come from its size (rounded down to multiples of 16)."""
        if control_image is not None:
            self.controlnets.require()
            check_scale(controlnet_conditioning_scale)
            if width is None and height is None:
                height, width = preprocess_image(control_image).shape[-2:]
        r = self._request(prompt, width, height, num_inference_steps, seed, generator, guidance_scale,
                          negative_prompt, num_images_per_prompt, output_type, max_sequence_length, template, progress,
                          system_prompt=system_prompt, thinking_content=thinking_content,
                          assistant_content=assistant_content, force_think_block=force_think_block,
                          strip_quotes=strip_quotes)
        shape = (r.batch, self.transformer_config.in_channels, 2 * (r.height // 16), 2 * (r.width // 16))

        seeds = None
        if latents is None:
            generators, seeds = self._generators(seed, generator, r.batch)
            latents = _randn(shape, generators, torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")

        info = _request_info(self, r, seeds, template)
        embeds, negative = self._prepare_embeds(r, num_images_per_prompt, max_sequence_length, template, info)
        control = None
        if control_image is not None:
            pixels = repeat_to(preprocess_image(control_image, r.width, r.height), r.batch, num_images_per_prompt,
                               "control image")
            context = control_context(self.encode_mode, pixels, self.transformer_config.in_channels,
                                      self.controlnet.config.control_in_dim)
            control = (context, controlnet_conditioning_scale)
            info["controlnet"] = self.controlnets.path
            info["control_scale"] = controlnet_conditioning_scale
        schedule = self._schedule(r, sigmas)
        latents = self.denoise(latents, embeds, negative, schedule, r.guidance_scale, cfg_normalization,
                               cfg_truncation, r.progress, callback=callback, control=control)
        return self._output(latents, output_type, seeds, info)

    @torch.no_grad()
    def img2img(
        self,
        prompt: str | list[str],
        image,
        strength: float = 0.6,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        sigmas: list[float] | None = None,
        cfg_normalization: float | bool = False,
        cfg_truncation: float | None = 1.0,
        max_sequence_length: int = 512,
        template: str | Any | None = None,
        system_prompt: str | None = None,
        thinking_content: str | None = None,
        assistant_content: str | None = None,
        force_think_block: bool | None = None,
        strip_quotes: bool | None = None,
        progress: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> ZImageOutput:
        """Image-to-image: start from ``image`` (a PIL image or a list of them) noised to ``strength``.

        The image is resized down to multiples of 16 (or to ``width`` x ``height`` when given);
        ``strength`` 1 starts from pure noise, 0.6 runs the last 60% of the schedule.
        """
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        pixels = preprocess_image(image, width, height)
        r = self._request(prompt, pixels.shape[-1], pixels.shape[-2], num_inference_steps, seed, generator,
                          guidance_scale, negative_prompt, num_images_per_prompt, output_type, max_sequence_length,
                          template, progress, system_prompt=system_prompt, thinking_content=thinking_content,
                          assistant_content=assistant_content, force_think_block=force_think_block,
                          strip_quotes=strip_quotes)
        if r.batch % pixels.shape[0]:
            raise ValueError(f"cannot spread {pixels.shape[0]} input images over {r.batch} outputs")
        schedule = self._schedule(r, sigmas)
        n = schedule.num_steps
        start = int(max(n - min(n * strength, n), 0))
        if n - start < 1:
            raise ValueError(f"strength {strength} with {n} steps leaves no step to run; raise strength or steps")

        generators, seeds = self._generators(seed, generator, r.batch)
        info = _request_info(self, r, seeds, template, strength=strength)
        embeds, negative = self._prepare_embeds(r, num_images_per_prompt, max_sequence_length, template, info)
        dtype = embeds[0].dtype  # the reference forms the start latents in the text encoder's dtype
        # Order matters for seeds: the VAE posterior sample is drawn before the noise.
        z = self.encode_image(pixels, generators if len(generators) == 1 else generators[: pixels.shape[0]], dtype)
        z = z.to(dtype).repeat(r.batch // z.shape[0], 1, 1, 1)
        noise = _randn(z.shape, generators, dtype).to(self.device)
        sigma = schedule.sigmas.to(self.device, dtype)[start]
        latents = sigma * noise + (1.0 - sigma) * z
        latents = self.denoise(latents, embeds, negative, schedule, r.guidance_scale, cfg_normalization,
                               cfg_truncation, r.progress, start=start, callback=callback)
        return self._output(latents, output_type, seeds, info)

    def _output(self, latents, output_type, seeds, info) -> ZImageOutput:
        if output_type == "latent":
            return ZImageOutput(images=latents, seeds=seeds, info=info)
        images = self.decode(latents).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return ZImageOutput(images=images, seeds=seeds, info=info)
        return ZImageOutput(images=to_pil(images), seeds=seeds, info=info)


def check_quant(text_encoder_quant: str, text_encoder_url: str | None = None) -> str:
    """Refuse an unknown text encoder quantisation, or one asked for a remote text encoder."""
    from .quantize import QUANT_MODES

    if text_encoder_quant not in QUANT_MODES:
        raise ValueError(f"text_encoder_quant must be one of {QUANT_MODES}, got {text_encoder_quant!r}")
    if text_encoder_url is not None and text_encoder_quant != "none":
        raise ValueError("text_encoder_quant applies to a local text encoder; with text_encoder_url the remote "
                         "server's setting applies (start it with --text-encoder-quant)")
    return text_encoder_quant


def _randn(shape, generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """Noise as diffusers draws it: one draw of the whole shape from a single generator, or one
    draw per item from a list of generators; on the generator's device."""
    if len(generators) == 1:
        g = generators[0]
        return torch.randn(shape, generator=g, device=g.device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).cpu()
                      for g in generators])


def _negatives(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts")
    return negatives


def _request_info(pipe, r: Request, seeds, template, **extra):
    from . import __version__

    name = getattr(template, "name", template)
    return {"prompts": list(r.prompts), "negative_prompt": r.negative_prompt, "width": r.width, "height": r.height,
            "steps": r.steps, "guidance_scale": r.guidance_scale, "seeds": seeds, "template": name,
            **{k: v for k, v in r.fields.items() if v is not None},
            "model": pipe.source, "variant": pipe.variant, "version": __version__,
            "loras": [[lr.path, lr.scale] for lr in pipe.loras] or None, **extra}


def preprocess_image(image, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """PIL image(s) -> (B, 3, H, W) fp32 in [-1, 1], resized down to multiples of 16 with Lanczos
    (as the reference's image processor does), or to ``width`` x ``height`` when given."""
    from PIL import Image

    images = image if isinstance(image, (list, tuple)) else [image]
    if not images or not all(isinstance(i, Image.Image) for i in images):
        raise ValueError("image must be a PIL image or a non-empty list of PIL images")
    w = width if width is not None else images[0].width // 16 * 16
    h = height if height is not None else images[0].height // 16 * 16
    if w < 16 or h < 16 or w % 16 or h % 16:
        raise ValueError(f"the input image must be at least 16x16 and the size a multiple of 16, got {w}x{h}")
    arrays = [np.asarray(i.convert("RGB").resize((w, h), resample=Image.LANCZOS), dtype=np.float32) / 255.0
              for i in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2.0 - 1.0


def check_request(prompt, width=1024, height=1024, steps=8, seed=None, generator=None, guidance_scale=0.0, n=1,
                  output_type="pil", max_len=512) -> list[str]:
    """Validate a generation request before any work is done; returns the prompts as a list."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts:
        raise ValueError("prompt must be a non-empty string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("every prompt must be a string")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {value!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (0 turns CFG off), got {guidance_scale}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if max_len < 1:
        raise ValueError(f"max_sequence_length must be >= 1, got {max_len}")
    return prompts


def to_pil(images: np.ndarray):
    """(N, H, W, 3) floats in [0, 1] -> PIL images, rounding as the reference does."""
    from PIL import Image

    return [Image.fromarray((img * 255).round().astype("uint8")) for img in images]
