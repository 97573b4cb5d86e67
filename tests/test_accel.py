"""accel.optimize and the kernel swaps: what they replace, that outputs stay at parity, clear errors.

The kernels run on the GPU when there is one, else in Triton's CPU interpreter. Tests that need
Triton are skipped (with the reason) where it is not installed; the others check that case.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zimage_native.config import TransformerConfig
from zimage_native.model.sequence import build_layout, pad_captions, patchify
from zimage_native.model.transformer import ZImageTransformer

from zimage_native.testing import randomize_
from .dit_configs import REAL_HEADS_DIT, TINY_DIT
from .utils import assert_rel

from zimage_native.accel import _kernels, fused_ops, load_kernels, optimize
from zimage_native.accel.fusions import fuse_projections_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET_ENV = os.environ.get("TRITON_INTERPRET")
HAS_TRITON = importlib.util.find_spec("triton") is not None
kernels = load_kernels(interpret=DEVICE == "cpu") if HAS_TRITON else None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
REPO = Path(__file__).resolve().parents[1]


def tiny_dit(kwargs=TINY_DIT):
    config = TransformerConfig.from_dict(kwargs)
    return randomize_(ZImageTransformer(config)).eval().to(DEVICE), config


def dit_inputs(config, cap_lens=(7, 40), size=(10, 14)):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(cap_lens), 16, *size, generator=g)
    caps = [torch.randn(n, config.cap_feat_dim, generator=g) for n in cap_lens]
    layout = build_layout(config, list(cap_lens), *size, DEVICE)
    cap = pad_captions(caps, layout.caption_pad.shape[1])
    return patchify(latents).to(DEVICE), cap.to(DEVICE), torch.rand(len(cap_lens), generator=g).to(DEVICE), layout


@needs_triton
def test_interpreter_choice_does_not_leak_into_the_environment():
    assert os.environ.get("TRITON_INTERPRET") == INTERPRET_ENV
    assert kernels.INTERPRETED == (DEVICE == "cpu")


def test_optimize_none_changes_nothing_but_the_backend_line():
    model, _ = tiny_dit()
    before = [type(m) for m in model.modules()]
    assert optimize(model) == ["attention backend: sdpa"]
    assert [type(m) for m in model.modules()] == before


@needs_triton
def test_optimize_triton_reports_every_fusion_and_keeps_the_state_dict():
    model, _ = tiny_dit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lines = optimize(model, kernels="triton")
    # TINY_DIT: 1 noise refiner + 1 context refiner + 2 layers = 4 blocks, and the caption norm.
    assert lines == [
        "fused GEMMs: q|k|v in 4 attention modules, w1|w3 in 4 feed-forwards",
        "kernels: 9/9 RMSNorm -> zimage::rms_norm",
        "kernels: 8/8 ModulatedRMSNorm -> zimage::rms_norm",
        "kernels: 8/8 PostNormResidual -> zimage::gated_rms_norm_residual",
        "kernels: 4/4 QKNormRoPE -> zimage::qk_norm_rope",
        "kernels: 4/4 SwiGLU -> zimage::silu_mul",
        "attention backend: sdpa",
    ]
    assert not any(type(m) in fused_ops.TWINS for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert optimize(model, kernels="triton") == lines[1:]  # idempotent: nothing is fused or swapped twice


def test_released_config_swaps_every_leaf():
    """Counted on a meta-device model (no memory): 34 blocks, the caption embedder's norm."""
    with torch.device("meta"):
        model = ZImageTransformer(TransformerConfig())
    for leaf in fused_ops.TWINS:
        fused_ops.swap_leaf_(model, leaf)
    assert fused_ops.count_fused(model) == {
        "RMSNorm": (69, 69), "ModulatedRMSNorm": (68, 68), "PostNormResidual": (68, 68), "QKNormRoPE": (34, 34),
        "SwiGLU": (34, 34),
    }


def swap_one(leaf):
    def swap(model):
        fused_ops.swap_leaf_(model, leaf)
    swap.__name__ = f"swap {leaf.__name__}"
    return swap


@needs_triton
@pytest.mark.parametrize(
    "swap", [*(swap_one(leaf) for leaf in fused_ops.TWINS), fused_ops.use_fused_kernels, fuse_projections_],
    ids=lambda f: f.__name__,
)
@torch.no_grad()
def test_each_swap_alone_keeps_the_dit_at_parity(swap):
    """fp32, real head geometry (Dh 128, axes 32/48/48), a masked batch: rel err <= 1e-5 vs eager."""
    eager, config = tiny_dit(REAL_HEADS_DIT)
    fused = copy.deepcopy(eager)
    swap(fused)
    inputs = dit_inputs(config, cap_lens=(9, 45), size=(6, 10))
    kernels.reset_launch_counts()
    assert_rel(fused(*inputs), eager(*inputs), 1e-5, f"DiT after {swap.__name__}")
    assert (sum(kernels.launch_counts().values()) > 0) == (swap is not fuse_projections_)


