"""Issue 14's GPU measurements: the slowdown of streamed DiT blocks (``offload="blocks"``) against
resident weights, and the measured GPU memory peaks of each low-VRAM profile.

    python3 -m pip install -q --no-deps --no-build-isolation -e .       # once per machine
    ZIMAGE_GIT_SHA=<sha> python3 benchmarks/lowvram_check.py --out $OUT  # GPU, within --budget-s (180 s); the
                                                                        # commit: the device gets no .git
    python3 benchmarks/lowvram_check.py --tiny --device cpu --out DIR   # CPU dry run of the same code (< 60 s)

Everything runs on random weights of the released Z-Image-Turbo architecture (DiT, Qwen3-4B, VAE),
built in memory in each stored format (zimage_native/bench.py: ``random_dit``,
``random_text_encoder``, ``profile_pipeline``; GGUF blocks are random bytes with finite fp16
scales, so the ``gguf`` package is not needed). bf16, batch 1, 1024x1024, 8 steps by default.

Steps, most valuable first. A step runs only if the budget left is at least its estimate
(``ESTIMATE_S``: guesses until a GPU run has timed them; lowvram.json records each step's real
seconds), otherwise it prints ``== NAME: skipped (...)``:

1. ``offload bf16``: the bf16 DiT's sampling loop (DiT forwards, precomputed caption features)
   resident against the same weights streamed from pinned CPU memory (``offload="blocks"``): p50
   seconds of each, the slowdown, the bytes actually copied (counted in the streamer's transfer
   hook) per request and per step, the host-to-device copy rate measured alone, the GPU peak of
   each, the pinned host memory, and whether the final latents are equal (bit-equal, or the
   relative L2 difference).
2. ``profile 8gb``, 3. ``profile 12gb``: one request (encode, denoise, decode) of the profile
   (zimage_native.footprint.PROFILES, the profiles of zimage_native/config.example.toml) in its formats and
   placement; per phase the time and torch.cuda.max_memory_allocated / max_memory_reserved after
   empty_cache and reset_peak_memory_stats, the memory allocated before it (the weights on the
   GPU), the weight bytes footprint.py computes, and whether it fits the card: the largest peak
   reserved + CONTEXT_GIB (CUDA context) <= the card's GiB.
4. ``offload gguf:Q4_K``: step 1 for a packed Q4_K DiT (the 8gb profile's DiT).
5. ``profile 16gb``, 6. ``profile rtx4090``.

Output: a markdown table on stdout, ``lowvram.json`` in --out (rewritten after every step). The
exit status is 1 when an offload result differs from the resident one (or is not finite) or a
step failed, 0 otherwise (a skipped step is not a failure). On the CPU the memory peaks read n/a
and the timings are plumbing only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

try:
    from zimage_native import bench, footprint
    from zimage_native.loading import build_on_meta
except ImportError as e:  # its kernels/, converters/ and templates/ exist only once installed
    sys.exit(f"lowvram_check.py: the engine is not installed ({e}); from the repository root run "
             "`python3 -m pip install --no-deps --no-build-isolation -e .` first")

GIB = 2**30
#: CUDA context and library handles, not seen by torch's allocator (an allowance, not a measurement).
CONTEXT_GIB = 0.5
#: Caption length of the offload steps (random caption features: the text encoder is not needed there).
CAPTION_TOKENS = 64
#: Same weights and kernels, the weights only copied in: the bar of the graph-replay check.
OFFLOAD_MAX_REL = bench.GRAPH_MAX_REL
#: Each step's estimated seconds on an H100 (guesses; see the module doc).
ESTIMATE_S = {"offload bf16": 30, "profile 8gb": 35, "profile 12gb": 25, "offload gguf:Q4_K": 40,
              "profile 16gb": 25, "profile rtx4090": 20}
ORDER = ("offload bf16", "profile 8gb", "profile 12gb", "offload gguf:Q4_K", "profile 16gb", "profile rtx4090")


class Run:
    """The state shared by the steps: device, configs, the budget clock, reused modules, results."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16
        self.start = time.perf_counter()
        self.cuda = self.device.type == "cuda"
        from zimage_native.testing import build_tokenizer

        self.tokenizer = build_tokenizer(Path(tempfile.mkdtemp(prefix="zimage-lowvram-tokenizer-")))
        self.tcfg, self.vcfg, self.qcfg = bench.model_configs(len(self.tokenizer), args.tiny)
        self._vae = None
        self._text_encoders: dict = {}
        self.result = {"env": bench.environment(self.device),
                       "settings": {"size": args.size, "steps": args.steps, "repeats": args.repeats,
                                    "budget_s": args.budget_s, "tiny": args.tiny, "device": str(self.device),
                                    "dtype": "bfloat16", "caption_tokens_offload": CAPTION_TOKENS,
                                    "context_gib": CONTEXT_GIB, "offload_max_rel": OFFLOAD_MAX_REL},
                       "h2d_gb_s": None, "offload": [], "profiles": [], "steps": [], "checks": []}

    # ------------------------------------------------------------------ clock and helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def pinned_host(self) -> dict | None:
        """The pinned host allocator's bytes, None off CUDA: ``held`` (its blocks, cached ones
        included) and ``active`` (handed out); it rounds each block up to a power of two."""
        if not self.cuda:
            return None
        try:
            stats = torch.cuda.host_memory_stats()
        except (AttributeError, RuntimeError):
            return None

        def current(kind: str) -> int | None:
            for key in (f"{kind}.current", f"{kind}.all.current"):
                if key in stats:
                    return int(stats[key])
            return None

        return {"held": current("allocated_bytes"), "active": current("active_bytes")}

    def vae(self):
        if self._vae is None:
            from zimage_native.model.vae import AutoencoderKL

            self._vae = bench.on_device(build_on_meta(lambda: AutoencoderKL(self.vcfg)), self.device, self.dtype, 2)
        return self._vae

    def text_encoder(self, quant: str):
        """One text encoder per format, reused by the profiles that share it."""
        from zimage_native.text_encoder import TextEncoder

        if quant not in self._text_encoders:
            for other in list(self._text_encoders):  # keep one: the next profile's may differ
                del self._text_encoders[other]
            self.free()
            model = bench.random_text_encoder(self.qcfg, self.device, self.dtype, quant)
            self._text_encoders[quant] = TextEncoder(model, self.tokenizer)
        return self._text_encoders[quant]

    def noise(self) -> torch.Tensor:
        f = self.vcfg.scale_factor
        return torch.randn(1, 16, self.args.size // f, self.args.size // f, generator=torch.Generator().manual_seed(0))

    def timed(self, fn, deadline: float) -> tuple[float, int, object]:
        """p50 seconds of up to ``--repeats`` synchronised calls (at least one; no new call once
        ``deadline`` on the clock is passed), the number of calls, and the last result."""
        times, out = [], None
        while len(times) < self.args.repeats and (not times or self.elapsed() + times[-1] < deadline):
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), len(times), out

    def write(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 2)
        (self.args.out / "lowvram.json").write_text(json.dumps(self.result, indent=2, default=str))


