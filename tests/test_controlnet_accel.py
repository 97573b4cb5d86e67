"""The accelerations reach the ControlNet branch without task-specific code: the attention backend,
torch.compile (blocks and full), fp8 and the graphed sampling loop, each against its eager twin;
loading and unloading through the pipeline, and the errors a user can meet."""

from __future__ import annotations

import collections

import pytest
import torch

from zimage_native import ZImagePipeline
from zimage_native.accel.fp8 import Float8Linear
from zimage_native.formats import UnsupportedFormatError
from zimage_native.model.transformer import Attention
from zimage_native.offload import _streamed_tensors

from .test_controlnet_pipeline import control_files, control_model_dir, picture  # noqa: F401 (fixtures)
from .utils import assert_rel, needs_cpu_fp8, rel_err

pytest.importorskip("diffusers")

KW = dict(height=32, width=48, num_inference_steps=2, output_type="latent", seed=0)


@pytest.fixture
def fresh(control_model_dir):  # noqa: F811
    """Transforms change a pipeline in place: each test gets its own."""
    def make(dtype=torch.float32):
        pipe = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=dtype)
        pipe.progress = False
        return pipe
    return make


@pytest.fixture
def eager(fresh, control_files):  # noqa: F811
    pipe = fresh()
    pipe.load_controlnet(control_files["2.1"])
    return pipe


def test_load_unload_and_errors(fresh, control_files, tmp_path):  # noqa: F811
    pipe = fresh()
    with pytest.raises(ValueError, match="load_controlnet"):
        pipe("a cat", control_image=picture(48, 32, 0), **KW)
    plain = pipe("a cat", **KW).images
    model = pipe.load_controlnet(control_files["1.0"])
    assert pipe.controlnet is model and model.config.version == "1.0"
    assert not any(k.startswith(("layers.", "x_pad_token", "t_embedder")) for k in model.state_dict())
    assert pipe.load_controlnet(control_files["2.0"]).config.version == "2.0"  # replaces the loaded one
    assert pipe.unload_controlnet() is True and pipe.controlnet is None
    assert pipe.unload_controlnet() is False
    assert torch.equal(pipe("a cat", **KW).images, plain)  # unloading leaves the DiT as it was
    with pytest.raises(UnsupportedFormatError, match="not a Z-Image Fun-ControlNet-Union"):
        from safetensors.torch import save_file

        save_file({"layers.0.attention.to_q.weight": torch.zeros(4, 4)}, str(tmp_path / "dit.safetensors"))
        pipe.load_controlnet(tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="control_layers_places"):
        pipe.load_controlnet(control_files["2.1"], config={"control_layers_places": [0, 1, 2]})
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        pipe.load_controlnet(control_files["2.1"])
        pipe("a cat", control_image=picture(48, 32, 0), controlnet_conditioning_scale="high", **KW)


