"""The attention seam: backend names, selection with mocked availability, the glue code of each
backend against stand-in libraries, sdpa parity, and real-library parity where a GPU allows it."""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch
from torch import nn

from zimage_native.accel import attention_backends as ab
from zimage_native.accel import optimize
from zimage_native.config import TransformerConfig, VAEConfig
from zimage_native.model.attention import attention as sdpa_reference
from zimage_native.model.sequence import build_layout
from zimage_native.model.transformer import ZImageTransformer
from zimage_native.model.vae import AutoencoderKL

from zimage_native.testing import randomize_
from .dit_configs import TINY_DIT
from .utils import assert_rel

CUDA = torch.device("cuda")
GPU_BACKENDS = ("flash_attn_2", "flash_attn_3", "sage", "xformers")


# ---------------------------------------------------------------- names and the environment
@pytest.mark.parametrize("name, expected", [("sdpa", "sdpa"), ("FA3", "flash_attn_3"), ("fa2", "flash_attn_2"),
                                            (" Auto ", "auto"), ("sageattention", "sage"), ("xformers", "xformers")])
def test_backend_names_and_aliases(name, expected):
    assert ab.canonical_name(name) == expected


def test_unknown_backend_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*'flash_attn_3'"):
        ab.canonical_name("flash")


def test_attention_from_env(monkeypatch):
    monkeypatch.delenv("ZIMAGE_ATTENTION", raising=False)
    assert ab.attention_from_env() == "sdpa"
    assert ab.attention_from_env(default="auto") == "auto"
    monkeypatch.setenv("ZIMAGE_ATTENTION", "fa3")
    assert ab.attention_from_env() == "flash_attn_3"
    monkeypatch.setenv("ZIMAGE_ATTENTION", "magic")
    with pytest.raises(ValueError, match="ZIMAGE_ATTENTION='magic'"):
        ab.attention_from_env()


# ---------------------------------------------------------------- selection with mocked availability
def mock_environment(monkeypatch, installed=(), capability=(9, 0)):
    """Pretend these backends import (flash_attn_2, flash_attn_3, sage, xformers) on a GPU of this capability."""
    modules = {ab.MODULES[name][0] for name in installed}

    def fake_import(names):
        hit = [n for n in names if n in modules]
        if hit:
            return types.ModuleType(hit[0])
        return f"import {names[0]}: ModuleNotFoundError: No module named {names[0]!r}"

    monkeypatch.setattr(ab, "_import", fake_import)
    monkeypatch.setattr(ab, "_capability", lambda device: capability)


@pytest.mark.parametrize(
    "installed, capability, dtype, expected",
    [
        pytest.param(GPU_BACKENDS, (9, 0), torch.bfloat16, "flash_attn_3", id="everything on Hopper: FA3"),
        pytest.param(GPU_BACKENDS, (8, 0), torch.bfloat16, "flash_attn_2", id="everything on Ampere: FA2"),
        pytest.param(("sage", "xformers"), (8, 9), torch.float16, "sage", id="no FlashAttention: Sage"),
        pytest.param(("xformers",), (8, 6), torch.bfloat16, "xformers", id="only xFormers"),
        pytest.param(GPU_BACKENDS, (9, 0), torch.float32, "xformers", id="fp32: only xFormers takes it"),
        pytest.param((), (9, 0), torch.bfloat16, "sdpa", id="nothing installed: SDPA"),
        pytest.param(GPU_BACKENDS, (7, 5), torch.float16, "xformers", id="Turing: FA and Sage need sm80"),
        pytest.param(GPU_BACKENDS, (7, 5), torch.bfloat16, "sdpa", id="Turing in bf16: xFormers needs sm80 too"),
    ],
)
def test_auto_picks_by_priority(monkeypatch, installed, capability, dtype, expected):
    mock_environment(monkeypatch, installed, capability)
    backend, line = ab.resolve_backend("auto", CUDA, dtype, 128)
    assert backend == expected
    assert line.startswith(f"attention backend: auto -> {expected}")


def test_auto_on_the_cpu_says_why_it_chose_sdpa(monkeypatch):
    mock_environment(monkeypatch, GPU_BACKENDS)
    backend, line = ab.resolve_backend("auto", torch.device("cpu"), torch.float32, 128)
    assert backend == "sdpa"
    assert "flash_attn_3: needs a CUDA GPU; the model is on cpu" in line


