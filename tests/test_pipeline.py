"""End-to-end parity of ZImagePipeline against diffusers 0.42.1 ZImagePipeline, fp32 on CPU."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from zimage_native.prompt.format import format_prompt

from .utils import assert_rel, rel_err

LONG = "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat"


def both(ours, ref, prompt, **kw):
    """Run both pipelines on the same request. diffusers mutates prompt lists, so each gets a copy."""
    copy = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    seed = kw.pop("seed", 0)
    ref_kw = {k: copy(v) for k, v in kw.items()}
    ref_kw.setdefault("guidance_scale", 0.0)  # diffusers' default is 5.0; ours is 0.0 (Turbo)
    expected = ref(copy(prompt), generator=torch.Generator().manual_seed(seed), **ref_kw).images
    got = ours(copy(prompt), seed=seed, **{k: copy(v) for k, v in kw.items()}).images
    return got, expected


@pytest.mark.parametrize(
    "prompt, size, extra",
    [
        pytest.param("a cat", (64, 64), {}, id="one prompt"),
        pytest.param(["a cat", LONG], (64, 96), {}, id="two prompts of different lengths"),
        pytest.param("a cat", (80, 48), {}, id="15 image tokens: image padding"),
        pytest.param(["a cat", LONG], (64, 64), {"num_images_per_prompt": 2}, id="two images per prompt"),
        pytest.param(LONG, (64, 64), {"guidance_scale": 4.0}, id="CFG with the empty negative prompt"),
        pytest.param(["a cat", LONG], (48, 64),
                     {"guidance_scale": 3.0, "negative_prompt": ["blurry", "ugly, low quality"],
                      "cfg_normalization": True, "cfg_truncation": 0.5}, id="CFG normalization and truncation"),
        pytest.param(["a cat", LONG], (48, 64),
                     {"guidance_scale": 3.0, "negative_prompt": ["blurry", "ugly, low quality"],
                      "cfg_normalization": 1.3}, id="CFG normalization as a norm ratio"),
        pytest.param(["a cat", LONG], (48, 64), {"guidance_scale": 3.0, "cfg_truncation": 0.0},
                     id="CFG truncated after the first step"),
        pytest.param("a cat", (48, 64), {"guidance_scale": 3.0, "cfg_truncation": None}, id="cfg_truncation None"),
        pytest.param(["a cat", LONG], (48, 64), {"guidance_scale": 1.0}, id="guidance 1 runs CFG"),
        pytest.param(LONG, (48, 64), {"max_sequence_length": 16}, id="prompt cut to max_sequence_length"),
    ],
)
def test_final_latents_match_diffusers(tiny_pipe, reference_pipe, prompt, size, extra):
    h, w = size
    got, expected = both(tiny_pipe, reference_pipe, prompt, height=h, width=w, num_inference_steps=4,
                         output_type="latent", **extra)
    assert got.dtype == torch.float32
    assert_rel(got, expected, 1e-5, "final latents")


def test_one_negative_prompt_for_a_list_of_prompts_is_each_ones(tiny_pipe, reference_pipe):
    """``negative_prompt="blurry"`` with a list of prompts: each prompt's negative, as a list of it would
    be (diffusers' pipeline stops there with an AssertionError; its list form is the reference)."""
    kw = dict(height=48, width=64, num_inference_steps=3, output_type="latent", guidance_scale=3.0)
    got = tiny_pipe(["a cat", LONG], negative_prompt="blurry", seed=0, **kw).images
    expected = reference_pipe(["a cat", LONG], negative_prompt=["blurry", "blurry"],
                              generator=torch.Generator().manual_seed(0), **kw).images
    assert_rel(got, expected, 1e-5, "final latents")


def test_a_prompt_tuple_no_image_count_and_one_size_given_run_as_diffusers_means_them(tiny_pipe, reference_pipe):
    """Forms diffusers scripts pass: a tuple of prompts and ``num_images_per_prompt=None`` (diffusers
    fails on both with a TypeError) run as a list and one image per prompt; with only ``height`` given
    the width is 1024, as in diffusers."""
    kw = dict(height=32, width=32, num_inference_steps=1, output_type="latent", seed=0)
    listed = tiny_pipe(["a cat", LONG], **kw).images
    assert torch.equal(tiny_pipe(("a cat", LONG), num_images_per_prompt=None, **kw).images, listed)
    got, expected = both(tiny_pipe, reference_pipe, "a cat", height=32, num_inference_steps=1, output_type="latent")
    assert got.shape == expected.shape == (1, 16, 4, 128)
    assert_rel(got, expected, 1e-5, "final latents")


def test_images_match_diffusers(tiny_pipe, reference_pipe):
    got, expected = both(tiny_pipe, reference_pipe, ["a cat", LONG], height=64, width=96, num_inference_steps=3,
                         output_type="np")
    assert got.shape == (2, 64, 96, 3) and got.min() >= 0 and got.max() <= 1
    assert_rel(torch.from_numpy(got), torch.from_numpy(expected), 1e-5, "images")
    pil, ref_pil = both(tiny_pipe, reference_pipe, "a cat", height=64, width=64, num_inference_steps=2)
    diff = np.abs(np.asarray(pil[0], dtype=np.int16) - np.asarray(ref_pil[0], dtype=np.int16))
    assert pil[0].size == (64, 64) and diff.max() <= 1


def test_text_features_match_diffusers(tiny_pipe, reference_pipe):
    prompts = ["a cat", LONG, ""]
    expected = reference_pipe._encode_prompt(list(prompts), device="cpu")
    got = tiny_pipe.encode_prompt(prompts)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert_rel(g, e, 1e-5, "text features")


def test_text_encoder_loads_only_the_needed_layers(tiny_pipe, tiny_model_dir):
    import json

    full = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert len(tiny_pipe.text_encoder.model.layers) == full - 1


def test_seed_generator_and_latents_paths_agree(tiny_pipe):
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    a = tiny_pipe("a cat", seed=7, **kw).images
    b = tiny_pipe("a cat", generator=torch.Generator().manual_seed(7), **kw).images
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator("cpu").manual_seed(7))
    c = tiny_pipe("a cat", latents=noise, **kw).images
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, tiny_pipe("a cat", seed=8, **kw).images)


def test_random_seed_is_reported(tiny_pipe):
    out = tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, output_type="latent")
    again = tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, output_type="latent", seed=out.seeds[0])
    assert torch.equal(out.images, again.images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=100), "width must be a positive multiple of 16"),
        (dict(height=0), "height must be a positive multiple of 16, got 0$"),
        (dict(height=8), "height must be a positive multiple of 16, got 8 \\(the smallest is 16\\)"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
        (dict(latents=torch.zeros(1, 16, 3, 3)), "latents must have shape"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    ],
)
def test_bad_input_raises_value_error(tiny_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipe("a cat", **{"height": 32, "width": 32, **kwargs})


def test_empty_prompt_list_raises(tiny_pipe):
    with pytest.raises(ValueError, match="non-empty"):
        tiny_pipe([])


def test_progress_bar_config_takes_tqdm_options_as_diffusers_does(fresh_pipe, capsys):
    """diffusers' set_progress_bar_config(**kwargs) hands its options to tqdm; here all but disable
    were ignored. A later call replaces them (and without disable shows the bar), as in diffusers."""
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="latent", progress=None)
    fresh_pipe.progress = True
    fresh_pipe.set_progress_bar_config(desc="my steps", ascii=True)
    fresh_pipe("a cat", **kw)
    err = capsys.readouterr().err
    assert "my steps" in err and "denoise" not in err and "#" in err  # ascii bars draw with '#'
    fresh_pipe.set_progress_bar_config(disable=True, desc="hidden")
    fresh_pipe("a cat", **kw)
    assert "hidden" not in capsys.readouterr().err
    fresh_pipe.set_progress_bar_config(leave=True)
    fresh_pipe("a cat", **kw)
    assert "denoise" in capsys.readouterr().err


def test_diffusers_progress_bar_for_a_loop_of_ones_own(fresh_pipe, capsys):
    """diffusers' pipe.progress_bar(iterable=None, total=None), which hand-written denoising loops
    use, was an AttributeError: it is the per-step bar, with set_progress_bar_config's options."""
    fresh_pipe.set_progress_bar_config(desc="my loop", ascii=True)
    with fresh_pipe.progress_bar(total=3) as bar:
        for _ in range(3):
            bar.update()
    assert list(fresh_pipe.progress_bar(range(2))) == [0, 1]
    err = capsys.readouterr().err
    assert "my loop" in err and "3/3" in err and "2/2" in err
    fresh_pipe.set_progress_bar_config(disable=True)
    with fresh_pipe.progress_bar(total=3) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="iterable= or total="):
        fresh_pipe.progress_bar()


