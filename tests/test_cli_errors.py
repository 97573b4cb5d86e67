"""Every input error of the CLI is one line on stderr naming the flag the user typed: exit status 2 for a
command line that cannot be parsed (click's usage errors and the CLI's own checks of the words typed), 1 for
an input the command refuses while running (docs/cli.md, "Exit status")."""

from __future__ import annotations

import re
from unittest.mock import patch

import pytest
import torch
from click.testing import CliRunner

from zimage_native.cli import main


def one_line_error(*args: str, status: int = 1) -> str:
    """The CLI's output for ``args``: one line starting with 'Error: ', exit status ``status``, no traceback."""
    result = CliRunner().invoke(main, list(args), prog_name="zimage")
    assert result.exit_code == status, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def usage_error(*args: str) -> str:
    """The CLI's one-line output for a command line that cannot be parsed, exit status 2 (click's)."""
    return one_line_error(*args, status=2)


@pytest.mark.parametrize("args, message", [
    (["info", "{missing}"], "Path '{missing}' does not exist. (see `zimage info --help`)"),
    (["generate", "a cat", "--bogus"], ("No such option '--bogus'", "No such option: --bogus")),  # click 8.2+, 8.1
    (["generate", "a cat", "--steps", "x"], "'x' is not a whole number: the number of denoising steps"),
    (["templates", "list", "--category", "nonsense"], "'nonsense' is not one of"),
    (["templates", "show", "photo-aerial-drone", "--nope"], "(see `zimage templates show --help`)"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["convert", "{missing}", "{missing}.out", "--to", "diffusers"], "Path '{missing}' does not exist"),
])
def test_click_usage_errors_are_one_line_with_status_2(args, message, tmp_path):
    missing = str(tmp_path / "missing")  # (not a path of the machine, which another process may create)
    line = usage_error(*(a.format(missing=missing) for a in args))
    messages = (message,) if isinstance(message, str) else message
    assert any(m.format(missing=missing) in line for m in messages), line


@pytest.mark.parametrize("command", [["generate", "a cat"], ["serve"], ["format-prompt", "a cat"], ["rewrite", "a cat"],
                                     ["templates", "list"], ["templates", "show", "photo-aerial-drone"]])
def test_a_templates_dir_that_does_not_exist_is_a_usage_error_in_every_command(command, tmp_path):
    """--templates-dir names a folder: one that does not exist is click's usage error (status 2), as in
    generate and serve. format-prompt, rewrite and templates took it and refused it once running (status 1)."""
    missing = tmp_path / "missing"
    line = usage_error(*command, "--templates-dir", str(missing))
    assert f"Invalid value for '--templates-dir': Directory '{missing}' does not exist." in line, line


def test_a_shard_size_that_reads_as_no_size_is_a_usage_error(tiny_model_dir, tmp_path):
    """zimage convert --shard-size x is a value of the wrong type (status 2, as --steps x); 0 reads as
    a size the command refuses (status 1, as --steps 0). Both were 1, and '1.2.3GB' said only
    "could not convert string to float"."""
    convert = ["convert", str(tiny_model_dir / "transformer"), str(tmp_path / "out"), "--to", "comfyui", "--dry-run"]
    for text in ("x", "5XB", "1.2.3GB", "."):
        line = usage_error(*convert, "--shard-size", text)
        assert line.startswith(f"Error: Invalid value for '--shard-size': cannot read size '{text}' (use e.g. 5GB"), line
    assert one_line_error(*convert, "--shard-size", "0") == "Error: shard size must be positive, got '0'"
    assert "in 2 file(s)" in CliRunner().invoke(main, [*convert, "--shard-size", "1.5MB"]).output


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_predecessors_flags_say_what_they_are_here(command):
    """Users of the predecessor type its flags; each says what it is spelled as here (docs/cli.md)."""
    from zimage_native.cli import PREDECESSOR_FLAGS

    prompt = ["a cat"] if command == "generate" else []
    for flag, here in PREDECESSOR_FLAGS.items():
        line = usage_error(command, *prompt, flag)
        assert line == f"Error: No such option '{flag}': the predecessor's {flag} is {here} here " \
                       f"(see `zimage {command} --help`)", line
    assert "--offload model" in usage_error(command, *prompt, "--cpu-offload")


