"""GGUF packed linears against bf16 linears, at the released DiT's shapes.

    python benchmarks/bench_gguf.py                         # GPU: every block type, eager
    python benchmarks/bench_gguf.py --compile               # also torch.compile of the packed linear
    python benchmarks/bench_gguf.py --smoke                 # CPU plumbing check (tiny shapes, Q4_K and F8_E4M3)

A GGUFLinear dequantises its packed weight at every forward (zimage_native/quant_linear.py). This
measures what that costs: for each GGML block type and each linear shape of a DiT block at
1024x1024 (T = 4352 tokens; q, k, v, out: 3840 x 3840; w1, w3: 10240 x 3840; w2: 3840 x 10240), the
p50 time of the bf16 ``F.linear`` with a resident weight, of the packed linear in eager mode (and
compiled with ``--compile``), and the dequantisation alone; then the same two with the Triton
dequantisation ``zimage::dequantize_ggml`` (what ``kernels="triton"`` switches on), with a check
that its bf16 weight is bit-equal to the torch one on this GPU. The "extra ms / forward" columns
are the extra time of one DiT forward over bf16 (30 main + 2 noise-refiner blocks at T tokens, 2
context-refiner blocks counted at T as an upper bound), with the torch and with the Triton
dequantisation: whether the Triton one should become the default for GGUF files, and what a fused
dequant-GEMM would still have to win back. The type ``F8_E4M3`` is the layer of an fp8 DiT file
(``FP8StoredLinear``: e4m3 values and row scales, dequantised per forward; its Triton columns are
``zimage::dequantize_fp8``), for what keeping an fp8 file in fp8 costs. Weights are random bytes with finite fp16 scales, or random e4m3
values (the values do not matter for the timing). Without Triton the Triton columns are NaN. ``--smoke`` runs
them in Triton's CPU interpreter (or skips them when the kernels were already built for a GPU).
Results: markdown on stdout, CSV and JSON in --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from zimage_native.accel import AccelerationUnavailable, load_kernels  # noqa: E402
from zimage_native.bench import random_ggml_  # noqa: E402
from zimage_native.formats.ggml import QUANT_TYPES  # noqa: E402
from zimage_native.quant_linear import FP8StoredLinear, GGUFLinear  # noqa: E402

SHAPES = {"q/k/v/out": (3840, 3840, 4), "w1/w3": (10240, 3840, 2), "w2": (3840, 10240, 1)}  # (out, in, per block)
BLOCKS = 34
#: All block types, those real files use first (a timeout keeps them).
#: F8_E4M3 is not a GGML type: the layer of an fp8 DiT file (FP8StoredLinear), e4m3 values and row scales.
FP8_FILE = "F8_E4M3"
ORDER = ["Q4_K", "Q8_0", FP8_FILE, "Q6_K", "Q5_K", "Q4_0",
         *(t for t in QUANT_TYPES if t not in ("Q4_K", "Q8_0", "Q6_K", "Q5_K", "Q4_0"))]


def packed_layer(qtype: str, in_f: int, out_f: int, device: str):
    """A packed linear of ``qtype`` holding random weights (random GGML blocks with finite fp16 scales,
    or random e4m3 values with row scales for an fp8 file's layer)."""
    if qtype == FP8_FILE:
        layer = FP8StoredLinear(in_f, out_f, torch.float8_e4m3fn, device=device)
        layer.weight.copy_(torch.randn(out_f, in_f, device=device).clamp(-448, 448).to(torch.float8_e4m3fn)
                           .view(torch.uint8))
        layer.scale.copy_(torch.rand(out_f, 1, device=device) * 1e-3)
        return layer
    layer = GGUFLinear(in_f, out_f, qtype, device=device)
    random_ggml_(layer.weight, qtype)
    return layer


def timer(device: str, smoke: bool):
    def run(fn, *args) -> float:
        """p50 milliseconds."""
        if smoke:
            start = time.perf_counter()
            fn(*args)
            return (time.perf_counter() - start) * 1e3
        for _ in range(3):
            fn(*args)
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))
    return run


def triton_dequant(smoke: bool) -> tuple[object | None, str]:
    """(the Triton dequantiser, or None, and why not). Smoke runs use the CPU interpreter."""
    try:
        load_kernels(interpret=smoke)
    except AccelerationUnavailable as e:
        return None, str(e)
    from zimage_native.accel.fused_ops import use_triton_dequant_

    probe = GGUFLinear(256, 1, "Q4_K", device="meta")
    use_triton_dequant_(probe)
    return probe.dequantizer, ""