def test_callback_tensor_inputs_named_by_the_pipeline_as_in_diffusers(tiny_pipe, reference_pipe):
    """callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs (a diffusers idiom) was an
    AttributeError here: the names offered are diffusers' Z-Image ones, with diffusers' latents."""
    seen = {"ours": [], "ref": []}

    def record(name):
        def on_step_end(pipe, i, t, tensors):
            seen[name].append(sorted(tensors))
            return {"latents": tensors["latents"] * 0.9} if i == 1 else {}
        return on_step_end

    kw = dict(height=32, width=32, num_inference_steps=3, output_type="latent", guidance_scale=2.0)
    assert tiny_pipe._callback_tensor_inputs == reference_pipe._callback_tensor_inputs
    got = tiny_pipe("a cat", seed=0, callback_on_step_end=record("ours"),
                    callback_on_step_end_tensor_inputs=tiny_pipe._callback_tensor_inputs, **kw).images
    expected = reference_pipe("a cat", generator=torch.Generator().manual_seed(0), callback_on_step_end=record("ref"),
                              callback_on_step_end_tensor_inputs=reference_pipe._callback_tensor_inputs, **kw).images
    assert seen["ours"] == seen["ref"] == [["latents", "prompt_embeds"]] * 3
    assert_rel(got, expected, 1e-5, "latents with the pipeline's callback tensor inputs")


def test_progress_bar_can_be_turned_off(tiny_pipe, capsys):
    tiny_pipe("a cat", height=32, width=32, num_inference_steps=2, output_type="latent", progress=True)
    assert "denoise" in capsys.readouterr().err
    tiny_pipe("a cat", height=32, width=32, num_inference_steps=2, output_type="latent", progress=False)
    assert "denoise" not in capsys.readouterr().err


def test_long_prompt_warns_with_token_counts(tiny_pipe, caplog):
    with caplog.at_level("WARNING"):
        feats = tiny_pipe.encode_prompt([LONG], max_sequence_length=10)
    assert feats[0].shape[0] == 10
    assert "more than max_sequence_length 10" in caplog.text
    full = len(tiny_pipe.text_encoder.tokenizer([format_prompt(LONG)], add_special_tokens=False)["input_ids"][0])
    assert f"Raise max_sequence_length to {full} to keep them" in caplog.text


def test_a_prompt_past_the_dits_caption_positions_is_told_to_shorten_not_to_raise(tiny_pipe, caplog):
    """Past 1504 tokens no max_sequence_length keeps a prompt (the released DiTs refuse more), so the
    warning says to shorten it."""
    words = " ".join(f"w{i}" for i in range(1600))
    with caplog.at_level("WARNING"):
        tiny_pipe.text_encoder.tokenize([format_prompt(words)], 512)
    assert "Shorten the prompt to keep them (the released DiTs take max_sequence_length up to 1504)" in caplog.text
    assert "Raise max_sequence_length" not in caplog.text


