"""The compiled, channels_last VAE decode (``accel.vae``) against its slow twin, the eager decode.

CPU, float32, a tiny random VAE, Inductor. Tolerance: the VAE's parity tolerance (relative error
1e-5); only the memory format and the fusion of the elementwise chains differ.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from zimage_native.accel.vae import CompiledDecode, compile_vae_decode_, uncompile_vae_decode_
from zimage_native.config import VAEConfig
from zimage_native.model.vae import AutoencoderKL
from zimage_native.testing import randomize_

from .utils import assert_rel

TINY = VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=16)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@torch.no_grad()
def test_compiled_decode_wrapper_matches_eager(channels_last):
    """The wrapper, memory formats and shape generalisation, traced by dynamo (aot_eager: fast)."""
    torch._dynamo.reset()
    eager = randomize_(AutoencoderKL(TINY), seed=3).eval()
    fast = copy.deepcopy(eager)
    line = compile_vae_decode_(fast, channels_last=channels_last, backend="aot_eager")
    assert line == "vae decode: compiled" + (", channels_last" if channels_last else "")
    assert isinstance(fast.decode, CompiledDecode)
    conv = fast.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 16, 8, 8), (2, 16, 6, 10)]:
        z = torch.randn(*shape, generator=g)
        got = fast.decode(z).sample
        assert got.is_contiguous() and got.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
        assert_rel(got, eager.decode(z).sample, 1e-5, f"compiled decode {shape}")
    assert compile_vae_decode_(fast) == "vae decode: already compiled"
    uncompile_vae_decode_(fast)
    z = torch.randn(1, 16, 8, 8, generator=g)
    assert_rel(fast.decode(z).sample, eager.decode(z).sample, 1e-5, "eager decode again, channels_last weights")


@torch.no_grad()
def test_each_graph_the_compiled_decode_compiles_is_logged(caplog):
    """A new size or batch size may compile the decoder again (automatic dynamic shapes): each
    compile is logged with the latents' shape, once per graph dynamo makes, and a shape it already
    serves logs nothing."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    vae = randomize_(AutoencoderKL(TINY), seed=3).eval()
    counter = CompileCounterWithBackend("eager")
    compile_vae_decode_(vae, backend=counter)
    said = []
    for shape in [(1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 6, 10), (1, 16, 10, 6), (2, 16, 6, 10), (3, 16, 6, 10)]:
        caplog.clear()
        frames = counter.frame_count
        with caplog.at_level("INFO", logger="zimage_native.accel.vae"):
            vae.decode(torch.randn(*shape))
        lines = [r.getMessage() for r in caplog.records if "the VAE decode compiled a graph" in r.getMessage()]
        assert all(f"latents {shape}" in line for line in lines), lines
        said.append((len(lines), counter.frame_count - frames))
    assert all(n == f for n, f in said) and sum(f for _, f in said) >= 3, said


@pytest.mark.slow
@torch.no_grad()
def test_inductor_channels_last_decode_matches_eager():
    """Inductor's code for the channels_last decoder (fused GroupNorm + SiLU chains) against eager."""
    torch._dynamo.reset()
    eager = randomize_(AutoencoderKL(TINY), seed=3).eval()
    fast = copy.deepcopy(eager)
    compile_vae_decode_(fast)
    z = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    assert_rel(fast.decode(z).sample, eager.decode(z).sample, 1e-5, "inductor channels_last decode")


@torch.no_grad()
def test_the_compiled_decode_runs_the_post_quant_conv():
    """A VAE with a post_quant_conv (loaded from a file that has one, tests/test_vae_scale.py): the
    compiled decode ran the decoder alone, without that 1x1 convolution (relative error 1.1)."""
    torch._dynamo.reset()
    eager = randomize_(AutoencoderKL(dataclasses.replace(TINY, use_post_quant_conv=True)), seed=3).eval()
    fast = copy.deepcopy(eager)
    compile_vae_decode_(fast, backend="aot_eager")
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    assert_rel(fast.decode(z).sample, eager.decode(z).sample, 1e-5, "compiled decode with a post_quant_conv")
    twin = copy.deepcopy(fast)  # a copy runs its own post_quant_conv
    twin.post_quant_conv.weight.mul_(0.5)
    assert not torch.allclose(twin.decode(z).sample, fast.decode(z).sample)


def test_compiling_the_decode_raises_dynamos_recompile_limit_above_the_graphs_a_server_makes(monkeypatch):
    """5 to 7 decoder graphs over a server's sizes and batches were counted: dynamo's default limit
    of 8 (when only the VAE is compiled) left one to spare, past which it decodes eagerly."""
    import torch._dynamo.config as config

    from zimage_native.accel.compile import recompile_limit_name
    from zimage_native.accel.vae import VAE_RECOMPILE_LIMIT

    name = recompile_limit_name()
    monkeypatch.setattr(config, name, 8)  # dynamo's default (an earlier compile in this process may have raised it)
    vae = randomize_(AutoencoderKL(TINY), seed=3).eval()
    compile_vae_decode_(vae, backend="eager")
    assert getattr(config, name) == VAE_RECOMPILE_LIMIT >= 16
