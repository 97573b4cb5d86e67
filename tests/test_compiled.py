"""Compiled sampling on the CPU: torch.compile presets, no recompilation on a prompt change, the
CUDA-graph wrapper's bookkeeping (with a stand-in capture), fp8 linears and the optimize() order."""

from __future__ import annotations

import logging
import re
import weakref

import pytest
import torch

from zimage_native import ZImagePipeline
from zimage_native.accel.cuda_graphs import GraphedSampler, flatten
from zimage_native.accel.fp8 import Float8Linear, quantize_fp8_
from zimage_native.scheduler import make_schedule

from .graph_standins import FakeGraphs, FrozenGraphs
from .utils import assert_rel, needs_cpu_fp8, rel_err


def counting_compile_backend(ran: list):
    """A torch.compile backend that runs the graphs dynamo made, appending to ``ran`` at each call."""
    def backend(gm, example_inputs):
        def run(*args):
            ran.append(1)
            return gm.forward(*args)
        return run
    return backend

LONG = "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat"
KW = dict(height=32, width=48, num_inference_steps=2, output_type="latent", seed=0)


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_new_prompt_length_does_not_recompile(fresh_pipe, mode):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    lines = fresh_pipe.optimize(compile=mode, compile_backend=counter)
    assert any(line.startswith(f"compile: {mode}") for line in lines)
    fresh_pipe("a cat", **KW)
    frames = counter.frame_count
    assert frames > 0
    fresh_pipe(LONG, **KW)  # another caption length, same bucket and resolution
    fresh_pipe("a dog on a red chair", **KW)
    assert counter.frame_count == frames, "a prompt change recompiled"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_inductor_compiled_matches_eager(tiny_pipe, fresh_pipe, mode):
    torch._dynamo.reset()
    expected = tiny_pipe(["a cat", LONG], **KW).images
    fresh_pipe.optimize(compile=mode)
    got = fresh_pipe(["a cat", LONG], **KW).images
    assert_rel(got, expected, 1e-5, f"compile={mode}")


def test_optimize_is_cumulative_and_refuses_to_undo(fresh_pipe):
    from torch._dynamo.testing import CompileCounterWithBackend

    lines = fresh_pipe.optimize(compile="blocks", compile_backend=CompileCounterWithBackend("eager"))
    assert "shapes dynamic" in lines[-1]  # the sequence dim is symbolic: no caption buckets, no masks
    assert fresh_pipe.optimize(compile="blocks") == []  # already applied: nothing to do
    with pytest.raises(ValueError, match="reload"):
        fresh_pipe.optimize(compile="full")


@needs_cpu_fp8
def test_fp8_asked_after_compile_is_applied_before_compiling_again(fp8_model_dir):
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import CompiledBlock

    torch._dynamo.reset()
    pipe = ZImagePipeline.from_pretrained(fp8_model_dir, device="cpu", dtype=torch.bfloat16)
    pipe.progress = False
    counter = CompileCounterWithBackend("eager")
    pipe.optimize(compile="blocks", compile_backend=counter)
    pipe("a cat", **KW)
    frames = counter.frame_count
    lines = pipe.optimize(fp8=True)
    assert lines[0].startswith("compile: blocks undone") and lines[-1].startswith("compile: blocks")
    assert [line.split(":")[0] for line in lines[1:]] == ["fused GEMMs", "fp8", "attention backend", "compile"]
    block = pipe.transformer.layers[0]
    assert isinstance(block.forward, CompiledBlock) and isinstance(block.feed_forward.w13, Float8Linear)
    pipe("a cat", **KW)
    assert counter.frame_count > frames  # traced again, through the fp8 linears, with the same backend


def test_cuda_graphs_need_a_gpu(fresh_pipe):
    with pytest.raises(ValueError, match="needs the DiT on a CUDA device"):
        fresh_pipe.optimize(cuda_graphs=True)


def graphed(pipe, frozen: bool = True, **kwargs) -> tuple[GraphedSampler, FakeGraphs | FrozenGraphs]:
    """A GraphedSampler on ``pipe`` with a CPU stand-in capture: by default one that replays the
    recorded ops with their Python values frozen, as a CUDA graph does (tests/graph_standins.py)."""
    fake = FrozenGraphs() if frozen else FakeGraphs()
    pipe._graphed = GraphedSampler(pipe, capture=fake.capture, new_event=fake.event, **kwargs)
    return pipe._graphed, fake


def test_captured_graphs_refuse_a_placement_they_cannot_follow(fresh_pipe, monkeypatch):
    """A graph replays the DiT's weights at the addresses it was captured with: offloaded, the DiT is
    copied to the GPU anew on every visit (offload.visit) and those copies are freed after the run,
    so enable_model_cpu_offload() after cuda_graphs would replay freed memory; pipe.to("cpu") would
    leave a CUDA-graph sampler over a CPU model. Both are refused before anything moves."""
    import zimage_native.pipeline as pipeline_module

    sampler, _ = graphed(fresh_pipe)
    fresh_pipe("a cat", **KW)
    assert sampler.captures == 1
    monkeypatch.setattr(pipeline_module, "resolve_device", lambda device: torch.device("cuda"))  # a GPU here
    with pytest.raises(ValueError, match="needs the DiT to stay on the GPU.*CUDA graphs are on"):
        fresh_pipe.enable_model_cpu_offload()
    assert fresh_pipe.offload == "none" and fresh_pipe.placement["transformer"] == torch.device("cpu")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="needs the DiT on a CUDA device.*CUDA graphs are on"):
        fresh_pipe.to("cpu")
    fresh_pipe._graphed = None  # without graphs both are fine
    fresh_pipe.to("cpu")
    fresh_pipe.enable_model_cpu_offload(device="cpu")
    assert fresh_pipe.offload == "model"


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_graphed_sampler_replays_equal_eager_and_keys_without_guidance(fresh_pipe, tiny_pipe, mode):
    sampler, _ = graphed(fresh_pipe, mode=mode)
    cfg = {**KW, "guidance_scale": 2.0, "cfg_truncation": 0.6, "num_inference_steps": 3}
    for prompt in ("a cat", "a dog"):  # one 32-token class
        got = fresh_pipe(prompt, **KW).images
        assert_rel(got, tiny_pipe(prompt, **KW).images, 1e-5, f"graphed {mode} run of {prompt!r}")
    first = sampler.captures
    assert first == 1 and sampler.replays == (4 if mode == "step" else 2)
    for scale in (2.0, 3.5):  # a new guidance value is copied in: no new capture
        got = fresh_pipe("a cat", **{**cfg, "guidance_scale": scale}).images
        assert_rel(got, tiny_pipe("a cat", **{**cfg, "guidance_scale": scale}).images, 1e-5, f"CFG {scale}")
    with_cfg = sampler.captures
    # step mode: one graph per step kind (CFG on, CFG off after truncation); loop mode: one per pattern
    assert with_cfg == first + 1, sampler.graphs.keys()
    fresh_pipe("a cat", **{**KW, "num_inference_steps": 5})  # another step count
    assert sampler.captures == with_cfg + (0 if mode == "step" else 1)


def test_an_unguided_step_of_a_cfg_run_replays_the_plain_graph(fresh_pipe, tiny_pipe):
    """Step mode: the steps that CFG truncation leaves unguided run one forward, as every step of a
    run without CFG does, and replay its graph. They carried the negatives' layout and tokens into
    the graph's inputs, unused: a third graph (a warm-up step and a capture per size, batch and
    caption class) that a cfg_truncation value alone asked for. Each run equals eager bit for bit."""
    sampler, _ = graphed(fresh_pipe)
    kw = {**KW, "num_inference_steps": 3}  # model times 0, 0.14, 0.4 (shift 3)
    runs = [{}, {"guidance_scale": 2.0, "cfg_truncation": 0.3}, {"guidance_scale": 4.0, "cfg_truncation": 0.1}]
    for extra in runs:  # no CFG; guided, guided, plain; guided, plain, plain
        args = {**kw, **extra, "negative_prompt": "blurry"}
        assert torch.equal(fresh_pipe("a cat", **args).images, tiny_pipe("a cat", **args).images), extra
    assert sampler.captures == 2 and sampler.guided_replays == 3, list(sampler.graphs)


def test_loop_graphs_are_keyed_by_the_steps_run_not_where_they_start(fresh_pipe, tiny_pipe):
    """Loop mode: text to image at 2 steps and img2img runs of 2 steps from longer schedules (strength
    0.5 of 4, 0.4 of 5, 0.3 of 6) replay one graph, their sigmas copied in, each equal to eager bit for
    bit. The schedule's step indices were Python constants of the loop: each (steps, start) pair was
    a capture of its own (4 captures here); 3 steps run is another graph."""
    from .test_generation import make_image

    sampler, _ = graphed(fresh_pipe, mode="loop")
    image = make_image(48, 32)
    runs = [dict(num_inference_steps=2), *[dict(image=image, strength=s, num_inference_steps=n)
                                            for s, n in ((0.5, 4), (0.4, 5), (0.3, 6))]]
    for kw in runs:
        assert torch.equal(fresh_pipe("a cat", **{**KW, **kw}).images, tiny_pipe("a cat", **{**KW, **kw}).images), kw
    assert sampler.captures == 1 and sampler.replays == 4, list(sampler.graphs)
    fresh_pipe("a cat", **{**KW, "image": image, "strength": 0.6, "num_inference_steps": 5})  # 3 steps run
    assert sampler.captures == 2


def test_an_unguided_loop_of_a_cfg_run_replays_the_plain_loop_graph(fresh_pipe, tiny_pipe):
    """Loop mode: a CFG run whose every step CFG truncation leaves unguided (a late img2img start)
    runs one forward per step, as a run without CFG does, and replays its graph. It carried the
    negatives' layout and tokens into the loop graph's inputs, unused: a capture of its own. A run
    with a guided step is another graph. Each run equals eager bit for bit."""
    from .test_generation import make_image

    sampler, _ = graphed(fresh_pipe, mode="loop")
    late = dict(image=make_image(48, 32), strength=0.5, num_inference_steps=4)  # model times 0.25, 0.5
    runs = [late, {**late, "guidance_scale": 2.0, "cfg_truncation": 0.2},
            {**late, "guidance_scale": 4.0, "cfg_truncation": 0.1}]
    for extra in runs:  # no CFG; plain, plain; plain, plain
        args = {**KW, **extra, "negative_prompt": "blurry"}
        assert torch.equal(fresh_pipe("a cat", **args).images, tiny_pipe("a cat", **args).images), extra
    assert sampler.captures == 1 and sampler.replays == 3 and sampler.guided_replays == 0, list(sampler.graphs)
    args = {**KW, **late, "guidance_scale": 2.0, "cfg_truncation": 0.3, "negative_prompt": "blurry"}  # guided, plain
    assert torch.equal(fresh_pipe("a cat", **args).images, tiny_pipe("a cat", **args).images)
    assert sampler.captures == 2 and sampler.guided_replays == 1


def test_a_step_end_callback_runs_on_the_replayed_steps_and_equals_eager(fresh_pipe, tiny_pipe):
    """Step mode: a request with callback_on_step_end replays the step graphs, the callback running
    after each replay (queued behind it: no wait). Such a request ran the whole loop eagerly, with
    no notice (0 replays for 3 requests), so a diffusers script that passes a callback lost the
    graphs. The callback gets a copy of the latents (the graph's own are overwritten by the next
    replay), and what it does takes effect as in the eager loop: latents replaced, CFG turned off
    part-way (the plain graph), an interrupt, an inpainting mask replaced. Each run equals eager bit
    for bit, the latents the callback kept at every step too."""
    import numpy as np

    from .test_generation import make_image

    sampler, _ = graphed(fresh_pipe)

    def callback(kept):
        def on_step_end(pipe, i, t, tensors):
            kept.append(tensors["latents"])
            if i == 1:
                pipe._guidance_scale = 0.0
            if i == 2:
                pipe._interrupt = True
            out = {"latents": tensors["latents"] * 0.9} if i == 0 else {}
            if "mask" in tensors and i == 0:
                out["mask"] = torch.ones_like(tensors["mask"])
            return out
        return on_step_end

    mask = np.zeros((32, 48), dtype=np.float32)
    mask[:, 24:] = 1
    inpaint = {"image": make_image(48, 32), "mask_image": mask, "strength": 1.0,
               "callback_on_step_end_tensor_inputs": ["latents", "mask"]}
    runs = [{"guidance_scale": 2.0, "negative_prompt": "blurry"}, {}, inpaint]
    for extra in runs:
        args = {**KW, "num_inference_steps": 4, **extra}
        seen, expected = [], []
        got = fresh_pipe("a cat", callback_on_step_end=callback(seen), **args)
        want = tiny_pipe("a cat", callback_on_step_end=callback(expected), **args)
        assert torch.equal(got.images, want.images), extra
        assert len(seen) == len(expected) == 3 and all(map(torch.equal, seen, expected)), extra
        assert {k: got.info.get(k) for k in ("guidance_changes", "interrupted_after", "callback_replaced")} == \
            {k: want.info.get(k) for k in ("guidance_changes", "interrupted_after", "callback_replaced")}
    # guided, guided, plain (CFG off after step 2); plain x3; inpainting x3
    assert sampler.replays == 9 and sampler.guided_replays == 2 and sampler.captures == 3, list(sampler.graphs)