# ---------------------------------------------------------------------- measurements
def h2d_rate(run: Run, nbytes: int = 512 * 2**20) -> float | None:
    """GB/s of one pinned host-to-device copy of ``nbytes`` (best of three), None off CUDA."""
    if not run.cuda:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
    best = math.inf
    for _ in range(3):
        run.sync()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        run.sync()
        best = min(best, time.perf_counter() - t)
    del src, dst
    return nbytes / best / 1e9


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    return {"finite": finite, "bit_equal": bool(torch.equal(a, b)),
            "max_abs": (a - b).abs().max().item() if finite else None,
            "rel_l2": bench.rel_l2(a, b) if finite else None}


def offload_step(run: Run, weights: str, deadline: float) -> dict:
    """The DiT's sampling loop resident, then with its blocks streamed (the same tensors)."""
    from zimage_native.config import SchedulerConfig
    from zimage_native.offload import streamed_bytes
    from zimage_native.pipeline import ZImagePipeline
    from zimage_native.scheduler import make_schedule

    args, device = run.args, run.device
    if run.result["h2d_gb_s"] is None:
        run.result["h2d_gb_s"] = h2d_rate(run)
    dit = bench.random_dit(run.tcfg, device, run.dtype, weights)
    run.free()
    placement = {k: device for k in ("text_encoder", "transformer", "vae")}

    def pipeline(offload: str):
        return ZImagePipeline(dit, run.vae(), None, SchedulerConfig(shift=3.0), run.vcfg, variant="turbo",
                              source="random Z-Image-Turbo architecture", placement=placement, offload=offload)

    g = torch.Generator().manual_seed(1)
    embeds = [torch.randn(CAPTION_TOKENS, run.tcfg.cap_feat_dim, generator=g).to(device, run.dtype)]
    noise = run.noise()
    row = {"dit": weights, "size": args.size, "steps": args.steps, "caption_tokens": CAPTION_TOKENS}
    resident = pipeline("none")
    schedule = make_schedule(resident.scheduler_config, args.steps)
    half = run.elapsed() + (deadline - run.elapsed()) / 2  # the resident half of the step's time

    def measure(pipe, stop: float, copied: list | None = None):
        """Warm-up (the streamer learns the block order), then the timed runs: p50, runs, the last
        latents, the GPU peak of the timed runs, the bytes copied per timed run."""
        call = lambda: pipe.denoise(noise, embeds, None, schedule, progress=False)  # noqa: E731
        call()
        if run.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if copied is not None:
            copied[0] = 0
        p50, n, latents = run.timed(call, stop)
        peak = torch.cuda.max_memory_allocated(device) if run.cuda else None
        return p50, n, latents.float().cpu(), peak, (None if copied is None else copied[0] / n)

    row["resident_s"], row["resident_runs"], want, row["peak_resident_bytes"], _ = measure(resident, half)
    del resident
    streamed = pipeline("blocks")  # stream_blocks: the blocks to pinned CPU memory, the rest stays
    run.free()
    streamer = dit.block_streamer
    copied = [0]
    move = streamer.transfer

    def counting(t: torch.Tensor) -> torch.Tensor:  # the streamer's device-move hook, counting bytes
        copied[0] += t.numel() * t.element_size()
        return move(t)

    streamer.transfer = counting
    row["resident_bytes_on_device"], row["largest_block_bytes"] = streamed_bytes(dit)
    row["pinned_host_bytes"] = run.pinned_host()
    (row["streamed_s"], row["streamed_runs"], got, row["peak_streamed_bytes"],
     row["bytes_per_request"]) = measure(streamed, deadline, copied)
    row["bytes_per_step"] = row["bytes_per_request"] / args.steps
    row["slowdown"] = row["streamed_s"] / row["resident_s"]
    # The copy rate that would hide every copy behind the resident compute, and the copy time per
    # step at the rate measured alone.
    row["gb_s_to_hide_copies"] = row["bytes_per_step"] / (row["resident_s"] / args.steps) / 1e9
    rate = run.result["h2d_gb_s"]
    row["copy_s_per_step_at_h2d"] = row["bytes_per_step"] / (rate * 1e9) if rate else None
    row.update(compare(got, want))
    streamer.remove()
    del streamed, dit, streamer
    run.free()
    streamed_any = row["bytes_per_request"] > 0  # an offload that copied nothing compared resident with itself
    ok = streamed_any and row["finite"] and row["rel_l2"] is not None and row["rel_l2"] <= OFFLOAD_MAX_REL
    how = ("nothing was streamed" if not streamed_any else "bit-equal" if row["bit_equal"] else
           f"not bit-equal, relative L2 {row['rel_l2']:.3g}, max abs {row['max_abs']:.3g}" if row["finite"]
           else "latents not finite")
    run.result["checks"].append(f"{'PASS' if ok else 'FAIL'} offload=blocks equals resident ({weights} DiT, "
                                f"{args.size}x{args.size}, {args.steps} steps): {how} "
                                f"(needs relative L2 <= {OFFLOAD_MAX_REL:g})")
    return row


