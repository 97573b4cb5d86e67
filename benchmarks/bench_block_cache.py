"""What a first-block-cache step costs next to a full DiT forward.

    python benchmarks/bench_block_cache.py                      # GPU: the released DiT, bf16, 1024x1024
    python benchmarks/bench_block_cache.py --smoke              # CPU plumbing check (a narrow DiT, 256x256)

The first-block cache (zimage_native/accel/block_cache.py) runs a step either in full or, when the
first main layer's residual barely changed, as the noise refiner, the first main layer and the
final layer plus one add. Whether a step is reused depends on the trained weights (random ones
here change too much from step to step); what a reused step costs does not. This times both kinds
of forward (p50 over --repeats, after a warm-up) on the released architecture with random weights,
so a run's time follows from its counts (``info["first_block_cache_forwards"]``, printed by
``zimage generate``): full x t_full + reused x t_reused. Markdown on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from zimage_native.accel.block_cache import FirstBlockCache  # noqa: E402
from zimage_native.bench import on_device  # noqa: E402
from zimage_native.config import TransformerConfig  # noqa: E402
from zimage_native.loading import build_on_meta  # noqa: E402
from zimage_native.model.sequence import build_layout, pad_captions, patchify  # noqa: E402
from zimage_native.model.transformer import ZImageTransformer  # noqa: E402


def p50_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure(config: TransformerConfig, size: int, caption: int, device: torch.device, dtype: torch.dtype,
            repeats: int) -> dict:
    torch.manual_seed(0)
    dit = on_device(build_on_meta(lambda: ZImageTransformer(config)), device, dtype, 1)  # random weights
    side = size // 8  # latent side
    layout = build_layout(config, [caption], side, side, device)
    cap = pad_captions([torch.randn(caption, config.cap_feat_dim, device=device, dtype=dtype)],
                       layout.caption_pad.shape[1])
    tokens = dit.encode_caption(cap, layout)
    x = patchify(torch.randn(1, config.in_channels, side, side, device=device, dtype=dtype), config.patch_size)
    mods = dit.modulations(dit.time_embedding(torch.tensor([0.5], device=device), dtype))

    full = p50_ms(lambda: dit.forward_tokens(x, tokens, None, layout, mods), device, repeats)
    cache = FirstBlockCache(float("inf"))  # every forward after the first reuses
    cache.forward(dit, "positive", x, tokens, layout, mods)
    reused = p50_ms(lambda: cache.forward(dit, "positive", x, tokens, layout, mods), device, repeats)
    assert cache.full == 1 and cache.reused == repeats + 1
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "size": size, "tokens": x.shape[1] + tokens.shape[1],
            "layers": config.n_layers, "dim": config.dim, "torch": torch.__version__,
            "full_ms": round(full, 3), "reused_ms": round(reused, 3), "ratio": round(full / reused, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, a narrow DiT with the released layer counts")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels [1024; --smoke 256]")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards of each kind [20; --smoke 5]")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        config = TransformerConfig(dim=256, n_heads=2, n_kv_heads=2, cap_feat_dim=64)  # 30 + 2 layers, head dim 128
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: use --smoke for the CPU check", file=sys.stderr)
            return 2
        device, dtype, config = torch.device("cuda"), torch.bfloat16, TransformerConfig()
    size = args.size or (256 if args.smoke else 1024)
    result = measure(config, size, 128, device, dtype, args.repeats or (5 if args.smoke else 20))
    print("| device | dtype | size | tokens | layers | full forward ms | reused forward ms | full / reused |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {result['device']} | {result['dtype']} | {size} | {result['tokens']} | {result['layers']} | "
          f"{result['full_ms']} | {result['reused_ms']} | {result['ratio']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