@pytest.mark.parametrize(
    "name, installed, capability, dtype, head_dim, reason",
    [
        ("flash_attn_3", GPU_BACKENDS, (8, 0), torch.bfloat16, 128, "needs a Hopper GPU"),
        ("flash_attn_2", (), (9, 0), torch.bfloat16, 128, "No module named 'flash_attn'"),
        ("flash_attn_2", GPU_BACKENDS, (9, 0), torch.float32, 128, "float16/bfloat16 only"),
        ("flash_attn_2", GPU_BACKENDS, (9, 0), torch.bfloat16, 512, "head dim <= 256"),
        ("sage", GPU_BACKENDS, (9, 0), torch.bfloat16, 256, "head dim 64, 96 or 128"),
        ("xformers", (), (9, 0), torch.float32, 128, "No module named 'xformers.ops'"),
        ("xformers", GPU_BACKENDS, (7, 5), torch.bfloat16, 128, "takes bfloat16 from sm80 only .*this is sm75"),
    ],
)
def test_explicit_unavailable_backend_raises_with_the_reason(monkeypatch, name, installed, capability, dtype,
                                                              head_dim, reason):
    mock_environment(monkeypatch, installed, capability)
    with pytest.raises(RuntimeError, match=f"attention backend '{name}' is not available: .*{reason}"):
        ab.resolve_backend(name, CUDA, dtype, head_dim)


def test_explicit_backend_on_the_cpu_raises():
    with pytest.raises(RuntimeError, match="'xformers' is not available: needs a CUDA GPU; the model is on cpu"):
        ab.resolve_backend("xformers", torch.device("cpu"), torch.float32, 128)


# ---------------------------------------------------------------- installing on a model
def tiny_dit():
    return randomize_(ZImageTransformer(TransformerConfig.from_dict(TINY_DIT))).eval()


def test_backend_is_set_on_dit_attention_only_never_the_vae(monkeypatch):
    vae_config = VAEConfig(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=16)
    both = nn.ModuleDict({"dit": tiny_dit(), "vae": AutoencoderKL(vae_config)})
    sentinel = object()
    monkeypatch.setattr(ab, "unavailable_reason", lambda *args: None)  # pretend xformers can run here
    monkeypatch.setitem(ab.FACTORIES, "xformers", lambda: sentinel)
    assert ab.set_attention_backend(both, "xformers") == "attention backend: xformers"
    dit_modules = ab.dit_attention_modules(both)
    assert len(dit_modules) == 4 and all(m.attn_fn is sentinel for m in dit_modules)
    vae_attn = [m for m in both["vae"].modules() if hasattr(m, "attn_fn")]
    assert vae_attn and all(m.attn_fn is sdpa_reference for m in vae_attn)


def test_auto_logs_its_choice_once(caplog):
    model = tiny_dit()
    with caplog.at_level(logging.INFO, logger="zimage_native.accel"):
        lines = optimize(model, attention="auto")
    assert lines[0].startswith("attention backend: auto -> sdpa")
    records = [r for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(records) == 1 and records[0].getMessage() == lines[0]


@torch.no_grad()
def test_sdpa_backend_is_the_eager_reference():
    model = tiny_dit()
    config = model.config
    layout = build_layout(config, [7, 40], 8, 10)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 32, 64, generator=g), torch.rand(2, generator=g)
    cap = torch.randn(2, layout.caption_pad.shape[1], config.cap_feat_dim, generator=g)
    before = model(x, cap, t, layout)
    assert optimize(model, attention="sdpa") == ["attention backend: sdpa"]
    assert all(m.attn_fn is sdpa_reference for m in ab.dit_attention_modules(model))
    assert torch.equal(model(x, cap, t, layout), before)


# ---------------------------------------------------------------- the glue code, against stand-in libraries
def naive_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(Dh)) v in the (B, L, H, Dh) layout of FlashAttention and xFormers."""
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


def lengths_to_mask(lengths, n):
    return torch.arange(n)[None, :] < lengths[:, None]


def fake_module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def seam_inputs():
    """(B, H, L, Dh) q, k, v and a prefix key mask as model.sequence builds them (batch padding at the tail)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 16, generator=g) for _ in range(3))
    return q, k, v, lengths_to_mask(torch.tensor([12, 7]), 12)


