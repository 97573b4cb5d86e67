"""benchmarks/time_breakdown.py (issue 12: "say where the time goes"): the CPU dry run's JSON, the
kernel-name categoriser on real CUDA kernel names, and the GPU analysis on a synthetic profile."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from .utils import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "time_breakdown.py"
tb = benchmark_script("time_breakdown")


def test_cpu_dry_run_writes_the_breakdown(tmp_path):
    pytest.importorskip("triton")  # the dry run's +compile rung runs the Triton kernels in the interpreter
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--size", "32", "--steps", "2",
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPU DRY RUN" in result.stdout and "| phase | wall ms |" in result.stdout
    assert re.search(r"time_breakdown: [0-9.]+ s after the build", result.stdout)
    data = json.loads((out / "time_breakdown.json").read_text())
    assert data["dry_run"] and "graph replay removes" in data["note"]
    assert data["settings"]["rung"] == {"name": "+compile", "kernels": "triton", "compile": "blocks",
                                        "cuda_graphs": False, "vae_compile": False, "fp8": False}
    assert data["settings"]["compile_backend"] == "eager"
    request = data["request"]
    assert list(request["categories"]) == list(tb.CATEGORIES)
    assert sum(c["pct"] for c in request["categories"].values()) == pytest.approx(100.0, abs=1e-6)
    assert request["categories"]["gemm"]["ms"] > 0 and request["categories"]["attention"]["ms"] > 0
    assert request["categories"]["engine_triton"]["ms"] > 0  # the rung's zimage:: ops ran
    assert 0 < request["kernel_ms"] <= request["wall_ms"]
    assert list(data["phases"]) == list(tb.PHASES)
    for name, phase in data["phases"].items():
        assert phase["wall_ms"] > 0 and phase["kernel_ms"] > 0, name
        assert sum(c["pct"] for c in phase["categories"].values()) == pytest.approx(100.0, abs=1e-6), name
    assert sum(p["kernel_ms"] for p in data["phases"].values()) == pytest.approx(request["kernel_ms"], rel=1e-6)
    phases = data["phases"]
    assert phases["denoise"]["categories"]["gemm"]["ms"] > 0 and phases["denoise"]["categories"]["engine_triton"]["ms"] > 0
    assert phases["decode"]["categories"]["vae_conv"]["ms"] > 0
    assert phases["encode"]["categories"]["vae_conv"]["ms"] == 0 == phases["denoise"]["categories"]["vae_conv"]["ms"]
    assert phases["encode"]["categories"]["engine_triton"]["ms"] == 0  # the text encoder is not swapped
    assert 0 < len(data["top_kernels"]) <= 15
    assert [k["ms"] for k in data["top_kernels"]] == sorted((k["ms"] for k in data["top_kernels"]), reverse=True)
    assert data["dit_gemm"]["tflop"] > data["dit_attention"]["tflop"] > 0 and data["dit_gemm"]["tflops"] > 0
    assert data["dit_gemm"]["floor_pct"] is None  # no comparison with a GPU figure in a dry run
    assert set(data["seconds"]) == {"build", "warm-up", "profiled request", "analysis", "after build"}
    assert data["unprofiled"]["e2e_s"] > 0


CUDA_KERNELS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": "gemm",
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)": "gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, void*, long, float*, int*)": "gemm",
    "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas_scaled_mm": "gemm",
    "triton_tem_fused_mm_0": "gemm",
    "flash_fwd_kernel": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)": "attention",
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, cute::tuple<cute::C<128>, cute::C<128>, cute::C<128> >, 128, cutlass::bfloat16_t, float, cutlass::arch::Sm90, false, false> > > >(flash::FlashAttnFwdSm90<...>::Params)": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0": "attention",
    "triton_poi_fused_add_mul_0": "inductor_triton",
    "triton_red_fused__to_copy_mean_pow_1": "inductor_triton",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_2": "inductor_triton",
    "Memcpy HtoD (Pageable -> Device)": "copy_memset",
    "Memcpy DtoD (Device -> Device)": "copy_memset",
    "Memset (Device)": "copy_memset",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::BFloat16)#1}> >(int, at::native::gpu_kernel_impl_nocast<...>)": "copy_memset",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>(...)": "copy_memset",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::BFloat16>, std::array<char*, 1ul> >(int, at::native::FillFunctor<c10::BFloat16>, std::array<char*, 1ul>)": "copy_memset",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, (cudnnKernelDataType_t)0>(cudnn::engines_precompiled::nchw2nhwc_params_t<float>, __nv_bfloat16 const*, __nv_bfloat16*)": "vae_conv",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_g1_execute_segment_k_off_kernel__5x_cudnn": "vae_conv",
    "void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>(int, int, int, float const*, int, float*, float const*, kernel_conv_params, unsigned long long, int, float, float, int, float const*, float const*, bool, int, int)": "vae_conv",
    "void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, false, 0, __nv_bfloat16, float>(cudnn::cnn::GroupedDirectFpropParams, __nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*, float, float, float const*, float const*)": "vae_conv",
    "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> > >(at::TensorIteratorBase&, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> > const&)::{lambda(int)#1}>(int, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> >)": "other",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, float>, unsigned int, float, 4> >(at::native::ReduceOp<float, at::native::MeanOps<float, float, float, float>, unsigned int, float, 4>)": "other",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_convert_kernel>(int)": "other",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16, float>(long, float, c10::BFloat16 const*, float*, float*)": "other",
}


@pytest.mark.parametrize("name", list(CUDA_KERNELS))
def test_kernel_names_land_in_their_category(name):
    assert tb.kernel_category(name) == CUDA_KERNELS[name]


def test_the_engine_kernels_are_the_ones_the_ops_launch():
    """ENGINE_KERNELS is every kernel that kernels/*.py launches, and each lands in engine_triton."""
    launched = set()
    for path in (ROOT / "kernels").glob("*.py"):
        launched |= set(re.findall(r"^\s*(\w+)\[(?:\(|grid)", path.read_text(), flags=re.M))
    assert launched == set(tb.ENGINE_KERNELS)
    for name in tb.ENGINE_KERNELS:
        assert tb.kernel_category(name) == "engine_triton"
        assert tb.kernel_category(name + "_0d1d2d3d") == "engine_triton"  # with a specialisation suffix


@pytest.mark.parametrize("name, category", [
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::linear", "gemm"), ("aten::bmm", "gemm"),
    ("aten::_scaled_mm", "gemm"), ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("zimage::rms_norm", "engine_triton"),
    ("zimage::qk_norm_rope", "engine_triton"), ("aten::mkldnn_convolution", "vae_conv"), ("aten::conv2d", "vae_conv"),
    ("aten::copy_", "copy_memset"), ("aten::fill_", "copy_memset"), ("aten::add", None), ("aten::empty", None),
])
def test_cpu_op_names(name, category):
    assert tb.cpu_op_category(name) == category


def _evt(name, device, start, end, thread=1, annotation=False, parent=None, self_us=None, activity=None):
    return SimpleNamespace(name=name, trace_name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                           thread=thread, is_user_annotation=annotation, cpu_parent=parent,
                           self_cpu_time_total=end - start if self_us is None else self_us, activity_type=activity)


def _ranges(device=DeviceType.CPU, **kw):
    r = tb.RANGE
    return [_evt(r + "request", device, 0, 1000, annotation=True, **kw),
            _evt(r + "encode", device, 0, 100, annotation=True, **kw),
            _evt(r + "denoise", device, 100, 900, annotation=True, **kw),
            _evt(r + "decode", device, 900, 1000, annotation=True, **kw)]


def test_gpu_analysis_of_a_synthetic_profile():
    """Kernels go to the phase whose range holds their start, the GPU copies of the annotations are
    not kernels, overlapping kernels count once in the busy time, and the shares add up."""
    cuda = DeviceType.CUDA
    events = _ranges() + [
        _evt("Torch-Compiled Region: 0/0", DeviceType.CPU, 120, 880, annotation=True),
        _evt("cudaLaunchKernel", DeviceType.CPU, 101, 102),  # host side: not a kernel
        _evt("Memcpy HtoD (Pageable -> Device)", cuda, 10, 20),
        _evt("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", cuda, 30, 90),
        _evt(tb.RANGE + "denoise", cuda, 100, 900, activity="gpu_user_annotation"),
        _evt("Torch-Compiled Region: 0/0", cuda, 120, 880),  # a GPU copy of an annotation (older torch)
        _evt("## Call CompiledFxGraph fabc ##", cuda, 121, 879),
        _evt("my_range", DeviceType.CPU, 130, 870, annotation=True),
        _evt("my_range", cuda, 130, 870),
        _evt("triton_poi_fused_add_mul_0", DeviceType.CPU, 699, 701, annotation=True),  # a kernel's CPU range
        _evt("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", cuda, 150, 450),
        _evt("flash_fwd_kernel", cuda, 400, 600),  # overlaps the GEMM by 50 us (another stream)
        _evt("_rms_norm_fwd_kernel", cuda, 600, 700),
        _evt("triton_poi_fused_add_mul_0", cuda, 700, 750),
        _evt("void cudnn::cnn::conv2d_grouped_direct_kernel<false>", cuda, 910, 990),
        _evt("flash_fwd_kernel", cuda, 1500, 1600),  # after the request: left out
    ]
    r = tb.analyse(events, gpu=True)
    assert r["kernel_ms"] == pytest.approx((10 + 60 + 300 + 200 + 100 + 50 + 80) / 1e3)
    assert r["busy_ms"] == pytest.approx(r["kernel_ms"] - 0.05)
    assert r["wall_ms"] == pytest.approx(1.0) and r["idle_pct"] == pytest.approx(100 * (1 - r["busy_ms"]))
    assert sum(c["pct"] for c in r["categories"].values()) == pytest.approx(100)
    assert {c: v["ms"] * 1e3 for c, v in r["categories"].items()} == pytest.approx(
        {"gemm": 360, "attention": 200, "engine_triton": 100, "inductor_triton": 50, "copy_memset": 10,
         "vae_conv": 80, "other": 0})
    p = r["phases"]
    assert p["encode"]["kernel_ms"] == pytest.approx(0.07) and p["encode"]["categories"]["gemm"]["ms"] == pytest.approx(0.06)
    assert p["denoise"]["kernel_ms"] == pytest.approx(0.65) and p["denoise"]["wall_ms"] == pytest.approx(0.8)
    assert p["decode"]["categories"]["vae_conv"]["pct"] == pytest.approx(100)
    top = r["top_kernels"]
    assert top[0]["name"].startswith("sm90_xmma_gemm") and top[1] == {
        "name": "flash_fwd_kernel", "category": "attention", "calls": 1, "ms": pytest.approx(0.2),
        "pct": pytest.approx(100 * 0.2 / r["kernel_ms"])}


def test_cpu_analysis_takes_the_category_of_the_nearest_categorised_caller():
    cpu = DeviceType.CPU
    linear = _evt("aten::linear", cpu, 10, 60, self_us=5)
    norm = _evt("zimage::rms_norm", cpu, 200, 300, self_us=80)
    events = _ranges() + [
        linear,
        _evt("aten::t", cpu, 11, 12, parent=linear),  # no category of its own: the GEMM's
        _evt("aten::addmm", cpu, 12, 59, parent=linear),
        norm,
        _evt("aten::empty", cpu, 210, 230, parent=norm),  # inside the engine op
        _evt("aten::add", cpu, 400, 410),  # no categorised caller: other
        _evt("aten::mm", cpu, 420, 430, thread=2),  # another thread: left out
    ]
    r = tb.analyse(events, gpu=False)
    ms = {c: v["ms"] * 1e3 for c, v in r["categories"].items()}
    assert ms == pytest.approx({"gemm": 5 + 1 + 47, "attention": 0, "engine_triton": 80 + 20, "inductor_triton": 0,
                                "copy_memset": 0, "vae_conv": 0, "other": 10})
    assert r["busy_ms"] == r["kernel_ms"] and r["phases"]["encode"]["categories"]["gemm"]["ms"] == pytest.approx(0.053)


def test_a_profile_without_the_ranges_is_an_error():
    with pytest.raises(RuntimeError, match="no range"):
        tb.analyse(_ranges()[:2], gpu=True)
