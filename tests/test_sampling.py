"""The sampling core: one request type, the call habits diffusers users expect (output_type "pt",
numpy / torch image inputs, prompt_embeds, callback_on_step_end), one text-encoder call per request."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from zimage_native.sampling import GenerationRequest, task_name

from .test_generation import make_image
from .utils import assert_rel, rel_err


@pytest.fixture(scope="module")
def reference_img2img(reference_pipe):
    import diffusers

    pipe = diffusers.ZImageImg2ImgPipeline(**reference_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_request_is_frozen_and_names_its_task():
    r = GenerationRequest(prompt="a cat", seeds=[1, 2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.width = 64
    assert r.n == 2 and r.task == "txt2img"
    assert task_name(dataclasses.replace(r, image=object())) == "img2img"
    assert task_name(dataclasses.replace(r, image=object(), mask_image=object())) == "inpaint"
    assert task_name(dataclasses.replace(r, control_image=object())) == "control"
    assert GenerationRequest(prompt=["a", "b"], seeds=[1, 2]).n == 1  # one seed per prompt
    assert r.params() == {"prompt": "a cat", "seeds": [1, 2], "cfg_normalization": 0.0, "cfg_truncation": 1.0,
                          "max_sequence_length": 512, "n": 2, "img2img": False}


def test_pipeline_call_and_generate_agree(tiny_pipe):
    kw = dict(height=32, width=48, num_inference_steps=2, output_type="latent", guidance_scale=2.0)
    direct = tiny_pipe("a cat", seed=3, **kw).images
    request = GenerationRequest(prompt="a cat", seeds=[3], height=32, width=48, steps=2, guidance_scale=2.0,
                                output_type="latent")
    assert torch.equal(tiny_pipe.generate(request).images, direct)


def test_output_type_pt_matches_diffusers(tiny_pipe, reference_pipe):
    kw = dict(height=48, width=32, num_inference_steps=2, guidance_scale=0.0)
    expected = reference_pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    got = tiny_pipe("a cat", seed=0, output_type="pt", **kw).images
    assert isinstance(got, torch.Tensor) and got.shape == (1, 3, 48, 32) == expected.shape
    assert_rel(got, expected, 1e-5, "pt images")
    as_np = tiny_pipe("a cat", seed=0, output_type="np", **kw).images
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), as_np)


@pytest.mark.parametrize("kind", ["numpy", "numpy batch", "torch", "torch list"])
def test_array_and_tensor_images_match_diffusers(tiny_pipe, reference_img2img, kind):
    pil = make_image(83, 50)  # not a multiple of 16: resized (nearest) to 80x48, as diffusers does
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    image = {"numpy": arr, "numpy batch": arr[None], "torch": torch.from_numpy(arr).permute(2, 0, 1)[None],
             "torch list": [torch.from_numpy(arr).permute(2, 0, 1)]}[kind]
    kw = dict(strength=0.7, num_inference_steps=4, output_type="latent")
    expected = reference_img2img("a cat", image=image, generator=torch.Generator().manual_seed(2), guidance_scale=0.0,
                                 **kw).images
    got = tiny_pipe.img2img("a cat", image, seed=2, **kw).images
    assert_rel(got, expected, 1e-5, f"img2img from a {kind} image")


def test_prompt_embeds_match_diffusers(tiny_pipe, reference_pipe):
    embeds = tiny_pipe.encode_prompt(["a cat", "two dogs on a sofa"])
    negative = tiny_pipe.encode_prompt(["blurry", ""])
    kw = dict(height=32, width=32, num_inference_steps=3, guidance_scale=2.5, output_type="latent")
    expected = reference_pipe(prompt_embeds=list(embeds), negative_prompt_embeds=list(negative),
                              generator=torch.Generator().manual_seed(1), **kw).images
    got = tiny_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, seed=1, **kw)
    assert_rel(got.images, expected, 1e-5, "prompt_embeds")
    from_text = tiny_pipe(["a cat", "two dogs on a sofa"], negative_prompt=["blurry", ""], seed=1, **kw).images
    assert rel_err(got.images, from_text) < 1e-6
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        tiny_pipe(prompt_embeds=embeds, **kw)
    with pytest.raises(ValueError, match="not both"):
        tiny_pipe("a cat", prompt_embeds=embeds, **kw)


def test_an_empty_negative_list_is_no_negatives_without_cfg(tiny_model_dir, reference_pipe, caplog):
    """diffusers' encode_prompt(..., do_classifier_free_guidance=False) returns [] as the negative
    embeddings, and scripts pass both on: with CFG off that is none given (it was refused as "must be
    a non-empty list"), and no advice that a negative prompt is unused; with CFG on it is refused
    naming the fix (diffusers fails there with a bare AssertionError)."""
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    embeds, negative = reference_pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    assert negative == []
    kw = dict(height=32, width=32, num_inference_steps=3, output_type="latent")
    expected = reference_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=0.0,
                              generator=torch.Generator().manual_seed(1), **kw).images
    with caplog.at_level("WARNING", logger="zimage_native.sampling"):
        got = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=0.0, seed=1, **kw).images
        from_text = pipe("a cat", negative_prompt_embeds=(), guidance_scale=0.0, seed=1, **kw).images
    assert "negative prompt is not used" not in caplog.text
    assert_rel(got, expected, 1e-5, "prompt_embeds with negative_prompt_embeds=[]")
    assert torch.equal(from_text, pipe("a cat", guidance_scale=0.0, seed=1, **kw).images)
    for given in (dict(prompt_embeds=embeds), dict(prompt="a cat")):
        with pytest.raises(ValueError, match=r"negative_prompt_embeds=\[\] holds no negative embeddings .* "
                                             r"guidance_scale 2.0 turns CFG on"):
            pipe(**given, negative_prompt_embeds=[], guidance_scale=2.0, **kw)


def test_prompt_embeds_of_the_wrong_form_are_refused_by_name(tiny_pipe):
    """A (B, L, D) tensor (other pipelines' form) and features of another width are refused before
    any model runs, naming the argument, for the negative embeddings too (they crashed inside the
    run: "Boolean value of Tensor ... is ambiguous", a shape mismatch in the DiT)."""
    embeds = tiny_pipe.encode_prompt(["a cat"])
    kw = dict(height=32, width=32, num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match=r"prompt_embeds must be a list .* shape \(1, \d+, 48\).*list\(tensor\)"):
        tiny_pipe(prompt_embeds=embeds[0][None], guidance_scale=0.0, **kw)
    with pytest.raises(ValueError, match="negative_prompt_embeds must be a list"):
        tiny_pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds[0][None], guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match=r"prompt_embeds\[0\] must be a \(tokens, features\) tensor, got shape "
                                         r"\(1, \d+, 48\)"):  # a list of (1, L, D) tensors
        tiny_pipe(prompt_embeds=[embeds[0][None]], guidance_scale=0.0, **kw)
    with pytest.raises(ValueError, match=r"prompt_embeds\[1\] must be a \(tokens, features\) tensor, got str"):
        tiny_pipe(prompt_embeds=[embeds[0], "a dog"], guidance_scale=0.0, **kw)
    with pytest.raises(ValueError, match="prompt_embeds hold 7 features per token, the DiT takes 48"):
        tiny_pipe(prompt_embeds=[torch.randn(5, 7)], guidance_scale=0.0, **kw)
    with pytest.raises(ValueError, match="negative_prompt_embeds hold 7 features"):
        tiny_pipe("a cat", negative_prompt_embeds=[torch.randn(5, 7)], guidance_scale=2.0, **kw)
    assert tiny_pipe(prompt_embeds=list(embeds[0][None]), guidance_scale=0.0, **kw).images.shape == (1, 16, 4, 4)


def test_callback_on_step_end_reads_and_replaces_latents_like_diffusers(tiny_pipe, reference_pipe):
    def make_callback(seen):
        def callback(pipe, i, t, tensors):
            seen.append((i, float(t), tuple(tensors["latents"].shape)))
            return {"latents": tensors["latents"] * 0.5} if i == 1 else {}
        return callback

    kw = dict(height=32, width=32, num_inference_steps=4, guidance_scale=0.0, output_type="latent")
    ref_seen, seen = [], []
    expected = reference_pipe("a cat", generator=torch.Generator().manual_seed(5),
                              callback_on_step_end=make_callback(ref_seen), **kw).images
    got = tiny_pipe("a cat", seed=5, callback_on_step_end=make_callback(seen), **kw).images
    assert seen == ref_seen and len(seen) == 4
    assert_rel(got, expected, 1e-5, "latents replaced mid-run")
    assert rel_err(got, tiny_pipe("a cat", seed=5, **kw).images) > 0.01  # the replacement took effect
    with pytest.raises(ValueError, match="prompt_embeds"):
        tiny_pipe("a cat", seed=5, callback_on_step_end=lambda p, i, t, d: {"prompt_embeds": []},
                  callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        tiny_pipe("a cat", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["mask"], **kw)


def test_negative_prompts_are_encoded_in_the_same_call(tiny_pipe, monkeypatch):
    """CFG encodes positives and negatives in one text-encoder batch; the features equal separate encodes."""
    from zimage_native.text_encoder import PromptCache

    monkeypatch.setattr(tiny_pipe, "prompt_cache", PromptCache())  # this batch not cached by an earlier test
    te = tiny_pipe.text_encoder
    calls = []
    real = te.encode
    monkeypatch.setattr(te, "encode", lambda texts, *a, **k: calls.append(list(texts)) or real(texts, *a, **k))
    out = tiny_pipe(["a cat", "a long prompt about two dogs on a red sofa"], negative_prompt=["blurry", ""],
                    guidance_scale=2.0, height=32, width=32, num_inference_steps=2, seed=0, output_type="latent")
    assert len(calls) == 1 and len(calls[0]) == 4
    monkeypatch.setattr(te, "encode", real)
    joint = real(calls[0], 512)
    separate = real(calls[0][:2], 512) + real(calls[0][2:], 512)
    for a, b in zip(joint, separate):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    assert out.info["token_counts"] == [int(f.shape[0]) for f in joint[:2]]


def test_one_negative_prompt_serves_a_batch_of_prompts(tiny_pipe):
    """A single negative string with several prompts (the CLI's --negative-prompt with --batch-size)
    is that negative for each prompt; a list of the wrong length is refused."""
    kw = dict(guidance_scale=2.0, height=32, width=32, num_inference_steps=2, seed=[3, 4], output_type="latent")
    prompts = ["a cat", "a long prompt about two dogs on a red sofa"]
    one = tiny_pipe(prompts, negative_prompt="blurry", **kw).images
    each = tiny_pipe(prompts, negative_prompt=["blurry", "blurry"], **kw).images
    other = tiny_pipe(prompts, negative_prompt=["blurry", "sharp"], **kw).images
    assert torch.equal(one, each) and not torch.equal(one[1], other[1])
    with pytest.raises(ValueError, match="got 3 negative prompts for 2 prompts"):
        tiny_pipe(prompts, negative_prompt=["a", "b", "c"], **kw)


def test_sigmas_set_the_recorded_step_count(tiny_pipe):
    """With ``sigmas=`` the run has one step per sigma (diffusers ignores num_inference_steps then):
    the metadata records that count, not the variant's default or a conflicting argument."""
    kw = dict(height=32, width=32, seed=1, output_type="latent", sigmas=[1.0, 0.6, 0.3])
    steps = []
    out = tiny_pipe("a cat", callback=lambda k, n: steps.append(n), **kw)
    assert out.info["steps"] == 3 and steps == [3, 3, 3]
    assert tiny_pipe("a cat", num_inference_steps=8, **kw).info["steps"] == 3


def test_numpy_integers_are_taken_and_seeds_are_checked(tiny_pipe):
    """Sizes, step counts and seeds from numpy arrays work as ints (diffusers takes them); a seed
    that is a float, a bool, negative (the CLI's "random" -1) or past 64 bits is refused, not turned
    into another seed; a seed list alone sets the images per prompt."""
    kw = dict(output_type="latent", num_inference_steps=np.int64(2))
    got = tiny_pipe("a cat", width=np.int64(32), height=np.int32(32), seed=np.int64(3), **kw)
    assert got.seeds == [3] and type(got.seeds[0]) is int
    assert torch.equal(got.images, tiny_pipe("a cat", width=32, height=32, seed=3, **kw).images)
    assert tiny_pipe("a cat", width=32, height=32, seed=[1, 2], **kw).images.shape[0] == 2
    for bad in (-1, 1.5, True, 2**64):
        with pytest.raises(ValueError, match="a seed must be an integer in"):
            tiny_pipe("a cat", width=32, height=32, seed=bad, **kw)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        tiny_pipe("a cat", width=32.0, height=32, **kw)


def test_numpy_and_tensor_settings_are_recorded_as_plain_numbers(tiny_pipe):
    """Number settings given as numpy scalars or 0-d tensors run as the same floats, and ``out.info``
    holds them as plain Python numbers: the PNG writer and the server serialise it to JSON."""
    from zimage_native.metadata import image_record, png_info

    kw = dict(height=32, width=32, seed=1, num_inference_steps=2, output_type="latent")
    plain = dict(guidance_scale=1.5, shift=2.5, cfg_truncation=0.9, cfg_normalization=1.2, seed_variance=10.0,
                 seed_variance_share=0.25, seed_variance_steps=0.5, first_block_cache=0.1)
    for wrap in (np.float32, np.float64, torch.tensor, np.array):
        given = {k: wrap(v) for k, v in plain.items()}
        out = tiny_pipe("a cat", **kw, **given)
        want = tiny_pipe("a cat", **kw, **{k: float(wrap(v)) for k, v in plain.items()})
        assert torch.equal(out.images, want.images)
        numbers = {k: v for k, v in out.info.items() if k in plain}
        assert numbers and all(type(v) is float for v in numbers.values()), numbers
        assert json.loads(json.dumps(out.info)) == out.info
        png_info(image_record(out.info, 0))
    image = np.full((32, 32, 3), 0.5, dtype=np.float32)
    out = tiny_pipe("a cat", image=image, strength=np.float32(0.75), **kw)
    assert type(out.info["strength"]) is float and out.info["strength"] == float(np.float32(0.75))
    with pytest.raises(ValueError, match="cfg_truncation must be a number"):
        tiny_pipe("a cat", cfg_truncation="0.5", **kw)


def test_the_image_record_holds_its_own_prompts_negative_prompt(tiny_pipe):
    """With one negative prompt per prompt, each image's record holds its prompt's (it held the whole
    list, which --from-image cannot take as --negative-prompt)."""
    from zimage_native.metadata import image_record, parameters_text

    out = tiny_pipe(["a cat", "a dog"], negative_prompt=["blurry", "dark"], guidance_scale=2.0, width=32, height=32,
                    num_inference_steps=1, seed=[1, 2], output_type="latent")
    records = [image_record(out.info, k, k) for k in range(2)]
    assert [(r["prompt"], r["negative_prompt"], r["seed"]) for r in records] == [("a cat", "blurry", 1),
                                                                                 ("a dog", "dark", 2)]
    assert "Negative prompt: dark\n" in parameters_text(records[1])


def test_strength_without_an_image_is_refused(tiny_pipe):
    """strength belongs to img2img and inpainting: text to image refuses it rather than ignoring it."""
    with pytest.raises(ValueError, match="strength needs image="):
        tiny_pipe("a cat", strength=0.5, width=32, height=32, num_inference_steps=1)


def test_cfg_on_turbo_is_advised_once_per_value(tiny_model_dir, caplog):
    """Turbo is distilled without CFG; guidance 1 is most often ComfyUI's "cfg 1" (off there) and here
    doubles the forwards. A warning, once per pipeline and value; none for 0 or for the base model."""
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32, variant="turbo")
    kw = dict(height=32, width=32, num_inference_steps=1, seed=0, output_type="latent", progress=False)
    with caplog.at_level("WARNING", logger="zimage_native.sampling"):
        pipe("a cat", **kw)
        pipe("a cat", guidance_scale=1.0, **kw)
        pipe("a dog", guidance_scale=1.0, **kw)
        pipe("a cat", guidance_scale=2.5, **kw)
    notes = [r.getMessage() for r in caplog.records if "classifier-free guidance" in r.getMessage()]
    assert len(notes) == 2
    assert notes[0].startswith("guidance_scale 1 turns classifier-free guidance on") and "cfg 1 means off" in notes[0]
    assert notes[1].startswith("guidance_scale 2.5 turns classifier-free guidance on for Z-Image-Turbo")
    caplog.clear()
    base = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32, variant="base")
    with caplog.at_level("WARNING", logger="zimage_native.sampling"):
        base("a cat", guidance_scale=1.0, **kw)
    assert "classifier-free guidance" not in caplog.text


def test_a_negative_prompt_without_cfg_is_advised_once(tiny_model_dir, caplog):
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    kw = dict(height=32, width=32, num_inference_steps=1, seed=0, output_type="latent", progress=False)
    with caplog.at_level("WARNING", logger="zimage_native.sampling"):
        pipe("a cat", **kw)
        pipe("a cat", negative_prompt="", **kw)
        assert "negative prompt is not used" not in caplog.text
        pipe("a cat", negative_prompt="blurry", **kw)
        pipe("a dog", negative_prompt="text", **kw)
        pipe("a cat", negative_prompt="blurry", guidance_scale=2.0, **kw)
    notes = [r.getMessage() for r in caplog.records if "negative prompt is not used" in r.getMessage()]
    assert len(notes) == 1 and "guidance_scale 0" in notes[0]


def test_nine_steps_on_turbo_is_advised_once(tiny_model_dir, caplog):
    """The model card's 9 (8 forwards in older diffusers) is 9 forwards here, as in diffusers 0.42.1."""
    from zimage_native import ZImagePipeline

    kw = dict(height=32, width=32, seed=0, output_type="latent", progress=False)
    for variant, expected in (("turbo", 1), ("base", 0)):
        pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32, variant=variant)
        caplog.clear()
        with caplog.at_level("WARNING", logger="zimage_native.sampling"):
            for steps in (8, 9, 9):
                pipe("a cat", num_inference_steps=steps, guidance_scale=0.0, **kw)
        assert sum("9 steps run 9 DiT forwards" in r.getMessage() for r in caplog.records) == expected, variant


