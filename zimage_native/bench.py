"""The benchmark ladder: eager -> +kernels -> +compile -> +CUDA graphs -> +fp8, with diffusers
0.42.1 measured side by side on the same weights in the same run.

Models are the released Z-Image-Turbo architecture with random weights built on the device (no
download), or a real model folder. diffusers' modules are built on meta and *assigned our tensors*,
so both engines run exactly the same weights without a second copy. Every row reports per-stage
times (text encode, denoise total and per step, VAE decode, end to end), peak memory, achieved
TFLOP/s and the share of the bf16 compute floor (790 TFLOP/s, the H100/H200 figure of
docs/performance.md), and a quality column against our eager run (PSNR of the decoded image, max
error of the final latents).

Used by ``benchmarks/bench_e2e.py`` and ``zimage bench``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FLOOR_TFLOPS = 790.0  # bf16 dense matmul rate used as the compute floor (design.md section 4)
PROMPT = ("a lighthouse on a rocky cliff at dusk, waves breaking below, warm light in the windows, "
          "dramatic clouds, 35mm photograph, fine grain")


@dataclass
class Rung:
    name: str
    kernels: str = "none"
    compile: str = "off"
    cuda_graphs: bool = False
    fp8: bool = False


# Each rung adds one feature to the one before it.
FEATURES = {"kernels": {"kernels": "triton"}, "compile": {"compile": "blocks"}, "cuda_graphs": {"cuda_graphs": True},
            "fp8": {"fp8": True}}


def make_ladder(names=("eager", "kernels", "compile", "cuda_graphs", "fp8")) -> list[Rung]:
    """Cumulative rungs over the chosen features, in the canonical order."""
    unknown = set(names) - {"eager", *FEATURES}
    if unknown:
        raise ValueError(f"unknown rungs {sorted(unknown)}; choose from {['eager', *FEATURES]}")
    rungs, settings = [], {}
    if "eager" in names:
        rungs.append(Rung("eager"))
    for key, change in FEATURES.items():
        if key in names:
            settings.update(change)
            rungs.append(Rung("+" + key, **settings))
    return rungs


LADDER = make_ladder()


@dataclass
class Row:
    engine: str
    rung: str
    size: int
    steps: int
    encode_s: float | None = None
    denoise_s: float | None = None
    step_s: float | None = None
    decode_s: float | None = None
    e2e_s: float | None = None
    cold_start_s: float | None = None
    peak_mem_gib: float | None = None
    tflops: float | None = None
    floor_pct: float | None = None
    psnr_db: float | None = None
    latent_max_err: float | None = None
    notes: list[str] = field(default_factory=list)


def flops_per_forward(config, image_tokens: int, caption_tokens: int) -> float:
    """Matmul FLOPs of one DiT forward (context refiner included, as the reference runs it per step)."""
    d, f = config.dim, config.ffn_dim

    def block(length: int) -> float:
        return 8 * length * d * d + 6 * length * d * f + 4 * length * length * d

    joint = image_tokens + caption_tokens
    return (config.n_refiner_layers * (block(image_tokens) + block(caption_tokens))
            + config.n_layers * block(joint))


def psnr(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` synchronised calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ---------------------------------------------------------------------------------------------- models
def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights drawn on the module's own device: norms ~1, matrices ~1/sqrt(fan_in)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            g = torch.Generator(p.device).manual_seed(seed * 100_003 + i)
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.05 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.02 * noise)
    return module


def build_random_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool = False, workdir: Path | None = None):
    """Our pipeline with the released Z-Image-Turbo architecture (or a tiny one) and random weights,
    plus the full 36-layer Qwen3 module (for diffusers, which runs all of its layers)."""
    from transformers import AutoModel, Qwen3Config

    from .config import SchedulerConfig, TransformerConfig, VAEConfig
    from .model.transformer import ZImageTransformer
    from .model.vae import AutoencoderKL
    from .pipeline import ZImagePipeline
    from .testing import build_tokenizer
    from .text_encoder import TextEncoder, build_truncated_qwen3

    workdir = Path(workdir or os.environ.get("TMPDIR", "/tmp")) / "zimage-bench-tokenizer"
    tokenizer = build_tokenizer(workdir)
    if tiny:
        tcfg = TransformerConfig(dim=256, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=64)
        vcfg = VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=16)
        qcfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    else:
        tcfg, vcfg = TransformerConfig(), VAEConfig()
        qcfg = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                           rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True)

    def on_device(factory, seed):
        with torch.device("meta"):
            module = factory()
        module = module.to_empty(device=device).to(dtype)
        return random_init_(module, seed).eval().requires_grad_(False)

    transformer = on_device(lambda: ZImageTransformer(tcfg), 1)
    vae = on_device(lambda: AutoencoderKL(vcfg), 2)
    full_qwen = on_device(lambda: AutoModel.from_config(qcfg, attn_implementation="sdpa"), 3)
    with torch.device(device):
        full_qwen.rotary_emb = type(full_qwen.rotary_emb)(config=qcfg)  # a computed buffer, not a weight
    # Our encoder: the first N-1 layers and no final norm (hidden_states[-2]), sharing the tensors.
    ours, _, n = build_truncated_qwen3(qcfg)
    shared = {k: v for k, v in full_qwen.state_dict().items()
              if not (k.startswith(f"layers.{n - 1}.") or k == "norm.weight")}
    ours.load_state_dict(shared, strict=True, assign=True)
    ours.rotary_emb = full_qwen.rotary_emb  # a computed buffer, the same for both
    ours = ours.eval().requires_grad_(False)
    pipe = ZImagePipeline(transformer, vae, TextEncoder(ours, tokenizer), SchedulerConfig(shift=3.0), vcfg,
                          source="random Z-Image-Turbo architecture" + (" (tiny)" if tiny else ""), variant="turbo")
    return pipe, full_qwen


def diffusers_pipeline(pipe, full_qwen):
    """diffusers' ZImagePipeline on the very same tensors (modules built on meta, weights assigned)."""
    import diffusers

    tcfg = pipe.transformer_config.to_dict()
    tcfg = {k: v for k, v in tcfg.items() if k != "siglip_feat_dim"}
    with torch.device("meta"):
        transformer = diffusers.ZImageTransformer2DModel(**tcfg)
        vae = diffusers.AutoencoderKL(**pipe.vae_config.to_dict())
    transformer.load_state_dict(pipe.transformer.state_dict(), strict=True, assign=True)
    vae.load_state_dict(pipe.vae.state_dict(), strict=True, assign=True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler_config.shift)
    ref = diffusers.ZImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=full_qwen,
                                   tokenizer=pipe.text_encoder.tokenizer, transformer=transformer.eval())
    ref.set_progress_bar_config(disable=True)
    return ref


