"""Scripts written for diffusers 0.42.1 that decode ``output_type="latent"`` results by hand, or encode
images by hand for img2img, run here with diffusers' numbers: diffusers' pipeline, VaeImageProcessor
and AutoencoderKL on the same tiny weights (fp32, CPU; 1e-5 relative, as docs/design.md)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from .utils import assert_rel

pytest.importorskip("diffusers")

KW = dict(height=64, width=96, num_inference_steps=2, guidance_scale=0.0)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def hand_decode(pipe, latents, form):
    """diffusers' own decode steps (pipeline_z_image.py), as scripts copy them."""
    z = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    if form == "tuple":
        return pipe.vae.decode(z, return_dict=False)[0]
    if form == "sample":
        return pipe.vae.decode(z).sample
    return pipe.vae.decode(z)[0]  # diffusers' output indexed: the batch


@pytest.mark.parametrize("form", ["tuple", "sample", "index"])
@torch.no_grad()
def test_latents_decoded_by_hand_match_diffusers(tiny_pipe, reference_pipe, form):
    prompts = ["a cat", "a dog"]
    latents = tiny_pipe(list(prompts), generator=gens(0, 1), output_type="latent", **KW).images
    expected_latents = reference_pipe(list(prompts), generator=gens(0, 1), output_type="latent", **KW).images
    assert_rel(latents, expected_latents, 1e-5, "latents")
    image = hand_decode(tiny_pipe, latents, form)
    expected = hand_decode(reference_pipe, latents, form)
    assert image.shape == expected.shape == (2, 3, 64, 96)
    assert_rel(image, expected, 1e-5, f"decoded by hand ({form})")
    for output_type in ("np", "pt"):
        got = tiny_pipe.image_processor.postprocess(image, output_type=output_type)
        want = reference_pipe.image_processor.postprocess(expected, output_type=output_type)
        assert type(got) is type(want) and got.shape == want.shape
        assert_rel(torch.as_tensor(got), torch.as_tensor(want), 1e-5, f"postprocess {output_type}")
    pil = tiny_pipe.image_processor.postprocess(image, output_type="pil")
    assert [p.size for p in pil] == [(96, 64)] * 2
    # the same tensor through both processors: the same pixels
    same = reference_pipe.image_processor.postprocess(image, output_type="pil")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pil, same))
    flags = [False, True]
    assert_rel(tiny_pipe.image_processor.postprocess(image, "pt", do_denormalize=flags),
               reference_pipe.image_processor.postprocess(image, "pt", do_denormalize=flags), 1e-7, "do_denormalize")
    assert tiny_pipe.image_processor.postprocess(latents, output_type="latent") is latents
    # the pipeline's own decode gives the images of the hand decode
    direct = tiny_pipe(list(prompts), generator=gens(0, 1), output_type="np", **KW).images
    assert_rel(torch.from_numpy(direct), torch.from_numpy(tiny_pipe.image_processor.postprocess(image, "np")), 1e-6,
               "hand decode vs output_type='np'")


def test_postprocess_refuses_what_it_cannot_take(tiny_pipe):
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"batch tensor \(B, 3, H, W\).*got shape \(3, 32, 32\)"):
        tiny_pipe.image_processor.postprocess(image[0])
    with pytest.raises(ValueError, match="output_type must be 'pil', 'np', 'pt' or 'latent', got 'PIL'"):
        tiny_pipe.image_processor.postprocess(image, output_type="PIL")
    with pytest.raises(ValueError, match="resize_mode and crops_coords are not supported"):
        tiny_pipe.image_processor.preprocess(Image.new("RGB", (32, 32)), resize_mode="crop")


@torch.no_grad()
def test_a_decode_used_as_the_tensor_it_was_names_sample(tiny_pipe):
    """decode(z) returned the image tensor up to now; a tensor's name on its DecoderOutput says to
    read .sample (it said only "'DecoderOutput' object has no attribute 'shape'")."""
    out = tiny_pipe.vae.decode(torch.randn(1, 16, 4, 4))
    for name in ("shape", "clamp", "cpu", "permute"):
        with pytest.raises(AttributeError, match=rf"no attribute '{name}': vae.decode\(z\) returns .*\.sample is"):
            getattr(out, name)
    with pytest.raises(AttributeError, match=r"no attribute 'latent_dist'$"):
        out.latent_dist
    assert not hasattr(out, "__deepcopy__") and copy.deepcopy(out).sample.shape == (1, 3, 32, 32)
    assert torch.equal(pickle.loads(pickle.dumps(out)).sample, out.sample)


def test_postprocess_refuses_a_do_denormalize_list_of_another_length(tiny_pipe):
    """One flag per image: a shorter list dropped the images past it (3 decoded, 1 returned; diffusers
    raises IndexError), a longer one was ignored."""
    image = torch.rand(3, 3, 16, 16) * 2 - 1
    for output_type in ("pt", "np", "pil"):
        for flags in ([True], [True, False], [True] * 4):
            with pytest.raises(ValueError, match=rf"do_denormalize has {len(flags)} flags for a batch of 3 images"):
                tiny_pipe.image_processor.postprocess(image, output_type, do_denormalize=flags)
        assert len(tiny_pipe.image_processor.postprocess(image, output_type, do_denormalize=[True, False, True])) == 3