def test_attention_backend_reaches_the_branch(eager, fresh, control_files, monkeypatch):  # noqa: F811
    """The backend the pipeline selected is installed on the branch's attention modules too (here a
    counting twin of SDPA stands for a GPU backend), and every branch attention runs through it."""
    from zimage_native.accel import attention_backends
    from zimage_native.model.attention import attention

    calls = []

    def counting(q, k, v, mask):
        calls.append(q.shape)
        return attention(q, k, v, mask)

    monkeypatch.setitem(attention_backends.FACTORIES, "sdpa", lambda: counting)
    pipe = fresh()
    pipe.load_controlnet(control_files["2.1"])  # after the pipeline's optimize: gets its backend
    branch = [m for m in pipe.controlnet.modules() if isinstance(m, Attention)]
    assert branch and all(m.attn_fn is counting for m in branch)
    control = picture(48, 32, 5)
    got = pipe("a cat", control_image=control, **KW).images
    assert_rel(got, eager("a cat", control_image=control, **KW).images, 1e-6, "counting backend")
    # 2 steps x the branch's own blocks (2 control-refiner blocks, 2 control layers)
    assert len(calls) == 2 * (len(pipe.controlnet.control_noise_refiner) + len(pipe.controlnet.control_layers))


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compiled_control_matches_eager_and_does_not_recompile(eager, fresh, control_files, mode):  # noqa: F811
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    control = picture(48, 32, 5)
    expected = eager(["a cat", "a dog"], control_image=control, **KW).images
    pipe = fresh()
    pipe.load_controlnet(control_files["2.1"])
    counter = CompileCounterWithBackend("eager")
    lines = pipe.optimize(compile=mode, compile_backend=counter)
    assert any(line.startswith(f"compile: {mode}") for line in lines)
    got = pipe(["a cat", "a dog"], control_image=control, **KW).images
    assert_rel(got, expected, 1e-5, f"compile={mode} with ControlNet")
    frames = counter.frame_count
    from zimage_native.accel.compile import CompiledBlock, CompiledMethod

    cn = pipe.controlnet
    if mode == "blocks":  # the branch's blocks are DiT blocks and are compiled as such
        compiled = [m for m in cn.modules() if isinstance(m.__dict__.get("forward"), CompiledBlock)]
        assert len(compiled) == len(cn.control_layers) + len(cn.control_noise_refiner)
        assert "ControlNet: compile: blocks (4 blocks" in " ".join(lines)
    else:  # the branch's step is one graph
        assert isinstance(cn.__dict__.get("step"), CompiledMethod)
    pipe(["a tree", "a house by the sea"], control_image=picture(48, 32, 6), controlnet_conditioning_scale=0.3, **KW)
    assert counter.frame_count == frames, "a new prompt, control image or scale recompiled"


def test_the_branchs_compiled_blocks_count_against_the_one_recompile_limit(fresh, control_files, caplog):  # noqa: F811
    """The DiT's and the branch's blocks run one compiled code object, so dynamo keeps their graphs,
    and counts its recompile limit, together, and a ControlNet block is another class (dynamo guards
    its type): the engine's shape classes are one process-wide count with the block type in the key,
    at least as many as dynamo's graphs, so its warning comes before dynamo's silent eager runs."""
    import logging

    import torch._dynamo.config as config
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import BLOCK_VARIANTS, recompile_limit_name

    from .test_shape_policy import LimitHits

    torch._dynamo.reset()
    pipe = fresh()
    pipe.load_controlnet(control_files["2.1"])
    counter = CompileCounterWithBackend("eager")
    pipe.optimize(compile="blocks", compile_backend=counter)
    classes = pipe.transformer._zimage_compiled[2]
    assert pipe.controlnet._zimage_compiled[2] is classes  # one count for the one code object
    long = "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat " * 2
    control = picture(48, 32, 5)
    for prompts in ("a cat", ["a cat", long]):  # batch 1; batch 2 mixing caption lengths (masked)
        pipe(prompts, control_image=control, **KW)
        assert counter.frame_count <= len(classes.seen), (counter.frame_count, list(classes.seen))
    kinds = {key[0][0] for key in classes.seen}
    assert kinds == {"TransformerBlock", "ControlTransformerBlock"}
    per_batch = {}
    for key in classes.seen:
        per_batch[key[2]] = per_batch.get(key[2], 0) + 1
    assert max(per_batch.values()) <= BLOCK_VARIANTS  # the limit's budget per batch size covers the branch

    # Past the limit (here the graphs dynamo holds, the engine's and dynamo's alike, as the engine
    # sets them), the next class warns, naming the block type.
    name, saved = recompile_limit_name(), getattr(config, recompile_limit_name())
    handler = LimitHits()
    logging.getLogger("torch._dynamo.convert_frame").addHandler(handler)
    try:
        setattr(config, name, counter.frame_count)
        classes.limit = counter.frame_count
        with caplog.at_level(logging.WARNING):
            pipe(["a cat", long, "a dog"], control_image=control, **KW)  # batch 3: new classes
    finally:
        setattr(config, name, saved)
        logging.getLogger("torch._dynamo.convert_frame").removeHandler(handler)
    ours = [r.getMessage() for r in caplog.records if "past the recompile limit" in r.getMessage()]
    assert handler.messages and ours, (handler.messages, ours)
    assert any("ControlTransformerBlock" in m for m in ours) and any("(TransformerBlock" in m for m in ours)