# ---------------------------------------------------------------------------------------------- runs
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["gpu"] = platform.processor() or "cpu"
    env["git_sha"] = os.environ.get("ZIMAGE_GIT_SHA") or _git_sha()
    return env


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_ours(pipe, rung: Rung, size: int, steps: int, repeats: int, reference=None) -> tuple[Row, dict]:
    from .scheduler import make_schedule

    device = pipe.device
    row = Row("zimage-native", rung.name, size, steps)
    row.notes += pipe.optimize(kernels=rung.kernels, compile=rung.compile, cuda_graphs=rung.cuda_graphs,
                               fp8=rung.fp8)  # cumulative: only what changed is applied
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    call = lambda: pipe(PROMPT, width=size, height=size, num_inference_steps=steps, seed=0,  # noqa: E731
                        output_type="np", progress=False)
    row.cold_start_s, _ = timed(call, device, 1)
    row.e2e_s, out = timed(call, device, repeats)
    embeds = pipe.encode_prompt([PROMPT])
    row.encode_s, _ = timed(lambda: pipe.encode_prompt([PROMPT]), device, repeats)
    schedule = make_schedule(pipe.scheduler_config, steps)
    f = pipe.vae_scale_factor
    noise = torch.randn(1, 16, size // f, size // f, generator=torch.Generator().manual_seed(0))
    row.denoise_s, latents = timed(lambda: pipe.denoise(noise, embeds, None, schedule, progress=False), device,
                                   repeats)
    row.step_s = row.denoise_s / steps
    row.decode_s, _ = timed(lambda: pipe.decode(latents), device, repeats)
    if device.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    caption = -(-embeds[0].shape[0] // 32) * 32
    flops = flops_per_forward(pipe.transformer_config, (size // 16) ** 2, caption) * steps
    row.tflops = flops / row.denoise_s / 1e12
    row.floor_pct = 100 * (flops / (FLOOR_TFLOPS * 1e12)) / row.denoise_s
    result = {"image": out.images, "latents": latents.float().cpu()}
    if reference is not None:
        row.psnr_db = psnr(out.images, reference["image"])
        row.latent_max_err = (result["latents"] - reference["latents"]).abs().max().item()
    return row, result


def run_diffusers(ref, pipe, size: int, steps: int, repeats: int, compiled: bool) -> tuple[Row, object]:
    device = pipe.device
    row = Row("diffusers 0.42.1", "compile (regional)" if compiled else "eager", size, steps)
    if compiled and not getattr(ref, "_zimage_compiled", False):
        if hasattr(ref.transformer, "compile_repeated_blocks"):
            ref.transformer.compile_repeated_blocks(fullgraph=True)
            row.notes.append("transformer.compile_repeated_blocks(fullgraph=True)")
        else:
            ref.transformer.compile()
            row.notes.append("transformer.compile()")
        ref._zimage_compiled = True
    kw = dict(width=size, height=size, num_inference_steps=steps, guidance_scale=0.0)
    call = lambda: ref(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kw)  # noqa: E731
    row.cold_start_s, _ = timed(call, device, 1)
    row.e2e_s, out = timed(call, device, repeats)
    embeds = ref.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)[0]
    row.denoise_s, _ = timed(lambda: ref(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0),
                                         output_type="latent", **kw), device, repeats)
    row.step_s = row.denoise_s / steps
    return row, out.images


def ladder(pipe, full_qwen=None, sizes=(1024,), steps: int = 8, repeats: int = 3, rungs=None,
           with_diffusers: bool = True) -> tuple[list[Row], dict]:
    """Apply the rungs cumulatively to ``pipe`` (in place) and measure each at every size, with
    diffusers eager and compiled on the same weights beside them. Quality is against our eager run;
    the diffusers eager row's PSNR is the bf16 parity of the two engines."""
    rows: list[Row] = []
    ref = diffusers_pipeline(pipe, full_qwen) if with_diffusers and full_qwen is not None else None
    diffusers_rows, diffusers_images, eager, results = {}, {}, {}, {}
    if ref is not None:
        for size in sizes:
            diffusers_rows[size], diffusers_images[size] = run_diffusers(ref, pipe, size, steps, repeats, False)
            rows.append(diffusers_rows[size])
    for rung in rungs or LADDER:
        for size in sizes:
            row, result = run_ours(pipe, rung, size, steps, repeats, eager.get(size))
            results[rung.name, size] = result
            before = results.get(("+compile", size))
            if rung.cuda_graphs and not rung.fp8 and before is not None:
                # The same kernels, replayed from the graph instead of launched one by one.
                diff = (result["latents"] - before["latents"]).abs().max().item()
                row.notes.append(f"graph replay vs +compile: max abs latent difference {diff:.3g}")
            if size not in eager:
                eager[size] = result
                row.psnr_db, row.latent_max_err = float("inf"), 0.0
                if size in diffusers_rows:
                    diffusers_rows[size].psnr_db = psnr(diffusers_images[size], result["image"])
            rows.append(row)
    if ref is not None:
        for size in sizes:
            row, images = run_diffusers(ref, pipe, size, steps, repeats, True)
            row.psnr_db = psnr(images, eager[size]["image"])
            rows.append(row)
    return rows, environment(pipe.device)


def report(rows: list[Row], env: dict, out_dir: Path | None = None) -> str:
    """A readable table, then one JSON line; appends CSV rows under ``out_dir`` when given."""
    head = f"{env.get('gpu')} | torch {env['torch']} | triton {env.get('triton')} | diffusers {env.get('diffusers')} | git {env.get('git_sha')}"
    cols = ["engine", "rung", "size", "encode_s", "denoise_s", "step_s", "decode_s", "e2e_s", "cold_start_s",
            "peak_mem_gib", "tflops", "floor_pct", "psnr_db", "latent_max_err"]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = [head, " | ".join(cols)]
    lines += [" | ".join(fmt(getattr(r, c)) for c in cols) for r in rows]
    payload = {"env": env, "rows": [asdict(r) for r in rows]}
    lines.append(json.dumps(payload, default=str))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        csv = out_dir / "e2e.csv"
        new = not csv.exists()
        with open(csv, "a", encoding="utf-8") as f:
            if new:
                f.write(",".join(["gpu", "driver", "torch", "triton", "git_sha"] + cols) + "\n")
            for r in rows:
                meta = [str(env.get(k)) for k in ("gpu", "driver", "torch", "triton", "git_sha")]
                f.write(",".join(meta + [fmt(getattr(r, c)).replace(",", ";") for c in cols]) + "\n")
    return "\n".join(lines)