def test_calls_from_several_threads_run_one_at_a_time(tiny_pipe):
    """A web framework's worker threads calling one pipeline: the runs do not interleave (they share
    modules, offload moves, LoRA weights and CUDA-graph buffers), each gives the image it gives alone,
    and a call made from inside a run (a step callback) does not deadlock."""
    import threading
    import time

    steps, errors = [], []
    run = dict(width=64, height=64, num_inference_steps=3, output_type="np", progress=False)

    def callback(name):
        def on_step(step, total):
            steps.append(name)
            time.sleep(0.02)  # a slow step: another thread would get in here without the lock
        return on_step

    def worker(name, seed):
        try:
            results[name] = tiny_pipe("a cat", seed=seed, callback=callback(name), **run).images
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    results: dict = {}
    threads = [threading.Thread(target=worker, args=(f"t{i}", i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 3
    runs = ["".join(steps[i:i + 3]) for i in range(0, len(steps), 3)]
    assert sorted(runs) == ["t0t0t0", "t1t1t1", "t2t2t2"], steps  # each run's three steps together
    for i in range(3):
        alone = tiny_pipe("a cat", seed=i, **run).images
        assert np.array_equal(results[f"t{i}"], alone)

    def reenter(pipe, i, t, tensors):
        pipe.encode_prompt(["a dog"])  # the same thread, inside a run
        return tensors

    tiny_pipe("a cat", seed=0, callback_on_step_end=reenter, **run)



def test_a_dit_change_waits_for_a_pipeline_that_came_to_hold_the_dit_while_it_waited(fresh_pipe, monkeypatch):
    """optimize() on pipeline P while another thread assigns P's DiT to pipeline R: optimize named
    the pipelines holding the DiT (P alone) before waiting for P's lock, which the assignment held,
    so it took P's only and compiled the DiT during R's next run (R's record went from compile "off"
    to "blocks" between two steps). Now it names them again once it holds the locks, and waits for
    R's run. The assignment is held inside until optimize waits; optimize's transform waits for R's
    run to start (at most 3 s: with R's lock held by optimize it cannot)."""
    import copy
    import threading

    import zimage_native.accel as accel
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native import ZImagePipeline

    from .test_lora_adapters import _WatchedLock

    torch._dynamo.reset()
    pipe = fresh_pipe
    other = ZImagePipeline(copy.deepcopy(pipe.transformer), pipe.vae, pipe.text_encoder, pipe.scheduler_config,
                           pipe.vae_config)
    other.progress = False
    pipe._lock, other._lock = _WatchedLock(), _WatchedLock()
    in_setter, go, started, transform, bind = (threading.Event(), threading.Event(), threading.Event(),
                                               accel.optimize, other._bind_transformer_calls)

    def held_bind():
        pipe._lock.owner = other._lock.owner = threading.get_ident()  # the assignment's thread, which holds both
        in_setter.set()
        go.wait(10)
        bind()

    def after_the_run_started(*args, **kwargs):
        started.wait(3)
        return transform(*args, **kwargs)

    def on_step_end(p, i, t, tensors):
        records.append(p._accel["compile"])
        started.set()
        return tensors

    other._bind_transformer_calls = held_bind
    monkeypatch.setattr(accel, "optimize", after_the_run_started)
    records = []
    assign = threading.Thread(target=lambda: setattr(other, "transformer", pipe.transformer), daemon=True)
    assign.start()
    assert in_setter.wait(10)
    change = threading.Thread(target=lambda: pipe.optimize(compile="blocks",
                                                           compile_backend=CompileCounterWithBackend("eager")),
                              daemon=True)
    change.start()
    # optimize waits for a lock the assignment holds (the first of the two by id: its locks are taken in
    # that order)
    first, second = sorted((pipe, other), key=id)
    assert first._lock.tried.wait(10) or second._lock.tried.wait(0)
    go.set()
    assign.join(timeout=10)
    run = threading.Thread(target=lambda: other("a cat", seed=0, callback_on_step_end=on_step_end,
                                                **dict(height=32, width=32, num_inference_steps=3,
                                                       output_type="latent")), daemon=True)
    run.start()
    for thread in (change, run):
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in (assign, change, run))
    assert other.transformer is pipe.transformer and len(records) == 3
    assert len(set(records)) == 1, f"the DiT was changed during the run: {records}"
    assert other._accel["compile"] == pipe._accel["compile"] == "blocks"


def test_a_dit_assigned_from_another_thread_waits_for_the_run(fresh_pipe):
    """pipe.transformer = other_dit from another thread during a run (a server swapping its DiT): the
    assignment was not serialised as the other setters are, so the run went on with the new DiT from
    the next step (an image of neither DiT). It now waits for the run, which finishes with the DiT it
    started with; the next run has the new one."""
    import copy
    import threading

    run = dict(width=32, height=32, num_inference_steps=3, output_type="latent", seed=0)
    other = copy.deepcopy(fresh_pipe.transformer)
    with torch.no_grad():
        for weight in other.parameters():
            weight.mul_(1.1)
    want = fresh_pipe("a cat", **run).images
    assigned, during = threading.Event(), []

    def assign():
        fresh_pipe.transformer = other
        assigned.set()

    def on_step_end(pipe, step, timestep, tensors):
        if step == 0:
            threading.Thread(target=assign).start()
            during.append(assigned.wait(1.0))  # (without the lock the assignment lands here)
        return tensors

    got = fresh_pipe("a cat", callback_on_step_end=on_step_end, **run).images
    assert assigned.wait(60) and fresh_pipe.transformer is other
    assert during == [False] and torch.equal(got, want)
    assert not torch.equal(fresh_pipe("a cat", **run).images, want)  # the next run has the new DiT

def test_a_dit_assigned_gets_the_attention_fitted_to_the_pipelines_device(fresh_pipe, tiny_pipe, monkeypatch):
    """Where SDPA has only its math path (a bfloat16 model on a GPU below sm80: stood in for by
    sdpa_math_only), a placement bounds the DiT's SDPA to slices of the queries; a DiT assigned
    afterwards (pipe.transformer = dit) kept plain SDPA (0 of 4 attention modules bounded on the tiny
    DiT), so it ran the unbounded math path. The setter now fits it as a placement does."""
    import copy

    from zimage_native.accel import attention_backends as ab

    monkeypatch.setattr(ab, "sdpa_math_only", lambda device, dtype: "math only (stand-in)")
    fresh_pipe.enable_model_cpu_offload(device="cpu")  # a placement: the fit runs
    bounded = lambda dit: [module.attn_fn is ab.bounded_sdpa for module in ab.dit_attention_modules(dit)]
    assert all(bounded(fresh_pipe.transformer))
    other = copy.deepcopy(tiny_pipe.transformer)
    assert not any(bounded(other))
    fresh_pipe.transformer = other
    assert bounded(other) and all(bounded(other))


def test_a_prompt_that_is_not_text_is_named_as_such(tiny_pipe):
    """pipe(5) (a seed or a size given where the prompt goes) raised Python's bare "TypeError: 'int' object
    is not iterable" from inside the request; it says what the prompt must be now."""
    for prompt, name in ((5, "int"), (1.5, "float")):
        with pytest.raises(TypeError, match=rf"^prompt must be a string or a list of strings, got {name}$"):
            tiny_pipe(prompt, width=32, height=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="^every prompt must be a string$"):
        tiny_pipe(["a cat", 5], width=32, height=32, num_inference_steps=1)


def test_a_negative_prompt_that_is_not_text_is_named_and_numpy_prompts_work(tiny_pipe):
    """94cb82a named the type of a prompt that is not text, not its sibling: negative_prompt=5 with
    CFG still raised "TypeError: 'int' object is not iterable", and b"blurry" was read as 6 negative
    prompts ("got 6 negative prompts for 1 prompts"); a numpy array of two prompts (or negative
    prompts) raised numpy's "The truth value of an array with more than one element is ambiguous".
    The negative prompt gets the prompt's TypeError naming the type; bytes and a dict are refused as a
    prompt too (not one prompt per byte or key); a numpy array is a list of prompts."""
    import numpy as np

    kw = dict(width=32, height=32, num_inference_steps=1)
    for negative, name in ((5, "int"), (b"blurry", "bytes")):
        with pytest.raises(TypeError, match=rf"^negative_prompt must be a string or a list of strings, got {name}$"):
            tiny_pipe("a cat", negative_prompt=negative, guidance_scale=2.0, **kw)
    for prompt, name in ((b"a cat", "bytes"), ({"a cat": 1}, "dict")):
        with pytest.raises(TypeError, match=rf"^prompt must be a string or a list of strings, got {name}$"):
            tiny_pipe(prompt, **kw)
    as_list = tiny_pipe(["a cat", "a dog"], negative_prompt=["blurry", "dark"], guidance_scale=2.0, seed=3,
                        output_type="np", **kw).images
    as_numpy = tiny_pipe(np.array(["a cat", "a dog"]), negative_prompt=np.array(["blurry", "dark"]),
                         guidance_scale=2.0, seed=3, output_type="np", **kw).images
    assert len(as_numpy) == 2 and np.array_equal(np.asarray(as_numpy), np.asarray(as_list))


def test_prompts_from_a_generator_are_read_once_as_a_list(tiny_pipe):
    """A generator (or map(), iter()) given as prompt= was consumed by the first read of the request (the
    image count), so the check after it found no prompt: "prompt must be a non-empty string or a
    non-empty list of strings"; as negative_prompt= it was "got 0 negative prompts for 2 prompts". It is
    read once into a list when the request is made: the same images as the list, and the record holds
    the list."""
    import numpy as np

    kw = dict(width=32, height=32, num_inference_steps=1, guidance_scale=2.0, seed=3, output_type="np")
    as_list = tiny_pipe(["a cat", "a dog"], negative_prompt=["blurry", "dark"], **kw)
    from_generators = tiny_pipe((p for p in ["a cat", "a dog"]), negative_prompt=iter(["blurry", "dark"]), **kw)
    assert len(from_generators.images) == 2
    assert np.array_equal(np.asarray(from_generators.images), np.asarray(as_list.images))
    assert from_generators.info["prompts"] == ["a cat", "a dog"] == as_list.info["prompts"]
    assert from_generators.info["negative_prompt"] == ["blurry", "dark"]  # not a spent generator object
    one = tiny_pipe(map(str.strip, [" a cat "]), width=32, height=32, num_inference_steps=1, seed=3,
                    output_type="np")
    assert len(one.images) == 1 and one.info["prompts"] == ["a cat"]


# ------------------------------------------------------------------------- diffusers habits
def test_call_arguments_are_keywords_so_diffusers_positional_height_width_cannot_swap(tiny_pipe):
    """diffusers' order is (prompt, height, width, ...); a positional call would have come out
    transposed here. Everything after the prompt is a keyword, so it is a TypeError instead."""
    with pytest.raises(TypeError, match="positional argument"):
        tiny_pipe("a cat", 32, 64, 1)


def test_an_interrupt_set_in_callback_on_step_end_stops_the_run_as_in_diffusers(tiny_pipe, reference_pipe):
    """``pipe._interrupt = True`` is diffusers' documented stop: the remaining steps are skipped and the
    latents so far decoded. The same latents as diffusers' interrupted run; reset at the next call."""
    steps = []

    def stop_after_two(pipe, i, t, tensors):
        steps.append(i)
        if i == 1:
            pipe._interrupt = True
        return tensors

    kw = dict(height=32, width=48, num_inference_steps=4, output_type="latent", guidance_scale=0.0)
    expected = reference_pipe("a cat", generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_two,
                              **kw).images
    assert steps == [0, 1]
    steps.clear()
    got = tiny_pipe("a cat", seed=0, callback_on_step_end=stop_after_two, **kw).images
    assert steps == [0, 1] and tiny_pipe.interrupt
    assert_rel(got, expected, 1e-5, "interrupted latents")
    full = tiny_pipe("a cat", seed=0, **kw).images  # reset: all four steps again
    assert not tiny_pipe.interrupt and not torch.equal(full, got)


def test_diffusers_output_access_return_dict_and_encode_prompt_of_a_string(tiny_pipe):
    out = tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, output_type="latent", seed=0)
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple() == (out.images,)
    (images,) = tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, output_type="latent", seed=0,
                          return_dict=False)
    assert torch.equal(images, out.images)
    one = tiny_pipe.encode_prompt("a cat")  # a string is one prompt, not five characters
    assert len(one) == 1 and torch.equal(one[0], tiny_pipe.encode_prompt(["a cat"])[0])
    assert torch.equal(tiny_pipe.encode_prompt(prompt="a cat")[0], one[0])  # diffusers' keyword
    # diffusers' encode_prompt returns (positive, negative); here one list, so its arguments are refused
    for diffusers_kw in ({"device": "cpu"}, {"negative_prompt": "blurry"}, {"do_classifier_free_guidance": False}):
        with pytest.raises(TypeError, match="for diffusers' pair use"):
            tiny_pipe.encode_prompt("a cat", **diffusers_kw)
    for diffusers_args in (("cpu",), (torch.device("cpu"), True), (None, True)):  # diffusers' positional order
        with pytest.raises(TypeError, match=r"not diffusers' \(prompt, device, do_classifier_free_guidance"):
            tiny_pipe.encode_prompt("a cat", *diffusers_args)
    assert torch.equal(tiny_pipe.encode_prompt("a cat", np.int64(512))[0], one[0])  # a numpy count is a count
    with pytest.raises(TypeError, match="unknown arguments"):
        tiny_pipe.encode_prompt("a cat", sytem_prompt="x")
    assert not torch.equal(tiny_pipe.encode_prompt("a cat", system_prompt="be brief")[0], one[0])


