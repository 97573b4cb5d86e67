"""Loading GGUF components (a Z-Image DiT, a Qwen3 text encoder) with their weights kept packed.

:func:`load_gguf_component` is what :func:`zimage_native.loading.load_component` calls for a GGUF
file. The module is built on meta from the config inferred from the tensor shapes; every
``nn.Linear`` (and the token embedding) whose weight is stored in a block type (Q8_0 ... Q6_K)
becomes a :class:`~zimage_native.quant_linear.GGUFLinear` (:class:`~zimage_native.quant_linear.GGUFEmbedding`)
holding the file's bytes, moved to ``device`` as they are; F32 / F16 / BF16 tensors, and packed
tensors of other modules, are cast (dequantised) to ``dtype`` (fp32 when it is None: the
files mix F32, F16 and BF16, and one model computes in one dtype). Loading is strict, as for safetensors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .formats.gguf import GGUFCheckpoint, canonical_items, canonical_qtypes, canonical_shapes, inspect_gguf
from .formats.gguf import text_encoder_base
from .formats.infer import folder_config, infer_text_encoder_config, infer_transformer_config
from .formats.tensors import cast
from .devices import check_component_fits
from .loading import assign_state_dict, build_on_meta, check_keys, read_weights
from .quant_linear import quantized_bytes, swap_quantized_modules_

logger = logging.getLogger(__name__)


def load_gguf_component(kind: str, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", config: dict | str | os.PathLike | None = None,
                        quant: str = "none", pinned: bool = False) -> nn.Module:
    """The DiT (``kind`` 'transformer') or the truncated Qwen3 (``kind`` 'text_encoder') of a GGUF
    file, packed weights kept packed. ``config`` overrides what shapes cannot tell, as in
    ``load_component``; ``quant`` (text encoder only) quantises the linears the file stores in
    F32 / F16 / BF16 (packed ones stay as they are); ``pinned`` as in ``load_component``."""
    path = Path(path)
    device = torch.device(device)
    compute = dtype or torch.float32
    with GGUFCheckpoint(path, copies=pinned) as ckpt:
        info = inspect_gguf(ckpt).component(kind)
        qtypes = canonical_qtypes(ckpt, info)
        shapes = canonical_shapes(ckpt, info)
        swapped: set[str] = set()

        def prepare(module: nn.Module) -> None:
            swapped.update(swap_quantized_modules_(module, qtypes, compute))

        if kind == "text_encoder":
            from transformers import Qwen3Config

            from .text_encoder import load_truncated_qwen3, unused_key

            kwargs = infer_text_encoder_config(shapes, config, {**(folder_config(path) or {}),
                                                                **text_encoder_base(ckpt, info)})
            full = Qwen3Config(**{k: v for k, v in kwargs.items() if k not in ("model_type", "transformers_version")})
            n = full.num_hidden_layers
            items = canonical_items(ckpt, info, packed=swapped, dtype=compute, keep=lambda k: not unused_key(k, n))
            module = load_truncated_qwen3(full, items, compute, device, quant, prepare=prepare, keys=shapes)
        elif kind == "transformer":
            from .model.transformer import ZImageTransformer

            cfg = infer_transformer_config(shapes, config, folder_config(path))
            module = build_on_meta(lambda: ZImageTransformer(cfg))
            prepare(module)
            check_keys(module, shapes, kind)
            check_component_fits(kind, module, compute, device, pinned)
            items = ((k, cast(t, compute).to(device)) for k, t in canonical_items(ckpt, info, packed=swapped,
                                                                                  dtype=compute))
            state = read_weights(items, kind, module, compute)
            assign_state_dict(module, state, kind)
            module = module.eval().requires_grad_(False)
        else:
            raise ValueError(f"{path}: GGUF files hold a DiT or a text encoder, not a {kind}")
        packed = quantized_bytes(module)
        kept = ", ".join(f"{q} {b / 2**20:.1f} MiB" for q, b in sorted(packed.items())) or "none"
        logger.info("%s: loaded %s (GGUF, %s layout); packed weights kept packed: %s; %d tensors dequantised or cast "
                    "to %s", kind, path, info.layout, kept, len(qtypes) - len(swapped), compute)
        return module
