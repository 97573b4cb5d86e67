"""benchmarks/gpu_check.sh as a pass/fail script, on the CPU (its dry-run branch).

The judged ladder itself is tested in-process (tests/test_compiled.py::test_bench_ladder_dry_run_on_cpu
and the verdict cases); here a stand-in for ``python3 -m zimage_native.cli bench`` returns a chosen
status, and every other python3 call goes to this interpreter, to check the script's own logic:
a failing check makes it exit non-zero with a one-line verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .utils import needs_cpu_fp8

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, bench_rc: int, gpu: bool = False, budget_s: int = 480) -> subprocess.CompletedProcess:
    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    shim.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2 $3" = "-m zimage_native.cli bench" ]; then
  echo "bench $*"
  [ {int(gpu)} = 1 ] && touch "{tmp_path / 'out'}/e2e.csv" "{tmp_path / 'out'}/e2e.json"
  [ {bench_rc} = 0 ] && echo "PASS fp8 quality (fast accum) vs bf16 at 64x64: 40.1 dB PSNR (needs >= 25 dB)" \\
                     || echo "FAIL fp8 quality (fast accum) vs bf16 at 64x64: 12.0 dB PSNR (needs >= 25 dB)"
  exit {bench_rc}
fi
if [ "$1" = "-c" ] && [ "${{2#*cuda.is_available}}" != "$2" ]; then  # the preflight: torch sees the stand-in GPU
  exit $(( 1 - {int(gpu)} ))
fi
if [ "$1 $2" = "-m pytest" ] || [ "${{1#benchmarks/}}" != "$1" ]; then
  echo "ran $*"
  # what each benchmark writes into --out on a GPU
  args="$*"; out=${{args##*--out }}; out=${{out%% *}}
  case "$1" in
    benchmarks/time_breakdown.py) touch "$out/time_breakdown.json" ;;
    benchmarks/bench_kernels.py) stem=${{args##*--stem }}; stem=${{stem%% *}}; touch "$out/$stem.csv" "$out/$stem.json" ;;
    benchmarks/bench_gguf.py) touch "$out/gguf.csv" "$out/gguf.json" ;;
    benchmarks/bench_controlnet.py) touch "$out/controlnet.json" ;;
  esac
  exit 0
fi
exec {sys.executable} "$@"
""")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "DRY_RUN": "0" if gpu else "1",
           "SKIP_INSTALL": "1", "SKIP_KERNEL_BENCH": "1", "OUT": str(tmp_path / "out"),
           "BUDGET_S": str(budget_s)}  # the device tool's $OUT
    if gpu:  # a stand-in nvidia-smi: the script takes its GPU branch
        smi = shim.parent / "nvidia-smi"
        smi.write_text("#!/usr/bin/env bash\necho 'name, driver_version, memory.total'\n")
        smi.chmod(0o755)
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bench_rc", [0, 1], ids=["checks pass", "a check fails"])
def test_dry_run_exit_status_and_verdict(tmp_path, bench_rc):
    result = run_script(tmp_path, bench_rc)
    lines = result.stdout.strip().splitlines()
    bench = next(line for line in lines if line.startswith("bench "))
    assert "--check" in bench and "--rungs eager --rungs fp8" in bench and "--device cpu" in bench
    # after the judged ladder, not judged itself: where the time goes, on the CPU ops of the tiny model
    ran = [line for line in lines if line.startswith("ran ")]
    assert lines.index(bench) < lines.index(ran[0]) and ran[0].split()[1] == "benchmarks/time_breakdown.py"
    assert "--tiny --device cpu" in ran[0] and f"--out {tmp_path / 'out' / 'dry-run'}" in ran[0]
    if bench_rc == 0:
        assert result.returncode == 0 and lines[-1] == "VERDICT: PASS", result.stdout + result.stderr
    else:
        assert result.returncode == 1 and lines[-1] == "VERDICT: FAIL (ladder checks)", result.stdout
        assert any(line.startswith("FAIL fp8 quality") for line in lines)
    assert (tmp_path / "out" / "gpu_check.log").read_text().strip().splitlines()[-1] == lines[-1]
    env = json.loads((tmp_path / "out" / "env.json").read_text())  # `zimage env --json`, for the results
    assert env["zimage_native"] and "gpus" in env and "runs_here" in env