@pytest.mark.parametrize("args, command", [
    (["generate", "a cat", "-v"], "generate"), (["generate", "a cat", "--verbose"], "generate"),
    (["templates", "list", "-v"], "templates list"),
])
def test_verbose_after_the_command_says_it_goes_before(args, command):
    assert usage_error(*args) == f"Error: No such option '{args[-1]}': -v/--verbose goes before the command: " \
                                 f"zimage -v {command} ..."


@pytest.mark.parametrize("args, message", [
    (["generate", "a cat", "--device", "cpu", "--steps", "0"], "Error: --steps must be an integer >= 1, got 0"),
    (["generate", "a cat", "--device", "cpu", "--guidance-scale", "-2"], "Error: --guidance-scale must be >= 0"),
    (["generate", "a cat", "--device", "cpu", "--width", "100"],
     "Error: --width must be a positive multiple of 16, got 100 (nearest: 96 or 112)"),
    (["generate", "a cat", "--device", "cpu", "--max-sequence-length", "0"], "Error: --max-sequence-length must be"),
    (["rewrite", "a cat", "--max-new-tokens", "0"], "Error: --max-new-tokens must be an integer >= 1, got 0"),
    (["rewrite", "a cat", "--top-p", "0"], "Error: --top-p must be in (0, 1]"),
    (["rewrite", "a cat", "--temperature", "-1"], "Error: --temperature must be >= 0"),
])
def test_messages_name_the_flag_not_the_library_argument(args, message):
    line = one_line_error(*args)
    assert line.startswith(message), line
    assert not any(name in line for name in ("num_inference_steps", "guidance_scale", "max_new_tokens", "top_p"))


def test_no_arguments_still_prints_the_help():
    result = CliRunner().invoke(main, [])
    assert "Commands:" in result.output


@pytest.mark.parametrize("flag", ["--image", "--mask", "--control-image"])
@pytest.mark.parametrize("content, message", [(b"not a picture", "not an image file"),
                                              (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "cannot read the image")])
def test_an_input_image_that_cannot_be_read_is_named_before_loading(tmp_path, flag, content, message):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    extra = {"--image": ["--image", bad], "--mask": ["--image", good, "--mask", bad],
             "--control-image": ["--controlnet", good, "--control-image", bad]}[flag]
    # --model points nowhere: the image must be refused before any weights are looked for
    line = one_line_error("generate", "a cat", "--device", "cpu", "--model", str(tmp_path / "missing"),
                          "-o", str(tmp_path / "x.png"), *map(str, extra))
    assert line.startswith(f"Error: {flag} {bad}: {message}"), line
    assert not (tmp_path / "x.png").exists()


def test_single_files_without_vae_name_the_flags(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    dit = tmp_path / "dit.safetensors"
    save_file(load_file(str(next((tiny_model_dir / "transformer").glob("*.safetensors")))), str(dit))
    line = one_line_error("generate", "a cat", "--device", "cpu", "--transformer", str(dit), "-o",
                          str(tmp_path / "x.png"))
    assert "no vae or text_encoder given" in line and "--vae, --text-encoder" in line, line


def test_llm_url_errors_name_the_flag():
    assert one_line_error("rewrite", "a cat", "--llm-url", "notaurl", "--llm-model", "m") == (
        "Error: --llm-url must be an http:// or https:// address, got 'notaurl'")


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:99"], "Error: device 'cuda:99' is not available"),
    (["--device", "gpu"], "Error: unknown device 'gpu': a GPU is cuda here (cuda); give cpu, cuda, cuda:N, mps or auto"),
    (["--device", "xpu"], "Error: device 'xpu' is not available in this torch"),  # was an AssertionError traceback
    (["--vae-device", "hpu"], "Error: device 'hpu' is not available in this torch"),
    (["--device", "cpu", "--offload", "blocks", "--compile", "blocks"], "--compile='blocks' would change"),
    (["--device", "cpu", "--cuda-graphs"], "Error: --cuda-graphs needs the DiT on a CUDA device"),
    (["--device", "cpu", "--kernels", "triton"], "Error: --kernels='triton' runs on a CUDA"),
])
def test_device_and_speed_flags_are_one_line_naming_the_flag(tiny_model_dir, tmp_path, monkeypatch, args, message):
    # As in a process whose kernels were not imported under TRITON_INTERPRET=1 (earlier tests in this
    # process may have imported them interpreted, which allows the CPU).
    from types import SimpleNamespace

    monkeypatch.setattr("zimage_native.accel.fused_ops.load_kernels", lambda: SimpleNamespace(INTERPRETED=False))
    line = one_line_error("generate", "a cat", "--model", str(tiny_model_dir), "--width", "32", "--height", "32",
                          "--steps", "1", "-o", str(tmp_path / "x.png"), *args)
    assert message in line, line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("asked, expected", [("CPU", "cpu"), (" Cpu ", "cpu"), ("Meta", "meta")])
