"""A new user's typical slips with the Python library (diffusers habits included), each refused in one
line that names the problem and what to give instead, before any model runs: not a TypeError from
deep inside the run, a shape error in the DiT, or a request silently run otherwise."""

from __future__ import annotations

import contextlib

import pytest

SMALL = dict(width=32, height=32, num_inference_steps=1)


@contextlib.contextmanager
def no_model_runs(pipe):
    """Fails the test if the text encoder or the DiT runs inside the block."""
    def refuse(module, args):
        raise AssertionError(f"{type(module).__name__} ran before the request was refused")

    handles = [pipe.text_encoder.model.register_forward_pre_hook(refuse),
               pipe.transformer.register_forward_pre_hook(refuse)]
    for block in pipe.transformer.noise_refiner:
        handles.append(block.register_forward_pre_hook(refuse))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "5"])
def test_a_guidance_scale_that_is_not_a_finite_number_is_refused(tiny_pipe, scale):
    """NaN compared as "not > 0" and the run went on without CFG, silently; inf ran and then failed with
    a NaN error blaming damaged weights; a string failed with "'<' not supported between ..."."""
    with no_model_runs(tiny_pipe), pytest.raises(
            ValueError, match=r"^guidance_scale must be >= 0, a finite number \(0 turns CFG off\), got "):
        tiny_pipe("a cat", **SMALL, guidance_scale=scale)


@pytest.mark.parametrize("generator, hint", [(5, "5; for a seed, give seed=5$"), ("cuda", "'cuda'$"), ([], r"\[\]$")])
def test_a_generator_that_is_not_a_torch_generator_is_refused(tiny_pipe, generator, hint):
    """generator=5 (a seed where diffusers takes a torch.Generator) failed with "'int' object is not
    iterable" where the noise is drawn; an empty list with an IndexError."""
    with no_model_runs(tiny_pipe), pytest.raises(
            TypeError, match=r"^generator must be a torch\.Generator or a list of them \(one per image\), got " + hint):
        tiny_pipe("a cat", **SMALL, generator=generator)


def test_loaded_components_given_to_from_pretrained_are_refused_saying_what_to_give(tiny_model_dir, tiny_pipe):
    """diffusers' from_pretrained(..., vae=vae) passes a built module; here the component options are
    paths, and a module failed inside pathlib: "expected str, bytes or os.PathLike object, not
    AutoencoderKL". An engine VAE can be assigned after loading (pipe.vae = vae)."""
    from zimage_native import ZImagePipeline

    with pytest.raises(TypeError, match=r"^from_pretrained\(vae=AutoencoderKL\(\.\.\.\)\): vae= takes the path of a "
                                        r"file or folder here, not a loaded object; load without it and assign it, "
                                        r"pipe\.vae = vae"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", vae=tiny_pipe.vae)
    with pytest.raises(TypeError, match=r"^from_pretrained\(tokenizer=\w+\(\.\.\.\)\): .*give the "
                                        r"path of its files"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", tokenizer=tiny_pipe.tokenizer)
    with pytest.raises(TypeError, match=r"^from_single_files\(transformer=ZImageTransformer\(\.\.\.\)\): "):
        ZImagePipeline.from_single_files(transformer=tiny_pipe.transformer, vae=tiny_model_dir / "vae")
