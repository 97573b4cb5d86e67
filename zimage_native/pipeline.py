"""ZImagePipeline: prompt -> caption features -> FlowMatch Euler sampling with the DiT -> VAE decode.

Semantics are those of diffusers 0.42.1 ``ZImagePipeline`` (the parity reference):
- prompts are wrapped in the Qwen3 chat format and encoded to hidden_states[-2];
- the initial noise is fp32, drawn on the generator's device (the CPU for ``seed=``), shape
  (B, 16, H/8, W/8); latents stay fp32 and are cast to the DiT dtype only as model input;
- the DiT output is the negative velocity; CFG (guidance_scale > 0) is pos + g * (pos - neg) in fp32;
- decode: z / scaling_factor + shift_factor in the VAE dtype, then (x * 0.5 + 0.5).clamp(0, 1).

Per-request work (tokenising, padding, positions, RoPE tables, masks, the sigma schedule) happens
once before the step loop; the loop itself has no host syncs.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SchedulerConfig, TransformerConfig, VAEConfig
from .hub import DEFAULT_MODEL, resolve_model_folder
from .loading import load_module
from .model.sequence import build_layout, pad_captions, patchify, unpatchify
from .model.transformer import ZImageTransformer
from .model.vae import AutoencoderKL
from .prompt.format import format_prompt
from .scheduler import euler_step, make_schedule
from .text_encoder import TextEncoder

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class ZImageOutput:
    """``images``: PIL images, an (N, H, W, 3) array in [0, 1], or the final fp32 latents."""

    images: Any
    seeds: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto': bf16 on accelerators, fp32 on the CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    if DTYPES[dtype] is torch.float16:
        logger.warning("float16 can overflow in the Z-Image DiT; bfloat16 or float32 is recommended")
    return DTYPES[dtype]


class ZImagePipeline:
    """Text-to-image with Z-Image. Build with :meth:`from_pretrained`, call like a function."""

    def __init__(
        self,
        transformer: ZImageTransformer,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        scheduler_config: SchedulerConfig,
        vae_config: VAEConfig,
        source: str | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = scheduler_config
        self.vae_config = vae_config
        self.source = source
        self.progress = True

    @property
    def transformer_config(self) -> TransformerConfig:
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        return self.transformer.x_pad_token.device

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
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> "ZImagePipeline":
        """Load a diffusers-layout folder or a Hub id (only the needed files are downloaded).

        ``dtype`` applies to all three components (default: bf16 on GPU, fp32 on CPU); weights
        are cast tensor by tensor while loading.
        """
        folder = resolve_model_folder(path_or_id, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        tcfg = TransformerConfig.from_json(folder / "transformer" / "config.json")
        vcfg = VAEConfig.from_json(folder / "vae" / "config.json")
        scfg = SchedulerConfig.from_json(folder / "scheduler" / "scheduler_config.json")
        logger.info("loading %s on %s in %s", folder, device, dtype)
        transformer = load_module(lambda: ZImageTransformer(tcfg), folder / "transformer", dtype, device, "transformer")
        vae = load_module(lambda: AutoencoderKL(vcfg), folder / "vae", dtype, device, "vae")
        text_encoder = TextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", dtype, device)
        if text_encoder.model.config.hidden_size != tcfg.cap_feat_dim:
            raise ValueError(
                f"text encoder hidden size {text_encoder.model.config.hidden_size} does not match the "
                f"transformer's cap_feat_dim {tcfg.cap_feat_dim}"
            )
        return cls(transformer, vae, text_encoder, scfg, vcfg, source=str(path_or_id))

    # ------------------------------------------------------------------ stages
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512, **format_kwargs) -> list[torch.Tensor]:
        """Chat-format and encode prompts: a list of (L_i, cap_feat_dim) features on the DiT device."""
        texts = [format_prompt(p, **format_kwargs) for p in prompts]
        features = self.text_encoder.encode(texts, max_sequence_length)
        return [f.to(self.device) for f in features]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [0, 1], in the VAE dtype."""
        vae_param = next(self.vae.parameters())
        z = latents.to(vae_param.device, vae_param.dtype)
        z = z / self.vae_config.scaling_factor + (self.vae_config.shift_factor or 0.0)  # in the VAE dtype
        return (self.vae.decode(z) * 0.5 + 0.5).clamp(0, 1)

    def denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds: list[torch.Tensor],
        negative_embeds: list[torch.Tensor] | None,
        schedule,
        guidance_scale: float = 0.0,
        cfg_normalization: float | bool = False,
        cfg_truncation: float = 1.0,
        progress: bool = True,
    ) -> torch.Tensor:
        """Run the sampling loop from fp32 noise ``latents``; returns the final fp32 latents."""
        cfg = self.transformer_config
        device, dtype = self.device, self.dtype
        h, w = latents.shape[-2:]
        use_cfg = guidance_scale > 0 and negative_embeds is not None

        def prepare(embeds):
            layout = build_layout(cfg, [e.shape[0] for e in embeds], h, w, device)
            return layout, pad_captions(embeds, layout.caption_pad.shape[1])

        plain = prepare(prompt_embeds)
        guided = prepare(prompt_embeds + negative_embeds) if use_cfg else None
        model_times = schedule.model_times().tolist()  # host floats: the CFG truncation rule reads them
        t_all = schedule.model_times().to(device)
        sigmas = schedule.sigmas.to(device)
        norm_limit = float(cfg_normalization) if cfg_normalization else 0.0
        truncate = cfg_truncation is not None and float(cfg_truncation) <= 1  # late steps run without CFG

        latents = latents.to(device, torch.float32)
        for i in tqdm(range(schedule.num_steps), disable=not progress, desc="denoise"):
            guided_step = use_cfg and not (truncate and model_times[i] > cfg_truncation)
            layout, cap = guided if guided_step else plain
            x = latents.to(dtype)
            if guided_step:
                x = x.repeat(2, 1, 1, 1)
            t = t_all[i].expand(x.shape[0])
            out = self.transformer(patchify(x, cfg.patch_size), cap, t, layout)
            pred = unpatchify(out, layout.grid, cfg.in_channels, cfg.patch_size).float()
            if guided_step:
                pos, neg = pred.chunk(2)
                pred = pos + guidance_scale * (pos - neg)
                if norm_limit > 0:
                    limit = torch.linalg.vector_norm(pos, dim=(1, 2, 3), keepdim=True) * norm_limit
                    norm = torch.linalg.vector_norm(pred, dim=(1, 2, 3), keepdim=True)
                    pred = torch.where(norm > limit, pred * (limit / norm), pred)
            latents = euler_step(latents, -pred, sigmas[i], sigmas[i + 1])  # the model predicts -velocity
        return latents

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        width: int = 1024,
        height: int = 1024,
        num_inference_steps: int = 8,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        sigmas: list[float] | None = None,
        cfg_normalization: float | bool = False,
        cfg_truncation: float = 1.0,
        max_sequence_length: int = 512,
        progress: bool | None = None,
    ) -> ZImageOutput:
        prompts = check_request(prompt, width, height, num_inference_steps, seed, generator,
                                guidance_scale, num_images_per_prompt, output_type, max_sequence_length)
        progress = self.progress if progress is None else progress
        batch = len(prompts) * num_images_per_prompt
        shape = (batch, self.transformer_config.in_channels, 2 * (height // 16), 2 * (width // 16))

        seeds = None
        if latents is None:
            if generator is None:
                seed = random.randrange(2**63) if seed is None else seed
                seeds = [seed]
                generator = torch.Generator("cpu").manual_seed(seed)
            latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")

        embeds = self.encode_prompt(prompts, max_sequence_length)
        negative = None
        if guidance_scale > 0:
            negatives = self._negatives(negative_prompt, len(prompts))
            negative = self.encode_prompt(negatives, max_sequence_length)
        if num_images_per_prompt > 1:  # [p0, p0, p1, p1, ...], as the reference repeats them
            embeds = [e for e in embeds for _ in range(num_images_per_prompt)]
            if negative is not None:
                negative = [e for e in negative for _ in range(num_images_per_prompt)]

        schedule = make_schedule(self.scheduler_config, None if sigmas is not None else num_inference_steps, sigmas,
                                 image_seq_len=(height // 16) * (width // 16))
        latents = self.denoise(latents, embeds, negative, schedule, guidance_scale, cfg_normalization,
                               cfg_truncation, progress)
        if output_type == "latent":
            return ZImageOutput(images=latents, seeds=seeds)
        images = self.decode(latents).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return ZImageOutput(images=images, seeds=seeds)
        return ZImageOutput(images=to_pil(images), seeds=seeds)

    @staticmethod
    def _negatives(negative_prompt, n: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != n:
            raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts")
        return negatives


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