def test_device_names_are_read_in_any_case(asked, expected):
    from zimage_native.devices import resolve_device

    assert resolve_device(asked) == torch.device(expected)


@pytest.mark.parametrize("asked, message", [
    ("gpu:1", "unknown device 'gpu:1': a GPU is cuda here (cuda:1); give cpu, cuda, cuda:N, mps or auto"),
    ("cuda0", "unknown device 'cuda0': give cpu, cuda, cuda:N, mps or auto"),  # no list of torch's 20 device types
])
def test_a_mistyped_device_says_what_to_give(asked, message):
    from zimage_native.devices import resolve_device

    with pytest.raises(ValueError) as e:
        resolve_device(asked)
    assert str(e.value) == message


def test_an_integer_device_is_a_cuda_index_as_in_torch(monkeypatch, tiny_model_dir):
    """device=0 said "unknown device '0'" (torch.device(0) asks the accelerator, and a CPU-only build
    has none), and dit_device=0 / vae_device=0 read as "not given" and loaded on the main device."""
    from zimage_native import ZImagePipeline, loading
    from zimage_native.devices import parse_device, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for asked in (0, 1):
        assert parse_device(asked) == torch.device("cuda", asked)
        with pytest.raises(ValueError) as e:
            resolve_device(asked)
        assert str(e.value) == (f"device 'cuda:{asked}' is not available: this torch {torch.__version__} sees no "
                                f"CUDA GPU (use cpu or auto)")
    for asked in (True, -1):
        with pytest.raises(ValueError, match=re.escape(f"unknown device {asked!r}: give cpu, cuda, cuda:N (or the "
                                                       f"index N), mps or auto")):
            resolve_device(asked)
    for name in ("dit_device", "vae_device", "text_encoder_device"):  # 0 is a device, not "not given"
        with pytest.raises(ValueError, match=re.escape("device 'cuda:0' is not available")):
            loading.load_pretrained(tiny_model_dir, "cpu", **{name: 0})
    with pytest.raises(ValueError, match=re.escape("device 'cuda:0' is not available")):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dit_device=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs, faked
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device(i) for i in (0, 1)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match=re.escape("device 'cuda:2' is not available: there are 2 CUDA device(s), "
                                                   "cuda:0 to cuda:1")):
        resolve_device(2)


def test_enable_model_cpu_offload_reads_device_names_as_device_does(fresh_pipe):
    """enable_model_cpu_offload(device=) gave the name to torch.device itself: "CPU" (read as cpu by
    device= everywhere else) and "gpu" ended in torch's RuntimeError listing its 20 device types."""
    with pytest.raises(ValueError) as e:
        fresh_pipe.enable_model_cpu_offload(device="GPU")
    assert str(e.value) == "unknown device 'gpu': a GPU is cuda here (cuda); give cpu, cuda, cuda:N, mps or auto"
    fresh_pipe.enable_model_cpu_offload(device=" CPU")
    assert fresh_pipe.offload == "model" and set(fresh_pipe.placement.values()) == {torch.device("cpu")}


def test_an_unreachable_encoder_url_is_one_line(tiny_model_dir, tmp_path, refused_url):
    line = one_line_error("generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu", "--width", "32",
                          "--height", "32", "--steps", "1", "-o", str(tmp_path / "x.png"), "--encoder-url", refused_url)
    assert line.startswith(f"Error: cannot reach the text encoder at {refused_url}"), line
    assert not (tmp_path / "x.png").exists()