def test_a_step_end_callback_in_loop_mode_replays_step_graphs_captured_once(fresh_pipe, tiny_pipe):
    """Loop mode: a loop graph has no Python between its steps, so a request with callback_on_step_end
    ran its whole loop eagerly (3 requests of 3 steps: 0 captures, 0 replays, 9 eager DiT forwards).
    Such a request now replays step graphs, captured on demand and cached beside the loop graphs:
    1 capture (its warm-up and recording are the 2 DiT forwards run in Python) and 9 replays for the
    3 requests, each equal to eager bit for bit; a request without a callback still replays its
    loop graph, and the step graph stays cached."""
    sampler, _ = graphed(fresh_pipe, mode="loop")
    forwards = []
    forward = fresh_pipe.transformer.forward_tokens

    def counted_forward(*args, **kwargs):  # the DiT forwards run in Python (a replay runs none)
        forwards.append(1)
        return forward(*args, **kwargs)

    fresh_pipe.transformer.forward_tokens = counted_forward

    def on_step_end(pipe, i, t, tensors):
        return {"latents": tensors["latents"] * 0.99}

    args = {**KW, "num_inference_steps": 3}
    for seed in range(3):
        got = fresh_pipe("a cat", callback_on_step_end=on_step_end, **{**args, "seed": seed}).images
        assert torch.equal(got, tiny_pipe("a cat", callback_on_step_end=on_step_end, **{**args, "seed": seed}).images)
    assert (sampler.captures, sampler.replays, len(forwards)) == (1, 9, 2), [key[0] for key in sampler.graphs]
    assert torch.equal(fresh_pipe("a cat", **args).images, tiny_pipe("a cat", **args).images)
    assert (sampler.captures, sampler.replays) == (2, 10) and [key[0] for key in sampler.graphs] == ["step", "loop"]


def test_a_mask_the_step_end_callback_changes_in_place_is_read_by_the_next_replay(fresh_pipe, tiny_pipe):
    """An inpainting mask a step-end callback changes in place (callback_kwargs["mask"].fill_(1),
    returning nothing) is read by the eager loop's later blends. A replay copied in only the
    tensors that were replaced (a new object), so the graphed run kept the mask as it was: its image
    was the one of a run without the callback, and differed from eager."""
    import numpy as np

    from .test_generation import make_image

    sampler, _ = graphed(fresh_pipe)

    def on_step_end(pipe, i, t, tensors):
        if i == 0:
            tensors["mask"].fill_(1.0)
        return {}

    mask = np.zeros((32, 48), dtype=np.float32)
    mask[:, 24:] = 1
    args = {**KW, "num_inference_steps": 4, "image": make_image(48, 32), "mask_image": mask, "strength": 1.0,
            "callback_on_step_end_tensor_inputs": ["latents", "mask"]}
    got = fresh_pipe("a cat", callback_on_step_end=on_step_end, **args)
    want = tiny_pipe("a cat", callback_on_step_end=on_step_end, **args)
    assert sampler.replays == 4
    assert not torch.equal(want.images, tiny_pipe("a cat", **args).images)  # the change matters
    assert torch.equal(got.images, want.images)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_latents_of_another_dtype_a_step_end_callback_returns_stay_so_as_in_eager(fresh_pipe, tiny_pipe, dtype):
    """A step-end callback that returns the latents in another dtype: the eager loop (and diffusers')
    carries them on, each step casting them to fp32, and returns the last step's as the callback gave
    them (output_type="latent": bfloat16 latents). The graphed run cast them to fp32 for its next replay,
    and returned that: the values of eager, in fp32. Now the dtype of eager too."""
    sampler, _ = graphed(fresh_pipe)

    def on_step_end(pipe, i, t, tensors):
        return {"latents": tensors["latents"].to(dtype)}

    args = {**KW, "num_inference_steps": 3, "callback_on_step_end": on_step_end}
    got, want = fresh_pipe("a cat", **args).images, tiny_pipe("a cat", **args).images
    assert sampler.replays == 3 and want.dtype == dtype
    assert got.dtype == want.dtype and torch.equal(got, want)
def set_from_another_thread(pipe) -> None:
    """``pipe._interrupt = True`` from another thread (diffusers' ``interrupt`` flag), joined at once."""
    import threading

    thread = threading.Thread(target=setattr, args=(pipe, "_interrupt", True))
    thread.start()
    thread.join()


def test_an_interrupt_from_another_thread_stops_a_step_graphed_run_as_the_eager_loop(fresh_pipe, tiny_model_dir):
    """pipe._interrupt = True set by another thread (no step-end callback) after the second step of 5:
    the eager loop stopped there, but step mode read the flag only when a step-end callback ran, so
    the graphed run replayed all 5 steps. It now reads it after each replay (a Python attribute: no
    host sync) and stops after the same step; both records say so (interrupted_after), and the
    latents are equal bit for bit."""
    from .fixtures import our_pipeline

    eager = our_pipeline(tiny_model_dir)
    forwards = []
    forward = eager.transformer.forward_tokens

    def counted_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        forwards.append(1)
        if len(forwards) == 2:
            set_from_another_thread(eager)
        return out

    eager.transformer.forward_tokens = counted_forward
    sampler, fake = graphed(fresh_pipe)
    capture = fake.capture

    def capture_then_interrupt(fn):  # the flag set by another thread after the second replay
        captured = capture(fn)
        replay = captured.replay

        def counted_replay():
            replay()
            if sampler.replays == 1:  # (counted after this replay returns)
                set_from_another_thread(fresh_pipe)

        captured.replay = counted_replay
        return captured

    sampler.capture = capture_then_interrupt
    args = {**KW, "num_inference_steps": 5}
    got, want = fresh_pipe("a cat", **args), eager("a cat", **args)
    assert (sampler.replays, len(forwards)) == (2, 2)
    assert got.info["interrupted_after"] == want.info["interrupted_after"] == 2
    assert torch.equal(got.images, want.images)
    assert not torch.equal(got.images, eager("a cat", **args).images)  # (the flag is reset at each call)
    assert "interrupted_after" not in fresh_pipe("a cat", **args).info and sampler.replays == 2 + 5


def test_a_stop_asked_after_the_last_step_is_no_interruption_in_the_record(fresh_pipe, tiny_pipe, tmp_path):
    """pipe._interrupt set by a step-end callback after the last step stops nothing: the run is whole.
    The callback's wrapper recorded interrupted_after 3 for a 3-step run all the same (eager and
    graphed), so the PNG said "Interrupted after step 3" and --from-image refused to remake an image
    equal to the plain run's, while the flag set by another thread then recorded nothing. Now neither
    does; a stop after step 2 of 3 is still recorded, in both loops."""
    from PIL import Image

    from zimage_native.cli.generate import from_image_layer
    from zimage_native.metadata import image_record, png_info

    def stop_after(step):
        def on_step_end(pipe, i, t, tensors):
            if i + 1 == step:
                pipe._interrupt = True
            return tensors
        return on_step_end

    sampler, _ = graphed(fresh_pipe)
    args = {**KW, "num_inference_steps": 3, "seed": 0}
    whole = tiny_pipe("a cat", **args).images
    for pipe in (tiny_pipe, fresh_pipe):
        out = pipe("a cat", callback_on_step_end=stop_after(3), **args)
        assert torch.equal(out.images, whole) and "interrupted_after" not in out.info
        path = tmp_path / "whole.png"
        Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(image_record(out.info, 0)))
        assert "unremakeable" not in from_image_layer(path)[0]
        assert pipe("a cat", callback_on_step_end=stop_after(2), **args).info["interrupted_after"] == 2
    assert sampler.replays == 3 + 2


def test_a_loop_graph_runs_every_step_whatever_the_interrupt_flag(fresh_pipe, tiny_pipe):
    """Loop mode: one replay runs every step, so pipe._interrupt set by another thread cannot stop it
    (docs/performance.md): the run ends with all its steps, recorded as not interrupted. The flag set
    while the loop was captured was read by the captured loop, which stopped after its first step:
    the cached graph held 1 step of 4, and every later request replayed it (its latents differed
    from eager by 2.4). No capture reads the flag now."""
    sampler, fake = graphed(fresh_pipe, mode="loop")
    capture = fake.capture

    def interrupted_capture(fn):
        def flagged():  # the flag set from another thread as the capture begins
            set_from_another_thread(fresh_pipe)
            return fn()
        return capture(flagged)

    sampler.capture = interrupted_capture
    args = {**KW, "num_inference_steps": 4}
    want = tiny_pipe("a cat", **args).images
    for _ in range(2):
        out = fresh_pipe("a cat", **args)
        assert torch.equal(out.images, want) and "interrupted_after" not in out.info
    assert (sampler.captures, sampler.replays) == (1, 2)


def test_latents_or_a_mask_a_step_end_callback_returns_on_another_device_are_refused_by_name(fresh_pipe, tiny_pipe):
    """Latents (or an inpainting mask) a step-end callback returns on another device than the run's
    (a CPU tensor in a GPU run; "meta" stands in here): the eager loop failed inside the DiT ("Tensor
    on device cpu is not on the expected device meta!"), and the graphed run tried to capture a graph
    for the other device's latents first (on a GPU: after evicting one from a full cache). Both
    refuse after the callback, naming the device, and the graphed run captures nothing for it."""
    import numpy as np

    from .test_generation import make_image

    sampler, _ = graphed(fresh_pipe)
    mask = np.zeros((32, 48), dtype=np.float32)
    mask[:, 24:] = 1
    inpaint = {"image": make_image(48, 32), "mask_image": mask, "strength": 1.0,
               "callback_on_step_end_tensor_inputs": ["latents", "mask"]}
    for name, extra in (("latents", {}), ("mask", inpaint)):
        def on_step_end(pipe, i, t, tensors, name=name):
            return {name: torch.empty_like(tensors[name], device="meta")}
        for pipe in (fresh_pipe, tiny_pipe):
            with pytest.raises(ValueError, match=rf"^callback_on_step_end returned {name} on meta after step 1; the "
                                                 rf"run's are on cpu: return them there"):
                pipe("a cat", callback_on_step_end=on_step_end, **{**KW, **extra})
    assert sampler.captures == 2 and sampler.replays == 2, list(sampler.graphs)  # the first step of each request


def test_graphed_runs_from_several_threads_keep_their_own_images(fresh_pipe, tiny_pipe):
    """The graphs' static buffers are shared: runs from several threads must not interleave (the
    pipeline serialises them), so each thread gets the image its request gives alone."""
    import threading
    import time

    graphed(fresh_pipe, mode="step")
    requests = {f"t{i}": (prompt, i) for i, prompt in enumerate(("a cat", "a dog", "a red fox"))}
    results, errors = {}, []

    def worker(name):
        prompt, seed = requests[name]
        try:
            slow = lambda step, total: time.sleep(0.02)  # noqa: E731 - a slow step invites interleaving
            results[name] = fresh_pipe(prompt, callback=slow, **{**KW, "seed": seed}).images
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(name,)) for name in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 3
    for name, (prompt, seed) in requests.items():
        assert_rel(results[name], tiny_pipe(prompt, **{**KW, "seed": seed}).images, 1e-5, name)


def test_evicted_graph_output_is_freed_before_the_next_capture(fresh_pipe):
    """The loop graph's output lives in its graph's memory pool: nothing may keep it alive while the
    next graph is captured, or the evicted pool cannot be reused for the new one."""
    sampler, fake = graphed(fresh_pipe, mode="loop", max_graphs=1)
    outputs, alive_at_capture = [], []
    capture = fake.capture

    def recording_capture(fn):
        alive_at_capture.append([ref() is not None for ref in outputs])
        captured = capture(fn)
        outputs.append(weakref.ref(captured.output))
        return captured

    sampler.capture = recording_capture
    for height in (32, 48):
        fresh_pipe("a cat", **{**KW, "height": height})
    assert (sampler.captures, sampler.evictions, fake.released) == (2, 1, 1)
    assert alive_at_capture == [[], [False]]


