"""A new user's typical slips with the Python library (diffusers habits included), each refused in one
line that names the problem and what to give instead, before any model runs: not a TypeError from
deep inside the run, a shape error in the DiT, or a request silently run otherwise."""

from __future__ import annotations

import contextlib
import re
import logging

import numpy as np
import pytest
import torch
from PIL import Image

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


def test_callbacks_that_cannot_take_their_arguments_are_refused_before_any_model_runs(tiny_pipe):
    """A step-end callback of another signature, diffusers' legacy callback(step, timestep, latents) given
    as callback=, or a callback that is not a function failed with Python's TypeError from inside the
    first step, after the prompt was encoded and a DiT step ran."""
    def three(pipe, step, timestep):
        return {}

    def legacy(step, timestep, latents):
        pass

    with no_model_runs(tiny_pipe):
        with pytest.raises(TypeError, match=r"^callback_on_step_end: .*three\(pipe, step, timestep\) cannot take the "
                                            r"arguments it is called with; it is called as fn\(pipe, step, timestep, "
                                            r"callback_kwargs\), returning a dict"):
            tiny_pipe("a cat", **SMALL, callback_on_step_end=three)
        with pytest.raises(TypeError, match=r"^callback: .*legacy\(step, timestep, latents\) cannot take the "
                                            r"arguments .* fn\(step, total\) after each step; diffusers' "
                                            r"callback\(step, timestep, latents\) is callback_on_step_end="):
            tiny_pipe("a cat", **SMALL, callback=legacy)
        with pytest.raises(TypeError, match=r"^callback_on_step_end must be a function called as fn\(pipe, step, "
                                            r"timestep, callback_kwargs\).*, got str$"):
            tiny_pipe("a cat", **SMALL, callback_on_step_end="print")
    # Signatures that take the arguments run: *args, defaults, a callable object, a bound method.
    calls = []

    class Hook:
        def __call__(self, pipe, step, timestep, callback_kwargs, extra=None):
            calls.append(step)
            return callback_kwargs

    tiny_pipe("a cat", **SMALL, seed=0, callback_on_step_end=Hook(), callback=lambda *a: calls.append(a))
    tiny_pipe("a cat", **SMALL, seed=0, callback_on_step_end=lambda *a: None)
    assert calls == [0, (1, 1)]


