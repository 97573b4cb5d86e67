"""The sampling core on a device that is not the CPU, with the CPU suite's tools: the DiT and the VAE on
PyTorch's "meta" device, the text encoder on the CPU (a per-component placement users run).

Meta tensors carry shapes but no data, so a request fails on them exactly where it would misbehave on
a GPU and not on the CPU: a host read of a device tensor (``.item()``, ``bool(t)``, ``nonzero``: a
sync that stalls the launch queue and breaks graph capture) or a tensor left on the CPU and mixed
with device tensors (a device-mismatch error on a GPU). The numbers are not checked here (the rest of
the suite does that on the CPU); every task, CFG and batch shape must simply run through.

The meta device also stands for Apple's Metal ("mps"), which has no float64: a dispatch mode
rejects any float64 tensor on the device while every task runs, with meta treated as a device
without float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")
KW = dict(height=64, width=64, num_inference_steps=2, seed=0)


def on_meta(pipe, *modules):
    """Move the DiT, the VAE (and ``modules``) to meta; the text encoder stays on the CPU."""
    for module in (pipe.transformer, pipe.vae, *modules):
        module.to(META)
    pipe.placement = {"transformer": META, "vae": META, "text_encoder": torch.device("cpu")}
    return pipe


@pytest.fixture(scope="module")
def meta_pipe(tiny_model_dir):
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    pipe.progress = False
    return on_meta(pipe)


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def square_mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def swap_latents(pipe, i, t, kw):
    return {"latents": torch.zeros_like(kw["latents"])}


REQUESTS = {
    "txt2img": lambda p: p("a cat", output_type="pt", **KW),
    # CFG over a batch whose captions fall in different 32-token classes (the masked path), with
    # truncation and normalisation, one seed per image
    "cfg_mixed_batch": lambda p: p(["a cat", "a watercolor painting of mountains at dawn, soft light, mist over the "
                                    "lake, a small red boat, birds in the sky, a long quiet morning"],
                                   negative_prompt="blurry", guidance_scale=3.0, cfg_truncation=0.5,
                                   cfg_normalization=1.0, output_type="pt", **{**KW, "seed": [1, 2]}),
    "images_per_prompt": lambda p: p("a cat", num_images_per_prompt=2, output_type="latent", **KW),
    "img2img": lambda p: p.img2img("a cat", picture(1), strength=0.6, output_type="pt", **KW),
    "inpaint": lambda p: p.inpaint("a cat", Image.fromarray(picture(2)), square_mask(), strength=0.8,
                                   guidance_scale=2.0, output_type="pt", **KW),
    "step_callback": lambda p: p("a cat", callback_on_step_end=swap_latents, output_type="latent", **KW),
    "sigmas": lambda p: p("a cat", sigmas=[1.0, 0.4], output_type="latent",
                          **{k: v for k, v in KW.items() if k != "num_inference_steps"}),
}


@pytest.mark.parametrize("task", REQUESTS)
def test_every_task_runs_on_a_device_other_than_the_cpu(meta_pipe, task):
    out = REQUESTS[task](meta_pipe)
    assert out.images.device == META and out.images.shape[-2:] in ((64, 64), (8, 8))


class NoFloat64OnDevice(TorchDispatchMode):
    """Records every op that reads or writes a float64 (or complex128) tensor on the meta device."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device == META and t.dtype in (torch.float64, torch.complex128)
               for t in tree_leaves((args, kwargs, out))):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("task", REQUESTS)
def test_every_task_runs_without_float64_on_the_device(meta_pipe, task, monkeypatch):
    """Metal's rule: no float64 tensor on the device (the layout is built on the CPU there)."""
    from zimage_native.model import sequence

    monkeypatch.setattr(sequence, "NO_FLOAT64", sequence.NO_FLOAT64 | {"meta"})
    with NoFloat64OnDevice() as mode:
        out = REQUESTS[task](meta_pipe)
    assert mode.ops == [] and out.images.device == META


def test_the_float64_rule_can_fail(meta_pipe):
    """Without meta counted as a device without float64, the RoPE table is built on it in float64."""
    with NoFloat64OnDevice() as mode:
        meta_pipe("a cat", output_type="latent", **KW)
    assert "aten.arange.start_step" in mode.ops


def test_tiled_vae_decode_on_the_device(meta_pipe):
    meta_pipe.enable_vae_tiling(64, 16)
    try:
        out = meta_pipe("a cat", output_type="pt", **{**KW, "height": 128, "width": 128})
    finally:
        meta_pipe.disable_vae_tiling()
    assert out.images.device == META and out.images.shape == (1, 3, 128, 128)


def test_controlnet_and_control_inpainting_on_the_device(tmp_path_factory, monkeypatch):
    from zimage_native import ZImagePipeline
    from zimage_native.model import sequence

    from .fixtures import build_model_folder
    from .test_controlnet_model import CONTROL_DIT, make_models

    folder = build_model_folder(tmp_path_factory.mktemp("meta-control"), dit_kwargs=CONTROL_DIT)
    state = {k: v.contiguous() for k, v in make_models("2.1")[1].state_dict().items() if k.startswith("control_")}
    save_file(state, str(folder / "controlnet.safetensors"))
    pipe = ZImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    pipe.progress = False
    pipe.load_controlnet(folder / "controlnet.safetensors")
    on_meta(pipe, pipe.controlnet)
    control = picture(3)
    out = pipe("a cat", control_image=control, guidance_scale=2.0, output_type="pt", **KW)
    assert out.images.device == META
    out = pipe.inpaint("a cat", picture(4), square_mask(), control_image=control, output_type="pt", **KW)
    assert out.images.device == META
    # and with Metal's rule (no float64 on the device)
    monkeypatch.setattr(sequence, "NO_FLOAT64", sequence.NO_FLOAT64 | {"meta"})
    with NoFloat64OnDevice() as mode:
        pipe("a cat", control_image=control, guidance_scale=2.0, output_type="pt", **KW)
        pipe.inpaint("a cat", picture(4), square_mask(), control_image=control, output_type="pt", **KW)
    assert mode.ops == []


