"""Build every Triton kernel launch of the engine for NVIDIA GPUs, on a machine without one.

Run as a script in a fresh process (``python tests/gpu_build_probe.py [FP8_TARGETS]``, not under
TRITON_INTERPRET; FP8_TARGETS, comma-separated, default sm90,sm120,sm89, are where the fp8 kernel is
built):
Triton's driver is replaced by a stand-in that reports a target GPU, and each launch compiles
(``warmup=True``: Triton's own argument specialisation, options and compiler, down to the cubin)
instead of running. The launches come from the real call sites at the released model's widths: a
DiT with the released config (one layer and one refiner of each kind; weights left uninitialised,
the GEMMs and attention stubbed since only the kernels' arguments matter) with every leaf swapped for
its Triton twin, the fp8 activation quantisation at the GEMM input widths, and the GGUF
dequantisation of every block type and of fp8 files' rows to bf16 (for sm90, sm75 and gfx1100). Prints one JSON line: per target, per launch, the
kernel, its constants, the warps, shared memory, registers and local memory (spills) per thread,
or the compile error.

The CPU interpreter runs the same kernels in the tests but forgives what a GPU build rejects
(types it cannot convert on that architecture, shapes a layout cannot take); this catches those.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

# (backend, architecture, threads per warp or wavefront): NVIDIA Hopper, consumer Blackwell, Ada, Ampere,
# Turing (T4, RTX 20xx: free notebook GPUs and older home cards); AMD CDNA3 (MI300) and RDNA3 (RX 7900)
TARGETS = {"sm90": ("cuda", 90, 32), "sm120": ("cuda", 120, 32), "sm89": ("cuda", 89, 32), "sm80": ("cuda", 80, 32),
           "sm75": ("cuda", 75, 32), "gfx942": ("hip", "gfx942", 64), "gfx1100": ("hip", "gfx1100", 32)}
FP8_TARGETS = ("sm90", "sm120", "sm89")  # fp8 tensor cores: the engine refuses fp8 below sm89 and on ROCm
DEQUANT_TARGETS = ("sm90", "sm75", "gfx1100")  # GGUF: the newest card, the oldest a GGUF user may have, AMD


class StandInDriver:
    """What Triton asks its driver for when it compiles without launching."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def model_launches() -> None:
    """One forward of a released-width DiT with every leaf on its Triton twin (1 + 1 + 1 blocks)."""
    import torch.nn.functional as F

    from zimage_native.accel import fused_ops
    from zimage_native.accel.fused_ops import TWINS, swap_leaf_
    from zimage_native.config import TransformerConfig
    from zimage_native.model.sequence import build_layout, pad_captions, patchify
    from zimage_native.model.transformer import ZImageTransformer

    cfg = dataclasses.replace(TransformerConfig(), n_layers=1, n_refiner_layers=1)
    with torch.device("meta"):
        model = ZImageTransformer(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    for leaf in TWINS:
        swap_leaf_(model, leaf)
    real_linear, real_sdpa = F.linear, F.scaled_dot_product_attention
    F.linear = lambda x, w, b=None: x.new_zeros(*x.shape[:-1], w.shape[0])
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: torch.zeros_like(q)
    try:
        layout = build_layout(cfg, [40], 8, 8)
        latents = torch.zeros(1, cfg.in_channels, 8, 8, dtype=torch.bfloat16)
        caption = [torch.zeros(40, cfg.cap_feat_dim, dtype=torch.bfloat16)]
        with torch.no_grad():
            model(patchify(latents, cfg.patch_size), pad_captions(caption, layout.caption_pad.shape[1]),
                  torch.tensor([0.5]), layout)
    finally:
        F.linear, F.scaled_dot_product_attention = real_linear, real_sdpa
    assert fused_ops  # the twins call the ops through torch.ops


def fp8_launches() -> None:
    cfg_dim, ffn = 3840, 10240  # the GEMM inputs: q|k|v, out and w1|w3 take dim, w2 takes the FFN width
    for width in (cfg_dim, ffn):
        torch.ops.zimage.quantize_fp8_rows(torch.zeros(48, width, dtype=torch.bfloat16))


def dequant_launches() -> None:
    from zimage_native.formats.ggml import block_info
    from zimage_native.kernels.dequant_ggml import KERNEL_TYPES

    for qtype in KERNEL_TYPES:
        block, size = block_info(qtype)
        raw = torch.zeros(64, 3840 // block * size, dtype=torch.uint8)
        torch.ops.zimage.dequantize_ggml(raw, qtype, torch.bfloat16)
    for e5m2 in (False, True):  # an fp8 file's weights, decoded with integer ops (no float8 type needed)
        torch.ops.zimage.dequantize_fp8(torch.zeros(64, 3840, dtype=torch.uint8), torch.ones(64, 1), e5m2,
                                        torch.bfloat16)


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) per thread of a cubin, and its fused multiply-adds
    (FFMA) and separate multiplies and adds, read by the cuobjdump and nvdisasm that ship with
    Triton's NVIDIA backend (the keys of a missing tool are left out)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out: dict = {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        if os.path.exists(os.path.join(tools, "cuobjdump")):
            text = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                                  text=True, check=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
            if found:
                out.update(registers=int(found[1]), stack=int(found[2]), local=int(found[3]))
        if os.path.exists(os.path.join(tools, "nvdisasm")):
            sass = subprocess.run([os.path.join(tools, "nvdisasm"), f.name], capture_output=True, text=True,
                                  check=True).stdout
            out.update({op.lower(): len(re.findall(rf"\b{op}\b", sass)) for op in ("FFMA", "FMUL", "FADD")})
    return out


def amd_resource_usage(asm: dict) -> dict:
    """Vector registers and scratch memory (spills) per lane, from the AMDGCN assembly's metadata."""
    import re

    vgprs = [int(v) for v in re.findall(r"\.vgpr_count:\s*(\d+)", asm["amdgcn"])]
    scratch = [int(v) for v in re.findall(r"\.private_segment_fixed_size:\s*(\d+)", asm["amdgcn"])]
    return {"registers": max(vgprs, default=0), "local": max(scratch, default=0)}


def jit_functions() -> list:
    import zimage_native.kernels as package
    from triton.runtime.jit import JITFunction

    modules = [m for name, m in sys.modules.items() if name.startswith(package.__name__ + ".")]
    return [v for m in modules for v in vars(m).values() if isinstance(v, JITFunction)]


def main(argv: list[str]) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from zimage_native.accel import load_kernels

    load_kernels(interpret=False)
    launches: list[dict] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        record = {"kernel": self.fn.__name__,
                  "constants": {k: v for k, v in kwargs.items() if k.isupper()}, "num_warps": kwargs.get("num_warps")}
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
            usage = resource_usage(kernel.asm["cubin"]) if "cubin" in kernel.asm else amd_resource_usage(kernel.asm)
            record.update(ok=True, shared=kernel.metadata.shared, arch=kernel.metadata.target.arch, **usage)
        except Exception as e:  # a GPU build the interpreter would have run
            record.update(ok=False, error=f"{type(e).__name__}: {' '.join(str(e).split())}"[-400:])
        launches.append(record)

    JITFunction.run = compile_only
    fp8_targets = argv[0].split(",") if argv else FP8_TARGETS
    out = {}
    from triton.backends import backends

    for name, (backend, arch, warp) in TARGETS.items():
        if {"cuda": "nvidia", "hip": "amd"}[backend] not in backends:  # a Triton build without it: left out
            continue
        driver.set_active(StandInDriver(GPUTarget(backend, arch, warp)))
        for kernel in jit_functions():  # each keeps its target and builds per device: start afresh
            kernel.device_caches.clear()
        launches.clear()
        model_launches()
        if name in fp8_targets:
            fp8_launches()
        if name in DEQUANT_TARGETS:
            dequant_launches()
        out[name] = list(launches)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
