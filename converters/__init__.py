"""Checkpoint and LoRA key maps and conversions, installed as ``zimage_native.converters``.

- ``keymap``: the declarative layout tables (ComfyUI / original DiT, native pre-fused DiT, LDM VAE,
  prefixed text encoder) and the streaming functions that apply them in either direction;
- ``convert``: the ``zimage convert`` library (layouts, dtype casts, scaled fp8, sharding, LoRA
  baking, atomic writes).
"""