def test_step_end_latents_of_another_shape_are_refused_naming_both_shapes(tiny_pipe):
    """Latents of another shape returned by callback_on_step_end reached the DiT at the next step and
    failed there: "mat1 and mat2 shapes cannot be multiplied (32x32 and 64x64)"."""
    def halve(pipe, step, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"][:, :8]}

    with pytest.raises(ValueError, match=r"^callback_on_step_end returned latents of shape \(1, 8, 4, 4\) after step "
                                         r"1; they replace the run's latents, of shape \(1, 16, 4, 4\): return a "
                                         r"tensor of that shape"):
        tiny_pipe("a cat", width=32, height=32, num_inference_steps=2, seed=0, callback_on_step_end=halve)
    with pytest.raises(ValueError, match=r"^callback_on_step_end returned latents of ndarray after step 1"):
        tiny_pipe("a cat", width=32, height=32, num_inference_steps=2, seed=0,
                  callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"].numpy()})


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


def test_a_dtype_given_where_the_device_goes_is_refused_saying_to_name_it(tiny_model_dir):
    """from_pretrained(path, torch.bfloat16) (the dtype positionally, where the device goes) failed with
    torch's five-line "device() received an invalid combination of arguments - got (torch.dtype)"."""
    from zimage_native import ZImagePipeline

    with pytest.raises(TypeError, match=r"^a dtype \(torch\.bfloat16\) was given where the device goes: give it by "
                                        r"name, dtype=torch\.bfloat16 \(or torch_dtype=\), and the device as "
                                        r"device='cuda' / 'cpu' \(or leave it out: auto\)$"):
        ZImagePipeline.from_pretrained(tiny_model_dir, torch.bfloat16)


@pytest.mark.parametrize("count, prompts, n", [(2, 1, 1), (3, 2, 1), (2, 1, 3)])
def test_a_generator_list_of_another_length_than_the_batch_is_refused_before_encoding(tiny_pipe, count, prompts, n):
    """generator=[...] of another length than the images was refused only where the noise is drawn,
    after the prompts were encoded, and without saying what to give."""
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    with no_model_runs(tiny_pipe), pytest.raises(
            ValueError, match=rf"^got {count} generators for {prompts * n} images: give one generator or one per "
                              r"image \(the prompts times num_images_per_prompt\)$"):
        tiny_pipe(["a cat"] * prompts, **SMALL, num_images_per_prompt=n, generator=generators)
    # One, or one per image, runs (a list of one is the one generator, as in diffusers).
    for given in ([generators[0]], generators[:1] * prompts * n):
        assert len(tiny_pipe(["a cat"] * prompts, **SMALL, num_images_per_prompt=n, generator=given).images) == prompts * n


def test_a_module_method_on_the_text_encoder_says_where_the_module_is(tiny_pipe):
    """diffusers' pipe.text_encoder is the Qwen3 module; here it is the tokenizer and module together,
    and pipe.text_encoder.to(torch.bfloat16) / .parameters() failed with a bare "'TextEncoder' object has
    no attribute 'to'". The message names pipe.text_encoder.model and the pipeline's placement; other
    names, copies and pickling are as before."""
    import copy
    import pickle

    te = tiny_pipe.text_encoder
    for name in ("to", "parameters", "half", "state_dict"):
        with pytest.raises(AttributeError, match=rf"^'TextEncoder' object has no attribute '{name}': pipe\.text_encoder "
                                                 r"is the tokenizer and the Qwen3 module together, the module is "
                                                 r"pipe\.text_encoder\.model; its device and dtype are the pipeline's"):
            getattr(te, name)
    with pytest.raises(AttributeError, match=r"^'TextEncoder' object has no attribute 'nothing_here'$"):
        te.nothing_here
    assert not hasattr(te, "__nothing__") and te.dtype == torch.float32
    for again in (copy.deepcopy(te), pickle.loads(pickle.dumps(te))):
        assert torch.equal(again.encode(["a cat"])[0], te.encode(["a cat"])[0])


def test_diffusers_shortcuts_to_the_dit_channels_and_the_qwen3_config(tiny_pipe, reference_pipe):
    """diffusers' pipe.transformer.in_channels / out_channels (its Z-Image pipelines size the latents
    so) and pipe.text_encoder.config were AttributeErrors. They read the configs held; the Qwen3
    config is the built module's, one layer short of diffusers' (the last layer is never read)."""
    dit, ref_dit = tiny_pipe.transformer, reference_pipe.transformer
    assert (dit.in_channels, dit.out_channels) == (ref_dit.in_channels, ref_dit.out_channels)
    assert dit.in_channels == dit.config.in_channels and dit.in_channels != dit.config.patch_dim
    config, ref_config = tiny_pipe.text_encoder.config, reference_pipe.text_encoder.config
    assert config is tiny_pipe.text_encoder.model.config and type(config) is type(ref_config)
    ours, theirs = config.to_dict(), ref_config.to_dict()
    assert {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)} == {"num_hidden_layers",
                                                                                         "layer_types"}
    assert config.num_hidden_layers == len(tiny_pipe.text_encoder.model.layers) == ref_config.num_hidden_layers - 1


def test_an_image_given_as_a_path_says_to_open_it(tiny_pipe, tmp_path):
    """img2img / inpaint with image="in.png" (a path, where diffusers' users call load_image first) was
    refused naming only the type, "got str"; it now says to open it, before any model runs."""
    from pathlib import Path

    from PIL import Image

    picture = Image.new("RGB", (32, 32))
    for path in (str(tmp_path / "in.png"), tmp_path / "in.png"):
        with no_model_runs(tiny_pipe), pytest.raises(
                ValueError, match=r"^image must be a PIL image, .* got a path \('.*in\.png'\): open it first, "
                                  r"image=PIL\.Image\.open\(path\)$"):
            tiny_pipe.img2img("a cat", image=path, strength=0.6, num_inference_steps=1)
    with no_model_runs(tiny_pipe), pytest.raises(ValueError, match=r"got a path .* mask_image=PIL\.Image\.open"):
        tiny_pipe.inpaint("a cat", image=picture, mask_image=Path("mask.png"), num_inference_steps=1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True, [0.5, float("nan")]])