@torch.inference_mode()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="all", help="comma-separated GGML block types, or 'all'")
    parser.add_argument("--tokens", type=int, default=4352)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the packed linear")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny shapes, one type")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gguf.py needs a CUDA GPU (use --smoke for a CPU plumbing check)", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.bfloat16
    types = (["Q4_K", FP8_FILE] if args.smoke else ORDER) if args.types == "all" else args.types.split(",")
    shapes = {"smoke": (256, 512, 7)} if args.smoke else SHAPES
    tokens = 8 if args.smoke else args.tokens
    run = timer(device, args.smoke)
    name = "cpu (smoke run)" if args.smoke else torch.cuda.get_device_name(0)
    triton_fn, why_not = triton_dequant(args.smoke)
    nan = float("nan")
    rows = []
    for qtype in types:
        extra = extra_triton = 0.0
        for label, (out_f, in_f, per_block) in shapes.items():
            layer = packed_layer(qtype, in_f, out_f, device)
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            w = layer.dequantize(dtype)
            row = {"type": qtype, "shape": f"{out_f}x{in_f}", "tokens": tokens,
                   "packed_MB": layer.weight.numel() / 1e6, "bf16_MB": w.numel() * 2 / 1e6,
                   "bf16_ms": run(F.linear, x, w), "dequant_ms": run(layer.dequantize, dtype),
                   "packed_ms": run(layer, x), "triton_dequant_ms": nan, "triton_packed_ms": nan,
                   "triton_bit_equal": None}
            if args.compile and not args.smoke:
                torch._dynamo.reset()
                row["compiled_ms"] = run(torch.compile(layer), x)
            if triton_fn is not None:
                from zimage_native.accel.fused_ops import use_triton_dequant_

                use_triton_dequant_(layer)  # zimage::dequantize_ggml, or zimage::dequantize_fp8
                row["triton_bit_equal"] = bool(torch.equal(layer.dequantize(dtype).view(torch.int16),
                                                           w.view(torch.int16)))
                row["triton_dequant_ms"] = run(layer.dequantize, dtype)
                row["triton_packed_ms"] = run(layer, x)
            best = min(row["packed_ms"], row.get("compiled_ms", float("inf")))
            extra += per_block * (best - row["bf16_ms"])
            extra_triton += per_block * (row["triton_packed_ms"] - row["bf16_ms"])
            rows.append(row)
        for r in rows:
            if r["type"] == qtype:
                r["extra_ms_per_forward"] = extra * (BLOCKS if not args.smoke else 1)
                r["triton_extra_ms_per_forward"] = extra_triton * (BLOCKS if not args.smoke else 1)
        if not args.smoke:
            save(args.out, name, rows)
    print(f"# GGUF packed linears vs bf16, {name}, torch {torch.__version__}, T={tokens}\n")
    if triton_fn is None:
        print(f"Triton columns not measured: {why_not}\n")
    header = ["type", "shape", "packed MB", "bf16 ms", "dequant ms", "packed ms", "compiled ms", "extra ms / forward",
              "triton dequant ms", "triton packed ms", "triton extra ms / forward", "triton bit-equal"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join([r["type"], r["shape"], f"{r['packed_MB']:.1f}", f"{r['bf16_ms']:.3f}",
                                 f"{r['dequant_ms']:.3f}", f"{r['packed_ms']:.3f}",
                                 f"{r.get('compiled_ms', nan):.3f}", f"{r['extra_ms_per_forward']:.1f}",
                                 f"{r['triton_dequant_ms']:.3f}", f"{r['triton_packed_ms']:.3f}",
                                 f"{r['triton_extra_ms_per_forward']:.1f}",
                                 {True: "yes", False: "NO", None: "-"}[r["triton_bit_equal"]]]) + " |")
    if not all(r["triton_bit_equal"] in (True, None) for r in rows):
        print("FAIL: the Triton dequantisation differs from the torch twin (see 'triton bit-equal')", file=sys.stderr)
        return 1
    if not args.smoke:
        save(args.out, name, rows)
    return 0


def save(out: Path, device: str, rows: list[dict]) -> None:
    """gguf.csv and gguf.json (NaN, a column not run, as null); rewritten after every type, so a
    timeout keeps the types already measured."""
    rows = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gguf.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    (out / "gguf.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