def test_diffusers_loading_habits_are_refused_before_loading_or_mapped(tiny_model_dir, tiny_pipe, tmp_path,
                                                                       monkeypatch):
    from zimage_native import ZImagePipeline, pipeline

    monkeypatch.setattr(pipeline, "load_pretrained", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(ValueError, match="not diffusers' weight-file variant"):
        ZImagePipeline.from_pretrained(tiny_model_dir, variant="fp16")
    with pytest.raises(ValueError, match="torch_dtype per component"):
        ZImagePipeline.from_pretrained(tiny_model_dir, torch_dtype={"default": torch.bfloat16})
    for name, value, words in (("device_map", "balanced", "device= (and dit_device="), ("token", "hf_x", "HF_TOKEN"),
                               ("subfolder", "transformer", "model folder itself"),
                               ("controlnet", object(), "pipe.load_controlnet(path)"),
                               ("quantization_config", object(), "fp8=True (the DiT's linears in e4m3)"),
                               ("use_safetensors", False, "only safetensors files are loaded")):
        with pytest.raises(ValueError, match=re.escape(words)):
            ZImagePipeline.from_pretrained(tiny_model_dir, **{name: value})
    monkeypatch.undo()  # options that change nothing here are accepted
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", use_safetensors=True, low_cpu_mem_usage=True)
    assert pipe.variant == "turbo"
    with pytest.raises(ValueError, match=r"the dtype is chosen when loading; load again with dtype='bfloat16'"):
        tiny_pipe.to(torch.bfloat16)
    with pytest.raises(ValueError, match="the dtype is chosen when loading"):
        tiny_pipe.to("cpu", dtype=torch.float16)
    assert tiny_pipe.to(device="cpu") is tiny_pipe and tiny_pipe.to("cpu") is tiny_pipe
    with pytest.raises(ValueError, match=r"from_pretrained\(\.\.\., offload='blocks'\)"):
        tiny_pipe.enable_sequential_cpu_offload()
    # diffusers' ZImageImg2ImgPipeline.from_pipe(pipe): here the pipeline itself runs img2img (it raised
    # "type object 'ZImagePipeline' has no attribute 'from_pipe'")
    with pytest.raises(ValueError, match=r"one pipeline runs every task here, so call pipe itself: img2img with "
                                         r"pipe\(prompt, image=\.\.\., strength=\.\.\.\)"):
        ZImagePipeline.from_pipe(tiny_pipe)


def test_pipe_to_the_dtype_it_holds_changes_nothing_as_in_diffusers(fresh_pipe, reference_pipe):
    """diffusers scripts load in a dtype and then call ``pipe.to("cuda", torch.bfloat16)`` (or
    ``pipe.to(device=..., dtype=...)``) with the same dtype: a no-op there. It was refused here ("the
    dtype is chosen when loading") whatever the dtype. Now the dtype every component holds is
    accepted and changes nothing; another one, or a pipeline whose components differ, is refused."""
    import copy

    kw = dict(height=64, width=64, num_inference_steps=2, output_type="latent")
    before = fresh_pipe("a cat", seed=0, **kw).images
    for args, options in (((torch.float32,), {}), (("cpu", torch.float32), {}), ((), dict(device="cpu",
                                                                                            dtype=torch.float32))):
        assert fresh_pipe.to(*args, **options) is fresh_pipe
        assert reference_pipe.to(*args, **options) is reference_pipe  # (fp32 already: nothing changes there)
    assert fresh_pipe.dtype == fresh_pipe.vae.dtype == fresh_pipe.text_encoder.dtype == torch.float32
    after = fresh_pipe("a cat", seed=0, **kw).images
    assert torch.equal(after, before)
    expected = reference_pipe("a cat", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **kw).images
    assert_rel(after, expected, 1e-5, "final latents after pipe.to(device, dtype)")
    with pytest.raises(ValueError, match=r"load again with dtype='bfloat16' \(or torch_dtype=\); this pipeline "
                                         r"holds float32"):
        fresh_pipe.to("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match=r"pipe.to\(\) takes one dtype"):
        fresh_pipe.to(torch.float32, dtype=torch.float32)  # (two dtypes: refused as two devices are)
    fresh_pipe.vae = copy.deepcopy(fresh_pipe.vae).to(torch.bfloat16)  # components of two dtypes
    with pytest.raises(ValueError, match="this pipeline holds bfloat16, float32"):
        fresh_pipe.to(torch.float32)


def test_pipe_to_accepts_diffusers_silence_dtype_warnings(fresh_pipe):
    """diffusers' ``pipe.to("cpu", silence_dtype_warnings=True)`` (its own offload calls it so) raised
    TypeError here. The keyword is accepted and changes nothing: the placement and the dtype are
    checked as without it."""
    kw = dict(height=32, width=32, num_inference_steps=1, seed=0, output_type="latent")
    before = fresh_pipe("a cat", **kw).images
    for args in (("cpu",), (torch.float32,), ("cpu", torch.float32)):
        for silence in (True, False):
            assert fresh_pipe.to(*args, silence_dtype_warnings=silence) is fresh_pipe
    assert torch.equal(fresh_pipe("a cat", **kw).images, before)
    with pytest.raises(ValueError, match=r"load again with dtype='bfloat16'"):
        fresh_pipe.to("cpu", torch.bfloat16, silence_dtype_warnings=True)


def test_pipe_to_leaves_a_remote_text_encoders_dtype_to_its_machine(fresh_pipe):
    """A remote text encoder (docs/server.md: built with dtype=None, the remote dtype) holds no weights
    here: its dtype is a request to its machine, and its features are cast to the DiT's. pipe.to("cpu")
    asked it for its dtype (a RemoteEncoderError while that machine was down), and pipe.to(dtype) counted
    it as a component of another dtype. Now only the DiT's and the VAE's dtypes are weighed."""
    from zimage_native.server.remote import RemoteTextEncoder

    fresh_pipe.text_encoder = RemoteTextEncoder("http://127.0.0.1:9", timeout=5)  # nothing listens there
    for args in (("cpu",), (torch.float32,), ("cpu", torch.float32)):
        assert fresh_pipe.to(*args) is fresh_pipe
    fresh_pipe.text_encoder = RemoteTextEncoder("http://127.0.0.1:9", dtype="bfloat16")  # features in bf16
    assert fresh_pipe.to("cpu", torch.float32) is fresh_pipe
    with pytest.raises(ValueError, match="this pipeline holds float32$"):
        fresh_pipe.to("cpu", torch.bfloat16)


def test_unknown_and_habitual_loading_keywords_name_from_pretrained(tiny_model_dir, monkeypatch, caplog):
    from zimage_native import ZImagePipeline, pipeline

    monkeypatch.setattr(pipeline, "_ignored_told", set(), raising=False)  # each habit logs once per process
    for name, value in (("foo", 1), ("proxies", None), ("dduf_file", "x.dduf")):
        with pytest.raises(TypeError) as err:
            ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", **{name: value})
        assert str(err.value).startswith(f"ZImagePipeline.from_pretrained() got an unexpected keyword argument "
                                         f"'{name}' (its loading options: device, dtype, variant,")
        assert "load_pretrained" not in str(err.value) and "\n" not in str(err.value)
    # ignoring these would change what the caller gets: refused
    for name, value, words in (("safety_checker", object(), "there is no safety checker"),
                               ("requires_safety_checker", True, "there is no safety checker"),
                               ("force_download", True, "hf download REPO --force-download")):
        with pytest.raises(ValueError, match=re.escape(words)):
            ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", **{name: value})
    # habits that change nothing: accepted, each named once in the log
    habits = dict(safety_checker=None, requires_safety_checker=False, feature_extractor=None, use_safetensors=True,
                  low_cpu_mem_usage=True, force_download=False)
    with caplog.at_level(logging.INFO, logger="zimage_native.pipeline"):
        pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", **habits)
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", **habits)
    assert pipe.variant == "turbo"
    told = [r.getMessage() for r in caplog.records if "ignored (diffusers' option)" in r.getMessage()]
    assert sorted(m.split("=")[0].removeprefix("from_pretrained: ") for m in told) == sorted(habits), told


def test_unknown_keywords_of_from_single_files_name_it_before_loading(tiny_model_dir, monkeypatch):
    """`from_single_files(..., fp8=True)` loaded every file, then failed with "ZImagePipeline.__init__()
    got an unexpected keyword argument 'fp8'": now refused first, naming from_single_files and its
    options (as from_pretrained does); diffusers' torch_dtype= is its dtype, and its habits are handled
    as from_pretrained handles them."""
    from zimage_native import ZImagePipeline, pipeline

    files = [str(tiny_model_dir / c) for c in ("transformer", "vae", "text_encoder", "tokenizer")]
    monkeypatch.setattr(pipeline, "load_single_files", lambda *a, **k: pytest.fail("loaded before refusing"))
    for name, value in (("foo", 1), ("fp8", True), ("source", "x")):
        with pytest.raises(TypeError) as err:
            ZImagePipeline.from_single_files(*files, device="cpu", **{name: value})
        assert str(err.value).startswith(f"ZImagePipeline.from_single_files() got an unexpected keyword argument "
                                         f"'{name}' (its loading options: transformer, vae, text_encoder, "
                                         f"tokenizer, device, dtype, transformer_config,"), str(err.value)
        assert "pipe.optimize()" in str(err.value) and "__init__" not in str(err.value)
    with pytest.raises(ValueError, match=re.escape("HF_TOKEN")):
        ZImagePipeline.from_single_files(*files, device="cpu", token="hf_x")
    seen = {}

    def stand_in(*args, **kwargs):
        seen["dtype"] = args[5]
        raise RuntimeError("stand-in loader")

    monkeypatch.setattr(pipeline, "load_single_files", stand_in)
    with pytest.raises(RuntimeError, match="stand-in loader"):
        ZImagePipeline.from_single_files(*files, device="cpu", torch_dtype=torch.float32, low_cpu_mem_usage=True)
    assert seen["dtype"] is torch.float32


def test_a_callback_turns_cfg_off_part_way_as_in_diffusers(tiny_pipe, reference_pipe, tiny_model_dir):
    """diffusers' dynamic-CFG callback: read ``pipe.num_timesteps``, and at 40% of the steps set
    ``pipe._guidance_scale = 0.0``; the later steps then run without CFG. Here ``num_timesteps`` was
    an AttributeError and the assignment was kept and never read (CFG ran on every step). Now the
    latents are diffusers', with CFG truncation as well, and for img2img ``num_timesteps`` counts
    the steps the strength leaves, as in diffusers."""
    seen = []

    def dynamic_cfg(pipe, i, t, tensors):
        seen.append((pipe.num_timesteps, pipe.guidance_scale, pipe.do_classifier_free_guidance))
        if i == int(pipe.num_timesteps * 0.4):
            pipe._guidance_scale = 0.0
        return tensors

    for extra in ({}, {"cfg_truncation": 0.9}):
        kw = dict(height=32, width=32, num_inference_steps=5, output_type="latent", guidance_scale=3.0,
                  negative_prompt="blurry", **extra)
        expected = reference_pipe("a cat", generator=torch.Generator().manual_seed(0), callback_on_step_end=dynamic_cfg,
                                  **kw).images
        assert seen == [(5, 3.0, True)] * 3 + [(5, 0.0, False)] * 2
        seen.clear()
        got = tiny_pipe("a cat", seed=0, callback_on_step_end=dynamic_cfg, **kw).images
        assert seen == [(5, 3.0, True)] * 3 + [(5, 0.0, False)] * 2
        seen.clear()
        assert_rel(got, expected, 1e-5, f"CFG off after step 2 {extra}")
        assert rel_err(got, tiny_pipe("a cat", seed=0, **kw).images) > 1e-3  # the control: the callback matters
    out = tiny_pipe.img2img("a cat", image=torch.rand(1, 3, 32, 32), strength=0.6, seed=0, num_inference_steps=5,
                            output_type="latent", callback_on_step_end=lambda p, i, t, d: seen.append(p.num_timesteps))
    assert seen == [3, 3, 3] and len(out.images) == 1
    with pytest.raises(ValueError, match=r"set pipe._guidance_scale to 2, but the run started without classifier-free"):
        tiny_pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                  callback_on_step_end=lambda p, i, t, d: setattr(p, "_guidance_scale", 2.0) or d)
    with pytest.raises(ValueError, match=r"set pipe._guidance_scale to -1.0; it must be a number >= 0"):
        tiny_pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                  callback_on_step_end=lambda p, i, t, d: setattr(p, "_guidance_scale", -1.0) or d)


