"""The zimage:: ops inside graphs: torch.compile(fullgraph=True) on the CPU, CUDA-graph capture on a GPU.

On the CPU the kernels run in Triton's interpreter; what is tested is that Dynamo and Inductor
treat each op as one opaque node (their fake implementations give the right shapes and dtypes)
and that the compiled result equals eager.
"""

from __future__ import annotations

import copy

import pytest
import torch

from zimage_native.config import TransformerConfig
from zimage_native.model.sequence import build_layout, pad_captions, patchify
from zimage_native.model.transformer import ZImageTransformer

from zimage_native.testing import randomize_
from .dit_configs import TINY_DIT
from .utils import assert_rel

pytest.importorskip("triton")
from zimage_native.accel import load_kernels, optimize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")


def all_ops(x, y, w, scale, gate, q, k, wq, wk, cos, sin, gate_up, packed):
    h = torch.ops.zimage.rms_norm(x, w, 1e-5, scale)
    h = torch.ops.zimage.gated_rms_norm_residual(x, y + h, w, 1e-5, gate)
    q, k = torch.ops.zimage.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-5)
    a, b = gate_up.chunk(2, dim=-1)
    xq, xs = torch.ops.zimage.quantize_fp8_rows(x.flatten(0, 1))
    w8 = torch.ops.zimage.dequantize_ggml(packed, "Q8_0", x.dtype)  # 4 rows of 2 Q8_0 blocks
    # the same bytes as e4m3 codes (bit 3 and the sign cleared: no NaN code), a scale per row
    f8 = torch.ops.zimage.dequantize_fp8(packed & 0x77, torch.full((4, 1), 0.01, device=packed.device), False,
                                         x.dtype)
    return h * 2, q + k, torch.ops.zimage.silu_mul(a, b), xq.float() * xs, x[0] @ w8.T, f8 * 2


def op_inputs(dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    cos_sin = torch.rand(2, 2, 5, 4, generator=g).to(DEVICE)
    packed = torch.randint(0, 256, (4, 2, 34), generator=g, dtype=torch.uint8)
    packed[:, :, :2] = (torch.rand(4, 2, 1, generator=g) / 100).half().view(torch.uint8)  # finite fp16 scales
    return (r(2, 5, 64), r(2, 5, 64), 1 + r(64) / 10, r(2, 1, 64), r(2, 1, 64),
            r(2, 5, 3, 8), r(2, 5, 3, 8), 1 + r(8) / 10, 1 + r(8) / 10, cos_sin[0], cos_sin[1], r(2, 5, 66),
            packed.reshape(4, 68).to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ops_under_torch_compile_fullgraph_inductor(dtype):
    torch._dynamo.reset()
    inputs = op_inputs(dtype)
    expected = all_ops(*inputs)
    kernels.reset_launch_counts()
    compiled = torch.compile(all_ops, fullgraph=True, backend="inductor")
    got = compiled(*inputs)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert_rel(g, e, 1e-6 if dtype == torch.float32 else 1e-2, "compiled vs eager ops")
    assert all(kernels.launch_counts().get(op, 0) >= 1 for op in kernels.OPS), kernels.launch_counts()


@torch.no_grad()
def test_fused_transformer_compiles_without_graph_breaks():
    """The whole fused DiT (all four ops, the sdpa seam) as one graph: fullgraph=True raises on a break."""
    torch._dynamo.reset()
    config = TransformerConfig.from_dict(TINY_DIT)
    eager = randomize_(ZImageTransformer(config)).eval().to(DEVICE)
    fused = copy.deepcopy(eager)
    optimize(fused, kernels="triton")
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
    caps = [torch.randn(n, config.cap_feat_dim, generator=g) for n in (5, 40)]
    layout = build_layout(config, [5, 40], 8, 8, DEVICE)
    x, cap = patchify(latents).to(DEVICE), pad_captions(caps, layout.caption_pad.shape[1]).to(DEVICE)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert_rel(compiled(x, cap, t.to(DEVICE), layout), eager(x, cap, t.to(DEVICE), layout), 1e-5, "compiled fused DiT")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_ops_under_cuda_graph_capture():
    inputs = op_inputs(torch.bfloat16)
    expected = all_ops(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (Triton compiles) outside the capture
        all_ops(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = all_ops(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip(captured, expected):
        assert torch.equal(g, e)