def test_a_lora_scale_that_is_not_a_finite_number_is_refused_before_any_weight_changes(fresh_pipe, tmp_path, scale):
    """load_lora(path, scale=nan) fused NaN into the DiT's weights, and every later image failed with a
    NonFiniteError; scale="0.5" was read one character at a time ("could not convert string to float:
    '.'"). Refused now, naming the value, with the weights untouched."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "lora.safetensors"
    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(4, 64, generator=g) * 0.1,
               "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(64, 4, generator=g) * 0.1}, path)
    before = fresh_pipe.transformer.layers[0].attention.to_q.weight.clone()
    paths = [path, path] if isinstance(scale, list) else path
    with pytest.raises(ValueError, match=r"^load_lora: scale must be a finite number \(or, for a list of LoRAs, one "
                                         r"per LoRA\), got "):
        fresh_pipe.load_lora(paths, scale=scale)
    assert torch.equal(fresh_pipe.transformer.layers[0].attention.to_q.weight, before) and not fresh_pipe.loras
    fresh_pipe.load_lora(path, scale=0.5)  # a number runs
    assert fresh_pipe.loras[0].scale == 0.5


@pytest.mark.parametrize("scale, want", [
    (torch.tensor(0.5), [0.5]), (np.array(0.5), [0.5]),
    ([torch.tensor(0.5), torch.tensor(0.25)], [0.5, 0.25]), ([np.array(0.5), np.float32(0.25)], [0.5, 0.25]),
    (torch.tensor([0.5, 0.25]), [0.5, 0.25])])
def test_lora_scales_given_as_0d_tensors_or_arrays_load_as_their_numbers(fresh_pipe, tmp_path, scale, want):
    """load_lora(paths, scale=[torch.tensor(0.5), ...]) loaded at those numbers before the finite-number
    check came, and was refused by it ("got tensor(0.5000)"); a single 0-d tensor or array failed with
    "iteration over a 0-d tensor". Each one-value tensor or array is read as its number: the weights
    are those of the same load with Python floats, bit for bit."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "lora.safetensors"
    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(4, 64, generator=g) * 0.1,
               "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(64, 4, generator=g) * 0.1}, path)
    paths = path if len(want) == 1 else [path] * len(want)
    fresh_pipe.load_lora(paths, scale=want[0] if len(want) == 1 else want)
    expected = fresh_pipe.transformer.layers[0].attention.to_q.weight.clone()
    fresh_pipe.unload_lora()
    fresh_pipe.load_lora(paths, scale=scale)
    assert [r.scale for r in fresh_pipe.loras] == want and all(type(r.scale) is float for r in fresh_pipe.loras)
    assert torch.equal(fresh_pipe.transformer.layers[0].attention.to_q.weight, expected)


