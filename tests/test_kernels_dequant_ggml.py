"""zimage::dequantize_ggml against its slow twin ``formats.ggml.dequantize`` (plain PyTorch).

Runs on the GPU when there is one, else on the CPU with Triton's interpreter. The contract is bit
equality for every GGML block type and for fp32, bf16 and fp16 outputs: the same fp32 arithmetic on
the same integers, then one rounding. Blocks are random bytes with any finite fp16 scales, plus
blocks whose scales are the edge cases (signed zeros, the largest fp16, fp16 subnormals). Then the
``kernels="triton"`` transform: packed GGUF layers dequantise through the kernel, a GGUF DiT gives
the same output, and the swap can be undone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from zimage_native.accel import fused_ops, load_kernels, optimize  # noqa: E402
from zimage_native.formats.ggml import QUANT_TYPES, block_info, dequantize  # noqa: E402
from zimage_native.loading import load_component  # noqa: E402
from zimage_native.model.sequence import build_layout, pad_captions, patchify  # noqa: E402
from zimage_native.quant_linear import GGUFEmbedding, GGUFLinear  # noqa: E402

from .gguf_files import SCALE_FIELDS, random_blocks  # noqa: E402
from .utils import OUT_DTYPE_IDS as DTYPE_IDS  # noqa: E402
from .utils import OUT_DTYPES as DTYPES  # noqa: E402
from .utils import assert_bits_equal, assert_rel, needs_probe_triton  # noqa: E402

# The interpreter's fp16 cast of |x| > 65504 (inf, as torch gives) warns through numpy.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")
KERNEL_TYPES = tuple(kernels.DEQUANT_TYPES)  # (the IQ types have none: the torch twin runs)

# fp16 bit patterns of edge-case scales: +0, -0, the largest finite (+-65504), the smallest
# subnormals (+-2^-24), the smallest normal, 1.0.
EDGE_SCALES = np.array([0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x0400, 0x3C00], dtype=np.uint16)


def packed_rows(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> torch.Tensor:
    """Random packed rows with any finite fp16 scales; the first blocks get the edge-case scales."""
    rng = np.random.default_rng(seed + sum(map(ord, qtype)))
    block, size = block_info(qtype)
    raw = random_blocks(qtype, rows, blocks_per_row * block, rng, magnitude=False)
    blocks = raw.reshape(-1, size)
    n_edge = min(len(EDGE_SCALES), blocks.shape[0])
    for k, off in enumerate(SCALE_FIELDS[qtype][0]):
        edge = np.roll(EDGE_SCALES, k)[:n_edge]  # d and dmin get different edge values in one block
        blocks[:n_edge, off:off + 2] = edge.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.copy()).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_dequantize_ggml_equals_the_torch_twin(qtype, dtype):
    raw = packed_rows(qtype, rows=5, blocks_per_row=3 if block_info(qtype)[0] == 256 else 9)
    got = torch.ops.zimage.dequantize_ggml(raw, qtype, dtype)
    assert got.is_contiguous()
    assert_bits_equal(got, dequantize(raw, qtype, dtype), f"{qtype} -> {dtype}")


@pytest.mark.parametrize("qtype", ["Q5_1", "Q2_K"])
def test_many_programs_and_a_partial_last_tile(qtype, monkeypatch):
    """Small tiles (as on the GPU): 11 rows x 3 blocks over programs of 4 blocks, the last one partial."""
    from zimage_native.kernels import dequant_ggml

    monkeypatch.setattr(dequant_ggml, "_TILE", 4 * block_info(qtype)[0])
    raw = packed_rows(qtype, rows=11, blocks_per_row=3, seed=5)
    assert_bits_equal(torch.ops.zimage.dequantize_ggml(raw, qtype, torch.float32), dequantize(raw, qtype),
                      f"{qtype} in 9 programs")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_strided_rows_are_read_in_place_and_empty_inputs(qtype):
    _, size = block_info(qtype)
    raw = packed_rows(qtype, rows=4, blocks_per_row=3)
    view = raw[1:, size:]  # rows of a wider tensor: row stride 3 blocks, 2 blocks per row
    assert not view.is_contiguous()
    assert_bits_equal(torch.ops.zimage.dequantize_ggml(view, qtype, torch.bfloat16),
                      dequantize(view, qtype, torch.bfloat16), f"{qtype} strided rows")
    empty = torch.ops.zimage.dequantize_ggml(raw[:0], qtype, torch.float32)
    assert empty.shape == (0, dequantize(raw[:1], qtype).shape[1])


def test_bad_arguments_fail_with_the_op_name():
    raw = packed_rows("Q4_0", rows=2, blocks_per_row=1)
    with pytest.raises(ValueError, match="no kernel for GGML type 'F16'"):
        torch.ops.zimage.dequantize_ggml(raw, "F16", torch.float32)
    with pytest.raises(ValueError, match="multiple of 18 bytes"):
        torch.ops.zimage.dequantize_ggml(raw[:, :17], "Q4_0", torch.float32)
    with pytest.raises(TypeError, match="output dtype"):
        torch.ops.zimage.dequantize_ggml(raw, "Q4_0", torch.float64)


def test_fake_implementation_under_compile():
    raw = packed_rows("Q5_K", rows=2, blocks_per_row=1)
    fn = torch.compile(lambda r: torch.ops.zimage.dequantize_ggml(r, "Q5_K", torch.bfloat16) * 2, backend="eager",
                       fullgraph=True)
    assert_bits_equal(fn(raw), dequantize(raw, "Q5_K", torch.bfloat16) * 2, "compiled Q5_K")


# ----------------------------------------------------------------------------- packed layers


def packed_linear(qtype: str, out_f: int = 24, in_f: int = 512, bias: bool = True) -> GGUFLinear:
    layer = GGUFLinear(in_f, out_f, qtype, bias=bias, device=DEVICE)
    layer.weight.copy_(packed_rows(qtype, out_f, in_f // block_info(qtype)[0]))
    if bias:
        layer.bias.copy_(torch.randn(out_f, generator=torch.Generator().manual_seed(1)))
    return layer


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
@torch.no_grad()
def test_gguf_linear_with_the_kernel_equals_the_torch_one(qtype, dtype):
    slow = packed_linear(qtype)
    fast = copy.deepcopy(slow)
    assert fused_ops.use_triton_dequant_(fast) == ["kernels: 1/1 GGUFLinear -> zimage::dequantize_ggml"]
    assert fast.dequantizer is fused_ops.triton_dequantize and slow.dequantizer is dequantize
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    kernels.reset_launch_counts()
    got = fast(x)
    assert kernels.launch_counts() == {"dequantize_ggml": 1}
    assert_bits_equal(got, slow(x), f"GGUFLinear {qtype} {dtype}")
    assert fused_ops.use_torch_dequant_(fast) == 1 and fast.dequantizer is dequantize
    kernels.reset_launch_counts()
    assert_bits_equal(fast(x), slow(x), "after the undo")
    assert kernels.launch_counts() == {}


@torch.no_grad()
def test_gguf_linear_with_the_kernel_compiles_in_one_graph():
    """Dynamo traces the dequantizer seam (fullgraph: no break) and keeps the op; same bits as eager."""
    layer = packed_linear("Q4_K")
    fused_ops.use_triton_dequant_(layer)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    torch._dynamo.reset()
    kernels.reset_launch_counts()
    assert_bits_equal(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x), "compiled GGUFLinear")
    assert kernels.launch_counts()["dequantize_ggml"] == 2


@torch.no_grad()
def test_gguf_embedding_with_the_kernel_equals_the_torch_one():
    slow = GGUFEmbedding(40, 256, "Q6_K", dtype=torch.bfloat16, device=DEVICE)
    slow.weight.copy_(packed_rows("Q6_K", 40, 1))
    fast = copy.deepcopy(slow)
    assert fused_ops.use_triton_dequant_(fast) == ["kernels: 1/1 GGUFEmbedding -> zimage::dequantize_ggml"]
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]], device=DEVICE)
    kernels.reset_launch_counts()
    got = fast(ids)
    assert got.shape == (2, 3, 256) and kernels.launch_counts() == {"dequantize_ggml": 1}
    assert_bits_equal(got, slow(ids), "GGUFEmbedding Q6_K")


def test_float_types_and_cpu_rows_without_the_interpreter_use_the_twin(monkeypatch):
    fused_ops.use_triton_dequant_(torch.nn.Identity())  # fills the kernel table
    raw = torch.randn(3, 32).to(torch.float16).view(torch.uint8).to(DEVICE)
    kernels.reset_launch_counts()
    assert torch.equal(fused_ops.triton_dequantize(raw, "F16", torch.float32), dequantize(raw, "F16"))
    assert kernels.launch_counts() == {}
    monkeypatch.setitem(fused_ops._state, "interpreted", False)
    cpu = packed_rows("Q4_K", 2, 1).cpu()
    assert torch.equal(fused_ops.triton_dequantize(cpu, "Q4_K", torch.float32), dequantize(cpu, "Q4_K"))
    assert kernels.launch_counts() == {}


# ----------------------------------------------------------------------------- a GGUF DiT


def dit_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    latents = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    caption = [torch.randn(5, cfg.cap_feat_dim, generator=g)]
    layout = build_layout(cfg, [5], 8, 8, DEVICE)
    with torch.no_grad():
        return model(patchify(latents, cfg.patch_size).to(DEVICE),
                     pad_captions(caption, layout.caption_pad.shape[1]).to(DEVICE), torch.tensor([0.3], device=DEVICE),
                     layout)


def test_kernels_transform_on_a_mixed_gguf_dit(tmp_path):
    """Every block type in one file. The dequant swap alone gives the same bits; the whole
    kernels="triton" transform stays within the kernel swaps' tolerance (rel err <= 1e-5, fp32)."""
    pytest.importorskip("gguf")  # to write the file (the other tests here need no gguf package)
    from .test_gguf import AXES, write_dit

    linears = iter(range(1000))

    def types(name, i):  # every block type in turn over the linear weights, the rest in F32
        # (cap_embedder.0 is the caption RMSNorm: 1-D, it would fall back to F32 and drop a type)
        if name.endswith(".weight") and "norm" not in name and name not in ("x_embedder.weight",
                                                                             "cap_embedder.0.weight"):
            return QUANT_TYPES[next(linears) % len(QUANT_TYPES)]
        return "F32"

    path, _ = write_dit(tmp_path / "mixed.gguf", types)
    eager = load_component("transformer", path, torch.float32, DEVICE, config=AXES)
    packed = [m for m in eager.modules() if isinstance(m, GGUFLinear)]
    assert {m.qtype for m in packed} == set(QUANT_TYPES)
    on_kernel = [m for m in packed if m.qtype in KERNEL_TYPES]  # the types without one stay on the twin
    assert 0 < len(on_kernel) < len(packed)
    line = f"kernels: {len(on_kernel)}/{len(packed)} GGUFLinear -> zimage::dequantize_ggml"
    expected = dit_output(eager)

    swapped = copy.deepcopy(eager)
    assert fused_ops.use_triton_dequant_(swapped) == [line]
    kernels.reset_launch_counts()
    assert torch.equal(dit_output(swapped), expected)
    assert kernels.launch_counts() == {"dequantize_ggml": len(on_kernel)}

    fused = copy.deepcopy(eager)
    lines = optimize(fused, kernels="triton")
    assert line in lines
    assert all(m.dequantizer is fused_ops.triton_dequantize for m in fused.modules() if isinstance(m, GGUFLinear))
    kernels.reset_launch_counts()
    assert_rel(dit_output(fused), expected, 1e-5, "GGUF DiT with kernels='triton'")
    assert kernels.launch_counts()["dequantize_ggml"] == len(on_kernel)


