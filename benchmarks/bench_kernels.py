"""Each zimage:: kernel against its eager reference and against torch.compile of that reference.

    python benchmarks/bench_kernels.py                       # bf16, 1024x1024 shapes, all ops
    python benchmarks/bench_kernels.py --ops rms_norm,silu_mul --tokens 16640   # 2048x2048
    python benchmarks/bench_kernels.py --smoke               # CPU plumbing check (interpreter, tiny shapes)

Shapes are the released model's at 1024x1024, batch 1: T = 4096 image + 256 caption tokens,
D = 3840, 30 heads of 128, F = 10240. The references are the model's own modules (the only copy of
the semantics). For each op it reports p50 microseconds (p20-p80 in the CSV), effective GB/s from
the kernel's byte budget (the minimum traffic: each input read once, each output written once; the
same bytes are used for all three columns, so GB/s compare like for like), % of the GPU's peak
memory bandwidth, and the relative error of the kernel against eager. Results go to stdout as a
markdown table and to benchmarks/results/ as CSV and JSON, with the GPU, versions and git sha.

Needs a CUDA GPU and Triton (timing is ``triton.testing.do_bench``: CUDA events, L2 flushed
between runs). A kernel should be kept only where it beats the compiled reference on these shapes.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from zimage_native.accel import load_kernels  # noqa: E402
from zimage_native.model.layers import RMSNorm  # noqa: E402
from zimage_native.model.rope import apply_rope, rope_cos_sin  # noqa: E402

# Peak HBM/GDDR bandwidth in GB/s, by a substring of torch.cuda.get_device_name(), first match wins
# (so the more specific names come first). Spec-sheet values; --peak-gbps overrides.
PEAK_GBPS = [
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("H800", 3350),
    ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864),
    ("L40", 864), ("L4", 300), ("A10", 600), ("RTX 5090", 1792), ("RTX 4090", 1008), ("RTX 3090", 936),
    ("MI300X", 5300), ("MI250", 3277),
]


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], tuple]  # -> inputs
    reference: Callable  # eager, from the model's modules
    kernel: Callable
    n_bytes: Callable[[tuple], int]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_norm(dim: int, dtype, device, eps: float = 1e-5) -> RMSNorm:
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    return norm.to(device, dtype)


def cases(tokens: int, dtype: torch.dtype, device: str, dim=3840, heads=30, head_dim=128, ffn=10240) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    norm = make_norm(dim, dtype, device)
    norm_q, norm_k = make_norm(head_dim, dtype, device), make_norm(head_dim, dtype, device)
    positions = torch.randint(0, 64, (1, tokens, 3), generator=g, device=device)
    cos, sin = rope_cos_sin(positions, (32, 48, 48), 256.0)
    ops = torch.ops.zimage
    out = []

    def x_scale():
        return randn(1, tokens, dim), randn(1, 1, dim, scale=0.3)

    out.append(Case(
        "rms_norm", f"(1, {tokens}, {dim}) * (1 + scale)", x_scale,
        lambda x, s: norm(x) * (1.0 + s), lambda x, s: ops.rms_norm(x, norm.weight, norm.eps, s),
        lambda a: 2 * nbytes(a[0]) + nbytes(a[1], norm.weight)))
    out.append(Case(
        "rms_norm", f"(1, {tokens}, {dim})", lambda: (randn(1, tokens, dim),),
        lambda x: norm(x), lambda x: ops.rms_norm(x, norm.weight, norm.eps),
        lambda a: 2 * nbytes(a[0]) + nbytes(norm.weight)))

    def qk():
        return randn(1, tokens, heads, head_dim), randn(1, tokens, heads, head_dim)

    out.append(Case(
        "qk_norm_rope", f"2 x (1, {tokens}, {heads}, {head_dim})", qk,
        lambda q, k: (apply_rope(norm_q(q), cos, sin), apply_rope(norm_k(k), cos, sin)),
        lambda q, k: ops.qk_norm_rope(q, k, norm_q.weight, norm_k.weight, cos, sin, norm_q.eps),
        lambda a: 2 * nbytes(*a) + nbytes(cos, sin)))

    def gated():
        return randn(1, tokens, dim), randn(1, tokens, dim, scale=4.0), randn(1, 1, dim)

    out.append(Case(
        "gated_rms_norm_residual", f"(1, {tokens}, {dim}), gated", gated,
        lambda x, y, gate: x + gate.tanh() * norm(y),
        lambda x, y, gate: ops.gated_rms_norm_residual(x, y, norm.weight, norm.eps, gate),
        lambda a: 3 * nbytes(a[0]) + nbytes(a[2], norm.weight)))

    out.append(Case(
        "silu_mul", f"(1, {tokens}, 2 x {ffn}) gate-up halves", lambda: (randn(1, tokens, 2 * ffn, scale=3.0),),
        lambda gu: F.silu(gu[..., :ffn]) * gu[..., ffn:],
        lambda gu: ops.silu_mul(gu[..., :ffn], gu[..., ffn:]),
        lambda a: nbytes(a[0]) * 3 // 2))
    return out


def rel_err(a, b) -> float:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    num = sum(float(torch.linalg.vector_norm((x.double() - y.double()))) ** 2 for x, y in zip(a, b)) ** 0.5
    den = sum(float(torch.linalg.vector_norm(y.double())) ** 2 for y in b) ** 0.5
    return num / den


def time_us(fn, args, smoke: bool) -> tuple[float, float, float]:
    """(p50, p20, p80) microseconds."""
    if smoke:
        start = time.perf_counter()
        fn(*args)
        us = (time.perf_counter() - start) * 1e6
        return us, us, us
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(lambda: fn(*args), quantiles=[0.5, 0.2, 0.8], warmup=50, rep=300)
    return p50 * 1e3, p20 * 1e3, p80 * 1e3


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_GBPS:
        if key in name:
            return float(value)
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def environment(smoke: bool) -> dict:
    sha = "n/a (smoke run)" if smoke else os.environ.get("ZIMAGE_GIT_SHA")  # the GPU check passes it (no .git there)
    try:
        if sha is None:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    import triton

    return {
        "gpu": "cpu (interpreter smoke run)" if smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_sha": sha,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@torch.inference_mode()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="all", help="comma-separated ops, or 'all'")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--tokens", type=int, default=4352, help="B*L rows: 4352 at 1024x1024, 16640 at 2048x2048")
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the peak bandwidth")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--stem", default=None,
                        help="file name without suffix (default kernels-<gpu>-<dtype>-<date>; the GPU check: kernels)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the plumbing: interpreter, tiny shapes, one untimed-quality run each")
    args = parser.parse_args(argv)

    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (use --smoke for a CPU plumbing check)", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    load_kernels(interpret=args.smoke)
    sizes = dict(dim=64, heads=2, head_dim=128, ffn=96) if args.smoke else {}
    tokens = 8 if args.smoke else args.tokens
    wanted = None if args.ops == "all" else set(args.ops.split(","))
    env = environment(args.smoke)
    peak = None if args.smoke else peak_gbps(env["gpu"], args.peak_gbps)

    stem = args.stem or f"kernels-{env['gpu'].replace(' ', '_')}-{args.dtype}-{env['date'][:10]}"
    rows = []
    for case in cases(tokens, dtype, device, **sizes):
        if wanted is not None and case.op not in wanted:
            continue
        inputs = case.make()
        n_bytes = case.n_bytes(inputs)
        err = rel_err(case.kernel(*inputs), case.reference(*inputs))
        variants = {"eager": case.reference, "kernel": case.kernel}
        if not args.no_compile and not args.smoke:
            torch._dynamo.reset()
            variants["compiled"] = torch.compile(case.reference, fullgraph=True)
        row = {"op": case.op, "shape": case.shape, "dtype": args.dtype, "bytes": n_bytes, "rel_err": err}
        for name, fn in variants.items():
            p50, p20, p80 = time_us(fn, inputs, args.smoke)
            row[f"{name}_us"], row[f"{name}_p20_us"], row[f"{name}_p80_us"] = p50, p20, p80
            row[f"{name}_gbps"] = n_bytes / (p50 * 1e-6) / 1e9
            row[f"{name}_peak_pct"] = 100 * row[f"{name}_gbps"] / peak if peak else float("nan")
        row["speedup_vs_eager"] = row["eager_us"] / row["kernel_us"]
        if "compiled_us" in row:
            row["speedup_vs_compiled"] = row["compiled_us"] / row["kernel_us"]
        rows.append(row)
        if not args.smoke:  # after each case: a timeout keeps the cases measured so far
            write_rows(args.out, stem, env, rows)

    print(f"# zimage:: kernels, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"git {env['git_sha']}, {args.dtype}, peak {peak or 'n/a'} GB/s, p50 of do_bench\n")
    header = ["op", "shape", "MB", "eager us", "compiled us", "kernel us", "kernel GB/s", "% peak",
              "x eager", "x compiled", "rel err"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join([
            r["op"], r["shape"], f"{r['bytes'] / 1e6:.1f}", f"{r['eager_us']:.1f}",
            f"{r.get('compiled_us', float('nan')):.1f}", f"{r['kernel_us']:.1f}", f"{r['kernel_gbps']:.0f}",
            f"{r['kernel_peak_pct']:.0f}", f"{r['speedup_vs_eager']:.2f}",
            f"{r.get('speedup_vs_compiled', float('nan')):.2f}",
            f"{r['rel_err']:.1e}",
        ]) + " |")
    slower = [r for r in rows if r.get("speedup_vs_compiled", 2.0) < 1.0]
    for r in slower:
        print(f"\nNOTE: {r['op']} {r['shape']} does not beat torch.compile of the reference "
              f"({r['kernel_us']:.1f} us vs {r['compiled_us']:.1f} us)")

    if not args.smoke and rows:
        print(f"\nwrote {args.out / stem}.csv and .json")
    return 0


def write_rows(out: Path, stem: str, env: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(env) + list(rows[0]))
        writer.writeheader()
        writer.writerows({**env, **r} for r in rows)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