@needs_cpu_fp8
def test_gpu_only_checks_run_on_the_cpu_with_stand_in_graphs():
    """The ladder's GPU-only checks (CFG under graphs, graph modes, fp8 both ways) as code paths:
    stand-in graph capture, eager-backend compile, the tiny bench model in bf16. The compiled blocks
    run eagerly inside the stand-in's capture (dynamo does not compile under its recording dispatch
    mode; docs/performance.md): this checks the ladder's code paths, not compiled code in a graph."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native import bench

    from .test_compiled import graphed

    torch._dynamo.reset()
    pipe, _ = bench.build_random_pipeline(torch.device("cpu"), torch.bfloat16, tiny=True)
    pipe.progress = False
    pipe.optimize(compile="blocks", compile_backend=CompileCounterWithBackend("eager"))
    reference = {"image": pipe(bench.PROMPT, width=32, height=32, num_inference_steps=2, seed=0,
                               output_type="np").images}
    sampler, _ = graphed(pipe)
    pipe(bench.PROMPT, width=32, height=32, num_inference_steps=2, seed=0, output_type="np")  # the capture
    new = bench.graph_new_request(pipe, 32, 2)  # replays that graph with other features and noise
    assert new["replayed"] and new["rel_l2"] < bench.GRAPH_MAX_REL, new
    cfg = bench.cfg_under_graphs(pipe, 32, 2)
    assert cfg["exercised"] and cfg["rel_l2"] < bench.GRAPH_MAX_REL, cfg
    modes = bench.graph_mode_timing(pipe, 32, 2, 1)
    assert set(modes) == {"step_s", "loop_s", "loop_gain_pct"} and pipe._graphed is sampler
    pipe.optimize(fp8=True)
    quality = bench.fp8_accumulation_quality(pipe, 32, 2, reference)
    assert set(quality) == {"fast_accum", "fp32_accum"} and all(v > 20 for v in quality.values()), quality


@pytest.mark.parametrize("bench_rc", [0, 1], ids=["checks pass", "a check fails"])
def test_gpu_branch_runs_the_judged_ladder_first_then_the_optional_steps(tmp_path, bench_rc):
    result = run_script(tmp_path, bench_rc, gpu=True)
    lines = result.stdout.strip().splitlines()
    bench = next(line for line in lines if line.startswith("bench "))
    assert "--device cuda --sizes 1024 --big-size 2048 --steps 8" in bench and "--check" in bench
    assert "--tiny" not in bench and "--budget-s" in bench
    ran = [line for line in lines if line.startswith("ran ")]
    # the ladder, then the kernel tests (judged, one verdict line), then the optional benchmarks
    assert lines.index(bench) < lines.index(ran[0]) and ran[0].startswith("ran -m pytest")
    assert "PASS Triton kernel tests on the GPU" in lines
    assert [r.split()[1] for r in ran[1:]] == [
        "benchmarks/time_breakdown.py", "benchmarks/bench_kernels.py", "benchmarks/bench_gguf.py",
        "benchmarks/bench_controlnet.py", "benchmarks/bench_block_cache.py"]
    assert ran[1] == f"ran benchmarks/time_breakdown.py --device cuda --out {tmp_path / 'out'}"
    assert any(line.startswith("== where the time goes") and "(timeout 90 s)" in line for line in lines), result.stdout
    assert result.returncode == bench_rc and lines[-1] == ("VERDICT: PASS" if bench_rc == 0 else
                                                          "VERDICT: FAIL (ladder checks (rc 1))"), result.stdout
    # what comes back: the device tool brings back at most 8 files from $OUT; the CSVs repeat the JSONs
    files = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["controlnet.json", "e2e.json", "env.json", "gguf.json", "gpu_check.log", "kernels.json",
                     "time_breakdown.json"], files


def test_gpu_branch_with_no_time_left_fails_instead_of_running_unlimited(tmp_path):
    """A budget spent before the ladder (BUDGET_S too small) is a FAIL, never `timeout 0` (no limit)."""
    result = run_script(tmp_path, 0, gpu=True, budget_s=100)
    lines = result.stdout.strip().splitlines()
    assert not any(line.startswith("bench ") for line in lines), result.stdout
    assert any(line.startswith("FAIL ladder: only") for line in lines)
    assert result.returncode == 1 and lines[-1].startswith("VERDICT: FAIL (ladder (no time)")


def test_device_wheels_pin_the_versions_the_project_tests_against():
    """benchmarks/device_wheels.sh fetches the parity reference the test extra pins, and one version of
    each wheel (gpu_check.sh installs .whl/*.whl together; two versions of a package stop the install)."""
    import re

    from zimage_native.cli.config import tomllib  # tomli before Python 3.11

    script = (ROOT / "benchmarks" / "device_wheels.sh").read_text()
    pins = dict(re.findall(r"([A-Za-z_]+)==([0-9.]+)", script.split("WHEELS=(", 1)[1].split(")", 1)[0]))
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert f"diffusers=={pins['diffusers']}" in test_extra
    assert set(pins) == {"diffusers", "importlib_metadata", "gguf"}
    assert "gguf" in " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())
                              ["project"]["optional-dependencies"]["gguf"])


def test_the_runbook_names_the_commit_and_quotes_the_skip_line_the_script_prints():
    """The device gets the working tree without .git: each runbook call that records results names the
    commit (ZIMAGE_GIT_SHA=<sha>: call 2's lowvram.json recorded no git sha without it), and so does the
    time breakdown run alone; the skip line the runbook says to look for is the one gpu_check.sh prints
    for that step (it quoted "skipped (time budget spent)", which the script never prints)."""
    import re

    doc = (ROOT / "docs" / "performance.md").read_text()
    runbook = " ".join(doc.split("### GPU session runbook", 1)[1].split("\n## ", 1)[0].split())
    calls = re.findall(r"\| \d \| `([^`]*)`", runbook)
    assert len(calls) == 2 and all("ZIMAGE_GIT_SHA=<sha> " in call for call in calls), calls
    alone = runbook.split("it can run alone:", 1)[1].split("(nothing", 1)[0]
    assert "ZIMAGE_GIT_SHA=<sha> python3 benchmarks/time_breakdown.py --out $OUT" in alone, alone
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    step = next(line for line in script.splitlines() if "benchmarks/time_breakdown.py --device cuda" in line)
    name, _, least = step.split('"', 1)[1].split("|")[:3]
    printed = re.search(r'echo "== \$name: (skipped \(\$\{limit\} s of the budget left, needs \$\{least\} s\))"',
                        script).group(1)
    quoted = printed.replace("${limit}", "N").replace("${least}", least)
    assert f'"== {name.split(":")[0]}: ...: {quoted}"' in runbook, quoted