def install_fakes(monkeypatch):
    """Stand-ins of the four libraries in sys.modules; returns the log of their calls. The backend
    functions made from earlier stand-ins are forgotten (``ab.attention_function`` makes one per process)."""
    monkeypatch.setattr(ab, "_made", {})
    calls = []

    def fa_func(q, k, v):
        calls.append("flash_attn_func")
        return naive_attention(q, k, v)

    def fa3_func(q, k, v):
        return fa_func(q, k, v), None  # some FA3 builds return (out, lse)

    def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        calls.append("flash_attn_varlen_func")
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for i in range(len(bounds_q) - 1):  # item i: its query rows against its packed keys only
            sl_q, sl_k = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
            assert bounds_q[i + 1] - bounds_q[i] <= max_seqlen_q and bounds_k[i + 1] - bounds_k[i] <= max_seqlen_k
            outs.append(naive_attention(q[None, sl_q], k[None, sl_k], v[None, sl_k])[0])
        return torch.cat(outs)

    def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None):
        calls.append("flash_attn_varlen_func")
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == seqused_k.dtype == torch.int32
        b, n = len(cu_seqlens_q) - 1, max_seqlen_q
        assert torch.equal(cu_seqlens_q, torch.arange(0, (b + 1) * n, n, dtype=torch.int32)) and max_seqlen_k == n
        unflat = [t.unflatten(0, (b, n)) for t in (q, k, v)]
        return naive_attention(*unflat, lengths_to_mask(seqused_k, n)).flatten(0, 1), None

    def sageattn(q, k, v, tensor_layout, is_causal):
        assert tensor_layout == "HND" and not is_causal
        calls.append("sageattn")
        return naive_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def memory_efficient_attention(q, k, v, attn_bias=None):
        calls.append("memory_efficient_attention")
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
        if attn_bias is not None:
            assert attn_bias.shape == scores.shape
            alignment = 128 // torch.finfo(attn_bias.dtype).bits  # xFormers' check on a tensor bias
            assert all(attn_bias.stride(d) % alignment == 0 for d in range(attn_bias.ndim - 1)), attn_bias.stride()
            scores = scores + attn_bias
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)

    ops = fake_module("xformers.ops", memory_efficient_attention=memory_efficient_attention)
    for name, module in {
        "flash_attn": fake_module("flash_attn", flash_attn_func=fa_func, flash_attn_varlen_func=fa2_varlen),
        "flash_attn_interface": fake_module("flash_attn_interface", flash_attn_func=fa3_func,
                                            flash_attn_varlen_func=fa3_varlen),
        "sageattention": fake_module("sageattention", sageattn=sageattn),
        "xformers": fake_module("xformers", ops=ops),
        "xformers.ops": ops,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("masked", [False, True], ids=["no mask (batch 1)", "key-padding mask"])
def test_backend_glue_matches_sdpa(monkeypatch, name, masked):
    """Layouts, mask-to-lengths and the bias are right, checked against stand-ins of each library."""
    calls = install_fakes(monkeypatch)
    q, k, v, mask = seam_inputs()
    mask = mask if masked else None
    fn = ab.FACTORIES[name]()
    assert_rel(fn(q, k, v, mask), sdpa_reference(q, k, v, mask), 1e-6, f"{name} glue")
    expected_call = {
        "flash_attn_2": "flash_attn_varlen_func" if masked else "flash_attn_func",
        "flash_attn_3": "flash_attn_varlen_func" if masked else "flash_attn_func",
        "sage": None if masked else "sageattn",  # no key mask in SageAttention: masked calls use SDPA
        "xformers": "memory_efficient_attention",
    }[name]
    assert calls == ([expected_call] if expected_call else [])


@pytest.mark.parametrize("n_keys", [12, 13])
def test_xformers_bias_rows_stay_aligned(monkeypatch, n_keys):
    """xFormers rejects a tensor bias whose strides are not multiples of 16 bytes: with a key count
    that is not a multiple of 8 the bias must stay a slice of a padded allocation."""
    install_fakes(monkeypatch)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, n_keys, 16, generator=g) for _ in range(3))
    mask = lengths_to_mask(torch.tensor([n_keys, 7]), n_keys)
    assert_rel(ab.FACTORIES["xformers"]()(q, k, v, mask), sdpa_reference(q, k, v, mask), 1e-6, "xformers glue")


