"""The first-block cache (accel/block_cache.py) against an independent implementation of the same
rule on diffusers' DiT, and against the uncached engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from zimage_native.accel.cuda_graphs import GraphedSampler

from .dit_configs import TINY_DIT
from .graph_standins import FrozenGraphs
from .utils import assert_rel, benchmark_script, rel_err

KW = dict(height=32, width=32, num_inference_steps=8, output_type="latent")
# The tiny random DiT's first-layer residual changes by 110% to 165% from step to step (random
# weights are not smooth in t, unlike the released ones), so the thresholds that mix full and
# reused steps here are around 1.3; what counts is that both implementations decide alike.
MIXED = 1.35


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model with 4 main layers: a head, two middle layers and a tail."""
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("fbc"), dit_kwargs=dict(TINY_DIT, n_layers=4))


@pytest.fixture(scope="module")
def pipe(folder):
    from .fixtures import our_pipeline

    return our_pipeline(folder)


@pytest.fixture(scope="module")
def reference(folder):
    pytest.importorskip("diffusers")
    from .fixtures import reference_pipeline

    return reference_pipeline(folder)


class _Rule:
    """The cache's rule, written again for diffusers' blocks, one decision per batch item (diffusers
    runs CFG as one batch [positives, negatives]; the engine runs them as two forwards)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.head_residual, self.tail_residual = {}, {}
        self.full = self.reused = 0
        self.compute: list[bool] = []
        self.head_out = None


class _Head(nn.Module):
    def __init__(self, block, rule):
        super().__init__()
        self.block, self.rule = block, rule

    def forward(self, x, *args):
        out = self.block(x, *args)
        rule, residual = self.rule, (out - x).double()
        rule.compute = []
        for i in range(x.shape[0]):
            before = rule.head_residual.get(i)
            change = None if before is None else ((residual[i] - before).abs().mean() / before.abs().mean()).item()
            compute = change is None or change > rule.threshold
            rule.compute.append(compute)
            if compute:
                rule.head_residual[i] = residual[i]
            rule.full, rule.reused = rule.full + compute, rule.reused + (not compute)
        rule.head_out = out
        return out


class _Later(nn.Module):
    def __init__(self, block, rule, tail: bool):
        super().__init__()
        self.block, self.rule, self.tail = block, rule, tail

    def forward(self, x, *args):
        out, rule = self.block(x, *args), self.rule
        rows = []
        for i, compute in enumerate(rule.compute):
            if not self.tail:
                rows.append(out[i] if compute else x[i])  # a skipped item passes through
            elif compute:
                rule.tail_residual[i] = out[i] - rule.head_out[i]
                rows.append(out[i])
            else:
                rows.append(rule.head_out[i] + rule.tail_residual[i])
        return torch.stack(rows)


def reference_run(reference, threshold: float, prompt: str, seed: int, **kw):
    """diffusers' ZImagePipeline with the rule wrapped around its main layers; (latents, counts)."""
    layers = reference.transformer.layers
    blocks = list(layers)
    rule = _Rule(threshold)
    for i, block in enumerate(blocks):
        layers[i] = _Head(block, rule) if i == 0 else _Later(block, rule, tail=i == len(blocks) - 1)
    try:
        kw.setdefault("guidance_scale", 0.0)
        out = reference(prompt, generator=torch.Generator().manual_seed(seed), **kw).images
    finally:
        for i, block in enumerate(blocks):
            layers[i] = block
    return out, {"full": rule.full, "reused": rule.reused}


def test_threshold_mixes_full_and_reused_steps_as_the_reference_does(pipe, reference):
    for seed in (0, 5):
        out = pipe("a cat", seed=seed, first_block_cache=MIXED, **KW)
        want, counts = reference_run(reference, MIXED, "a cat", seed, **KW)
        assert out.info["first_block_cache_forwards"] == counts
        assert counts["reused"] >= 2 and counts["full"] >= 2  # the premise: both kinds of step ran
        assert_rel(out.images, want, 1e-5, "final latents")
        assert rel_err(out.images, pipe("a cat", seed=seed, **KW).images) > 1e-3  # reuse changed the image


def test_cfg_branches_decide_separately_as_the_reference_items_do(pipe, reference):
    # Same token count for both prompts: diffusers' CFG batch then has no padding rows, whose
    # residuals would enter its per-item mean and not the engine's.
    assert pipe.encode_prompt(["a cat"])[0].shape == pipe.encode_prompt(["a bat"])[0].shape
    kw = dict(KW, guidance_scale=3.0, negative_prompt="a bat")
    out = pipe("a cat", seed=2, first_block_cache=MIXED, **kw)
    want, counts = reference_run(reference, MIXED, "a cat", 2, **kw)
    assert out.info["first_block_cache_forwards"] == counts
    assert counts["reused"] >= 2 and counts["full"] >= 3
    assert_rel(out.images, want, 1e-5, "final latents")