def test_a_callbacks_changes_to_the_run_are_in_its_record(tiny_pipe, tmp_path):
    """A step-end callback that turns CFG off part-way makes another image than its guidance_scale
    does on every step, and so do one that replaces the latents and one that interrupts the run:
    the run's info, the image record and the PNG's parameters text say when and what, and
    --from-image (which has no callback) refuses the record instead of silently making another
    image. A callback that changes nothing records nothing."""
    from PIL import Image

    from zimage_native.cli.generate import from_image_layer
    from zimage_native.metadata import image_record, parameters_text, png_info

    def off_after_three(pipe, i, t, tensors):
        if i == 2:
            pipe._guidance_scale = 0.0
        return tensors

    kw = dict(height=32, width=32, num_inference_steps=5, output_type="latent", guidance_scale=3.0, seed=0)
    changed = tiny_pipe("a cat", callback_on_step_end=off_after_three, **kw)
    assert changed.info["guidance_changes"] == [[3, 0.0]]
    record = image_record(changed.info, 0)
    assert record["guidance_changes"] == [[3, 0.0]]
    assert "CFG scale: 3.0, CFG scale set by a callback: 0 after step 3," in parameters_text(record)
    path = tmp_path / "changed.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(record))
    layer, _ = from_image_layer(path)
    assert "changed its run part-way ({'guidance_changes': [[3, 0.0]]})" in layer["unremakeable"]
    assert "seed" not in layer

    def nudge_then_stop(pipe, i, t, tensors):  # replaced latents after step 1, stopped after step 2
        if i == 1:
            pipe._interrupt = True
        return {"latents": tensors["latents"] * 1.01} if i == 0 else tensors

    stopped = tiny_pipe("a cat", callback_on_step_end=nudge_then_stop, **kw)
    assert stopped.info["callback_replaced"] == [[1, "latents"]] and stopped.info["interrupted_after"] == 2
    assert "guidance_changes" not in stopped.info
    text = parameters_text(image_record(stopped.info, 0))
    assert "Replaced by a callback: latents after step 1, Interrupted after step 2," in text
    path = tmp_path / "stopped.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(image_record(stopped.info, 0)))
    assert "'interrupted_after': 2" in from_image_layer(path)[0]["unremakeable"]
    same = tiny_pipe("a cat", callback_on_step_end=lambda pipe, i, t, d: d, **kw)  # the control
    assert not {"guidance_changes", "callback_replaced", "interrupted_after"} & set(same.info)
    path = tmp_path / "same.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(image_record(same.info, 0)))
    layer, _ = from_image_layer(path)
    assert "unremakeable" not in layer and layer["seed"] == [0]


def test_diffusers_vae_calls_tile_and_slice(tiny_model_dir, reference_pipe):
    """diffusers' Z-Image pipeline has no enable_vae_tiling(): its users write pipe.vae.enable_tiling()
    and pipe.vae.enable_slicing(), which raised AttributeError here (and pipe.enable_vae_slicing() was
    refused). They set the pipeline's tiling and slicing now: slicing gives the batch's images (diffusers'
    sliced decode too), tiling what pipe.enable_vae_tiling() gives; the VAE keeps no pipeline alive."""
    import gc
    import weakref

    from .fixtures import our_pipeline

    pipe = our_pipeline(tiny_model_dir)
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="pt", guidance_scale=0.0)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    batch = pipe(["a cat", "a dog", "a fox"], generator=gens(), **kw).images
    reference_pipe.vae.enable_slicing()
    try:
        expected = reference_pipe(["a cat", "a dog", "a fox"], generator=gens(), **kw).images
    finally:
        reference_pipe.vae.disable_slicing()
    pipe.vae.enable_slicing()
    assert pipe.vae_slicing
    sliced = pipe(["a cat", "a dog", "a fox"], generator=gens(), **kw).images
    assert_rel(sliced, expected, 1e-5, "sliced decode vs diffusers' sliced decode")
    assert_rel(sliced, batch, 1e-6, "sliced vs batched decode")
    image = torch.rand(2, 3, 64, 64)
    img2img = pipe.img2img(["a cat", "a dog"], image=image, strength=0.5, seed=[1, 2], num_inference_steps=2,
                           output_type="latent").images  # the encode is sliced too
    pipe.disable_vae_slicing()
    assert_rel(img2img, pipe.img2img(["a cat", "a dog"], image=image, strength=0.5, seed=[1, 2],
                                     num_inference_steps=2, output_type="latent").images, 1e-6, "sliced encode")
    from zimage_native import sampling

    asked = []
    real = sampling.check_decode_fits
    sampling.check_decode_fits = lambda *args: asked.append(args[5])  # (device, dtype, channels, w, h, images, tile)
    try:
        for on in (False, True):
            pipe.vae_slicing = on
            pipe(["a cat", "a dog"], seed=0, height=32, width=32, num_inference_steps=1)
    finally:
        sampling.check_decode_fits, pipe.vae_slicing = real, False
    assert asked == [2, 1]  # the CPU decode check counts one image when sliced
    pipe.vae.enable_tiling()
    assert pipe.vae_tiling is not None
    pipe.vae.disable_tiling()
    assert pipe.vae_tiling is None
    pipe.enable_vae_slicing()
    pipe.disable_vae_slicing()
    assert not pipe.vae_slicing
    gone = weakref.ref(pipe)
    vae = pipe.vae
    del pipe
    gc.collect()
    assert gone() is None  # the bound names hold the pipeline weakly
    with pytest.raises(RuntimeError, match="the pipeline this VAE belonged to is gone"):
        vae.enable_tiling()



def test_components_shared_by_two_pipelines_set_both_and_outlive_the_second(fresh_pipe, monkeypatch):
    """A second pipeline built with the first's DiT and VAE (``ZImagePipeline(pipe.transformer, pipe.vae,
    ...)``, as a server's remote-encoder pipeline is) took over the names on the shared VAE and DiT: pipe.vae.enable_tiling() set the second pipeline's
    tiling and not the first's, and once the second was gone, pipe.vae.enable_tiling() and
    pipe.transformer.set_attention_backend() raised "the pipeline this VAE belonged to is gone" on
    the first, which still held them. Now each name calls every live pipeline that holds the
    component (compile: the last one built with it, which compiles the shared DiT once)."""
    import copy
    import gc

    from zimage_native.pipeline import ZImagePipeline

    pipe = fresh_pipe
    other = ZImagePipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.scheduler_config, pipe.vae_config)
    pipe.vae.enable_tiling()
    assert pipe.vae_tiling is not None and other.vae_tiling is not None
    other.vae.disable_tiling()
    assert pipe.vae_tiling is None and other.vae_tiling is None
    asked = []
    for name, target in (("pipe", pipe), ("other", other)):
        monkeypatch.setattr(target, "optimize", lambda name=name, **kw: asked.append((name, kw)) or [name])
    assert pipe.transformer.set_attention_backend("native") == ["other"]
    assert pipe.transformer.compile_repeated_blocks() == ["other"]
    assert asked == [("pipe", {"attention": "sdpa"}), ("other", {"attention": "sdpa"}),
                     ("other", {"compile": "blocks", "compile_backend": "inductor", "shapes": "dynamic"})]
    monkeypatch.undo()  # (it holds the pipelines)
    # A pipeline that took another VAE no longer answers to the old one's names.
    third = ZImagePipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.scheduler_config, pipe.vae_config)
    third.vae = copy.deepcopy(pipe.vae)
    pipe.vae.enable_slicing()
    assert pipe.vae_slicing and other.vae_slicing and not third.vae_slicing
    third.vae.enable_slicing()
    assert third.vae_slicing
    old = third.vae
    third.vae = pipe.vae  # (the copy's names: third, which holds another VAE now)
    with pytest.raises(RuntimeError, match=r"vae.enable_tiling: the pipeline this VAE belonged to holds another "
                                           r"VAE now \(pipe.vae was replaced\): call it on pipe.vae"):
        old.enable_tiling()
    third.vae = old
    del other, third, target
    gc.collect()
    asked.clear()
    pipe.vae.disable_slicing()
    assert not pipe.vae_slicing
    monkeypatch.setattr(pipe, "optimize", lambda **kw: asked.append(("pipe", kw)) or ["pipe"])
    assert pipe.transformer.set_attention_backend("native") == ["pipe"]
    assert asked == [("pipe", {"attention": "sdpa"})]
    monkeypatch.undo()
    # A pipeline whose VAE or DiT was dropped (= None, as to free its memory) holds none: not "another".
    vae, dit = pipe.vae, pipe.transformer
    pipe.vae = pipe.transformer = None
    with pytest.raises(RuntimeError, match=r"^vae.enable_tiling: the pipeline this VAE belonged to holds no VAE now "
                                           r"\(pipe.vae = None\)$"):
        vae.enable_tiling()
    with pytest.raises(RuntimeError, match=r"^transformer.set_attention_backend: the pipeline this DiT belonged to "
                                           r"holds no DiT now \(pipe.transformer = None\)$"):
        dit.set_attention_backend("native")
    pipe.vae, pipe.transformer = vae, dit
    vae.enable_tiling()
    assert pipe.vae_tiling is not None


