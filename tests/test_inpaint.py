"""Inpainting at fp32 parity with diffusers 0.42.1 ``ZImageInpaintPipeline`` (white = repaint)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from .test_generation import make_image
from .utils import assert_rel, rel_err


def make_mask(w=80, h=48, box=(20, 10, 60, 40), mode="L"):
    """Black with a white box (the area to repaint); grey edges from the resize test binarisation."""
    m = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    m[y0:y1, x0] = 120  # below 0.5: kept
    return Image.fromarray(m).convert(mode)


@pytest.fixture(scope="module")
def reference_inpaint(reference_pipe):
    import diffusers

    pipe = diffusers.ZImageInpaintPipeline(**reference_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "strength, extra",
    [
        pytest.param(1.0, {}, id="strength 1"),
        pytest.param(0.6, {}, id="strength 0.6"),
        pytest.param(1.0, {"guidance_scale": 3.0, "negative_prompt": "blurry"}, id="strength 1 with CFG"),
        pytest.param(0.5, {"guidance_scale": 2.0, "cfg_truncation": 0.6, "cfg_normalization": 1.2},
                     id="strength 0.5, CFG truncated and normalised"),
        pytest.param(0.8, {"num_images_per_prompt": 2}, id="two outputs"),
    ],
)
def test_inpaint_matches_diffusers(tiny_pipe, reference_inpaint, strength, extra):
    image, mask = make_image(83, 50), make_mask(83, 50, mode="RGB")  # resized down to 80x48
    kw = dict(strength=strength, num_inference_steps=5, output_type="latent", **extra)
    expected = reference_inpaint("a cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(3),
                                 **{"guidance_scale": 0.0, **kw}).images
    got = tiny_pipe.inpaint("a cat", image=image, mask_image=mask, seed=3, **kw)
    assert got.images.shape == (kw.get("num_images_per_prompt", 1), 16, 6, 10)
    assert got.info["strength"] == strength
    assert_rel(got.images, expected, 1e-5, "inpaint final latents")


def test_inpaint_with_generator_list_matches_diffusers(tiny_pipe, reference_inpaint):
    image, mask = make_image(64, 64), make_mask(64, 64, box=(8, 8, 40, 56))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    expected = reference_inpaint(["a cat", "a dog"], image=image, mask_image=mask, generator=gens(), guidance_scale=3.0,
                                 num_inference_steps=4, output_type="latent", strength=0.75).images
    got = tiny_pipe.inpaint(["a cat", "a dog"], image, mask, generator=gens(), guidance_scale=3.0,
                            num_inference_steps=4, output_type="latent", strength=0.75).images
    assert_rel(got, expected, 1e-5, "inpaint with a generator list")


def test_inpaint_images_match_diffusers(tiny_pipe, reference_inpaint):
    image, mask = make_image(64, 48), make_mask(64, 48)
    expected = reference_inpaint("a cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(1),
                                 guidance_scale=0.0, num_inference_steps=3, output_type="np").images
    got = tiny_pipe.inpaint("a cat", image, mask, seed=1, num_inference_steps=3, output_type="np").images
    assert_rel(torch.from_numpy(got), torch.from_numpy(expected), 1e-5, "inpaint images")


def test_black_mask_keeps_the_image_and_white_mask_repaints(tiny_pipe):
    """The last blend puts the clean image latents wherever the mask is black: an all-black mask
    returns the encoded image exactly; an all-white one is img2img at the same strength."""
    image = make_image(32, 32)
    kw = dict(num_inference_steps=3, output_type="latent", seed=4, strength=0.7)
    black = Image.new("L", (32, 32), 0)
    kept = tiny_pipe.inpaint("a cat", image, black, **kw).images
    from zimage_native.sampling import preprocess_image

    z = tiny_pipe.encode_image(preprocess_image(image), [torch.Generator().manual_seed(4)], torch.float32)
    assert torch.equal(kept, z)
    white = Image.new("L", (32, 32), 255)
    repainted = tiny_pipe.inpaint("a cat", image, white, **kw).images
    assert rel_err(repainted, tiny_pipe.img2img("a cat", image, **kw).images) < 1e-6


def test_mask_inputs_as_arrays_and_tensors_equal_the_pil_mask(tiny_pipe):
    image = make_image(48, 32)
    pil = make_mask(48, 32, box=(8, 8, 32, 24))
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    kw = dict(num_inference_steps=2, output_type="latent", seed=2)
    want = tiny_pipe.inpaint("a cat", image, pil, **kw).images
    for mask in (arr, arr[..., None], torch.from_numpy(arr), torch.from_numpy(arr)[None, None]):
        assert torch.equal(tiny_pipe.inpaint("a cat", image, mask, **kw).images, want)


def test_16_bit_and_float_masks_are_cut_at_half_their_range(tmp_path):
    """A 16-bit grey mask (a PNG from an image editor or a segmentation tool) and a float one are read
    by their own range, as 16-bit images are: Pillow's conversion to L clipped them, cutting 16-bit
    masks at 128 of 65535 (0.2%) instead of half (diffusers does; a deliberate difference)."""
    from zimage_native.images import preprocess_mask

    levels = np.zeros((32, 48), dtype=np.uint16)
    levels[:, 16:32] = 1000  # 1.5%: kept
    levels[:, 32:] = 40000  # 61%: repainted
    want = torch.zeros(1, 1, 32, 48)
    want[..., 32:] = 1
    png = tmp_path / "mask16.png"
    Image.fromarray(levels).save(png)
    with Image.open(png) as reopened:
        assert reopened.mode in ("I", "I;16") and torch.equal(preprocess_mask(reopened, 32, 48), want)
    for mask in (Image.fromarray(levels), Image.fromarray(levels.astype(np.int32)),
                 Image.fromarray(levels.astype(np.float32) / 65535)):
        assert mask.mode in ("I;16", "I", "F") and torch.equal(preprocess_mask(mask, 32, 48), want), mask.mode
    assert torch.equal(preprocess_mask([Image.fromarray(levels), make_mask(48, 32)], 32, 48)[:1], want)


def test_inpaint_rejects_bad_input(tiny_pipe):
    image = make_image(32, 32)
    with pytest.raises(ValueError, match="mask_image needs image"):
        tiny_pipe("a cat", mask_image=make_mask(32, 32))
    with pytest.raises(ValueError, match="inpaint needs"):
        tiny_pipe.inpaint("a cat", image, None)
    with pytest.raises(ValueError, match="mask"):
        tiny_pipe.inpaint("a cat", image, np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="strength"):
        tiny_pipe.inpaint("a cat", image, make_mask(32, 32), strength=1.5)


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_graphed_inpaint_equals_eager_and_copies_the_blend_in(tiny_model_dir, tiny_pipe, mode):
    """The blend's tensors (mask, image latents, noise) are plan inputs: a replayed graph with another
    image and mask gives that request's result, with no inpaint-specific graph code."""
    from zimage_native import ZImagePipeline

    from .test_compiled import graphed

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = False
    sampler, _ = graphed(pipe, mode=mode)
    kw = dict(num_inference_steps=3, output_type="latent", seed=1, strength=0.8, guidance_scale=2.0)
    for k, box in enumerate([(4, 4, 20, 28), (16, 0, 32, 16)]):
        image, mask = make_image(32, 32, seed=k), make_mask(32, 32, box=box)
        got = pipe.inpaint("a cat", image, mask, **kw).images
        assert_rel(got, tiny_pipe.inpaint("a cat", image, mask, **kw).images, 1e-6, f"graphed {mode} inpaint {k}")
    assert sampler.captures == 1 and sampler.replays == (2 if mode == "loop" else 6)


