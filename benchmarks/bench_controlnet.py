"""ControlNet-Union on the GPU: what the branch costs per request, and bf16 parity with diffusers.

    python benchmarks/bench_controlnet.py                  # GPU: 1024x1024, 8 steps, random full-size weights
    python benchmarks/bench_controlnet.py --compile        # also with compile="blocks" (DiT and branch)
    python benchmarks/bench_controlnet.py --smoke          # CPU plumbing check (tiny model, 64x64, 2 steps)

For the released Z-Image-Turbo architecture with random weights and a random branch of each
published layout (1.0: 6 control layers and 16 input channels; 2.0 and 2.1: 15 control layers and
33 channels), it times a request up to its final latents (``output_type="latent"``: the text
encoding, the control image's VAE encode and the step loop; the decode left out) without control
and with each branch, p50 over ``--repeats`` runs
after a warm-up, eager and (``--compile``) compiled. With diffusers installed it also runs
diffusers' ``ZImageControlNetPipeline`` on the very same tensors (bf16, eager) and reports the
relative error of our final latents against its (bf16 parity: expect about 1e-2, the bf16 noise
of two different kernel orders over 8 steps, not the fp32 1e-5 of the CPU tests).
Results: markdown on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # run from a checkout without installing (after site-packages: kernels/ is not HF kernels)

from zimage_native.bench import build_random_pipeline, diffusers_pipeline, random_init_  # noqa: E402
from zimage_native.config import ControlNetConfig  # noqa: E402
from zimage_native.model.controlnet import ZImageControlNet  # noqa: E402

PROMPT = "a dancer on a beach at sunset, long exposure, film grain"


def layouts(n_layers: int, n_refiner: int) -> dict[str, dict]:
    """The published layouts for a DiT of ``n_layers`` (even spacing from layer 0)."""
    many = max(1, n_layers // 2)
    return {
        "1.0": dict(control_layers_places=tuple(range(0, n_layers, max(1, n_layers // 6)))[:6], control_in_dim=16,
                    add_control_noise_refiner=None, control_refiner_layers_places=None),
        "2.0": dict(control_layers_places=tuple(range(0, n_layers, n_layers // many))[:many], control_in_dim=33,
                    add_control_noise_refiner="control_layers",
                    control_refiner_layers_places=tuple(range(n_refiner))),
        "2.1": dict(control_layers_places=tuple(range(0, n_layers, n_layers // many))[:many], control_in_dim=33,
                    add_control_noise_refiner="control_noise_refiner",
                    control_refiner_layers_places=tuple(range(n_refiner))),
    }


def random_branch(pipe, version: str, seed: int) -> ZImageControlNet:
    t = pipe.transformer_config
    cfg = ControlNetConfig(**layouts(t.n_layers, t.n_refiner_layers)[version], dim=t.dim, n_heads=t.n_heads,
                           n_kv_heads=t.n_heads, n_refiner_layers=t.n_refiner_layers, norm_eps=t.norm_eps)
    with torch.device("meta"):
        model = ZImageControlNet(cfg, t)
    model = model.to_empty(device=pipe.device).to(pipe.dtype)
    return random_init_(model, seed).eval().requires_grad_(False)


def control_picture(size: int):
    """A stand-in pose image: a few bright strokes on black (its content does not change the timing)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for k in range(6):
        draw.line([(size * (k + 1) // 8, size // 6), (size // 2, size * 5 // 6)], fill=(255, 200 - 30 * k, 40),
                  width=max(1, size // 64))
    return image


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 64x64, 2 steps")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time compile='blocks'")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers parity rows")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    repeats = 1 if args.smoke else args.repeats

    torch.manual_seed(0)
    pipe, full_qwen = build_random_pipeline(device, dtype, tiny=args.smoke)
    pipe.progress = False
    control = control_picture(size)
    call = dict(width=size, height=size, num_inference_steps=steps, seed=0, output_type="latent")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        if args.out is not None:  # after each row: a timeout keeps the rows measured so far
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "controlnet.json").write_text(json.dumps(
                {"device": device_name, "size": size, "steps": steps, "dtype": str(dtype), "rows": rows}, indent=2))

    base, _ = timed(lambda: pipe(PROMPT, **call).images, repeats)
    add({"case": "no control", "mode": "eager", "seconds": base})
    branches = {v: random_branch(pipe, v, 10 + i) for i, v in enumerate(("1.0", "2.0", "2.1"))}
    ours = {}
    for version, branch in branches.items():
        pipe.controlnets.model, pipe.controlnets.path = branch, f"random {version}"
        seconds, ours[version] = timed(lambda: pipe(PROMPT, control_image=control, **call).images, repeats)
        add({"case": f"ControlNet {version}", "mode": "eager", "seconds": seconds,
                     "overhead": seconds / base - 1})

    if not args.no_diffusers:
        try:
            import diffusers
        except ImportError:
            diffusers = None
            print("diffusers is missing: no parity rows")
        if diffusers is not None:
            ref = diffusers_pipeline(pipe, full_qwen)
            for version, branch in branches.items():
                cfg = {k: v for k, v in branch.config.to_dict().items()}
                with torch.device("meta"):
                    cn = diffusers.ZImageControlNetModel(**cfg)
                cn.load_state_dict(branch.state_dict(), strict=True, assign=True)
                cref = diffusers.ZImageControlNetPipeline(
                    scheduler=ref.scheduler, vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
                    transformer=ref.transformer, controlnet=cn.eval())
                cref.set_progress_bar_config(disable=True)
                seconds, theirs = timed(lambda: cref(PROMPT, control_image=control, height=size, width=size,
                                                     num_inference_steps=steps, guidance_scale=0.0,
                                                     generator=torch.Generator().manual_seed(0),
                                                     output_type="latent").images, repeats)
                add({"case": f"ControlNet {version}", "mode": "diffusers eager", "seconds": seconds,
                             "rel_err_vs_diffusers": rel_err(ours[version], theirs)})
            del ref

    if args.compile:
        pipe.controlnets.model = None
        pipe.optimize(compile="blocks")
        base_c, _ = timed(lambda: pipe(PROMPT, **call).images, repeats)
        add({"case": "no control", "mode": "compile=blocks", "seconds": base_c})
        for version, branch in branches.items():
            from zimage_native.accel import optimize

            optimize(branch, compile="blocks")
            pipe.controlnets.model, pipe.controlnets.path = branch, f"random {version}"
            seconds, _ = timed(lambda: pipe(PROMPT, control_image=control, **call).images, repeats)
            add({"case": f"ControlNet {version}", "mode": "compile=blocks", "seconds": seconds,
                         "overhead": seconds / base_c - 1})

    print(f"ControlNet, {size}x{size}, {steps} steps, {str(dtype).removeprefix('torch.')}, {device_name}")
    print("| case | mode | s per request | overhead | rel err vs diffusers |")
    print("|---|---|---|---|---|")
    for r in rows:
        over = f"{r['overhead'] * 100:+.0f}%" if "overhead" in r else ""
        err = f"{r['rel_err_vs_diffusers']:.2e}" if "rel_err_vs_diffusers" in r else ""
        print(f"| {r['case']} | {r['mode']} | {r['seconds']:.3f} | {over} | {err} |")
    return rows


if __name__ == "__main__":
    main()
