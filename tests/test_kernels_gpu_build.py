"""Every Triton kernel launch of the engine, built for NVIDIA GPUs (sm90 Hopper, sm120 consumer Blackwell
(RTX 50xx), sm89 Ada, sm80 Ampere, sm75 Turing: T4, RTX 20xx) and AMD GPUs (gfx942 MI300, gfx1100
RX 7900) without a GPU: tests/gpu_build_probe.py compiles each launch of the real call sites at the released
model's widths down to a cubin, with Triton's own specialisation and options. The CPU interpreter,
which runs the kernels in the other tests, would not notice a kernel that a GPU build rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .utils import needs_probe_triton

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")
# One xdist group: the module fixture ``builds`` (one probe process compiling every launch for five
# targets, ~3 min on a 2-core machine) runs once, not once on each worker.
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="on a GPU the kernel tests build and run them for real"), needs_probe_triton,
              pytest.mark.xdist_group("gpu-build")]

PROBE = Path(__file__).with_name("gpu_build_probe.py")
#: Shared memory one block may use, per architecture (bytes).
SHARED_LIMIT = {"sm90": 227 * 1024, "sm120": 99 * 1024, "sm89": 99 * 1024, "sm80": 163 * 1024, "sm75": 64 * 1024,
                "gfx942": 64 * 1024, "gfx1100": 64 * 1024}
NVIDIA = ("sm90", "sm120", "sm89", "sm80", "sm75")
NO_FP8 = ("sm80", "sm75")  # no e4m3 below sm89 (and the engine refuses fp8 on ROCm: not built there)
ROW_KERNELS = {"_rms_norm_fwd_kernel", "_qk_norm_rope_kernel", "_gated_rms_norm_residual_kernel", "_silu_mul_kernel"}


def contracting_ptxas(target: str) -> str | None:
    """The ptxas of ``target`` where it is known to contract ``mul.rn`` / ``add.rn`` into FFMA against
    PTX's rules (docs/kernels.md): the sm120 assembler of Triton 3.6 and 3.7 (CUDA 12.x); else None."""
    if target != "sm120":
        return None
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        version = get_ptxas(120).version
    except (ImportError, AttributeError, RuntimeError):
        return None
    return f"Triton {triton.__version__}'s sm120 ptxas {version}" if int(version.split(".")[0]) < 13 else None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # build, do not reuse a cached cubin
    # fp8 is also built for sm80 and sm75, where it must fail: the check can fail, and it is why fp8 needs sm89
    result = subprocess.run([sys.executable, str(PROBE), ",".join(NVIDIA)], capture_output=True, text=True,
                            env=env, cwd=tmp_path_factory.mktemp("probe"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", list(SHARED_LIMIT))
def test_every_launch_builds_for_the_gpu(builds, target):
    if target not in builds:
        pytest.skip(f"this Triton build has no backend for {target}")
    launches = builds[target]
    kernels = {launch["kernel"] for launch in launches}
    assert ROW_KERNELS <= kernels and ("_quantize_fp8_rows_kernel" in kernels) == (target in NVIDIA)
    # the modulated norms and gated residuals of the main blocks, and the plain ones of the context refiner
    assert {launch["constants"].get("HAS_SCALE") for launch in launches if launch["kernel"] == "_rms_norm_fwd_kernel"} \
        == {False, True}
    for launch in launches:
        if target in NO_FP8 and launch["kernel"] == "_quantize_fp8_rows_kernel":
            assert not launch["ok"] and "fp8e4nv not supported" in launch["error"], launch
            continue
        assert launch["ok"], launch
        assert str(launch["arch"]) == target.removeprefix("sm"), launch  # built for this target, not reused
        assert launch["shared"] <= SHARED_LIMIT[target], launch
        assert launch.get("local", 0) == 0, launch  # no register spills to local (scratch) memory
        if target not in NVIDIA:  # AMD: its FMAs include the division and exp expansions; nothing more read
            continue
        # the GPU performs the interpreter's operations: no contracted multiply-adds (the fp8 quantisation's
        # FFMAs are those of the correctly rounded division, which the launch option does not touch; an
        # older sm120 ptxas contracts anyway, a known deviation within the kernel tests' tolerances)
        if launch["kernel"] != "_quantize_fp8_rows_kernel" and contracting_ptxas(target) is None:
            assert launch.get("ffma", 0) == 0 and launch.get("fmul", 1) > 0, launch
        # no register spills to local memory at the released widths (a silent slowdown); 255 is the cap
        assert launch.get("local", 0) == 0 and launch.get("stack", 0) == 0 and launch.get("registers", 0) <= 255, launch


@pytest.mark.parametrize("target", ["sm90", "sm75", "gfx1100"])
def test_every_ggml_type_builds(builds, target):
    from zimage_native.kernels.dequant_ggml import KERNEL_TYPES

    if target not in builds:
        pytest.skip(f"this Triton build has no backend for {target}")
    dequant = [launch for launch in builds[target] if launch["kernel"] == "_dequant_ggml_kernel"]
    assert sorted(launch["constants"]["KIND"] for launch in dequant) == sorted(k for k, _, _ in KERNEL_TYPES.values())
    assert all(launch["ok"] for launch in dequant), [launch for launch in dequant if not launch["ok"]]
    # fp8 files' rows: e4m3fn and e5m2, decoded with integer ops, so they build where float8 types do not (sm75)
    fp8 = [launch for launch in builds[target] if launch["kernel"] == "_dequant_fp8_kernel"]
    assert sorted(launch["constants"]["E5M2"] for launch in fp8) == [False, True]
    assert all(launch["ok"] for launch in fp8), [launch for launch in fp8 if not launch["ok"]]
