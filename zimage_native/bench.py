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
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .loading import build_on_meta

logger = logging.getLogger(__name__)

FLOOR_TFLOPS = 790.0  # bf16 dense matmul rate used as the compute floor (design.md section 4)
PROMPT = ("a lighthouse on a rocky cliff at dusk, waves breaking below, warm light in the windows, "
          "dramatic clouds, 35mm photograph, fine grain")


# Pass/fail thresholds of the GPU check (benchmarks/gpu_check.sh), stated once here.
PARITY_MIN_DB = 40.0  # bf16 parity with diffusers, decoded image PSNR (design.md section 3)
GRAPH_MAX_REL = 5e-3  # graph replay vs the compiled eager run: relative L2 error of the final latents
FP8_MIN_DB = 25.0  # fp8 (either accumulation) vs our bf16 eager run, decoded image PSNR
CFG_GUIDANCE = 4.0  # the CFG check's guidance scale (the base model's default)


@dataclass
class Rung:
    name: str
    kernels: str = "none"
    compile: str = "off"
    cuda_graphs: bool = False
    vae_compile: bool = False
    fp8: bool = False


# Each rung adds one feature to the one before it. fp8 is the last rung but is applied *before*
# compile: pipe.optimize undoes the compilation, quantises and compiles again.
FEATURES = {"kernels": {"kernels": "triton"}, "compile": {"compile": "blocks"}, "cuda_graphs": {"cuda_graphs": True},
            "vae": {"vae_compile": True}, "fp8": {"fp8": True}}
RUNG_NAMES = ("eager", *FEATURES)


def make_ladder(names=RUNG_NAMES) -> list[Rung]:
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


def rung_problem(pipe, rung: Rung) -> str | None:
    """Why ``rung`` cannot run on ``pipe`` here (None if it can), from the checks the transforms run
    first, without changing the pipeline: Triton for the kernels, a CUDA GPU for the graphs, compile
    where inductor compiles (not bfloat16 below sm80), fp8 tensor cores."""
    from .accel import AccelerationUnavailable
    from .accel.compile import check_compile_supported
    from .accel.fp8 import check_fp8_supported
    from .accel.fused_ops import check_kernels_can_run

    if rung.cuda_graphs and pipe.device.type != "cuda":
        return f"CUDA graphs need a CUDA GPU; the DiT is on {pipe.device}"
    checks = [(rung.kernels == "triton", lambda: check_kernels_can_run(pipe.transformer)),
              (rung.compile != "off", lambda: check_compile_supported(pipe.transformer, "inductor")),
              (rung.vae_compile, lambda: check_compile_supported(pipe.vae, "inductor", "the VAE decode")),
              (rung.fp8, lambda: check_fp8_supported(pipe.transformer))]
    try:
        for wanted, check in checks:
            if wanted:
                check()
    except (AccelerationUnavailable, ValueError) as e:
        return str(e)
    return None


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
    # Ours only: the timed call's image made 8-bit and written as the engine's PNG with its metadata
    # (metadata.save_png, into memory), on the host. Not in e2e_s (the timed call returns numpy, as
    # diffusers' does) nor in the CSV columns; e2e_s + png_s is the time to an image file.
    png_s: float | None = None


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


def inductor_cache_counts() -> tuple[int, int]:
    """(graphs read from Inductor's on-disk FX graph cache, graphs compiled) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def cache_note(before: tuple[int, int]) -> list[str]:
    """Whether the graphs Inductor made since ``before`` (:func:`inductor_cache_counts`) came from its
    on-disk cache: a cold start with a warm cache (a second run on one machine, or a kept
    TORCHINDUCTOR_CACHE_DIR) is several times shorter (docs/performance.md, "Compile cache")."""
    hits, misses = (now - then for now, then in zip(inductor_cache_counts(), before))
    if not hits and not misses:
        return []
    warmth = "warm" if not misses else "cold" if not hits else "partly warm"
    graphs = lambda n: f"{n} graph{'' if n == 1 else 's'}"  # noqa: E731
    return [f"cold start: Inductor cache {warmth} ({graphs(hits)} read from it, {graphs(misses)} compiled)"]


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


TINY_DIT = dict(dim=384, n_heads=3, n_kv_heads=3, n_layers=2, n_refiner_layers=1, cap_feat_dim=64)


def model_configs(tokenizer_size: int, tiny: bool = False):
    """(DiT, VAE, full Qwen3) configs: the released Z-Image-Turbo / Qwen3-4B ones, or tiny ones
    (dim 384: FFN width int(384 / 3 * 8) = 1024, a multiple of 16, so fp8 converts the FFN GEMMs too)."""
    from transformers import Qwen3Config

    from .config import TransformerConfig, VAEConfig

    if tiny:
        return (TransformerConfig(**TINY_DIT),
                VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=16),
                Qwen3Config(vocab_size=tokenizer_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True))
    return (TransformerConfig(), VAEConfig(),
            Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                        rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True))


def on_device(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A module built on meta, materialised on ``device`` in ``dtype`` with :func:`random_init_` weights."""
    module = module.to_empty(device=device).to(dtype)
    return random_init_(module, seed).eval().requires_grad_(False)


