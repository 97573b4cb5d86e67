"""The frozen-replay capture stand-in (tests/graph_standins.py) catches what a CUDA graph would get
wrong and a re-running stand-in would not: Python values baked in at capture, host reads, host data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .graph_standins import CaptureError, FakeGraphs, FrozenGraphs
from .utils import needs_cpu_fp8


@pytest.fixture(scope="module")
def fp8_one_layer_dir(tmp_path_factory):
    """TINY_FP8_DIT with one main layer: still a context refiner, a noise refiner and a main layer
    (the unmodulated and the modulated blocks, all fp8-convertible), a third fewer interpreted
    kernel launches than its two main layers (each launch costs the same at these sizes)."""
    from .dit_configs import TINY_FP8_DIT
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny-fp8-one-layer"), dict(TINY_FP8_DIT, n_layers=1))


def test_replay_follows_input_tensors_and_freezes_python_values():
    graphs = FrozenGraphs()
    x = torch.arange(6.0).reshape(2, 3)
    scale = {"value": 2.0}

    def fn():
        y = x.t() * scale["value"]  # a view, then a fresh result with a Python number in it
        y.add_(1.0)  # in place
        return torch.cat([y, y.sum(0, keepdim=True)])

    captured = graphs.capture(fn)
    x.copy_(torch.ones(2, 3))
    scale["value"] = 5.0  # not a tensor: the replay keeps 2.0, as a CUDA graph would
    captured.replay()
    expected = torch.cat([torch.full((3, 2), 3.0), torch.full((1, 2), 9.0)])
    assert torch.equal(captured.output, expected)


@pytest.mark.parametrize("body, match", [
    (lambda x: x * x.sum().item(), "reads a device value"),
    (lambda x: x if bool((x > 0).all()) else -x, "reads a device value"),
    (lambda x: x[x.nonzero(as_tuple=True)], "reads a device value"),
    (lambda x: x + torch.tensor([1.0, 2.0, 3.0]), "host data"),
])
def test_capture_refuses_host_syncs_and_host_data(body, match):
    x = torch.ones(3)
    with pytest.raises(CaptureError, match=match):
        FrozenGraphs().capture(lambda: body(x))


def test_fake_and_frozen_stand_ins_share_the_interface():
    for graphs in (FakeGraphs(), FrozenGraphs()):
        captured = graphs.capture(lambda: torch.ones(2) * 2)
        captured.replay()
        captured.release()
        event = graphs.event()
        event.record()
        event.synchronize()
        assert graphs.released == 1 and graphs.log == ["replay", "record", "wait"]


@pytest.mark.parametrize("transforms", ["kernels", pytest.param("fp8", marks=needs_cpu_fp8),
                                        pytest.param("kernels+fp8", marks=needs_cpu_fp8)])
def test_graphed_sampling_with_kernels_and_fp8_replays_like_eager(fp8_one_layer_dir, transforms):
    """The Triton kernels (interpreted here) and the fp8 linears under the frozen stand-in: with CFG
    and truncation, a second guidance value and prompt, replays equal the eager run of the same model."""
    import importlib.util

    from zimage_native import ZImagePipeline
    from zimage_native.accel import load_kernels, optimize

    from .test_compiled import KW, graphed
    from .utils import assert_rel

    if "kernels" in transforms:
        if importlib.util.find_spec("triton") is None:
            pytest.skip("Triton is not installed")
        load_kernels(interpret=True)
    pipe = ZImagePipeline.from_pretrained(fp8_one_layer_dir, device="cpu", dtype=torch.bfloat16)
    pipe.progress = False
    optimize(pipe.transformer, kernels="triton" if "kernels" in transforms else "none", fp8="fp8" in transforms)
    kw = {**KW, "num_inference_steps": 3, "cfg_truncation": 0.3}  # guided, guided, plain
    runs = [("a cat", 2.0), ("a dog on a red chair", 3.5)]
    eager = [pipe(prompt, **kw, guidance_scale=scale).images for prompt, scale in runs]
    sampler, graphs = graphed(pipe)
    for (prompt, scale), want in zip(runs, eager):
        assert_rel(pipe(prompt, **kw, guidance_scale=scale).images, want, 1e-6, f"graphed {transforms}, {scale}")
    assert sampler.captures == 2 and sampler.guided_replays == 4 and graphs.ops > 0


def test_graphed_gguf_dit_and_a_lora_side_path_loaded_after_capture(tiny_model_dir, tmp_path):
    """A packed GGUF DiT dequantises inside the graph; a LoRA loaded after a capture becomes a side
    path (Python state the old graph never ran): the pipeline drops its graphs, so the next request
    captures again and equals the eager run with the LoRA."""
    pytest.importorskip("gguf")
    import numpy as np

    from zimage_native import ZImagePipeline

    from .gguf_files import gguf_state, write_gguf
    from .test_compiled import KW, graphed
    from .test_formats import comfy_dit
    from .utils import assert_rel

    file, _ = gguf_state(comfy_dit(tiny_model_dir), "Q8_0", np.random.default_rng(0))
    path = write_gguf(tmp_path / "dit-Q8_0.gguf", file, "lumina2")
    pipes = [ZImagePipeline.from_pretrained(tiny_model_dir, transformer=path, device="cpu", dtype=torch.float32)
             for _ in range(2)]
    eager, pipe = pipes
    for p in pipes:
        p.progress = False
    assert pipe.transformer.layers[0].feed_forward.w1.weight.dtype == torch.uint8  # packed
    dim = pipe.transformer_config.dim
    g = torch.Generator().manual_seed(0)
    lora = {f"transformer.layers.{i}.feed_forward.w1.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.3
            for i in (0, 1) for ab, shape in (("A", (4, dim)), ("B", (int(dim / 3 * 8), 4)))}
    sampler, _ = graphed(pipe)
    assert_rel(pipe("a cat", **KW).images, eager("a cat", **KW).images, 1e-6, "graphed GGUF DiT")
    for p in pipes:
        p.load_lora(lora, scale=0.8)
    assert len(pipe.transformer.layers[0].feed_forward.w1.lora) == 1 and not sampler.graphs  # dropped
    want = eager("a cat", **KW).images
    assert_rel(pipe("a cat", **KW).images, want, 1e-6, "graphed GGUF DiT with a LoRA side path")
    assert sampler.captures == 2


@needs_cpu_fp8
def test_graphed_fp8_dit_after_unload_lora_replays_the_requantised_linears(tiny_model_dir, tmp_path):
    """LoRA, then fp8, then graphs captured with the LoRA's weight-only layers; unload_lora makes
    them fp8 GEMMs (accel.fp8.requantize_fp8_): the old graphs, which hold the old modules, are
    dropped, and the next request equals the pipeline that got fp8 without a LoRA."""
    from .fixtures import our_pipeline
    from .test_compiled import KW, graphed
    from .test_formats import comfy_dit, to_fp8, write

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    dit = write(tmp_path / "fp8.safetensors", sd)
    g = torch.Generator().manual_seed(1)
    lora = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(4, 64, generator=g) * 0.3,
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(64, 4, generator=g) * 0.3}
    plain, pipe = our_pipeline(tiny_model_dir, transformer=dit), our_pipeline(tiny_model_dir, transformer=dit)
    plain.optimize(fp8=True)
    pipe.load_lora(lora)
    pipe.optimize(fp8=True)
    sampler, _ = graphed(pipe)
    with_lora = pipe("a cat", **KW).images
    want = plain("a cat", **KW).images
    assert not torch.equal(with_lora, want) and sampler.captures >= 1
    captures = sampler.captures
    pipe.unload_lora()
    assert not sampler.graphs
    assert torch.equal(pipe("a cat", **KW).images, want) and sampler.captures > captures


def test_a_lora_fused_in_place_keeps_the_captured_graphs(tiny_model_dir):
    """A LoRA on ordinary weights is written into them in place (fused, unfused, fused again at a new
    adapter weight or fuse_lora's scale), so the graphs captured before read the new values at the same addresses: no
    LoRA change captures again (each did: a warm-up step and a capture per graph, per change), and
    every request equals the eager pipeline with the same LoRAs."""
    from torch import nn

    from .fixtures import our_pipeline
    from .test_compiled import KW, graphed

    eager, pipe = our_pipeline(tiny_model_dir), our_pipeline(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    loras = [{f"transformer.{name}.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.3
              for name, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear) and ".attention.to_" in name
              for ab, shape in (("A", (rank, m.in_features)), ("B", (m.out_features, rank)))} for rank in (4, 8)]
    sampler, _ = graphed(pipe)
    changes = [lambda p: p.load_lora(loras[0], scale=0.8), lambda p: p.unload_lora(),
               lambda p: p.load_lora_weights(loras[0], adapter_name="a"),
               lambda p: p.load_lora_weights(loras[1], adapter_name="b"),
               lambda p: p.set_adapters(["a", "b"], [0.3, 0.7]), lambda p: p.set_adapters(["a", "b"], [0.9, 0.1]),
               lambda p: p.fuse_lora(lora_scale=0.7), lambda p: p.unfuse_lora(),  # (the 0.7 stays, as in diffusers)
               lambda p: p.disable_lora(), lambda p: p.enable_lora(), lambda p: p.unload_lora_weights()]
    results = [(pipe("a cat", **KW).images, eager("a cat", **KW).images)]
    for change in changes:
        for p in (eager, pipe):
            change(p)
        results.append((pipe("a cat", **KW).images, eager("a cat", **KW).images))
    assert sampler.captures == 1 and sampler.replays == KW["num_inference_steps"] * len(results)
    for k, (got, want) in enumerate(results):
        assert torch.equal(got, want), f"after change {k}"
    assert not torch.equal(results[1][1], results[0][1]) and torch.equal(results[-1][1], results[0][1])


def test_clearing_no_side_path_keeps_the_lora_generation():
    """unload_lora clears the side paths of every packed linear; one that had none moved the process's
    LoRA generation all the same, so a LoRA fused into the ordinary weights of a GGUF or kept-fp8 DiT
    (or any LoRA change in another pipeline of the process) dropped every captured graph. Only a
    clear that removes a side path moves it now."""
    from zimage_native.quant_linear import Int8StoredLinear, lora_generation

    layer = Int8StoredLinear(32, 16)
    layer.weight.copy_(torch.randint(-127, 128, (16, 32), dtype=torch.int8))
    layer.scale.fill_(0.01)
    before = lora_generation()
    assert layer.clear_lora() == 0 and lora_generation() == before
    layer.add_lora(torch.randn(4, 32), torch.randn(16, 4), 0.5)
    added = lora_generation()
    assert added != before and layer.clear_lora() == 1 and lora_generation() != added


def _packed_dit_file(tiny_model_dir, tmp_path, kind: str):
    """A GGUF (Q8_0) or a kept-fp8 single-file DiT of the tiny model: every block linear packed."""
    if kind == "gguf":
        pytest.importorskip("gguf")
        import numpy as np

        from .gguf_files import gguf_state, write_gguf
        from .test_formats import comfy_dit

        file, _ = gguf_state(comfy_dit(tiny_model_dir), "Q8_0", np.random.default_rng(0))
        return write_gguf(tmp_path / "dit-Q8_0.gguf", file, "lumina2")
    from .test_formats import comfy_dit, to_fp8, write

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True)
    return write(tmp_path / "fp8.safetensors", sd)


def _side_path_adapters(pipe, seed: int = 0) -> list[dict]:
    """Two adapters for the packed linears of a tiny DiT, of one structure: a LoRA (rank 4, then 8:
    both rank bucket 16) on to_q and w1 of layers 0 and 1, and a LoKr (a Kronecker side path) on
    layer 0's to_k."""
    dim, ffn = pipe.transformer_config.dim, pipe.transformer.layers[0].feed_forward.w1.out_features
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for rank in (4, 8):
        lora = {}
        for i in (0, 1):
            for module, (rows, cols) in (("attention.to_q", (dim, dim)), ("feed_forward.w1", (ffn, dim))):
                lora[f"transformer.layers.{i}.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=g) * 0.3
                lora[f"transformer.layers.{i}.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.3
        lora["lycoris_layers_0_attention_to_k.lokr_w1"] = torch.randn(2, 2, generator=g) * 0.3
        lora["lycoris_layers_0_attention_to_k.lokr_w2"] = torch.randn(dim // 2, dim // 2, generator=g) * 0.3
        adapters.append(lora)
    return adapters


@pytest.mark.parametrize("kind", ["gguf", "fp8"])
def test_side_path_lora_changes_of_one_structure_keep_the_captured_graphs(tiny_model_dir, tmp_path, kind):
    """A GGUF or kept-fp8 DiT holds LoRAs as side paths of its packed linears. A change that keeps
    their structure (the same layers, side paths, rank buckets, kinds: another adapter weight,
    another adapter of the same bucket) writes the new factors into the side paths' tensors in
    place, so the graphs captured before stay (each such change captured every graph again), and so
    do disable_lora / enable_lora (zero factors written into the side paths, then the factors); a
    change of structure (a second Kronecker side path, unload) still captures again. Every request
    equals the eager pipeline with the same adapters, bit for bit."""
    from .fixtures import our_pipeline
    from .test_compiled import KW, graphed

    path = _packed_dit_file(tiny_model_dir, tmp_path, kind)
    eager, pipe = our_pipeline(tiny_model_dir, transformer=path), our_pipeline(tiny_model_dir, transformer=path)
    from zimage_native.quant_linear import PackedLinear

    layer = pipe.transformer.layers[0]
    assert all(isinstance(m, PackedLinear) for m in (layer.attention.to_q, layer.attention.to_k, layer.feed_forward.w1))
    a, b = _side_path_adapters(pipe)
    sources = [{k: v.clone() for k, v in lora.items()} for lora in (a, b)]
    sampler, _ = graphed(pipe)
    # (change, whether it changes the side paths' structure: a capture more)
    changes = [(lambda p: p.load_lora_weights(a, adapter_name="a"), True),
               (lambda p: p.load_lora_weights(b, adapter_name="b"), False),  # only b: same buckets and kinds
               (lambda p: p.set_adapters("a", 0.6), False),
               (lambda p: p.set_adapters("b", -0.4), False),
               (lambda p: p.set_adapters(["a", "b"], [0.3, 0.7]), True),  # two Kronecker side paths on to_k
               (lambda p: p.set_adapters(["a", "b"], [0.9, 0.1]), False),  # (rank 4 + 8 joined: still bucket 16)
               (lambda p: p.set_adapters(["b", "a"], [0.2, 0.5]), False),
               (lambda p: p.disable_lora(), False),  # low-rank and Kronecker side paths: kept, zeroed
               (lambda p: p.enable_lora(), False),  # (each captured again: 2 captures per toggle)
               (lambda p: p.set_adapters("a"), True),
               (lambda p: p.delete_adapters("b"), False),  # b did not apply: a is fused again as it was
               (lambda p: p.unload_lora_weights(), True)]
    results = [(pipe("a cat", **KW).images, eager("a cat", **KW).images)]
    captures = [sampler.captures]
    for change, _ in changes:
        for p in (eager, pipe):
            change(p)
        results.append((pipe("a cat", **KW).images, eager("a cat", **KW).images))
        captures.append(sampler.captures)
    expected = [1]
    for _, structural in changes:
        expected.append(expected[-1] + structural)
    assert captures == expected
    for k, (got, want) in enumerate(results):
        assert torch.equal(got, want), f"after change {k}"
    assert len({r[1].sum().item() for r in results[:7]}) == 7  # each change changed the image
    assert torch.equal(results[-1][1], results[0][1])
    for lora, source in zip((a, b), sources):  # the in-place writes never reached an adapter's tensors
        assert all(torch.equal(lora[k], v) for k, v in source.items())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (an integer view): -0.0 differs from 0.0, a NaN equals the same NaN."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("kind, dtype", [("gguf", torch.float32), ("gguf", torch.bfloat16),
                                         ("fp8", torch.float32)])
def test_disable_and_enable_of_side_path_adapters_keep_the_captured_graphs(tiny_model_dir, tmp_path, kind, dtype):
    """A server toggling a style per request (disable_lora / enable_lora) dropped the graphs at each
    call (2 captures per toggle): the side paths were removed, then made anew. Low-rank and
    Kronecker side paths now stay with zero factors while disabled, and enable writes the factors
    back in place: no capture. Disabled equals the DiT without a LoRA bit for bit (a zeroed side
    path adds +0 to outputs that are never -0), enabled equals the eager pipeline. A full delta
    (dense side path) keeps the old way: removed while disabled (zeroed, it would cost a GEMM of
    the layer's full size on every call), so its toggle still captures twice."""
    from zimage_native import ZImagePipeline

    from .test_compiled import KW, graphed

    path = _packed_dit_file(tiny_model_dir, tmp_path, kind)
    eager, pipe, plain = [ZImagePipeline.from_pretrained(tiny_model_dir, transformer=path, device="cpu", dtype=dtype)
                          for _ in range(3)]
    for p in (eager, pipe, plain):
        p.progress = False
    lora, _ = _side_path_adapters(pipe)
    dim = pipe.transformer_config.dim
    g = torch.Generator().manual_seed(5)
    dense = {**lora, "lycoris_layers_1_attention_to_out_0.diff": torch.randn(dim, dim, generator=g) * 0.05}
    without = plain("a cat", **KW).images
    to_q = pipe.transformer.layers[0].attention.to_q
    sampler, _ = graphed(pipe)
    for name, adapter, per_toggle in (("low-rank", lora, 0), ("dense", dense, 2)):
        for p in (eager, pipe):
            p.load_lora_weights(adapter, adapter_name=name)
        with_lora = eager("a cat", **KW).images
        assert torch.equal(_bits(pipe("a cat", **KW).images), _bits(with_lora))
        captures = sampler.captures
        for toggle in range(2):
            pipe.disable_lora()
            assert len(to_q.lora) == 1 and not getattr(to_q, to_q.lora[0][0]).any()  # kept, zeroed
            assert torch.equal(_bits(pipe("a cat", **KW).images), _bits(without)), f"{name} disabled, {toggle}"
            pipe.enable_lora()
            assert torch.equal(_bits(pipe("a cat", **KW).images), _bits(with_lora)), f"{name} enabled, {toggle}"
            assert sampler.captures == captures + per_toggle * (toggle + 1), name
        for p in (eager, pipe):
            p.unload_lora_weights()
    assert not to_q.lora
    pipe.load_lora_weights(lora, adapter_name="a")
    pipe.disable_lora()
    pipe.delete_adapters("a")  # nothing to enable again: the zeroed side paths go
    assert not to_q.lora and torch.equal(_bits(pipe("a cat", **KW).images), _bits(without))


@needs_cpu_fp8
def test_fp8_after_disable_lora_makes_the_dit_of_fp8_without_a_lora(tiny_model_dir, tmp_path):
    """disable_lora keeps zeroed side paths on an fp8 file's linears; fp8 (optimize(fp8=True)) makes
    fp8 GEMMs only of linears without side paths, and no adapter can be enabled after it: the
    zeroed side paths go first, so the DiT is the one fp8 makes without a LoRA, bit for bit."""
    from .fixtures import our_pipeline
    from .test_formats import dit_output

    path = _packed_dit_file(tiny_model_dir, tmp_path, "fp8")
    plain, pipe = our_pipeline(tiny_model_dir, transformer=path), our_pipeline(tiny_model_dir, transformer=path)
    plain.optimize(fp8=True)
    pipe.load_lora_weights(_side_path_adapters(pipe)[0], adapter_name="a")
    pipe.disable_lora()
    assert pipe.transformer.layers[0].attention.to_q.lora  # kept, zeroed
    pipe.optimize(fp8=True)
    assert str(pipe.transformer) == str(plain.transformer)
    assert torch.equal(_bits(dit_output(pipe.transformer)), _bits(dit_output(plain.transformer)))


@pytest.mark.parametrize("kind", ["gguf", "fp8"])
def test_a_switch_between_full_delta_adapters_holds_one_set_of_deltas(tiny_model_dir, tmp_path, kind, monkeypatch):
    """Full deltas on packed linears are dense side paths, each the size of its layer's weight. A
    refit kept the side paths held before it until its end (to write into), so set_adapters from
    one full-delta adapter to another on other layers held both sets of deltas (2 x one adapter's
    bytes at the peak); the kept side paths of layers the new adapters do not write into now go
    before the new ones are made: the peak is one set. The images equal the eager pipeline's."""
    from zimage_native.quant_linear import PackedLinear

    from .fixtures import our_pipeline
    from .test_compiled import KW

    path = _packed_dit_file(tiny_model_dir, tmp_path, kind)
    eager, pipe = our_pipeline(tiny_model_dir, transformer=path), our_pipeline(tiny_model_dir, transformer=path)
    packed = [m for m in pipe.transformer.modules() if isinstance(m, PackedLinear)]

    def held() -> int:  # bytes of the side paths' tensors, held or kept for a refit (each storage once)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in packed
                    for name, t in [*m._buffers.items(), *(m._kept or {}).items()] if name.startswith("lora_")}
        return sum(storages.values())

    peak = [0]
    add_lora = PackedLinear.add_lora

    def counting(self, *args, **kwargs):
        add_lora(self, *args, **kwargs)
        peak[0] = max(peak[0], held())

    monkeypatch.setattr(PackedLinear, "add_lora", counting)
    dim = pipe.transformer_config.dim
    g = torch.Generator().manual_seed(3)
    adapters = {name: {f"lycoris_layers_{layer}_attention_{module}.diff": torch.randn(dim, dim, generator=g) * 0.05
                       for module in ("to_q", "to_out_0")} for name, layer in (("a", 0), ("b", 1))}
    for p in (eager, pipe):
        for name, adapter in adapters.items():
            p.load_lora_weights(adapter, adapter_name=name)
    one = held()
    assert one == 2 * dim * dim * 4  # two fp32 deltas
    for name in ("a", "b", "a"):
        peak[0] = 0
        for p in (eager, pipe):
            p.set_adapters(name)
        assert peak[0] == held() == one, name
        assert torch.equal(pipe("a cat", **KW).images, eager("a cat", **KW).images)


LATER_TEST = '''
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tests.fixtures import our_pipeline
from tests.test_compiled import KW, graphed


def test_a_capture_of_compiled_blocks(tiny_model_dir):
    torch._dynamo.reset()
    pipe = our_pipeline(tiny_model_dir)
    pipe.optimize(compile="blocks", compile_backend=CompileCounterWithBackend("eager"))
    sampler, _ = graphed(pipe)
    pipe("a cat", **KW)
    assert sampler.captures == 1


def test_a_later_compile_that_does_not_reset_dynamo(tiny_model_dir):
    pipe = our_pipeline(tiny_model_dir)
    counter = CompileCounterWithBackend("eager")
    pipe.optimize(compile="blocks", compile_backend=counter)
    pipe("a cat", **KW)
    assert counter.frame_count == 2  # the modulated and the unmodulated block
'''


def test_a_capture_of_compiled_blocks_leaves_the_next_test_compiling(pytester, monkeypatch):
    """Dynamo marks the compiled blocks' code object skipped when it meets it under the stand-in's
    recording dispatch mode, for the rest of the process: a later test in the same process (an xdist
    worker) that compiled blocks without resetting dynamo first ran them eagerly, compiling nothing
    (0 frames), and a test comparing them with eager passed without running compiled code. The
    conftest resets dynamo after a test that captured; two tests in that order in one session.

    The session runs in a process of its own: run in this one, pytester removes on its way out every
    module first imported inside it (torch._inductor's, when no test here had compiled before), and
    the next import of one in this process ran it again and failed on what it had registered in
    modules that stayed ("Artifact of type=autotune already registered in mega-cache artifact
    factory" in every later compiling test)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    pytester.makeconftest("from tests.conftest import _forget_dynamo_skips_after_stand_in_captures, tiny_model_dir"
                          "  # noqa: F401")
    pytester.makepyfile(test_order=LATER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly", "-q")
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize("kind", ["gguf", "fp8"])
def test_a_lora_change_through_one_pipeline_drops_the_graphs_of_every_pipeline_holding_the_dit(
        tiny_model_dir, tmp_path, kind):
    """Two pipelines share a packed DiT (``ZImagePipeline(pipe.transformer, ...)``), each with its graph
    captured. A LoRA change through the first that changes the side paths' structure (a load, a
    second Kronecker side path, an unload) dropped only the first's graphs: the second replayed its
    graph of the DiT without them (max abs diff 0.18 for GGUF, 1.0 for kept fp8, from its eager run).
    Now every pipeline holding the DiT drops them; a change written in place (disable_lora) keeps
    them. Each request of the second equals its eager run, bit for bit."""
    from zimage_native import ZImagePipeline

    from .fixtures import our_pipeline
    from .test_compiled import KW, graphed

    first = our_pipeline(tiny_model_dir, transformer=_packed_dit_file(tiny_model_dir, tmp_path, kind))
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    second.progress = False
    a, b = _side_path_adapters(first)
    sampler, _ = graphed(second)
    graphed(first)
    for pipe in (first, second):
        pipe("a cat", **KW)
    changes = [(lambda p: p.load_lora_weights(a, adapter_name="a"), True),
               (lambda p: p.load_lora_weights(b, adapter_name="b"), False),
               (lambda p: p.set_adapters(["a", "b"], [0.3, 0.7]), True),  # two Kronecker side paths on to_k
               (lambda p: p.disable_lora(), False),  # (kept, zeroed)
               (lambda p: p.unload_lora_weights(), True),
               (lambda p: p.load_lora(a, scale=0.8), True),
               (lambda p: p.unload_lora(), True)]
    captures = sampler.captures
    for k, (change, structural) in enumerate(changes):
        change(first)
        got = second("a cat", **KW).images
        second._graphed = None
        want = second("a cat", **KW).images  # eager
        second._graphed = sampler
        assert torch.equal(got, want), f"after change {k}"
        captures += structural
        assert sampler.captures == captures, k
        first("a cat", **KW)