def test_pack_keys_puts_each_items_valid_keys_together_without_a_host_sync():
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(3, 5, 2, 4, generator=g) for _ in range(2))
    mask = lengths_to_mask(torch.tensor([5, 2, 3]), 5)
    kp, vp, cu = ab.pack_keys(k, v, mask)
    assert cu.tolist() == [0, 5, 7, 10] and cu.dtype == torch.int32 and kp.shape == (15, 2, 4)
    assert torch.equal(kp[:10], torch.cat([k[0], k[1, :2], k[2, :3]])) and torch.equal(vp[5:7], v[1, :2])
    assert torch.equal(kp[10:], torch.cat([k[1, 2:], k[2, 3:]]))  # the masked keys, after all valid ones


def test_layout_masks_are_key_prefixes():
    """What the FlashAttention paths rely on: the valid keys of each item are a prefix of the sequence."""
    config = TransformerConfig.from_dict(TINY_DIT)
    layout = build_layout(config, [3, 40, 70, 64], 8, 10, caption_tokens=128)
    for mask in (layout.caption_mask, layout.joint_mask):
        lengths = mask.sum(-1)
        assert torch.equal(mask, lengths_to_mask(lengths, mask.shape[1]))
    assert build_layout(config, [30], 8, 10).joint_mask is None  # batch 1: no mask is passed


# ---------------------------------------------------------------- the real libraries (GPU only)
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "key-padding mask"])
def test_gpu_backend_matches_sdpa(name, masked):
    device = CUDA if torch.cuda.is_available() else torch.device("cpu")
    reason = ab.unavailable_reason(name, device, torch.bfloat16, 128)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 30, 300, 128, generator=g).to(device, torch.bfloat16) for _ in range(3))
    mask = lengths_to_mask(torch.tensor([300, 213]), 300).to(device) if masked else None
    got = ab.FACTORIES[name]()(q, k, v, mask)
    tol = 5e-2 if name == "sage" else 2e-2  # SageAttention quantizes q and k to int8
    assert_rel(got[0], sdpa_reference(q, k, v, mask)[0], tol, f"{name} vs sdpa")
    if masked:  # the padded item: compare its valid query rows too
        assert_rel(got[1, :, :213], sdpa_reference(q, k, v, mask)[1, :, :213], tol, f"{name} vs sdpa (padded)")


def test_rocm_gfx_numbers_are_not_taken_for_cuda_capabilities(monkeypatch):
    """A ROCm build reports gfx versions as the capability (9.4 for MI300): FlashAttention 3 (Hopper
    only) and SageAttention (CUDA only) are refused by name, not let through on the numbers."""
    mock_environment(monkeypatch, GPU_BACKENDS, (9, 4))
    assert ab.unavailable_reason("flash_attn_3", CUDA, torch.bfloat16, 128) is None  # as CUDA numbers: "Hopper"
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    for name in ("flash_attn_3", "sage"):
        assert "needs an NVIDIA GPU" in ab.unavailable_reason(name, CUDA, torch.bfloat16, 128)
    assert ab.resolve_backend("auto", CUDA, torch.bfloat16, 128)[0] == "flash_attn_2"  # ROCm builds exist


