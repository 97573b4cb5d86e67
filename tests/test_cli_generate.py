"""zimage generate: batches and seeds, naming and overwrite, PNG metadata and --from-image, TOML
profiles, img2img, prompt fields and --debug."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zimage_native.cli import main
from zimage_native.metadata import read_metadata

BASE = ["--device", "cpu", "--width", "32", "--height", "32", "--steps", "1", "--no-progress"]


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_seed_list_prompts_file_and_naming(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# a comment\n\na dog\n")
    out = tmp_path / "out"
    run("generate", "--prompts-file", prompts, "--model", tiny_model_dir, "--output-dir", out, "--seed", 1, 2, 3,
        "--batch-size", 2, *BASE)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"zimage-{i:03d}-{s}.png" for i, s in enumerate([1, 2, 3, 1, 2, 3])]
    # Each image equals a single run with its own seed (batching does not change results).
    run("generate", "a dog", "--model", tiny_model_dir, "-o", tmp_path / "one.png", "--seed", 3, *BASE)
    assert np.abs(pixels(out / "zimage-005-3.png").astype(int) - pixels(tmp_path / "one.png")).max() <= 1


def test_the_step_bar_is_drawn_on_a_terminal_only(tiny_model_dir, tmp_path):
    """With stderr in a file (2>log) the bar's redraws would fill it; the "wrote" lines stay."""
    args = [a for a in BASE if a != "--no-progress"]
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "a.png", *args)
    assert f"wrote {tmp_path / 'a.png'}" in result.output, result.output
    assert "step/s" not in result.output and "%|" not in result.output, result.output


def test_batches_with_cfg_and_one_negative_prompt(tiny_model_dir, tmp_path):
    """--negative-prompt serves every image of a --batch-size batch under CFG, as it does one at a time."""
    cfg = ["--guidance-scale", 2.0, "--negative-prompt", "blurry", "--seed", 5, 6, *BASE]
    run("generate", "a cat", "--model", tiny_model_dir, "--output-dir", tmp_path / "b", "--batch-size", 2, *cfg)
    run("generate", "a cat", "--model", tiny_model_dir, "--output-dir", tmp_path / "s", *cfg)
    for name in ("zimage-000-5.png", "zimage-001-6.png"):
        assert np.abs(pixels(tmp_path / "b" / name).astype(int) - pixels(tmp_path / "s" / name)).max() <= 1


def test_num_images_uses_consecutive_seeds_and_pattern_fields(tiny_model_dir, tmp_path):
    run("generate", "A Cat!", "--model", tiny_model_dir, "--output-dir", tmp_path, "--seed", 10, "--num-images", 2,
        "--name-pattern", "{slug}-{prompt_index}-{seed}", *BASE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-cat-0-10.png", "a-cat-0-11.png"]


def test_random_seeds_are_printed(tiny_model_dir, tmp_path):
    result = run("generate", "a cat", "--model", tiny_model_dir, "--output-dir", tmp_path, "--seeds", 2, *BASE)
    seeds = result.output.split("seeds ")[1].split()[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"zimage-{i:03d}-{s}.png" for i, s in enumerate(seeds)]


def test_seed_minus_one_draws_a_random_seed(tiny_model_dir, tmp_path):
    """-1 is "random" in A1111 and stable-diffusion.cpp: taken literally it gave the same image every run."""
    firsts = []
    for folder in ("a", "b"):
        result = run("generate", "a cat", "--model", tiny_model_dir, "--output-dir", tmp_path / folder, "--seed", -1,
                     "--num-images", 2, *BASE)
        seeds = result.output.split("seeds ")[1].split()[:2]
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == \
            [f"zimage-{i:03d}-{s}.png" for i, s in enumerate(seeds)]
        firsts.append(seeds[0])
    assert firsts[0] != firsts[1] and "-1" not in firsts
    result = run("generate", "a cat", "--model", tiny_model_dir, "--output-dir", tmp_path / "c", "--seed", 3, "--seed",
                 -1, *BASE, ok=False)
    assert result.exit_code == 1 and "--seed -1 (a random seed) goes alone" in result.output


def test_existing_file_is_not_overwritten_without_flag(tiny_model_dir, tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", out, *BASE, ok=False)
    assert result.exit_code != 0 and "use --overwrite" in result.output and out.read_bytes() == b"keep"
    run("generate", "a cat", "--model", tiny_model_dir, "-o", out, "--overwrite", *BASE)
    assert out.read_bytes() != b"keep"


def test_images_get_the_umask_permissions(tiny_model_dir, tmp_path, umask_027):
    """The image is written to a temporary file and renamed into place: it has the permissions any
    new file gets under the umask (not tempfile's private 0600), and no temporary file is left."""
    out = tmp_path / "new" / "x.png"
    run("generate", "a cat", "--model", tiny_model_dir, "-o", out, *BASE)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask_027
    assert out.parent.stat().st_mode & 0o777 == 0o777 & ~umask_027
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]


def test_a_bad_request_is_named_before_the_outputs_are_touched(tiny_model_dir, tmp_path):
    """The request's own mistake first: an existing output does not hide a bad width, and a bad
    request creates no output folder."""
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", out, *BASE, "--width", "8", ok=False)
    assert result.exit_code == 1 and "--width must be a positive multiple of 16, got 8" in result.output
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "new" / "x.png", *BASE,
                 "--steps", "0", ok=False)
    assert "--steps must be an integer >= 1" in result.output and not (tmp_path / "new").exists()


def test_png_metadata_and_rerun_from_image(tiny_model_dir, tmp_path):
    first = tmp_path / "first.png"
    run("generate", 'a "red" cat', "--model", tiny_model_dir, "-o", first, "--seed", 42, "--device", "cpu",
        "--width", "48", "--height", "32", "--steps", "2", "--system-prompt", "be precise", "--no-progress")
    record = read_metadata(first)
    assert record["prompt"] == 'a "red" cat' and record["seed"] == 42 and record["steps"] == 2
    assert record["width"] == 48 and record["system_prompt"] == "be precise"
    assert record["formatted_prompt"].startswith("<|im_start|>system\nbe precise<|im_end|>")
    with Image.open(first) as im:
        text = im.info["parameters"]
    assert text.startswith('a "red" cat\nSteps: 2, Sampler: FlowMatch Euler') and "Seed: 42, Size: 48x32" in text
    again = tmp_path / "again.png"
    run("generate", "--from-image", first, "-o", again, "--device", "cpu", "--no-progress")
    assert np.array_equal(pixels(first), pixels(again))
    other = tmp_path / "other.png"
    run("generate", "--from-image", first, "-o", other, "--seed", 43, "--device", "cpu", "--no-progress")
    assert read_metadata(other)["seed"] == 43 and not np.array_equal(pixels(first), pixels(other))


