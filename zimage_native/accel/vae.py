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

import torch
from torch import nn

from ..model.vae import DecoderOutput
from .compile import check_compile_supported


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
        image = self.compiled(z).contiguous()
        return DecoderOutput(image) if return_dict else (image,)


def compile_vae_decode_(vae: nn.Module, channels_last: bool = True, backend: str | object = "inductor",
                        mode: str | None = None, device: torch.device | str | None = None) -> str:
    """Compile ``vae.decode`` in place (weights to channels_last first); returns the log line.
    ``device``: where the VAE runs, when its weights rest elsewhere between runs (offload="model"
    keeps them in CPU memory): the check is made for that device (None: where its weights are)."""
    if isinstance(vae.__dict__.get("decode"), CompiledDecode):
        return "vae decode: already compiled"
    check_compile_supported(vae, backend, "the VAE decode", device=device)
    if channels_last:
        vae.decoder.to(memory_format=torch.channels_last)
    compiled = torch.compile(vae.decoder, backend=backend, mode=mode, dynamic=None)
    vae.decode = CompiledDecode(vae.decoder, compiled, channels_last, vae.post_quant_conv)
    return f"vae decode: compiled{', channels_last' if channels_last else ''}"


def uncompile_vae_decode_(vae: nn.Module) -> None:
    """Back to the eager decode (the weights stay in their memory format; values are unchanged)."""
    vae.__dict__.pop("decode", None)
