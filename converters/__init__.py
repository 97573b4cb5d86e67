"""Checkpoint and LoRA key maps and conversions, installed as ``zimage_native.converters``."""
