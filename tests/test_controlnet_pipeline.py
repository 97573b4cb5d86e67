"""ControlNet-Union end to end at parity with diffusers 0.42.1 ZImageControlNetPipeline (and, for
control inpainting, ZImageControlNetInpaintPipeline), fp32 on CPU, for each published version's
layout (1.0, 2.0, 2.1) on tiny random models: final latents rel err <= 1e-5.

The model folder's DiT has four main and two noise-refiner layers, so that the tiny layouts of
``test_controlnet_model`` (control places [0, 2], refiner places [0, 1]) fit it. Our pipeline loads
the ControlNet from a single file of the control tensors, as the published files are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from .test_controlnet_model import CONTROL_DIT, CONTROL_LAYOUTS, make_models
from .utils import assert_rel, rel_err

diffusers = pytest.importorskip("diffusers")

LONG = "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat"


@pytest.fixture(scope="module")
def control_model_dir(tmp_path_factory):
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("control-zimage"), dit_kwargs=CONTROL_DIT)


@pytest.fixture(scope="module")
def control_pipe(control_model_dir):
    from .fixtures import our_pipeline

    return our_pipeline(control_model_dir)


@pytest.fixture(scope="module")
def control_files(tmp_path_factory):
    """One single file per version: the control tensors of the randomised diffusers ControlNet."""
    folder = tmp_path_factory.mktemp("controlnets")
    files = {}
    for version in CONTROL_LAYOUTS:
        state = {k: v.contiguous() for k, v in make_models(version)[1].state_dict().items() if k.startswith("control_")}
        files[version] = folder / f"cn-{version}.safetensors"
        save_file(state, str(files[version]))
    return files


def reference(model_dir, version: str, inpaint: bool = False):
    """diffusers' ControlNet pipeline on the same folder, with the same control weights."""
    from .fixtures import reference_pipeline

    base = reference_pipeline(model_dir)
    cn = diffusers.ZImageControlNetModel(**CONTROL_LAYOUTS[version]).eval()
    cn.load_state_dict({k: v for k, v in make_models(version)[1].state_dict().items() if k.startswith("control_")},
                       strict=False)
    cls = diffusers.ZImageControlNetInpaintPipeline if inpaint else diffusers.ZImageControlNetPipeline
    pipe = cls(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
               transformer=base.transformer, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":  # a mask: a white rectangle (repaint) on black, with soft grey edges
        a = np.zeros((h, w), dtype=np.uint8)
        a[h // 4: 3 * h // 4, w // 3: w - 2] = 255
        a[h // 4, :] = 120
        return Image.fromarray(a, "L")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def both(ours, ref, prompt, seed=0, **kw):
    """Run both pipelines on one request. diffusers rewrites prompt lists in place: each gets copies."""
    copy = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    ref_kw = {k: copy(v) for k, v in kw.items()}
    ref_kw.setdefault("guidance_scale", 0.0)  # diffusers' default is 5.0
    expected = ref(copy(prompt), generator=torch.Generator().manual_seed(seed), **ref_kw).images
    got = ours(copy(prompt), seed=seed, **{k: copy(v) for k, v in kw.items()}).images
    return got, expected


CASES = [
    pytest.param("a cat", dict(height=48, width=64), id="one prompt"),
    pytest.param(["a cat", LONG], dict(height=64, width=48, guidance_scale=3.0, negative_prompt=["blurry", "ugly"],
                                       controlnet_conditioning_scale=0.5),
                 id="CFG, two prompts of different lengths, scale 0.5"),
]


@pytest.mark.parametrize("version", sorted(CONTROL_LAYOUTS))
@pytest.mark.parametrize("prompt, kw", CASES)
def test_control_final_latents_match_diffusers(control_pipe, control_model_dir, control_files, version, prompt, kw):
    control_pipe.load_controlnet(control_files[version])
    assert control_pipe.controlnet.config.version == version
    ref = reference(control_model_dir, version)
    control = picture(72, 40, 1)  # resized to the output size, as diffusers does
    got, expected = both(control_pipe, ref, prompt, control_image=control, num_inference_steps=2,
                         output_type="latent", **kw)
    assert_rel(got, expected, 1e-5, f"final latents with ControlNet {version}")


def test_images_per_prompt_and_one_control_image_per_prompt(control_pipe, control_model_dir, control_files):
    control_pipe.load_controlnet(control_files["2.1"])
    ref = reference(control_model_dir, "2.1")
    controls = [picture(48, 48, 2), picture(64, 32, 3)]  # one per prompt, each repeated for its images
    kw = dict(control_image=controls, num_images_per_prompt=2, height=32, width=48, num_inference_steps=2,
              output_type="latent")
    got, expected = both(control_pipe, ref, ["a cat", LONG], **kw)
    assert got.shape == (4, 16, 4, 6)
    assert_rel(got, expected, 1e-5, "final latents, two control images, two images per prompt")
    # The control matters: the same request without it is far away; scale 0 is the plain DiT.
    plain = {k: v for k, v in kw.items() if k != "control_image"}
    without = control_pipe(["a cat", LONG], seed=0, **plain).images
    assert rel_err(without, expected) > 1e-3
    zero = control_pipe(["a cat", LONG], seed=0, controlnet_conditioning_scale=0.0, **kw).images
    assert torch.equal(zero, without)
    # a numpy scale (a sweep over np.linspace, an array's float32) is taken as its value
    half = control_pipe(["a cat", LONG], seed=0, controlnet_conditioning_scale=0.5, **kw).images
    scaled = control_pipe(["a cat", LONG], seed=0, controlnet_conditioning_scale=np.float32(0.5), **kw).images
    assert torch.equal(scaled, half)


def test_the_scale_needs_a_control_image_and_defaults_to_0_75(control_pipe, control_files):
    """controlnet_conditioning_scale without a control image would change nothing: it is refused (it
    was ignored, its 0.75 default not told from a value given). Unset with a control image it is
    0.75; a numpy scale is recorded as a plain float."""
    control_pipe.load_controlnet(control_files["2.1"])
    kw = dict(height=32, width=32, num_inference_steps=1, seed=0, output_type="latent")
    for scale in (0.3, 0.75, np.float32(0.3)):
        with pytest.raises(ValueError, match="controlnet_conditioning_scale needs control_image="):
            control_pipe("a cat", controlnet_conditioning_scale=scale, **kw)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale needs control_image="):
        control_pipe.img2img("a cat", picture(32, 32, 2), controlnet_conditioning_scale=0.5, **kw)
    control = picture(32, 32, 1)
    default = control_pipe("a cat", control_image=control, **kw)
    assert default.info["control_scale"] == 0.75
    given = control_pipe("a cat", control_image=control, controlnet_conditioning_scale=0.75, **kw)
    assert torch.equal(default.images, given.images)
    scaled = control_pipe("a cat", control_image=control, controlnet_conditioning_scale=np.float32(0.5), **kw)
    assert type(scaled.info["control_scale"]) is float and scaled.info["control_scale"] == 0.5
    # diffusers' signature names list[float], which its one ControlNet cannot take (a TypeError inside
    # the branch, "only integer tensors of a single element can be converted to an index")
    with pytest.raises(ValueError, match=r"controlnet_conditioning_scale must be a finite number, got \[0.5\]"):
        control_pipe("a cat", control_image=control, controlnet_conditioning_scale=[0.5], **kw)


def test_assigning_pipe_controlnet_as_diffusers_does(control_pipe, control_files):
    """diffusers scripts set pipe.controlnet = model; that was an AttributeError (a property without
    a setter). None unloads; a model built elsewhere is refused, naming load_controlnet."""
    control_pipe.load_controlnet(control_files["2.1"])
    with pytest.raises(ValueError, match=r"pipe.controlnet = ZImageControlNetModel\(...\): load .* "
                                         r"pipe.load_controlnet\(path\)"):
        control_pipe.controlnet = diffusers.ZImageControlNetModel(**CONTROL_LAYOUTS["2.1"])
    assert control_pipe.controlnet is not None  # the loaded one stays
    control_pipe.controlnet = None
    assert control_pipe.controlnet is None


INPAINT_CASES = [
    pytest.param("2.0", "a cat", dict(height=48, width=64), id="2.0, one prompt"),
    pytest.param("2.1", ["a cat", LONG], dict(height=64, width=48, guidance_scale=3.0, negative_prompt=["blurry", "ugly"],
                                              controlnet_conditioning_scale=0.6),
                 id="2.1, CFG, two prompts of different lengths"),
    pytest.param("2.1", "a cat", dict(height=32, width=48, num_images_per_prompt=2), id="2.1, two images per prompt"),
]


@pytest.mark.parametrize("version, prompt, kw", INPAINT_CASES)
def test_control_inpaint_final_latents_match_diffusers(control_pipe, control_model_dir, control_files, version, prompt,
                                                       kw):
    control_pipe.load_controlnet(control_files[version])
    ref = reference(control_model_dir, version, inpaint=True)
    image, mask, control = picture(80, 56, 7), picture(80, 56, 0, "L"), picture(40, 72, 8)
    batch = (len(prompt) if isinstance(prompt, list) else 1) * kw.get("num_images_per_prompt", 1)
    if batch > 1:  # diffusers concatenates the mask without spreading it: give one per image
        mask = [mask] * batch
    expected = ref(list(prompt) if isinstance(prompt, list) else prompt, image=image, mask_image=list(mask)
                   if isinstance(mask, list) else mask,
                   control_image=control, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                   output_type="latent", **{"guidance_scale": 0.0, **{k: list(v) if isinstance(v, list) else v
                                                                       for k, v in kw.items()}}).images
    got = control_pipe.inpaint(prompt, image=image, mask_image=mask, control_image=control, seed=0,
                               num_inference_steps=2, output_type="latent", **kw).images
    assert_rel(got, expected, 1e-5, f"final latents of control inpainting with ControlNet {version}")
    if isinstance(mask, list):  # one mask serves every image here
        one = control_pipe.inpaint(prompt, image=image, mask_image=mask[0], control_image=control, seed=0,
                                   num_inference_steps=2, output_type="latent", **kw).images
        assert torch.equal(one, got)
    # The image reaches the model: another image under the same mask changes the result.
    other = control_pipe.inpaint(prompt, image=picture(80, 56, 9), mask_image=mask, control_image=control, seed=0,
                                 num_inference_steps=2, output_type="latent", **kw).images
    assert rel_err(other, expected) > 1e-4


def test_control_inpaint_needs_a_2x_controlnet_and_takes_no_strength(control_pipe, control_files):
    image, mask, control = picture(48, 32, 7), picture(48, 32, 0, "L"), picture(48, 32, 8)
    control_pipe.load_controlnet(control_files["1.0"])
    with pytest.raises(ValueError, match="33 input channels.*version 1.0"):
        control_pipe.inpaint("a cat", image=image, mask_image=mask, control_image=control, num_inference_steps=1)
    control_pipe.load_controlnet(control_files["2.1"])
    with pytest.raises(ValueError, match="no strength"):
        control_pipe.inpaint("a cat", image=image, mask_image=mask, control_image=control, strength=0.5,
                             num_inference_steps=1)


def test_control_inpaint_refuses_image_latents_as_inpainting_does(control_pipe, control_files):
    """Image latents as image= (a (B, 16, h, w) tensor, which img2img takes) are refused by plain
    inpainting naming them; ControlNet inpainting failed on them with the image reader's shape error
    ("image arrays must be (H, W, 3) ... got shape (1, 16, 4, 6)"). diffusers' ControlNet inpainting
    fails on them too (a size mismatch at the mask, with or without height/width)."""
    control_pipe.load_controlnet(control_files["2.1"])
    latents, mask, control = torch.randn(1, 16, 4, 6), picture(48, 32, 0, "L"), picture(48, 32, 8)
    with pytest.raises(ValueError, match=r"ControlNet inpainting takes an image, not image latents \(image= of "
                                         r"shape \(1, 16, 4, 6\).*pipe.decode"):
        control_pipe.inpaint("a cat", image=latents, mask_image=mask, control_image=control, num_inference_steps=1)


def test_seed_variance_reaches_the_control_branch(control_pipe, control_files):
    """With every step varied, seed variance is the run with the varied features given as
    prompt_embeds (varied by independent code): the ControlNet branch reads the same caption tokens."""
    from .test_seed_variance import varied_by_hand

    control_pipe.load_controlnet(control_files["2.1"])
    kw = dict(control_image=picture(32, 32, 1), num_inference_steps=2, output_type="latent", height=32, width=32,
              seed=5)
    got = control_pipe("a cat", seed_variance=20.0, seed_variance_share=0.5, seed_variance_steps=1.0, **kw).images
    varied = varied_by_hand(control_pipe.encode_prompt(["a cat"])[0], 5, 20.0, 0.5)
    assert_rel(got, control_pipe(prompt_embeds=[varied], **kw).images, 1e-6)
    assert rel_err(got, control_pipe("a cat", **kw).images) > 1e-3


def test_the_first_block_cache_runs_the_control_branch(control_pipe, control_files):
    """A threshold nothing passes gives the uncached run bit for bit; one everything passes reuses
    every step after the first (the reused steps add the first layer's hint only)."""
    control_pipe.load_controlnet(control_files["2.1"])
    kw = dict(control_image=picture(32, 32, 1), num_inference_steps=3, output_type="latent", height=32, width=32,
              seed=5)
    plain = control_pipe("a cat", **kw).images
    never = control_pipe("a cat", first_block_cache=1e-9, **kw)
    assert never.info["first_block_cache_forwards"] == {"full": 3, "reused": 0}
    assert torch.equal(never.images, plain)
    always = control_pipe("a cat", first_block_cache=1e6, **kw)
    assert always.info["first_block_cache_forwards"] == {"full": 1, "reused": 2}
    assert rel_err(always.images, plain) > 1e-3


def test_a_control_image_off_the_16_grid_runs_rounded_down_with_one_warning(control_pipe, control_files, caplog):
    """As img2img's image (tests/test_library_mistakes.py): ControlNet generation at a 33x31 control
    image ran at 32x16 without a word; control inpainting names its image once (the control image is
    resized to the image's size, so it adds no second warning)."""
    import logging

    control_pipe.load_controlnet(control_files["2.1"])
    said = ("{} is 33x31, whose sides are not all multiples of 16: the run uses 32x16 (rounded down, as diffusers "
            "does); give width= and height= (multiples of 16, e.g. width=32, height=32) to choose the size the image "
            "is resized to")
    kw = dict(num_inference_steps=1, seed=0)
    for what, call in (("control_image", lambda: control_pipe("a cat", control_image=picture(33, 31, 1), **kw)),
                       ("image", lambda: control_pipe.inpaint("a cat", image=picture(33, 31, 7),
                                                              mask_image=picture(33, 31, 0, "L"),
                                                              control_image=picture(33, 31, 8), **kw))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="zimage_native"):
            out = call()
        assert out.images[0].size == (32, 16)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [said.format(what)]