def test_seed_out_of_range_and_from_image_of_a_non_image(tmp_path):
    missing = str(tmp_path / "missing")  # refused before any weights are looked for
    assert one_line_error("generate", "a cat", "--model", missing, "--seed", str(2**64)) == (
        f"Error: --seed must be between 0 and 2**64 - 1 (-1: a random seed), got {2**64}")
    assert one_line_error("generate", "a cat", "--model", missing, "--seed", "-5") == (  # the library's range
        "Error: --seed must be between 0 and 2**64 - 1 (-1: a random seed), got -5")
    assert one_line_error("generate", "a cat", "--model", missing, "--seed", str(2**64 - 1), "--num-images", "2") == (
        f"Error: --seed must be between 0 and 2**64 - 1 (-1: a random seed), got {2**64} "
        f"(--seed {2**64 - 1} with --num-images 2 runs to {2**64})")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert one_line_error("generate", "--from-image", str(text), "--model", missing) == (
        f"Error: {text} is not an image file (a PNG written by zimage-native is needed)")


@pytest.mark.parametrize("command", [["generate", "a cat"], ["serve"]])
def test_a_config_file_that_does_not_exist_is_a_usage_error_as_other_missing_paths_are(tmp_path, command):
    """`--config missing.toml` said "config file not found" with status 1, where every other path flag
    naming a file that is not there (--image, --transformer, --prompts-file, ...) is click's usage error,
    status 2."""
    missing = tmp_path / "missing.toml"
    line = usage_error(*command, "--config", str(missing), "--profile", "x")
    assert line == (f"Error: Invalid value for '--config': File '{missing}' does not exist. "
                    f"(see `zimage {command[0]} --help`)"), line
    assert usage_error(*command, "--image" if command == ["generate", "a cat"] else "--transformer",
                       str(tmp_path / "missing.png")).endswith(f"'{tmp_path / 'missing.png'}' does not exist. "
                                                                f"(see `zimage {command[0]} --help`)")


@pytest.mark.parametrize("command", [["convert", "{model}", "{out}", "--to", "comfyui"],
                                     ["generate", "a cat", "--transformer", "{model}", "--model", "{model}", "-o",
                                      "{out}.png"]])
def test_a_whole_model_folder_given_as_one_component_names_the_flag_that_loads_it(tiny_model_dir, tmp_path, command):
    """`zimage convert MODEL_FOLDER ...` and `--transformer MODEL_FOLDER` said "load it with
    ZImagePipeline.from_pretrained", a Python call, to a command-line user; they name the component to give
    and --model, generate's way to load the folder (convert takes no --model: not "give it as --model")."""
    args = [a.format(model=tiny_model_dir, out=tmp_path / "out") for a in command]
    line = one_line_error(*args)
    assert line == (f"Error: {tiny_model_dir} is a whole model folder (diffusers layout): give one component (a file, "
                    f"or a folder such as {tiny_model_dir / 'transformer'}) (zimage generate takes the whole folder "
                    f"as --model)"), line


def test_tile_overlap_error_names_the_flag(tiny_model_dir, tmp_path):
    line = one_line_error("generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu", "--tiled-vae",
                          "--tile-overlap", "600", "-o", str(tmp_path / "x.png"))
    assert line.startswith("Error: --tile-overlap must be a multiple of 16"), line


@pytest.mark.parametrize("args, message", [
    (["--strength", "0.5"], "Error: --strength needs --image"),
    (["--control-scale", "0.5"], "Error: --control-scale needs --controlnet"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, args, message):
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args)
    assert line.startswith(message), line


def test_output_folder_and_prompts_file_errors_come_before_loading(tmp_path):
    missing = str(tmp_path / "missing")  # refused before any weights are looked for
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert one_line_error("generate", "a cat", "--model", missing, "--output-dir", str(afile / "sub")).startswith(
        f"Error: --output-dir: cannot write in the folder {afile / 'sub'} (")
    assert one_line_error("generate", "a cat", "--model", missing, "-o", str(afile / "x.png")).startswith(
        f"Error: --output: cannot write in the folder {afile} (")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n")
    assert one_line_error("generate", "--prompts-file", str(prompts), "--model", missing) == (
        f"Error: --prompts-file {prompts} has no prompts (only blank and # lines)")


def test_a_folder_that_refuses_writes_fails_before_loading_and_late_refusals_are_one_line(tmp_path, monkeypatch):
    """A folder that exists but takes no files (read-only, /sys; root passes chmod, so the refusal is
    simulated) fails before any weights are looked for; a write refused later (a disk that fills up)
    is one line naming the file, not a traceback."""
    import tempfile

    from zimage_native.cli import _common

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".probe"))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png"))
    assert line == f"Error: --output: cannot write in the folder {tmp_path} (Permission denied)"
    monkeypatch.undo()

    @_common.user_errors
    def late():
        raise OSError(28, "No space left on device", str(tmp_path / "x.png"))

    with pytest.raises(_common.UserError, match=f"cannot use {tmp_path / 'x.png'}: No space left on device"):
        late()