def test_a_copied_component_belongs_to_no_pipeline_and_a_copied_pipeline_to_itself(fresh_pipe, monkeypatch):
    """copy.deepcopy(pipe.vae).enable_tiling() set the original pipeline's tiling (the bound names
    held the original weakly, and a deep copy keeps a weak reference as it is); the same for
    set_attention_backend on a copied DiT. torch.save(pipe.vae) failed (a local function cannot be
    pickled) and copy.deepcopy(pipe) failed on its lock. Now a copied or unpickled component refuses
    those names, saying it belongs to no pipeline, until a pipeline built with it binds them; a
    copied pipeline is a pipeline of its own (its names bound to it) with the same images."""
    import copy
    import io

    from zimage_native.pipeline import ZImagePipeline

    pipe = fresh_pipe
    vae = copy.deepcopy(pipe.vae)
    buffer = io.BytesIO()
    torch.save(pipe.vae, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    for copied in (vae, unpickled):
        for name in ("enable_tiling", "enable_slicing"):
            with pytest.raises(RuntimeError, match=rf"vae.{name}: this VAE is a copy .* belongs to no pipeline"):
                getattr(copied, name)()
        assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), pipe.vae.state_dict().values()))
    assert pipe.vae_tiling is None and not pipe.vae_slicing
    dit = copy.deepcopy(pipe.transformer)
    with pytest.raises(RuntimeError, match="transformer.set_attention_backend: this DiT is a copy"):
        dit.set_attention_backend("flash")

    twin = copy.deepcopy(pipe)
    assert twin.vae is not pipe.vae and twin.transformer is not pipe.transformer and twin._lock is not pipe._lock
    twin.vae.enable_tiling()
    pipe.vae.enable_slicing()
    assert twin.vae_tiling is not None and pipe.vae_tiling is None and pipe.vae_slicing and not twin.vae_slicing
    asked = []
    monkeypatch.setattr(twin, "optimize", lambda attention: asked.append(("twin", attention)) or [])
    monkeypatch.setattr(pipe, "optimize", lambda attention: asked.append(("pipe", attention)) or [])
    twin.transformer.set_attention_backend("flash")
    pipe.transformer.set_attention_backend("native")
    assert asked == [("twin", "flash_attn_2"), ("pipe", "sdpa")]
    assert twin.prompt_rewriter._text_encoder() is twin.text_encoder
    twin.vae.disable_tiling()
    pipe.vae.disable_slicing()
    kw = dict(seed=3, height=32, width=32, num_inference_steps=2, output_type="pt")
    # (not bit-equal on every CPU: the copy's weights are aligned, those read through the file's map
    # may not be, and the CPU kernels take other paths for them: 2e-6 measured)
    assert_rel(twin("a cat", **kw).images, pipe("a cat", **kw).images, 1e-5, "the copy's images")

    other = ZImagePipeline(dit, vae, pipe.text_encoder, pipe.scheduler_config, pipe.vae_config)
    vae.enable_tiling()  # bound by the pipeline built with the copy
    assert other.vae_tiling is not None and pipe.vae_tiling is None and twin.vae_tiling is None

    # A component copied before its pipeline in one deepcopy (the copy of the VAE was made first,
    # belonging to no pipeline, and the copied pipeline's VAE refused enable_tiling)
    first_vae, third = copy.deepcopy([pipe.vae, pipe])
    assert third.vae is first_vae
    first_vae.enable_tiling()
    assert third.vae_tiling is not None and pipe.vae_tiling is None
    first_dit, fourth = copy.deepcopy([pipe.transformer, pipe])  # the DiT's names likewise
    assert fourth.transformer is first_dit and first_dit.compile.func.pipelines() == [fourth]


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_a_copied_compiled_pipeline_runs_its_own_dit(fresh_pipe, mode):
    """compile="full" compiled the DiT's bound methods (forward_tokens, encode_caption): a bound
    method deep-copies as itself, so copy.deepcopy(pipe) ran the original's DiT, weights, LoRA and
    all (the copy's feed-forwards zeroed, its images were the original's, bit for bit). The class's
    function is compiled now, called with the module, which a copy replaces with its own."""
    import copy

    pipe = fresh_pipe
    pipe.optimize(compile=mode, compile_backend="eager")
    kw = dict(seed=3, height=32, width=32, num_inference_steps=1, output_type="pt")
    before = pipe("a cat", **kw).images
    twin = copy.deepcopy(pipe)
    with torch.no_grad():  # run inside forward_tokens only (the modulation is computed outside it)
        for block in twin.transformer.layers:
            for p in block.feed_forward.parameters():
                p.zero_()
    # (a copy's own weights differ from the original's by 2e-6: copied memory is aligned, the file's map is not)
    assert (twin("a cat", **kw).images - before).abs().max() > 1e-2
    assert torch.equal(pipe("a cat", **kw).images, before)


def test_diffusers_set_attention_backend_maps_to_the_engines_backends(tiny_pipe, monkeypatch):
    """diffusers 0.42.1 picks attention with pipe.transformer.set_attention_backend("flash"); that was an
    AttributeError here. Its names map to this engine's backends through optimize(attention=...);
    a name with no counterpart is refused with the choices."""
    from zimage_native.accel import AccelerationUnavailable

    assert tiny_pipe.transformer.set_attention_backend("native") == [] and tiny_pipe._accel["attention"] == "sdpa"
    with pytest.raises(AccelerationUnavailable, match="attention backend 'flash_attn_2' is not available"):
        tiny_pipe.transformer.set_attention_backend("flash")  # mapped, then checked as optimize checks it
    asked = []
    monkeypatch.setattr(tiny_pipe, "optimize", lambda attention: asked.append(attention) or [])
    names = ["native", "_native_cudnn", "_native_math", "flash", "flash_hub", "flash_varlen", "_flash_3",
             "_flash_varlen_3", "_flash_3_hub", "sage", "sage_varlen", "_sage_qk_int8_pv_fp8_cuda", "xformers",
             "SDPA", "flash_attn_3", "auto"]
    for name in names:
        tiny_pipe.transformer.set_attention_backend(name)
    assert asked == ["sdpa"] * 3 + ["flash_attn_2"] * 3 + ["flash_attn_3"] * 3 + ["sage"] * 3 + ["xformers", "sdpa",
                                                                                                   "flash_attn_3", "auto"]
    for name in ("flex", "_native_npu", "aiter_fa2_hub", "flash_4_hub"):
        with pytest.raises(ValueError, match=rf"set_attention_backend\('{name}'\): no such backend here"):
            tiny_pipe.transformer.set_attention_backend(name)


def test_diffusers_xformers_and_attention_slicing_calls(fresh_pipe, monkeypatch, caplog):
    """enable_xformers_memory_efficient_attention() and enable_attention_slicing() were
    AttributeErrors. The first is optimize(attention="xformers") now (disable: "sdpa"); attention
    slicing changes nothing for Z-Image in diffusers 0.42.1 (no Z-Image module slices attention),
    nor here: accepted, with a warning once, the images unchanged."""
    from zimage_native.accel import AccelerationUnavailable

    kw = dict(height=32, width=32, num_inference_steps=1, output_type="latent", seed=0)
    before = fresh_pipe("a cat", **kw).images
    with caplog.at_level("WARNING"):
        fresh_pipe.enable_attention_slicing()
        fresh_pipe.enable_attention_slicing("max")
        fresh_pipe.disable_attention_slicing()
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "changes nothing for Z-Image" in caplog.records[0].message
    assert torch.equal(fresh_pipe("a cat", **kw).images, before)
    with pytest.raises(AccelerationUnavailable, match="attention backend 'xformers' is not available"):
        fresh_pipe.enable_xformers_memory_efficient_attention()  # mapped, then checked as optimize checks it
    with pytest.raises(ValueError, match="attention_op"):
        fresh_pipe.enable_xformers_memory_efficient_attention(attention_op=object())
    asked = []
    monkeypatch.setattr(fresh_pipe, "optimize", lambda attention: asked.append(attention) or [])
    fresh_pipe.enable_xformers_memory_efficient_attention()
    fresh_pipe.disable_xformers_memory_efficient_attention()
    assert asked == ["xformers", "sdpa"]


