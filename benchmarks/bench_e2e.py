"""End-to-end benchmark ladder, zimage-native against diffusers 0.42.1 on the same weights.

    python benchmarks/bench_e2e.py --sizes 1024 2048 --steps 8            # GPU, random full-size weights
    python benchmarks/bench_e2e.py --model /path/to/Z-Image-Turbo          # a real model folder
    python benchmarks/bench_e2e.py --tiny --device cpu --rungs eager fp8   # a CPU dry run of the code path

Prints a table and, last, one JSON line; appends CSV rows to benchmarks/results/e2e.csv.
The same code runs behind `zimage bench` (zimage_native/bench.py).
"""

from __future__ import annotations

import sys

from zimage_native.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