def test_from_image_reruns_custom_sigmas_and_the_cfg_settings(tiny_model_dir, tiny_pipe, tmp_path):
    """The record holds what made the image: custom sigmas (a library call's; no flag sets them), CFG
    truncation and normalisation and the token limit. --from-image re-runs them (it ran the default
    schedule, no truncation, no normalisation and 512 tokens); --steps replaces the sigmas, with a note."""
    from zimage_native.metadata import image_record, png_info

    kw = dict(width=32, height=32, seed=4, guidance_scale=2.0, cfg_truncation=0.1, cfg_normalization=1.05,
              max_sequence_length=20)
    prompt = "a cat on a red sofa by a window, soft afternoon light, film grain"
    out = tiny_pipe(prompt, sigmas=[1.0, 0.7, 0.3], **kw)
    made = tmp_path / "made.png"
    out.images[0].save(made, pnginfo=png_info(image_record(out.info, 0)))
    record = read_metadata(made)
    assert record["sigmas"] == [1.0, 0.7, 0.3] and record["steps"] == 3
    assert (record["cfg_truncation"], record["cfg_normalization"], record["max_sequence_length"]) == (0.1, 1.05, 20)
    with Image.open(made) as im:
        assert "Sigmas: 1 0.7 0.3" in im.info["parameters"]
    for change in (dict(sigmas=None, num_inference_steps=3), dict(cfg_truncation=1.0), dict(cfg_normalization=0.0),
                   dict(max_sequence_length=512)):  # each setting changes this image
        args = {**kw, "sigmas": [1.0, 0.7, 0.3], **change}
        assert not np.array_equal(np.asarray(tiny_pipe(prompt, **args).images[0]), pixels(made)), change
    again = tmp_path / "again.png"
    run("generate", "--from-image", made, "-o", again, "--device", "cpu", "--no-progress")
    assert np.array_equal(pixels(again), pixels(made))
    assert read_metadata(again)["sigmas"] == [1.0, 0.7, 0.3]
    other = tmp_path / "other.png"
    result = run("generate", "--from-image", made, "-o", other, "--device", "cpu", "--no-progress", "--steps", "2")
    assert "--steps 2 replaces the 3 custom sigmas recorded in" in result.output
    assert "sigmas" not in read_metadata(other) and read_metadata(other)["steps"] == 2


def test_seed_variance_flags_metadata_and_rerun(tiny_model_dir, tmp_path):
    varied, plain = tmp_path / "varied.png", tmp_path / "plain.png"
    run("generate", "a cat", "--model", tiny_model_dir, "-o", varied, "--seed", 5, *BASE, "--steps", "2",
        "--seed-variance", "20", "--seed-variance-steps", "0.5")
    run("generate", "a cat", "--model", tiny_model_dir, "-o", plain, "--seed", 5, *BASE, "--steps", "2")
    assert not np.array_equal(pixels(varied), pixels(plain))
    record = read_metadata(varied)
    assert (record["seed_variance"], record["seed_variance_share"], record["seed_variance_steps"]) == (20, 0.5, 0.5)
    with Image.open(varied) as im:
        assert "Seed variance: 20.0 (share 0.5, steps 0.5)" in im.info["parameters"]
    again = tmp_path / "again.png"
    run("generate", "--from-image", varied, "-o", again, "--device", "cpu", "--no-progress")
    assert np.array_equal(pixels(varied), pixels(again))
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "bad.png", *BASE,
                 "--seed-variance", "20", "--seed-variance-share", "0", ok=False)
    assert result.exit_code == 1 and "--seed-variance-share must be > 0" in result.output
    for flag in ("--seed-variance-share", "--seed-variance-steps"):  # alone, it would change nothing
        result = run("generate", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "bad.png", *BASE, flag, "0.9",
                     ok=False)
        assert result.exit_code == 1 and f"{flag} 0.9 needs --seed-variance A (seed variance is off" in result.output
        assert not (tmp_path / "bad.png").exists()


def test_first_block_cache_flag_reports_metadata_and_rerun(tiny_model_dir, tmp_path):
    cached, plain = tmp_path / "cached.png", tmp_path / "plain.png"
    # The tiny random DiT changes too much between steps for usual thresholds: 1e6 reuses every step after the first.
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", cached, "--seed", 5, *BASE, "--steps", "3",
                 "--first-block-cache", "1e6")
    assert "first-block cache: 2 of 3 DiT forwards reused the main layers" in result.output
    run("generate", "a cat", "--model", tiny_model_dir, "-o", plain, "--seed", 5, *BASE, "--steps", "3")
    assert not np.array_equal(pixels(cached), pixels(plain))
    record = read_metadata(cached)
    assert record["first_block_cache"] == 1e6 and record["first_block_cache_forwards"] == {"full": 1, "reused": 2}
    with Image.open(cached) as im:
        assert "First block cache: 1000000.0" in im.info["parameters"]
    again = tmp_path / "again.png"
    run("generate", "--from-image", cached, "-o", again, "--device", "cpu", "--no-progress")
    assert np.array_equal(pixels(cached), pixels(again))


@pytest.mark.parametrize("flags, message", [
    (["--first-block-cache", "-1"], "--first-block-cache must be a number >= 0"),
    (["--first-block-cache", "0.1", "--cuda-graphs"], "turn off CUDA graphs (--no-cuda-graphs)"),
    (["--first-block-cache", "0.1", "--compile", "full"], 'use compile mode "blocks" (--compile blocks)'),
])
def test_first_block_cache_refused_before_loading(tmp_path, monkeypatch, flags, message):
    cli_generate = sys.modules["zimage_native.cli.generate"]  # the package's `generate` is the command
    monkeypatch.setattr(cli_generate, "load_pipeline", lambda o: pytest.fail("loaded the weights"))
    result = run("generate", "a cat", "--model", tmp_path, "-o", tmp_path / "out" / "x.png", *BASE, *flags, ok=False)
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_from_image_of_single_files_loads_the_recorded_files(tmp_path):
    """An image made from single files alone records no model folder (its "model" is a description):
    the re-run loads the recorded files instead of taking that text for --model."""
    from zimage_native.cli.generate import from_image_layer
    from zimage_native.metadata import png_info

    record = {"prompt": "a cat", "model": "single files: transformer=dit.gguf, vae=ae.safetensors, text_encoder=te",
              "transformer": "dit.gguf", "vae": "ae.safetensors", "text_encoder": "te", "tokenizer": "tok",
              "text_encoder_quant": "int8"}
    path = tmp_path / "single.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(record))
    layer, prompt = from_image_layer(path)
    assert prompt == "a cat" and "model" not in layer
    assert {k: layer[k] for k in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_quant")} == {
        "transformer": "dit.gguf", "vae": "ae.safetensors", "text_encoder": "te", "tokenizer": "tok",
        "text_encoder_quant": "int8"}