def test_a_threshold_nothing_passes_is_the_uncached_run_bit_for_bit(pipe):
    plain = pipe("a cat", seed=1, guidance_scale=2.0, **KW)
    out = pipe("a cat", seed=1, guidance_scale=2.0, first_block_cache=1e-9, **KW)
    assert out.info["first_block_cache_forwards"] == {"full": 16, "reused": 0}
    assert torch.equal(out.images, plain.images)
    assert "first_block_cache_forwards" not in plain.info


def test_a_threshold_everything_passes_reuses_every_step_after_the_first(pipe, reference):
    out = pipe("a cat", seed=4, first_block_cache=1e6, **KW)
    assert out.info["first_block_cache_forwards"] == {"full": 1, "reused": 7}
    assert_rel(out.images, reference_run(reference, 1e6, "a cat", 4, **KW)[0], 1e-5)


def test_each_request_starts_afresh_and_records_the_threshold(pipe):
    first = pipe("a cat", seed=3, first_block_cache=MIXED, **KW)
    again = pipe("a cat", seed=3, first_block_cache=MIXED, **KW)
    assert torch.equal(first.images, again.images)
    assert first.info["first_block_cache_forwards"] == again.info["first_block_cache_forwards"]
    assert first.info["first_block_cache"] == MIXED


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_thresholds_are_refused(pipe, bad):
    with pytest.raises(ValueError, match="first_block_cache must be a number >= 0"):
        pipe("a cat", seed=0, first_block_cache=bad, **KW)


def test_thresholds_are_any_real_number():
    """numpy's float32 (a value from an array or a config) is a threshold, as for the other settings."""
    from zimage_native.accel.block_cache import check_threshold

    for good in (0, 0.1, np.float32(0.1), np.float64(0.2), np.int64(1)):
        check_threshold(good)
    for bad in (np.float32("nan"), np.float64(-0.1), np.bool_(True)):
        with pytest.raises(ValueError, match="first_block_cache must be a number >= 0"):
            check_threshold(bad)