def test_set_attention_backend_is_bound_on_a_pipeline_without_a_vae(fresh_pipe, monkeypatch):
    """_bind_vae_calls returned early without a VAE, so transformer.set_attention_backend (bound
    there too) was an AttributeError on such a pipeline. Control: the pipeline with its VAE."""
    from zimage_native.pipeline import ZImagePipeline

    asked = []
    monkeypatch.setattr(fresh_pipe, "optimize", lambda attention: asked.append(("with", attention)) or [])
    assert fresh_pipe.transformer.set_attention_backend("flash") == [] and asked == [("with", "flash_attn_2")]
    del fresh_pipe.transformer.__dict__["set_attention_backend"]  # bound to fresh_pipe: the new one binds its own
    bare = ZImagePipeline(fresh_pipe.transformer, None, fresh_pipe.text_encoder, fresh_pipe.scheduler_config,
                          fresh_pipe.vae_config)
    assert bare.vae is None
    monkeypatch.setattr(bare, "optimize", lambda attention: asked.append(("bare", attention)) or [])
    assert bare.transformer.set_attention_backend("native") == [] and asked[-1] == ("bare", "sdpa")
    with pytest.raises(ValueError, match=r"set_attention_backend\('flex'\): no such backend here"):
        bare.transformer.set_attention_backend("flex")


@pytest.mark.parametrize("name, mode", [("compile", "full"), ("compile_repeated_blocks", "blocks")])
def test_diffusers_transformer_compile_compiles_the_run(tiny_model_dir, name, mode):
    """The model card's pipe.transformer.compile() (nn.Module.compile) compiled the DiT's __call__, which
    the pipeline never calls: the run stayed eager (0 frames compiled), and diffusers'
    compile_repeated_blocks() was an AttributeError. They are the engine's compile="full" and
    compile="blocks" now; torch.compile's options that have no counterpart are refused."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from .fixtures import our_pipeline

    pipe = our_pipeline(tiny_model_dir)
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="latent", seed=0)
    expected = pipe("a cat", **kw).images
    for bad, match in ((dict(mode="max-autotune"), "inductor's default mode"),
                       (dict(mode="reduce-overhead"), r"optimize\(cuda_graphs=True\)"), (dict(options={}), "options")):
        with pytest.raises(ValueError, match=rf"transformer.{name}\(.*not taken here.*{match}"):
            getattr(pipe.transformer, name)(**bad)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    lines = getattr(pipe.transformer, name)(backend=counter, fullgraph=True)
    assert any(line.startswith(f"compile: {mode}") for line in lines) and pipe._accel["compile"] == mode
    got = pipe("a cat", **kw).images
    assert counter.frame_count > 0  # the run went through the compiled code
    assert_rel(got, expected, 1e-6, f"transformer.{name}()")


def test_torch_compile_wrapper_assigned_to_the_pipeline_is_refused(fresh_pipe):
    """pipe.transformer = torch.compile(pipe.transformer) ran eagerly: the pipeline calls the DiT's
    forward_tokens, which the wrapper forwards to the uncompiled module."""
    dit = fresh_pipe.transformer
    with pytest.raises(ValueError, match=r"forward_tokens, which the wrapper leaves eager; call "
                                         r"pipe.transformer.compile\(\)"):
        fresh_pipe.transformer = torch.compile(dit)
    assert fresh_pipe.transformer is dit


def test_a_dit_assigned_to_the_pipeline_gets_its_compile_and_attention_calls(tiny_model_dir, fresh_pipe):
    """The names are bound when the pipeline is built: a DiT assigned to pipe.transformer later (a
    loaded file, say) kept nn.Module.compile, which returned None and left the run eager (compiled
    mode None), the trap the refusal of torch.compile's wrapper points away from."""
    from zimage_native.accel.compile import compiled_mode
    from zimage_native.loading import load_component

    dit = load_component("transformer", tiny_model_dir / "transformer", torch.float32, "cpu")
    assert "compile" not in dit.__dict__  # as loaded: no pipeline's names
    fresh_pipe.transformer = dit
    lines = fresh_pipe.transformer.compile(backend="eager")
    assert any(line.startswith("compile: full") for line in lines) and compiled_mode(dit) == ("full", "dynamic")
    assert isinstance(fresh_pipe.transformer.set_attention_backend("native"), list)  # the pipeline answered


@pytest.mark.parametrize("scale", ["x", None, True, float("nan"), float("inf"), [0.5], torch.tensor([0.5]),
                                   torch.ones(2), torch.tensor(True), torch.tensor(float("nan")), torch.tensor(1j)])
def test_joint_attention_kwargs_scale_must_be_a_finite_number(tiny_pipe, scale):
    """Without a LoRA loaded, {"scale": "x"} was accepted (and ignored): it is refused now, with what to give."""
    assert not tiny_pipe.lora_stack.loaded
    with pytest.raises(ValueError, match=r"the LoRA scale must be a finite number such as 0\.8"):
        tiny_pipe("a cat", width=64, height=64, num_inference_steps=1, joint_attention_kwargs={"scale": scale})


def test_joint_attention_kwargs_numeric_scales_are_still_accepted_without_a_lora(tiny_pipe):
    """Control: numbers (ints, numpy floats) change nothing without a LoRA, as in diffusers."""
    import numpy as np

    for scale in (0.5, 1, 0, np.float32(0.8), np.float64(2.0)):
        tiny_pipe._check_attention_kwargs({"scale": scale})
    tiny_pipe._check_attention_kwargs({})
    tiny_pipe._check_attention_kwargs(None)


def test_joint_attention_kwargs_take_a_0d_tensor_scale(tiny_pipe):
    """Some diffusers scripts pass the scale as a 0-d tensor: {"scale": torch.tensor(0.5)} was refused
    as not a number; a 0-d real tensor is its value (other shapes stay refused, above)."""
    plain = tiny_pipe("a cat", width=64, height=64, num_inference_steps=1, seed=0, output_type="latent").images
    for scale in (torch.tensor(0.5), torch.tensor(1), torch.tensor(0.8, dtype=torch.bfloat16)):
        out = tiny_pipe("a cat", width=64, height=64, num_inference_steps=1, seed=0,
                        output_type="latent", joint_attention_kwargs={"scale": scale}).images
        assert torch.equal(out, plain), scale


def test_diffusers_tokenizer_and_components_attributes(tiny_pipe):
    """diffusers users read pipe.tokenizer and pipe.components (to build another pipeline from the
    same parts, or count tokens): both raised a bare AttributeError."""
    import copy

    assert tiny_pipe.tokenizer is tiny_pipe.text_encoder.tokenizer
    assert tiny_pipe.tokenizer("a cat").input_ids  # a transformers tokenizer
    parts = tiny_pipe.components
    assert list(parts) == ["transformer", "vae", "text_encoder", "tokenizer"]
    assert parts["transformer"] is tiny_pipe.transformer and parts["vae"] is tiny_pipe.vae
    assert parts["text_encoder"] is tiny_pipe.text_encoder and parts["tokenizer"] is tiny_pipe.tokenizer
    bare = copy.copy(tiny_pipe)  # (a pipeline of its own: tiny_pipe keeps its text encoder)
    bare.text_encoder = None
    with pytest.raises(AttributeError, match="pipe.tokenizer: this pipeline has no text encoder"):
        bare.tokenizer


def test_output_type_none_says_to_give_np(tiny_pipe):
    """diffusers reads output_type=None as "np" with a deprecation warning; here it is refused with
    the value to give instead (not only the list of types)."""
    with pytest.raises(ValueError, match=r"output_type=None: give output_type='np' for numpy arrays \(what "
                                         r"diffusers returns for None"):
        tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, output_type=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without a CUDA GPU")
def test_model_cpu_offload_without_a_gpu_says_to_leave_it_out(tiny_pipe):
    """enable_model_cpu_offload() on a CPU-only machine said "device 'cuda' is not available ... (use cpu
    or auto)", as if offloading to the CPU meant anything there."""
    with pytest.raises(ValueError, match=r"enable_model_cpu_offload\(\): it keeps the components in CPU memory .* "
                                         r"sees no CUDA GPU; without a GPU the pipeline runs from CPU memory already: "
                                         r"leave the call out") as caught:
        tiny_pipe.enable_model_cpu_offload()
    assert "use cpu or auto" not in str(caught.value) and tiny_pipe.offload != "model"


def test_an_assigned_scheduler_is_refused_not_ignored(tiny_model_dir, tiny_pipe):
    """diffusers' ``pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=6)`` changes its images; here
    the attribute was set and never read (the same latents). Now assigning or reading it raises,
    and the call's ``shift=`` it names gives what diffusers gives with that scheduler."""
    import diffusers

    from .fixtures import reference_pipeline

    kw = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    ref = reference_pipeline(tiny_model_dir)
    default = ref("a cat", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **kw).images
    ref.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
    shifted = ref("a cat", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **kw).images
    assert rel_err(shifted, default) > 1e-2  # the control: the scheduler changes diffusers' image
    with pytest.raises(ValueError, match=r"a scheduler object is not used. Give shift= or sigmas= to the call"):
        tiny_pipe.scheduler = ref.scheduler
    with pytest.raises(AttributeError, match=r"pipe.scheduler: the sampler here is FlowMatch Euler"):
        tiny_pipe.scheduler.config
    assert_rel(tiny_pipe("a cat", seed=0, shift=6.0, **kw).images, shifted, 1e-5, "shift=6.0 vs diffusers' scheduler")


