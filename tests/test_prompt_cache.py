"""The prompt cache: a text asked for again is not encoded again, and an offloaded text encoder does
not visit its device for it; results equal those of a pipeline without the cache."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from zimage_native import ZImagePipeline
from zimage_native.text_encoder import PromptCache


KW = dict(height=32, width=32, num_inference_steps=1, output_type="pt")


def spy_encoder(pipe, monkeypatch) -> list[list[str]]:
    """The batches of texts the pipeline's text encoder is asked to encode."""
    calls, encode = [], pipe.text_encoder.encode
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda texts, *a: calls.append(list(texts)) or encode(texts, *a))
    return calls


@pytest.fixture
def pipe(fresh_pipe):
    return fresh_pipe


@pytest.fixture(scope="module")
def uncached(tiny_model_dir):
    p = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    p.progress = False
    p.prompt_cache.max_entries = 0
    return p


def test_a_prompt_asked_again_is_not_encoded_again_and_gives_the_same_images(pipe, uncached, monkeypatch):
    calls = spy_encoder(pipe, monkeypatch)
    images = [pipe("a cat", seed=s, **KW).images for s in (1, 2)]
    assert len(calls) == 1 and pipe.prompt_cache.hits == 1 and pipe.prompt_cache.misses == 1
    for s, image in zip((1, 2), images):  # the same batch (one text) was encoded: bit-equal
        assert torch.equal(image, uncached("a cat", seed=s, **KW).images)
    # control: without the cache every request encodes
    control = spy_encoder(uncached, monkeypatch)
    uncached("a cat", seed=1, **KW)
    uncached("a cat", seed=2, **KW)
    assert len(control) == 2


def test_a_repeated_cfg_request_is_not_encoded_again(pipe, uncached, monkeypatch):
    calls = spy_encoder(pipe, monkeypatch)
    cfg = dict(guidance_scale=2.0, negative_prompt="blurry", seed=3, **KW)
    prompts = ["a cat", "a dog", "a cat"]
    first = pipe(prompts, **cfg).images
    assert len(calls) == 1 and len(calls[0]) == 6  # prompts and negatives in one batch, as without the cache
    assert torch.equal(pipe(prompts, **{**cfg, "seed": 3}).images, first) and len(calls) == 1
    assert torch.equal(first, uncached(prompts, **cfg).images)


def test_results_do_not_depend_on_what_was_encoded_before(pipe, uncached):
    """A text's features differ in the last bits with the batch it is encoded in (on this CPU too):
    the cache is keyed by the whole batch, so a request gives the bits it gives without the cache."""
    pipe(["a cat", "a long prompt about two dogs on a red sofa"], seed=1, **KW)
    alone = pipe("a cat", seed=1, **KW).images
    assert torch.equal(alone, uncached("a cat", seed=1, **KW).images)
    joint = uncached.encode_prompt(["a cat", "a long prompt about two dogs on a red sofa"])[0]
    assert not torch.equal(joint, uncached.encode_prompt(["a cat"])[0])  # why: per-text keys would differ


def test_the_cache_is_bounded_least_recently_used_out_and_hands_out_copies():
    cache, runs = PromptCache(max_entries=2), []
    source = object.__new__(type("Encoder", (), {}))

    def run(texts):
        runs.append(list(texts))
        batch = torch.arange(len(texts) * 8, dtype=torch.float32).reshape(len(texts), 4, 2)
        return [batch[i, : 2 + i] for i in range(len(texts))]  # views of one batch, as the encoder returns

    cache.encode(source, ["a"], 512, run)
    cache.encode(source, ["b"], 512, run)
    cache.encode(source, ["a"], 512, run)  # a is now the most recently used
    cache.encode(source, ["c"], 512, run)  # b goes
    assert runs == [["a"], ["b"], ["c"]] and len(cache) == 2
    cache.encode(source, ["b"], 512, run)
    assert runs[-1] == ["b"]
    cache.encode(source, ["a", "c"], 512, run)  # another batch: another entry
    assert runs[-1] == ["a", "c"]
    stored = cache._entries[(("a", "c"), 512)]
    assert [f.untyped_storage().nbytes() for f in stored] == [f.numel() * 4 for f in stored]  # compact copies
    first = cache.encode(source, ["a", "c"], 512, run)
    first[0].add_(100.0)
    assert not torch.equal(cache.encode(source, ["a", "c"], 512, run)[0], first[0])  # an edit does not reach it
    cache.encode(source, ["a", "c"], 77, run)  # another token limit is another entry
    assert runs[-1] == ["a", "c"] and len(runs) == 6
    small = PromptCache(max_entries=8, max_bytes=100)
    for text in "abcd":
        small.encode(source, [text], 512, run)  # (2, 2) fp32 features: 16 bytes each
    assert len(small) == 4 and small.nbytes == 64
    small.encode(source, ["a", "b"], 512, run)  # 16 + 24 bytes: 104 in all, so the oldest entry goes
    assert small.nbytes == 88 and [k[0] for k in small._entries] == [("b",), ("c",), ("d",), ("a", "b")]
    small.encode(source, ["a", "b", "c", "d", "e"], 512, run)  # 160 bytes: more than the cap, not kept
    assert small.nbytes == 88 and len(small) == 4


