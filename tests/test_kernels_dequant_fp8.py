"""zimage::dequantize_fp8 against its slow twin ``formats.fp8.dequantize_rows`` (plain PyTorch).

Runs on the GPU when there is one, else on the CPU with Triton's interpreter. The contract is bit
equality (NaN payloads aside) for every one of the 256 codes of e4m3fn and e5m2 (zeros of both
signs, subnormals, the largest values, inf and NaN), per-row scales, and fp32, bf16 and fp16
outputs. Then the ``kernels="triton"`` transform on an fp8 file's layers (``FP8StoredLinear``).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from zimage_native.accel import fused_ops, load_kernels  # noqa: E402
from zimage_native.formats.fp8 import dequantize_rows  # noqa: E402
from zimage_native.quant_linear import FP8StoredLinear  # noqa: E402

from .utils import OUT_DTYPE_IDS as DTYPE_IDS  # noqa: E402
from .utils import OUT_DTYPES as DTYPES  # noqa: E402
from .utils import assert_bits_equal  # noqa: E402

# The interpreter's fp16 cast of |x| > 65504 (inf, as torch gives) warns through numpy.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = load_kernels(interpret=DEVICE == "cpu")
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["e4m3fn", "e5m2"]


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit equality, NaN payloads aside."""
    assert_bits_equal(got, expected, what, nan_payloads=True)


def all_codes(rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Every byte value once, in ``rows`` rows, and a scale per row (one negative, one zero)."""
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE).reshape(rows, -1)
    scale = torch.rand(rows, 1, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 4
    scale[1], scale[2] = -0.37, 0.0
    return codes, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fp8", FP8, ids=FP8_IDS)
def test_every_code_equals_the_torch_twin(fp8, dtype):
    codes, scale = all_codes()
    got = torch.ops.zimage.dequantize_fp8(codes, scale, fp8 == torch.float8_e5m2, dtype)
    assert_same(got, dequantize_rows(codes, fp8, scale, dtype), f"{fp8} -> {dtype}")
    # the twin's values are the format's: signed zeros, subnormals, the largest value, inf / NaN
    values = dequantize_rows(codes, fp8, torch.ones_like(scale), torch.float32).flatten()
    assert values[0] == 0 and torch.signbit(values[128]) and values[128] == 0
    assert values[values.isfinite()].abs().max() == (448 if fp8 == torch.float8_e4m3fn else 57344)
    assert values.isinf().sum() == (0 if fp8 == torch.float8_e4m3fn else 2)


def test_many_programs_strided_rows_and_empty_inputs():
    wide = torch.randint(0, 256, (37, 3000), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    scale = torch.rand(37, 1).to(DEVICE)
    assert_same(torch.ops.zimage.dequantize_fp8(wide, scale, False, torch.bfloat16),
                dequantize_rows(wide, torch.float8_e4m3fn, scale, torch.bfloat16), "several programs")
    view = wide[:, 1000:2000]  # a slice of wider rows: row stride 3000
    assert not view.is_contiguous()
    assert_same(torch.ops.zimage.dequantize_fp8(view, scale, True, torch.float32),
                dequantize_rows(view.contiguous(), torch.float8_e5m2, scale, torch.float32), "strided rows")
    assert torch.ops.zimage.dequantize_fp8(wide[:0], scale[:0], False, torch.float32).shape == (0, 3000)


def test_bad_arguments_fail_with_the_op_name():
    codes, scale = all_codes()
    with pytest.raises(TypeError, match="zimage::dequantize_fp8: the codes must be uint8"):
        torch.ops.zimage.dequantize_fp8(codes.float(), scale, False, torch.float32)
    with pytest.raises(TypeError, match=r"the scales must be fp32 \(8, 1\)"):
        torch.ops.zimage.dequantize_fp8(codes, scale.flatten(), False, torch.float32)
    with pytest.raises(TypeError, match="output dtype"):
        torch.ops.zimage.dequantize_fp8(codes, scale, False, torch.float64)


def test_fake_implementation_under_compile():
    codes, scale = all_codes()
    fn = torch.compile(lambda c, s: torch.ops.zimage.dequantize_fp8(c, s, False, torch.bfloat16) * 2,
                       backend="eager", fullgraph=True)
    assert_same(fn(codes, scale), dequantize_rows(codes, torch.float8_e4m3fn, scale, torch.bfloat16) * 2, "compiled")


@pytest.mark.parametrize("fp8", FP8, ids=FP8_IDS)
@torch.no_grad()
def test_an_fp8_file_layer_with_the_kernel_equals_the_torch_one(fp8):
    g = torch.Generator().manual_seed(3)
    slow = FP8StoredLinear(64, 24, fp8, bias=True, device=DEVICE)
    slow.weight.copy_((torch.randn(24, 64, generator=g) * 8).to(fp8).view(torch.uint8))
    slow.scale.copy_(torch.rand(24, 1, generator=g) * 0.05)
    slow.bias.copy_(torch.randn(24, generator=g))
    fast = copy.deepcopy(slow)
    assert fused_ops.use_triton_dequant_(fast) == ["kernels: 1/1 FP8StoredLinear -> zimage::dequantize_fp8"]
    assert fast.dequantizer is fused_ops.triton_dequantize_fp8 and slow.dequantizer is dequantize_rows
    x = torch.randn(5, 64, generator=g).to(DEVICE, torch.bfloat16)
    kernels.reset_launch_counts()
    assert_same(fast(x), slow(x), "FP8StoredLinear forward")
    assert kernels.launch_counts() == {"dequantize_fp8": 1}
    assert fused_ops.use_torch_dequant_(fast) == 1 and fast.dequantizer is dequantize_rows


@torch.no_grad()
def test_an_fp8_dit_file_with_the_kernel_gives_the_same_output(tiny_model_dir, tmp_path):
    from zimage_native.loading import load_component
    from zimage_native.model.sequence import build_layout, pad_captions, patchify

    from .test_formats import TINY_AXES, comfy_dit, to_fp8, write

    def output(model):  # one DiT forward on fixed random inputs, on DEVICE
        g, cfg = torch.Generator().manual_seed(0), model.config
        latents = torch.randn(1, cfg.in_channels, 8, 8, generator=g).to(DEVICE)
        caption = [torch.randn(5, cfg.cap_feat_dim, generator=g).to(DEVICE)]
        layout = build_layout(cfg, [5], 8, 8, DEVICE)
        return model(patchify(latents, cfg.patch_size), pad_captions(caption, layout.caption_pad.shape[1]),
                     torch.tensor([0.3], device=DEVICE), layout)

    sd, _ = to_fp8(comfy_dit(tiny_model_dir, "", norm_final=False), True, "weight_scale", per_row=True)
    path = write(tmp_path / "fp8.safetensors", sd)
    slow = load_component("transformer", path, torch.float32, DEVICE, config=TINY_AXES, keep_fp8=True)
    fast = copy.deepcopy(slow)
    n = sum(isinstance(m, FP8StoredLinear) for m in fast.modules())
    assert fused_ops.use_triton_dequant_(fast) == [f"kernels: {n}/{n} FP8StoredLinear -> zimage::dequantize_fp8"]
    kernels.reset_launch_counts()
    assert torch.equal(output(fast), output(slow))
    assert kernels.launch_counts().get("dequantize_fp8", 0) >= n