def test_diffusers_lora_method_names_and_save_folders(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from .fixtures import our_pipeline

    pipe = our_pipeline(tiny_model_dir)
    dim = pipe.transformer.config.dim
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "my_lora"  # what diffusers' save_lora_weights writes
    folder.mkdir()
    save_file({"transformer.layers.0.attention.to_k.lora_A.weight": torch.randn(2, dim, generator=g),
               "transformer.layers.0.attention.to_k.lora_B.weight": torch.randn(dim, 2, generator=g)},
              str(folder / "pytorch_lora_weights.safetensors"))
    before = pipe.transformer.layers[0].attention.to_k.weight.clone()
    report = pipe.load_lora_weights(folder, adapter_name="style")
    assert report.matched == 1 and not torch.equal(pipe.transformer.layers[0].attention.to_k.weight, before)
    assert pipe.unload_lora_weights() == 1 and torch.equal(pipe.transformer.layers[0].attention.to_k.weight, before)
    pipe.load_lora_weights(folder, adapter_name="style")
    fused = pipe.transformer.layers[0].attention.to_k.weight.clone()
    pipe.fuse_lora()  # fused already: the weights do not change; as in diffusers, the unload then keeps them
    assert torch.equal(pipe.transformer.layers[0].attention.to_k.weight, fused)
    assert pipe.unload_lora_weights() == 0 and torch.equal(pipe.transformer.layers[0].attention.to_k.weight, fused)
    assert pipe.unload_lora() == 1 and torch.equal(pipe.transformer.layers[0].attention.to_k.weight, before)
    (folder / "other.safetensors").write_bytes(b"")
    (folder / "pytorch_lora_weights.safetensors").rename(folder / "lora.safetensors")
    with pytest.raises(FileNotFoundError, match="2 .safetensors files and no pytorch_lora_weights"):
        pipe.load_lora(folder)
    assert pipe.load_lora_weights(folder, weight_name="lora.safetensors").matched == 1


def test_a_pipeline_without_its_dit_deep_copies(fresh_pipe):
    """pipe.transformer = None (the setter takes it, as to free the DiT's memory) and then
    copy.deepcopy(pipe) failed with AttributeError: 'NoneType' object has no attribute
    'set_attention_backend' (the copy binds its DiT's names, and had none); the copy has no DiT
    either, and its VAE's names are its own."""
    import copy

    pipe = fresh_pipe
    pipe.transformer = None
    twin = copy.deepcopy(pipe)
    assert twin.transformer is None and twin.vae is not pipe.vae
    twin.vae.enable_tiling()
    assert twin.vae_tiling is not None and pipe.vae_tiling is None


def _saved_and_loaded(pipe, how: str):
    import io
    import pickle

    if how == "pickle":
        return pickle.loads(pickle.dumps(pipe))
    buffer = io.BytesIO()
    torch.save(pipe, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_plain_pipeline_pickles_to_a_pipeline_of_its_own_with_the_same_images(fresh_pipe, how):
    """torch.save(pipe) and pickle.dumps(pipe) (as users save diffusers pipelines) failed with "Can't
    pickle local object 'ZImagePipeline.__init__.<locals>.<lambda>'" (the prompt rewriter's
    accessors), and once a prompt was encoded with "cannot pickle 'weakref.ReferenceType' object"
    (the prompt cache's encoder). A plain pipeline pickles now, as copy.deepcopy copies it: its
    settings and fused LoRA kept, its own lock and rewriter, its VAE's and DiT's diffusers names
    bound to it, an empty prompt cache, and the images of the pipeline it was saved from, bit for bit."""
    import copy

    pipe = fresh_pipe
    kw = dict(seed=3, height=32, width=32, num_inference_steps=2, output_type="pt")
    dim = pipe.transformer.config.dim
    g = torch.Generator().manual_seed(0)
    pipe.load_lora({"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, dim, generator=g) * 0.1,
                    "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(3 * dim, 4, generator=g)},
                   scale=0.7)
    pipe.enable_vae_tiling()
    # The copy's weights are in aligned memory, as the unpickled pipeline's are (the original's are
    # read through the file's map: about 1e-6 on some CPUs, see the deepcopy test above).
    twin = copy.deepcopy(pipe)
    want = twin("a cat", **kw).images  # (a run fills the prompt cache)
    assert len(twin.prompt_cache) == 1
    back = _saved_and_loaded(twin, how)
    assert isinstance(back, type(pipe)) and back._lock is not twin._lock and len(back.prompt_cache) == 0
    assert back.prompt_rewriter._text_encoder() is back.text_encoder
    assert torch.equal(back("a cat", **kw).images, want)
    assert back.vae_tiling == twin.vae_tiling and [r.path for r in back.loras] == [r.path for r in twin.loras]
    back.vae.disable_tiling()
    assert back.vae_tiling is None and twin.vae_tiling is not None
    assert back.transformer.compile.func.pipelines() == [back]
    assert back.unload_lora() == twin.unload_lora() == 3  # the LoRA's undo travelled with it
    assert torch.equal(back("a cat", **kw).images, twin("a cat", **kw).images)
    assert not torch.equal(back("a cat", **kw).images, want)
    assert torch.equal(copy.deepcopy(back)("a cat", **kw).images, twin("a cat", **kw).images)
    assert_rel(want, pipe("a cat", **kw).images, 1e-5, "the original's images")


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_an_unpickled_pipeline_with_fused_projections_keeps_the_views_a_lora_reaches(fresh_pipe, how):
    """optimize(kernels="triton") and fp8 fuse q|k|v and w1|w3 into one GEMM each, whose linears'
    weights are views of the fused buffer (accel.fusions). pickle.dumps copies every tensor's storage
    apart (torch.save keeps shared ones shared): the unpickled DiT held those weights twice (tiny
    DiT: 2.37 MB of storages -> 3.65 MB), and a LoRA loaded on it edited the linears but not the
    fused GEMMs: its images were those without the LoRA on q|k|v (max diff to the original's 0.27,
    the LoRA's whole effect). The unpickled pipeline rejoins the views."""
    from zimage_native.accel.fusions import fuse_projections_

    pipe = fresh_pipe
    fuse_projections_(pipe.transformer)  # (as optimize(kernels="triton") does on a GPU)
    kw = dict(seed=3, height=32, width=32, num_inference_steps=2, output_type="pt")
    dim = pipe.transformer.config.dim
    g = torch.Generator().manual_seed(0)
    lora = {"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, dim, generator=g) * 0.1,
            "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(3 * dim, 4, generator=g)}

    def storages(model):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}

    back = _saved_and_loaded(pipe, how)
    assert sum(storages(back.transformer).values()) == sum(storages(pipe.transformer).values())
    attention = back.transformer.layers[0].attention
    assert attention.to_q.weight.untyped_storage().data_ptr() == attention.to_qkv.weight.untyped_storage().data_ptr()
    without = back("a cat", **kw).images
    assert torch.equal(without, pipe("a cat", **kw).images)
    pipe.load_lora(dict(lora), scale=0.7)
    back.load_lora(dict(lora), scale=0.7)
    want = pipe("a cat", **kw).images
    assert not torch.equal(want, without)
    assert torch.equal(back("a cat", **kw).images, want)
    back.unload_lora()
    assert torch.equal(back("a cat", **kw).images, without)


def test_pickling_a_pipeline_with_cuda_graphs_is_refused_saying_what_to_do(fresh_pipe):
    """Captured CUDA graphs replay this process's tensors: pickling a pipeline holding them failed
    with PyTorch's "Can't pickle local object ..." (naming a lambda); it is refused now saying why and
    what to do, as copy.deepcopy refuses it."""
    import io
    import pickle

    from zimage_native.accel.cuda_graphs import GraphedSampler

    from .graph_standins import FrozenGraphs

    fresh_pipe._graphed = GraphedSampler(fresh_pipe, capture=FrozenGraphs().capture)
    message = (r"^cannot pickle a pipeline with CUDA graphs \(optimize\(cuda_graphs=True\)\): .* Save the DiT's "
               r"weights instead .* or pickle the pipeline before optimize\(cuda_graphs=True\)")
    for save in (lambda: torch.save(fresh_pipe, io.BytesIO()), lambda: pickle.dumps(fresh_pipe)):
        with pytest.raises(TypeError, match=message):
            save()
    fresh_pipe._graphed = None
    assert isinstance(pickle.loads(pickle.dumps(fresh_pipe)), type(fresh_pipe))


def test_a_pipeline_with_a_remote_text_encoder_pickles_its_address(fresh_pipe):
    """A remote text encoder holds no connection (each request opens one): it pickles as its address,
    timeouts and token, and the unpickled pipeline reaches the same server."""
    from zimage_native.server.remote import RemoteTextEncoder

    fresh_pipe.text_encoder = RemoteTextEncoder("http://127.0.0.1:9", token="t0k", timeout=7.0)
    back = _saved_and_loaded(fresh_pipe, "torch.save").text_encoder
    assert isinstance(back, RemoteTextEncoder) and back is not fresh_pipe.text_encoder
    assert (back.url, back.token, back.timeout) == ("http://127.0.0.1:9", "t0k", 7.0)
