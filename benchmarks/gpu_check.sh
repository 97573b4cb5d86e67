#!/usr/bin/env bash
# The one prepared GPU check: run on a GPU machine from the repository root.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else benchmarks/results)
#
# It is a pass/fail check: it prints one line per check (PASS ... / FAIL ...), then one final
# verdict line, and exits non-zero when any check fails. The checks and their thresholds (stated
# in zimage_native/bench.py, explained in docs/performance.md):
#   - bf16 parity against diffusers 0.42.1 at full size (random full-size weights, 1024x1024,
#     8 steps): decoded image PSNR >= 40 dB;
#   - graph replay against the compiled eager run (same compiled model, no graphs): relative L2
#     difference of the final latents <= 5e-3;
#   - CFG under CUDA graphs: a guided request (guidance 4, truncated halfway) must be captured and
#     replayed, and equal the compiled eager run within the same 5e-3;
#   - fp8 quality against our bf16 eager image, with fast accumulation and with fp32 accumulation:
#     PSNR >= 25 dB each;
#   - the Triton kernel tests on the real GPU.
# Also measured (not judged): the ladder diffusers eager, ours eager / +kernels / +compile /
# +CUDA graphs / +VAE compile / +fp8, diffusers compiled, with the cold start of every rung (the
# first image, compile and capture included); a 2048x2048 row for the last bf16 rung; one graph
# per step against one graph for the whole loop; then, while the time budget lasts, where the time
# goes (benchmarks/time_breakdown.py: one profiled warm request of the +compile rung, Triton kernels
# and compile="blocks" without CUDA graphs, device time by kernel category and phase, the GPU's
# idle share and the DiT GEMMs' TFLOP/s; time_breakdown.json), the kernel micro-benchmark, the
# GGUF packed linears (dequantised per forward) against bf16 linears at the DiT's shapes, and a
# 1024x1024 8-step request with a random ControlNet branch of each published layout against none,
# with bf16 parity against diffusers' ZImageControlNetPipeline (benchmarks/bench_controlnet.py,
# controlnet.json; its own report, not judged here).
# Budget: BUDGET_S (default 480 s = 8 minutes) from the first test on; the judged steps come first
# and the optional ones only run in the time left (an estimate: the script has not run on a GPU
# yet). Everything it prints is also written to OUT_DIR (env.json: `zimage env --json`, gpu_check.log, e2e.csv with the JSON
# checks, time_breakdown.json, kernels.json, gguf.json, controlnet.json: 7 files, within the device
# tool's 8; the benchmarks' CSVs, which repeat their JSONs, are removed).
#
# On the lent GPU image, diffusers (and importlib_metadata) are missing: fetch their wheels first with
# benchmarks/device_wheels.sh and carry .whl; this script installs them from there.
#
# Without a GPU (or with DRY_RUN=1) it runs the same steps as a CPU dry run of the code path: a tiny
# random model, the eager and fp8 rungs with --check (parity and fp8 quality judged; the graph
# checks need CUDA), the time breakdown on CPU ops, the kernel benchmark's --smoke mode.
# tests/test_gpu_check.py runs the dry run.
set -uo pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results}}
DRY_RUN=${DRY_RUN:-0}
command -v nvidia-smi >/dev/null 2>&1 || DRY_RUN=1
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
FAILED=()

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "FAIL install: pip install -e . failed"; exit 1; }
fi
[ "$DRY_RUN" = 1 ] && echo "no GPU (or DRY_RUN=1): CPU dry run" || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" \
  || echo "diffusers missing: the parity check will fail (carry .whl from benchmarks/device_wheels.sh)"
# The machine as the engine sees it (GPU, capability, driver, versions of every package), for the results.
python3 -m zimage_native.cli env --json > "$OUT_DIR/env.json" && echo "wrote $OUT_DIR/env.json" \
  || echo "zimage env failed (see above)"