def test_refused_under_cuda_graphs_and_full_compile_before_any_work(fresh_pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(fresh_pipe, "encode_texts", lambda *a, **k: calls.append(1))
    fresh_pipe._graphed = GraphedSampler(fresh_pipe, capture=FrozenGraphs().capture)
    with pytest.raises(ValueError, match="turn off CUDA graphs"):
        fresh_pipe("a cat", seed=0, first_block_cache=0.1, **KW)
    fresh_pipe._graphed = None
    from zimage_native.accel.compile import compile_transformer_

    compile_transformer_(fresh_pipe.transformer, "full", backend="eager")
    with pytest.raises(ValueError, match='compile mode "blocks"'):
        fresh_pipe("a cat", seed=0, first_block_cache=0.1, **KW)
    assert not calls  # refused before the text encoder ran


def test_compiled_blocks_run_under_the_cache(fresh_pipe):
    from zimage_native.accel.compile import compile_transformer_

    kw = dict(KW, num_inference_steps=4)
    eager = fresh_pipe("a cat", seed=6, first_block_cache=1e6, **kw).images
    compile_transformer_(fresh_pipe.transformer, "blocks", backend="eager")
    compiled = fresh_pipe("a cat", seed=6, first_block_cache=1e6, **kw)
    assert compiled.info["first_block_cache_forwards"] == {"full": 1, "reused": 3}
    assert_rel(compiled.images, eager, 1e-6)


def test_the_cost_benchmark_times_both_kinds_of_forward(tmp_path, capsys):
    out = tmp_path / "block_cache.json"
    assert benchmark_script("bench_block_cache").main(["--smoke", "--size", "128", "--repeats", "2",
                                                       "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["layers"] == 30 and result["tokens"] == 64 + 128
    assert 0 < result["reused_ms"] < result["full_ms"]  # 2 refiner blocks + 1 of 30 layers, against all
    assert "| full forward ms | reused forward ms |" in capsys.readouterr().out


def test_streamed_blocks_under_the_cache_equal_resident_ones_and_skipped_layers_stay_in_cpu_memory(folder, pipe):
    from .fixtures import our_pipeline
    from .test_lowvram_pipeline import FakeMove

    streamed = our_pipeline(folder, offload="blocks")
    move = FakeMove(streamed.transformer.block_streamer)
    kw = dict(KW, num_inference_steps=4)
    out = streamed("a cat", seed=8, first_block_cache=1e6, **kw)
    assert out.info["first_block_cache_forwards"] == {"full": 1, "reused": 3}
    assert torch.equal(out.images, pipe("a cat", seed=8, first_block_cache=1e6, **kw).images)
    # blocks: context refiner 0, noise refiner 1, main layers 2-5; the reused steps run 0 and 1 once
    # each, then layer 0 (block 2): the last two layers were copied in for the full step only
    assert move.log.count(4) == 1 and move.log.count(5) == 1, move.log
    assert move.log.count(2) >= 4 and move.log.count(1) >= 4  # (a wrong prefetch may add a copy)


def test_streamed_blocks_under_the_cache_are_each_copied_once_per_use_and_prefetched(folder, pipe):
    """Which block follows the first main layer is known only once the cache has decided: the
    first layer prefetched its most frequent successor (the second layer), a wasted copy on every
    reused step, and the next step's first block was then copied on demand (a 6-step request
    reusing 5 steps after an uncached one: 21 copies for 16 uses, 5 on demand). Now the first
    layer prefetches nothing while the cache decides and the decision prefetches what follows it
    (offload.runs_next with None, offload.resume_after): after the first request each block is
    copied once per use and only the request's first block on demand, on reused and full steps
    alike, and the images are bit-equal to the resident pipeline's under the same cache."""
    import functools

    from .fixtures import our_pipeline
    from .test_lowvram_pipeline import FakeMove

    streamed = our_pipeline(folder, offload="blocks")
    streamer = streamed.transformer.block_streamer
    move = FakeMove(streamer)
    on_demand, used = [], []

    def record(i, module, args):  # before the streamer's hook: was the block prefetched?
        if i not in streamer.loaded:
            on_demand.append(len(used))
        used.append(i)

    for i, block in enumerate(streamer.blocks):
        block.register_forward_pre_hook(functools.partial(record, i), prepend=True)
    dit = streamed.transformer
    per_forward, rest = len(dit.noise_refiner) + 1, len(dit.layers) - 1  # run every forward / in full only
    kw = dict(KW, num_inference_steps=6)
    for request, cache in enumerate((0.0, 1e6, MIXED, 1e6, MIXED)):
        move.log.clear(), on_demand.clear(), used.clear()
        out = streamed("a cat", seed=8, first_block_cache=cache, **kw)
        counts = out.info.get("first_block_cache_forwards", {"full": 6, "reused": 0})
        assert len(used) == len(dit.context_refiner) + 6 * per_forward + counts["full"] * rest, (request, used)
        if cache:
            assert counts["reused"] >= 2 and counts["full"] >= 1 + (cache == MIXED), counts  # the premise
        assert not streamer.loaded
        assert sorted(move.log) == sorted(used), (request, counts, move.log, used)  # one copy per use
        if request:  # (the first request learns the order)
            assert on_demand == [0], (request, counts, on_demand, used)
        want = pipe("a cat", seed=8, first_block_cache=cache, **kw)
        assert torch.equal(out.images, want.images)


@pytest.mark.parametrize("resident", ["caption refiner", "first layer", "last layer"])
def test_a_dit_streaming_only_some_blocks_runs_with_and_without_the_cache(folder, pipe, resident):
    """``offload.stream_blocks(blocks=...)`` may leave some of the DiT's blocks resident. The caption
    passes (``offload.runs_next``) and the cache's decision (``runs_next`` with None,
    ``offload.resume_after``) looked their blocks up among the streamed ones: ValueError ("... is not
    in list") on every request with the caption refiner or the first main layer left resident, and on
    every cached one with the last layer left resident. A block left resident now names nothing: the
    images equal the resident pipeline's, with CFG, and nothing stays on the device."""
    from zimage_native.offload import stream_blocks

    from .fixtures import our_pipeline

    partial = our_pipeline(folder)
    dit = partial.transformer
    left = {"caption refiner": [*dit.context_refiner], "first layer": [dit.layers[0]], "last layer": [dit.layers[-1]]}
    streamer = stream_blocks(dit, "cpu", blocks=[b for b in (*dit.context_refiner, *dit.noise_refiner, *dit.layers)
                                                 if all(b is not r for r in left[resident])])
    kw = dict(KW, num_inference_steps=4, guidance_scale=2.0)
    for cache in (0.0, MIXED, 1e6):
        out = partial("a cat", seed=3, first_block_cache=cache, **kw)
        assert torch.equal(out.images, pipe("a cat", seed=3, first_block_cache=cache, **kw).images), cache
        assert not streamer.loaded
    assert out.info["first_block_cache_forwards"]["reused"] >= 2  # (the premise: reused steps)
