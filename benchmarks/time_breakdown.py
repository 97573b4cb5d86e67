"""Where the time goes: one warm request of the fastest bf16 rung that the profiler sees kernel by kernel.

    python benchmarks/time_breakdown.py --out DIR                    # GPU: 1024x1024, 8 steps, bf16
    python benchmarks/time_breakdown.py --out DIR --trace            # plus trace.json.gz if it stays small
    python benchmarks/time_breakdown.py --tiny --device cpu --size 64 --steps 2 --out DIR   # CPU dry run

It builds the pipeline with random full-size weights (``zimage_native.bench.build_random_pipeline``),
applies the ladder's "+compile" rung (``bench.make_ladder``: Triton kernels + ``compile="blocks"``,
no CUDA graphs, so every kernel is launched, and seen, one by one) through ``bench.run_ours``,
which also makes the warm-up (the compile) and times the request unprofiled. Then it profiles one
warm request (text encode, denoise, VAE decode, called one by one as the ladder times them, each
inside a ``torch.profiler.record_function`` range and synchronised at its end) with
``torch.profiler`` (CPU + CUDA activities), and sorts the device time by kernel name into
categories (``kernel_category``): GEMM, attention, the engine's Triton kernels (the ``zimage::``
ops), Inductor-generated Triton, copies and memsets, VAE convolutions, other. Per phase too.

Reported: ms and % of kernel time per category (whole request and per phase), the 15 kernels with
the most time, the kernel time against the wall time of the request (the GPU's idle share: launch
and host gaps, which CUDA graph replay removes; the ladder's "+cuda_graphs" row has the graphed
time), and the achieved TFLOP/s of the DiT GEMMs and attention in the denoise phase against the
790 TFLOP/s bf16 compute floor of docs/performance.md (``bench.FLOOR_TFLOPS``).
Results: markdown on stdout, ``time_breakdown.json`` in ``--out``.

On the CPU (``--device cpu``; the dry run of the code path, with ``--tiny``) the "kernels" are the
CPU ops (self time, ``cpu_op_category``: aten::mm / addmm / linear -> GEMM, scaled_dot_product ->
attention, zimage:: -> engine, ...), the Triton kernels run in Triton's interpreter and the
compile backend defaults to "eager" (dynamo only, no code generation): the output is labelled a
dry run and its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # run from a checkout without installing (after site-packages: kernels/ is not HF kernels)

from zimage_native import bench  # noqa: E402

CATEGORIES = {
    "gemm": "GEMM (cuBLAS / CUTLASS / nvjet / _scaled_mm)",
    "attention": "attention (flash / fmha / cuDNN SDPA)",
    "engine_triton": "engine Triton kernels (zimage:: ops)",
    "inductor_triton": "Inductor-generated Triton",
    "copy_memset": "copies and memsets",
    "vae_conv": "VAE convolutions",
    "other": "other",
}
PHASES = ("encode", "denoise", "decode")
RANGE = "time_breakdown/"  # the record_function ranges: time_breakdown/request, time_breakdown/encode, ...

#: The GPU kernel names of the engine's own Triton kernels (the @triton.jit functions the zimage::
#: ops launch, kernels/*.py); tests/test_time_breakdown.py checks this list against the sources.
ENGINE_KERNELS = ("_rms_norm_fwd_kernel", "_qk_norm_rope_kernel", "_gated_rms_norm_residual_kernel",
                  "_silu_mul_kernel", "_quantize_fp8_rows_kernel", "_dequant_ggml_kernel", "_dequant_fp8_kernel")

GRAPH_NOTE = ("no CUDA graphs here, so the launches are visible: graph replay removes the launch and host gaps "
              "measured as GPU idle time; the ladder's +cuda_graphs row reports the graphed time")
TRACE_MAX_BYTES = 10 * 2**20  # the device tool returns files up to 16 MB


# ------------------------------------------------------------------------------------- categories
_CONV = re.compile(r"conv(?!ert)")  # convolution / convolve / conv2d, not convert

def kernel_category(name: str) -> str:
    """The category of one GPU activity (kernel, memcpy, memset) from its name. The order matters:
    FlashAttention-3 kernels carry ``cutlass`` in their template arguments, cuDNN convolutions
    ``implicit_gemm`` / ``sgemm``, and cuDNN's SDPA ``fprop``."""
    n = name.lower()
    if any(k in name for k in ENGINE_KERNELS):
        return "engine_triton"
    if n.startswith("triton_tem_"):  # Inductor templates (max-autotune): mm, conv, flex attention
        return "attention" if "attention" in n else "vae_conv" if "conv" in n else "gemm"
    if n.startswith("triton_"):  # triton_poi_ / triton_red_ / triton_per_ ...
        return "inductor_triton"
    if "memcpy" in n or "memset" in n:
        return "copy_memset"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "attn")):
        return "attention"
    if _CONV.search(n) or any(k in n for k in ("fprop", "dgrad", "wgrad", "winograd", "nchwtonhwc", "nhwctonchw")):
        return "vae_conv"
    if any(k in n for k in ("gemm", "gemv", "cublas", "cutlass", "nvjet", "xmma", "scaled_mm", "splitkreduce")):
        return "gemm"
    if any(k in n for k in ("copy_kernel", "catarraybatchedcopy", "fillfunctor")):
        return "copy_memset"
    return "other"


