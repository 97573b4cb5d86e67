"""Checkpoint formats: what a file is, and how its tensors map onto our modules. Split by concern:

- :mod:`.checkpoint`: safetensors containers read from their headers (``Checkpoint``, ``read_header``,
  ``sniff``: what a file is from its first bytes, never its name);
- :mod:`.detect`: which components a checkpoint holds, in which layout, with which quantisation
  (``detect_format``, ``inspect_checkpoint``), or why it cannot be loaded;
- :mod:`.infer`: configs inferred from tensor shapes, released configs as the base, overrides checked;
- :mod:`.fp8`: plain and ComfyUI "scaled" fp8 weights;
- :mod:`.tensors`: a component's tensors streamed under canonical names;
- :mod:`.describe`: the header-only description ``zimage info`` prints.

Loading modules from these lives in :mod:`zimage_native.loading` (``load_component``,
``load_single_files``); tokenizer and Hub resolution in :mod:`zimage_native.hub`. Those names are
still importable from here for code written before the split.
"""

from __future__ import annotations

import importlib

from .checkpoint import (FLOAT_DTYPES, SAFETENSORS_DTYPES, Checkpoint, CorruptCheckpointError, TensorInfo,
                         UnsupportedFormatError, check_safetensors, read_header, refuse_non_safetensors, sniff)
from .describe import describe
from .detect import COMPONENTS, ComponentInfo, FileFormat, detect_format, inspect_checkpoint, normalize_kind
from .fp8 import FP8_DTYPES, is_aux
from .infer import (RELEASED_QWEN3, folder_config, infer_config, infer_text_encoder_config, infer_transformer_config,
                    infer_vae_config, read_overrides)
from .tensors import canonical_items, canonical_shapes

# The names of the single module this package replaced, kept for existing callers.
_refuse_non_safetensors = refuse_non_safetensors
_is_aux = is_aux
_folder_config = folder_config

#: Names that moved out of the formats module, resolved lazily (loading imports this package).
_MOVED = {
    "load_component": "zimage_native.loading",
    "read_component_state_dict": "zimage_native.loading",
    "read_scheduler_config": "zimage_native.loading",
    "load_single_files": "zimage_native.loading",
    "load_tokenizer": "zimage_native.hub",
    "resolve_tokenizer_folder": "zimage_native.hub",
    "TOKENIZER_PATTERNS": "zimage_native.hub",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COMPONENTS", "FLOAT_DTYPES", "FP8_DTYPES", "RELEASED_QWEN3", "SAFETENSORS_DTYPES", "Checkpoint", "ComponentInfo",
    "CorruptCheckpointError", "check_safetensors",
    "FileFormat", "TensorInfo", "UnsupportedFormatError", "canonical_items", "canonical_shapes", "describe",
    "detect_format", "folder_config", "infer_config", "infer_text_encoder_config", "infer_transformer_config",
    "infer_vae_config", "inspect_checkpoint", "is_aux", "normalize_kind", "read_header", "read_overrides",
    "refuse_non_safetensors", "sniff", *_MOVED,
]