def bench_tokenizer(workdir: str | os.PathLike | None = None):
    """The benchmark's small byte-level BPE tokenizer (:func:`zimage_native.testing.build_tokenizer`),
    written to a temporary folder of this call's own under ``workdir`` (default: the system's temporary
    folder) and removed once it is read: two runs at once each have theirs (a fixed
    ``$TMPDIR/zimage-bench-tokenizer`` was shared, each run rewriting the other's files), and none is
    left behind. The tokenizer is held in memory; nothing reads the folder afterwards."""
    from .testing import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="zimage-bench-tokenizer-", dir=workdir) as folder:
        return build_tokenizer(Path(folder))


def build_random_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool = False, workdir: Path | None = None):
    """Our pipeline with the released Z-Image-Turbo architecture (or a tiny one) and random weights,
    plus the full 36-layer Qwen3 module (for diffusers, which runs all of its layers)."""
    from .config import SchedulerConfig
    from .model.transformer import ZImageTransformer
    from .model.vae import AutoencoderKL
    from .pipeline import ZImagePipeline
    from .text_encoder import TextEncoder, build_truncated_qwen3, qwen3_on_meta

    tokenizer = bench_tokenizer(workdir)
    tcfg, vcfg, qcfg = model_configs(len(tokenizer), tiny)
    transformer = on_device(build_on_meta(lambda: ZImageTransformer(tcfg)), device, dtype, 1)
    vae = on_device(build_on_meta(lambda: AutoencoderKL(vcfg)), device, dtype, 2)
    full_qwen = on_device(qwen3_on_meta(qcfg), device, dtype, 3)
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
    pipe.prompt_cache.max_entries = 0  # every timed run encodes its prompt, as diffusers does
    return pipe, full_qwen


# ------------------------------------------------------------------- random weights in each stored format
#: Byte offsets of the fp16 scale fields in one block of each GGML block type (:func:`put_scale`
#: writes them; IQ1_M's is split), and a magnitude for them that keeps the dequantised weights
#: around 0.01-0.05 (so a random model stays finite).
GGML_SCALES = {
    "Q4_0": ([0], 3e-3), "Q4_1": ([0, 2], 3e-3), "Q5_0": ([0], 1.5e-3), "Q5_1": ([0, 2], 1.5e-3),
    "Q8_0": ([0], 2e-4), "Q2_K": ([80, 82], 5e-4), "Q3_K": ([108], 1e-4), "Q4_K": ([0, 2], 3e-5),
    "Q5_K": ([0, 2], 1.5e-5), "Q6_K": ([208], 5e-6), "IQ4_NL": ([0], 5e-4), "IQ4_XS": ([0], 2e-5),
    "IQ1_S": ([0], 2e-3), "IQ1_M": ([48], 2e-3), "IQ2_XXS": ([0], 2e-4), "IQ2_XS": ([0], 2e-4),
    "IQ2_S": ([0], 2e-4), "IQ3_XXS": ([0], 1e-4), "IQ3_S": ([0], 1e-4),
}


def put_scale(blocks, qtype: str, offset: int, f16):
    """Write fp16 scales (their bytes, ``(blocks, 2)`` uint8) into the field at ``offset`` of every
    block (numpy arrays or torch tensors alike). IQ1_M has no such field: its fp16 is split into the
    top nibbles of the four uint16 at ``offset`` (48), bits 0-3 in the first, 12-15 in the last."""
    if qtype != "IQ1_M":
        blocks[:, offset:offset + 2] = f16
        return
    lo, hi = f16[:, 0], f16[:, 1]
    for k, nibble in enumerate((lo & 0x0F, lo >> 4, hi & 0x0F, hi >> 4)):
        at = offset + 2 * k + 1  # the high byte of word k
        blocks[:, at] = (blocks[:, at] & 0x0F) | (nibble << 4)