@needs_cpu_fp8
def test_fp8_reaches_the_branch(fresh, control_files):  # noqa: F811
    pipe = fresh(torch.bfloat16)
    pipe.load_controlnet(control_files["2.1"])
    control = picture(48, 32, 5)
    reference = pipe("a cat", control_image=control, **KW).images
    pipe.optimize(fp8=True)
    fp8 = [n for n, m in pipe.controlnet.named_modules() if isinstance(m, Float8Linear)]
    assert any(n.startswith("control_layers.0.attention.") for n in fp8)
    assert not any("after_proj" in n or "before_proj" in n or "embedder" in n for n in fp8)
    got = pipe("a cat", control_image=control, **KW).images
    err = rel_err(got, reference)
    print(f"fp8 with ControlNet 2.1: final latents rel err {err:.3e} against bf16")
    assert 0 < err < 0.1


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_graphed_loop_replays_for_new_control_inputs(eager, fresh, control_files, mode):  # noqa: F811
    """A new control image or scale is copied into the captured graph(s): no new capture, results as
    eager. In step mode the branch's per-step modulations travel with the step (not keyed by it)."""
    from .test_compiled import graphed

    pipe = fresh()
    pipe.load_controlnet(control_files["2.1"])
    pipe.caption_buckets = (64, 128, 256, 512)
    sampler, _ = graphed(pipe, mode=mode)
    for seed, scale in ((1, 0.75), (2, 0.3), (3, 1.0)):
        control = picture(48, 32, seed)
        got = pipe("a cat", control_image=control, controlnet_conditioning_scale=scale, **KW).images
        want = eager("a cat", control_image=control, controlnet_conditioning_scale=scale, **KW).images
        assert_rel(got, want, 1e-5, f"graphed ({mode}) control run, scale {scale}")
    assert sampler.captures == 1 and sampler.replays == 3 * (2 if mode == "step" else 1)
    pipe.unload_controlnet()
    assert not sampler.graphs  # captured graphs held the branch: dropped


def test_loading_and_unloading_a_controlnet_keeps_the_graphs_without_control(eager, fresh, control_files):  # noqa: F811
    """A server loading and unloading a ControlNet between requests: the graphs of requests without a
    control image run the DiT alone and stay; the graphs of control requests hold the branch and go
    with it (its memory is freed). Up to 0.20.0 every change dropped every graph (4 captures for 4
    plain requests with 3 changes). Each request equals the eager pipeline's bit for bit."""
    from zimage_native.accel.cuda_graphs import _holds

    from .test_compiled import graphed

    pipe, plain_eager = fresh(), fresh()
    sampler, frozen = graphed(pipe)
    control = picture(48, 32, 5)

    def both(**kw):
        want = (eager if "control_image" in kw else plain_eager)("a cat", **kw, **KW).images
        assert torch.equal(pipe("a cat", **kw, **KW).images, want)

    both()
    pipe.load_controlnet(control_files["2.1"])
    both()
    assert sampler.captures == 1 and frozen.released == 0
    both(control_image=control)
    assert sampler.captures == 2
    held = pipe.controlnet
    pipe.unload_controlnet()
    assert frozen.released == 1 and len(sampler.graphs) == 1  # the control graph went with its branch
    assert not any(_holds(key, held) for key in sampler.graphs)
    both()
    pipe.load_controlnet(control_files["2.1"])
    both()
    both(control_image=control)  # a new branch: captured anew
    pipe.load_controlnet(control_files["2.1"])  # replacing it releases its graph too
    assert sampler.captures == 3 and frozen.released == 2 and len(sampler.graphs) == 1