@needs_triton
def test_pipeline_with_triton_kernels_matches_diffusers(tiny_model_dir, reference_pipe):
    """The whole sampler with kernels="triton", fp32, against diffusers: final latents rel err <= 1e-5."""
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device=DEVICE, dtype=torch.float32)  # a private copy
    optimize(pipe.transformer, kernels="triton")
    prompts = ["a cat", "a watercolor painting of mountains at dawn, soft light, mist over the lake and more"]
    steps = 3
    expected = reference_pipe(list(prompts), height=64, width=96, num_inference_steps=steps, guidance_scale=0.0,
                              generator=torch.Generator().manual_seed(0), output_type="latent").images
    kernels.reset_launch_counts()
    got = pipe(list(prompts), height=64, width=96, num_inference_steps=steps, seed=0, output_type="latent",
               progress=False).images
    assert_rel(got, expected, 1e-5, "final latents with kernels='triton'")
    # Proof that the kernels ran: every step runs TINY_DIT's 3 modulated blocks (1 noise refiner + 2
    # main), each launching 2 rms_norm, 2 gated residuals, 1 qk_norm_rope and 1 silu_mul (the caption
    # path adds its own, once per request or once per step depending on caching).
    counts = kernels.launch_counts()
    per_block = {"rms_norm": 2, "gated_rms_norm_residual": 2, "qk_norm_rope": 1, "silu_mul": 1}
    assert all(counts.get(op, 0) >= n * 3 * steps for op, n in per_block.items()), counts


@needs_triton
def test_bad_arguments_fail_before_the_model_is_touched():
    model, _ = tiny_dit()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        optimize(model, kernels="cuda")
    with pytest.raises(ValueError, match="unknown attention backend"):
        optimize(model, kernels="triton", attention="flash")
    with pytest.raises(RuntimeError, match="'flash_attn_3' is not available: needs a CUDA GPU|transformer is on cpu"):
        optimize(model.cpu(), kernels="triton", attention="flash_attn_3")
    assert [type(m) for m in model.modules()] == before


def test_triton_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.delitem(sys.modules, _kernels.NAME, raising=False)  # as if never imported (restored afterwards)
    monkeypatch.setattr(_kernels, "triton_unavailable_reason", lambda: "the triton package is not installed")
    model, _ = tiny_dit()
    with pytest.raises(RuntimeError, match="kernels='triton' needs Triton: the triton package is not installed"):
        optimize(model, kernels="triton")


@needs_triton
def test_cpu_model_without_the_interpreter_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    model, _ = tiny_dit()
    with pytest.raises(RuntimeError, match="runs on a CUDA .* GPU, but the transformer is on cpu"):
        optimize(model.cpu(), kernels="triton")


def test_import_and_default_path_work_without_triton():
    """A fresh interpreter where `import triton` fails: the package imports, kernels='none' works,
    kernels='triton' raises with the install hint."""
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, zimage_native, zimage_native.accel as accel
        from zimage_native.config import TransformerConfig
        from zimage_native.model.transformer import ZImageTransformer
        from tests.dit_configs import TINY_DIT
        model = ZImageTransformer(TransformerConfig.from_dict(TINY_DIT))
        assert accel.optimize(model) == ["attention backend: sdpa"]
        try:
            accel.optimize(model, kernels="triton")
        except RuntimeError as e:
            print("ERROR:", e)
        assert "triton" not in sys.modules or sys.modules["triton"] is None
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERROR: kernels='triton' needs Triton" in result.stdout and "pip install" in result.stdout


@needs_triton
def test_lora_after_the_fused_gemms_reaches_them(tiny_model_dir):
    """q|k|v and w1|w3 become views of fused buffers; a LoRA fused afterwards (in place) must change
    the fused GEMMs exactly as it changes the eager model."""
    from safetensors.torch import save_file

    from zimage_native import ZImagePipeline

    def pipe():
        p = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
        p.progress = False
        return p

    w = pipe().transformer.layers[0].attention.to_k.weight
    g = torch.Generator().manual_seed(0)
    lora = {"transformer.layers.0.attention.to_k.lora_A.weight": torch.randn(4, w.shape[1], generator=g),
            "transformer.layers.0.attention.to_k.lora_B.weight": torch.randn(w.shape[0], 4, generator=g),
            "transformer.layers.1.feed_forward.w3.lora_A.weight": torch.randn(4, w.shape[1], generator=g),
            "transformer.layers.1.feed_forward.w3.lora_B.weight": torch.randn(170, 4, generator=g)}
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lora-fused-{os.getpid()}.safetensors"
    save_file(lora, path)
    try:
        kw = dict(width=32, height=32, num_inference_steps=2, seed=0, output_type="latent")
        eager = pipe()
        eager.load_lora(str(path))
        fused = pipe()
        optimize(fused.transformer, kernels="triton")
        before = fused("a cat", **kw).images
        fused.load_lora(str(path))
        after = fused("a cat", **kw).images
        assert_rel(after, eager("a cat", **kw).images, 1e-5)
        assert (after - before).abs().max() > 1e-3
    finally:
        path.unlink()
