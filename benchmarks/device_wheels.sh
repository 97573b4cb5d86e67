#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels the GPU checks need on a machine without
# one, into .whl/ at the repository root (ignored by git through .git/info/exclude).
#
#   bash benchmarks/device_wheels.sh              # then carry .whl to the GPU machine
#
# benchmarks/gpu_check.sh installs whatever lies in .whl/ (pip --target /tmp/site, no index, no
# dependencies) before it starts. The GPU image this project is lent (Python 3.12, torch 2.11,
# transformers 5.17, huggingface_hub 1.33, safetensors 0.8.0; /work/.library/device/KINDS.md) has
# everything the engine needs but:
#   - diffusers 0.42.1, the parity reference (needs huggingface_hub >= 1.32 and safetensors >= 0.8,
#     both there);
#   - importlib_metadata, which diffusers imports: 9.0.0, the newest whose only dependency (zipp) is
#     in that image (10.x also needs lazy-importer);
#   - gguf, for the GGUF tests (the benchmarks build packed weights without it).
# Checked on the CPU in a virtual environment with that image's versions (torch 2.13.0 CPU there, the
# only CPU build on disk): the dry run of gpu_check.sh passes with these wheels carried this way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
WHEELS=(diffusers==0.42.1 importlib_metadata==9.0.0 gguf==0.19.0)
mkdir -p .whl
if GIT_DIR=$(git rev-parse --git-common-dir 2>/dev/null); then
  mkdir -p "$GIT_DIR/info"
  grep -qsx '/.whl/' "$GIT_DIR/info/exclude" || echo '/.whl/' >> "$GIT_DIR/info/exclude"
fi
for w in "${WHEELS[@]}"; do rm -f ".whl/${w%%==*}"-*.whl; done  # one version of each, or pip refuses them all
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -1 .whl