def test_a_controlnet_at_a_freed_ones_address_is_not_counted_as_a_recapture(fresh, control_files, monkeypatch,  # noqa: F811
                                                                          caplog):
    """A branch hashes by its address, which a branch loaded after an unload can take. The graph cache
    remembered evicted step kinds by their signatures' hashes, so the new branch's first control
    capture matched the freed branch's evicted one and counted as a recapture, with the thrash
    warning advising a larger cache (100 rounds of load, control request, plain request with room for
    one graph: 6 branches took an earlier one's address, 105 recaptures for 99). Here every branch
    hashes alike, as if each took the last one's address: the new branch's capture is no recapture;
    the plain request's graph, evicted by it and captured again, still is."""
    import logging

    from zimage_native.model.controlnet import ZImageControlNet

    from .test_compiled import graphed

    monkeypatch.setattr(ZImageControlNet, "__hash__", lambda self: 0)
    pipe = fresh()
    sampler, _ = graphed(pipe, frozen=False, max_graphs=1)
    control = picture(48, 32, 5)
    with caplog.at_level(logging.WARNING, logger="zimage_native.accel.cuda_graphs"):
        pipe.load_controlnet(control_files["2.1"])
        pipe("a cat", control_image=control, **KW)
        pipe("a cat", **KW)  # evicts the control graph
        pipe.unload_controlnet()
        pipe.load_controlnet(control_files["2.1"])
        pipe("a cat", control_image=control, **KW)  # a new branch: its first capture (evicts the plain graph)
        assert (sampler.captures, sampler.evictions, sampler.recaptures) == (3, 2, 0)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        pipe("a cat", **KW)  # captured again after its eviction: a recapture
    assert (sampler.captures, sampler.recaptures) == (4, 1)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_triton_kernels_reach_the_branch(eager, fresh, control_files):  # noqa: F811
    """kernels="triton" (Triton's interpreter on the CPU): every leaf of the branch is swapped, its
    q|k|v and w1|w3 fused, and the result equals eager within the parity tolerance."""
    pytest.importorskip("triton")
    from zimage_native.accel import count_fused, load_kernels

    kernels = load_kernels(interpret=not torch.cuda.is_available())
    pipe = fresh()
    pipe.optimize(kernels="triton")
    pipe.load_controlnet(control_files["2.1"])  # after optimize: gets the swaps too
    counts = count_fused(pipe.controlnet)
    assert counts and all(swapped == total > 0 for swapped, total in counts.values()), counts
    assert all(m.to_qkv is not None for m in pipe.controlnet.modules() if isinstance(m, Attention))
    control = picture(48, 32, 5)
    kernels.reset_launch_counts()
    got = pipe(["a cat", "a dog"], control_image=control, **KW).images
    assert sum(kernels.launch_counts().values()) > 0
    assert_rel(got, eager(["a cat", "a dog"], control_image=control, **KW).images, 1e-5, "kernels='triton'")


def test_offload_blocks_streams_the_branch_too(control_model_dir, control_files, eager):  # noqa: F811
    """With offload="blocks" the branch's blocks are streamed like the DiT's (its projections and
    modulations stay resident): every branch block runs on its moved copy, the results are those of
    the resident pipeline, each branch block is fetched once per use (the last forward prefetches
    no block for a step that does not come) and between runs no block of either is held."""
    from zimage_native.control import branch_blocks

    from .test_lowvram_pipeline import FakeMove

    pipe = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="blocks")
    pipe.progress = False
    pipe.load_controlnet(control_files["2.1"])
    streamer = pipe.controlnet.block_streamer
    assert streamer.blocks == branch_blocks(pipe.controlnet) and "after_proj" in streamer.keep
    move = FakeMove(streamer)  # logs which block each moved tensor belongs to
    ran, used = [], []
    for i, block in enumerate(streamer.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: used.append(i) or ran.append(
            not {t.data_ptr() for t in _streamed_tensors(m, streamer.keep)} & set(move.owner)))
    control = picture(48, 32, 5)
    got = pipe(["a cat", "a dog"], control_image=control, guidance_scale=2.0, **KW).images
    want = eager(["a cat", "a dog"], control_image=control, guidance_scale=2.0, **KW).images
    assert torch.equal(got, want)
    # 2 steps x 2 CFG forwards (positives, negatives: mask-free), every block on its moved copy
    assert len(ran) == 2 * 2 * len(streamer.blocks) and all(ran)
    assert sorted(set(move.log)) == list(range(len(streamer.blocks)))
    assert collections.Counter(move.log) == collections.Counter(used)
    dit = pipe.transformer.block_streamer
    # the block each fetched for a step that did not come is dropped when the sampling loop ends
    assert not streamer.loaded and not dit.loaded
    assert torch.equal(pipe(["a cat", "a dog"], control_image=control, guidance_scale=2.0, **KW).images, want)


