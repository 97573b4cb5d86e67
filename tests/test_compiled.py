"""Compiled sampling on the CPU: torch.compile presets, no recompilation on a prompt change, the
CUDA-graph wrapper's bookkeeping (with a stand-in capture), fp8 linears and the optimize() order."""

from __future__ import annotations

import pytest
import torch

from zimage_native import ZImagePipeline
from zimage_native.accel.cuda_graphs import GraphedSampler, flatten
from zimage_native.accel.fp8 import Float8Linear, quantize_fp8_
from zimage_native.scheduler import make_schedule

from .utils import assert_rel, rel_err

LONG = "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat"
KW = dict(height=32, width=48, num_inference_steps=2, output_type="latent", seed=0)


@pytest.fixture
def fresh_pipe(tiny_model_dir):
    """Transforms change a pipeline in place: each test gets its own."""
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = False
    return pipe


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

    fresh_pipe.optimize(compile="blocks", compile_backend=CompileCounterWithBackend("eager"))
    assert fresh_pipe.caption_buckets is not None  # static shapes come with compilation
    assert fresh_pipe.optimize(compile="blocks") == []  # already applied: nothing to do
    with pytest.raises(ValueError, match="reload"):
        fresh_pipe.optimize(compile="full")


def test_cuda_graphs_need_a_gpu(fresh_pipe):
    with pytest.raises(ValueError, match="needs the DiT on a CUDA device"):
        fresh_pipe.optimize(cuda_graphs=True)


def rerun_capture(fn):
    """Stand-in for cuda_capture on the CPU: 'replay' re-runs the captured function on the static inputs."""
    out = fn()
    return out, lambda: out.copy_(fn())


def test_graphed_sampler_bookkeeping(fresh_pipe, tiny_pipe):
    fresh_pipe.caption_buckets = (64, 128, 256, 512)
    fresh_pipe._graphed = graphed = GraphedSampler(fresh_pipe, capture=rerun_capture)
    for prompt in ("a cat", LONG, "a dog"):  # three caption lengths, one bucket: one capture
        got = fresh_pipe(prompt, **KW).images
        assert_rel(got, tiny_pipe(prompt, **KW).images, 1e-5, f"graphed run of {prompt!r}")
    assert (graphed.captures, graphed.replays) == (1, 3)
    fresh_pipe("a cat", **{**KW, "height": 48})  # another resolution: a second graph
    fresh_pipe(["a cat", "a dog"], **KW)  # another batch size: a third
    assert graphed.captures == 3 and len(graphed.graphs) == 3
    graphed.clear()
    assert not graphed.graphs


def test_flatten_round_trips_a_plan(tiny_pipe):
    embeds = tiny_pipe.encode_prompt(["a cat"])
    plan = tiny_pipe.plan((4, 6), embeds, embeds, make_schedule(tiny_pipe.scheduler_config, 3), guidance_scale=2.0)
    tensors, rebuild, signature = flatten(plan)
    copy = rebuild([t.clone() for t in tensors])
    again, _, signature2 = flatten(copy)
    assert signature == signature2 and all(torch.equal(a, b) for a, b in zip(tensors, again))
    assert copy.steps[1].guided and copy.guidance_scale == 2.0


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


def test_quantize_counts_and_skips_small_or_odd_linears():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].attention = torch.nn.Module()
    model.layers[0].attention.to_q = torch.nn.Linear(64, 64)
    model.layers[0].attention.to_k = torch.nn.Linear(64, 60)  # not a multiple of 16
    model.layers[0].adaLN_modulation = torch.nn.Sequential(torch.nn.Linear(64, 256))
    assert quantize_fp8_(model).startswith("fp8: 1 linears in float8 e4m3")
    assert "2 kept" in quantize_fp8_(model)  # idempotent: converted linears are not converted again


def test_bench_ladder_dry_run_on_cpu(tmp_path):
    """The benchmark's code path end to end on a tiny model: ours eager and +fp8, diffusers beside them."""
    import json

    from click.testing import CliRunner

    from zimage_native.cli import main

    result = CliRunner().invoke(main, ["bench", "--tiny", "--device", "cpu", "--dtype", "bfloat16", "--sizes", "32",
                                       "--steps", "2", "--repeats", "1", "--rungs", "eager", "--rungs", "fp8",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.strip().splitlines()[-1])
    rows = {(r["engine"], r["rung"]): r for r in payload["rows"]}
    assert set(rows) == {("diffusers 0.42.1", "eager"), ("zimage-native", "eager"), ("zimage-native", "+fp8"),
                         ("diffusers 0.42.1", "compile (regional)")}
    assert rows["diffusers 0.42.1", "eager"]["psnr_db"] > 40  # bf16 parity of the two engines
    assert any(note.startswith("fp8:") for note in rows["zimage-native", "+fp8"]["notes"])
    assert (tmp_path / "e2e.csv").read_text().count("\n") == 5  # header + 4 rows


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


def test_cli_fp8_runs_on_cpu(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from zimage_native.cli import main

    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu",
                                       "--dtype", "bfloat16", "--fp8", "--width", "32", "--height", "32",
                                       "--steps", "1", "--seed", "1", "--no-progress", "-o", str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    assert "fp8: 16 linears" in result.output and (tmp_path / "f.png").exists()