def test_an_input_image_off_the_16_grid_runs_rounded_down_with_one_warning_saying_how_to_choose(tiny_pipe, caplog):
    """img2img and inpainting with a 33x31 image ran at 32x16 without a word (diffusers rounds down
    the same way): the size is kept, and one warning names both sizes and width= / height=."""
    from PIL import Image

    image, mask = Image.new("RGB", (33, 31), (200, 10, 10)), Image.new("L", (33, 31), 255)
    said = ("image is 33x31, whose sides are not all multiples of 16: the run uses 32x16 (rounded down, as diffusers "
            "does); give width= and height= (multiples of 16, e.g. width=32, height=32) to choose the size the image "
            "is resized to")
    for extra in ({"strength": 0.5}, {"mask_image": mask}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="zimage_native"):
            out = tiny_pipe("a cat", image=image, num_inference_steps=2, seed=1, **extra)
        assert out.images[0].size == (32, 16)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [said]
    for size, extra in (((33, 31), {"width": 32, "height": 32}), ((32, 48), {})):  # chosen, or on the grid: quiet
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="zimage_native"):
            out = tiny_pipe("a cat", image=Image.new("RGB", size), strength=0.5, num_inference_steps=2, seed=1, **extra)
        assert out.images[0].size == (extra.get("width", size[0]), extra.get("height", size[1]))
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("setting, value, said", [
    ("latents", np.zeros((1, 16, 4, 4), np.float32), r"^latents must be a torch tensor \(batch, 16, height/8, "
                                                      r"width/8\), got ndarray; torch\.from_numpy\(array\) makes one$"),
    ("latents", [torch.zeros(1, 16, 4, 4)], r"^latents must be a torch tensor .*, got list$"),
    ("max_sequence_length", "512", r"^max_sequence_length must be an integer >= 1, got '512'$"),
    ("shift", "3", r"^shift must be a finite number > 0, got '3'$"),
    ("shift", float("inf"), r"^shift must be a finite number > 0, got inf$"),
    ("sigmas", [1.0, float("nan")], r"^sigmas must lie in \(0, 1\], got \[1\.0, nan\]$"),
    ("sigmas", "1, 0.5", r"^sigmas must be a list of numbers in \(0, 1\], got '1, 0\.5'$"),
    ("sigmas", np.array([[1.0, 0.7], [0.4, 0.2]]),
     r"^sigmas must be a flat list of numbers in \(0, 1\], got an array of shape \(2, 2\)$"),
    ("template", 5, r"^template must be a template's name \(zimage templates list\) or a Template, got int$"),
])
def test_settings_of_the_wrong_kind_are_refused_by_name_before_any_model_runs(tiny_pipe, setting, value, said):
    """latents= as a numpy array or a list failed with "'numpy.ndarray' object has no attribute 'to'" /
    "'list' object has no attribute 'shape'" after the prompt was encoded; max_sequence_length="512"
    and shift="3" with "'<' / '>' not supported between instances of 'str' and 'int'"; sigmas="1, 0.5"
    with torch's "new(): invalid data type 'str'"; template=5 with "'int' object has no attribute
    'prompt_fields'". A NaN sigma or an infinite shift ran, and the NaN latents were blamed on the
    weights ("possible causes: damaged weights"). A 2-D array of sigmas ran its rows one after the
    other (4 steps for a 2 x 2 array)."""
    extra = {} if setting == "sigmas" else {"num_inference_steps": 1}
    with no_model_runs(tiny_pipe), pytest.raises((TypeError, ValueError), match=said):
        tiny_pipe("a cat", width=32, height=32, seed=0, **extra, **{setting: value})


def test_step_end_tensor_inputs_given_as_one_string_are_refused_naming_the_list(tiny_pipe):
    """callback_on_step_end_tensor_inputs="latents" (a string where a list goes) was refused listing
    its letters: "can hold ('latents', 'prompt_embeds') here, got ['l', 'a', 't', 'e', 'n', 't', 's']"."""
    with no_model_runs(tiny_pipe), pytest.raises(
            ValueError, match=r"^callback_on_step_end_tensor_inputs is a list of names, such as \['latents'\]; got "
                              r"the string 'latents'$"):
        tiny_pipe("a cat", **SMALL, callback_on_step_end=lambda p, i, t, kw: kw,
                  callback_on_step_end_tensor_inputs="latents")