def _record_streaming(streamer, tag: str, log: list) -> None:
    """Log each block copy of ``streamer`` ("copy", tag, block) (one entry per block copy, not per
    tensor) and each block use ("use", tag, block, whether it was on the device already, which the
    hook sees before the streamer's own)."""
    owner = {t.data_ptr(): i for i, b in enumerate(streamer.blocks) for t in _streamed_tensors(b, streamer.keep)}
    move = streamer.transfer

    def transfer(t):
        if log[-1:] != [("copy", tag, owner[t.data_ptr()])]:
            log.append(("copy", tag, owner[t.data_ptr()]))
        return move(t)

    streamer.transfer = transfer
    for i, block in enumerate(streamer.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: log.append(("use", tag, i, i in streamer.loaded)),
                                        prepend=True)


@pytest.mark.parametrize("version", [None, "1.0", "2.0", "2.1"])
def test_offload_blocks_prefetches_every_block_use_but_the_requests_first(control_model_dir, control_files,  # noqa: F811
                                                                          version):
    """With a ControlNet 2.x the DiT runs its noise-refiner blocks after the first refiner hint
    twice in a pass (its own tokens, then the branch's with the hints) and a 2.0 branch its control
    layers twice (the refiner chain, then the main one). The streamer learned one successor per
    block, the first seen on a tie: the DiT's last refiner block predicted itself (so nothing)
    both times, and its second run and the first main layer were synchronous copies in every
    forward (3 steps with CFG: 13 of 46 DiT uses, 7 of 23 without; the branch's were fixed by
    counting the last pass's runs, but the same tie hid the first). Now a run is learned as
    (block, its runs before it in the pass), and a block that runs again next keeps its copy: in a
    request after the first, with and without CFG and for every ControlNet version, each
    streamer's only synchronous use is its first of the request, every copy is used (one per use,
    a block's back-to-back runs using one), nothing stays on the device, and the images are
    bit-equal to the resident pipeline's; so too with the first-block cache reusing every step
    after the first (its decision names the block that follows the DiT's first main layer)."""
    pipe = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="blocks")
    resident = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = resident.progress = False
    kw = dict(KW, output_type="pt")
    streamers = {"dit": pipe.transformer.block_streamer}
    if version is not None:
        pipe.load_controlnet(control_files[version]), resident.load_controlnet(control_files[version])
        streamers["branch"] = pipe.controlnet.block_streamer
        kw["control_image"] = picture(48, 32, 5)
    log = []
    for tag, streamer in streamers.items():
        _record_streaming(streamer, tag, log)
    pipe("a cat", **kw)  # the first request learns the order
    for steps, guidance, cache in ((3, 2.0, 0.0), (3, 0.0, 0.0), (3, 2.0, 1e6), (3, 0.0, 1e6)):
        request = dict(kw, num_inference_steps=steps, guidance_scale=guidance, first_block_cache=cache)
        log.clear()
        images = pipe("a cat", **request).images
        for tag, streamer in streamers.items():
            uses = [e for e in log if e[:2] == ("use", tag)]
            synchronous = [k for k, e in enumerate(uses) if not e[3]]
            assert synchronous == [0], (tag, steps, guidance, f"{len(synchronous)} of {len(uses)} uses not prefetched",
                                        [e[2] for e in uses], synchronous)
            fetches = [e[2] for e in log if e[:2] == ("copy", tag)]
            runs = [e[2] for k, e in enumerate(uses) if k == 0 or uses[k - 1][2] != e[2]]  # back-to-back: one copy
            assert fetches == runs, (tag, steps, guidance, fetches, runs)
            if tag == "dit" and version in ("2.0", "2.1"):  # its last refiner block: twice in a row per forward
                assert len(uses) - len(fetches) == steps * (1 + (guidance > 0))
            assert not streamer.loaded
        assert torch.equal(images, resident("a cat", **request).images)


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_the_first_block_cache_wastes_no_copy_at_prefetch_depth_2_with_a_controlnet_2x(control_model_dir,  # noqa: F811
                                                                                         control_files, version):
    """A ControlNet 2.x computes its hints with the DiT's noise-refiner blocks before the DiT's
    forward. The first-block cache named the first main layer's successor None (nothing prefetched
    past it until it decides) only within the forward, so at prefetch depth 2 the hints' last
    refiner block prefetched the second main layer, wasted on every reused step (48 copies for 40
    block runs, 5 steps with CFG). Now the hints run within the cache's decision too: one copy per
    run, and the images equal the resident pipeline's."""
    pipe = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="blocks")
    resident = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = resident.progress = False
    pipe.load_controlnet(control_files[version]), resident.load_controlnet(control_files[version])
    streamer = pipe.transformer.block_streamer
    streamer.depth = 2
    kw = dict(KW, output_type="pt", control_image=picture(48, 32, 5), num_inference_steps=5, first_block_cache=1e6)
    log = []
    _record_streaming(streamer, "dit", log)
    pipe("a cat", **kw)  # the first request learns the order
    for guidance in (2.0, 0.0):
        log.clear()
        out = pipe("a cat", **dict(kw, guidance_scale=guidance))
        assert out.info["first_block_cache_forwards"]["reused"] >= 4  # the premise: reused steps
        uses = [e[2] for e in log if e[0] == "use"]
        fetches = [e[2] for e in log if e[0] == "copy"]
        runs = [b for k, b in enumerate(uses) if k == 0 or uses[k - 1] != b]  # back-to-back: one copy
        assert fetches == runs, (guidance, fetches, runs)
        assert not streamer.loaded
        assert torch.equal(out.images, resident("a cat", **dict(kw, guidance_scale=guidance)).images)