def test_given_start_latents_match_diffusers(tiny_pipe, reference_inpaint, reference_pipe):
    """``latents=`` is the start of img2img and inpainting as in diffusers (inpainting still encodes
    the image and draws the noise for its blend)."""
    import diffusers

    image, mask = make_image(48, 32), make_mask(48, 32, box=(8, 8, 40, 24))
    start = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(9))
    kw = dict(strength=0.7, num_inference_steps=4, output_type="latent", guidance_scale=0.0, latents=start)
    expected = reference_inpaint("a cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(2),
                                 **kw).images
    got = tiny_pipe.inpaint("a cat", image, mask, seed=2, **kw).images
    assert_rel(got, expected, 1e-5, "inpaint from given latents")
    img2img = diffusers.ZImageImg2ImgPipeline(**reference_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    expected = img2img("a cat", image=image, generator=torch.Generator().manual_seed(2), **kw).images
    got = tiny_pipe.img2img("a cat", image, seed=2, **kw)
    assert_rel(got.images, expected, 1e-5, "img2img from given latents")
    # img2img from given latents draws nothing: no seed is reported as the image's (inpainting's is used)
    assert got.seeds is None and tiny_pipe.img2img("a cat", image, **kw).seeds is None
    assert tiny_pipe.inpaint("a cat", image, mask, seed=2, **kw).seeds == [2]
    with pytest.raises(ValueError, match="latents must have shape"):
        tiny_pipe.img2img("a cat", image, latents=start[..., :2], num_inference_steps=2)


def test_callback_on_step_end_reads_and_replaces_the_mask_like_diffusers(tiny_pipe, reference_inpaint):
    """diffusers' inpainting gives its callback the latent-grid mask and takes a new one, which the
    blends of the later steps use (it was refused as a tensor input here); keys it cannot replace
    are refused, not ignored."""
    image, mask = make_image(64, 48), make_mask(64, 48)

    def make_callback(seen):
        def callback(pipe, i, t, tensors):
            seen.append(tuple(tensors["mask"].shape))
            return {"mask": torch.ones_like(tensors["mask"]), "latents": tensors["latents"]} if i == 1 else {}
        return callback

    kw = dict(strength=0.8, num_inference_steps=4, output_type="latent", num_images_per_prompt=2,
              callback_on_step_end_tensor_inputs=["latents", "mask"])
    ref_seen, seen = [], []
    expected = reference_inpaint("a cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(2),
                                 guidance_scale=0.0, callback_on_step_end=make_callback(ref_seen), **kw).images
    got = tiny_pipe.inpaint("a cat", image, mask, seed=2, callback_on_step_end=make_callback(seen), **kw).images
    assert seen == ref_seen == [(2, 1, 6, 8)] * 4
    assert_rel(got, expected, 1e-5, "inpaint with the mask replaced mid-run")
    plain = tiny_pipe.inpaint("a cat", image, mask, seed=2, **{k: v for k, v in kw.items() if "callback" not in k})
    assert rel_err(got, plain.images) > 1e-3  # the new mask took effect
    with pytest.raises(ValueError, match=r"returned \['negative_prompt_embeds'\]; only \['latents', 'mask'\]"):
        tiny_pipe.inpaint("a cat", image, mask, seed=2, callback_on_step_end=lambda p, i, t, d: {
            "negative_prompt_embeds": []}, **kw)
    with pytest.raises(ValueError, match="can hold"):  # text to image has no mask
        tiny_pipe("a cat", width=32, height=32, num_inference_steps=1, callback_on_step_end=lambda *a: {},
                  callback_on_step_end_tensor_inputs=["mask"])


def test_lists_of_2d_masks_are_a_batch_as_in_diffusers(tiny_pipe):
    """A list of (H, W) arrays or tensors, or a (B, H, W) array, is a batch of masks (diffusers
    stacks them and adds the channel): each equals its PIL mask. An RGB array is refused."""
    image = make_image(48, 32)
    pils = [make_mask(48, 32, box=(8, 8, 32, 24)), make_mask(48, 32, box=(0, 16, 48, 32))]
    arrays = [np.asarray(m, dtype=np.float32) / 255.0 for m in pils]
    kw = dict(num_inference_steps=2, output_type="latent", seed=[2, 3], num_images_per_prompt=2)
    want = tiny_pipe.inpaint("a cat", image, pils, **kw).images
    for masks in (arrays, [torch.from_numpy(a) for a in arrays], np.stack(arrays)):
        assert torch.equal(tiny_pipe.inpaint("a cat", image, masks, **kw).images, want)
    with pytest.raises(ValueError, match=r"mask_image.*one channel.*got shape \(32, 48, 3\)"):
        tiny_pipe.inpaint("a cat", image, np.zeros((32, 48, 3), dtype=np.float32), num_inference_steps=1)


def test_grey_arrays_and_tensors_are_made_rgb_as_a_grey_pil_image_is(tiny_pipe):
    """A grey array or tensor (a depth map from a depth estimator, a 1-channel tensor) is read as a
    grey PIL image is: its channel repeated (it was refused by shape; diffusers hands a one-channel
    image to the VAE, which fails)."""
    from zimage_native.images import preprocess_image

    grey = np.random.default_rng(0).integers(0, 256, (32, 48), dtype=np.uint8)
    want = preprocess_image(Image.fromarray(grey))  # mode L, made RGB
    as_float = torch.from_numpy(grey.astype(np.float32) / 255)
    for x in (grey, grey[..., None], grey[None, ..., None], grey.astype(np.uint16) * 257, as_float, as_float[None],
              as_float[None, None], [as_float]):
        assert torch.equal(preprocess_image(x), want), getattr(x, "shape", "list")
    assert torch.equal(preprocess_image([grey, grey]), want.expand(2, -1, -1, -1))
    kw = dict(num_inference_steps=2, output_type="latent", seed=3)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    assert torch.equal(tiny_pipe.img2img("a cat", grey, **kw).images, tiny_pipe.img2img("a cat", rgb, **kw).images)


def test_bad_image_arrays_and_strength_raise_clear_value_errors(tiny_pipe):
    image, mask = make_image(32, 32), make_mask(32, 32)
    with pytest.raises(ValueError, match=r"image arrays must be \(H, W, 3\).*got shape \(32, 32, 2\)$"):
        tiny_pipe.img2img("a cat", np.zeros((32, 32, 2), dtype=np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"image arrays must be"):
        tiny_pipe.inpaint("a cat", [np.zeros((32, 32, 4))] * 2, mask, num_inference_steps=1)
    for bad in ("0.5", float("nan"), True):
        with pytest.raises(ValueError, match="strength must be a number in \\[0, 1\\]"):
            tiny_pipe.inpaint("a cat", image, mask, strength=bad, num_inference_steps=1)


def test_masked_image_latents_is_ignored_with_a_warning_as_diffusers_ignores_it(tiny_pipe, caplog):
    """diffusers 0.42.1's Z-Image inpainting takes masked_image_latents= and never reads it."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(prompt="a cat", image=image, mask_image=mask, seed=0, num_inference_steps=2, output_type="latent")
    plain = tiny_pipe.inpaint(**kw).images
    with caplog.at_level(logging.WARNING, logger="zimage_native.pipeline"):
        given = tiny_pipe.inpaint(masked_image_latents=torch.zeros(1, 16, 8, 8), **kw).images
    assert torch.equal(given, plain)
    assert any("masked_image_latents= is ignored" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"masked_image_latents= belongs to inpainting .*pipe.inpaint"):
        tiny_pipe("a cat", masked_image_latents=torch.zeros(1, 16, 8, 8), seed=0, num_inference_steps=1)
