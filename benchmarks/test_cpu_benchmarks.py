"""CI-sized CPU benchmarks for regression tracking (pytest-benchmark), on a tiny random model.

    python -m pytest benchmarks/test_cpu_benchmarks.py --benchmark-only
    python -m pytest benchmarks/test_cpu_benchmarks.py --benchmark-only --benchmark-autosave   # keep a baseline
    python -m pytest benchmarks/test_cpu_benchmarks.py --benchmark-only --benchmark-compare    # compare with it

These time the engine's own code paths (not the GPU): a regression here is a Python-side or
algorithmic one. They are not part of the CI test run.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from zimage_native.bench import build_random_pipeline  # noqa: E402
from zimage_native.scheduler import make_schedule  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p, _ = build_random_pipeline(torch.device("cpu"), torch.float32, tiny=True)
    p.progress = False
    return p


def test_bench_encode_prompt(benchmark, pipe):
    benchmark(pipe.encode_prompt, ["a lighthouse on a cliff at dusk"])


def test_bench_denoise_8_steps_64px(benchmark, pipe):
    embeds = pipe.encode_prompt(["a lighthouse on a cliff at dusk"])
    schedule = make_schedule(pipe.scheduler_config, 8)
    noise = torch.randn(1, 16, 8, 8)
    benchmark(pipe.denoise, noise, embeds, None, schedule, progress=False)


def test_bench_vae_decode_64px(benchmark, pipe):
    benchmark(pipe.decode, torch.randn(1, 16, 8, 8))


def test_bench_end_to_end_64px(benchmark, pipe):
    benchmark(pipe, "a lighthouse on a cliff at dusk", width=64, height=64, num_inference_steps=8, seed=0,
              output_type="np")


def test_bench_schedule(benchmark, pipe):
    benchmark(make_schedule, pipe.scheduler_config, 50)