def test_another_encoder_a_move_or_size_zero_empties_it_and_it_keeps_no_encoder_alive(pipe, monkeypatch):
    pipe.encode_prompt(["a cat"])
    assert len(pipe.prompt_cache) == 1
    pipe.placement = dict.fromkeys(pipe.placement, torch.device("cpu", 1))  # (stands in for another device)
    pipe.to("cpu")
    assert len(pipe.prompt_cache) == 0
    pipe.encode_prompt(["a cat"])
    old, pipe.text_encoder = pipe.text_encoder, type(pipe.text_encoder)(pipe.text_encoder.model,
                                                                         pipe.text_encoder.tokenizer)
    calls = spy_encoder(pipe, monkeypatch)
    pipe.encode_prompt(["a cat"])
    assert len(calls) == 1  # a new encoder: encoded again
    ref = weakref.ref(old)
    del old
    gc.collect()
    assert ref() is None  # the cache held the old encoder only weakly
    pipe.prompt_cache.max_entries = 0
    pipe.encode_prompt(["a cat"])
    assert len(calls) == 2 and len(pipe.prompt_cache) == 0


def test_an_offloaded_text_encoder_visits_only_for_new_prompts(tiny_model_dir, monkeypatch):
    """("cpu:1" stands in for the GPU; the storage copies are recorded CPU clones.)"""
    import zimage_native.offload as offload

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", offload="model")
    pipe.progress = False
    pipe.placement = dict.fromkeys(pipe.placement, torch.device("cpu", 1))
    modules = {"text_encoder": pipe.text_encoder.model, "transformer": pipe.transformer, "vae": pipe.vae}
    owner = {t.untyped_storage().data_ptr(): name for name, m in modules.items()
             for t in (*m.parameters(), *m.buffers())}
    copied = []
    monkeypatch.setattr(offload, "copy_storage", lambda storage, device: copied.append(owner[storage.data_ptr()])
                        or storage.clone())

    def visits(prompt, seed):
        copied.clear()
        pipe(prompt, seed=seed, **KW)
        return list(dict.fromkeys(copied))

    assert visits("a cat", 1) == ["text_encoder", "transformer", "vae"]
    assert visits("a cat", 2) == ["transformer", "vae"]
    assert visits("a dog", 2) == ["text_encoder", "transformer", "vae"]


def test_the_cli_encodes_a_prompt_once_for_several_images(tiny_model_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.text_encoder import TextEncoder

    calls, encode = [], TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, texts, *a: calls.append(list(texts)) or encode(self, texts, *a))
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--output-dir",
                                       str(tmp_path), "--num-images", "3", "--device", "cpu", "--width", "32",
                                       "--height", "32", "--steps", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.iterdir())) == 3 and len(calls) == 1


def test_the_benchmark_encodes_on_every_timed_run(monkeypatch):
    """Cached features would time the encoder at zero: every bench pipeline runs without the cache."""
    from zimage_native import bench

    torch.manual_seed(0)
    pipe, _ = bench.build_random_pipeline(torch.device("cpu"), torch.float32, tiny=True)
    assert pipe.prompt_cache.max_entries == 0
    pipe.prompt_cache.max_entries = 32  # as a pipeline from from_pretrained (zimage bench --model) has it
    calls, asked = spy_encoder(pipe, monkeypatch), []
    for name in ("generate", "encode_prompt"):
        method = getattr(pipe, name)
        monkeypatch.setattr(pipe, name, lambda *a, _m=method, **k: asked.append(1) or _m(*a, **k))
    bench.run_ours(pipe, bench.LADDER[0], 32, 1, 2)
    assert len(asked) == 1 + 2 + 1 + 2  # cold start, 2 timed requests, the embeds, 2 timed encodes
    assert len(calls) == len(asked)


def test_a_move_to_where_the_pipeline_is_keeps_the_features_and_the_graphs(pipe, monkeypatch):
    """A script that calls pipe.to(device) before every call moves nothing after the first: the cached
    features and the captured graphs stay (each such call re-encoded the prompt and captured the
    graphs again). A real move, or an offloaded pipeline made resident, drops them."""
    from .test_compiled import graphed

    calls = spy_encoder(pipe, monkeypatch)
    sampler, _ = graphed(pipe, frozen=False)
    monkeypatch.setattr(pipe, "_check_graphs_fit", lambda *a: None)  # (the CPU stands in for the GPU)
    for _ in range(3):
        pipe.to("cpu")
        pipe("a cat", seed=1, **KW)
    assert len(calls) == 1 and sampler.captures == 1
    pipe.offload = "model"
    pipe.to("cpu")
    assert len(pipe.prompt_cache) == 0 and not sampler.graphs


def test_offloading_again_as_it_is_keeps_the_features(pipe, monkeypatch):
    """enable_model_cpu_offload() before every call, as pipe.to() above: encoded once."""
    calls = spy_encoder(pipe, monkeypatch)
    for _ in range(3):
        pipe.enable_model_cpu_offload(device="cpu")
        pipe("a cat", seed=1, **KW)
    assert len(calls) == 1 and pipe.offload == "model"
    pipe.to("cpu")  # offloading ends: a move
    assert len(pipe.prompt_cache) == 0