def random_ggml_(packed: torch.Tensor, qtype: str, seed: int = 0) -> torch.Tensor:
    """Fill packed GGML rows (``uint8``, ``(rows, row_bytes)``) in place, on their own device, with
    random blocks whose fp16 scales are finite and small (:data:`GGML_SCALES`); the other bytes
    (quants, 6-bit sub-scales, high bits) are uniform random. Returns ``packed``."""
    from .formats.ggml import block_info

    _, size = block_info(qtype)
    offsets, magnitude = GGML_SCALES[qtype]
    g = torch.Generator(packed.device).manual_seed(seed)
    with torch.no_grad():
        blocks = packed.view(-1, size)
        blocks.random_(0, 256, generator=g)
        for off in offsets:
            scales = (torch.rand(blocks.shape[0], generator=g, device=packed.device) * 2 - 1) * magnitude
            put_scale(blocks, qtype, off, scales.to(torch.float16).view(torch.uint8).view(-1, 2))
    return packed


def _random_packed_(module: torch.nn.Module, seed: int) -> None:
    from .quant_linear import GGUFEmbedding, GGUFLinear

    packed = [m for m in module.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))]
    for i, m in enumerate(packed):
        random_ggml_(m.weight, m.qtype, seed * 100_003 + 50_000 + i)


def _weights_format(fmt: str) -> str | None:
    """'gguf:TYPE' -> TYPE; the float formats -> None."""
    if not fmt.startswith("gguf:"):
        return None
    from .formats.ggml import QUANT_TYPES

    qtype = fmt.split(":", 1)[1]
    if qtype not in QUANT_TYPES:
        raise ValueError(f"unknown GGML block type {qtype!r}; known: {list(QUANT_TYPES)}")
    return qtype


def random_dit(config, device: torch.device | str, dtype: torch.dtype, weights: str = "bf16", seed: int = 1):
    """The DiT with random weights on ``device``: every tensor in ``dtype`` ("bf16" / "fp8": fp8 is
    applied later by ``pipe.optimize(fp8=True)``), or with ``weights="gguf:TYPE"`` every linear whose
    rows fit the type's blocks (what :func:`zimage_native.footprint.dit_bytes` counts packed) as a
    :class:`~zimage_native.quant_linear.GGUFLinear` holding random blocks, as a one-type GGUF file loads."""
    from . import footprint
    from .model.transformer import ZImageTransformer
    from .quant_linear import swap_quantized_modules_

    qtype = _weights_format(weights)
    device = torch.device(device)
    with torch.device("meta"):
        model = ZImageTransformer(config)
    if qtype is not None:
        select = footprint.ggml_linear(qtype)
        swap_quantized_modules_(model, {t.name: qtype for t in footprint.tensors_of(model) if select(t)}, dtype)
    model = random_init_(model.to_empty(device=device).to(dtype), seed)
    _random_packed_(model, seed)
    return model.eval().requires_grad_(False)


def random_text_encoder(full_config, device: torch.device | str, dtype: torch.dtype, quant: str = "none",
                        seed: int = 3) -> torch.nn.Module:
    """The truncated Qwen3 (N-1 layers, no final norm) with random weights on ``device``, stored as
    ``--text-encoder-quant quant`` ("none", "int8", "int4": built in ``dtype`` there, then quantised
    in place) or as a one-type GGUF file ("gguf:TYPE": the linears and the token embedding whose rows
    fit the type's blocks kept packed, as :func:`zimage_native.footprint.text_encoder_bytes` counts)."""
    from .quant_linear import swap_quantized_modules_
    from .quantize import quantize_text_encoder
    from .text_encoder import build_truncated_qwen3
    from .formats.ggml import block_info

    qtype = _weights_format(quant)
    device = torch.device(device)
    model, config, _ = build_truncated_qwen3(full_config)  # on meta
    if qtype is not None:
        block = block_info(qtype)[0]
        names = {f"{name}.weight": qtype for name, m in model.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.shape[-1] % block == 0}
        swap_quantized_modules_(model, names, dtype)
    rotary = model.rotary_emb
    model.rotary_emb = None  # a computed buffer, not a weight: built for real below
    model = random_init_(model.to_empty(device=device).to(dtype), seed)
    _random_packed_(model, seed)
    with torch.device(device):
        model.rotary_emb = type(rotary)(config=config)
    model = model.eval().requires_grad_(False)
    return model if qtype is not None else quantize_text_encoder(model, quant, device)