class HostReads:
    """A dispatch mode that records every ATen op reading a tensor's value on the host (``.item()``,
    ``bool(t)``, ``float(t)``, ``nonzero``, ...) or building a tensor from host data: on a GPU each
    is a synchronisation (or a host-to-device copy) that stalls the queue, the CPU stand-in of
    ``torch.cuda.set_sync_debug_mode("error")``."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from .graph_standins import HOST_DATA, HOST_READS

        reads = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split("::")[-1]
                if name in HOST_READS or name in HOST_DATA:
                    reads.append(name)
                return func(*args, **(kwargs or {}))

        self.mode, self.reads = Mode(), reads


def test_the_eager_step_loop_reads_nothing_on_the_host(fresh_pipe, monkeypatch):
    """Each step of the eager loop (no CUDA graphs, first-block cache off) queues tensor work only:
    no host read per step, whatever the task or option, with a progress bar and a callback on.
    A read would make the host wait for the GPU once per step."""
    import zimage_native.sampling as sampling

    calls = []
    run_steps = sampling.run_steps

    def watched(*args, **kwargs):
        host = HostReads()
        with host.mode:
            out = run_steps(*args, **kwargs)
        calls.append(list(host.reads))
        return out

    monkeypatch.setattr(sampling, "run_steps", watched)
    fresh_pipe.progress = True
    image = make_image(32, 32)
    mask = np.zeros((32, 32), dtype=np.float32)
    mask[:, 16:] = 1
    steps = []
    kw = dict(height=32, width=32, num_inference_steps=3, seed=0, output_type="latent",
              callback=lambda k, n: steps.append(k))
    for extra in ({}, {"guidance_scale": 3.0, "cfg_truncation": 0.5, "cfg_normalization": True},
                  {"image": image, "strength": 0.8}, {"image": image, "mask_image": mask, "strength": 0.9},
                  {"seed_variance": 20.0}):
        fresh_pipe("a cat", **kw, **extra)
    assert len(calls) == 5 and steps, "the step loop did not run"
    assert calls == [[]] * 5, calls