def test_from_image_without_metadata_fails_clearly(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = run("generate", "--from-image", plain, ok=False)
    assert result.exit_code == 1 and "no zimage-native generation metadata" in result.output


def test_config_profiles_and_precedence(tiny_model_dir, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'''
[default]
model_path = "{tiny_model_dir}"
device = "cpu"
progress = false

[default.generation]
width = 64
height = 32
steps = 1

[small]
width = 32
''')
    run("generate", "a cat", "--config", config, "-o", tmp_path / "a.png", "--seed", 1)
    assert Image.open(tmp_path / "a.png").size == (64, 32)  # [default]
    run("generate", "a cat", "--config", config, "--profile", "small", "-o", tmp_path / "b.png", "--seed", 1)
    assert Image.open(tmp_path / "b.png").size == (32, 32)  # profile over default
    run("generate", "a cat", "--config", config, "--profile", "small", "--width", "48", "-o", tmp_path / "c.png",
        "--seed", 1)
    assert Image.open(tmp_path / "c.png").size == (48, 32)  # flags over profile


@pytest.mark.parametrize(
    "body, message",
    [
        ("[default]\nwidht = 64\n",
         "[default].widht: unknown key 'widht' for `zimage generate`; did you mean 'width'?"),
        ("[default]\nzzz = 64\n", "unknown key 'zzz' for `zimage generate`\n"),  # nothing close: no suggestion
        ("[default]\nvae = \"nope.safetensors\"\n", "[default].vae: Path 'nope.safetensors' does not exist (relative "
         "paths are read from the current folder"),
        ("[default]\nwidth = \"wide\"\n", "'width' has the wrong type"),
        ("[default]\ntiled_vae = 3\n", "'tiled_vae' must be true or false"),
        ("[default]\nwidth = 64\n[x]\nheight = 1.5\n", "'height' has the wrong type"),
        ("[default\n", "invalid TOML"),
        # Windows paths in "..." strings: an invalid escape fails to parse, a valid one ("\n", "\t") would
        # turn into a control character silently; both say how to write the path
        ("[default]\ntransformer = \"D:\\models\\z.gguf\"\n", "in a string (at line 2, column "  # the position is tomllib's
         "20)); in a TOML \"...\" string a backslash starts an escape: write Windows paths with forward "
         "slashes (\"C:/models/z.gguf\") or in single quotes ('C:\\models\\z.gguf')"),
        ("[default]\nmodel = \"C:\\Users\\me\\zimage\"\n", "invalid TOML (Invalid hex value"),
        ("[default]\nmodel = \"D:\\new\\turbo\"\n", "[default].model: 'model' holds a control character ('D:\\new\\turbo'): "
         "in a TOML \"...\" string a backslash starts an escape"),
        ("[default]\ntransformer = \"D:\\turbo.gguf\"\n", "'transformer' holds a control character"),
    ],
)
def test_config_errors_name_the_key(tmp_path, body, message):
    config = tmp_path / "bad.toml"
    config.write_text(body)
    profile = ["--profile", "x"] if "[x]" in body else []
    result = run("generate", "a cat", "--config", config, *profile, ok=False)
    assert result.exit_code == 1 and message in result.output, result.output


def config_values(tmp_path, body: str, command: str = "generate", profile: str | None = None) -> dict:
    """What a config file sets for a command (after its checks and conversions)."""
    import click

    from zimage_native.cli import main
    from zimage_native.cli.config import convert, read_profile

    path = tmp_path / "c.toml"
    path.write_text(body)
    return convert(click.Context(main.commands[command]), read_profile(path, profile))


@pytest.mark.parametrize("command", ["generate", "serve", "rewrite", "bench"])
def test_dtype_takes_the_short_names_as_convert_does(tmp_path, command):
    """`--dtype bf16` (the docs' spelling, and `zimage convert --dtype`'s) was refused by generate,
    serve, rewrite and bench, in a flag and in a config file; it reads as bfloat16 now, and a typo
    is still refused with the choices."""
    import click

    from zimage_native.cli import main

    cmd = main.commands[command]
    args = [] if command in ("serve", "bench") else ["a cat"]
    for short, long in (("bf16", "bfloat16"), ("BF16", "bfloat16"), ("fp32", "float32"), ("bfloat16", "bfloat16")):
        assert cmd.make_context(command, [*args, "--dtype", short]).params["dtype"] == long
    if command != "bench":  # bench runs bf16 or fp32 only
        assert cmd.make_context(command, [*args, "--dtype", "fp16"]).params["dtype"] == "float16"
    with pytest.raises(click.BadParameter, match="'bf15' is not one of 'auto', 'bfloat16'"):
        cmd.make_context(command, [*args, "--dtype", "bf15"])
    if command in ("generate", "serve"):
        assert config_values(tmp_path, '[default]\ndtype = "bf16"\n', command)["dtype"] == "bfloat16"


def test_convert_dtype_takes_the_long_names_as_the_other_commands_do(tmp_path):
    """`zimage convert --dtype bfloat16` (torch's spelling, and generate's) was refused: "'bfloat16'
    is not one of 'keep', 'fp32', 'bf16', 'fp16', 'fp8'"; it reads as bf16 now, a typo is still
    refused with the choices."""
    import click

    from zimage_native.cli import main

    cmd = main.commands["convert"]
    args = [str(tmp_path), "out.safetensors", "--to", "comfy"]
    for given, read in (("bfloat16", "bf16"), ("Float32", "fp32"), ("float16", "fp16"), ("bf16", "bf16"),
                        ("fp8", "fp8"), ("keep", "keep")):
        assert cmd.make_context("convert", [*args, "--dtype", given]).params["dtype"] == read
    with pytest.raises(click.BadParameter, match="'bfloat15' is not one of 'keep', 'fp32'"):
        cmd.make_context("convert", [*args, "--dtype", "bfloat15"])


def test_config_keys_are_the_flag_names(tmp_path):
    """Keys are the flags' names with underscores, also where the parameter is named otherwise
    (--compile, --lora, --image): those failed as unknown keys."""
    (tmp_path / "in.png").write_bytes(b"")
    values = config_values(tmp_path, f'[default]\ncompile = "blocks"\nlora = ["a.safetensors:0.5"]\n'
                                     f'image = "{tmp_path / "in.png"}"\n')
    assert values["compile_mode"] == "blocks" and values["loras"] == ("a.safetensors:0.5",)
    assert str(values["init_image"]) == str(tmp_path / "in.png")
    with pytest.raises(ValueError, match="unknown key 'config'"):
        config_values(tmp_path, '[default]\nconfig = "other.toml"\n')


PREDECESSOR_CONFIG = """
[default]
model_path = "{model}"
templates_dir = "{templates}"

[default.encoder]
device = "cpu"
torch_dtype = "bfloat16"
quantization = "8bit"
cpu_offload = false

[default.pipeline]
device = "cpu"

[default.generation]
width = 64
height = 32
steps = 1
guidance_scale = 0.0

[default.scheduler]
shift = 3.0

[default.optimization]
flash_attn = false
compile = false
cpu_offload = false

[default.pytorch]
attention_backend = "sdpa"
use_custom_scheduler = false
tiled_vae = false
tile_size = 512
tile_overlap = 64

[default.lora]
paths = []
scales = []

[fast]
[fast.optimization]
compile = true
flash_attn = true
cpu_offload = true

[fast.encoder]
cpu_offload = true

[fast.lora]
paths = ["style.safetensors", "detail.safetensors"]
scales = [0.8, 0.5]
"""


def test_the_predecessors_config_file_reads_as_it_meant(tiny_model_dir, tmp_path):
    """The predecessor's documented config.toml: its sub-tables give [encoder] device and torch_dtype to
    the text encoder and the dtype, cpu_offload to --offload, flash_attn and compile to --attention and
    --compile, [lora] paths and scales to --lora; use_custom_scheduler is what the engine always does."""
    (tmp_path / "templates").mkdir()
    body = PREDECESSOR_CONFIG.format(model=tiny_model_dir, templates=tmp_path / "templates")
    values = config_values(tmp_path, body)
    assert values["model"] == str(tiny_model_dir) and values["text_encoder_device"] == "cpu"
    assert values["device"] == "cpu" and values["dtype"] == "bfloat16" and values["text_encoder_quant"] == "int8"
    assert values["attention"] == "sdpa" and values["compile_mode"] == "off" and "offload" not in values
    assert "loras" not in values and values["tile_size"] == 512 and values["tiled_vae"] is False
    fast = config_values(tmp_path, body, profile="fast")
    assert fast["compile_mode"] == "blocks" and fast["attention"] == "flash_attn_2"
    assert fast["offload"] == "text_encoder"  # [fast.encoder] comes after [fast.optimization] in the file
    assert fast["loras"] == ("style.safetensors:0.8", "detail.safetensors:0.5")
    with pytest.raises(ValueError, match=r"\[bad\]\.lora: paths must be a list and scales a list of the same"):
        config_values(tmp_path, body + '[bad.lora]\npaths = ["a"]\nscales = [1.0, 2.0]\n', profile="bad")
    run("generate", "a cat", "--config", tmp_path / "c.toml", "-o", tmp_path / "a.png", "--seed", 1)
    assert Image.open(tmp_path / "a.png").size == (64, 32)


def test_unknown_profile_lists_the_tables(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[default]\n[h100]\n")
    result = run("generate", "a cat", "--config", config, "--profile", "a100", ok=False)
    assert result.output.endswith("no profile [a100]; its profiles are h100\n"), result.output
    config.write_text("[default]\nwidth = 32\n")
    result = run("generate", "a cat", "--config", config, "--profile", "a100", ok=False)
    assert result.output.endswith("no profile [a100]; it has no profiles, only [default]\n"), result.output


def test_a_mistyped_profile_of_the_shipped_config_gets_the_one_meant(tmp_path):
    """`--profile rtx4900` (or 12GB, lowvram) listed the shipped profiles but not the one meant, where a
    mistyped config key gets "did you mean"; a profile close to one of them is named now (a100, no
    closer to h100 than 0.75, gets none: an A100 is not an H100)."""
    for typed, meant in (("rtx4900", "rtx4090"), ("12GB", "12gb"), ("lowvram", "low_vram")):
        result = run("generate", "a cat", "--profile", typed, "-o", tmp_path / "a.png", ok=False)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.endswith(f"no profile [{typed}]; its profiles are 12gb, 16gb, 8gb, h100, low_vram, "
                                      f"rtx4090; did you mean '{meant}'?\n"), result.output
    result = run("generate", "a cat", "--profile", "a100", "-o", tmp_path / "a.png", ok=False)
    assert result.output.endswith("its profiles are 12gb, 16gb, 8gb, h100, low_vram, rtx4090\n"), result.output


def test_a_profile_typed_in_another_case_than_the_files_gets_the_one_meant(tmp_path):
    """d8123f6 case-folded only the name typed: a file's [RTX4090] or [A100-80GB] typed as rtx4090 or
    a100-80gb (the likeliest slip, only the case) got no 'did you mean'. Both sides are folded now,
    and the profile is named as the file spells it."""
    body = "[default]\nsteps = 2\n[RTX4090]\nwidth = 32\n[A100-80GB]\nwidth = 64\n"
    for typed, meant in (("rtx4090", "RTX4090"), ("a100-80gb", "A100-80GB"), ("rtx4900", "RTX4090")):
        with pytest.raises(ValueError, match=rf"no profile \[{typed}\]; its profiles are A100-80GB, RTX4090; "
                                             rf"did you mean '{meant}'\?$"):
            config_values(tmp_path, body, profile=typed)
    assert config_values(tmp_path, body, profile="RTX4090")["width"] == 32


def test_a_serve_key_in_a_table_generate_reads_says_where_it_goes(tmp_path):
    with pytest.raises(ValueError, match=r"\[default\]\.queue_size: unknown key 'queue_size' for `zimage generate`; "
                                         r"it is a `zimage serve` key: put it in a profile that only `zimage serve`"):
        config_values(tmp_path, "[default]\nqueue_size = 4\n")
    assert config_values(tmp_path, "[default]\nqueue_size = 4\n", command="serve")["queue_size"] == 4


def test_a_key_above_every_table_is_refused_not_ignored(tmp_path):
    """A first config file often starts with bare keys; TOML puts them at the top level, which neither
    [default] nor a profile is, so they were silently ignored."""
    with pytest.raises(ValueError, match=r"c.toml: 'steps' is not in a table; put it under \[default\] \(always "
                                         r"applied\) or under a \[profile\]"):
        config_values(tmp_path, 'steps = 2\nmodel = "x"\n[default]\nwidth = 32\n')
    assert config_values(tmp_path, "[default]\nsteps = 2\n")["steps"] == 2


def test_shipped_example_config_is_valid(tmp_path, monkeypatch):
    from pathlib import Path

    import click

    from zimage_native.cli.config import convert, read_profile, tomllib
    from zimage_native.cli.generate import generate

    example = Path(__file__).resolve().parents[1] / "zimage_native" / "config.example.toml"
    tables = [k for k, v in tomllib.loads(example.read_text()).items() if isinstance(v, dict)]
    assert {"default", "h100", "rtx4090", "16gb", "12gb", "8gb", "low_vram"} <= set(tables)
    monkeypatch.chdir(tmp_path)  # the files the profiles name (relative paths) must exist
    for table in tables:
        for key in ("transformer", "vae", "text_encoder"):
            name = read_profile(example, table).get(key)
            if name:
                Path(name[0]).parent.mkdir(parents=True, exist_ok=True)
                Path(name[0]).touch()
    ctx = click.Context(generate)
    for profile in tables:
        assert convert(ctx, read_profile(example, profile))


def test_img2img_from_the_cli(tiny_model_dir, tiny_pipe, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8")).save(src)
    out = tmp_path / "out.png"
    run("generate", "a cat", "--model", tiny_model_dir, "--image", src, "--strength", "0.5", "-o", out, "--seed", 2,
        "--steps", "4", "--device", "cpu", "--no-progress")
    with Image.open(src) as im:
        expected = tiny_pipe.img2img("a cat", im.convert("RGB"), strength=0.5, num_inference_steps=4, seed=2).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert read_metadata(out)["strength"] == 0.5
    # --width/--height resize the input as the library's width=/height= do (docs/tasks.md)
    sized = tmp_path / "sized.png"
    run("generate", "a cat", "--model", tiny_model_dir, "--image", src, "--strength", "0.5", "-o", sized, "--seed", 2,
        "--steps", "2", "--width", "32", "--height", "48", "--device", "cpu", "--no-progress")
    with Image.open(src) as im:
        expected = tiny_pipe.img2img("a cat", im.convert("RGB"), strength=0.5, num_inference_steps=2, seed=2,
                                     width=32, height=48).images[0]
    assert pixels(sized).shape == (48, 32, 3) and np.array_equal(pixels(sized), np.asarray(expected))
    # --from-image needs the input image again (it is not stored): without it the rerun is refused
    result = run("generate", "--from-image", out, "-o", tmp_path / "again.png", "--device", "cpu", ok=False)
    assert result.exit_code == 1 and "give it again with --image" in result.output
    run("generate", "--from-image", out, "--image", src, "-o", tmp_path / "again.png", "--device", "cpu",
        "--no-progress")
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(out))


def test_inpaint_from_the_cli(tiny_model_dir, tiny_pipe, tmp_path):
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8")).save(src)
    m = np.zeros((48, 64), dtype="uint8")
    m[8:40, 16:48] = 255
    Image.fromarray(m).convert("RGB").save(mask)  # a mask saved as RGB is read as grey
    out = tmp_path / "out.png"
    run("generate", "a cat", "--model", tiny_model_dir, "--image", src, "--mask", mask, "-o", out, "--seed", 2,
        "--steps", "3", "--device", "cpu", "--no-progress")
    with Image.open(src) as im, Image.open(mask) as mk:
        expected = tiny_pipe.inpaint("a cat", im.convert("RGB"), mk.convert("L"), num_inference_steps=3,
                                     seed=2).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert read_metadata(out)["strength"] == 1.0  # inpainting's default
    result = run("generate", "a cat", "--model", tiny_model_dir, "--mask", mask, "-o", tmp_path / "x.png", ok=False)
    assert result.exit_code == 1 and "--mask needs --image" in result.output
    # A 16-bit mask is read by its range (converting it to 8-bit grey clipped it: 1.5% grey was repainted)
    m16 = m.astype(np.uint16) * 257
    m16[:, :16] = 1000
    Image.fromarray(m16).save(mask)
    run("generate", "a cat", "--model", tiny_model_dir, "--image", src, "--mask", mask, "-o", out, "--seed", 2,
        "--steps", "3", "--device", "cpu", "--no-progress", "--overwrite")
    assert np.array_equal(pixels(out), np.asarray(expected))


def test_shift_flag_and_profile_key(tiny_model_dir, tiny_pipe, tmp_path):
    run("generate", "a cat", "--model", tiny_model_dir, "--shift", "6", "-o", tmp_path / "s.png", "--seed", 4, *BASE,
        "--steps", 2)
    expected = tiny_pipe("a cat", width=32, height=32, num_inference_steps=2, seed=4, shift=6.0).images[0]
    assert np.array_equal(pixels(tmp_path / "s.png"), np.asarray(expected))
    assert read_metadata(tmp_path / "s.png")["shift"] == 6.0
    assert not np.array_equal(np.asarray(expected), np.asarray(
        tiny_pipe("a cat", width=32, height=32, num_inference_steps=2, seed=4).images[0]))
    config = tmp_path / "shift.toml"
    config.write_text("[default]\nshift = 6.0\n")
    run("generate", "a cat", "--model", tiny_model_dir, "--config", config, "-o", tmp_path / "t.png", "--seed", 4,
        *BASE, "--steps", 2)
    assert np.array_equal(pixels(tmp_path / "t.png"), np.asarray(expected))
    run("generate", "--from-image", tmp_path / "t.png", "--model", tiny_model_dir, "-o", tmp_path / "u.png", *BASE,
        "--steps", 2)
    assert np.array_equal(pixels(tmp_path / "u.png"), np.asarray(expected))  # --from-image keeps the shift
    result = run("generate", "a cat", "--model", tiny_model_dir, "--shift", "0", *BASE, "--steps", 2, ok=False)
    assert result.exit_code == 1 and "--shift must be > 0, got 0.0" in result.output


def test_template_and_debug_output(tiny_model_dir, tmp_path):
    result = run("generate", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "t.png", "--template",
                 "photo-portrait-85mm", "--debug", "--seed", 1, *BASE)
    assert "<|im_start|>system\n" in result.output and "token ids: [" in result.output
    assert "embedding: shape (" in result.output
    assert read_metadata(tmp_path / "t.png")["template"] == "photo-portrait-85mm"


def test_unknown_template_is_one_line(tiny_model_dir, tmp_path):
    result = run("generate", "a cat", "--model", tiny_model_dir, "--template", "photo-portrait-85", "-o",
                 tmp_path / "u.png", *BASE, ok=False)
    assert result.exit_code == 1 and "photo-portrait-85mm" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_tiled_vae_and_offload_flags_run(tiny_model_dir, tmp_path):
    run("generate", "a cat", "--model", tiny_model_dir, "-o", tmp_path / "v.png", "--tiled-vae", "--tile-size", "128",
        "--tile-overlap", "32", "--offload", "model", "--seed", 1, *BASE)
    assert (tmp_path / "v.png").exists()


def test_single_files_and_lora_flags(tiny_model_dir, tiny_pipe, tmp_path, monkeypatch):
    """--transformer/--vae/--text-encoder/--tokenizer load single files; --lora fuses and is recorded,
    without a host copy of the weights it changes (a CLI run never unloads it)."""
    from zimage_native.lora import LoraStack
    import torch
    from safetensors.torch import save_file

    from zimage_native.loading import load_state_dict

    dit = tmp_path / "dit.safetensors"
    save_file(load_state_dict(tiny_model_dir / "transformer"), dit)
    vae = tmp_path / "vae.safetensors"
    save_file(load_state_dict(tiny_model_dir / "vae"), vae)
    te = tmp_path / "te.safetensors"
    save_file({f"model.{k}": v for k, v in load_state_dict(tiny_model_dir / "text_encoder").items()}, te)
    out = tmp_path / "single.png"
    base = ["--device", "cpu", "--width", "32", "--height", "32", "--steps", "1", "--no-progress", "--seed", "4"]
    run("generate", "a cat", "--model", tiny_model_dir, "--transformer", dit, "--vae", vae, "--text-encoder", te,
        "-o", out, *base)
    expected = tiny_pipe("a cat", width=32, height=32, num_inference_steps=1, seed=4).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    # Another DiT file over the folder's is recorded, and --from-image loads it again (it loaded the folder's)
    state = load_state_dict(tiny_model_dir / "transformer")
    state = {k: v * 1.5 if k.startswith("layers.0.") else v for k, v in state.items()}
    tuned = tmp_path / "tuned.safetensors"
    save_file(state, tuned)
    made, again = tmp_path / "tuned.png", tmp_path / "tuned-again.png"
    run("generate", "a cat", "--model", tiny_model_dir, "--transformer", tuned, "-o", made, *base)
    assert read_metadata(made)["transformer"] == str(tuned) and not np.array_equal(pixels(made), pixels(out))
    run("generate", "--from-image", made, "-o", again, *base[:-2])
    assert np.array_equal(pixels(again), pixels(made))
    # A LoRA on one projection: recorded in the metadata and changes the image.
    w = tiny_pipe.transformer.layers[0].attention.to_q.weight
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.randn(4, w.shape[1]),
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.randn(w.shape[0], 4)}, lora)
    styled = tmp_path / "styled.png"
    stacks = []
    load = LoraStack.load
    monkeypatch.setattr(LoraStack, "load", lambda self, *a, **k: stacks.append(self) or load(self, *a, **k))
    result = run("generate", "a cat", "--model", tiny_model_dir, "--lora", f"{lora}:0.5", "-o", styled, *base)
    assert "1 modules matched" in result.output
    assert len(stacks) == 1 and stacks[0].originals == {} and stacks[0].no_undo
    assert read_metadata(styled)["loras"] == [[str(lora), 0.5]]
    assert not np.array_equal(pixels(styled), pixels(out))
    # --from-image loads the recorded LoRAs again (it ran without them)
    again = tmp_path / "again.png"
    run("generate", "--from-image", styled, "-o", again, *base[:-2])
    assert np.array_equal(pixels(again), pixels(styled)) and read_metadata(again)["loras"] == [[str(lora), 0.5]]