DIFF=--diffusers
python3 -c "import diffusers" 2>/dev/null || DIFF=--no-diffusers
export ZIMAGE_GIT_SHA=${ZIMAGE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

if [ "$DRY_RUN" = 1 ]; then
  echo "== ladder, dry run (tiny model, CPU), judged"
  timeout 900 python3 -m zimage_native.cli bench --tiny --device cpu --dtype bfloat16 --sizes 64 --steps 2 \
    --repeats 1 --rungs eager --rungs fp8 $DIFF --check --out "$OUT_DIR/dry-run" || FAILED+=("ladder checks")
  echo "== where the time goes, dry run (CPU ops, tiny model)"
  timeout 180 python3 benchmarks/time_breakdown.py --tiny --device cpu --size 32 --steps 2 --out "$OUT_DIR/dry-run" || true
  if [ "${SKIP_KERNEL_BENCH:-0}" != 1 ]; then
    echo "== kernel micro-benchmark, smoke"
    timeout 300 python3 benchmarks/bench_kernels.py --smoke --out "$OUT_DIR/dry-run" || true
    echo "== GGUF packed linears, smoke"
    timeout 120 python3 benchmarks/bench_gguf.py --smoke || true
    echo "== ControlNet, smoke"
    timeout 300 python3 benchmarks/bench_controlnet.py --smoke --out "$OUT_DIR/dry-run" || true
    echo "== first-block cache, smoke"
    timeout 120 python3 benchmarks/bench_block_cache.py --smoke || true
  fi
else
  echo "== kernel tests on the GPU"
  # pytest-xdist (in the GPU image) spreads the Triton compiles of ~120 tests over 4 processes
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
  timeout 120 python3 -m pytest -q -x $XDIST tests/test_kernels_*.py -p no:cacheprovider || {
    echo "FAIL Triton kernel tests on the GPU (see above)"; FAILED+=("kernel tests"); }

  LADDER_S=$(( $(left) - 20 ))
  echo "== ladder 1024x1024, 8 steps, a 2048x2048 row, judged (timeout ${LADDER_S} s)"
  timeout $LADDER_S python3 -m zimage_native.cli bench --sizes 1024 --big-size 2048 --steps 8 --repeats 3 $DIFF \
    --check --out "$OUT_DIR"
  rc=$?
  [ $rc = 124 ] && echo "FAIL ladder: timed out after ${LADDER_S} s (the checks after that point did not run)"
  [ $rc != 0 ] && FAILED+=("ladder checks (rc $rc)")

  for step in "where the time goes: one profiled request, +compile rung without graphs|90|benchmarks/time_breakdown.py --out $OUT_DIR" \
              "kernel micro-benchmark|60|benchmarks/bench_kernels.py --out $OUT_DIR" \
              "GGUF packed linears (dequantise per forward) against bf16|60|benchmarks/bench_gguf.py --out $OUT_DIR" \
              "ControlNet-Union 1.0 / 2.0 / 2.1: cost per request and bf16 parity|300|benchmarks/bench_controlnet.py --repeats 2 --out $OUT_DIR" \
              "first-block cache: a reused step against a full forward|60|benchmarks/bench_block_cache.py"; do
    IFS='|' read -r name limit cmd <<< "$step"
    t=$(left); [ "$t" -lt "$limit" ] && limit=$t
    if [ "$limit" -lt 15 ]; then echo "== $name: skipped (time budget spent)"; continue; fi
    echo "== $name (timeout ${limit} s)"
    timeout "$limit" python3 $cmd || true
    # The device tool brings back at most 8 files: the CSVs repeat their JSONs' rows, so they go.
    rm -f "$OUT_DIR/kernels.csv" "$OUT_DIR/gguf.csv"
  done
fi

echo "elapsed $(( $(date +%s) - START )) s"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "VERDICT: FAIL (${FAILED[*]})"
  exit 1
fi
echo "VERDICT: PASS"