# ---------------------------------------------------------------- SDPA with its math path only
@pytest.mark.parametrize("device, capability, dtype, math_only", [
    (CUDA, (7, 5), torch.bfloat16, True),  # T4, RTX 20xx
    (CUDA, (7, 0), torch.bfloat16, True),  # V100
    (CUDA, (7, 5), torch.float16, False),  # the memory-efficient kernel takes fp16 from sm50
    (CUDA, (7, 5), torch.float32, False),
    (CUDA, (8, 0), torch.bfloat16, False),
    (CUDA, (12, 0), torch.bfloat16, False),
    (torch.device("cpu"), (0, 0), torch.bfloat16, False),  # the CPU's fused kernel takes every dtype
])
def test_sdpa_math_only_where_no_fused_kernel_takes_bfloat16(monkeypatch, device, capability, dtype, math_only):
    monkeypatch.setattr(ab, "_capability", lambda d: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    reason = ab.sdpa_math_only(device, dtype)
    assert (reason is not None) == math_only
    if math_only:
        assert reason.startswith(f"sm{capability[0]}{capability[1]} in bfloat16: SDPA's fused kernels take bfloat16 "
                                 "from sm80 only")
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert ab.sdpa_math_only(device, dtype) is None  # ROCm's capability numbers are gfx versions


def _qkv(b=2, h=3, lq=50, lk=50, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["default", "math"])
def test_bounded_sdpa_is_sdpa(monkeypatch, masked, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv()
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 37:] = False
    mask = mask if masked else None
    monkeypatch.setattr(ab, "MATH_SCORE_BUDGET", 2 * 3 * 50 * 4 * 7)  # 7 query rows per slice: 8 slices
    context = sdpa_kernel([SDPBackend.MATH]) if backend == "math" else torch.enable_grad()
    with context:
        assert_rel(ab.bounded_sdpa(q, k, v, mask), sdpa_reference(q, k, v, mask), 1e-6)


def test_bounded_sdpa_holds_at_most_the_budget_of_scores(monkeypatch):
    """On the math path (forced on the CPU) the largest tensor of a bounded call is one slice's
    scores; plain SDPA holds all of them (the control)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
            return out

    q, k, v = _qkv(b=1, h=4, lq=256, lk=256, dtype=torch.bfloat16)
    budget = 1 * 4 * 256 * 4 * 32  # 32 query rows of fp32 scores
    monkeypatch.setattr(ab, "MATH_SCORE_BUDGET", budget)
    with sdpa_kernel([SDPBackend.MATH]):
        with Largest() as plain:
            sdpa_reference(q, k, v)
        with Largest() as bounded:
            ab.bounded_sdpa(q, k, v)
    assert plain.numel == 4 * 256 * 256 and bounded.numel == max(budget // 4, q.numel())


def test_pipelines_bound_sdpa_where_it_has_its_math_path_only(tiny_model_dir, tiny_pipe, monkeypatch):
    """The DiT's and the VAE's attention get the bounded variant on such a device (stood in for by
    the CPU here), the images stay the same, and moving to a device with fused kernels undoes it."""
    from zimage_native import ZImagePipeline

    monkeypatch.setattr(ab, "sdpa_math_only", lambda device, dtype: "stand-in")
    monkeypatch.setattr(ab, "MATH_SCORE_BUDGET", 4096)  # a few rows per slice at 64x64
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    modules = [m for m in (*pipe.transformer.modules(), *pipe.vae.modules()) if hasattr(m, "attn_fn")]
    assert len(modules) == len(pipe.transformer.layers) + 2 * pipe.transformer.config.n_refiner_layers + 2  # VAE: 2
    assert all(m.attn_fn is ab.bounded_sdpa for m in modules)
    run = dict(width=64, height=64, num_inference_steps=2, seed=3, output_type="np")
    assert_rel(torch.from_numpy(pipe("a cat", **run).images), torch.from_numpy(tiny_pipe("a cat", **run).images), 1e-5)
    optimize(pipe.transformer, attention="sdpa")  # installing SDPA again keeps it bounded
    assert pipe.transformer.layers[0].attention.attn_fn is ab.bounded_sdpa
    monkeypatch.undo()
    pipe.to("cpu")
    assert all(m.attn_fn is sdpa_reference for m in modules)


@pytest.mark.parametrize("asked", ["flash_attn_2", "auto on a T4", "kernels", "fp8 on a T4"])
def test_an_offloaded_dit_is_accelerated_for_the_gpu_it_runs_on(tiny_model_dir, monkeypatch, asked):
    """With offload="model" the DiT's weights rest in CPU memory and run on the GPU: the checks and
    choices of pipe.optimize are made for that GPU (stood in for by mocks), not for the CPU where
    the weights are between runs (they refused FlashAttention and the kernels as "on cpu", chose
    SDPA for "auto" without bounding it on a T4, and checked fp8 against the CPU's scaled_mm)."""
    from types import SimpleNamespace

    from zimage_native import ZImagePipeline
    from zimage_native.accel import AccelerationUnavailable
    from zimage_native.accel import fp8 as fp8_module
    from zimage_native.accel import fused_ops

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    pipe.placement["transformer"], pipe.offload = CUDA, "model"  # as from_pretrained(device="cuda", offload="model")
    modules = ab.dit_attention_modules(pipe.transformer)
    if asked == "flash_attn_2":
        mock_environment(monkeypatch, ("flash_attn_2",), (8, 6))
        sentinel = object()
        monkeypatch.setitem(ab.FACTORIES, "flash_attn_2", lambda: sentinel)
        assert pipe.optimize(attention="flash_attn_2") == ["attention backend: flash_attn_2"]
        assert all(m.attn_fn is sentinel for m in modules)
    elif asked == "auto on a T4":  # bfloat16 below sm80: SDPA has its math path only, bounded
        mock_environment(monkeypatch, (), (7, 5))
        lines = pipe.optimize(attention="auto")
        assert lines[0].startswith("attention backend: auto -> sdpa") and "on cpu" not in lines[0]
        assert all(m.attn_fn is ab.bounded_sdpa for m in modules)
    elif asked == "kernels":  # a GPU build of the kernels (not the interpreter), never run here
        built = SimpleNamespace(INTERPRETED=False, DEQUANT_TYPES=())
        monkeypatch.setattr(fused_ops, "load_kernels", lambda: built)
        mock_environment(monkeypatch, (), (9, 0))
        assert any("zimage::rms_norm" in line for line in pipe.optimize(kernels="triton"))
    else:
        monkeypatch.setattr(fp8_module, "cpu_rowwise_scaled_mm", lambda: True)  # the CPU could run it
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
        with pytest.raises(AccelerationUnavailable, match="Tesla T4 is sm75"):
            pipe.optimize(fp8=True)


@pytest.mark.parametrize("applied", ["flash_attn_2", "auto", "kernels"])
def test_moving_to_the_cpu_refuses_gpu_only_accelerations_or_chooses_again(tiny_model_dir, monkeypatch, applied):
    """pipe.to("cpu") after a GPU-only acceleration (stood in for by mocks, as above): an explicit
    GPU attention backend or the Triton kernels are refused with the reason before anything moves
    (they stayed installed and the next call failed inside the library); "auto" is chosen again
    for the CPU (SDPA)."""
    from types import SimpleNamespace

    from zimage_native import ZImagePipeline
    from zimage_native.accel import AccelerationUnavailable
    from zimage_native.accel import fused_ops

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    pipe.placement["transformer"], pipe.offload = CUDA, "model"  # as from_pretrained(device="cuda", offload="model")
    modules = ab.dit_attention_modules(pipe.transformer)
    mock_environment(monkeypatch, ("flash_attn_2",), (8, 6))
    sentinel = object()
    monkeypatch.setitem(ab.FACTORIES, "flash_attn_2", lambda: sentinel)
    if applied == "kernels":  # a GPU build of the kernels (not the interpreter), never run here
        monkeypatch.setattr(fused_ops, "load_kernels", lambda: SimpleNamespace(INTERPRETED=False, DEQUANT_TYPES=()))
        pipe.optimize(kernels="triton")
        with pytest.raises(AccelerationUnavailable, match=r"cannot run on cpu: kernels='triton' runs on a CUDA .*reload"):
            pipe.to("cpu")
        assert pipe.placement["transformer"] == CUDA and pipe.offload == "model"  # nothing moved
        return
    assert "flash_attn_2" in pipe.optimize(attention=applied)[0]
    assert all(m.attn_fn is sentinel for m in modules)
    if applied == "flash_attn_2":
        with pytest.raises(AccelerationUnavailable, match=r"'flash_attn_2' is not available: needs a CUDA GPU.*"
                                                          r"optimize\(attention='sdpa'\) first"):
            pipe.to("cpu")
        assert pipe.placement["transformer"] == CUDA and all(m.attn_fn is sentinel for m in modules)
        pipe.optimize(attention="sdpa")
    pipe.to("cpu")
    assert all(m.attn_fn is sdpa_reference for m in modules)
    assert pipe("a cat", width=32, height=32, num_inference_steps=1, output_type="latent").images.isfinite().all()