def test_the_meta_device_catches_host_reads_and_cpu_tensors(meta_pipe, monkeypatch):
    """The check can fail: a host read in the layout, or a CPU tensor fed to the DiT, stops a request."""
    import zimage_native.sampling as sampling
    from zimage_native.model import sequence

    real = sequence.build_layout

    def reads_the_device(*args, **kwargs):
        layout = real(*args, **kwargs)
        bool(layout.caption_pad.any())
        return layout

    monkeypatch.setattr(sampling, "build_layout", reads_the_device)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        meta_pipe("a cat", output_type="latent", **KW)
    monkeypatch.undo()

    def cpu_layout(config, lengths, h, w, device="cpu", **kwargs):
        return real(config, lengths, h, w, "cpu", **kwargs)

    monkeypatch.setattr(sampling, "build_layout", cpu_layout)
    with pytest.raises(RuntimeError, match="device"):
        meta_pipe("a cat", output_type="latent", **KW)


IMPORTS_UNDER_META = r"""
import json, sys
import torch

seen = []


class Watch:  # a meta-path finder that only records what is imported while meta is the default device
    busy = False

    def find_spec(self, name, path=None, target=None):
        if not Watch.busy:  # the check below may import too
            Watch.busy = True
            try:
                if torch.empty(0).device.type == "meta":  # (torch 2.6's get_default_device ignores the mode)
                    seen.append(name)
            finally:
                Watch.busy = False
        return None


sys.meta_path.insert(0, Watch())
from transformers import Qwen3Config

config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)
if sys.argv[1] == "engine":
    from zimage_native.text_encoder import build_truncated_qwen3

    build_truncated_qwen3(config)
elif sys.argv[1] == "pipeline":  # a whole load: every component is built on meta first
    from zimage_native import ZImagePipeline

    ZImagePipeline.from_pretrained(sys.argv[2], device="cpu")
else:  # the control: transformers' lazy import left to run under meta (with torch 2.6 it also fails)
    from transformers import AutoModel

    from zimage_native.loading import build_on_meta

    try:
        build_on_meta(lambda: AutoModel.from_config(config, attn_implementation="sdpa"))
    except Exception as e:
        print(f"failed: {type(e).__name__}: {e}")
print(json.dumps(seen))
"""


@pytest.mark.parametrize("mode", ["engine", "pipeline", "control"])
def test_nothing_is_imported_under_meta(mode, tmp_path, tiny_model_dir):
    """The Qwen3 is built on meta, but transformers imports its modelling module lazily, and that
    import reaches torch._dynamo, whose first import under a meta default device fails with torch
    2.6 ("Tensor.item() cannot be called on meta tensors": every load failed there). Nothing may be
    imported while meta is the default device; the control shows the watch sees such imports."""
    import json
    import subprocess
    import sys

    script = tmp_path / "watch.py"
    script.write_text(IMPORTS_UNDER_META)
    run = subprocess.run([sys.executable, str(script), mode, str(tiny_model_dir)], capture_output=True, text=True,
                         timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    if mode != "control":
        assert seen == []
    else:
        assert "transformers.models.qwen3.modeling_qwen3" in seen


class HostTraffic(TorchDispatchMode):
    """Records each op that makes the host wait for the device: a read of a device value on the host
    (``.item()``, ``bool(t)``, ``nonzero``: tests/graph_standins.HOST_READS), a tensor built from host
    data or a copy of a CPU tensor to the device (a host-to-device copy that is not non_blocking waits
    for the stream on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from .graph_standins import HOST_DATA, HOST_READS

        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        to_device = (any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves(args))
                     and any(isinstance(t, torch.Tensor) and t.device == META for t in tree_leaves(out)))
        if name in HOST_READS or name in HOST_DATA or (name in ("_to_copy", "copy_") and to_device):
            self.ops.append(name)
        return out


@pytest.mark.parametrize("task", ["txt2img", "cfg_mixed_batch", "inpaint", "step_callback"])
def test_the_step_loop_neither_reads_nor_copies_from_the_host(meta_pipe, task, monkeypatch):
    """Inside the step loop (with a step-end callback there too) no op makes the host wait for the
    device: the per-request tensors (timesteps, sigmas, layouts) are on the device before it starts.
    The callback's timestep was copied from the CPU schedule at each step (one wait per step)."""
    import zimage_native.sampling as sampling

    ops = []
    run_steps = sampling.run_steps

    def watched(*args, **kwargs):
        with HostTraffic() as mode:
            out = run_steps(*args, **kwargs)
        ops.append(mode.ops)
        return out

    monkeypatch.setattr(sampling, "run_steps", watched)
    REQUESTS[task](meta_pipe)
    assert ops == [[]], ops
