"""The zimage CLI: generate writes correct PNGs atomically, bad input exits with one line, info reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zimage_native.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_generate_writes_the_library_image(tiny_model_dir, tiny_pipe, tmp_path):
    out = tmp_path / "x.png"
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", out, "--width", 64, "--height", 48,
                 "--steps", 2, "--seed", 3, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    expected = tiny_pipe("a cat", width=64, height=48, num_inference_steps=2, seed=3).images[0]
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 48)
        assert np.array_equal(np.asarray(img), np.asarray(expected))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary files left behind


def test_generate_several_images_and_reports_random_seed(tiny_model_dir, tmp_path):
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "y.png", "--width", 32,
                 "--height", 32, "--steps", 1, "--num-images", 2, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    seeds = result.output.split("seeds ")[1].split()[:2]
    assert names == sorted(f"y_{i}_{s}.png" for i, s in enumerate(seeds))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "100"], "width must be a positive multiple of 16"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--guidance-scale", "-2"], "--guidance-scale must be >= 0"),
        (["-o", "out.jpg"], "Error: --output must be a .png file, got out.jpg"),
        (["--model", "/no/such/folder"], "model folder not found"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["generate", "a cat", "--device", "cpu", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "z.png"

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "-o", str(out),
                                       "--width", "32", "--height", "32", "--steps", "1", "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "keep.png"
    out.write_bytes(b"old image")
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "-o", str(out), "--width", "32",
                              "--height", "32", "--steps", "1", "--device", "cpu", "--no-progress"])
    assert out.read_bytes() == b"old image" and [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_info_reports_components(tiny_model_dir):
    result = run("info", tiny_model_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["transformer"]["class"] == "ZImageTransformer2DModel"
    assert report["transformer"]["dtypes"] == {"F32": report["transformer"]["parameters"]}
    assert report["vae"]["class"] == "AutoencoderKL"
    assert report["scheduler"]["shift"] == 3.0
    table = run("info", tiny_model_dir).output
    assert "transformer" in table and "params" in table and "text_encoder" in table
    # the weights each offload / text encoder setting keeps on the GPU at the peak, in bf16
    import torch

    from zimage_native.loading import folder_weight_bytes

    need = folder_weight_bytes(tiny_model_dir, [], torch.bfloat16)
    peaks = report["gpu_weights_bf16"]
    assert peaks["everything resident"] == sum(need.values()) and peaks["--offload model"] == max(need.values())
    assert peaks["--text-encoder-quant int8"] < peaks["everything resident"]
    assert "--text-encoder-quant int4" not in peaks  # widths of 48: no int4
    assert "GPU weights at the peak in bf16" in table and "--offload blocks --text-encoder-quant int8" in table


def test_version_is_the_package_version_not_the_installed_metadata(monkeypatch):
    """An editable install keeps the metadata of its last `pip install` (stale after a version bump):
    --version prints the code's zimage_native.__version__."""
    import importlib.metadata

    import zimage_native

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.0-stale")
    result = CliRunner().invoke(main, ["--version"], prog_name="zimage")
    assert result.exit_code == 0 and result.output == f"zimage, version {zimage_native.__version__}\n"


def test_info_on_a_folder_that_holds_no_model_says_so(tiny_model_dir, tmp_path):
    """``zimage info /tmp`` named a stray broken file that happened to be the folder's only
    .safetensors ("truncated or not a safetensors file"); a folder of other files got "no safetensors
    weights ... expected one of ...". Now both say that the folder is not a model folder."""
    (tmp_path / "stray.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "notes.txt").write_text("hi")
    for args in ([tmp_path], [tmp_path, "--check"]):
        result = run("info", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.strip().startswith(f"Error: {tmp_path} is not a model folder (no model_index.json) nor "
                                                f"a component folder")
        assert f"give it: zimage info {tmp_path / 'stray.safetensors'}" in result.output
    assert run("info", tiny_model_dir / "vae").exit_code == 0  # a component folder
    lora = tmp_path / "lora"  # a LoRA save folder
    lora.mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({"transformer.layers.0.attention.to_k.lora_A.weight": torch.zeros(2, 32),
               "transformer.layers.0.attention.to_k.lora_B.weight": torch.zeros(32, 2)},
              str(lora / "pytorch_lora_weights.safetensors"))
    result = run("info", lora)
    assert result.exit_code == 0 and "LoRA: 1 modules" in result.output, result.output