@pytest.mark.parametrize("args, message", [
    (["--attention", "foo"], "Error: unknown attention backend 'foo'; choose one of"),
    (["--attention", "flash_attn_2", "--device", "cpu"],
     "Error: attention backend 'flash_attn_2' is not available: needs a CUDA GPU; the model is on cpu"),
    (["--lora", "nope.safetensors:0.8"], "Error: --lora: LoRA file not found: nope.safetensors"),
])
def test_attention_and_lora_mistakes_fail_before_the_model_is_looked_for(tmp_path, args, message):
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args)
    assert line.startswith(message), line


def test_a_lora_folder_is_taken_and_a_bad_scale_is_named(tiny_model_dir, tiny_pipe, tmp_path):
    """A LoRA save folder (diffusers' pytorch_lora_weights.safetensors), which the library loads, was
    refused as "LoRA file not found"; a scale that is not a number was named as a missing path, and
    a NaN scale ran to a NaN error after loading."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    folder = tmp_path / "my_lora"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    dim = tiny_pipe.transformer_config.dim
    save_file({"transformer.layers.0.attention.to_k.lora_A.weight": torch.randn(2, dim, generator=g),
               "transformer.layers.0.attention.to_k.lora_B.weight": torch.randn(dim, 2, generator=g)},
              str(folder / "pytorch_lora_weights.safetensors"))
    weights = str(folder / "pytorch_lora_weights.safetensors")
    for text, message in ((f"{weights}:abc", f"Error: --lora {weights}:abc: the scale after ':' must be a number, "
                                             f"got 'abc'"),
                          (f"{weights}:nan", f"Error: --lora {weights}:nan: the scale must be a finite number, "
                                             f"got nan")):
        assert one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--lora", text) == message
        assert one_line_error("convert", weights, str(tmp_path / "out.safetensors"), "--to", "diffusers",
                              "--lora", text) == message
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--width", "32", "--height", "32", "--steps", "1",
            "--seed", "1", "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "folder.png"), "--lora", f"{folder}:0.5"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "file.png"), "--lora", f"{weights}:0.5"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "folder.png") as a, Image.open(tmp_path / "file.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_model_file_given_as_a_lora_is_named_before_its_tensors_are_read(tiny_model_dir, tiny_pipe, tmp_path,
                                                                            monkeypatch):
    """The VAE given as --lora was "a LoRA for Stable Diffusion / SDXL (diffusers UNet)" (its
    decoder.up_blocks keys), and a whole DiT was read into memory before "no key matches"."""
    import safetensors.torch

    vae = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    dit = tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    assert one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--lora", f"{vae}:0.5") == (
        f"Error: {vae}: this is not a LoRA but model weights: a VAE (diffusers layout); load it as such (--vae FILE "
        f"on the command line, vae= in from_pretrained)")
    assert one_line_error("convert", str(dit), str(tmp_path / "out.safetensors"), "--to", "diffusers", "--lora",
                          str(dit)).startswith(f"Error: {dit}: this is not a LoRA but model weights: a Z-Image DiT")
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("the tensors were read"))
    with pytest.raises(ValueError, match=r"this is not a LoRA but model weights: a Z-Image DiT .*\(--transformer FILE"):
        tiny_pipe.load_lora(dit)


def test_a_side_past_the_position_table_is_refused_before_loading_and_by_the_library(tmp_path, tiny_pipe):
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--width", "8208",
                          "--height", "16")
    assert line == ("Error: --width must be at most 8192 pixels for this model (its position table covers 512 "
                    "patches of 16 pixels), got 8208"), line
    with pytest.raises(ValueError, match="height must be at most 8192 pixels"):
        tiny_pipe("a cat", width=16, height=8208, num_inference_steps=1)
    from zimage_native.sampling import check_size_fits

    check_size_fits(8192, 8192, (1536, 512, 512))


def test_a_token_limit_past_the_caption_positions_is_refused_before_loading(tmp_path, tiny_pipe):
    """A long prompt under a token limit above the DiT's caption positions failed after loading and
    encoding, with the model's internal message; the largest limit that always fits still runs."""
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--max-sequence-length", "1505")
    assert line == ("Error: --max-sequence-length must be at most 1504 for this model (its position table holds "
                    "1536 caption positions), got 1505"), line
    assert tiny_pipe.transformer_config.axes_lens[0] == 1536  # as the released DiTs
    long = "a cat " * 1000  # more than 1504 tokens in the chat format
    call = dict(width=32, height=32, num_inference_steps=1, seed=0, output_type="np")
    assert tiny_pipe(long, max_sequence_length=1504, **call).images.shape == (1, 32, 32, 3)
    calls = []
    with patch.object(tiny_pipe, "encode_texts", side_effect=lambda *a: calls.append(a)):
        with pytest.raises(ValueError, match=r"^max_sequence_length must be at most 1504 for this model .* got 1505$"):
            tiny_pipe("a cat", max_sequence_length=1505, **call)  # refused before encoding, short prompt or long
    assert calls == []