def test_a_shipped_profile_alone_and_its_gguf_path_replaced_by_the_flag(tiny_model_dir, tmp_path, monkeypatch):
    """--profile NAME without --config reads the shipped example; a GGUF path it names that is not
    there is no error when --transformer replaces it, and otherwise says where it was looked for."""
    monkeypatch.chdir(tmp_path)  # no models/ folder here
    dit = next((tiny_model_dir / "transformer").glob("*.safetensors"))
    common = ["generate", "a cat", "--profile", "12gb", "--model", tiny_model_dir, *BASE]
    run(*common, "--transformer", dit, "-o", tmp_path / "a.png")
    assert (tmp_path / "a.png").is_file()
    result = run(*common, "-o", tmp_path / "b.png", ok=False)
    assert result.exit_code == 1 and not (tmp_path / "b.png").exists()
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "config.example.toml: [12gb].transformer: Path " in line
    assert "models/z_image_turbo-Q6_K.gguf' does not exist (relative paths are read from the current folder, " \
           f"{tmp_path}; --transformer on the command line replaces it); download a GGUF DiT there, for example " \
           "from jayn7/Z-Image-Turbo-GGUF on the Hugging Face Hub" in line
    assert "wrong type" not in line


def test_a_refusal_caused_by_a_profile_names_the_profile(tmp_path, monkeypatch):
    """`--profile 8gb --fp8` was refused as "--offload='blocks' streams the DiT's blocks ...", an
    offload the user never typed: the shipped [8gb] profile sets it. A refusal that names a flag set
    by the config now says which profile (or [default]) of which file set it, and how to override
    it; a flag typed on the command line gets no such note."""
    from zimage_native.cli.config import EXAMPLE_CONFIG

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "z_image_turbo-Q4_K_M.gguf").touch()  # the profile's DiT path (refused before it is read)
    common = ["generate", "a cat", "--device", "cpu", "-o", tmp_path / "a.png"]
    for extra in (["--fp8"], ["--compile", "blocks"]):
        result = run(*common, "--profile", "8gb", *extra, ok=False)
        line = result.output.strip().splitlines()[-1]
        assert result.exit_code == 1 and line.startswith("Error: --offload='blocks' streams the DiT's blocks"), line
        assert line.endswith(f"(--offload='blocks' comes from profile 8gb ([8gb].offload in {EXAMPLE_CONFIG}): give "
                             f"--offload none on the command line to override it, or pick another profile)"), line
    # its own data folder and --port 0: the default ones (~/.local/share/zimage-native/server, 8000) are
    # shared with the other pytest worker, a concurrent job and the user's own server (port 8000 in
    # use failed this test: "Error: --port 8000: cannot listen on 127.0.0.1:8000")
    line = run("serve", "--profile", "8gb", "--fp8", "--device", "cpu", "--data-dir", tmp_path / "d", "--port", "0",
               ok=False).output.strip().splitlines()[-1]
    assert line.endswith(f"(--offload='blocks' comes from profile 8gb ([8gb].offload in {EXAMPLE_CONFIG}): give "
                         f"--offload none on the command line to override it, or pick another profile)"), line
    typed = run(*common, "--profile", "8gb", "--fp8", "--offload", "blocks", ok=False).output.strip()
    assert typed.startswith("Error: --offload='blocks' streams") and "comes from" not in typed, typed
    config = tmp_path / "c.toml"
    config.write_text('[default]\noffload = "blocks"\n')
    line = run(*common, "--config", config, "--fp8", ok=False).output.strip().splitlines()[-1]
    assert line.endswith(f"(--offload='blocks' comes from the config's [default] table ([default].offload in "
                         f"{config}, applied to every run): give --offload none on the command line to override "
                         f"it, or edit {config})"), line