def test_the_gpu_benchmark_runs_its_smoke_mode(tmp_path):
    """benchmarks/bench_controlnet.py (part of benchmarks/gpu_check.sh) on the CPU: every row, and
    the diffusers rows at fp32 parity (the GPU run reports the bf16 numbers)."""
    import json

    from .utils import benchmark_script

    bench = benchmark_script("bench_controlnet")
    rows = bench.main(["--smoke", "--out", str(tmp_path)])
    cases = [(r["case"], r["mode"]) for r in rows]
    assert cases == [("no control", "eager")] + [(f"ControlNet {v}", "eager") for v in ("1.0", "2.0", "2.1")] + [
        (f"ControlNet {v}", "diffusers eager") for v in ("1.0", "2.0", "2.1")]
    assert all(r["rel_err_vs_diffusers"] <= 1e-5 for r in rows if "rel_err_vs_diffusers" in r)
    assert json.loads((tmp_path / "controlnet.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_a_shared_dit_compiled_through_one_pipeline_compiles_the_others_controlnet(fresh, control_files):  # noqa: F811
    """Two pipelines share a DiT; the second has a ControlNet loaded. Compiling the DiT through the first
    recorded "blocks" in the second, but its ControlNet stayed eager (0 of 4 branch blocks compiled).
    A pipeline built on the compiled DiT afterwards recorded compile "off": a ControlNet it loaded
    stayed eager (0 of 4) and optimize(compile="full") compiled the "blocks" DiT again. Now the
    second's ControlNet is compiled with the DiT, and the third records the DiT's compile (its
    ControlNet compiled, "full" refused); the control images equal the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import CompiledBlock

    def compiled_blocks(model):
        return sum(isinstance(m.__dict__.get("forward"), CompiledBlock) for m in model.modules())

    torch._dynamo.reset()
    first = fresh()
    control = picture(48, 32, 3)
    want = fresh()
    want.load_controlnet(control_files["2.1"])
    want = want("a cat", control_image=control, **KW).images
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    second.progress = False
    second.load_controlnet(control_files["2.1"])
    backend = CompileCounterWithBackend("eager")
    lines = first.optimize(compile="blocks", compile_backend=backend)
    assert "ControlNet of another pipeline holding this DiT: compile: blocks (4 blocks" in " ".join(lines), lines
    branch = len(second.controlnet.control_layers) + len(second.controlnet.control_noise_refiner)
    assert second._accel["compile"] == "blocks" and compiled_blocks(second.controlnet) == branch == 4
    third = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    third.progress = False
    assert third._accel["compile"] == "blocks" and third._compile_options == first._compile_options
    third.load_controlnet(control_files["2.1"])
    assert compiled_blocks(third.controlnet) == branch
    with pytest.raises(ValueError, match="compile is already 'blocks'"):
        third.optimize(compile="full")
    for pipe in (second, third):
        assert_rel(pipe("a cat", control_image=control, **KW).images, want, 1e-5, "compiled ControlNet")
    assert backend.frame_count > 0
    assigned = fresh()
    assigned.transformer = first.transformer  # the assigned DiT's record comes with it
    assert assigned._accel["compile"] == "blocks" and assigned._compile_options == first._compile_options
    from zimage_native.accel.compile import compile_transformer_

    dit = fresh().transformer  # (its pipeline is gone: the DiT's own compile is the record)
    compile_transformer_(dit, "full", backend, "static")
    bare = fresh()
    bare.transformer = dit
    assert bare._accel["compile"] == "full" and bare._compile_options[1] == "static"


def test_auto_attention_chosen_again_at_a_move_reaches_the_controlnets_of_every_pipeline_holding_the_dit(
        fresh, control_files, monkeypatch):  # noqa: F811
    """attention="auto" is chosen again when a pipeline places its DiT (pipe.to, offload, a ControlNet
    load): on a DiT shared with another pipeline, only the DiT and the caller's ControlNet got the new
    pick, and the other pipeline's ControlNet kept the backend picked before (xformers beside the DiT
    running SDPA). The stand-in makes xFormers available, then not (as on a device without it)."""
    from zimage_native.accel import attention_backends as ab
    from zimage_native.model.attention import attention

    def stand_in(q, k, v, mask):  # a GPU backend's stand-in
        return attention(q, k, v, mask)

    available = {"sdpa", "xformers"}
    monkeypatch.setattr(ab, "unavailable_reason", lambda name, *args: None if name in available else "no")
    monkeypatch.setitem(ab.FACTORIES, "xformers", lambda: stand_in)
    first = fresh()
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config,
                            first.vae_config)
    first.optimize(attention="auto")
    second.load_controlnet(control_files["2.1"])
    assert ab.backend_in_place(first.transformer) == ab.backend_in_place(second.controlnet) == "xformers"
    available.discard("xformers")
    first.to("cpu")
    assert ab.backend_in_place(first.transformer) == "sdpa"
    assert ab.backend_in_place(second.controlnet) == "sdpa"
    assert first._accel["attention"] == second._accel["attention"] == "auto"


def test_an_attention_backend_already_in_place_is_recorded_by_every_pipeline_holding_the_dit(
        fresh, control_files, monkeypatch):  # noqa: F811
    """optimize(attention=X) where X is already in place on the shared DiT changed only the record of
    the pipeline asked: with "auto" picking the backend there, the other pipeline kept "xformers"
    (so it does not choose again at a move); with the DiT given the backend outside the pipelines
    (accel.set_attention_backend), the other pipeline kept "sdpa" and its ControlNet kept running
    SDPA (0 of its attention modules on the backend) beside the DiT running X. Now every pipeline
    holding the DiT records X, and a ControlNet of theirs not running it gets it (the call then
    installs it as for a backend not in place)."""
    from zimage_native.accel import attention_backends as ab
    from zimage_native.model.attention import attention

    def stand_in(q, k, v, mask):  # a GPU backend's stand-in
        return attention(q, k, v, mask)

    monkeypatch.setattr(ab, "unavailable_reason", lambda name, *args: None if name in ("sdpa", "xformers") else "no")
    monkeypatch.setitem(ab.FACTORIES, "xformers", lambda: stand_in)

    def pair():
        first = fresh()
        second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config,
                                first.vae_config)
        second.progress = False
        return first, second

    first, second = pair()
    first.optimize(attention="xformers")
    assert second._accel["attention"] == "xformers"
    lines = first.optimize(attention="auto")  # picks xformers, in place
    assert lines[-1].endswith("(already in place)"), lines
    assert first._accel["attention"] == second._accel["attention"] == "auto"

    first, second = pair()
    second.load_controlnet(control_files["2.1"])
    ab.set_attention_backend(first.transformer, "xformers")
    lines = first.optimize(attention="xformers")
    assert first._accel["attention"] == second._accel["attention"] == "xformers"
    assert ab.backend_in_place(second.controlnet) == "xformers", lines
    assert ab.backend_in_place(first.transformer) == "xformers"


@pytest.mark.parametrize("call", ["to", "offload", "controlnet"])
def test_placing_a_shared_dit_waits_for_the_run_of_every_pipeline_holding_it(fresh, control_files, call):  # noqa: F811
    """pipe.to, enable_model_cpu_offload and load_controlnet place the DiT (move it, pick an "auto"
    attention again for it); on a DiT shared with another pipeline they took only their own
    pipeline's lock, so such a call from another thread during the other pipeline's run went through
    between its steps (pipe.to("meta") took the DiT's weights away under the run). They now take the
    lock of every pipeline holding the DiT, as the other DiT-changing calls do: the call waits for
    the run, which ends as an undisturbed run does."""
    import threading

    first = fresh()
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config,
                            first.vae_config)
    second.progress = False
    place = {"to": lambda: first.to("meta"), "offload": lambda: first.enable_model_cpu_offload(device="meta"),
             "controlnet": lambda: first.load_controlnet(control_files["2.1"])}[call]
    run = dict(width=32, height=32, num_inference_steps=3, output_type="latent", seed=0)
    want = second("a cat", **run).images
    placed, during = threading.Event(), []

    def on_step_end(pipe, step, timestep, tensors):
        if step == 0:
            threading.Thread(target=lambda: (place(), placed.set()), daemon=True).start()
            during.append(placed.wait(1.0))  # (without the locks the call lands here)
        return tensors

    got = second("a cat", callback_on_step_end=on_step_end, **run).images
    assert placed.wait(60) and during == [False]
    assert torch.equal(got, want)


def test_two_pipelines_sharing_a_dit_visit_it_one_at_a_time_with_a_controlnet_loaded(fresh, control_files,  # noqa: F811
                                                                                     monkeypatch):
    """Two pipelines holding one DiT under offload="model", one with a ControlNet loaded, run in two
    threads. A visit of the GPU waits for another thread's visit of the same module, but the run with
    the ControlNet visited a ModuleList of the DiT and the branch made anew at each call, which no
    other visit held: both visits ran at once, and the one ending last pointed the DiT back at the
    other's device copies (92 of 131 tensors left resting off their CPU copies). The DiT and the
    branch visit each as itself now: the second run waits. The first run into the DiT's first block
    waits there (3 s at most) for the other to come in; the second in stays there 1 s so that it
    ends last. "cpu:1" stands in for the GPU."""
    import threading
    import time

    import zimage_native.pipeline as pipeline

    monkeypatch.setattr(pipeline, "resolve_device", lambda d: torch.device("cpu", 1))
    first = fresh()
    first.enable_model_cpu_offload()
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config,
                            first.vae_config, placement=dict(first.placement), offload="model")
    second.progress = False
    first.load_controlnet(control_files["2.1"])
    dit = first.transformer
    resting = [t.data_ptr() for t in (*dit.parameters(), *dit.buffers())]
    inside, came_in_meanwhile = {"first": threading.Event(), "second": threading.Event()}, []

    def hold(module, args):
        me = threading.current_thread().name
        inside[me].set()
        other = inside["second" if me == "first" else "first"]
        if not other.is_set():
            came_in_meanwhile.append(other.wait(3))
        else:
            time.sleep(1)

    dit.layers[0].register_forward_pre_hook(hold)
    errors = []

    def run(pipe):
        try:
            pipe("a cat", height=32, width=32, num_inference_steps=1, output_type="latent", seed=0)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(pipe,), name=name, daemon=True)
               for name, pipe in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    assert came_in_meanwhile == [False], "the two runs visited the shared DiT at once"
    assert [t.data_ptr() for t in (*dit.parameters(), *dit.buffers())] == resting