def test_graph_cache_is_lru_bounded_and_releases(fresh_pipe):
    sampler, fake = graphed(fresh_pipe, max_graphs=2)
    for height in (32, 48, 64):  # three latent sizes: three graphs, the first evicted and released
        fresh_pipe("a cat", **{**KW, "height": height})
    assert (sampler.captures, sampler.evictions, fake.released, len(sampler.graphs)) == (3, 1, 1, 2)
    fresh_pipe("a cat", **{**KW, "height": 48})  # still cached: moved to the recent end
    fresh_pipe("a cat", **{**KW, "height": 32})  # recaptured; evicts 64 (least recently used), not 48
    assert (sampler.captures, fake.released) == (4, 2)
    assert [key_height(k) for k in sampler.graphs] == [48 // 8, 32 // 8]  # latent heights
    sampler.clear()
    assert not sampler.graphs and fake.released == 4


def test_a_stream_with_more_step_kinds_than_the_cache_warns_once_naming_the_option(fresh_pipe, caplog):
    """A stream that cycles through more step kinds than max_graphs evicts and recaptures a graph on
    every request (an eager warm-up step and a capture instead of a replay): the sampler says so once,
    naming max_graphs and the option that raises it. Evictions alone (a size not seen again) do not."""
    sampler, _ = graphed(fresh_pipe, frozen=False, max_graphs=2)
    with caplog.at_level(logging.WARNING, logger="zimage_native.accel.cuda_graphs"):
        for height in (32, 48, 64):  # three sizes, each once: one eviction, no graph captured again
            fresh_pipe("a cat", **{**KW, "height": height})
        assert (sampler.captures, sampler.evictions, sampler.recaptures) == (3, 1, 0)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        for _ in range(2):  # round-robin over the three: every request evicts and recaptures
            for height in (32, 48, 64):
                fresh_pipe("a cat", **{**KW, "height": height})
    assert (sampler.captures, sampler.evictions, sampler.recaptures) == (9, 7, 6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "max_graphs=2" in warnings[0] and "--graph-cache-size" in warnings[0]
    assert "captured again" in warnings[0]


def test_a_capture_after_the_graphs_were_cleared_is_not_a_thrash(fresh_pipe, caplog):
    """clear() (a move, an fp8 or LoRA change, a new attention backend) drops every graph, so each step
    kind is captured again whatever the cache's size: a size evicted before the clear and met after it
    counted as a recapture and logged the thrash warning, advising a larger --graph-cache-size that
    would have changed nothing (max_graphs=2, three sizes, clear, the first size again: 1 recapture)."""
    sampler, _ = graphed(fresh_pipe, frozen=False, max_graphs=2)
    with caplog.at_level(logging.WARNING, logger="zimage_native.accel.cuda_graphs"):
        for height in (32, 48, 64):  # 32 is evicted
            fresh_pipe("a cat", **{**KW, "height": height})
        sampler.clear()
        fresh_pipe("a cat", **{**KW, "height": 32})
        assert (sampler.captures, sampler.evictions, sampler.recaptures) == (4, 1, 0)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        for height in (48, 64, 32):  # a real thrash after it is still told
            fresh_pipe("a cat", **{**KW, "height": height})
    assert sampler.recaptures == 1 and len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_the_capture_line_names_the_caption_class_and_cfg(fresh_pipe, caplog):
    """A new caption class or CFG is a capture at a size already captured: the log line says which,
    not only the latents' shape (which is the same for all three here)."""
    graphed(fresh_pipe, frozen=False)
    with caplog.at_level(logging.INFO, logger="zimage_native.accel.cuda_graphs"):
        for prompt, guidance in (("a cat", 0.0), (LONG, 0.0), ("a cat", 2.0)):
            fresh_pipe(prompt, guidance_scale=guidance, **{**KW, "num_inference_steps": 1})
    lines = [r.getMessage() for r in caplog.records if "captured a CUDA graph" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "caption 32 tokens, no CFG" in lines[0] and "caption 64 tokens, no CFG" in lines[1], lines
    assert "caption 32 tokens, CFG with negatives of 32 tokens" in lines[2], lines


def test_the_capture_line_names_the_inpainting_blend_and_the_controlnet(fresh_pipe, caplog):
    """An inpainting or a control request is a capture of its own at a size, caption and CFG already
    captured (its blend, the ControlNet's hints are part of the step): the line said the same as the
    text-to-image capture's."""
    import numpy as np

    from .test_generation import make_image

    graphed(fresh_pipe, frozen=False)
    mask = np.zeros((32, 48), dtype=np.float32)
    mask[:, 24:] = 1
    one = {**KW, "num_inference_steps": 2}
    with caplog.at_level(logging.INFO, logger="zimage_native.accel.cuda_graphs"):
        fresh_pipe("a cat", **one)
        fresh_pipe("a cat", image=make_image(48, 32), mask_image=mask, strength=1.0, **one)
    lines = [r.getMessage() for r in caplog.records if "captured a CUDA graph" in r.getMessage()]
    assert len(lines) == 2 and lines[0] != lines[1], lines
    assert "no CFG (" in lines[0] and "no CFG, inpainting blend (" in lines[1], lines
    from types import SimpleNamespace

    from zimage_native.accel.cuda_graphs import step_kind

    control = SimpleNamespace(plain=(None, torch.zeros(1, 32, 8)), negative=None, blend=None, extra=object())
    assert step_kind(control) == "caption 32 tokens, no CFG, ControlNet hints"  # a control request's step


def test_a_server_mix_of_caption_classes_is_captured_once_in_one_shared_pool(fresh_pipe, monkeypatch):
    """Prompts falling in many 32-token caption classes at one size, with and without CFG, round after
    round: every graph is captured once (with the old default cache of 8 graphs, each of pool of its
    own, every request evicted and recaptured one). The default capture puts every graph in one pool."""
    from zimage_native.accel import cuda_graphs
    from zimage_native.model.sequence import ceil_to

    sampler, fake = graphed(fresh_pipe, frozen=False)  # the default cache size
    words = "red green blue cat dog tree house river mountain sky".split()
    prompts, classes, n = [], set(), 1
    while len(prompts) < 10:
        prompt = " ".join(words[i % len(words)] for i in range(n))
        tokens = len(fresh_pipe.text_encoder.tokenize(fresh_pipe.format_prompts([prompt]))[0])
        if ceil_to(tokens) not in classes:
            classes.add(ceil_to(tokens))
            prompts.append(prompt)
        n += 3
    # One step: step mode keys a graph by the step's kind (CFG or not), not by the step, so a second
    # step would only replay the graph the first one captured.
    kw = {**KW, "num_inference_steps": 1, "output_type": "latent"}
    for round_ in range(2):
        for prompt in prompts:
            for guidance in (0.0, 2.0):
                fresh_pipe(prompt, guidance_scale=guidance, **kw)
        if round_ == 0:
            captured = sampler.captures
    assert captured == sampler.captures == 20 and sampler.evictions == 0 and len(classes) == 10

    pools, handles = [], []
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: handles.append(object()) or handles[-1])
    monkeypatch.setattr(cuda_graphs, "cuda_capture", lambda fn, pool=None: pools.append(pool) or cuda_graphs.Captured(
        fn(), lambda: None))
    default = cuda_graphs.GraphedSampler(fresh_pipe)
    assert isinstance(default.capture, cuda_graphs.SharedPoolCapture)
    for _ in range(3):
        default.capture(lambda: torch.zeros(1))
    assert len(handles) == 1 and pools == [handles[0]] * 3  # one pool, made once, for every capture


def key_height(key):
    return next(spec[1][2] for spec in key[1] if spec[0] == "T" and len(spec[1]) == 4)


def test_graphed_steps_report_progress_one_step_behind_and_cancel(fresh_pipe):
    sampler, fake = graphed(fresh_pipe)
    seen = []
    fresh_pipe("a cat", **{**KW, "num_inference_steps": 4}, callback=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # Step k's event is waited for only after step k+1 is queued: the GPU never idles for Python.
    assert fake.log == ["replay", "record", "replay", "record", "wait", "replay", "record", "wait",
                        "replay", "record", "wait", "wait"]
    fake.log.clear()
    fresh_pipe("a cat", **{**KW, "num_inference_steps": 4})  # no callback, no progress: no waits at all
    assert fake.log == ["replay"] * 4

    def cancel(k, n):
        if k == 2:
            raise KeyboardInterrupt("cancelled")

    fake.log.clear()
    with pytest.raises(KeyboardInterrupt):
        fresh_pipe("a cat", **{**KW, "num_inference_steps": 8}, callback=cancel)
    assert fake.log.count("replay") == 3  # cancelled after step 2, with step 3 already queued


def test_graphed_steps_show_the_progress_bar_options(fresh_pipe, capsys):
    """The graphed per-step loop draws the same bar as the eager one, with set_progress_bar_config's
    tqdm options."""
    graphed(fresh_pipe)
    fresh_pipe.set_progress_bar_config(desc="my steps", ascii=True)
    fresh_pipe("a cat", **{**KW, "num_inference_steps": 2}, progress=True)
    err = capsys.readouterr().err
    assert "my steps" in err and "denoise" not in err and "2/2" in err
    fresh_pipe("a cat", **{**KW, "num_inference_steps": 2}, progress=False)
    assert "my steps" not in capsys.readouterr().err


def test_flatten_round_trips_a_plan(tiny_pipe):
    embeds = tiny_pipe.encode_prompt(["a cat"])
    plan = tiny_pipe.plan((4, 6), embeds, embeds, make_schedule(tiny_pipe.scheduler_config, 3), guidance_scale=2.0)
    tensors, rebuild, signature = flatten(plan)
    copy = rebuild([t.clone() for t in tensors])
    again, _, signature2 = flatten(copy)
    assert signature == signature2 and all(torch.equal(a, b) for a, b in zip(tensors, again))
    assert copy.steps[1].guided and copy.guidance_scale == 2.0


@needs_cpu_fp8
def test_float8_linear_matches_its_reference_and_stays_close_to_bf16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).to(torch.bfloat16)
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16)
    fp8 = Float8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn
    assert rel_err(fp8(x), fp8.reference(x)) < 1e-2  # the fast path (torch._scaled_mm) against its slow twin
    assert rel_err(fp8(x), linear(x)) < 0.06  # e4m3 quantisation error


@pytest.fixture(scope="module")
def fp8_model_dir(tmp_path_factory):
    from .dit_configs import TINY_FP8_DIT
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny-fp8"), TINY_FP8_DIT)


@needs_cpu_fp8
@pytest.mark.parametrize("fast_accum", [True, False], ids=["fast accumulation", "fp32 accumulation"])
def test_fp8_pipeline_converts_block_linears_and_stays_close(fp8_model_dir, fast_accum):
    pipe = ZImagePipeline.from_pretrained(fp8_model_dir, device="cpu", dtype=torch.bfloat16)
    pipe.progress = False
    reference = pipe("a cat", **{**KW, "output_type": "np"}).images
    from zimage_native.accel import optimize

    lines = optimize(pipe.transformer, fp8=True, fp8_fast_accum=fast_accum)
    # TINY_FP8_DIT: 4 blocks x (q, k, v, out, w1, w2, w3); q|k|v and w1|w3 quantised as 2 fused GEMMs per block.
    assert lines[0] == "fused GEMMs: q|k|v in 4 attention modules, w1|w3 in 4 feed-forwards"
    assert lines[1].startswith("fp8: 28 linears in float8 e4m3 (8 as fused GEMMs, "
                               + ("fast" if fast_accum else "fp32") + " accumulation")
    fp8 = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, Float8Linear)}
    assert all(".attention." in n or ".feed_forward." in n for n in fp8)
    block = pipe.transformer.layers[0]
    assert isinstance(block.feed_forward.w13, Float8Linear) and isinstance(block.attention.to_qkv, Float8Linear)
    assert block.feed_forward.w1.weight.data_ptr() == block.feed_forward.w13.weight.data_ptr()  # views, no copy
    assert isinstance(pipe.transformer.final_layer.linear, torch.nn.Linear)
    assert not any(k.endswith(("to_qkv.weight", "w13.weight")) for k in pipe.transformer.state_dict())
    calls = []
    quantize = block.feed_forward.w13.quantize
    for m in fp8.values():
        m.quantize = lambda x, q=quantize: calls.append(x.shape) or q(x)
    got = pipe("a cat", **{**KW, "output_type": "np"}).images
    # 2 steps x 3 blocks on the step path x 4 GEMM inputs (qkv, out, w13, w2): one quantisation per fusion.
    assert len(calls) == 2 * 3 * 4 + 4
    from zimage_native.bench import psnr

    quality = psnr(got, reference)
    print(f"fp8 tiny-model PSNR vs bf16 ({'fast' if fast_accum else 'fp32'} accumulation): {quality:.1f} dB")
    assert quality > 20  # lossy, but the same image