@pytest.mark.parametrize("args, message", [
    (["-o", "x.png", "--output-dir", "out"], "Error: -o/--output names the file itself; give it, or --output-dir"),
    (["--tile-size", "256"], "Error: --tile-size needs --tiled-vae"),
    (["--tile-overlap", "32"], "Error: --tile-overlap needs --tiled-vae"),
    (["--seeds", "2", "--num-images", "3"], "Error: --seeds 2 already gives 2 images per prompt"),
    (["--seed", "1", "2", "--num-images", "3"], "Error: got 2 seeds and --num-images 3: several seeds give one"),
    (["--seed", "1", "--seeds", "0"], "Error: --seeds must be >= 1, got 0"),  # was one image from --seed 1
    (["--seed", "1", "--seeds", "-2"], "Error: --seeds must be >= 1, got -2"),  # was "not both"
    (["--cfg-normalization", "-1"], "Error: --cfg-normalization must be >= 0"),
    # the library took it, and CFG ran on no step: --guidance-scale 2 made an image without guidance
    (["--guidance-scale", "2", "--cfg-truncation", "-1"], "Error: --cfg-truncation must be >= 0 (CFG stops on the "
                                                          "steps where 1 - sigma exceeds it, 1: never; below 0 it "
                                                          "runs on no step, which --guidance-scale 0 says), got -1.0"),
    (["--cfg-truncation", "nan"], "Error: --cfg-truncation must be >= 0"),
    (["--image", __file__, "--strength", "0"], "Error: --strength 0 runs no step"),  # was refused after loading
    (["--template", "rewriter-cinematic"], "Error: --template rewriter-cinematic is a rewriter: its system prompt "
                                           "instructs the prompt rewriter, not the image; rewrite first (zimage "
                                           "rewrite PROMPT --rewriter rewriter-cinematic)"),
])
def test_flags_that_would_be_ignored_or_meaningless_are_refused(tmp_path, args, message):
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args)
    assert line.startswith(message), line


def test_the_engines_warnings_name_the_flags_on_the_command_line(monkeypatch):
    import logging

    from zimage_native.cli import _common, main

    def warning(message, *args, name="zimage_native.sampling"):
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)
        assert _common.FlagNames().filter(record)
        return record.getMessage()

    assert warning("guidance_scale %g turns classifier-free guidance on for %s", 1.0, "Z-Image-Turbo") == (
        "--guidance-scale 1 turns classifier-free guidance on for Z-Image-Turbo")
    assert warning("tokens were cut. Raise max_sequence_length to keep them.") == (
        "tokens were cut. Raise --max-sequence-length to keep them.")
    assert warning("the image width is odd; pipe.cfg_truncation_x and --guidance_scale stay") == (
        "the image width is odd; pipe.cfg_truncation_x and --guidance_scale stay")  # words, attributes, flags
    assert warning("guidance_scale 1", name="torch._dynamo") == "guidance_scale 1"  # other libraries' logs
    assert warning("give width= and height= (e.g. width=%d, height=%d); strength=0.5 or mask_image=", 32, 48) == (
        "give --width and --height (e.g. --width=32, --height=48); --strength=0.5 or --mask")  # keywords
    assert warning("the width=%d and pipe.width= stay", 32) == "the --width=32 and pipe.width= stay"
    # the CLI's own handler carries the filter (where no other program configured logging first)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    main.callback(verbose=False)
    assert len(root.handlers) == 1 and any(isinstance(f, _common.FlagNames) for f in root.handlers[0].filters)