_CPU_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
             "aten::_scaled_mm", "aten::mv", "aten::addmv", "aten::dot", "aten::einsum"}
_CPU_COPY = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::fill_",
             "aten::zero_", "aten::zeros", "aten::cat"}


def cpu_op_category(name: str) -> str | None:
    """The category of one CPU op (the dry run's stand-in for a kernel); None when the name alone
    does not say (the op's caller decides: see ``analyse``)."""
    n = name.lower()
    if n.startswith("zimage::"):
        return "engine_triton"
    if n.startswith(("triton_", "cpp_fused", "inductor::")):
        return "inductor_triton"
    if "scaled_dot_product" in n or "attention" in n or "flash" in n:
        return "attention"
    if _CONV.search(n):
        return "vae_conv"
    if n in _CPU_GEMM:
        return "gemm"
    if n in _CPU_COPY:
        return "copy_memset"
    return None


# ------------------------------------------------------------------------------------- analysis
def _name(evt) -> str:
    return getattr(evt, "trace_name", None) or evt.name


def _union_us(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


#: Names of the record_function ranges that torch and Inductor open (their copies on the GPU
#: timeline are ranges, not kernels).
ANNOTATION_PREFIXES = (RANGE, "ProfilerStep", "Torch-Compiled Region", "CompiledFunction", "## ",
                       "inductor_wrapper_call")


def _annotation_copy(evt, name: str, annotations: set[str]) -> bool:
    """A user annotation's range on the GPU timeline (kineto's gpu_user_annotation), not a kernel.
    Without the activity type (older torch), by name: a known range prefix, or the name of a CPU-side
    annotation that does not read as a kernel name."""
    if getattr(evt, "activity_type", None) == "gpu_user_annotation":
        return True
    return name.startswith(ANNOTATION_PREFIXES) or (name in annotations and kernel_category(name) == "other")


def analyse(events, gpu: bool) -> dict:
    """Sort the profiled activities into categories and phases.

    ``events``: ``prof.events()`` of a run with ``record_function`` ranges named ``RANGE + phase``
    (and ``RANGE + "request"`` around them all). On a GPU the items are the device activities
    (kernels, memcpys, memsets; the GPU copies of user annotations left out), with their duration;
    on the CPU they are the ops of the profiled thread (names with ``::``) with their self time,
    an op whose name says nothing taking the category of its nearest op ancestor that does.
    An item belongs to the phase whose range contains its start (each phase ends in a sync).
    """
    from torch.autograd import DeviceType

    ranges, annotations = {}, set()
    for e in events:
        if e.device_type == DeviceType.CPU and getattr(e, "is_user_annotation", False):
            annotations.add(_name(e))
        if e.device_type == DeviceType.CPU and _name(e).startswith(RANGE):
            ranges[_name(e)[len(RANGE):]] = (e.time_range.start, e.time_range.end, e.thread)
    missing = {"request", *PHASES} - set(ranges)
    if missing:
        raise RuntimeError(f"profile has no range for {sorted(missing)}")
    start, end, thread = ranges["request"]
    items = []  # (name, category, start_us, end_us, time_us)
    for e in events:
        name = _name(e)
        if not start <= e.time_range.start <= end:
            continue
        if gpu:
            if e.device_type != DeviceType.CUDA or _annotation_copy(e, name, annotations):
                continue
            items.append((name, kernel_category(name), e.time_range.start, e.time_range.end,
                          e.time_range.end - e.time_range.start))
        else:
            if (e.device_type != DeviceType.CPU or e.thread != thread or "::" not in name
                    or getattr(e, "is_user_annotation", False) or name.startswith(RANGE)):
                continue
            category, parent = cpu_op_category(name), e.cpu_parent
            while category is None and parent is not None:
                category, parent = cpu_op_category(_name(parent)), parent.cpu_parent
            items.append((name, category or "other", e.time_range.start, e.time_range.end, e.self_cpu_time_total))

    def summary(selected, wall_us):
        kernel_us = sum(i[4] for i in selected)
        busy_us = _union_us((i[2], i[3]) for i in selected) if gpu else kernel_us
        per = {c: sum(i[4] for i in selected if i[1] == c) for c in CATEGORIES}
        return {
            "wall_ms": wall_us / 1e3, "kernel_ms": kernel_us / 1e3, "busy_ms": busy_us / 1e3,
            "idle_pct": 100 * (1 - busy_us / wall_us) if wall_us > 0 else None,
            "categories": {c: {"ms": us / 1e3, "pct": 100 * us / kernel_us if kernel_us else 0.0}
                           for c, us in per.items()},
        }

    result = summary(items, end - start)
    result["phases"] = {}
    for phase in PHASES:
        a, b, _ = ranges[phase]
        result["phases"][phase] = summary([i for i in items if a <= i[2] <= b], b - a)
    kernels: dict[str, dict] = {}
    for name, category, _, _, us in items:
        k = kernels.setdefault(name, {"name": name, "category": category, "calls": 0, "ms": 0.0})
        k["calls"] += 1
        k["ms"] += us / 1e3
    total_ms = result["kernel_ms"]
    top = sorted(kernels.values(), key=lambda k: -k["ms"])[:15]
    for k in top:
        k["pct"] = 100 * k["ms"] / total_ms if total_ms else 0.0
        k["name"] = k["name"][:300]
    result["top_kernels"] = top
    result["items"] = len(items)
    return result


def attention_flops_per_forward(config, image_tokens: int, caption_tokens: int) -> float:
    """The attention part (QK^T and PV, 4 L^2 d per layer) of ``bench.flops_per_forward``."""
    joint = image_tokens + caption_tokens
    return 4 * config.dim * (config.n_refiner_layers * (image_tokens ** 2 + caption_tokens ** 2)
                             + config.n_layers * joint ** 2)


def achieved(flops: float, ms: float, gpu: bool) -> dict:
    tflops = flops / (ms / 1e3) / 1e12 if ms > 0 else None
    return {"tflop": flops / 1e12, "ms": ms, "tflops": tflops,
            "floor_pct": 100 * tflops / bench.FLOOR_TFLOPS if gpu and tflops is not None else None}


# ------------------------------------------------------------------------------------- output
def markdown(report: dict) -> str:
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = []
    if report["dry_run"]:
        lines += ["**CPU DRY RUN**: the categories are CPU ops (self time), the Triton kernels run in Triton's "
                  "interpreter, compile backend " + report["settings"]["compile_backend"] + "; nothing here is a "
                  "GPU figure.", ""]
    s = report["settings"]
    lines += [f"Time breakdown: {report['env'].get('gpu')}, torch {report['env']['torch']}, {s['dtype']}, "
              f"{s['size']}x{s['size']}, {s['steps']} steps, rung {s['rung']['name']} (kernels {s['rung']['kernels']}, "
              f"compile {s['rung']['compile']}, CUDA graphs off), git {report['env'].get('git_sha')}", "",
              f"Note: {GRAPH_NOTE}.", ""]
    r = report["request"]
    unit = "op" if report["dry_run"] else "kernel"
    lines += [f"| phase | wall ms | {unit} ms | busy ms | idle % | " + " | ".join(CATEGORIES) + " |",
              "|---" * (5 + len(CATEGORIES)) + "|"]
    for name, p in [*report["phases"].items(), ("request", r)]:
        cells = [f"{p['categories'][c]['ms']:.1f}" for c in CATEGORIES]
        lines.append(f"| {name} | {p['wall_ms']:.1f} | {p['kernel_ms']:.1f} | {p['busy_ms']:.1f} | "
                     f"{f(p['idle_pct'])} | " + " | ".join(cells) + " |")
    lines += ["", f"| category (whole request) | ms | % of {unit} time |", "|---|---|---|"]
    lines += [f"| {CATEGORIES[c]} | {v['ms']:.1f} | {v['pct']:.1f} |" for c, v in r["categories"].items()]
    lines += ["", f"| top {unit}s | category | calls | ms | % |", "|---|---|---|---|---|"]
    for k in report["top_kernels"]:
        name = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
        lines.append(f"| `{name.replace('|', '/')}` | {k['category']} | {k['calls']} | {k['ms']:.2f} | {k['pct']:.1f} |")
    g, a = report["dit_gemm"], report["dit_attention"]
    lines += ["", f"DiT GEMMs in the denoise phase: {g['tflop']:.3g} TFLOP in {g['ms']:.1f} ms = {f(g['tflops'], '.3g')} "
              f"TFLOP/s ({f(g['floor_pct'])}% of {bench.FLOOR_TFLOPS:.0f} TFLOP/s, {report['peak_name']}); "
              f"attention {a['tflop']:.3g} TFLOP in {a['ms']:.1f} ms = {f(a['tflops'], '.3g')} TFLOP/s "
              f"({f(a['floor_pct'])}%).",
              f"Unprofiled (bench.run_ours, same rung): encode {f(report['unprofiled']['encode_s'], '.3f')} s, "
              f"denoise {f(report['unprofiled']['denoise_s'], '.3f')} s, decode {f(report['unprofiled']['decode_s'], '.3f')} s, "
              f"end to end {f(report['unprofiled']['e2e_s'], '.3f')} s; cold start {f(report['unprofiled']['cold_start_s'], '.1f')} s.",
              "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the run
def profile_request(pipe, size: int, steps: int, gpu: bool):
    """One request (encode, denoise, decode, as ``bench.run_ours`` times them) under the profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from zimage_native.scheduler import make_schedule

    device = pipe.device
    schedule = make_schedule(pipe.scheduler_config, steps)
    f = pipe.vae_scale_factor
    noise = torch.randn(1, 16, size // f, size // f, generator=torch.Generator().manual_seed(0))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    bench.sync(device)
    with profile(activities=activities) as prof:
        with record_function(RANGE + "request"):
            with record_function(RANGE + "encode"):
                embeds = pipe.encode_prompt([bench.PROMPT])
                bench.sync(device)
            with record_function(RANGE + "denoise"):
                latents = pipe.denoise(noise, embeds, None, schedule, progress=False)
                bench.sync(device)
            with record_function(RANGE + "decode"):
                pipe.decode(latents)
                bench.sync(device)
    return prof, embeds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder for time_breakdown.json (and trace.json.gz)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (a dry run)")
    p.add_argument("--tiny", action="store_true", help="the tiny test architecture (dry runs)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend; default inductor on CUDA, eager (dynamo only) on the CPU")
    p.add_argument("--trace", action="store_true",
                   help=f"also write trace.json.gz (a chrome trace), if it stays under {TRACE_MAX_BYTES >> 20} MB")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    backend = args.compile_backend or ("inductor" if gpu else "eager")
    dtype = torch.bfloat16
    if not gpu:
        from zimage_native.accel import load_kernels

        load_kernels(interpret=True)  # the Triton kernels in the CPU interpreter
    pipe, full_qwen = bench.build_random_pipeline(device, dtype, tiny=args.tiny)
    del full_qwen  # only diffusers needs its last layer
    pipe.progress = False
    t_built = time.perf_counter()
    print(f"built the pipeline on {device} in {t_built - t0:.1f} s", flush=True)

    (rung,) = [r for r in bench.make_ladder(("kernels", "compile")) if r.name == "+compile"]
    assert rung.kernels == "triton" and rung.compile == "blocks" and not rung.cuda_graphs, rung
    lines = []
    if backend != "inductor":  # run_ours applies the rung with Inductor; set the backend first
        lines = pipe.optimize(kernels=rung.kernels, compile=rung.compile, compile_backend=backend)
    row, _ = bench.run_ours(pipe, rung, args.size, args.steps, repeats=1)  # compile warm-up + unprofiled times
    t_warm = time.perf_counter()
    print(f"warm-up (compile included) and unprofiled request: {t_warm - t_built:.1f} s", flush=True)

    prof, embeds = profile_request(pipe, args.size, args.steps, gpu)
    t_prof = time.perf_counter()
    result = analyse(prof.events(), gpu)

    caption = -(-embeds[0].shape[0] // 32) * 32
    config, image_tokens = pipe.transformer_config, (args.size // 16) ** 2
    dit = bench.flops_per_forward(config, image_tokens, caption) * args.steps
    attention = attention_flops_per_forward(config, image_tokens, caption) * args.steps
    denoise = result["phases"]["denoise"]["categories"]
    report = {
        "dry_run": not gpu,
        "note": GRAPH_NOTE + ("" if gpu else "; CPU DRY RUN: categories from CPU op names (self time), Triton "
                              "kernels interpreted; not a GPU measurement"),
        "env": bench.environment(device),
        "settings": {"size": args.size, "steps": args.steps, "tiny": args.tiny, "dtype": str(dtype).removeprefix("torch."),
                     "rung": asdict(rung), "compile_backend": backend, "caption_tokens": caption,
                     "optimize": lines + row.notes},
        "unprofiled": {k: getattr(row, k) for k in ("cold_start_s", "e2e_s", "encode_s", "denoise_s", "decode_s",
                                                    "peak_mem_gib", "tflops")},
        "request": {k: v for k, v in result.items() if k not in ("phases", "top_kernels")},
        "phases": result["phases"],
        "top_kernels": result["top_kernels"],
        "peak_name": "the bf16 dense matmul rate used as the compute floor (H100 SXM, docs/performance.md, "
                     "performance-anchors.md section 2)",
        "dit_gemm": achieved(dit - attention, denoise["gemm"]["ms"], gpu),
        "dit_attention": achieved(attention, denoise["attention"]["ms"], gpu),
        "flops_note": "bench.flops_per_forward x steps, as the ladder counts them (the context refiner per step; "
                      "the engine runs it once per request)",
    }
    if args.trace and args.out is not None:
        report["trace"] = write_trace(prof, args.out)
    t_done = time.perf_counter()
    report["seconds"] = {"build": t_built - t0, "warm-up": t_warm - t_built, "profiled request": t_prof - t_warm,
                         "analysis": t_done - t_prof, "after build": t_done - t_built}
    print(markdown(report), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "time_breakdown.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"time_breakdown: {t_done - t_built:.1f} s after the build ({t_done - t0:.1f} s in all)", flush=True)
    return report


def write_trace(prof, out: Path) -> str:
    """trace.json.gz in ``out`` if it stays under TRACE_MAX_BYTES; returns what was done."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        target = out / "trace.json.gz"
        with open(raw, "rb") as src, gzip.open(target, "wb") as dst:
            dst.write(src.read())
    size = target.stat().st_size
    if size > TRACE_MAX_BYTES:
        os.remove(target)
        return f"not written: {size / 2**20:.1f} MB gzipped is over {TRACE_MAX_BYTES >> 20} MB"
    return f"trace.json.gz ({size / 2**20:.1f} MB)"


if __name__ == "__main__":
    main()