def profile_step(run: Run, profile) -> dict:
    """One request in the profile's formats and placement; per phase time and memory peaks."""
    from zimage_native.scheduler import make_schedule

    args, device = run.args, run.device
    before_build = run.allocated()
    text_encoder = run.text_encoder(profile.text_encoder)
    pipe = bench.profile_pipeline(profile, device, run.dtype, args.tiny, text_encoder=text_encoder, vae=run.vae())
    run.free()
    computed = footprint.profile_bytes(profile, run.tcfg, run.qcfg.to_dict(), run.vcfg)
    row = {"profile": profile.name, "dit": profile.dit, "text_encoder": profile.text_encoder,
           "offload": profile.offload, "tiled_vae": profile.tiled_vae, "card_gib": profile.card_gib,
           "size": args.size, "steps": args.steps, "computed_bytes": computed,
           "allocated_before_build_bytes": before_build, "phases": {}}
    schedule = make_schedule(pipe.scheduler_config, args.steps)
    state: dict = {}
    phases = {"encode": lambda: state.__setitem__("embeds", pipe.encode_prompt([bench.PROMPT])),
              "denoise": lambda: state.__setitem__("latents", pipe.denoise(run.noise(), state["embeds"], None,
                                                                           schedule, progress=False)),
              "decode": lambda: state.__setitem__("image", pipe.decode(state["latents"]))}
    for name, fn in phases.items():
        phase = {"allocated_before_bytes": run.allocated()}
        if run.cuda:  # each phase's own peak: the allocator's cache of the phase before is released first
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run.sync()
        t = time.perf_counter()
        fn()
        run.sync()
        phase["seconds"] = time.perf_counter() - t
        if run.cuda:
            phase["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            phase["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        row["phases"][name] = phase
    row["e2e_s"] = sum(p["seconds"] for p in row["phases"].values())
    row["image_finite"] = bool(torch.isfinite(state["image"]).all())
    row["pinned_host_bytes"] = run.pinned_host()
    if run.cuda:
        peak = max(p["peak_reserved_bytes"] for p in row["phases"].values())
        row["peak_reserved_bytes"] = peak
        row["fits"] = peak + CONTEXT_GIB * GIB <= profile.card_gib * GIB
        row["headroom_gib"] = profile.card_gib - CONTEXT_GIB - peak / GIB
    else:
        row["peak_reserved_bytes"] = row["fits"] = row["headroom_gib"] = None
    del pipe, state
    run.free()
    return row


# ---------------------------------------------------------------------- report
def gib(n) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def secs(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(result: dict) -> str:
    env = result["env"]
    s = result["settings"]
    h2d = result["h2d_gb_s"]
    lines = [f"# Low-VRAM check: {env.get('gpu')}, torch {env.get('torch')}, git {env.get('git_sha')}",
             f"{s['size']}x{s['size']}, {s['steps']} steps, batch 1, bf16, random weights"
             + (" (tiny models: timings are plumbing only)" if s["tiny"] else "")
             + f"; pinned host-to-device copy alone: {'n/a' if h2d is None else f'{h2d:.1f} GB/s'}", ""]
    if result["offload"]:
        lines += ["## Streamed blocks (offload=blocks) against resident weights (DiT sampling loop)", "",
                  "| DiT | resident p50 s | streamed p50 s | slowdown | copied / step GB | GB/s to hide copies "
                  "| peak resident GiB | peak streamed GiB | pinned host GiB in use | equal to resident |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["offload"]:
            equal = ("bit-equal" if r["bit_equal"] else f"rel L2 {r['rel_l2']:.3g}" if r["finite"] else "not finite")
            lines.append(f"| {r['dit']} | {secs(r['resident_s'])} ({r['resident_runs']}) | {secs(r['streamed_s'])} "
                         f"({r['streamed_runs']}) | {r['slowdown']:.2f}x | {r['bytes_per_step'] / 1e9:.3f} | "
                         f"{r['gb_s_to_hide_copies']:.1f} | {gib(r['peak_resident_bytes'])} | "
                         f"{gib(r['peak_streamed_bytes'])} | {gib((r['pinned_host_bytes'] or {}).get('active'))} | {equal} |")
        lines.append("")
    if result["profiles"]:
        lines += ["## Profiles: one request, GPU memory per phase (peak allocated / peak reserved, GiB)", "",
                  "| profile | DiT / text encoder / offload | computed weights GiB (encode / denoise) | "
                  "on GPU before encode GiB | encode | denoise | decode | fits the card (+0.5 GiB context) | "
                  "encode / denoise / decode s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["profiles"]:
            c, ph = r["computed_bytes"], r["phases"]
            peaks = [f"{gib(ph[p].get('peak_allocated_bytes'))} / {gib(ph[p].get('peak_reserved_bytes'))}"
                     for p in ("encode", "denoise", "decode")]
            fits = ("n/a" if r["fits"] is None else
                    f"{'yes' if r['fits'] else 'NO'} ({r['headroom_gib']:+.2f} GiB of {r['card_gib']:g})")
            lines.append(f"| {r['profile']} | {r['dit']} / {r['text_encoder']} / {r['offload']} | "
                         f"{gib(c['encode'])} / {gib(c['denoise'])} | {gib(ph['encode']['allocated_before_bytes'])} | "
                         + " | ".join(peaks) + f" | {fits} | "
                         + " / ".join(secs(ph[p]["seconds"]) for p in ("encode", "denoise", "decode")) + " |")
        lines.append("")
    lines += [st["line"] for st in result["steps"]] + result["checks"]
    lines.append(f"elapsed {result.get('elapsed_s', 0):.1f} s of a {s['budget_s']:g} s budget")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--budget-s", type=float, default=180.0, help="seconds for all the steps (default 180)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a dry run of the code paths")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny and no GPU)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 8; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant, budget allowing")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() or not args.tiny else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("lowvram_check.py needs a CUDA GPU (use --tiny --device cpu for a dry run)", file=sys.stderr)
        return 2
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 8)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    profiles = {p.name: p for p in footprint.PROFILES}
    failed = False
    with torch.no_grad():
        for name in ORDER:
            estimate = ESTIMATE_S[name]
            left = run.left()
            if left < estimate:
                line = f"== {name}: skipped (budget left {max(left, 0):.0f} s < estimated {estimate} s)"
                run.result["steps"].append({"name": name, "status": "skipped", "seconds": 0.0, "line": line})
                print(line, flush=True)
                run.write()
                continue
            print(f"== {name} (estimated {estimate} s, {left:.0f} s left)", flush=True)
            t = run.elapsed()
            try:
                if name.startswith("offload "):
                    run.result["offload"].append(offload_step(run, name.split(" ", 1)[1], t + estimate))
                else:
                    run.result["profiles"].append(profile_step(run, profiles[name.split(" ", 1)[1]]))
                status, line = "done", f"== {name}: done in {run.elapsed() - t:.1f} s"
            except Exception as e:  # one failed step (e.g. out of memory) must not lose the others
                traceback.print_exc()
                failed = True
                status, line = "failed", f"== {name}: FAILED after {run.elapsed() - t:.1f} s: {type(e).__name__}: {e}"
            run.free()  # out here: the exception and its frames (the step's models) are gone by now
            run.result["steps"].append({"name": name, "status": status, "seconds": round(run.elapsed() - t, 2),
                                        "line": line})
            print(line, flush=True)
            run.write()
    failed = failed or any(c.startswith("FAIL") for c in run.result["checks"])
    run.write()
    print()
    print(table(run.result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