def test_a_too_small_input_image_gives_its_size(tiny_model_dir, tmp_path):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (8, 20)).save(small)
    line = one_line_error("generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu", "--steps", "1",
                          "--image", str(small), "-o", str(tmp_path / "x.png"), "--seed", "1")
    assert "8x20 gives 0x16" in line and "give --width and --height to resize it" in line, line


def test_an_off_grid_input_image_warns_in_flags(tiny_model_dir, tmp_path, monkeypatch):
    """`--image` 33x31 ran at 32x16 with a warning in the library's words, "give width= and height=
    (..., e.g. width=32, height=32)": on the command line it names the flags, through the CLI's own
    log handler (the one `zimage` installs)."""
    import logging

    from PIL import Image

    Image.new("RGB", (33, 31), (200, 10, 10)).save(tmp_path / "in.png")
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu",
                                       "--steps", "1", "--image", str(tmp_path / "in.png"), "-o",
                                       str(tmp_path / "x.png"), "--seed", "1"], prog_name="zimage")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING zimage_native.images: image is 33x31, whose sides are not all multiples of 16: the "
                        "run uses 32x16 (rounded down, as diffusers does); give --width and --height (multiples of "
                        "16, e.g. --width=32, --height=32) to choose the size the image is resized to"], result.output


def test_compile_alone_is_the_blocks_preset():
    """The predecessor's --compile was a bare flag: alone it means the blocks preset; a value still works."""
    generate = main.commands["generate"]
    for args, mode in ((["a cat", "--compile"], "blocks"), (["a cat", "--compile", "full"], "full"), (["a cat"], "off"),
                       (["--compile", "--steps", "2", "a cat"], "blocks")):
        ctx = generate.make_context("generate", list(args))
        assert ctx.params["compile_mode"] == mode, args