def test_a_refusal_note_never_shows_a_secret_nor_a_value_an_environment_variable_replaced(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    """The config note of a refusal printed a config's encoder_token in clear (a remote encoder's 401
    names --encoder-token), and blamed the config for it when ZIMAGE_ENCODER_TOKEN had replaced it
    (click's environment value wins over the config, as apply_layers has it)."""
    cli_generate = sys.modules["zimage_native.cli.generate"]  # the package's `generate` is the command

    def refused(o):
        raise ValueError("HTTP 401: the token given is not the server's --token (check --encoder-token)")

    monkeypatch.setattr(cli_generate, "load_pipeline", refused)
    monkeypatch.delenv("ZIMAGE_ENCODER_TOKEN", raising=False)
    config = tmp_path / "c.toml"
    config.write_text('[default]\nencoder_token = "s3cret-token"\n')
    common = ["generate", "a cat", "--model", tiny_model_dir, *BASE, "--output-dir", tmp_path, "--config", config]
    line = run(*common, ok=False).output.strip().splitlines()[-1]
    assert line.startswith("Error: HTTP 401") and "s3cret" not in line, line
    assert line.endswith(f"(--encoder-token=(a secret, not shown) comes from the config's [default] table "
                         f"([default].encoder_token in {config}, applied to every run): give another "
                         f"--encoder-token on the command line to override it, or edit {config})"), line
    monkeypatch.setenv("ZIMAGE_ENCODER_TOKEN", "from-the-environment")
    line = run(*common, ok=False).output.strip().splitlines()[-1]
    assert line == "Error: HTTP 401: the token given is not the server's --token (check --encoder-token)", line


def test_compile_for_a_single_image_says_what_it_costs(tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    cli_generate = sys.modules["zimage_native.cli.generate"]  # the package's `generate` is the command

    def stop(*args):
        raise ValueError("stopped before sampling")

    monkeypatch.setattr(cli_generate, "load_pipeline", lambda o: SimpleNamespace())  # loaded and optimised
    monkeypatch.setattr(cli_generate, "check_speed_flags", lambda o: None)  # (--cuda-graphs needs a GPU)
    monkeypatch.setattr(cli_generate, "run_jobs", stop)
    common = ["generate", "a cat", "--model", tiny_model_dir, *BASE, "--output-dir", tmp_path]
    one = run(*common, "--compile", "blocks", "--cuda-graphs", ok=False)
    assert "note: --compile, --cuda-graphs add their cold start (compiling, capturing) to this run of one image" \
        in one.output and "stopped before sampling" in one.output
    assert "note: --vae-compile adds its cold start" in run(*common, "--vae-compile", ok=False).output
    for extra in (["--compile", "blocks", "--num-images", "2"], []):
        assert "cold start" not in run(*common, *extra, ok=False).output


def test_speed_flags_that_cannot_run_fail_before_the_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    cli_generate = sys.modules["zimage_native.cli.generate"]
    monkeypatch.setattr(cli_generate, "load_pipeline", lambda o: pytest.fail("the weights were loaded"))
    out = tmp_path / "new"
    for extra, words in ((["--cuda-graphs"], "--cuda-graphs needs the DiT on a CUDA device; it is on cpu"),
                         (["--offload", "blocks", "--compile", "blocks"], "offload='blocks' streams the DiT's blocks")):
        result = run("generate", "a cat", "--model", tiny_model_dir, *BASE, "--output-dir", out, *extra, ok=False)
        assert result.exit_code == 1 and words in result.output, result.output
    assert not out.exists()


def test_info_on_an_image_shows_the_request_it_records(tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "cat.png"
    run("generate", "a cat on a chair", "--model", tiny_model_dir, *BASE, "--seed", "7", "-o", out)
    text = run("info", out).output
    assert text.startswith(f"{out}  (image written by zimage-native ")
    assert "  a cat on a chair\n" in text and "Seed: 7, Size: 32x32" in text
    assert f"re-run it: zimage generate --from-image {out}" in text
    assert json.loads(run("info", out, "--json").output) == read_metadata(out)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = run("info", plain, ok=False)
    assert result.exit_code == 1 and result.output.strip() == \
        f"Error: {plain} has no zimage-native generation metadata (no 'zimage' PNG text chunk)"


def test_prompt_and_config_files_saved_by_windows_editors(tmp_path):
    """Notepad's UTF-8 byte order mark and PowerShell 5's UTF-16 (`>`) are read as the text they hold;
    a file in another encoding is a one-line error naming the flag and the file."""
    gen = sys.modules["zimage_native.cli.generate"]
    from zimage_native.cli.config import read_profile

    text = "# a comment\na café at dawn\nun chat\n"
    for name, data in [("bom.txt", b"\xef\xbb\xbf" + text.encode()), ("utf16.txt", text.encode("utf-16"))]:
        (tmp_path / name).write_bytes(data)
        assert gen.read_prompts(None, tmp_path / name) == ["a café at dawn", "un chat"]
    (tmp_path / "latin1.txt").write_bytes("un café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"^--prompts-file .*latin1.txt: not UTF-8 text \(.* at byte 6\); save it "
                       r"as UTF-8$"):
        gen.read_prompts(None, tmp_path / "latin1.txt")
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xef\xbb\xbf[default]\nsteps = 4\n")
    assert read_profile(config, None)["steps"][0] == 4


def test_ctrl_c_says_how_many_images_were_written_and_where(tiny_model_dir, tiny_pipe, tmp_path, monkeypatch):
    """Ctrl-C during a run of many images ended with click's bare "Aborted!" (exit 1): no count of
    the images already on disk. Now: how many, where, and exit status 130 without a traceback."""
    cli_generate = sys.modules["zimage_native.cli.generate"]
    monkeypatch.setattr(cli_generate, "load_pipeline", lambda o: tiny_pipe)
    real, calls = tiny_pipe.generate, []

    def generate(request, **kw):  # Ctrl-C while the third batch samples
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(request, **kw)

    monkeypatch.setattr(tiny_pipe, "generate", generate)
    out = tmp_path / "out"
    result = run("generate", "a cat", "--model", tiny_model_dir, *BASE, "--num-images", "5", "--output-dir", out,
                 ok=False)
    assert result.exit_code == 130, result.output
    assert f"interrupted: wrote 2 of 5 images in {out}" in result.output.splitlines(), result.output
    assert "Aborted" not in result.output and "Traceback" not in result.output, result.output
    assert len(list(out.glob("*.png"))) == 2 and not list(out.glob(".*"))



def test_ctrl_c_while_the_model_loads_or_a_conversion_runs_exits_130(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C during sampling exits 130 with a line saying what was written, but Ctrl-C while the model
    loaded (or downloaded), or while `zimage convert` ran, ended in click's "Aborted!" with exit
    status 1 (measured: a SIGINT 9 s into `zimage generate` on the tiny model): a failure to a script
    or a shell loop, not an interruption. Now every command interrupted outside sampling says
    "interrupted" and exits 130, and leaves no file."""
    from zimage_native.converters import convert as converters

    cli_generate = sys.modules["zimage_native.cli.generate"]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_generate, "load_pipeline", interrupt)
    out = tmp_path / "out.png"
    result = run("generate", "a cat", "--model", tiny_model_dir, *BASE, "-o", out, ok=False)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == "interrupted", result.output
    assert "Aborted" not in result.output and not out.exists()
    monkeypatch.setattr(converters, "convert_checkpoint", interrupt)
    dst = tmp_path / "vae.safetensors"
    result = run("convert", tiny_model_dir / "vae", dst, "--to", "ldm", ok=False)
    assert (result.exit_code, result.output.strip()) == (130, "interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_decode_that_cannot_fit_is_refused_before_sampling(tiny_model_dir, tiny_pipe, tmp_path, monkeypatch,
                                                                   caplog):
    """An untiled VAE decode on the CPU takes about 3.9 kB per pixel in fp32 (15 GiB at 2048x2048):
    one that the RAM and swap cannot hold was killed at the very end of sampling, without a word.
    Now it is refused before sampling, and one that needs swap is warned about; both name --tiled-vae.
    The check is the library's (devices.check_decode_fits, tests/test_memory_check.py)."""
    import zimage_native.devices as devices

    cli_generate = sys.modules["zimage_native.cli.generate"]
    monkeypatch.setattr(cli_generate, "load_pipeline", lambda o: tiny_pipe)
    monkeypatch.setattr(tiny_pipe, "vae_tiling", None)
    monkeypatch.setattr(devices, "_swap_warned", set())
    real = tiny_pipe.denoise, tiny_pipe.encode_texts
    # The tiny VAE decodes 32 channels at full resolution in fp32: 32 x 32 bytes = 1 kB per pixel.
    need = devices.decode_bytes(64, 48, 2, tiny_pipe.vae_config.block_out_channels[0], torch.float32)
    assert need == 6_291_456
    args = ["generate", "a cat", "--model", tiny_model_dir, *BASE, "--width", "64", "--height", "48", "--num-images",
            "2", "--batch-size", "2"]
    monkeypatch.setattr(devices, "host_memory", lambda: (need // 2, need // 4, 8 * need))
    monkeypatch.setattr(tiny_pipe, "denoise", lambda *a, **k: pytest.fail("sampled"))
    monkeypatch.setattr(tiny_pipe, "encode_texts", lambda *a, **k: pytest.fail("encoded"))
    result = run(*args, "--output-dir", tmp_path / "a", ok=False)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: the VAE decode of 2 images at 64x48 in one piece needs about 6.3 MB of CPU memory, and this machine "
        "has 3.1 MB of RAM available (of 50.3 MB) and 1.6 MB of free swap: the system would stop the run at the end "
        "of sampling; use --tiled-vae (the decode in tiles: about 1.2 GB at 2048x2048; pipe.enable_vae_tiling() in "
        "Python, zimage serve --tiled-vae for a server), or a smaller --batch-size or size")
    monkeypatch.setattr(tiny_pipe, "denoise", real[0])
    monkeypatch.setattr(tiny_pipe, "encode_texts", real[1])
    caplog.set_level("WARNING", logger="zimage_native.devices")
    # A tile not smaller than the image (the default 512 here) decodes it in one piece: checked too.
    result = run(*args, "--output-dir", tmp_path / "b", "--tiled-vae", ok=False)
    assert result.exit_code == 1 and "Error: the VAE decode of 2 images at 64x48 in one tile (the tile size is not " \
        "smaller than the image) needs about" in result.output, result.output
    assert not list((tmp_path / "b").glob("*.png"))
    monkeypatch.setattr(tiny_pipe, "vae_tiling", None)  # the run above turned tiling on
    monkeypatch.setattr(devices, "host_memory", lambda: (need // 2, need, 8 * need))  # fits with swap: a warning
    run(*args, "--output-dir", tmp_path / "c")
    assert "the VAE decode of 2 images at 64x48 in one piece needs about 6.3 MB of CPU memory, more than the 3.1 MB " \
           "of RAM available: the system will swap" in caplog.text, caplog.text
    caplog.clear()
    monkeypatch.setattr(devices, "_swap_warned", set())
    monkeypatch.setattr(devices, "host_memory", lambda: None)  # not known: quiet
    run(*args, "--output-dir", tmp_path / "d")
    assert "VAE decode" not in caplog.text


def test_from_image_remakes_image_k_of_a_one_seed_batch_and_refuses_what_no_seed_remakes(tiny_pipe, tmp_path):
    """One seed for a batch: its record says the image's place in the batch, and --from-image runs the
    batch again to write that image (seed 5 alone makes image 0). A generator, given latents or a batch
    of several prompts: the record cannot remake the image, and --from-image says so (it drew a random
    seed); with --seed it runs the settings."""
    import torch

    from zimage_native.metadata import image_record, png_info

    kw = dict(width=32, height=32, num_inference_steps=2)
    out = tiny_pipe("a cat", num_images_per_prompt=2, seed=5, **kw)
    made = tmp_path / "made.png"
    out.images[1].save(made, pnginfo=png_info(image_record(out.info, 1)))
    record = read_metadata(made)
    assert (record["seed"], record["batch_index"], record["batch_size"]) == (5, 1, 2)
    assert "batch_index" not in image_record(tiny_pipe("a cat", seed=5, **kw).info, 0)
    with Image.open(made) as im:
        assert "Seed: 5, Batch size: 2, Batch pos: 1, Size: 32x32" in im.info["parameters"]
    again = tmp_path / "again.png"
    result = run("generate", "--from-image", made, "-o", again, "--device", "cpu", "--no-progress")
    assert "is image 1 of 2 drawn from seed 5: the 2 images run again" in result.output
    assert np.array_equal(pixels(again), pixels(made))
    assert not np.array_equal(np.asarray(tiny_pipe("a cat", seed=5, **kw).images[0]), pixels(made))
    assert read_metadata(again)["batch_index"] == 1  # and the remade image's record remakes it too

    generated = tiny_pipe("a cat", generator=torch.Generator().manual_seed(3), **kw)
    latents = tiny_pipe("a cat", latents=torch.randn(1, 16, 4, 4), **kw)
    mixed = tiny_pipe(["a cat", "a dog"], seed=5, **kw)
    for name, info, index, why in (
            ("generator", generated.info, 0, "made with a generator= (a library call), whose seed is not recorded"),
            ("latents", latents.info, 0, "made from given latents=, which are not stored"),
            ("mixed", mixed.info, 1, "seed 5 drew the noise of a batch of 2 images of 2 prompts (it is image 1)")):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (32, 32)).save(path, pnginfo=png_info(image_record(info, index, index)))
        result = run("generate", "--from-image", path, "-o", tmp_path / "x.png", "--device", "cpu", ok=False)
        assert result.exit_code == 1 and f"{path} cannot be remade from its record: " in result.output, result.output
        assert why in result.output, result.output
        assert "give --seed N (or --seed -1 for a random one)" in result.output and not (tmp_path / "x.png").exists()
    run("generate", "--from-image", tmp_path / "generator.png", "-o", tmp_path / "x.png", "--seed", 8, "--device",
        "cpu", "--no-progress")
    assert read_metadata(tmp_path / "x.png")["seed"] == 8


@pytest.mark.parametrize("when", ["serving", "deploying"])
def test_ctrl_c_stops_zimage_serve_ray_with_exit_status_130(tmp_path, monkeypatch, when):
    """`zimage serve` stops on Ctrl-C after uvicorn's graceful shutdown with 'interrupted' and exit
    status 130 (35d3d32), but `zimage serve --ray` caught the KeyboardInterrupt itself: it shut Ray
    Serve down and exited 0 without a word; and a Ctrl-C while Serve deployed the app (the replicas
    loading the model) left it deployed. Both shut Serve down and exit 130 now. Ray itself is faked:
    what is checked is the command's handling."""
    import time
    import types

    calls = []

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    ray = types.ModuleType("ray")
    ray.init = lambda **kwargs: calls.append("init")
    ray.cluster_resources = lambda: {"CPU": 2.0}
    ray.shutdown = lambda: calls.append("ray.shutdown")
    serve = types.ModuleType("ray.serve")
    serve.start = lambda **kwargs: calls.append("start")
    serve.run = interrupt if when == "deploying" else (lambda *a, **k: calls.append("run"))
    serve.shutdown = lambda: calls.append("serve.shutdown")
    ray.serve = serve
    app_module = types.ModuleType("zimage_native.server.ray_serve")
    app_module.build_app = lambda o: "app"
    app_module.scaling_options = lambda o: ({"num_replicas": 1}, 1)  # (checked before Ray starts)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", serve)
    monkeypatch.setitem(sys.modules, "zimage_native.server.ray_serve", app_module)
    monkeypatch.setattr(time, "sleep", interrupt)
    result = run("serve", "--ray", "--fake", "--gpus-per-replica", "0", "--replicas", "1", "--data-dir", tmp_path,
                 "--port", "0", ok=False)
    assert (result.exit_code, result.output.strip().splitlines()[-1]) == (130, "interrupted"), result.output
    assert calls[-1] == "serve.shutdown" and calls.count("serve.shutdown") == 1, calls
    assert "Traceback" not in result.output


def test_from_image_reruns_a_negative_cfg_truncation_the_library_recorded(tiny_pipe, tmp_path):
    """The library takes cfg_truncation=-1 (diffusers' semantics: CFG on no step) and records it; the CLI's
    refusal of a negative --cfg-truncation (01052c7) refused the rerun of that PNG too, naming a flag
    nobody typed. The recorded value runs again, bit for bit; typed, it is refused as before."""
    from zimage_native.metadata import image_record, png_info

    out = tiny_pipe("a cat", width=32, height=32, num_inference_steps=2, seed=1, guidance_scale=2.0,
                    cfg_truncation=-1.0)
    made, again = tmp_path / "made.png", tmp_path / "again.png"
    out.images[0].save(made, pnginfo=png_info(image_record(out.info, 0)))
    assert read_metadata(made)["cfg_truncation"] == -1
    run("generate", "--from-image", made, "-o", again, "--device", "cpu", "--no-progress")
    assert np.array_equal(pixels(again), pixels(made)) and read_metadata(again)["cfg_truncation"] == -1
    result = run("generate", "--from-image", made, "-o", tmp_path / "typed.png", "--device", "cpu",
                 "--cfg-truncation", "-0.5", ok=False)
    assert "Error: --cfg-truncation must be >= 0" in result.output, result.output