def test_fp8_quantises_activations_in_one_kernel_wherever_nothing_compiles_them(monkeypatch, caplog):
    """Eager quantize_rows is nine passes over every activation: on a CUDA GPU with Triton, fp8 takes
    the one-pass kernel (the same bits) even without --kernels triton, unless compile fuses the
    eager code; on the CPU (no GPU kernels) and without Triton it stays eager."""
    from zimage_native import accel

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(accel, "triton_unavailable_reason", lambda: None)
    assert accel.fp8_quantize_kernel("triton", "blocks", cuda) and accel.fp8_quantize_kernel("triton", "off", cpu)
    monkeypatch.setattr(accel, "quantizer_problem", lambda device: None)
    assert accel.fp8_quantize_kernel("none", "off", cuda)
    monkeypatch.setattr(accel, "quantizer_problem", lambda device: "RuntimeError: PTX .version 8.7 does not support")
    with caplog.at_level("WARNING", logger="zimage_native.accel"):
        assert not accel.fp8_quantize_kernel("none", "off", cuda)  # not asked for: the eager twin, with a warning
    assert "does not run here (RuntimeError: PTX .version 8.7" in caplog.text
    assert not accel.fp8_quantize_kernel("none", "blocks", cuda) and not accel.fp8_quantize_kernel("none", "full", cuda)
    assert not accel.fp8_quantize_kernel("none", "off", cpu)
    monkeypatch.setattr(accel, "triton_unavailable_reason", lambda: "the triton package is not installed")
    assert not accel.fp8_quantize_kernel("none", "off", cuda)


def test_the_quantiser_probe_runs_the_kernel_and_reports_what_fails(monkeypatch):
    pytest.importorskip("triton")
    from zimage_native import accel

    kernels = accel.load_kernels(interpret=not torch.cuda.is_available())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: Triton's interpreter
    kernels.reset_launch_counts()
    assert accel.quantizer_problem(device) is None
    assert kernels.launch_counts().get("quantize_fp8_rows") == 1
    monkeypatch.setattr(accel, "load_kernels", lambda: (_ for _ in ()).throw(RuntimeError("no sm_120 in ptxas\nx")))
    assert accel.quantizer_problem(device) == "RuntimeError: no sm_120 in ptxas"


@needs_cpu_fp8
def test_optimize_gives_fp8_the_kernel_it_chose(fp8_model_dir, monkeypatch):
    pytest.importorskip("triton")
    from zimage_native import accel

    accel.load_kernels(interpret=not torch.cuda.is_available())
    pipe = ZImagePipeline.from_pretrained(fp8_model_dir, device="cpu", dtype=torch.bfloat16)
    chosen = []
    monkeypatch.setattr(accel, "fp8_quantize_kernel", lambda *args: chosen.append(args) or True)
    lines = accel.optimize(pipe.transformer, fp8=True)
    assert chosen == [("none", "off", torch.device("cpu"))]
    assert "activations quantised by zimage::quantize_fp8_rows" in lines[1]
    layer = pipe.transformer.layers[0].attention.to_qkv
    assert layer.quantize is torch.ops.zimage.quantize_fp8_rows


def test_fp8_gemms_meet_the_cuda_layout_rules():
    """Every fp8 GEMM of a converted DiT (fused q|k|v and w1|w3, their views, the plain linears) passes
    PyTorch's own checks for torch._scaled_mm on CUDA: a row-major activation, a column-major weight,
    dimensions in multiples of 16, per-row fp32 scales of shape (M, 1) and (1, N), contiguous. The
    CPU kernel is laxer, so this runs on fake CUDA tensors (FakeTensorMode: shapes, strides and
    device checks, no data and no GPU). A row-major weight, which the CPU would take, fails there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zimage_native.accel.fusions import fuse_projections_
    from zimage_native.config import TransformerConfig
    from zimage_native.model.transformer import ZImageTransformer
    from zimage_native.testing import randomize_

    from .dit_configs import TINY_FP8_DIT

    model = randomize_(ZImageTransformer(TransformerConfig.from_dict(TINY_FP8_DIT))).to(torch.bfloat16).eval()
    fuse_projections_(model)  # what optimize(fp8=True) does, without the CPU's own fp8 check
    quantize_fp8_(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert len(layers) == 28 + 8  # 4 blocks x 7 linears, 8 of them views of the 2 fused GEMMs per block
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    cuda = torch.device("cuda", 0)

    def to_fake_cuda(t):
        with mode:
            return mode.from_tensor(t).to(cuda)

    for layer in layers.values():
        layer._apply(to_fake_cuda)
    with mode, torch.no_grad():
        for name, layer in layers.items():
            x = torch.empty(2, 77, layer.in_features, device=cuda, dtype=torch.bfloat16)
            out = layer(x)
            assert out.device == cuda and out.shape == (2, 77, layer.out_features) and out.dtype == torch.bfloat16
        a, b = (torch.empty(*shape, device=cuda, dtype=torch.float8_e4m3fn) for shape in ((16, 32), (32, 16)))
        with pytest.raises(RuntimeError, match="col_major"):
            torch._scaled_mm(a, b, scale_a=torch.empty(16, 1, device=cuda),
                             scale_b=torch.empty(1, 16, device=cuda), out_dtype=torch.bfloat16)


def test_fp8_on_a_gpu_needs_sm89_and_a_bfloat16_dit():
    """The GPU checks behind check_fp8_supported, which the CPU cannot reach: fp8 tensor cores, and
    bfloat16 outputs (the per-row scaled GEMM writes bfloat16 only)."""
    from zimage_native.accel.fp8 import gpu_fp8_problem

    assert gpu_fp8_problem((9, 0), "NVIDIA H100", {torch.bfloat16}) is None
    assert gpu_fp8_problem((8, 9), "NVIDIA L4", {torch.bfloat16}) is None
    assert "sm86" in gpu_fp8_problem((8, 6), "NVIDIA GeForce RTX 3090", {torch.bfloat16})
    assert "float16, float32: load it with dtype bfloat16" in gpu_fp8_problem(
        (9, 0), "NVIDIA H100", {torch.bfloat16, torch.float32, torch.float16})


class _OnCuda(torch.nn.Module):
    """A module whose parameters claim to live on cuda:0 in bfloat16 (the checks read only that)."""

    def parameters(self, recurse=True):
        from types import SimpleNamespace

        yield SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, is_floating_point=lambda: True)


@pytest.mark.parametrize("capability", [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0), (12, 0)])
def test_compile_is_refused_where_inductor_skips_bfloat16(monkeypatch, capability):
    """Inductor skips every bfloat16 graph on a GPU whose torch.cuda.is_bf16_supported(including_emulation=
    False) is False, with a warning, and the model runs eagerly: there compile (of the DiT and of the
    VAE decode) is refused with the reason, and the threshold is torch's own."""
    import inspect
    from types import SimpleNamespace

    from torch._inductor import compile_fx

    from zimage_native.accel import AccelerationUnavailable
    from zimage_native.accel.compile import check_compile_supported, gpu_compile_problem
    from zimage_native.accel.vae import compile_vae_decode_

    source = inspect.getsource(compile_fx._check_triton_bf16_support)
    assert "is_bf16_supported(including_emulation=False)" in source and "SkipFrame" in source
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=capability[0]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert native == (capability >= (8, 0))
    problem = gpu_compile_problem(capability, "Tesla T4", {torch.bfloat16})
    assert (problem is None) == native
    assert gpu_compile_problem(capability, "Tesla T4", {torch.float16, torch.float32}) is None
    if native:
        check_compile_supported(_OnCuda(), "inductor")
        return
    assert f"on Tesla T4 (sm{capability[0]}{capability[1]}; native bfloat16 starts at compute capability 8.0)" in problem
    with pytest.raises(AccelerationUnavailable, match="run the DiT eagerly"):
        check_compile_supported(_OnCuda(), "inductor")
    check_compile_supported(_OnCuda(), "eager")  # another backend is not inductor's business
    with pytest.raises(AccelerationUnavailable, match="run the VAE decode eagerly"):
        compile_vae_decode_(_OnCuda())


def test_compile_without_triton_on_a_gpu_is_refused_before_any_work(monkeypatch):
    """Inductor writes its CUDA kernels in Triton: without it the first call fails, after the weights
    are loaded (Windows without triton-windows is the usual case). Refused up front, with the hint;
    the CPU (C++ kernels) and other backends do not need Triton."""
    from zimage_native.accel import AccelerationUnavailable, _kernels
    from zimage_native.accel.compile import check_compile_supported
    from zimage_native.accel.vae import compile_vae_decode_

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA GeForce RTX 4090")
    check_compile_supported(_OnCuda(), "inductor")  # Triton importable here
    monkeypatch.setattr(_kernels.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AccelerationUnavailable, match=r"writes its CUDA kernels in Triton, and the triton package "
                                                      r"is not installed; install it with .*triton-windows"):
        check_compile_supported(_OnCuda(), "inductor")
    with pytest.raises(AccelerationUnavailable, match="triton package is not installed"):
        compile_vae_decode_(_OnCuda())
    check_compile_supported(_OnCuda(), "eager")
    check_compile_supported(torch.nn.Linear(2, 2), "inductor")  # on the CPU