def test_the_exit_statuses_are_the_ones_docs_cli_md_lists(tmp_path):
    """docs/cli.md's "Exit status" table: 0, 1 (an input the command refuses while running), 2 (a command
    line that cannot be parsed, and a bare group's help with click >= 8.2) and 130 (Ctrl-C:
    tests/test_cli_generate.py); the cheap ones are checked here."""
    from importlib.metadata import version
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    section = text.split("### Exit status", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^\| (\d+) \|", section, re.M) == ["0", "1", "2", "130"]
    status = lambda *args: CliRunner().invoke(main, list(args), prog_name="zimage").exit_code  # noqa: E731
    assert status("--help") == status("generate", "--help") == status("--version") == 0
    assert status("generate", "a cat", "--bogus") == status("generate", "a cat", "--steps", "x") == 2
    assert status("generate", "a cat", "--steps", "0") == 1
    # the same mistakes in a config file are 1: the file is read when the command runs (the table says so)
    assert "anything wrong in a `--config` / `--profile` file" in section
    for flag, value in (("--width", "wide"), ("--offload", "bogus"), ("--transformer", str(tmp_path / "missing"))):
        assert status("generate", "a cat", flag, value) == 2
        config = tmp_path / "c.toml"
        config.write_text(f'[default]\n{flag[2:]} = "{value}"\n')
        assert status("generate", "a cat", "--config", str(config)) == 1, flag
    bare = 2 if tuple(int(v) for v in version("click").split(".")[:2]) >= (8, 2) else 0
    assert status() == status("templates") == bare


@pytest.mark.parametrize("args, message", [
    (["--tile-size", "7"], "Error: --tile-size must be a multiple of 16 and at least 64, got 7"),
    (["--tile-size", "256", "--tile-overlap", "200"], "Error: --tile-overlap must be a multiple of 16, >= 0 and "
                                                      "smaller than half the tile size (128), got 200"),
])
def test_bad_tile_settings_are_refused_before_loading(tmp_path, args, message):
    """`--tiled-vae --tile-size 7` loaded every weight (11 s on the tiny model under load; minutes for the
    released one), then failed in enable_vae_tiling; the model here does not exist, so the line shows
    the check ran first."""
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--tiled-vae", *args)
    assert line == message, line


def test_paths_and_file_names_in_messages_are_not_rewritten_as_flags(tmp_path):
    """A library name followed by '=' inside a path or a file name is not a keyword: `--model
    runs/width=512/model` was refused naming 'runs/--width=512/model', and a warning or error naming
    'strength=0.8.safetensors' or 'C:\\loras\\shift=3.gguf' named a file that does not exist."""
    import logging

    from zimage_native.cli import _common

    def warning(message, *args):
        record = logging.LogRecord("zimage_native.lora", logging.WARNING, __file__, 1, message, args, None)
        assert _common.FlagNames().filter(record)
        return record.getMessage()

    folder = tmp_path / "runs" / "width=512" / "model"
    line = one_line_error("generate", "a cat", "--model", str(folder))
    assert f"model folder not found: {folder} " in line, line
    line = one_line_error("generate", "a cat", "--model", str(tmp_path), "--lora", str(tmp_path / "strength=0.8.sft"))
    assert line == f"Error: --lora: LoRA file not found: {tmp_path / 'strength=0.8.sft'}", line
    for text in ("LoRA file not found: strength=0.8.safetensors", "read C:\\loras\\shift=3.gguf (width=32)",
                 "/data/guidance_scale/style.safetensors: 3 keys matched no module"):
        want = text.replace("(width=32)", "(--width=32)")
        assert _common.cli_message(text) == want and warning(text) == want, text
    assert warning("give width= for 'out/height=1/x.png'") == "give --width for 'out/height=1/x.png'"


def test_a_remote_encoder_with_a_text_encoder_quant_is_refused_in_flag_words(tmp_path):
    """`--encoder-url URL --text-encoder-quant int8` was refused in the library's words, "text_encoder_quant
    applies to a local text encoder; with text_encoder_url ...": a statement whose subject is an argument
    and 'applies', or that starts "with" an argument, names the flags; the same words mid-sentence, in a
    path or as another word stay."""
    from zimage_native.cli._common import cli_message

    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--encoder-url",
                          "http://127.0.0.1:9", "--text-encoder-quant", "int8")
    assert line == ("Error: --text-encoder-quant applies to a local text encoder; with --encoder-url the remote "
                    "server's setting applies (start it with --text-encoder-quant)"), line
    for text, want in (("offload applies to the DiT", "--offload applies to the DiT"),
                       ("bad: with width, height must be set", "bad: with --width, --height must be set"),
                       ("a run with guidance_scale 0 has no negatives", None), ("within offload the", None),
                       ("with widths of 16", None), ("with /data/width the file", None),
                       ("with text_encoder_url=x", "with --encoder-url=x")):
        assert cli_message(text) == (want or text), text


@pytest.mark.parametrize("said", ["CUDA out of memory. Tried to allocate 4.00 GiB. See documentation for Memory "
                                  "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
                                  "CUDA out of memory. Tried to allocate 4.00 GiB.", ""])
def test_out_of_memory_advice_starts_a_sentence_of_its_own(said):
    """torch's out-of-memory message ends in its docs' address in parentheses: the advice was joined
    to it as "...environment-variables) To use less memory". One with no message (an IndexError
    traceback before) is named."""
    from zimage_native.cli._common import UserError, user_errors

    def run():
        raise torch.OutOfMemoryError(said + "\nmore lines" if said else "")

    with pytest.raises(UserError) as raised:
        user_errors(run)()
    first = said.rstrip(".") or "out of memory"
    assert str(raised.value).startswith(f"{first}. To use less memory: a smaller --width/--height")


def test_sizes_are_printed_in_a_unit_that_shows_them():
    from zimage_native.devices import format_bytes

    assert [format_bytes(n) for n in (0, 1, 2, 48, 999, 1000, 121_872, 999_949, 999_950, 10**6, 10**8 - 1, 10**8)] == [
        "0 bytes", "1 byte", "2 bytes", "48 bytes", "999 bytes", "1.0 KB", "121.9 KB", "999.9 KB", "1.0 MB", "1.0 MB", "100.0 MB",
        "0.10 GB"]
