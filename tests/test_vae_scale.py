"""VAEs other than the released one: the spatial scale comes from the config (block_out_channels),
never an assumed 8, and quant_conv / post_quant_conv are run when a VAE has them. fp32 parity with
diffusers, whose pipelines read the scale the same way."""

from __future__ import annotations

import pytest
import torch

from .test_generation import make_image
from .utils import assert_rel

CASES = {
    "2x downscale": dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2),
    "4x downscale with quant convs": dict(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                          up_block_types=("UpDecoderBlock2D",) * 3, use_quant_conv=True,
                                          use_post_quant_conv=True),
    "8x with quant convs": dict(use_quant_conv=True, use_post_quant_conv=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def pipes(request, tmp_path_factory):
    pytest.importorskip("diffusers")
    import diffusers

    from zimage_native import ZImagePipeline

    from .fixtures import build_model_folder, reference_pipeline

    folder = build_model_folder(tmp_path_factory.mktemp("vae-scale"), vae_kwargs=CASES[request.param])
    ours = ZImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    ours.progress = False
    ref = reference_pipeline(folder)
    img2img = diffusers.ZImageImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    return request.param, ours, ref, img2img, folder


def test_images_have_the_requested_size_and_match_diffusers(pipes):
    name, ours, ref, _, _ = pipes
    scale = 2 ** (len(CASES[name].get("block_out_channels", (0,) * 4)) - 1)
    assert ours.vae_scale_factor == scale == ref.vae_scale_factor
    kw = dict(height=32, width=48, num_inference_steps=2, guidance_scale=0.0)
    got = ours("a cat", seed=0, output_type="latent", **kw).images
    assert got.shape == (1, 16, 32 // scale, 48 // scale)
    expected = ref("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    assert_rel(got, expected, 1e-5, f"{name}: latents")
    images = ours("a cat", seed=0, output_type="np", **kw).images
    assert images.shape == (1, 32, 48, 3)
    expected = ref("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert_rel(torch.from_numpy(images), torch.from_numpy(expected), 1e-5, f"{name}: images")


def test_img2img_encodes_through_the_same_scale(pipes):
    name, ours, _, img2img, _ = pipes
    image = make_image(48, 32)
    kw = dict(strength=0.6, num_inference_steps=4, output_type="latent")
    expected = img2img("a cat", image=image, generator=torch.Generator().manual_seed(1), guidance_scale=0.0,
                       **kw).images
    got = ours.img2img("a cat", image, seed=1, **kw).images
    assert_rel(got, expected, 1e-5, f"{name}: img2img latents")


def test_sizes_must_fit_the_latent_grid(pipes):
    name, ours, _, _, _ = pipes
    multiple = ours.vae_scale_factor * 2  # the DiT's 2x2 patches
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        ours("a cat", height=multiple * 3 + multiple // 2, width=32, num_inference_steps=1)


def test_single_file_vaes_infer_scale_and_quant_convs(pipes, tmp_path):
    """The same VAE as a single file, diffusers and LDM (BFL) layouts: the config inferred from the
    shapes gives the same scale and quant convs, and the same decode."""
    from safetensors.torch import load_file, save_file

    from zimage_native.converters.keymap import convert_state_dict, vae_ldm_keymap
    from zimage_native.loading import load_component

    name, ours, _, _, folder = pipes
    sd = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    n = len(ours.vae_config.block_out_channels)
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    want = ours.vae.decode(z).sample
    for layout, state in (("diffusers", sd), ("ldm", convert_state_dict(sd, None, vae_ldm_keymap(n)))):
        save_file(state, tmp_path / f"{layout}.safetensors")
        # norm_num_groups is not in the shapes: the tiny VAE's 16 is given (the released value is 32).
        vae = load_component("vae", tmp_path / f"{layout}.safetensors", torch.float32, config={"norm_num_groups": 16})
        assert vae.config.scale_factor == ours.vae_scale_factor, (name, layout)
        assert (vae.quant_conv is None) == (ours.vae.quant_conv is None), (name, layout)
        assert torch.equal(vae.decode(z).sample, want), (name, layout)
