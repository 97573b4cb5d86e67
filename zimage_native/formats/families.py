"""Other model families, named by their key names: one table for the LoRA parser and the checkpoint detection.

A LoRA or a checkpoint of FLUX, SD 1.x/2.x/SDXL, SD3, Wan, ... is refused naming the family it is
for, not as keys that match nothing. The patterns take a key with dots or with underscores
(kohya's ``lora_unet_input_blocks_4_...``), with or without a prefix (``model.diffusion_model.``).
No pattern matches a key of a Z-Image DiT or text encoder; the one for diffusers UNets' ``up_blocks.N.resnets``
also matches the FLUX VAE's, so :mod:`.detect` looks only at keys that no Z-Image component took.
A LoRA key of the Z-Image text encoder (Qwen3, :data:`QWEN3_TEXT_ENCODER_LORA_KEY`) is no other family's either:
:func:`foreign_family` leaves it out, and :mod:`zimage_native.lora` names it as such.
"""

from __future__ import annotations

import re
from typing import Iterable

#: A kohya-style LoRA key of the Z-Image text encoder, a Qwen3 (``lora_te_model_layers_0_self_attn_q_proj``,
#: ``lora_te_model_layers_0_mlp_gate_proj``, as Z-Image LoRA trainers write beside ``lora_unet_`` keys); a CLIP
#: text encoder's read ``lora_te1_text_model_encoder_layers_0_...``.
QWEN3_TEXT_ENCODER_LORA_KEY = re.compile(r"^lora_te\d?_(model_)?layers_\d+_(self_attn|mlp)_")

#: (pattern, family), the more specific first: a file with several matches is named by the first pattern.
FOREIGN = [
    (re.compile(r"(^|[._])(double_blocks|single_blocks)[._]"), "FLUX (double_blocks / single_blocks)"),
    (re.compile(r"(^|[._])single_transformer_blocks[._]"), "FLUX in diffusers naming (single_transformer_blocks)"),
    (re.compile(r"(^|[._])joint_blocks[._]"), "Stable Diffusion 3 (joint_blocks)"),
    (re.compile(r"(^|[._])(input_blocks|output_blocks|middle_block)[._]"), "Stable Diffusion 1.x/2.x/SDXL (UNet)"),
    (re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block)[._]\d+[._](attentions|resnets)"),
     "Stable Diffusion / SDXL (diffusers UNet)"),
    (re.compile(r"^lora_te\d?_|(^|[._])text_model[._]"), "a CLIP text encoder (SD / SDXL / FLUX lora_te)"),
    (re.compile(r"(^|[._])transformer_blocks[._]"),
     "another DiT family (transformer_blocks: FLUX, SD3, Qwen-Image, ...)"),
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)[._]"), "Wan (blocks.N.self_attn / cross_attn)"),
]


def foreign_family(keys: Iterable[str]) -> tuple[str, str] | None:
    """(family, a key of it) for the first pattern of :data:`FOREIGN` that some key matches, or None.
    The Z-Image text encoder's LoRA keys (:data:`QWEN3_TEXT_ENCODER_LORA_KEY`) are not looked at."""
    keys = [key for key in keys if not QWEN3_TEXT_ENCODER_LORA_KEY.search(key)]
    for pattern, family in FOREIGN:
        for key in keys:
            if pattern.search(key):
                return family, key
    return None