FMA_PROBE = """
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from zimage_native.accel import load_kernels
load_kernels(interpret=False)  # a plain build (this process never saw TRITON_INTERPRET)
from zimage_native.kernels import dequant_ggml as dq

nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
if not os.path.exists(nvdisasm):
    print(json.dumps(None)); sys.exit()
kind, block, size = dq.KERNEL_TYPES[sys.argv[1]]
src = ASTSource(dq._dequant_ggml_kernel, constexprs={"KIND": kind, "BLOCK": block, "TYPE_SIZE": size, "BLOCK_B": 16},
                signature={"src": "*u8", "out": "*bf16", "n_blocks": "i32", "blocks_per_row": "i32", "stride_row": "i32",
                           "KIND": "constexpr", "BLOCK": "constexpr", "TYPE_SIZE": "constexpr", "BLOCK_B": "constexpr"})
counts = {}
for fusion in (True, False):
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={**dq.LAUNCH_OPTIONS, "enable_fp_fusion": fusion}).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, f.name], capture_output=True, text=True, check=True).stdout
    counts["launch" if fusion == dq.LAUNCH_OPTIONS["enable_fp_fusion"] else "fused"] = {
        op: sass.count(op) for op in ("FFMA", "FMUL", "FADD")}
print(json.dumps(counts))
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the bit-equality tests above run the real build")
@needs_probe_triton
def test_the_gpu_build_does_not_contract_into_fma():
    """The interpreter cannot see fma contraction (``ds * q - dm`` rounded once instead of twice),
    which would break bit equality on a GPU. Compile the Q4_K kernel for sm_90 with the launch's
    options (no GPU needed) in a fresh process and read its SASS: no FFMA, where the default
    (contracting) build has them."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", FMA_PROBE, "Q4_K"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    if counts is None:
        pytest.skip("this Triton build has no NVIDIA backend tools")
    assert counts["fused"]["FFMA"] > 0  # the check can fail: a contracting build is caught
    assert counts["launch"]["FFMA"] == 0 and counts["launch"]["FMUL"] > 0 and counts["launch"]["FADD"] > 0, counts