def profile_pipeline(profile, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, tiny: bool = False,
                     text_encoder=None, vae=None, workdir: Path | None = None):
    """A pipeline in a low-VRAM profile's formats and placement (:class:`zimage_native.footprint.Profile`:
    DiT format, text-encoder storage, offload, tiled VAE), with random weights of the released
    architecture (or the tiny one). ``text_encoder`` (a :class:`~zimage_native.text_encoder.TextEncoder`
    already in the profile's text-encoder format) and ``vae`` are reused when given, so several
    profiles can share them; the text encoder is moved to where the profile keeps it between uses."""
    from .config import SchedulerConfig
    from .devices import storage_device
    from .model.vae import AutoencoderKL
    from .pipeline import ZImagePipeline
    from .text_encoder import TextEncoder

    device = torch.device(device)
    tokenizer = text_encoder.tokenizer if text_encoder is not None else bench_tokenizer(workdir)
    tcfg, vcfg, qcfg = model_configs(len(tokenizer), tiny)
    dit = random_dit(tcfg, device, dtype, profile.dit)
    if text_encoder is None:
        text_encoder = TextEncoder(random_text_encoder(qcfg, device, dtype, profile.text_encoder), tokenizer)
    text_encoder.model.to(storage_device("text_encoder", device, profile.offload))
    if vae is None:
        vae = on_device(build_on_meta(lambda: AutoencoderKL(vcfg)), device, dtype, 2)
    placement = {"text_encoder": device, "transformer": device, "vae": device}
    pipe = ZImagePipeline(dit, vae, text_encoder, SchedulerConfig(shift=3.0), vcfg, variant="turbo",
                          source=f"random Z-Image-Turbo architecture, profile {profile.name}" + (" (tiny)" if tiny else ""),
                          placement=placement, offload=profile.offload)
    pipe.prompt_cache.max_entries = 0  # every timed run encodes its prompt
    if profile.dit == "fp8":
        pipe.optimize(fp8=True)
    if profile.tiled_vae:
        pipe.enable_vae_tiling()
    return pipe


def diffusers_pipeline(pipe, full_qwen):
    """diffusers' ZImagePipeline on the very same tensors (modules built on meta, weights assigned)."""
    import diffusers

    tcfg = pipe.transformer_config.to_dict()
    tcfg = {k: v for k, v in tcfg.items() if k != "siglip_feat_dim"}
    # The classes first: diffusers imports lazily, and an import under meta can fail (see qwen3_on_meta).
    transformer_class, vae_class = diffusers.ZImageTransformer2DModel, diffusers.AutoencoderKL
    with torch.device("meta"):
        transformer = transformer_class(**tcfg)
        vae = vae_class(**pipe.vae_config.to_dict())
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
    """The commit of the engine's own checkout (None for an installed package): asked in the package's
    folder, not the current one, which is another repository or none, and only where git tracks this
    file (an installed package in a virtual environment inside the user's repository is no checkout
    of the engine: that repository's commit is not the engine's)."""
    here = Path(__file__).resolve()
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", here.name], capture_output=True, text=True,
                                 timeout=10, cwd=here.parent)
        if tracked.returncode != 0:
            return None
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=here.parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def png_seconds(image, size: int, steps: int, repeats: int) -> float:
    """Median host time to turn one (H, W, 3) float image in [0, 1] into the engine's PNG with its
    metadata chunks: the 8-bit conversion and ``metadata.save_png``, as ``zimage generate`` writes."""
    import io

    from .images import to_uint8, uint8_to_pil
    from .metadata import png_info, save_png

    record = {"prompt": PROMPT, "seed": 0, "steps": steps, "width": size, "height": size}
    pixels = torch.as_tensor(image)[None].permute(0, 3, 1, 2)

    def write():
        save_png(uint8_to_pil(to_uint8(pixels))[0], io.BytesIO(), png_info(record))

    return timed(write, torch.device("cpu"), max(1, repeats))[0]