def test_a_step_end_callback_that_returns_a_tensor_is_told_to_return_a_dict(tiny_pipe):
    """callback_on_step_end returning the latents themselves (not {"latents": ...}) failed with "Boolean
    value of Tensor with more than one value is ambiguous"; None and a dict run as before."""
    with pytest.raises(TypeError, match=r"^callback_on_step_end returned a Tensor after step 1; it returns a dict "
                                        r"\(callback_kwargs, or \{'latents': tensor\} to replace the latents; None "
                                        r"or \{\} changes nothing\)$"):
        tiny_pipe("a cat", **SMALL, seed=0, callback_on_step_end=lambda p, i, t, kw: kw["latents"])
    plain = np.asarray(tiny_pipe("a cat", **SMALL, seed=0).images[0])
    for returned in (lambda p, i, t, kw: None, lambda p, i, t, kw: kw):
        assert np.array_equal(np.asarray(tiny_pipe("a cat", **SMALL, seed=0, callback_on_step_end=returned).images[0]),
                              plain)


@pytest.mark.parametrize("image, said", [
    (np.zeros((32, 32, 4), np.uint8), r"got shape \(32, 32, 4\): an RGBA array; drop its alpha channel, "
                                       r"array\[\.\.\., :3\]$"),
    (torch.rand(32, 32, 3), r"got shape \(32, 32, 3\): a channels-last tensor; tensors are channels-first, "
                            r"tensor\.permute\(2, 0, 1\)$"),
    (torch.rand(2, 32, 32, 3), r"got shape \(2, 32, 32, 3\): a channels-last tensor; tensors are channels-first, "
                               r"tensor\.permute\(0, 3, 1, 2\)$"),
    (np.random.rand(3, 32, 32), r"got shape \(3, 32, 32\): a channels-first array; arrays are channels-last, "
                                r"array\.transpose\(1, 2, 0\)$"),
    ([np.zeros((32, 32, 4), np.uint8)] * 2, r"got a list of shape \(32, 32, 4\) items: an RGBA array; drop its "
                                            r"alpha channel, array\[\.\.\., :3\]$"),
])
def test_an_image_array_of_another_layout_is_refused_naming_the_shape_given_and_the_fix(tiny_pipe, image, said):
    """An RGBA array (np.asarray of a PNG with alpha), a channels-last tensor or a channels-first array
    were refused naming the shape after stacking, (1, 32, 32, 4) for a (32, 32, 4) array, with no word
    on what was wrong."""
    with no_model_runs(tiny_pipe), pytest.raises(ValueError, match=r"^image arrays must be .*; " + said):
        tiny_pipe.img2img(["a cat"] * (len(image) if isinstance(image, list) else 1), image=image,
                          num_inference_steps=1)


@pytest.mark.parametrize("images, said", [
    ([np.zeros((32, 32, 3), np.uint8), np.zeros((48, 32, 3), np.uint8)],
     r"^image: the arrays of a list must have one shape, got \(32, 32, 3\) and \(48, 32, 3\): resize them to one "
     r"size \(PIL images are resized to the first one's size\)$"),
    ([torch.rand(3, 32, 32), torch.rand(3, 32, 48)],
     r"^image: the tensors of a list must have one shape, got \(3, 32, 32\) and \(3, 32, 48\): "),
    ([Image.new("RGB", (32, 32)), np.zeros((32, 32, 3), np.uint8)],
     r"^image must be .* or a list of one kind; got a list of Image and ndarray$"),
])
def test_a_list_of_images_of_several_sizes_or_kinds_is_refused_saying_so(tiny_pipe, images, said):
    """A list of arrays or tensors of several sizes failed inside numpy ("all input arrays must have the
    same shape") or torch ("stack expects each tensor to be equal size"); a list of a PIL image and an
    array was refused with "got Image", as if PIL images were not taken."""
    with no_model_runs(tiny_pipe), pytest.raises(ValueError, match=said):
        tiny_pipe.img2img(["a cat", "a dog"], image=images, num_inference_steps=1)


