"""The VAE against diffusers 0.42.1 ``AutoencoderKL`` (CPU, float32, tiny random model, no downloads)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.utils import assert_rel
from zimage_native.config import VAEConfig
from zimage_native.loading import StateDictMismatchError, assign_state_dict, build_on_meta, load_module
from zimage_native.model.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fixed by the project's parity design

TINY = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    norm_num_groups=16,
    act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    mid_block_add_attention=True,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=64,
)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: norm weights near 1, small random biases, fan-in-scaled weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    _randomize(ref, seed=1234)
    return ref


@pytest.fixture(scope="module")
def ours(reference):
    config = VAEConfig.from_dict(TINY)
    model = build_on_meta(lambda: AutoencoderKL(config))
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    return assign_state_dict(model, state, "vae").eval()


@pytest.mark.parametrize("h, w, batch", [(8, 8, 1), (6, 10, 2)])
@torch.no_grad()
def test_decode_parity(reference, ours, h, w, batch):
    z = torch.randn(batch, 16, h, w, generator=torch.Generator().manual_seed(h * w))
    expected = reference.decode(z).sample
    got = ours.decode(z).sample
    assert got.shape == (batch, 3, 8 * h, 8 * w)
    err = assert_rel(got, expected, TOL, f"decode {h}x{w}")
    print(f"decode {h}x{w} rel err {err:.3e}")


@torch.no_grad()
def test_encode_parity(reference, ours):
    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(7)) * 2 - 1
    dist = reference.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == logvar.shape == (2, 16, 6, 10)
    err_mean = assert_rel(mean, dist.mean, TOL, "encode mean")
    err_logvar = assert_rel(logvar, dist.logvar, TOL, "encode logvar")
    print(f"encode 48x80 rel err mean {err_mean:.3e} logvar {err_logvar:.3e}")


@torch.no_grad()
def test_logvar_is_clamped(ours):
    # Push the logvar half of conv_out far out of range: the clamp must hold it to [-30, 20].
    model = build_on_meta(lambda: AutoencoderKL(ours.config))
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["encoder.conv_out.bias"][16:] = torch.tensor([1e3, -1e3]).repeat(8)
    model = assign_state_dict(model, state, "vae")
    _, logvar = model.encode(torch.zeros(1, 3, 16, 16))
    assert logvar.max().item() == 20.0 and logvar.min().item() == -30.0


@torch.no_grad()
def test_load_from_diffusers_folder(reference, tmp_path, caplog):
    reference.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="zimage_native.config"):
        model = load_module(
            lambda: AutoencoderKL(VAEConfig.from_json(tmp_path / "config.json")), tmp_path, torch.float32, "cpu", "vae"
        )
    assert not caplog.records, "the diffusers config.json has keys VAEConfig does not know"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.decode(z).sample, reference.decode(z).sample)
    x = torch.rand(1, 3, 32, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    dist = reference.encode(x).latent_dist
    mean, logvar = model.encode(x)
    assert torch.equal(mean, dist.mean) and torch.equal(logvar, dist.logvar)


def test_released_config_sizes():
    model = build_on_meta(lambda: AutoencoderKL(VAEConfig()))
    state = model.state_dict()
    assert len(state) == 244
    count = lambda prefix: sum(t.numel() for k, t in state.items() if k.startswith(prefix))  # noqa: E731
    assert count("") == 83_819_683
    assert count("encoder.") == 34_274_208
    assert count("decoder.") == 49_545_475
    assert not any("quant_conv" in k for k in state)


def test_released_config_matches_diffusers_layout():
    config = VAEConfig()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**config.to_dict())
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in build_on_meta(lambda: AutoencoderKL(config)).state_dict().items()}
    assert got == expected


def test_strict_loading_names_missing_and_unexpected(ours):
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    removed = "decoder.mid_block.attentions.0.to_k.weight"
    del state[removed]
    state["encoder.bogus.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as info:
        assign_state_dict(build_on_meta(lambda: AutoencoderKL(ours.config)), state, "vae")
    assert info.value.missing == [removed] and info.value.unexpected == ["encoder.bogus.weight"]
    assert removed in str(info.value) and "encoder.bogus.weight" in str(info.value)
