#!/usr/bin/env bash
# The one prepared GPU check: run on a GPU machine from the repository root.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else benchmarks/results)
#
# What it does, in order (about 6-8 minutes on an H100, compilation included):
#   1. installs what the machine lacks: this package (editable, no deps) and, if a .whl/ folder of
#      carried wheels is present (diffusers 0.42.1, importlib_metadata), those;
#   2. runs the Triton kernel tests on the real GPU (not the interpreter);
#   3. runs the ladder at 1024x1024, 8 steps, batch 1, random full-size weights: diffusers eager,
#      ours eager / +kernels / +compile / +CUDA graphs / +fp8, diffusers compiled; the diffusers-eager
#      row's PSNR is the bf16 parity check (>= 40 dB expected), and the +cuda_graphs row's latent error
#      against +compile shows that graph replay equals eager;
#   4. runs the kernel micro-benchmark;
#   5. times the GGUF packed linears (dequantise per forward) against bf16 linears at the DiT's shapes.
#   6. times a 1024x1024 8-step request with a random ControlNet branch of each published layout
#      against none, and checks bf16 parity with diffusers' ZImageControlNetPipeline (estimated at about
#      2 minutes; not yet run on a GPU).
# Everything it prints is also written to OUT_DIR (gpu_check.log, e2e.csv, kernels.csv, controlnet.json).
# Without a GPU (or with DRY_RUN=1) it runs the same steps as a CPU dry run of the code path: a tiny
# random model, the eager and fp8 rungs, the kernel benchmark's --smoke mode.
set -uo pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results}}
DRY_RUN=${DRY_RUN:-0}
command -v nvidia-smi >/dev/null 2>&1 || DRY_RUN=1
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
[ "$DRY_RUN" = 1 ] && echo "no GPU (or DRY_RUN=1): CPU dry run" || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing: the side-by-side rows are skipped"

echo "== kernel tests on the GPU"
timeout 180 python3 -m pytest -q -x tests/test_kernels_*.py -p no:cacheprovider

DIFF=--diffusers
python3 -c "import diffusers" 2>/dev/null || DIFF=--no-diffusers
export ZIMAGE_GIT_SHA=${ZIMAGE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "$DRY_RUN" = 1 ]; then
  echo "== ladder, dry run (tiny model, CPU)"
  timeout 420 python3 -m zimage_native.cli bench --tiny --device cpu --dtype bfloat16 --sizes 64 --steps 2 \
    --repeats 1 --rungs eager --rungs fp8 $DIFF --out "$OUT_DIR/dry-run"
  echo "== kernel micro-benchmark, smoke"
  timeout 300 python3 benchmarks/bench_kernels.py --smoke --out "$OUT_DIR/dry-run" || true
  echo "== GGUF packed linears, smoke"
  timeout 120 python3 benchmarks/bench_gguf.py --smoke || true
  echo "== ControlNet, smoke"
  timeout 300 python3 benchmarks/bench_controlnet.py --smoke --out "$OUT_DIR/dry-run" || true
  exit 0
fi

echo "== ladder 1024x1024, 8 steps"
timeout 420 python3 -m zimage_native.cli bench --sizes 1024 --steps 8 --repeats 3 $DIFF --out "$OUT_DIR"

echo "== kernel micro-benchmark"
timeout 120 python3 benchmarks/bench_kernels.py --out "$OUT_DIR" || true

echo "== GGUF packed linears (dequantise per forward) against bf16"
timeout 120 python3 benchmarks/bench_gguf.py --out "$OUT_DIR" || true

echo "== ControlNet-Union 1.0 / 2.0 / 2.1: cost per request and bf16 parity with diffusers"
timeout 300 python3 benchmarks/bench_controlnet.py --repeats 2 --out "$OUT_DIR" || true