def test_an_input_image_on_the_grid_resized_by_one_given_side_gives_no_rounding_warning(tiny_pipe, caplog):
    """A 32x32 image with width=48 (height from the image) warned "image is 32x32, whose sides are not
    all multiples of 16: the run uses 48x32 (rounded down ...)": neither side was rounded. A side left
    to the image that is rounded down still warns."""
    with caplog.at_level(logging.WARNING, logger="zimage_native"):
        out = tiny_pipe.img2img("a cat", image=Image.new("RGB", (32, 32)), width=48, num_inference_steps=2, seed=0)
    assert out.images[0].size == (48, 32)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "multiples of 16" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zimage_native"):
        out = tiny_pipe.img2img("a cat", image=Image.new("RGB", (32, 44)), width=48, num_inference_steps=2, seed=0)
    assert out.images[0].size == (48, 32)
    assert [r.getMessage() for r in caplog.records if "multiples of 16" in r.getMessage()] == [
        "image is 32x44, whose sides are not all multiples of 16: the run uses 48x32 (rounded down, as diffusers "
        "does); give width= and height= (multiples of 16, e.g. width=48, height=48) to choose the size the image is "
        "resized to"]


@pytest.mark.parametrize("given, seeds", [
    (np.array([4, 5]), [4, 5]), (torch.tensor([4, 5]), [4, 5]), (np.random.default_rng(0).integers(0, 2**31, 2), None),
    (torch.tensor(4), [4]), (np.array(4), [4])])
def test_seeds_drawn_with_numpy_or_torch_run_as_those_seeds(tiny_pipe, given, seeds):
    """seed=np.array([4, 5]) (seeds drawn with numpy, one per prompt) was refused as one seed: "a seed
    must be an integer in [0, 2**64), got array([4, 5])"; a 0-d tensor or array too, where numpy
    integers and the other number settings' 0-d tensors are taken. They run as the Python ints."""
    seeds = seeds or [int(s) for s in given]
    prompts = ["a cat", "a dog"][:len(seeds)]
    out = tiny_pipe(prompts, **SMALL, seed=given)
    want = tiny_pipe(prompts, **SMALL, seed=seeds)
    assert out.seeds == seeds and all(type(s) is int for s in out.seeds)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, want.images))
    with no_model_runs(tiny_pipe), pytest.raises(ValueError, match=r"^a seed must be an integer in \[0, 2\*\*64\), "
                                                                   r"got 4\.0 "):
        tiny_pipe("a cat", **SMALL, seed=np.array(4.0))


@pytest.mark.parametrize("setting, value, plain", [
    ("max_sequence_length", torch.tensor(64), 64), ("max_sequence_length", np.array(64), 64),
    ("width", torch.tensor(48), 48), ("num_inference_steps", torch.tensor(2), 2)])
def test_a_whole_number_setting_given_as_a_0d_tensor_runs_as_that_number(tiny_pipe, setting, value, plain):
    """max_sequence_length=torch.tensor(64) ran (diffusers 0.42.1 takes it too) until the integer check
    (3a60ea7) refused it ("must be an integer >= 1, got tensor(64)"); width= and num_inference_steps=
    as 0-d tensors were refused likewise, though the float settings' 0-d tensors are taken. A 0-d
    integer tensor or array runs as its number, bit for bit; a float one stays refused by name."""
    base = dict(width=32, height=32, num_inference_steps=1, seed=0)
    out = tiny_pipe("a cat", **{**base, setting: value})
    want = tiny_pipe("a cat", **{**base, setting: plain})
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(want.images[0]))
    assert out.info == want.info and type(out.info.get(setting, plain)) is int
    with no_model_runs(tiny_pipe), pytest.raises(ValueError, match=r" got tensor\(64\.\)$| got 64\.0$"):
        tiny_pipe("a cat", **{**base, setting: torch.tensor(64.0)})


