"""torch.compile presets for the DiT.

- ``off``: eager.
- ``blocks``: regional compilation. Each transformer block is compiled in place; all blocks run
  the same code, so dynamo reuses one graph per block kind (modulated / context refiner) and
  sequence shape instead of tracing 34 blocks: a short cold start.
- ``full``: the whole per-step forward (``forward_tokens``) as one graph (``fullgraph=True``) and
  the caption path (``encode_caption``) as another. Longest cold start, fewest launches.

The ControlNet branch (``model/controlnet.py``) is compiled the same way: ``blocks`` compiles its
blocks (they are DiT blocks), ``full`` its per-step ``hints``.

Shapes are static (``dynamic=False``): with caption buckets, a new prompt of another length at the
same resolution hits the same graphs (no recompilation).
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("off", "blocks", "full")


def compile_transformer_(transformer: nn.Module, mode: str = "blocks", backend: str | object = "inductor") -> str:
    """Compile the DiT in place; returns one log line. ``backend`` is for tests (e.g. a counter)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return "compile: off"
    from ..model.controlnet import ZImageControlNet
    from ..model.transformer import TransformerBlock

    if mode == "blocks":
        blocks = [m for m in transformer.modules() if isinstance(m, TransformerBlock)]
        for block in blocks:
            block.compile(backend=backend, dynamic=False)
        return f"compile: blocks ({len(blocks)} blocks compiled regionally)"
    if isinstance(transformer, ZImageControlNet):
        transformer.hints = torch.compile(transformer.hints, backend=backend, fullgraph=True, dynamic=False)
        return "compile: full (the ControlNet's hints, fullgraph)"
    transformer.forward_tokens = torch.compile(transformer.forward_tokens, backend=backend, fullgraph=True,
                                               dynamic=False)
    transformer.encode_caption = torch.compile(transformer.encode_caption, backend=backend, fullgraph=True,
                                               dynamic=False)
    return "compile: full (forward_tokens and encode_caption, fullgraph)"