@torch.no_grad()
def test_images_encoded_by_hand_match_diffusers(tiny_pipe, reference_pipe):
    """img2img by hand: image_processor.preprocess, vae.encode(x).latent_dist.sample(generator) / .mode(),
    then (z - shift_factor) * scaling_factor, as diffusers' retrieve_latents."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8))
    x = tiny_pipe.image_processor.preprocess(image)
    expected_x = reference_pipe.image_processor.preprocess(image)
    assert x.shape == expected_x.shape == (1, 3, 64, 96)
    assert_rel(x, expected_x, 1e-6, "preprocess")
    assert_rel(tiny_pipe.image_processor.preprocess(image, height=32, width=48),
               reference_pipe.image_processor.preprocess(image, height=32, width=48), 1e-6, "preprocess to a size")
    x = torch.cat([x, x.flip(-1)]).to(tiny_pipe.vae.dtype)
    ours, ref = tiny_pipe.vae.encode(x).latent_dist, reference_pipe.vae.encode(x).latent_dist

    def scale(pipe, z):
        return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    assert_rel(scale(tiny_pipe, ours.mode()), scale(reference_pipe, ref.mode()), 1e-5, "mode")
    for seeds in ((3,), (4, 5), None):  # one generator, a list (one row each), none (the global RNG)
        if seeds is None:
            torch.manual_seed(7)
            got = ours.sample()
            torch.manual_seed(7)
            want = ref.sample()
        else:
            got = ours.sample(gens(*seeds) if len(seeds) > 1 else gens(*seeds)[0])
            want = ref.sample(gens(*seeds) if len(seeds) > 1 else gens(*seeds)[0])
        assert_rel(got, want, 1e-5, f"posterior sample {seeds}")
    assert_rel(ours.sample(gens(3)), ref.sample(gens(3)), 1e-5, "a list of one generator")
    for name in ("mean", "logvar", "std", "var"):
        assert_rel(getattr(ours, name), getattr(ref, name), 1e-5, name)
    posterior, = tiny_pipe.vae.encode(x, return_dict=False)
    expected, = reference_pipe.vae.encode(x, return_dict=False)
    assert_rel(posterior.sample(gens(3)[0]), expected.sample(gens(3)[0]), 1e-5, "return_dict=False")
    mean, logvar = tiny_pipe.vae.encode(x)  # the engine's own form still unpacks
    assert torch.equal(mean, ours.mean) and torch.equal(logvar, ours.logvar)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        ours.sample(gens(1, 2, 3))


def test_diffusers_pipeline_and_vae_attributes(tiny_pipe, reference_pipe):
    for name in ("_execution_device", "device", "dtype", "vae_scale_factor"):
        assert getattr(tiny_pipe, name) == getattr(reference_pipe, name), name
    assert tiny_pipe.image_processor.vae_scale_factor == reference_pipe.image_processor.config.vae_scale_factor == 16
    for name in ("dtype", "device"):
        assert getattr(tiny_pipe.vae, name) == getattr(reference_pipe.vae, name), name
    for name in ("scaling_factor", "shift_factor"):
        assert getattr(tiny_pipe.vae.config, name) == getattr(reference_pipe.vae.config, name), name


@torch.no_grad()
def test_a_copied_pickled_or_compiled_vae_keeps_diffusers_forms(tiny_model_dir):
    """The forms are the VAE class's own: a deep copy, a pickle (torch.save) and a compiled decode
    (optimize(vae_compile=True)) take them, and a copy decodes with its own weights."""
    from zimage_native.accel.vae import CompiledDecode

    from .fixtures import our_pipeline

    torch._dynamo.reset()
    pipe = our_pipeline(tiny_model_dir)
    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    eager = pipe.vae.decode(z, return_dict=False)[0]
    posterior = pipe.vae.encode(x).latent_dist
    buffer = io.BytesIO()
    torch.save(pipe.vae, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(pipe.vae), torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(pipe.vae))):
        assert torch.equal(other.decode(z).sample, eager) and torch.equal(other.decode(z, return_dict=False)[0], eager)
        assert torch.equal(other.encode(x).latent_dist.mode(), posterior.mean)
    twin = copy.deepcopy(pipe.vae)
    for p in twin.parameters():
        p.mul_(0.5)
    assert not torch.allclose(twin.decode(z).sample, eager)
    pipe.optimize(vae_compile=True, compile_backend="aot_eager")
    assert isinstance(pipe.vae.__dict__["decode"], CompiledDecode)
    assert_rel(pipe.vae.decode(z, return_dict=False)[0], eager, 1e-5, "compiled, return_dict=False")
    assert_rel(pipe.vae.decode(z).sample, eager, 1e-5, "compiled, .sample")
    assert_rel(pipe.vae.decode(z)[0], eager, 1e-5, "compiled, [0]")
    compiled_copy = copy.deepcopy(pipe.vae)
    assert_rel(compiled_copy.decode(z).sample, eager, 1e-5, "a copy of the compiled VAE")
    assert_rel(copy.deepcopy(pipe).vae.decode(z, return_dict=False)[0], eager, 1e-5, "a copied pipeline's VAE")