def test_a_four_channel_vae_beside_a_z_image_dit_is_refused_at_load(tiny_model_dir, tmp_path, monkeypatch):
    """An SD / SDXL VAE (4 latent channels) given as a single file: it loaded, the whole request sampled, and the
    decode failed in a conv ('expected input[1, 16, 8, 8] to have 4 channels'); now refused at load, naming both
    files, before the text encoder is read."""
    import diffusers

    from zimage_native import ZImagePipeline, loading

    from .fixtures import TINY_VAE

    diffusers.AutoencoderKL(**{**TINY_VAE, "latent_channels": 4}).save_pretrained(tmp_path / "sd_vae")
    vae = tmp_path / "sd_vae" / "diffusion_pytorch_model.safetensors"
    load = loading.load_component

    def no_text_encoder(kind, *args, **kwargs):
        assert kind != "text_encoder", "the text encoder was loaded before the VAE was refused"
        return load(kind, *args, **kwargs)

    monkeypatch.setattr(loading, "load_component", no_text_encoder)
    with pytest.raises(ValueError, match=r"^the VAE .*sd_vae.* has 4 latent channels and the transformer .* makes 16: "
                                         r"Z-Image decodes with the 16-channel FLUX VAE"):
        ZImagePipeline.from_single_files(tiny_model_dir / "transformer", vae=vae,
                                         text_encoder=tiny_model_dir / "text_encoder",
                                         tokenizer=tiny_model_dir / "tokenizer", device="cpu")


@pytest.mark.parametrize("tensors, family", [
    # SD3 all-in-one beside a diffusers-layout VAE: the VAE's up_blocks.N.resnets are its own, not a UNet's
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (6, 2),
      "vae.decoder.conv_in.weight": (8, 16, 3, 3), "vae.decoder.up_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)},
     "Stable Diffusion 3 (joint_blocks)"),
    ({"down_blocks.0.attentions.0.proj_in.weight": (4, 4)}, "Stable Diffusion / SDXL (diffusers UNet)"),
    ({"model.diffusion_model.blocks.0.self_attn.q.weight": (4, 4)}, "Wan (blocks.N.self_attn / cross_attn)"),
    # the UNet named before the CLIP text encoder, whichever key comes first in the file
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,),
      "model.diffusion_model.output_blocks.0.0.weight": (4, 4)}, "Stable Diffusion 1.x/2.x/SDXL (UNet)"),
])
def test_another_models_checkpoint_is_named_by_its_family(tmp_path, tensors, family):
    """An SD/SDXL all-in-one loaded as the DiT said "no transformer in this checkpoint (found: vae); the VAE goes
    in as vae= (--vae)", for SD's 4-channel VAE; another model's file is named by its family, from the table the
    LoRA loader names foreign LoRAs with."""
    from safetensors.torch import save_file

    from zimage_native.formats import UnsupportedFormatError
    from zimage_native.loading import load_component

    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, path)
    with pytest.raises(UnsupportedFormatError, match=f"^{path}: .*for {re.escape(family)}, not Z-Image") as e:
        load_component("transformer", path, None, "cpu")
    assert "vae=" not in str(e.value) and "--vae" not in str(e.value)


def test_a_z_image_vae_in_diffusers_layout_is_no_other_family(tmp_path):
    """The FLUX VAE's decoder.up_blocks.N.resnets read as a diffusers UNet's names; detection looks only at the
    keys no component took."""
    from safetensors.torch import save_file

    from zimage_native.formats import detect_format

    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3),
               "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3)}, path)
    fmt = detect_format(path)
    assert (fmt.foreign, [c.component for c in fmt.components]) == (None, ["vae"])
