"""zimage generate with --controlnet / --control-image / --control-scale (and --image + --mask for
ControlNet inpainting): the same images as the library call, the metadata, the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_native.metadata import read_metadata

from .test_cli_generate import pixels, run
from .test_controlnet_pipeline import control_files, control_model_dir, control_pipe, picture  # noqa: F401

pytest.importorskip("diffusers")


def save(image: Image.Image, path):
    image.save(path)
    return path


def test_controlnet_from_the_cli(control_model_dir, control_pipe, control_files, tmp_path):  # noqa: F811
    pose = save(picture(64, 48, 3), tmp_path / "pose.png")
    out = tmp_path / "out.png"
    result = run("generate", "a dancer", "--model", control_model_dir, "--controlnet", control_files["2.1"],
                 "--control-image", pose, "--control-scale", "0.6", "-o", out, "--seed", 5, "--steps", 2,
                 "--device", "cpu", "--no-progress")
    assert "ControlNet cn-2.1.safetensors: version 2.1, 2 control layers" in result.output
    control_pipe.load_controlnet(control_files["2.1"])
    with Image.open(pose) as im:  # the size comes from the control image
        expected = control_pipe("a dancer", control_image=im.convert("RGB"), controlnet_conditioning_scale=0.6,
                                num_inference_steps=2, seed=5).images[0]
    assert expected.size == (64, 48)
    assert np.array_equal(pixels(out), np.asarray(expected))
    record = read_metadata(out)
    assert record["control_scale"] == 0.6 and record["controlnet"].endswith("cn-2.1.safetensors")
    assert record["controlnet_version"] == "2.1"
    with Image.open(out) as im:
        assert "ControlNet: cn-2.1.safetensors, Control scale: 0.6" in im.info["parameters"]
    # --width/--height resize the control image, as the library does
    sized = tmp_path / "sized.png"
    run("generate", "a dancer", "--model", control_model_dir, "--controlnet", control_files["2.1"],
        "--control-image", pose, "-o", sized, "--seed", 5, "--steps", 1, "--width", 32, "--height", 32,
        "--device", "cpu", "--no-progress")
    assert pixels(sized).shape == (32, 32, 3)
    # --from-image needs the ControlNet and the control image again (neither is stored in the PNG)
    result = run("generate", "--from-image", out, "-o", tmp_path / "again.png", "--device", "cpu", ok=False)
    assert result.exit_code == 1 and "give --controlnet FILE and --control-image again" in result.output


def test_controlnet_inpainting_from_the_cli(control_model_dir, control_pipe, control_files, tmp_path):  # noqa: F811
    src = save(picture(48, 32, 7), tmp_path / "in.png")
    mask = save(picture(48, 32, 0, "L"), tmp_path / "mask.png")
    pose = save(picture(40, 40, 8), tmp_path / "pose.png")
    out = tmp_path / "out.png"
    run("generate", "a cat", "--model", control_model_dir, "--controlnet", control_files["2.0"], "--control-image",
        pose, "--image", src, "--mask", mask, "-o", out, "--seed", 3, "--steps", 2, "--device", "cpu", "--no-progress")
    control_pipe.load_controlnet(control_files["2.0"])
    with Image.open(src) as im, Image.open(mask) as mk, Image.open(pose) as ps:
        expected = control_pipe.inpaint("a cat", im.convert("RGB"), mk.convert("L"), control_image=ps.convert("RGB"),
                                        num_inference_steps=2, seed=3).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert "strength" not in read_metadata(out)  # ControlNet inpainting takes none


@pytest.mark.parametrize("args, message", [
    (["--control-image", "POSE"], "--control-image needs --controlnet"),
    (["--controlnet", "CN"], "--controlnet needs --control-image"),
    (["--controlnet", "CN", "--control-image", "POSE", "--image", "POSE"], "needs --mask"),
    (["--controlnet", "CN", "--control-image", "POSE", "--control-scale", "nan"], "--control-scale must be"),
    (["--controlnet", "CN", "--control-image", "POSE", "--image", "POSE", "--mask", "POSE", "--strength", "0.5"],
     "--strength does not apply to ControlNet inpainting"),
])
def test_controlnet_flags_are_checked_before_loading(tmp_path, control_files, args, message):  # noqa: F811
    pose = save(picture(32, 32, 1), tmp_path / "pose.png")
    args = [control_files["1.0"] if a == "CN" else pose if a == "POSE" else a for a in args]
    # --model points nowhere: the flags must be refused before any weights are looked for
    result = run("generate", "a cat", "--model", tmp_path / "missing", "-o", tmp_path / "x.png", *args, ok=False)
    assert result.exit_code == 1 and message in result.output, result.output


def test_a_file_that_is_no_controlnet_is_named(control_model_dir, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    bad = tmp_path / "lora.safetensors"
    save_file({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 4)}, str(bad))
    pose = save(picture(32, 32, 1), tmp_path / "pose.png")
    result = run("generate", "a cat", "--model", control_model_dir, "--controlnet", bad, "--control-image", pose,
                 "-o", tmp_path / "x.png", "--steps", 1, "--device", "cpu", "--no-progress", ok=False)
    assert result.exit_code == 1 and "not a Z-Image Fun-ControlNet-Union" in result.output
    assert "looks like a LoRA" in result.output


def test_serve_loads_the_controlnet_for_control_requests(control_model_dir, control_pipe, control_files):  # noqa: F811
    """`zimage serve --controlnet FILE`: the engine's pipeline carries the branch, and a request with a
    control image (as the job API builds it) gives the library's image."""
    import importlib

    from zimage_native.sampling import GenerationRequest

    serve_cli = importlib.import_module("zimage_native.cli.serve")
    o = serve_cli.default_options()
    assert o["controlnet"] is None and o["controlnet_config"] is None
    o.update(model=str(control_model_dir), device="cpu", dtype="float32", controlnet=control_files["1.0"])
    engine = serve_cli.build_engine(o)
    assert engine.pipe.controlnet.config.version == "1.0"
    pose = picture(48, 32, 4)
    request = GenerationRequest(prompt="a cat", seeds=[6], steps=2, control_image=pose, control_scale=0.5)
    image = engine.generate(request, callback=lambda k, n: None)[0].image
    control_pipe.load_controlnet(control_files["1.0"])
    want = control_pipe("a cat", control_image=pose, controlnet_conditioning_scale=0.5, num_inference_steps=2,
                        seed=6).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))
