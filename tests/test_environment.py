"""``zimage env``: what this machine offers the engine. On the CPU the report is the real one; the
GPUs are faked (torch.cuda's queries and devices.free_memory) to check the per-GPU lines, the
verdicts and the profile each card gets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from zimage_native import devices, environment
from zimage_native.cli import main

GiB = 2**30


def run(*args: str):
    result = CliRunner().invoke(main, ["env", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_report_on_this_machine(monkeypatch):
    """The real report. The cache's free space is the one read of the cache's disk (the reading is
    recorded: compared with a second reading, it raced the other xdist worker's files of up to 0.8 GB)."""
    import shutil
    from pathlib import Path

    from zimage_native import hub

    out = run()
    assert out.startswith("zimage-native ") and f"torch {torch.__version__}" in out
    assert "what runs here:" in out and "  --attention sdpa: yes" in out
    assert "example config (--profile NAME): " in out and "config.example.toml" in out
    readings, real = [], shutil.disk_usage

    def disk_usage(path):
        readings.append((Path(path), real(path)))
        return readings[-1][1]

    monkeypatch.setattr(hub.shutil, "disk_usage", disk_usage)
    data = json.loads(run("--json"))
    cache = Path(data["hub_cache"]["path"])
    while not cache.exists():
        cache = cache.parent
    assert [(path, usage.free) for path, usage in readings] == [(cache, data["hub_cache"]["free_bytes"])]
    assert "free on its disk; " in out
    assert data["torch"] == torch.__version__ and data["runs_here"]["--attention sdpa"] == {"runs": True, "why": None}
    assert set(data["packages"]) == set(environment.PACKAGES)
    if not torch.cuda.is_available():
        assert data["gpus"] == [] and data["runs_here"]["--cuda-graphs"] == {"runs": False, "why": "needs a CUDA GPU"}
        assert "  a CUDA GPU: no, " in out and "device auto runs on" in out


def test_the_report_imports_no_optional_package():
    """Versions come from metadata: a broken flash-attn or xformers build cannot hang or crash it."""
    code = ("import sys; from zimage_native.environment import lines, report; lines(report()); "
            "print(sorted(m for m in ('gguf', 'fastapi', 'ray', 'diffusers', 'flash_attn', 'sageattention', "
            "'xformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


CARDS = {0: ("NVIDIA H100 80GB HBM3", (9, 0), 79 * GiB), 1: ("Tesla T4", (7, 5), 15 * GiB)}


@pytest.fixture
def gpus(monkeypatch):
    """Two fake GPUs: an H100 and a T4."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(CARDS))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: CARDS[torch.device(d).index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: CARDS[torch.device(d).index][1])
    monkeypatch.setattr(devices, "free_memory", lambda d: (CARDS[d.index][2] - GiB, CARDS[d.index][2]))
    return CARDS


def test_gpus_their_features_and_the_verdicts(gpus):
    out = run()
    assert "GPU 0: NVIDIA H100 80GB HBM3, sm90, 83.75 GB free of 84.83 GB; bf16 tensor cores: yes; fp8 tensor " \
           "cores: yes" in out
    assert "GPU 1: Tesla T4, sm75, 15.03 GB free of 16.11 GB; bf16 tensor cores: no; fp8 tensor cores: no" in out
    t4 = out.split("GPU 1: Tesla T4")[1].splitlines()
    assert t4[1] == ("  bf16 on this GPU: slower matmuls, SDPA's math path (run in query slices) and no "
                     "torch.compile; float16 overflows in the DiT (docs/numerics.md)")
    assert "bf16 on this GPU" not in out.split("GPU 1:")[0]  # not for the H100
    verdicts = dict(environment.verdicts(environment.report()))  # for the first GPU
    assert "a CUDA GPU" not in verdicts
    assert verdicts["--fp8"] is None and verdicts["--cuda-graphs"] is None
    from zimage_native.accel._kernels import triton_unavailable_reason

    assert verdicts["--kernels triton"] == triton_unavailable_reason()
    assert verdicts["--compile blocks / full"] == (triton_unavailable_reason() and
                                                  f"needs Triton on a GPU: {triton_unavailable_reason()}")
    if environment.package_version(("flash-attn", "flash_attn")) is None:
        assert "flash_attn" in verdicts["--attention flash_attn_2"]  # the import that failed
    assert "  Z-Image-Turbo on GPU 0 (84.83 GB): everything resident (no profile), 20.32 GB of weights at the " \
           "peak" in out
    assert "  Z-Image-Turbo on GPU 1 (16.11 GB): --profile 16gb (10.63 GB of weights at the peak)" in out


def test_fp8_on_an_older_gpu_says_why(gpus, monkeypatch):
    monkeypatch.setitem(CARDS, 0, ("Tesla T4", (7, 5), 15 * GiB))
    verdicts = dict(environment.verdicts(environment.report()))
    assert "compute capability 8.9 or newer" in verdicts["--fp8"]
    assert "needs sm80+" in verdicts["--attention flash_attn_2"]
    from zimage_native.accel._kernels import triton_unavailable_reason

    if triton_unavailable_reason() is None:
        assert "does not compile bfloat16 graphs on Tesla T4 (sm75" in verdicts["--compile blocks / full"]


@pytest.mark.parametrize("card_gib, profile", [(24, "rtx4090"), (16, "16gb"), (12, "12gb"), (8, "8gb"), (6, "8gb"),
                                               (4, None)])
def test_each_card_size_gets_the_profile_made_for_it(gpus, monkeypatch, card_gib, profile):
    monkeypatch.setattr(environment.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(CARDS, 0, ("card", (8, 9), card_gib * GiB))
    (line,) = [line for line in environment.lines(environment.report()) if line.startswith("  Z-Image-Turbo")]
    if profile is None:
        assert "none of the example profiles leaves a quarter of this card free" in line
    else:
        assert f": --profile {profile} (" in line


@pytest.mark.parametrize("card_gib, gguf", [(12, None), (12, "0.17.1"), (24, None)])
def test_a_gguf_profile_names_the_gguf_extra_when_it_is_missing(gpus, monkeypatch, card_gib, gguf):
    """The 16, 12 and 8 GB profiles read a GGUF DiT; `zimage env` sent a user without the gguf
    package (a plain `pip install .`) to --profile 12gb, whose first load stops for it."""
    monkeypatch.setattr(environment.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(CARDS, 0, ("card", (8, 9), card_gib * GiB))
    rep = environment.report()
    rep["packages"]["gguf"] = gguf
    (line,) = [line for line in environment.lines(rep) if line.startswith("  Z-Image-Turbo")]
    needs = card_gib < 24 and gguf is None
    assert ("pip install 'zimage-native[gguf]' first (gguf is not installed)" in line) == needs, line


def test_what_runs_on_the_cpu_only_as_a_dry_run_says_so(monkeypatch):
    """--fp8 and --offload blocks run on the CPU (fp8 through its torch._scaled_mm, the streaming as a
    dry run): "yes", with what that means there; with a GPU, a plain "yes"."""
    from zimage_native.accel import fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fp8, "cpu_rowwise_scaled_mm", lambda: True)
    out = run()
    assert "  --fp8: yes, on the CPU slowly (torch._scaled_mm's CPU path: for tests and dry runs); on a GPU it " \
           "needs fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell)\n" in out
    assert "  --offload blocks (streamed from pinned memory): yes, on the CPU as a dry run (the blocks stay in CPU " \
           "memory: nothing is saved); on a CUDA GPU it keeps two DiT blocks there at a time\n" in out
    data = json.loads(run("--json"))["runs_here"]
    assert data["--fp8"]["runs"] is True and data["--fp8"]["note"].startswith("on the CPU slowly")
    assert data["--cuda-graphs"] == {"runs": False, "why": "needs a CUDA GPU"}
    monkeypatch.setattr(fp8, "cpu_rowwise_scaled_mm", lambda: False)  # torch 2.11's CPU _scaled_mm
    assert "  --fp8: no, fp8 on the CPU needs a PyTorch whose CPU torch._scaled_mm takes per-row scales" in run()


def test_with_a_gpu_blocks_offload_is_a_plain_yes(gpus):
    out = run()
    assert "  --offload blocks (streamed from pinned memory): yes\n" in out and "dry run" not in out


@pytest.mark.parametrize("free_gb, cached, says", [
    (10, False, "Tongyi-MAI/Z-Image-Turbo not downloaded (about 33 GB on first use, more than is free on that disk: "
                "make room, or set HF_HOME to a folder on a larger disk)"),
    (100, False, "Tongyi-MAI/Z-Image-Turbo not downloaded (about 33 GB on first use)"),
    (10, True, "Tongyi-MAI/Z-Image-Turbo cached\n"),
])
def test_the_cache_line_says_when_the_download_would_not_fit(monkeypatch, free_gb, cached, says):
    cache = {"path": "/cache", "offline": False, "models": {"Tongyi-MAI/Z-Image-Turbo": cached},
             "free_bytes": free_gb * 10**9}
    monkeypatch.setattr(environment, "hub_cache", lambda: cache)
    out = run()
    assert f"Hugging Face cache: /cache, {free_gb}.00 GB free on its disk; {says}" in out


def test_a_cpu_only_torch_on_a_machine_with_an_nvidia_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(environment.torch.version, "hip", None)
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    out = run()
    assert "(CPU-only build); CUDA available: no" in out and "NVIDIA driver: yes" in out
    assert "  a CUDA GPU: no, this machine has an NVIDIA GPU but torch " in out
    assert "is a CPU-only build: install a CUDA build of torch" in out


def test_a_gpu_the_driver_cannot_query_is_reported_not_raised(gpus, monkeypatch):
    def busy(device):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(devices, "free_memory", busy)
    out = run()
    assert "GPU 0: cannot be queried: RuntimeError: CUDA error: all CUDA-capable devices are busy" in out
    assert "  a CUDA GPU: no, the driver did not answer for GPU 0: RuntimeError" in out
    assert "Z-Image-Turbo on GPU" not in out


def test_a_rocm_gpu_is_not_judged_by_cuda_capabilities(gpus, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setitem(CARDS, 0, ("AMD Instinct MI300X", (9, 4), 192 * GiB))
    out = run()
    assert "(ROCm 6.4.0)" in out
    assert "GPU 0: AMD Instinct MI300X, sm94, " in out and "bf16 tensor cores: unknown (ROCm); fp8 tensor cores: " \
        "unknown (ROCm)" in out
    verdicts = dict(environment.verdicts(environment.report()))
    assert "is a ROCm GPU" in verdicts["--fp8"] and "needs an NVIDIA GPU" in verdicts["--attention flash_attn_3"]


def test_the_drivers_cuda_version_is_shown(monkeypatch):
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(devices, "driver_cuda_version", lambda: "12.2")
    assert "NVIDIA driver: yes (supports CUDA up to 12.2)" in run()
    assert json.loads(run("--json"))["driver_cuda"] == "12.2"


def test_auto_dtype_on_a_gpu_without_bf16_tensor_cores_says_so(gpus, monkeypatch, caplog):
    monkeypatch.setattr(torch.version, "hip", None)
    with caplog.at_level("WARNING", logger="zimage_native.devices"):
        assert devices.resolve_dtype("auto", torch.device("cuda", 1)) is torch.bfloat16
    assert "Tesla T4 (sm75) has no bfloat16 tensor cores: bfloat16, the default on a GPU, runs there" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="zimage_native.devices"):
        assert devices.resolve_dtype(None, torch.device("cuda", 0)) is torch.bfloat16  # the H100
        assert devices.resolve_dtype("bf16", torch.device("cuda", 1)) is torch.bfloat16  # asked for by name
    assert caplog.text == ""


def test_float16_is_advised_against_however_it_is_spelled(caplog):
    """The overflow advice reaches diffusers' spelling (torch_dtype=torch.float16) as well as the
    name; a dtype the engine has no path for is refused by name, not with a KeyError later."""
    for spelling in ("float16", "fp16", torch.float16):
        caplog.clear()
        with caplog.at_level("WARNING", logger="zimage_native.devices"):
            assert devices.resolve_dtype(spelling, torch.device("cpu")) is torch.float16
        assert "float16 can overflow in the Z-Image DiT" in caplog.text, spelling
    assert devices.resolve_dtype(torch.bfloat16, torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="torch.float64 is not supported"):
        devices.resolve_dtype(torch.float64, torch.device("cpu"))