def run_ours(pipe, rung: Rung, size: int, steps: int, repeats: int, reference=None) -> tuple[Row, dict]:
    from .scheduler import make_schedule

    device = pipe.device
    row = Row("zimage-native", rung.name, size, steps)
    pipe.prompt_cache.max_entries = 0  # every timed run encodes its prompt, as diffusers does (no cached features)
    row.notes += pipe.optimize(kernels=rung.kernels, compile=rung.compile, cuda_graphs=rung.cuda_graphs,
                               vae_compile=rung.vae_compile, fp8=rung.fp8)  # cumulative: only what changed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    call = lambda: pipe(PROMPT, width=size, height=size, num_inference_steps=steps, seed=0,  # noqa: E731
                        output_type="np", progress=False)
    before = inductor_cache_counts()
    row.cold_start_s, _ = timed(call, device, 1)
    row.notes += cache_note(before)
    row.e2e_s, out = timed(call, device, repeats)
    row.png_s = png_seconds(out.images[0], size, steps, repeats)
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
    before = inductor_cache_counts()
    row.cold_start_s, _ = timed(call, device, 1)
    row.notes += cache_note(before)
    row.e2e_s, out = timed(call, device, repeats)
    embeds = ref.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)[0]
    row.denoise_s, _ = timed(lambda: ref(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0),
                                         output_type="latent", **kw), device, repeats)
    row.step_s = row.denoise_s / steps
    return row, out.images


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def graphs_off(pipe):
    """A context in which ``pipe`` runs its compiled step loop without CUDA graphs."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        graphed, pipe._graphed = pipe._graphed, None
        try:
            yield
        finally:
            pipe._graphed = graphed

    return scope()


def cfg_under_graphs(pipe, size: int, steps: int) -> dict:
    """A CFG request (guidance 4, truncated after half the steps) replayed from CUDA graphs against
    the same compiled step loop run eagerly; 'exercised' says a guided step was captured and replayed."""
    from .scheduler import make_schedule

    embeds = pipe.encode_prompt([PROMPT])
    negative = pipe.encode_prompt(["blurry, low quality"])
    schedule = make_schedule(pipe.scheduler_config, steps)
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance_scale=CFG_GUIDANCE, cfg_truncation=0.5, progress=False)
    graphed = pipe._graphed
    guided = graphed.guided_replays if graphed is not None else 0
    got = pipe.denoise(noise, embeds, negative, schedule, **kw).float().cpu()
    exercised = graphed is not None and graphed.guided_replays > guided
    with graphs_off(pipe):
        expected = pipe.denoise(noise, embeds, negative, schedule, **kw).float().cpu()
    return {"exercised": exercised, "rel_l2": rel_l2(got, expected)}


def graph_new_request(pipe, size: int, steps: int) -> dict:
    """A request the graphs were not captured on, replayed against the same compiled step loop run
    eagerly: caption features of the same length but other values (the same sequence class, so the
    captured graph is replayed, not captured again) and other noise. A value baked in at capture or
    an input not copied in per request shows here; 'replayed' says a captured graph ran it."""
    from .scheduler import make_schedule

    embeds = [e + 0.5 * torch.randn(e.shape, generator=torch.Generator().manual_seed(2)).to(e.device, e.dtype)
              for e in pipe.encode_prompt([PROMPT])]
    schedule = make_schedule(pipe.scheduler_config, steps)
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
    graphed = pipe._graphed
    captures, replays = (graphed.captures, graphed.replays) if graphed is not None else (0, 0)
    got = pipe.denoise(noise, embeds, None, schedule, progress=False).float().cpu()
    replayed = graphed is not None and graphed.replays > replays and graphed.captures == captures
    with graphs_off(pipe):
        expected = pipe.denoise(noise, embeds, None, schedule, progress=False).float().cpu()
    return {"replayed": replayed, "rel_l2": rel_l2(got, expected)}


def graph_mode_timing(pipe, size: int, steps: int, repeats: int) -> dict:
    """Denoise time with one graph per step (the default, progress and cancel per step) against one
    graph for the whole loop, on the same compiled model; the engine keeps "step" unless "loop" is
    more than 2% faster."""
    from .accel.cuda_graphs import GraphedSampler
    from .scheduler import make_schedule

    embeds = pipe.encode_prompt([PROMPT])
    schedule = make_schedule(pipe.scheduler_config, steps)
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    times = {}
    step_sampler = pipe._graphed
    for mode in ("step", "loop"):
        pipe._graphed = step_sampler if mode == "step" else GraphedSampler(
            pipe, capture=step_sampler.capture, new_event=step_sampler.new_event, mode="loop", max_graphs=1)
        call = lambda: pipe.denoise(noise, embeds, None, schedule, progress=False)  # noqa: E731
        call()  # capture
        times[f"{mode}_s"], _ = timed(call, pipe.device, repeats)
        if mode == "loop":
            pipe._graphed.clear()
    pipe._graphed = step_sampler
    times["loop_gain_pct"] = 100 * (times["step_s"] - times["loop_s"]) / times["step_s"]
    return times


def fp8_accumulation_quality(pipe, size: int, steps: int, reference) -> dict:
    """fp8 image quality against our bf16 eager image with fast and with fp32 accumulation, both
    run eagerly (no compile, no graphs) so that only the accumulation differs."""
    from .accel.compile import uncompile_
    from .accel.fp8 import Float8Linear

    uncompile_(pipe.transformer)
    pipe._accel["compile"] = "off"
    quality = {}
    with graphs_off(pipe):
        for fast in (True, False):
            for m in pipe.transformer.modules():
                if isinstance(m, Float8Linear):
                    m.fast_accum = fast
            out = pipe(PROMPT, width=size, height=size, num_inference_steps=steps, seed=0, output_type="np",
                       progress=False)
            quality["fast_accum" if fast else "fp32_accum"] = psnr(out.images, reference["image"])
    return quality


class Budget:
    """The time a ladder may take (``seconds`` None: no limit). Judged steps always run; the optional
    ones (the big-size row, graph-mode timing, diffusers compiled) only while more than ``reserve_s``
    is left, so that a short budget loses optional numbers, never a verdict."""

    def __init__(self, seconds: float | None = None, reserve_s: float = 150.0):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.reserve_s = reserve_s

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows_optional(self) -> bool:
        return self.left() > self.reserve_s


def optional(name: str, notes: list[str], budget: Budget, fn):
    """Run an optional (not judged) step: skipped when the budget is short, and a failure is a note,
    not the end of the ladder (the judged numbers measured so far and after it are kept)."""
    if not budget.allows_optional():
        notes.append(f"{name}: skipped ({budget.left():.0f} s left of the time budget)")
        logger.warning("%s: skipped (%.0f s left of the time budget)", name, budget.left())
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (reported; the judged steps go on)
        notes.append(f"{name}: failed: {type(e).__name__}: {e}")
        logger.warning("%s failed: %s: %s", name, type(e).__name__, e)
        return None


def ladder(pipe, full_qwen=None, sizes=(1024,), steps: int = 8, repeats: int = 3, rungs=None,
           with_diffusers: bool = True, big_size: int | None = None, on_row=None, checks: dict | None = None,
           on_check=None, budget: Budget | None = None) -> tuple[list[Row], dict, dict]:
    """Apply the rungs cumulatively to ``pipe`` (in place) and measure each at every size, with
    diffusers eager and compiled on the same weights beside them. Quality is against our eager run;
    the diffusers eager row's PSNR is the bf16 parity of the two engines.

    The judged checks (``checks``, filled in place: parity, graph replay, a new request under
    graphs, CFG under graphs, fp8 quality) are measured as early as the cumulative ladder allows,
    and ``on_check(name)`` is called as each is measured; ``on_row(row)`` as each row is done (a
    finished row, its PSNR included). So an interrupted run keeps what it measured. Optional steps
    (:func:`optional`) follow the budget, and so does the +vae rung (not judged; when it is skipped,
    the rungs after it run without the VAE compile): ``big_size`` (e.g. 2048) adds one row at that size for the
    last bf16 rung (cold start included: with the dynamic shape policy the compiled graphs are
    reused, only the CUDA graphs are captured anew), graph-mode timing, diffusers compiled (last).
    Returns (rows, environment, checks); ``checks`` feeds :func:`verdicts`.
    """
    rows = _Rows(on_row)
    checks = {} if checks is None else checks
    budget = budget or Budget()
    checks["size"] = sizes[0]

    def measured(name: str, value) -> None:
        checks[name] = value
        if on_check is not None:
            on_check(name)

    ref = diffusers_pipeline(pipe, full_qwen) if with_diffusers and full_qwen is not None else None
    diffusers_rows, diffusers_images, eager, results = {}, {}, {}, {}
    if ref is not None:
        for size in sizes:
            diffusers_rows[size], diffusers_images[size] = run_diffusers(ref, pipe, size, steps, repeats, False)
    rungs = rungs or LADDER
    last_bf16 = max((i for i, r in enumerate(rungs) if not r.fp8), default=None)
    without_vae = False
    for index, rung in enumerate(rungs):
        if without_vae:
            rung = replace(rung, vae_compile=False)
        elif rung.vae_compile and not budget.allows_optional():
            # Not judged, and a cold Inductor compile of the whole decoder: with the budget short, the
            # rungs after it run without it, so that the judged fp8 checks still fit.
            without_vae = True
            note = (f"{rung.name}: skipped ({budget.left():.0f} s left of the time budget); the rungs after it run "
                    f"without the VAE compile")
            logger.warning(note)
            if rows:
                rows[-1].notes.append(note)
            continue
        for size in sizes:
            row, result = run_ours(pipe, rung, size, steps, repeats, eager.get(size))
            results[rung.name, size] = result
            first_eager = size not in eager
            if first_eager:
                eager[size] = result
                row.psnr_db, row.latent_max_err = float("inf"), 0.0
            rows.append(row)
            if first_eager and size in diffusers_rows:  # the diffusers row, now with its parity
                diffusers_rows[size].psnr_db = psnr(diffusers_images[size], result["image"])
                rows.append(diffusers_rows[size])
                if size == sizes[0]:
                    measured("parity_db", diffusers_rows[size].psnr_db)
            before = results.get(("+compile", size))
            if rung.cuda_graphs and not rung.fp8 and before is not None and not rung.vae_compile \
                    and size == sizes[0]:
                # The same kernels, replayed from the graph instead of launched one by one.
                measured("graph_vs_compiled_rel_l2", rel_l2(result["latents"], before["latents"]))
                measured("graph_new_request", graph_new_request(pipe, size, steps))
                measured("cfg_under_graphs", cfg_under_graphs(pipe, size, steps))
                modes = optional("graph-mode timing", row.notes, budget,
                                 lambda: graph_mode_timing(pipe, size, steps, repeats))
                if modes is not None:
                    checks["graph_modes"] = modes
            if rung.fp8 and size == sizes[0]:
                checks["fp8_ladder_db"] = row.psnr_db
        if big_size is not None and index == last_bf16:
            notes: list[str] = []
            big = optional(f"the {big_size}x{big_size} row", notes, budget,
                           lambda: run_ours(pipe, rung, big_size, steps, 1)[0])
            if big is not None:
                big.notes.append("the big-size row: one timed run; cold_start_s includes any capture at this size")
                rows.append(big)
            elif rows:
                rows[-1].notes += notes
    if any(r.fp8 for r in rungs) and sizes[0] in eager:
        measured("fp8_quality_db", fp8_accumulation_quality(pipe, sizes[0], steps, eager[sizes[0]]))
    if ref is not None:
        for size in sizes:
            notes = []
            done = optional("diffusers compiled", notes, budget,
                            lambda: run_diffusers(ref, pipe, size, steps, repeats, True))
            if done is not None:
                row, images = done
                row.psnr_db = psnr(images, eager[size]["image"])
                rows.append(row)
            elif rows:
                rows[-1].notes += notes
    return list(rows), environment(pipe.device), checks


class _Rows(list):
    def __init__(self, on_row=None):
        super().__init__()
        self.on_row = on_row

    def append(self, row) -> None:
        super().append(row)
        if self.on_row is not None:
            self.on_row(row)


#: The judged checks, in the order the ladder measures them; the last three need CUDA graphs.
JUDGED = ("parity_db", "graph_vs_compiled_rel_l2", "graph_new_request", "cfg_under_graphs", "fp8_quality_db")
GPU_ONLY = ("graph_vs_compiled_rel_l2", "graph_new_request", "cfg_under_graphs")


def judge(name: str, checks: dict) -> list[str]:
    """The one-line verdicts (PASS ... / FAIL ...) of one judged check, "not measured" included."""
    size, value = checks.get("size"), checks.get(name)

    def line(ok: bool, text: str) -> str:
        return ("PASS " if ok else "FAIL ") + text

    if name == "parity_db":
        if value is None:
            return ["FAIL bf16 parity vs diffusers: not measured (diffusers missing or --no-diffusers)"]
        return [line(value >= PARITY_MIN_DB, f"bf16 parity vs diffusers at {size}x{size}: {value:.1f} dB PSNR "
                                             f"(needs >= {PARITY_MIN_DB:.0f} dB)")]
    if name == "fp8_quality_db":
        if value is None:
            return ["FAIL fp8 quality: not measured (no fp8 rung)"]
        return [line(db >= FP8_MIN_DB, f"fp8 quality ({kind.replace('_', ' ')}) vs bf16 at {size}x{size}: "
                                       f"{db:.1f} dB PSNR (needs >= {FP8_MIN_DB:.0f} dB)") for kind, db in value.items()]
    if name == "graph_vs_compiled_rel_l2":
        if value is None:
            return ["FAIL graph replay vs compiled eager: not measured (needs the compile and cuda_graphs rungs)"]
        return [line(value <= GRAPH_MAX_REL, f"graph replay vs compiled eager: relative L2 latent difference "
                                             f"{value:.3g} (needs <= {GRAPH_MAX_REL:g})")]
    if name == "graph_new_request":
        if value is None or not value["replayed"]:
            return ["FAIL a new request under CUDA graphs: not replayed (no captured graph ran a request it was "
                    "not captured on)"]
        return [line(value["rel_l2"] <= GRAPH_MAX_REL, f"a new request (other features and noise) replayed vs "
                                                       f"compiled eager: relative L2 latent difference "
                                                       f"{value['rel_l2']:.3g} (needs <= {GRAPH_MAX_REL:g})")]
    if name == "cfg_under_graphs":
        if value is None or not value["exercised"]:
            return ["FAIL CFG under CUDA graphs: not exercised (no guided step was captured and replayed)"]
        return [line(value["rel_l2"] <= GRAPH_MAX_REL, f"CFG under CUDA graphs vs compiled eager: relative L2 "
                                                       f"latent difference {value['rel_l2']:.3g} "
                                                       f"(needs <= {GRAPH_MAX_REL:g})")]
    raise ValueError(f"no judged check {name!r}; the checks are {JUDGED}")


def verdicts(checks: dict, gpu: bool) -> tuple[list[str], list[str]]:
    """(failures, passes) as one-line verdicts. On a GPU every check must have run; a CPU dry run
    requires the parity and fp8 checks only (no CUDA graphs there)."""
    lines = [text for name in JUDGED if gpu or name not in GPU_ONLY for text in judge(name, checks)]
    return [t for t in lines if t.startswith("FAIL")], [t for t in lines if t.startswith("PASS")]


REPORT_COLUMNS = ["engine", "rung", "size", "encode_s", "denoise_s", "step_s", "decode_s", "e2e_s", "cold_start_s",
                  "peak_mem_gib", "tflops", "floor_pct", "psnr_db", "latent_max_err"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def report(rows: list[Row], env: dict, checks: dict | None = None) -> str:
    """A readable table, then one JSON line (environment, rows, checks)."""
    head = f"{env.get('gpu')} | torch {env['torch']} | triton {env.get('triton')} | diffusers {env.get('diffusers')} | git {env.get('git_sha')}"
    lines = [head, " | ".join(REPORT_COLUMNS)]
    lines += [" | ".join(_fmt(getattr(r, c)) for c in REPORT_COLUMNS) for r in rows]
    lines.append(json.dumps(payload(rows, env, checks), default=str))
    return "\n".join(lines)


def payload(rows: list[Row], env: dict, checks: dict | None = None) -> dict:
    return {"env": env, "rows": [asdict(r) for r in rows], "checks": checks or {}}


def append_csv(row: Row, env: dict, out_dir: Path) -> None:
    """Append one row to ``out_dir/e2e.csv`` (with a header when the file is new), as the row is done."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "e2e.csv"
    new = not csv.exists()
    meta_keys = ("gpu", "driver", "torch", "triton", "git_sha")
    with open(csv, "a", encoding="utf-8") as f:
        if new:
            f.write(",".join([*meta_keys, *REPORT_COLUMNS]) + "\n")
        meta = [str(env.get(k)) for k in meta_keys]
        f.write(",".join(meta + [_fmt(getattr(row, c)).replace(",", ";") for c in REPORT_COLUMNS]) + "\n")


def write_json(rows: list[Row], env: dict, checks: dict | None, out_dir: Path) -> Path:
    """``out_dir/e2e.json``: this run's environment, rows and checks, rewritten whole (atomically) as
    each row or check is done, so an interrupted run leaves what it measured."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, part = out_dir / "e2e.json", out_dir / "e2e.json.part"
    part.write_text(json.dumps(payload(rows, env, checks), indent=1, default=str), encoding="utf-8")
    os.replace(part, path)
    return path
