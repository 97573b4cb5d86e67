"""A compiled, channels_last VAE decode (the flux-fast recipe's VAE step).

:func:`compile_vae_decode_` puts the decoder's weights in channels_last (NHWC) memory format,
so cuDNN runs its convolutions without layout transposes, and compiles the decoder with
torch.compile (Inductor fuses the GroupNorm + SiLU chains around the convolutions). The latents
are converted to channels_last at the decoder's input; the output is returned in the usual
contiguous NCHW layout. The slow twin is the eager ``AutoencoderKL.decode`` (same weights, same
values: the memory format does not change the numbers beyond convolution-algorithm rounding);
``tests/test_vae.py`` compares them.

The sequence dims here are spatial: ``dynamic=None`` lets dynamo generalise after a second
resolution instead of recompiling for every size (a server decodes many sizes).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..model.vae import DecoderOutput
from .compile import _dynamo_graphs, check_compile_supported, recompile_limit_name, set_recompile_limit

logger = logging.getLogger(__name__)

# Graphs of the decoder over a server's sizes and batches: 5 to 7 counted (docs/performance.md,
# "Request streams"), one below dynamo's default limit of 8, past which it decodes eagerly. The
# limit is raised to this when the decode is compiled (the DiT's compile raises it further).
VAE_RECOMPILE_LIMIT = 16


class CompiledDecode:
    """``vae.decode`` replaced: the VAE's post_quant_conv (when it has one), channels_last input, the
    compiled decoder, contiguous output; called as the module's ``decode`` (``return_dict=False``:
    ``(image,)``, else a ``DecoderOutput``)."""

    def __init__(self, decoder: nn.Module, compiled, channels_last: bool, post_quant_conv: nn.Module | None = None):
        self.decoder = decoder
        self.compiled = compiled
        self.channels_last = channels_last
        self.post_quant_conv = post_quant_conv

    def __call__(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        code = type(self.decoder).forward.__code__
        before = _dynamo_graphs(code)
        image = self.compiled(z).contiguous()
        after = _dynamo_graphs(code)
        if before is not None and after is not None and after > before:
            # A new size or batch may compile the decoder again (dynamo's automatic dynamic shapes: the
            # second shape makes the changed dims symbolic; a batch of 1 and a square are specialised):
            # 5 to 7 graphs for a server's sizes and batches (docs/performance.md), each a compile on the
            # request that meets it, which said nothing before.
            import torch._dynamo.config as config

            logger.info("torch.compile: the VAE decode compiled a graph for latents %s (%d for the decoder; "
                        "dynamo's recompile limit %d)", tuple(z.shape), after, getattr(config, recompile_limit_name()))
        return DecoderOutput(image) if return_dict else (image,)


def compile_vae_decode_(vae: nn.Module, channels_last: bool = True, backend: str | object = "inductor",
                        mode: str | None = None, device: torch.device | str | None = None) -> str:
    """Compile ``vae.decode`` in place (weights to channels_last first); returns the log line.
    ``device``: where the VAE runs, when its weights rest elsewhere between runs (offload="model"
    keeps them in CPU memory): the check is made for that device (None: where its weights are)."""
    current = vae.__dict__.get("decode")
    # (under offload="model" a pipeline wraps it to visit the GPU when called by hand: offload.VisitOnCall)
    if isinstance(getattr(current, "inner", current), CompiledDecode):
        return "vae decode: already compiled"
    check_compile_supported(vae, backend, "the VAE decode", device=device)
    if channels_last:
        vae.decoder.to(memory_format=torch.channels_last)
    set_recompile_limit(VAE_RECOMPILE_LIMIT)
    compiled = torch.compile(vae.decoder, backend=backend, mode=mode, dynamic=None)
    vae.decode = CompiledDecode(vae.decoder, compiled, channels_last, vae.post_quant_conv)
    return f"vae decode: compiled{', channels_last' if channels_last else ''}"


def uncompile_vae_decode_(vae: nn.Module) -> None:
    """Back to the eager decode (the weights stay in their memory format; values are unchanged)."""
    vae.__dict__.pop("decode", None)