def test_from_pretrained_checks_the_accelerations_before_reading_weights(tiny_model_dir, monkeypatch):
    """What needs only the DiT's device and the dtype is checked before any weights are read (or
    downloaded): a probe stands for the DiT in the same checks the transforms run."""
    import zimage_native.pipeline as pipeline_module
    from zimage_native.accel import _kernels, check_before_loading

    monkeypatch.setattr(pipeline_module, "load_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="cuda_graphs needs the DiT on a CUDA device; it is on cpu"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="offload='blocks' streams"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", offload="blocks", fp8=True)
    # (kernels="triton" on the CPU is refused too, unless an earlier test built the kernels for
    # Triton's CPU interpreter: test_kernels_* do)
    with pytest.raises(ValueError, match="compile must be one of"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", compile="fast")
    with pytest.raises(RuntimeError, match="'flash_attn_3' is not available: needs a CUDA GPU"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", attention="flash_attn_3")
    monkeypatch.setenv("ZIMAGE_ATTENTION", "xformers")  # the backend named by the environment too
    with pytest.raises(RuntimeError, match="'xformers' is not available: needs a CUDA GPU"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    monkeypatch.setattr(_kernels.importlib.util, "find_spec", lambda name, *a: None)
    check_before_loading("cpu", "auto", compile="blocks", vae_compile=True)  # on the CPU: C++ kernels, no Triton


def test_the_checks_before_loading_on_a_gpu(monkeypatch):
    """On a (faked) CUDA GPU the same checks run against a probe standing for the DiT: compile on a
    T4 in bfloat16 and fp8 on an RTX 3090 are refused before loading; the probe's linear is one the
    fp8 check reads (a block's attention projection)."""
    from types import SimpleNamespace

    import zimage_native.accel as accel
    import zimage_native.devices as devices
    from zimage_native.accel import AccelerationUnavailable, check_before_loading
    from zimage_native.accel.fp8 import _in_block

    real = accel._Probe
    probe = real(torch.device("cpu"), torch.bfloat16)
    assert [n for n, m in probe.named_modules() if type(m) is torch.nn.Linear and _in_block(n)] == \
        ["layers.0.attention.to_q"]
    seen = []

    class OnCuda(torch.nn.Module):  # the probe, its parameter claiming cuda:0
        def __init__(self, device, dtype):
            super().__init__()
            seen.append((device, dtype))
            self.inner = real(torch.device("cpu"), dtype)

        def parameters(self, recurse=True):
            yield SimpleNamespace(device=torch.device("cuda", 0), dtype=seen[-1][1], is_floating_point=lambda: True)

        def named_modules(self, *a, **k):  # the real probe's, built on the CPU in the dtype
            return self.inner.named_modules(*a, **k)

    monkeypatch.setattr(accel, "_Probe", OnCuda)
    monkeypatch.setattr(devices, "resolve_device", lambda d: torch.device("cuda", 0))
    monkeypatch.setattr(torch.version, "hip", None)
    gpu = {"name": "Tesla T4", "capability": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: gpu["name"])
    with pytest.raises(AccelerationUnavailable, match="does not compile bfloat16 graphs on Tesla T4"):
        check_before_loading("cuda", "auto", compile="blocks")
    assert seen[-1] == (torch.device("cuda", 0), torch.bfloat16)  # auto: bfloat16 on a GPU
    check_before_loading("cuda", "float32", compile="blocks")
    gpu.update(name="NVIDIA GeForce RTX 3090", capability=(8, 6))
    check_before_loading("cuda", "bfloat16", compile="blocks", cuda_graphs=True)
    with pytest.raises(AccelerationUnavailable, match="fp8 needs a GPU with fp8 tensor cores"):
        check_before_loading("cuda", "bfloat16", fp8=True)
    gpu.update(name="NVIDIA H100", capability=(9, 0))
    with pytest.raises(AccelerationUnavailable, match="needs the DiT in bfloat16"):
        check_before_loading("cuda", "float16", fp8=True)
    check_before_loading("cuda", "bfloat16", fp8=True, compile="full", kernels="none")


def test_compile_is_not_refused_on_rocm(monkeypatch):
    from zimage_native.accel.compile import gpu_compile_problem

    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert gpu_compile_problem((9, 4), "AMD Instinct MI300X", {torch.bfloat16}) is None


def test_fp8_is_refused_on_rocm_whatever_its_gfx_numbers(monkeypatch):
    from zimage_native.accel.fp8 import gpu_fp8_problem

    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert "is a ROCm GPU" in gpu_fp8_problem((9, 4), "AMD Instinct MI300X", {torch.bfloat16})  # gfx942
    assert "is a ROCm GPU" in gpu_fp8_problem((11, 0), "AMD Radeon RX 7900 XTX", {torch.bfloat16})  # gfx1100


def test_quantize_counts_and_skips_small_or_odd_linears():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].attention = torch.nn.Module()
    model.layers[0].attention.to_q = torch.nn.Linear(64, 64)
    model.layers[0].attention.to_k = torch.nn.Linear(64, 60)  # not a multiple of 16
    model.layers[0].adaLN_modulation = torch.nn.Sequential(torch.nn.Linear(64, 256))
    assert quantize_fp8_(model).startswith("fp8: 1 linears in float8 e4m3")
    assert "2 kept" in quantize_fp8_(model)  # idempotent: converted linears are not converted again


@needs_cpu_fp8
def test_bench_ladder_dry_run_on_cpu(tmp_path):
    """The benchmark's code path end to end on a tiny model: ours eager and +fp8, diffusers beside
    them, judged with --check (parity and fp8 quality; the graph checks need CUDA)."""
    import json

    from click.testing import CliRunner

    from zimage_native.cli import main

    result = CliRunner().invoke(main, ["bench", "--tiny", "--device", "cpu", "--dtype", "bfloat16", "--sizes", "32",
                                       "--steps", "2", "--repeats", "1", "--rungs", "eager", "--rungs", "fp8",
                                       "--check", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    payload = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    rows = {(r["engine"], r["rung"]): r for r in payload["rows"]}
    assert set(rows) == {("diffusers 0.42.1", "eager"), ("zimage-native", "eager"), ("zimage-native", "+fp8"),
                         ("diffusers 0.42.1", "compile (regional)")}
    assert rows["diffusers 0.42.1", "eager"]["psnr_db"] > 40  # bf16 parity of the two engines
    # our rows time the PNG the output would be written as (e2e_s + png_s: to an image file)
    assert all((r["png_s"] is not None and r["png_s"] > 0) == (engine == "zimage-native")
               for (engine, _), r in rows.items()), rows
    assert re.search(r"row done: zimage-native eager 32: .*, PNG \d+\.\d{3} s, cold", result.output), result.output
    # the compiled row says whether its cold start compiled its graphs or read them from Inductor's cache
    assert any(n.startswith("cold start: Inductor cache ") for n in rows["diffusers 0.42.1", "compile (regional)"]["notes"])
    assert not any(n.startswith("cold start:") for n in rows["zimage-native", "eager"]["notes"])
    notes = rows["zimage-native", "+fp8"]["notes"]
    # the tiny bench model's FFN width (1024) is a multiple of 16: the feed-forward GEMMs are fp8 too
    assert any(note.startswith("fp8: 28 linears in float8 e4m3 (8 as fused GEMMs") for note in notes), notes
    assert set(payload["checks"]["fp8_quality_db"]) == {"fast_accum", "fp32_accum"}
    verdicts = [line for line in result.output.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 3 and all(line.startswith("PASS") for line in verdicts), verdicts
    assert (tmp_path / "e2e.csv").read_text().count("\n") == 5  # header + 4 rows
    assert json.loads((tmp_path / "e2e.json").read_text()) == json.loads(json.dumps(payload, default=str))


BENCH_DRY = ["bench", "--tiny", "--device", "cpu", "--dtype", "bfloat16", "--sizes", "32", "--steps", "2",
             "--repeats", "1", "--rungs", "eager", "--rungs", "fp8", "--check"]


@needs_cpu_fp8
def test_bench_interrupted_keeps_the_verdicts_and_rows_measured_before(tmp_path, monkeypatch):
    """A timeout (`timeout -s INT`) during the fp8 quality check: the parity verdict was already
    printed when it was measured (before the fp8 row), e2e.json holds the rows and that check, the
    check not measured is a FAIL, and the exit status is 1."""
    import json

    from click.testing import CliRunner

    from zimage_native import bench
    from zimage_native.cli import main

    def timeout(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "fp8_accumulation_quality", timeout)
    result = CliRunner().invoke(main, [*BENCH_DRY, "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    parity = next(i for i, line in enumerate(lines) if line.startswith("PASS bf16 parity vs diffusers at 32x32"))
    fp8_row = next(i for i, line in enumerate(lines) if line.startswith("row done: zimage-native +fp8 32"))
    diffusers_row = next(i for i, line in enumerate(lines) if line.startswith("row done: diffusers 0.42.1 eager"))
    assert diffusers_row < parity < fp8_row and "PSNR -" not in lines[diffusers_row]  # printed with its parity
    assert "interrupted: the report and the verdicts below hold what was measured before" in result.output
    assert "FAIL fp8 quality: not measured (no fp8 rung)" in lines
    assert sum(line.startswith("PASS bf16 parity") for line in lines) == 1  # said once, when measured
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["checks"]["parity_db"] > 40 and "fp8_quality_db" not in saved["checks"]
    assert [(r["engine"], r["rung"]) for r in saved["rows"]] == [
        ("zimage-native", "eager"), ("diffusers 0.42.1", "eager"), ("zimage-native", "+fp8")]
    assert (tmp_path / "e2e.csv").read_text().count("\n") == 4  # header + the 3 rows


@needs_cpu_fp8
def test_bench_check_a_judged_step_that_raises_keeps_the_report_and_every_verdict(tmp_path, monkeypatch):
    """A judged step raising (on a GPU: a failed capture, out of memory) under --check: the traceback,
    then the report (the table and its JSON line) and every verdict as after a timeout, the check it
    did not measure a FAIL, one line naming the error (in e2e.json too), exit status 1. Before, the
    exception ended the run with its traceback only (no report, no verdict for what was not measured)."""
    import json

    from click.testing import CliRunner

    from zimage_native import bench
    from zimage_native.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: stand-in")

    monkeypatch.setattr(bench, "fp8_accumulation_quality", broken)
    result = CliRunner().invoke(main, [*BENCH_DRY, "--out", str(tmp_path)])
    assert result.exit_code == 1 and not isinstance(result.exception, RuntimeError), result.output
    lines = result.output.splitlines()
    assert "Traceback (most recent call last):" in lines
    assert any(line.startswith("{") and '"rows"' in line for line in lines)  # the report's JSON line
    assert "FAIL fp8 quality: not measured (no fp8 rung)" in lines
    assert "FAIL the ladder stopped: RuntimeError: CUDA error: stand-in" in lines
    assert sum(line.startswith("PASS bf16 parity") for line in lines) == 1
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["checks"]["ladder_error"] == "RuntimeError: CUDA error: stand-in"
    assert saved["checks"]["parity_db"] > 40 and "fp8_quality_db" not in saved["checks"]


def test_bench_without_check_a_step_that_raises_still_raises(tmp_path, monkeypatch):
    """Without --check nothing is judged: the error stays the command's error (not a report)."""
    from click.testing import CliRunner

    from zimage_native import bench
    from zimage_native.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("stand-in")

    monkeypatch.setattr(bench, "run_ours", broken)
    args = ["bench", "--tiny", "--device", "cpu", "--sizes", "32", "--steps", "2", "--repeats", "1", "--rungs", "eager",
            "--no-diffusers", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, RuntimeError) and "stand-in" in str(result.exception), result.output


@needs_cpu_fp8
def test_bench_optional_steps_fail_or_skip_without_losing_the_verdicts(tmp_path, monkeypatch):
    """diffusers compiled (optional) raising: a note on the last row, every judged check still measured
    and passed, exit status 0. (Skipped by a spent --budget-s: checked on the same bench run as the
    +vae rung's skip, test_bench_short_budget_skips_the_vae_rung_and_keeps_the_fp8_checks.)"""
    import json

    from click.testing import CliRunner

    from zimage_native import bench
    from zimage_native.cli import main

    run_diffusers = bench.run_diffusers

    def broken_compile(ref, pipe, size, steps, repeats, compiled):
        if compiled:
            raise RuntimeError("inductor fell over")
        return run_diffusers(ref, pipe, size, steps, repeats, compiled)

    monkeypatch.setattr(bench, "run_diffusers", broken_compile)
    result = CliRunner().invoke(main, [*BENCH_DRY, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    verdict_lines = [line for line in result.output.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdict_lines) == 3 and all(line.startswith("PASS") for line in verdict_lines), verdict_lines
    saved = json.loads((tmp_path / "e2e.json").read_text())
    note = "diffusers compiled: failed: RuntimeError: inductor fell over"
    assert any(n.startswith(note) for n in saved["rows"][-1]["notes"]), saved["rows"][-1]["notes"]
    assert "compile (regional)" not in [r["rung"] for r in saved["rows"]]


@needs_cpu_fp8
def test_bench_short_budget_skips_the_vae_rung_and_keeps_the_fp8_checks(tmp_path):
    """The +vae rung (not judged; a cold compile of the whole decoder) is skipped when the budget is
    short, and the +fp8 rung after it runs without the VAE compile, so the judged fp8 checks run.
    diffusers compiled (optional) is skipped by the spent budget too: a note on the last row, every
    judged check still measured and passed, exit status 0."""
    import json

    from click.testing import CliRunner

    from zimage_native.cli import main

    args = [*BENCH_DRY[:BENCH_DRY.index("--rungs")], "--rungs", "eager", "--rungs", "vae", "--rungs", "fp8", "--check"]
    result = CliRunner().invoke(main, [*args, "--budget-s", "0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    verdict_lines = [line for line in result.output.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdict_lines) == 3 and all(line.startswith("PASS") for line in verdict_lines), verdict_lines
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    ours = {r["rung"]: r for r in rows if r["engine"] == "zimage-native"}
    assert set(ours) == {"eager", "+fp8"}
    assert not any(note.startswith("vae decode: compiled") for note in ours["+fp8"]["notes"]), ours["+fp8"]["notes"]
    assert any(note.startswith("+vae: skipped (") for r in rows for note in r["notes"])
    assert any(n.startswith("diffusers compiled: skipped (") for n in rows[-1]["notes"]), rows[-1]["notes"]
    assert "compile (regional)" not in [r["rung"] for r in rows]


def test_bench_skips_the_default_rungs_that_cannot_run_and_refuses_named_ones(tmp_path, monkeypatch):
    """Checked before any timing: the default ladder on the CPU keeps eager and says why each other rung
    is left out; a rung named with --rungs that cannot run is a one-line error. A rung refused by a
    transform's own check (compile of a bf16 DiT below sm80, stood in for here) is left out the same way."""
    import json

    from click.testing import CliRunner

    from zimage_native import bench as b
    from zimage_native.cli import main

    from zimage_native.accel import AccelerationUnavailable, compile as accel_compile, fused_ops

    def no_kernels(model):  # as on a CPU without the interpreter (an earlier test may have loaded it)
        raise AccelerationUnavailable("kernels='triton' runs on a CUDA (or ROCm) GPU")

    monkeypatch.setattr(fused_ops, "check_kernels_can_run", no_kernels)
    base = ["bench", "--tiny", "--device", "cpu", "--dtype", "bfloat16", "--sizes", "32", "--steps", "1",
            "--repeats", "1", "--no-diffusers", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("rung ")]
    assert [line.split(" cannot run here")[0] for line in skipped] == [
        "rung +kernels", "rung +compile", "rung +cuda_graphs", "rung +vae", "rung +fp8"]
    assert all(line.endswith(": skipped") for line in skipped)
    payload = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert [r["rung"] for r in payload["rows"]] == ["eager"]
    # the row as it is done, rounded for people (the JSON keeps the exact values); where the CSV went
    assert re.search(r"^row done: zimage-native eager 32: denoise \d+\.\d{3} s, e2e \d+\.\d{3} s, "
                     r"PNG \d+\.\d{3} s, cold \d+\.\d{3} s, PSNR inf$", result.output, re.M), result.output
    assert f"\nappended 1 row(s) to {tmp_path / 'e2e.csv'}; this run's rows and checks: {tmp_path / 'e2e.json'}\n" \
        in result.output

    result = CliRunner().invoke(main, [*base, "--rungs", "eager", "--rungs", "cuda_graphs"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: rung +cuda_graphs cannot run here: CUDA graphs need a CUDA GPU; the "
                                     "DiT is on cpu; leave it out of --rungs")

    def refuse(model, backend, what="the DiT"):
        raise AccelerationUnavailable(f"not on this card ({what})")

    monkeypatch.setattr(accel_compile, "check_compile_supported", refuse)
    pipe, _ = b.build_random_pipeline(torch.device("cpu"), torch.float32, tiny=True)
    assert b.rung_problem(pipe, b.Rung("+compile", compile="blocks")) == "not on this card (the DiT)"
    assert b.rung_problem(pipe, b.Rung("+vae", vae_compile=True)) == "not on this card (the VAE decode)"
    assert b.rung_problem(pipe, b.Rung("eager")) is None



def test_bench_without_diffusers_installed_or_with_a_model_skips_diffusers_before_loading(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    """diffusers is a test-only dependency, but `zimage bench` measured it by default: after a plain
    `pip install .` (no diffusers) the run built the model, then ended in a traceback
    (ModuleNotFoundError: No module named 'diffusers'); with --model, the default --diffusers was refused
    after the whole model had loaded. Both are decided before loading now: as the default, diffusers is
    left out with a note; asked for with --diffusers, it is a one-line error."""
    import json
    import sys

    from click.testing import CliRunner

    from zimage_native.cli import main

    monkeypatch.setitem(sys.modules, "diffusers", None)  # a plain install: `import diffusers` fails
    base = ["bench", "--device", "cpu", "--dtype", "float32", "--sizes", "32", "--steps", "1", "--repeats", "1",
            "--rungs", "eager", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, [*base, "--tiny"])
    assert result.exit_code == 0, result.output
    assert ("diffusers is not measured: the diffusers package is not installed (pip install diffusers==0.42.1); "
            "--no-diffusers says so without this line") in result.output.splitlines(), result.output
    payload = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert [(r["engine"], r["rung"]) for r in payload["rows"]] == [("zimage-native", "eager")]
    result = CliRunner().invoke(main, [*base, "--tiny", "--diffusers"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --diffusers: the diffusers package is not installed (pip install "
                                     "diffusers==0.42.1); use --no-diffusers")

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    result = CliRunner().invoke(main, [*base, "--model", str(tiny_model_dir), "--diffusers"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --diffusers: --model is given (diffusers is measured on the random "
                                     "weights only); use --no-diffusers")
    monkeypatch.undo()
    result = CliRunner().invoke(main, [*base, "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("diffusers is not measured: --model is given (diffusers is measured "
                                             "on the random weights only); --no-diffusers says so without this line")


GOOD_CHECKS = {"size": 1024, "parity_db": 45.0, "graph_vs_compiled_rel_l2": 1e-4,
               "graph_new_request": {"replayed": True, "rel_l2": 3e-4},
               "cfg_under_graphs": {"exercised": True, "rel_l2": 2e-4},
               "fp8_quality_db": {"fast_accum": 30.0, "fp32_accum": 31.0}}


@pytest.mark.parametrize("change, expected", [
    ({}, None),
    ({"parity_db": 38.2}, "FAIL bf16 parity vs diffusers at 1024x1024: 38.2 dB PSNR (needs >= 40 dB)"),
    ({"parity_db": None}, "FAIL bf16 parity vs diffusers: not measured"),
    ({"graph_vs_compiled_rel_l2": 0.02}, "FAIL graph replay vs compiled eager: relative L2 latent difference 0.02"),
    ({"graph_new_request": {"replayed": False, "rel_l2": 0.0}}, "FAIL a new request under CUDA graphs: not replayed"),
    ({"graph_new_request": {"replayed": True, "rel_l2": 0.3}}, "FAIL a new request (other features and noise)"),
    ({"graph_new_request": None}, "FAIL a new request under CUDA graphs: not replayed"),
    ({"cfg_under_graphs": {"exercised": False, "rel_l2": 0.0}}, "FAIL CFG under CUDA graphs: not exercised"),
    ({"cfg_under_graphs": {"exercised": True, "rel_l2": 0.1}}, "FAIL CFG under CUDA graphs vs compiled eager"),
    ({"fp8_quality_db": {"fast_accum": 21.0, "fp32_accum": 31.0}}, "FAIL fp8 quality (fast accum) vs bf16"),
], ids=["all pass", "parity low", "parity missing", "graph differs", "new request captured", "new request differs",
        "new request missing", "cfg not exercised", "cfg differs", "fp8 low"])
def test_gpu_check_verdicts_fail_one_line_each(change, expected):
    from zimage_native.bench import verdicts

    checks = {k: v for k, v in {**GOOD_CHECKS, **change}.items() if v is not None}
    failures, passes = verdicts(checks, gpu=True)
    if expected is None:
        assert not failures and len(passes) == 6
    else:
        assert len(failures) == 1 and failures[0].startswith(expected), failures
        assert "\n" not in failures[0]
    assert not verdicts({k: v for k, v in checks.items() if k in ("size", "parity_db", "fp8_quality_db")},
                        gpu=False)[0] or expected is not None  # the CPU dry run judges parity and fp8 only


@pytest.fixture
def compiled_kernels(monkeypatch):
    """Kernels as on a machine where Triton compiles for a GPU (not the CPU interpreter that the kernel
    tests may have loaded earlier in the session)."""
    from types import SimpleNamespace

    import zimage_native.accel.fused_ops as fused_ops

    monkeypatch.setattr(fused_ops, "load_kernels", lambda *a, **k: SimpleNamespace(INTERPRETED=False))


def test_from_pretrained_kernels_on_cpu_fail_clearly_and_default_never_fails(tiny_model_dir, compiled_kernels):
    from zimage_native.accel import AccelerationUnavailable

    with pytest.raises(AccelerationUnavailable, match="GPU"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", kernels="triton")
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu")  # defaults: no kernels, sdpa
    assert pipe._accel["kernels"] == "none" and pipe._accel["attention"] == "sdpa"


def test_attention_env_var_is_read_at_the_entry_point(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ZIMAGE_ATTENTION", "no_such_backend")
    with pytest.raises(ValueError, match="ZIMAGE_ATTENTION"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    monkeypatch.setenv("ZIMAGE_ATTENTION", "sdpa")
    assert ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu")._accel["attention"] == "sdpa"


@pytest.mark.parametrize("flag, message", [(["--kernels", "triton"], "GPU"),
                                           (["--cuda-graphs"], "needs the DiT on a CUDA device")])
def test_cli_gpu_only_flags_fail_in_one_line_on_cpu(tiny_model_dir, tmp_path, flag, message, compiled_kernels):
    from click.testing import CliRunner

    from zimage_native.cli import main

    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu",
                                       "-o", str(tmp_path / "x.png"), *flag])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


@needs_cpu_fp8
def test_cli_fp8_runs_on_cpu(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from zimage_native.cli import main

    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu",
                                       "--dtype", "bfloat16", "--fp8", "--width", "32", "--height", "32",
                                       "--steps", "1", "--seed", "1", "--no-progress", "-o", str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    assert "fp8: 16 linears" in result.output and (tmp_path / "f.png").exists()


def test_fp8_on_a_cpu_without_per_row_scaled_mm_is_refused_in_one_line(fp8_model_dir, monkeypatch):
    """PyTorch 2.11's CPU _scaled_mm (the GPU image's version) takes per-tensor scales only and fails
    an internal assert on per-row ones: fp8 on such a CPU is refused up front, with the reason."""
    from zimage_native.accel import AccelerationUnavailable, fp8

    monkeypatch.setattr(fp8, "cpu_rowwise_scaled_mm", lambda: False)
    pipe = ZImagePipeline.from_pretrained(fp8_model_dir, device="cpu", dtype=torch.bfloat16)
    with pytest.raises(AccelerationUnavailable, match="per-row scales"):
        pipe.optimize(fp8=True)
    assert not any(isinstance(m, Float8Linear) for m in pipe.transformer.modules())  # nothing half done


def test_the_per_row_scaled_mm_probe_predicts_the_fp8_linear_on_the_cpu():
    from zimage_native.accel.fp8 import cpu_rowwise_scaled_mm

    layer = Float8Linear.from_linear(torch.nn.Linear(32, 48).to(torch.bfloat16))
    try:
        layer(torch.randn(5, 32, dtype=torch.bfloat16))
        runs = True
    except RuntimeError:
        runs = False
    assert cpu_rowwise_scaled_mm() == runs


def test_the_vae_compile_is_checked_for_the_gpu_the_vae_runs_on(tiny_model_dir, monkeypatch):
    """With offload="model" the VAE rests in CPU memory and decodes on the GPU: vae_compile is checked
    for that GPU (a T4, stood in for by mocks, where inductor skips bfloat16 graphs), not skipped as
    "on the CPU" (the VAE would then decode eagerly after a warning from inductor)."""
    from zimage_native.accel import AccelerationUnavailable

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    pipe.placement = dict.fromkeys(pipe.placement, torch.device("cuda"))  # as from_pretrained(device="cuda",
    pipe.offload = "model"                                                # offload="model")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    monkeypatch.setattr("zimage_native.accel._kernels.triton_unavailable_reason", lambda: None)
    with pytest.raises(AccelerationUnavailable, match="Tesla T4 .*run the VAE decode eagerly"):
        pipe.optimize(vae_compile=True)
    assert "decode" not in pipe.vae.__dict__


def test_the_same_vae_assigned_again_under_model_offload_keeps_its_compiled_decode(tiny_model_dir, monkeypatch):
    """pipe.vae = pipe.vae with vae_compile under offload="model" (a GPU stood in for: the visit is a
    no-op here): the VAE's decode is wrapped to visit the GPU when called by hand, and the check for
    "already compiled" did not look through the wrapper, so each assignment compiled the decoder
    again (a new torch.compile wrapper; dynamo kept its graph: 1 frame either way). Now the compiled
    decode is kept, and a decode by hand is the same bit for bit."""
    import contextlib

    import zimage_native.accel.attention_backends as ab
    import zimage_native.accel.vae as vae_module
    import zimage_native.offload as offload_module
    from torch._dynamo.testing import CompileCounterWithBackend

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    pipe.placement = dict.fromkeys(pipe.placement, torch.device("cuda"))  # as from_pretrained(device="cuda",
    pipe.offload = "model"                                                # offload="model")
    monkeypatch.setattr(offload_module, "visit", lambda module, device: contextlib.nullcontext())
    monkeypatch.setattr(vae_module, "check_compile_supported", lambda *args, **kwargs: None)
    monkeypatch.setattr(ab, "fit_sdpa_", lambda *args, **kwargs: None)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    pipe.optimize(vae_compile=True, compile_backend=counter)
    compiled = pipe.vae.decode.inner
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = pipe.vae.decode(z, return_dict=False)[0]
        pipe.vae = pipe.vae
        after = pipe.vae.decode(z, return_dict=False)[0]
    assert pipe.vae.decode.inner is compiled and counter.frame_count == 1
    assert torch.equal(after, before)


@needs_cpu_fp8
def test_a_lora_after_fp8_is_refused_and_one_fused_before_cannot_be_unloaded(fp8_model_dir):
    """fp8 replaces the block linears by Float8Linear, which hold only the rounded fp8 values: a LoRA
    loaded after it failed with "no key of this LoRA matches a Z-Image module" (or, with keys outside
    the blocks, loaded in part with the rest reported unmatched), and unload_lora of a LoRA fused
    before it failed with a KeyError after restoring part of the weights. Both are refused, with
    what to do, and a LoRA fused only outside the blocks still unloads."""
    pipe = ZImagePipeline.from_pretrained(fp8_model_dir, device="cpu", dtype=torch.bfloat16)
    dim = pipe.transformer.config.dim
    g = torch.Generator().manual_seed(0)
    embedder = pipe.transformer.t_embedder.mlp[0]
    outside = {"diffusion_model.t_embedder.mlp.0.lora_A.weight": torch.randn(2, embedder.in_features, generator=g),
               "diffusion_model.t_embedder.mlp.0.lora_B.weight": torch.randn(embedder.out_features, 2, generator=g)}
    blocks = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.randn(4, dim, generator=g),
              "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.randn(dim, 4, generator=g)}
    before = embedder.weight.clone()
    pipe.load_lora({**outside, **blocks}, scale=0.5)
    pipe.optimize(fp8=True)
    with pytest.raises(ValueError, match=r"unload_lora: fp8 quantised 1 of the linears the LoRA is fused into "
                                         r"\(e.g. layers.0.attention.to_q\).*reload the pipeline"):
        pipe.unload_lora()
    assert not torch.equal(embedder.weight, before)  # nothing was restored
    with pytest.raises(ValueError, match=r"load_lora: fp8 quantised the DiT's block linears \(\d+ in float8\).*"
                                         r"Load LoRAs before fp8"):
        pipe.load_lora(blocks)
    pipe = ZImagePipeline.from_pretrained(fp8_model_dir, device="cpu", dtype=torch.bfloat16)
    embedder = pipe.transformer.t_embedder.mlp[0]
    pipe.load_lora(outside)
    pipe.optimize(fp8=True)
    assert pipe.unload_lora() == 1 and torch.equal(embedder.weight, before)


def server_sequence(pipe):
    """The calls a server or a user loop makes at one size, with what each may newly need: a graph
    for a CFG step ("cfg") and one for the inpainting blend ("inpaint"); everything else is
    inputs. Yields (name, kind) after each call."""
    import numpy as np

    from .test_generation import make_image

    image = make_image(48, 32)
    mask = np.zeros((32, 48), dtype=np.float32)
    mask[:, 24:] = 1
    kw = {**KW, "num_inference_steps": 3}
    negative = {"negative_prompt": "blurry"}
    calls = [
        ("first", None, {}), ("seed", None, {"seed": 5}), ("steps", None, {"num_inference_steps": 5}),
        ("shift", None, {"shift": 2.0}), ("sigmas", None, {"sigmas": [1.0, 0.7, 0.3]}),
        ("output np", None, {"output_type": "np"}), ("callback", None, {"callback": lambda k, n: None}),
        ("cfg", "cfg", {"guidance_scale": 2.0, **negative}), ("guidance", None, {"guidance_scale": 3.5, **negative}),
        ("truncation", None, {"guidance_scale": 3.5, "cfg_truncation": 0.5, **negative}),
        ("norm", None, {"guidance_scale": 3.5, "cfg_normalization": True, **negative}),
        ("negative length", None, {"guidance_scale": 3.5, "negative_prompt": "blurry, ugly, low quality"}),
        ("img2img", None, {"image": image, "strength": 0.7}), ("strength", None, {"image": image, "strength": 0.5}),
        ("inpaint", "inpaint", {"image": image, "mask_image": mask, "strength": 0.7}),
        ("inpaint seed", None, {"image": image, "mask_image": mask, "strength": 0.9, "seed": 3}),
        ("first again", None, {}),
    ]
    for name, kind, extra in calls:
        args = {**kw, **extra}
        if "sigmas" in extra:
            args.pop("num_inference_steps")
        pipe("a cat", **args)
        yield name, kind


def test_a_server_sequence_captures_only_what_needs_a_new_graph(fresh_pipe):
    """Step mode: one graph per step kind. A new seed, step count, shift, custom sigmas, output type,
    callback, guidance value, truncation, norm limit, negative prompt length (same 32-token class),
    img2img strength replay the graphs already captured; CFG and the inpainting blend add one each."""
    sampler, _ = graphed(fresh_pipe, frozen=False)
    expected, got = 0, []
    for name, kind in server_sequence(fresh_pipe):
        expected += kind is not None or name == "first"
        got.append((name, sampler.captures, expected))
    assert all(n == e for _, n, e in got), got
    assert sampler.evictions == 0 and sampler.captures == 3


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_a_server_sequence_compiles_once(fresh_pipe, mode):
    """The same sequence under torch.compile: after the first call no option of it traces again."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    fresh_pipe.optimize(compile=mode, compile_backend=counter)
    frames = []
    for name, _ in server_sequence(fresh_pipe):
        frames.append((name, counter.frame_count))
    assert frames[0][1] > 0 and {n for _, n in frames} == {frames[0][1]}, frames


def test_bench_says_whether_the_cold_start_read_the_inductor_cache():
    """A cold start whose graphs come from Inductor's on-disk cache (a second run on one machine) is
    several times shorter than one that compiles them: the benchmark's row says which it timed."""
    from torch._inductor.utils import fresh_cache

    from zimage_native.bench import cache_note, inductor_cache_counts

    x = torch.ones(8)
    notes = []
    with fresh_cache():  # an empty cache directory of its own
        for _ in range(2):
            torch._dynamo.reset()
            before = inductor_cache_counts()
            torch.compile(lambda t: torch.sin(t) + 1)(x)
            notes.append(cache_note(before))
    assert notes == [["cold start: Inductor cache cold (0 graphs read from it, 1 graph compiled)"],
                     ["cold start: Inductor cache warm (1 graph read from it, 0 graphs compiled)"]]
    assert cache_note(inductor_cache_counts()) == []  # nothing compiled since: no note


CACHE_PROBE = """
import json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from tests.fixtures import our_pipeline
torch.set_num_threads(1)
pipe = our_pipeline(Path(sys.argv[1]))
pipe.optimize(compile="blocks")
out = pipe("a cat", height=32, width=32, num_inference_steps=1, seed=0, output_type="latent")
print(json.dumps({"inductor": dict(counters["inductor"]), "sum": torch.as_tensor(out.images).double().sum().item()}))
"""


@pytest.mark.slow
def test_a_second_process_reads_the_compiled_blocks_from_inductors_cache(tiny_model_dir, tmp_path):
    """The compiled graphs go into Inductor's on-disk cache and a new process reads them back (a
    several times shorter cold start, docs/performance.md "Compile cache"): nothing of one process
    (an id, a closure, a per-model constant) is in the graph's key. Same bits in both processes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # The caches on, whatever the caller's environment says (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, set
    # by some CI for reproducible compiles, failed this test with 0 misses), and nothing remote.
    switches = ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE",
                "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE", "TORCH_COMPILE_DISABLE")
    env = {**{k: v for k, v in os.environ.items() if k not in switches},
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(root)}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tiny_model_dir)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    first, second = (run["inductor"] for run in runs)
    assert first.get("fxgraph_cache_miss", 0) > 0 and first.get("fxgraph_cache_hit", 0) == 0, first
    assert second.get("fxgraph_cache_miss", 0) == 0, f"the second process compiled again: {second}"
    assert second.get("fxgraph_cache_hit", 0) == first["fxgraph_cache_miss"], second
    assert runs[1]["sum"] == runs[0]["sum"]


def test_an_attention_backend_already_in_place_keeps_the_graphs_and_the_compiled_blocks(fresh_pipe, tiny_pipe):
    """optimize(attention="auto") where auto picks the backend in place (SDPA on the CPU), and back to
    "sdpa": nothing to swap. Each call undid the compile, compiled again and dropped the captured
    graphs (FrozenGraphs stand-in: 3 captures and 2 releases for request, auto, request, sdpa,
    request, where 1 capture serves all); now the graphs and the compiled block functions stay, the
    requests equal eager bit for bit, and "auto" is still chosen again at a move."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import CompiledBlock

    sampler, frozen = graphed(fresh_pipe)
    want = tiny_pipe("a cat", **KW).images
    lines = []
    for attention in (None, "auto", "sdpa"):
        if attention:
            lines += fresh_pipe.optimize(attention=attention)
        assert torch.equal(fresh_pipe("a cat", **KW).images, want)
    assert (sampler.captures, frozen.released) == (1, 0) and fresh_pipe._accel["attention"] == "sdpa"
    assert len(lines) == 2 and all(line.endswith("(already in place)") for line in lines)
    fresh_pipe._graphed = None
    torch._dynamo.reset()
    fresh_pipe.optimize(compile="blocks", compile_backend=CompileCounterWithBackend("eager"))
    compiled = fresh_pipe.transformer.layers[0].__dict__["forward"]
    assert isinstance(compiled, CompiledBlock)
    lines = fresh_pipe.optimize(attention="auto")
    assert lines == [lines[0]] and lines[0].startswith("attention backend: auto -> sdpa")  # not undone
    assert fresh_pipe.transformer.layers[0].__dict__["forward"] is compiled and fresh_pipe._accel["attention"] == "auto"


@pytest.mark.parametrize("backend", ["flash_attn_3", "flash_attn_2", "sage", "xformers"])
def test_a_gpu_attention_backend_installed_again_keeps_the_graphs_and_the_compiled_blocks(fresh_pipe, monkeypatch,
                                                                                          backend):
    """optimize(attention="auto") where auto picks the FlashAttention, Sage or xFormers backend already
    installed, and its name again: each made a new function (a closure over its library), so the
    modules did not keep theirs and every call undid the compile, compiled again and dropped the
    graphs (FrozenGraphs stand-in: 4 captures and 3 releases for request, auto, request, name,
    request, auto, request). The function is made once per process now: 1 capture, the same
    compiled block functions, every request equal to the first (stand-ins of the libraries,
    tests/test_attention_backends.py, running on the CPU)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel import attention_backends as ab
    from zimage_native.accel.compile import CompiledBlock

    from .test_attention_backends import install_fakes

    install_fakes(monkeypatch)
    monkeypatch.setattr(ab, "unavailable_reason", lambda name, *args: None if name in (backend, "sdpa") else "absent")
    assert fresh_pipe.optimize(attention=backend) == [f"attention backend: {backend}{ab.NOTES.get(backend, '')}"]
    sampler, frozen = graphed(fresh_pipe)
    want = fresh_pipe("a cat", **KW).images
    lines = []
    for attention in ("auto", backend, "auto"):
        lines += fresh_pipe.optimize(attention=attention)
        assert torch.equal(fresh_pipe("a cat", **KW).images, want)
    assert (sampler.captures, frozen.released) == (1, 0) and fresh_pipe._accel["attention"] == "auto"
    assert len(lines) == 3 and all(line.endswith("(already in place)") for line in lines), lines
    fresh_pipe._graphed = None
    torch._dynamo.reset()
    fresh_pipe.optimize(compile="blocks", compile_backend=CompileCounterWithBackend("eager"))
    compiled = fresh_pipe.transformer.layers[0].__dict__["forward"]
    assert isinstance(compiled, CompiledBlock)
    for attention in (backend, "auto"):
        assert fresh_pipe.optimize(attention=attention)[0].endswith("(already in place)")
        assert fresh_pipe.transformer.layers[0].__dict__["forward"] is compiled  # not undone


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compile_asked_after_the_graphs_were_captured_captures_them_again_from_the_compiled_code(
        fresh_pipe, tiny_pipe, mode):
    """optimize(cuda_graphs=True), a request, then optimize(compile=...): the graph captured from the
    eager DiT stayed in the cache, and a CUDA graph replays the kernels that ran while it was captured,
    so every later request replayed eager kernels (1 capture in all; 0 calls of compiled code during
    it). The compile change drops the graphs, says so, and the next request captures from the
    compiled code: the stand-in capture counts the compiled graphs' calls while it captures (the
    FrozenGraphs stand-in cannot: dynamo does not run under its recording mode). A repeat request
    then replays: 2 captures in all."""
    from .graph_standins import FakeGraphs

    ran = []  # calls of the code dynamo compiled
    counting_backend = counting_compile_backend(ran)

    fake, compiled_calls = FakeGraphs(), []  # compiled calls during each capture

    def capture(fn):
        before = len(ran)
        captured = fake.capture(fn)
        compiled_calls.append(len(ran) - before)
        return captured

    torch._dynamo.reset()
    sampler = fresh_pipe._graphed = GraphedSampler(fresh_pipe, capture=capture, new_event=fake.event)
    want = tiny_pipe("a cat", **KW).images
    assert torch.equal(fresh_pipe("a cat", **KW).images, want)
    lines = fresh_pipe.optimize(compile=mode, compile_backend=counting_backend)
    released = fake.released
    for _ in range(2):
        assert_rel(fresh_pipe("a cat", **KW).images, want, 1e-5, f"graphed, compile={mode}")
    assert (sampler.captures, released) == (2, 1) and compiled_calls[0] == 0 and compiled_calls[1] > 0, compiled_calls
    assert lines[-1] == "cuda graphs: 1 captured graph dropped, captured again from the compiled DiT at the next requests"


def test_a_dit_assigned_to_the_pipeline_drops_the_graphs_captured_from_the_one_it_replaces(fresh_pipe):
    """pipe.transformer = another DiT after the graphs were captured: the next request replayed the
    graphs of the old DiT (its kernels and weights; the caption tokens refined by the new one), 1
    capture in all, and its image was neither DiT's (FrozenGraphs: max |graphed - eager| 0.45). The
    assignment drops the graphs, so each DiT's request equals its eager run, the old one put back too;
    the DiT assigned again as it is keeps them."""
    import copy

    sampler, _ = graphed(fresh_pipe)
    dit = fresh_pipe.transformer
    other = copy.deepcopy(dit)
    with torch.no_grad():
        for weight in other.parameters():
            weight.mul_(1.1)
    first = fresh_pipe("a cat", **KW).images
    fresh_pipe.transformer = fresh_pipe.transformer  # the same DiT: the graphs stay
    assert torch.equal(fresh_pipe("a cat", **KW).images, first) and sampler.captures == 1
    fresh_pipe.transformer = other
    replaced = fresh_pipe("a cat", **KW).images
    fresh_pipe.transformer = dit
    back = fresh_pipe("a cat", **KW).images
    assert sampler.captures == 3, list(sampler.graphs)
    fresh_pipe._graphed = None  # the eager runs
    assert torch.equal(back, first) and torch.equal(back, fresh_pipe("a cat", **KW).images)
    fresh_pipe.transformer = other
    assert torch.equal(replaced, fresh_pipe("a cat", **KW).images)
    assert not torch.equal(replaced, first)  # the change matters


@needs_cpu_fp8
@pytest.mark.parametrize("setting", ["kernels", "fp8", "attention", "compile"])
def test_a_dit_assigned_is_recorded_as_it_is_and_optimize_applies_the_transforms_to_it(fresh_pipe, monkeypatch,
                                                                                        setting):
    """pipe.transformer = another DiT after optimize(): the record kept describing the DiT replaced,
    so the new DiT ran without kernels, fp8 or the attention backend asked (the stand-in backend: 0
    calls in a request) and optimize() asking for them again returned [] (nothing applied); compile
    was already recorded from the DiT. The record now says what the DiT assigned has (nothing here;
    "auto" kept where it picks the backend the DiT runs), optimize() applies the transforms to it,
    and the transformed DiT put back is recorded with them."""
    import copy

    from zimage_native import accel
    from zimage_native.accel import attention_backends as ab
    from zimage_native.accel.compile import compiled_mode
    from zimage_native.accel.fp8 import fp8_applied
    from zimage_native.accel.fused_ops import count_fused
    from zimage_native.model.attention import attention

    def record():
        return {key: fresh_pipe._accel[key] for key in fresh_pipe._DIT_SETTINGS}

    fresh_pipe.optimize(attention="auto")  # (SDPA on the CPU: in place)
    eager = copy.deepcopy(fresh_pipe.transformer)
    fresh_pipe.transformer = copy.deepcopy(eager)
    assert record()["attention"] == "auto"  # (the DiT runs what "auto" picks)
    fresh_pipe.optimize(attention="sdpa")
    plain = record()
    assert plain == {"kernels": "none", "attention": "sdpa", "fp8": False, "compile": "off"}
    calls = []

    def stand_in(q, k, v, mask):  # a GPU backend's stand-in
        calls.append(q.shape)
        return attention(q, k, v, mask)

    monkeypatch.setattr(ab, "unavailable_reason", lambda *args: None)
    monkeypatch.setitem(ab.FACTORIES, "xformers", lambda: stand_in)
    accel.load_kernels(interpret=not torch.cuda.is_available())
    asked = {"kernels": dict(kernels="triton"), "fp8": dict(fp8=True), "attention": dict(attention="xformers"),
             "compile": dict(compile="blocks", compile_backend="eager")}[setting]
    has = {"kernels": lambda dit: any(swapped for swapped, _ in count_fused(dit).values()),
           "fp8": fp8_applied, "attention": lambda dit: ab.backend_in_place(dit) == "xformers",
           "compile": lambda dit: compiled_mode(dit) == ("blocks", "dynamic")}[setting]
    assert fresh_pipe.optimize(**asked)
    optimized, transformed = fresh_pipe.transformer, record()
    assert has(optimized) and transformed != plain
    fresh_pipe.transformer = eager
    assert record() == plain
    calls.clear()
    fresh_pipe("a cat", **KW)
    assert not has(eager) and not calls
    assert fresh_pipe.optimize(**asked), "optimize applied nothing to the DiT assigned"
    assert has(eager) and record() == transformed
    fresh_pipe("a cat", **KW)
    assert bool(calls) == (setting == "attention")
    fresh_pipe.transformer = optimized  # the transformed DiT put back: recorded with its transforms
    assert record() == transformed


@pytest.mark.parametrize("asked", ["dit", "first"])
def test_compile_of_a_shared_dit_drops_the_graphs_of_every_pipeline_holding_it(fresh_pipe, tiny_pipe, asked):
    """Two pipelines share one DiT (ZImagePipeline(pipe.transformer, ...)), each with its graphs captured.
    Compile asked through the DiT (transformer.compile_repeated_blocks(), which runs the last pipeline's
    optimize) or on the first pipeline compiled the shared DiT, but only the pipeline asked dropped its
    graphs: the other kept replaying its graph captured from the eager DiT (1 capture in all, 0 calls
    of compiled code in it) and reported compile "off". Now each pipeline holding the DiT records the
    compile and captures again from the compiled code (2 captures, 1 release, compiled calls in the
    second), and a repeat request replays."""
    ran = []  # calls of the code dynamo compiled
    counting_backend = counting_compile_backend(ran)

    def counted(pipe):
        fake, calls = FakeGraphs(), []  # compiled calls during each capture

        def capture(fn):
            before = len(ran)
            captured = fake.capture(fn)
            calls.append(len(ran) - before)
            return captured

        pipe._graphed = GraphedSampler(pipe, capture=capture, new_event=fake.event)
        return pipe._graphed, fake, calls

    torch._dynamo.reset()
    first = fresh_pipe
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    second.progress = False
    want = tiny_pipe("a cat", **KW).images
    pipes = {"first": (first, *counted(first)), "second": (second, *counted(second))}
    for pipe, *_ in pipes.values():
        assert torch.equal(pipe("a cat", **KW).images, want)
    if asked == "dit":
        lines = first.transformer.compile_repeated_blocks(backend=counting_backend)
    else:
        lines = first.optimize(compile="blocks", compile_backend=counting_backend)
    other = "first" if asked == "dit" else "second"
    for name, (pipe, sampler, fake, calls) in pipes.items():
        released = fake.released
        for _ in range(2):
            assert_rel(pipe("a cat", **KW).images, want, 1e-5, f"{name} pipeline, compiled through {asked}")
        assert (sampler.captures, released) == (2, 1) and calls[0] == 0 and calls[1] > 0, (name, calls)
        assert pipe._accel["compile"] == "blocks" and pipe._compile_options == (counting_backend, "dynamic"), name
    assert lines[-1] == ("cuda graphs: 1 captured graph of another pipeline holding this DiT dropped, captured "
                         "again from the compiled DiT at the next requests"), lines
    with pytest.raises(ValueError, match="compile is already 'blocks'"):
        pipes[other][0].optimize(compile="full")


@pytest.mark.parametrize("call", ["to", "offload"])
def test_a_move_of_a_shared_dit_drops_the_graphs_and_moves_the_placement_of_every_pipeline_holding_it(
        fresh_pipe, monkeypatch, call):
    """A move of a DiT shared by two pipelines through one of them (pipe.to, enable_model_cpu_offload)
    left the other pipeline's captured graph (of the old placement) in place and its placement of the
    DiT where the DiT was (cpu beside the DiT on "meta", the tests' stand-in for another device), and
    a placement its graphs cannot follow was refused only for the caller's graphs. Now the check
    covers every pipeline holding the DiT, which drop their graphs and run the DiT where it went."""
    import zimage_native.accel.cuda_graphs as cuda_graphs

    first = fresh_pipe
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    second.progress = False
    sampler, _ = graphed(second, frozen=False)
    second("a cat", **KW)
    assert len(sampler.graphs) == 1
    place = {"to": first.to, "offload": lambda device: first.enable_model_cpu_offload(device=device)}[call]
    with pytest.raises(ValueError, match="CUDA graphs are on"):  # (graphs need the DiT on a CUDA device)
        place("cpu:1")  # (a move: "cpu", where both hold the DiT already, moves nothing and is taken)
    assert len(sampler.graphs) == 1 and first.offload == "none"  # refused before anything moved
    monkeypatch.setattr(cuda_graphs, "graphs_problem", lambda *args: None)  # ("meta" stands in for the GPU)
    place("meta")
    assert not sampler.graphs
    assert first.device == second.device == second.placement["transformer"] == torch.device("meta")


def test_an_optimize_call_that_fails_leaves_the_attention_backend_as_it_was(fresh_pipe, monkeypatch):
    """optimize(attention=<another backend>, compile=<a mode it refuses>): the call fails, and the models
    run the backend they ran, under the name the pipeline holds. The check of whether the backend was
    already in place installed it on every attention module first and left it there when optimize
    failed afterwards: the DiT ran the new backend (7 calls of the stand-in in a 2-step request) under
    the name "sdpa", and optimize(attention="sdpa") then found nothing to change. A backend already in
    place ("auto" picking SDPA) stored its name before the call failed: "sdpa" became "auto"."""
    from zimage_native.accel import attention_backends as ab
    from zimage_native.model.attention import attention

    calls = []

    def other(q, k, v, mask):  # a stand-in for a GPU backend (a function of its own at each install)
        calls.append(q.shape)
        return attention(q, k, v, mask)

    with pytest.raises(ValueError, match="compile must be one of"):  # "auto" picks SDPA, in place: the name stays
        fresh_pipe.optimize(attention="auto", compile="bogus")
    assert fresh_pipe._accel["attention"] == "sdpa" and fresh_pipe._accel["compile"] == "off"
    monkeypatch.setattr(ab, "unavailable_reason", lambda *args: None)
    monkeypatch.setitem(ab.FACTORIES, "xformers", lambda: other)
    sampler, frozen = graphed(fresh_pipe)
    fresh_pipe("a cat", **KW)
    modules = ab.dit_attention_modules(fresh_pipe.transformer)
    before = [m.attn_fn for m in modules]
    with pytest.raises(ValueError, match="compile must be one of"):
        fresh_pipe.optimize(attention="xformers", compile="bogus")
    assert all(m.attn_fn is fn for m, fn in zip(modules, before)) and fresh_pipe._accel["attention"] == "sdpa"
    assert (len(sampler.graphs), frozen.released) == (1, 0)
    fresh_pipe._graphed = None
    fresh_pipe("a cat", **KW)
    assert not calls  # the eager request ran SDPA, the backend the pipeline names
    assert fresh_pipe.optimize(attention="xformers") == ["attention backend: xformers"]
    assert all(m.attn_fn is other for m in modules) and fresh_pipe._accel["attention"] == "xformers"


def test_two_threads_changing_a_shared_dit_through_two_pipelines_do_not_deadlock(fresh_pipe, monkeypatch):
    """optimize() on each of two pipelines sharing a DiT, in two threads: each call took its own lock,
    changed the DiT, then took the other pipeline's lock to update its record while holding its own,
    so the two calls waited for each other forever (reproduced: both threads still alive after 20 s).
    A call that changes the DiT now takes the locks of every pipeline holding it in one order (by
    id): the second call waits for the first, then finds the DiT compiled and changes nothing. The
    barrier holds each call inside its change until the other has entered its own (or 2 s pass)."""
    import threading

    import zimage_native.accel as accel
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    first = fresh_pipe
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    barrier, waited, transform = threading.Barrier(2, timeout=2), set(), accel.optimize

    def meeting(*args, **kwargs):
        if threading.get_ident() not in waited:  # once per thread: both inside a change at once
            waited.add(threading.get_ident())
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return transform(*args, **kwargs)

    monkeypatch.setattr(accel, "optimize", meeting)
    backend, results = CompileCounterWithBackend("eager"), {}
    threads = [threading.Thread(target=lambda p=pipe: results.__setitem__(p, p.optimize(compile="blocks",
                                                                                        compile_backend=backend)),
                                daemon=True) for pipe in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads), "the two optimize calls deadlocked"
    assert sorted(len(lines) > 0 for lines in results.values()) == [False, True]  # one compiled, one found it done
    assert first._accel["compile"] == second._accel["compile"] == "blocks"
