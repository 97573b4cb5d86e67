"""Build a tiny random Z-Image model folder in the diffusers layout, in code (no downloads).

The folder has the same structure as Tongyi-MAI/Z-Image-Turbo: model_index.json, scheduler/,
transformer/, vae/, text_encoder/ (a tiny Qwen3), tokenizer/ (a small byte-level BPE with the
Qwen special tokens and a ChatML chat template). diffusers writes the component files itself, so
the folder is also what diffusers' own ZImagePipeline.from_pretrained reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zimage_native.testing import build_tokenizer, randomize_
from .dit_configs import TINY_DIT

TINY_QWEN3 = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=2048, tie_word_embeddings=True)

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=16, act_fn="silu", scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


def build_model_folder(folder: Path, dit_kwargs: dict | None = None, shift: float = 3.0, seed: int = 0,
                       vae_kwargs: dict | None = None) -> Path:
    """Write a tiny random model in the diffusers layout to ``folder`` and return it (``vae_kwargs``
    override TINY_VAE's)."""
    import diffusers
    from transformers import Qwen3Config, Qwen3Model

    dit_kwargs = dict(TINY_DIT if dit_kwargs is None else dit_kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder / "tokenizer")

    torch.manual_seed(seed)
    text_config = Qwen3Config(vocab_size=len(tokenizer), **dict(TINY_QWEN3, hidden_size=dit_kwargs["cap_feat_dim"]))
    text_encoder = randomize_(Qwen3Model(text_config), seed + 1)
    text_encoder.save_pretrained(folder / "text_encoder")

    transformer = randomize_(diffusers.ZImageTransformer2DModel(**dit_kwargs), seed + 2)
    transformer.save_pretrained(folder / "transformer")

    vae = randomize_(diffusers.AutoencoderKL(**{**TINY_VAE, **(vae_kwargs or {})}), seed + 3, std=0.02)
    vae.save_pretrained(folder / "vae")

    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift,
                                              use_dynamic_shifting=False).save_config(folder / "scheduler")
    index = {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def our_pipeline(folder: Path, **kwargs):
    """The engine's ZImagePipeline on ``folder``, fp32 on the CPU, without progress bars."""
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, **kwargs)
    pipe.progress = False
    return pipe


def reference_pipeline(folder: Path):
    """diffusers' own ZImagePipeline on the same folder, fp32, CPU."""
    import diffusers

    pipe = diffusers.ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
