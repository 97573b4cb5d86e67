"""A new user's typical slips on `zimage generate` (and `zimage bench --out`), each refused before any
weights load in one line that names the problem and the way to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_cli_errors import one_line_error, usage_error


@pytest.mark.parametrize("args, line", [
    # other tools' one size flag: click offered '--batch-size', '--seed', '--tile-size'
    (["--size", "512x512"], "Error: No such option '--size': the size is two flags, in pixels: --width W --height H "
                            "(for example --width 1024 --height 768) (see `zimage generate --help`)"),
    (["--resolution", "1024"], "Error: No such option '--resolution': the size is two flags, in pixels: --width W "
                               "--height H (for example --width 1024 --height 768) (see `zimage generate --help`)"),
    # a size typed into one flag: was "'512x768' is not a valid integer."
    (["--width", "512x768"], "Error: Invalid value for '--width': '512x768' is a width and a height: give them as "
                             "--width 512 --height 768 (see `zimage generate --help`)"),
    (["--height", "1024 x 768"], "Error: Invalid value for '--height': '1024 x 768' is a width and a height: give "
                                 "them as --width 1024 --height 768 (see `zimage generate --help`)"),
    (["--width", "wide"], "Error: Invalid value for '--width': 'wide' is not a whole number: the side in pixels, a "
                          "multiple of 16 (for example 1024) (see `zimage generate --help`)"),
    (["--seed", "abc"], "Error: Invalid value for '--seed': 'abc' is not a whole number: a seed is 0 to 2**64 - 1, "
                        "or -1 for a random one (see `zimage generate --help`)"),
    (["--steps", "2.5"], "Error: Invalid value for '--steps': '2.5' is not a whole number: the number of denoising "
                         "steps (for example 8) (see `zimage generate --help`)"),
    # a list of seeds in one word, as other tools take it: was "'1,2,3' is not a whole number"
    (["--seed", "1,2,3"], "Error: Invalid value for '--seed': '1,2,3' is 3 values: give them as separate words, "
                          "--seed 1 2 3 (see `zimage generate --help`)"),
    (["--seed", "7, 8"], "Error: Invalid value for '--seed': '7, 8' is 2 values: give them as separate words, "
                         "--seed 7 8 (see `zimage generate --help`)"),
    (["--seed", "1,x"], "Error: Invalid value for '--seed': '1,x' is not a whole number: a seed is 0 to 2**64 - 1, "
                        "or -1 for a random one (see `zimage generate --help`)"),
    (["--width", "512,768"], "Error: Invalid value for '--width': '512,768' is a width and a height: give them as "
                             "--width 512 --height 768 (see `zimage generate --help`)"),  # one value, two numbers
])
def test_a_mistyped_number_or_size_says_what_the_flag_takes(tmp_path, args, line):
    assert usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args) == line


@pytest.mark.parametrize("flag, what", [
    # click suggested '--batch-size', which gives no more images (a batch of 4 for one image makes one)
    ("--batch", "--num-images N makes N images per prompt (--batch-size B only samples B of them at once"),
    ("--batch-count", "--num-images N makes N images per prompt"),
    # click suggested '--config', '--fp8' and '--control-scale', '--guidance-scale'
    ("--cfg", "the CFG scale is --guidance-scale (0 turns CFG off, the Turbo default; the base model's is 4)"),
    ("--cfg-scale", "the CFG scale is --guidance-scale"),
    ("--sampler", "there is one sampler, FlowMatch Euler; --steps and --shift set its schedule"),
    ("--prompt", "the prompt is the first argument, in quotes: zimage generate \"a red fox\" ..."),
])
def test_other_tools_flags_say_what_they_are_here(tmp_path, flag, what):
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), flag, "2")
    assert line.startswith(f"Error: No such option '{flag}': {what}"), line
    assert line.endswith("(see `zimage generate --help`)"), line


def test_the_other_tools_hints_are_only_where_their_flags_are():
    """`zimage bench` has no --num-images: click's own message stays."""
    line = usage_error("bench", "--batch", "2")
    assert "No such option" in line and "--num-images" not in line, line


def test_the_size_hint_is_only_where_width_and_height_are():
    """`zimage bench` has --sizes: click's own suggestion stays."""
    assert "--sizes" in usage_error("bench", "--size", "64")


def test_output_naming_a_folder_says_to_name_a_file_or_use_output_dir(tmp_path):
    """-o FOLDER was "Invalid value for '-o' / '--output': File '...' is a directory."."""
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "-o", str(tmp_path))
    assert line == (f"Error: -o/--output names the image file, and {tmp_path} is a folder: give a file in it (-o "
                    f"{tmp_path / 'image.png'}), or --output-dir {tmp_path} for names made from the seed")


def test_a_file_in_the_way_of_the_output_folder_is_named(tmp_path):
    """A file where a folder of the output path should be gave the system's words for it, "(File exists)"
    for -o or "(Not a directory)" for a folder below it; the line names the file now."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = str(tmp_path / "missing")
    assert one_line_error("generate", "a cat", "--model", missing, "-o", str(afile / "x.png")) == (
        f"Error: --output: cannot write in the folder {afile} ({afile} is a file, not a folder)")
    assert one_line_error("generate", "a cat", "--model", missing, "--output-dir", str(afile / "a" / "b")) == (
        f"Error: --output-dir: cannot write in the folder {afile / 'a' / 'b'} ({afile} is a file, not a folder)")
    assert one_line_error("bench", "--tiny", "--out", str(afile / "r")) == (
        f"Error: --out: cannot write in the folder {afile / 'r'} ({afile} is a file, not a folder)")


@pytest.mark.parametrize("output, line", [
    ("fox", "Error: --output must be a .png file, got fox (-o fox.png, or --output-dir fox for a folder)"),
    # a new folder's path: was "(-o out.png)" alone, the trailing / being lost to Path
    ("out/", "Error: --output must be a .png file, got out (-o out.png, or --output-dir out for a folder)"),
    ("fox.", "Error: --output must be a .png file, got fox. (-o fox.png, or --output-dir fox. for a folder)"),  # was fox..png
    ("fox.jpg", "Error: --output must be a .png file, got fox.jpg (-o fox.png)"),
])
def test_an_output_that_is_not_a_png_names_the_png_to_give(tmp_path, output, line):
    assert one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "-o", output) == line


@pytest.mark.parametrize("command", ["generate", "format-prompt", "rewrite"])
def test_an_unquoted_prompt_says_to_quote_it(command):
    """`zimage generate a red fox` (the shell splits the prompt) was "Got unexpected extra arguments (red
    fox)"; it says to quote the prompt now, showing it quoted."""
    assert usage_error(command, "a", "red", "fox") == (
        f"Error: the prompt is one argument: put it in quotes, zimage {command} \"a red fox\" ... (the words after "
        f"'a' were read as more arguments)")


def test_a_quoted_prompt_with_a_stray_argument_keeps_clicks_message():
    assert usage_error("generate", "a cat", "--seed", "1", "abc") == (
        "Error: Got unexpected extra argument (abc) (see `zimage generate --help`)")


@pytest.mark.parametrize("args, extra", [
    (["fox", "--width", "1024", "768"], "768"),  # meant --height 768: quoting "fox 768" fixes nothing
    (["fox", "--steps", "8", "12"], "12"),
    (["a", "red", "fox", "--width", "1024", "768"], None),  # the words after the prompt: the hint stays
])
def test_a_stray_flag_value_after_a_one_word_prompt_is_not_called_part_of_the_prompt(args, extra):
    """The quoting hint took any extra argument for the rest of a one-word prompt: `zimage generate fox
    --width 1024 768` said to type "fox 768". It is given only where the extra words follow the prompt."""
    line = usage_error("generate", *args)
    if extra is None:
        assert line.startswith('Error: the prompt is one argument: put it in quotes, zimage generate "a red fox 768"')
    else:
        assert line == f"Error: Got unexpected extra argument ({extra}) (see `zimage generate --help`)"


@pytest.mark.parametrize("spec", ["{f}=0.8", "{f},0.8", "{f}@0.8", "{f} 0.8"])
def test_a_lora_scale_after_another_separator_says_to_use_a_colon(tmp_path, spec):
    """Other tools write PATH=0.8 or PATH,0.8: it was "LoRA file not found: PATH=0.8"."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    text = spec.format(f=lora)
    line = one_line_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--lora", text)
    assert line == f"Error: --lora {text}: the scale goes after ':' (--lora {lora}:0.8)", line


def test_a_lora_scale_given_as_its_own_argument_says_to_join_it(tmp_path):
    """`--lora style.safetensors 0.8` was "Got unexpected extra argument (0.8)"."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--lora", str(lora), "0.8")
    assert line == (f"Error: --lora takes its scale in the same argument, after ':': --lora {lora}:0.8 ('0.8' was "
                    f"read as one more argument) (see `zimage generate --help`)"), line
    # a stray number elsewhere keeps click's message
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--width", "1024", "768")
    assert "Got unexpected extra argument (768)" in line and "--lora" not in line, line



@pytest.mark.parametrize("scale", ["-0.5", "-.5", "-1"])
def test_a_negative_lora_scale_given_as_its_own_argument_says_to_join_it(tmp_path, scale):
    """`--lora style.safetensors -0.5` was "No such option '-0'" (click reads the scale as short options);
    a negative number after a --lora value with its own scale, or after another flag, keeps click's message."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--lora", str(lora), scale)
    assert line == (f"Error: --lora takes its scale in the same argument, after ':': --lora {lora}:{scale} ('{scale}' "
                    f"was read as an option) (see `zimage generate --help`)"), line
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--lora", f"{lora}:0.5", scale)
    assert line.startswith(f"Error: No such option '{scale[:2]}'") and "--lora" not in line, line
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--steps", "4", scale)
    assert line.startswith(f"Error: No such option '{scale[:2]}'") and "--lora" not in line, line

@pytest.mark.parametrize("prompt", [["a cat"], ["a", "cat"]])
def test_a_lora_scale_read_as_the_prompt_says_to_join_it(tmp_path, prompt):
    """`zimage generate --lora style.safetensors 0.8 "a cat"`: the scale became the prompt and the prompt
    an extra argument, and the hint was to quote the prompt: 'zimage generate "0.8 a cat"'."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    line = usage_error("generate", "--model", str(tmp_path / "missing"), "--lora", str(lora), "0.8", *prompt)
    assert line == (f"Error: --lora takes its scale in the same argument, after ':': --lora {lora}:0.8 ('0.8' was "
                    f"read as the prompt) (see `zimage generate --help`)"), line


def test_a_lora_scale_read_as_the_only_prompt_is_refused_before_loading(tmp_path):
    """`zimage generate --lora style.safetensors 0.8` (no prompt after it) ran with the prompt "0.8"; a
    LoRA value that has its own scale (`--lora style.safetensors:0.5 0.8`) leaves the number to be
    the prompt (or an extra argument), as before."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    line = usage_error("generate", "--model", str(tmp_path / "missing"), "--lora", str(lora), "0.8")
    assert line == (f"Error: --lora takes its scale in the same argument, after ':': --lora {lora}:0.8 ('0.8' was "
                    f"read as the prompt)"), line
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), "--lora", f"{lora}:0.5", "0.8")
    assert line == "Error: Got unexpected extra argument (0.8) (see `zimage generate --help`)", line


@pytest.mark.parametrize("command, args, flags", [
    ("generate", ["width=512"], "--width 512"),
    ("generate", ["num_inference_steps=4", "guidance_scale=0"], "--steps 4 --guidance-scale 0"),  # library names
    ("generate", ["encoder_url=https://host:8000"], "--encoder-url https://host:8000"),  # a URL (has '/')
    ("generate", ["text_encoder_url=http://host/v1?a=b&c"], "--encoder-url 'http://host/v1?a=b&c'"),  # quoted for a shell
    ("generate", ["tiled-vae=true", "progress=False"], "--tiled-vae --no-progress"),  # switches
    ("rewrite", ["llm_url=http://host:8000/v1"], "--llm-url http://host:8000/v1"),
])
def test_a_setting_written_as_a_keyword_names_its_flag(tmp_path, command, args, flags):
    """`zimage generate "a cat" width=512` (a setting written as in Python) was "Got unexpected extra
    argument (width=512)"; it names the flag now, for a URL value too."""
    line = usage_error(command, "a cat", "--model", str(tmp_path / "missing"), *args)
    extra = "arguments" if len(args) > 1 else "argument"
    assert line == (f"Error: Got unexpected extra {extra} ({' '.join(args)}): settings are flags here, {flags} "
                    f"(see `zimage {command} --help`)"), line


@pytest.mark.parametrize("args", [
    ["http://host/a?width=512"],  # a URL that holds a keyword: no keyword
    ["see llm_url=http://host:8000/v1"],  # a quoted prompt with a keyword in it
    ["width=512", "red"],  # not every extra word is a keyword
    ["llm_url=http://host:8000/v1"],  # generate has no --llm-url
    ["verbose=1"],  # not a flag of the command
    ["tiled_vae=maybe"],  # not a switch's value
])
def test_a_stray_argument_that_is_no_keyword_of_the_command_keeps_clicks_message(tmp_path, args):
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args)
    assert line.endswith(f"({' '.join(args)}) (see `zimage generate --help`)") and "flags here" not in line, line


def test_a_keyword_after_a_one_word_prompt_is_named_as_a_flag_not_as_more_prompt():
    """`zimage generate fox width=512`: the quoting hint said to type "fox width=512"."""
    assert usage_error("generate", "fox", "width=512") == (
        "Error: Got unexpected extra argument (width=512): settings are flags here, --width 512 (see `zimage "
        "generate --help`)")


@pytest.mark.parametrize("args, quoted, flags", [
    (["a", "red", "fox", "width=512"], "a red fox", "--width 512"),
    (["a", "cat", "num_inference_steps=4", "tiled_vae=True"], "a cat", "--steps 4 --tiled-vae"),
    (["a", "cat", "negative_prompt=low quality"], "a cat", "--negative-prompt 'low quality'"),  # one word
])
def test_keywords_after_an_unquoted_prompt_are_named_as_flags_not_quoted_into_it(args, quoted, flags):
    """`zimage generate a red fox width=512`: the quoting hint said to type "a red fox width=512" (the
    setting as part of the prompt, which would then be drawn); the keywords at the end are flags."""
    assert usage_error("generate", *args) == (
        f"Error: the prompt is one argument: put it in quotes, and settings are flags: zimage generate \"{quoted}\" "
        f"{flags} ... (the words after 'a' were read as more arguments)")


def test_a_keyword_inside_an_unquoted_prompt_stays_in_the_quoted_prompt():
    assert usage_error("generate", "a", "cat", "width=512", "on", "grass") == (
        "Error: the prompt is one argument: put it in quotes, zimage generate \"a cat width=512 on grass\" ... (the "
        "words after 'a' were read as more arguments)")


@pytest.mark.parametrize("args, flags", [
    (["offload=None"], "--offload none"),  # Python's None: the choice 'none'
    (["text_encoder_quant=None", "variant=Turbo"], "--text-encoder-quant none --variant turbo"),
    (["compile=True"], "--compile"),  # a flag whose value is optional: alone (blocks)
    (["compile=False"], "--compile off"),
    (["kernels=True"], "--kernels [none|triton]"),  # no choice is True: the choices
])
def test_a_keyword_for_a_flag_of_choices_names_a_value_the_flag_takes(tmp_path, args, flags):
    """`offload=None` was named as `--offload None` and `compile=True` as `--compile True`: flags that
    click then refused ("'None' is not one of 'none', ..."). The value is named as the flag takes it."""
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args)
    assert line.endswith(f"settings are flags here, {flags} (see `zimage generate --help`)"), line


@pytest.mark.parametrize("args, flags", [
    (["negative_prompt=blurry, low quality"], "--negative-prompt 'blurry, low quality'"),
    (["output_dir=my images", "width=512"], "--output-dir 'my images' --width 512"),
])
def test_a_keyword_whose_value_holds_a_space_names_its_flag(tmp_path, args, flags):
    """`negative_prompt="blurry, low quality"` (one word of the command line) got no hint: the words were
    taken from click's message, which joins them with spaces, so its value read as three words."""
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args)
    assert line.endswith(f"settings are flags here, {flags} (see `zimage generate --help`)"), line


@pytest.mark.parametrize("command", ["generate", "rewrite", "format-prompt"])
def test_an_empty_extra_argument_is_one_error_line(tmp_path, command):
    """`zimage generate "a cat" "$NEGATIVE"` with the variable empty: an empty extra argument ended in an
    IndexError traceback (the --lora scale hint looked at its first word)."""
    assert usage_error(command, "a cat", "") == (
        f"Error: Got unexpected extra argument () (see `zimage {command} --help`)")


@pytest.mark.parametrize("command", ["generate", "format-prompt", "rewrite"])
@pytest.mark.parametrize("args, keyword, quoted", [
    (["prompt=a cat"], "prompt=", "a cat"),  # `prompt="a cat"`: the shell drops the quotes
    (["Prompt=a cat"], "Prompt=", "a cat"),
    (["prompt=a", "cat"], "prompt=", "a cat"),  # unquoted: the rest of the prompt follows
    (["prompt="], "prompt=", "a red fox"),
])
def test_a_prompt_written_as_a_keyword_says_to_give_it_alone(command, args, keyword, quoted):
    """`zimage generate prompt="a cat"` (as in a Python call) drew the prompt "prompt=a cat"; it is refused
    now, naming the command line meant, as the other settings written as keywords are."""
    assert usage_error(command, *args) == (
        f"Error: the prompt is the first argument, in quotes, without '{keyword}': zimage {command} \"{quoted}\" ...")


@pytest.mark.parametrize("command, args, quoted, flags", [
    ("generate", ["prompt=a cat", "width=512", "negative_prompt=low quality"], "a cat",
     "--width 512 --negative-prompt 'low quality'"),
    ("generate", ["prompt=a", "red", "cat", "num_inference_steps=4"], "a red cat", "--steps 4"),
    ("rewrite", ["prompt=a cat", "llm_url=http://host:8000/v1"], "a cat", "--llm-url http://host:8000/v1"),
])
def test_a_prompt_keyword_with_settings_as_keywords_names_the_whole_command_line(command, args, quoted, flags):
    """`zimage generate prompt="a cat" width=512`: the hint named --width alone, and the next run drew
    "prompt=a cat"; the line gives the prompt and the flags together."""
    assert usage_error(command, *args) == (
        f"Error: the prompt is the first argument, in quotes, without 'prompt=', and settings are flags: "
        f"zimage {command} \"{quoted}\" {flags} ...")


def test_a_prompt_with_an_equals_sign_later_in_its_text_is_a_prompt(tiny_model_dir, tmp_path):
    """Only a leading `prompt=` is a keyword: a prompt that holds '=' elsewhere (or that starts with
    another word and '=') runs as written."""
    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.metadata import read_metadata

    for i, prompt in enumerate(["a sign reading prompt=x", "E=mc2 on a blackboard", "prompts=many"]):
        out = tmp_path / f"{i}.png"
        result = CliRunner().invoke(main, ["generate", prompt, "--model", str(tiny_model_dir), "--device", "cpu",
                                           "--width", "32", "--height", "32", "--steps", "1", "--seed", "1",
                                           "--no-progress", "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert read_metadata(out)["prompt"] == prompt
    result = CliRunner().invoke(main, ["format-prompt", "x=1, prompt=2"])
    assert result.exit_code == 0 and "x=1, prompt=2" in result.output, result.output


@pytest.mark.parametrize("command, flag, here", [
    ("generate", "--num_inference_steps", "--steps"),  # the library's name: click suggested nothing
    ("generate", "--num_images_per_prompt", "--num-images"),
    ("generate", "--text_encoder_quant", "--text-encoder-quant"),  # click offered three flags
    ("generate", "--guidance_scale", "--guidance-scale"),
    ("generate", "--tiled_vae", "--tiled-vae"),
    ("generate", "--no_progress", "--no-progress"),
    ("rewrite", "--llm_url", "--llm-url"),
])
def test_a_flag_spelled_with_underscores_or_as_the_library_argument_names_the_flag(tmp_path, command, flag, here):
    """Flags written as Python names (`--num_inference_steps 4`, as diffusers scripts take them) got
    click's "No such option" with no suggestion, or several; the line names the flag now."""
    line = usage_error(command, "a cat", "--model", str(tmp_path / "missing"), flag, "4")
    assert line == f"Error: No such option '{flag}': it is {here} here (see `zimage {command} --help`)", line


@pytest.mark.parametrize("flag, what", [
    ("--n_samples", "--num-images N makes N images per prompt"),  # click suggested '--compile'
    ("--n_iter", "--num-images N makes N images per prompt"),
    ("--cpu_offload", "the predecessor's --cpu-offload is --offload model"),
])
def test_other_tools_flags_spelled_with_underscores_say_what_they_are_here(tmp_path, flag, what):
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), flag, "2")
    assert line.startswith(f"Error: No such option '{flag}': {what}"), line


def test_an_underscored_name_that_is_no_flag_of_the_command_keeps_clicks_message(tmp_path):
    """`zimage rewrite` has no --steps: click's own line stays."""
    line = usage_error("rewrite", "a cat", "--num_inference_steps", "4")
    assert line == "Error: No such option '--num_inference_steps'. (see `zimage rewrite --help`)", line


def test_a_batch_size_for_a_single_image_says_to_give_num_images(tmp_path):
    """`zimage generate "a cat" --batch-size 4` (ComfyUI's batch_size is the number of images) made one
    image, silently; it is refused before loading now, naming --num-images. A run of several images,
    or a batch size from a config file (a profile for many runs), is not."""
    missing = str(tmp_path / "missing")
    assert one_line_error("generate", "a cat", "--model", missing, "--batch-size", "4") == (
        "Error: --batch-size 4 samples up to 4 images at once, and this run makes one (one prompt, one seed); "
        "for 4 images give --num-images 4 (with --batch-size 4 to sample them together)")
    config = tmp_path / "zimage.toml"
    config.write_text("[default]\nbatch_size = 4\n")
    for args in (["--num-images", "2"], ["--seed", "1", "2"], ["--seeds", "2"], ["--config", str(config)]):
        line = one_line_error("generate", "a cat", "--model", missing, *args, *(["--batch-size", "4"]
                                                                             if "--config" not in args else []))
        assert line.startswith("Error: model folder not found"), (args, line)


def test_a_path_starting_with_a_tilde_is_in_the_home_folder(tiny_model_dir, tmp_path, monkeypatch):
    """`output_dir = "~/images"` in a config file (no shell expands it) or `-o "~/cat.png"` typed in quotes
    wrote the images into a new folder named '~' in the current one; an input path so written was "does
    not exist". A leading ~ is the home folder now, as in the shell (and as --model and --lora read it)."""
    from click.testing import CliRunner

    from zimage_native.cli import main

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    config = tmp_path / "zimage.toml"
    config.write_text('[default]\noutput_dir = "~/images"\n')
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu", "--width", "32", "--height", "32",
            "--steps", "1", "--seed", "1", "--no-progress"]
    for extra in (["--config", str(config)], ["-o", "~/one/cat.png"]):
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*.png")) == ["images/zimage-000-1.png", "one/cat.png"]
    assert list(cwd.iterdir()) == []
    result = CliRunner().invoke(main, ["info", "~/one/cat.png"])
    assert result.exit_code == 0 and result.output.startswith(f"{home / 'one' / 'cat.png'}  (image written by"), \
        result.output


@pytest.mark.parametrize("name, why", [
    ("out.gguf", " (GGUF files are read, not written)"),
    ("out.sft", " files, named .safetensors (an .sft file is read, not written)"),
    ("out.ckpt", ""),
    # a .safetensors name not in lower case made a folder too (`Out.SafeTensors`, as Windows shows names)
    ("out.SafeTensors", " files, named .safetensors in lower case (any other name is a folder)"),
    ("out.SAFETENSORS", " files, named .safetensors in lower case (any other name is a folder)"),
])
def test_convert_to_a_weight_file_of_another_format_says_it_writes_safetensors(tiny_model_dir, tmp_path, name, why):
    """`zimage convert MODEL/transformer out.gguf --to comfy` made a folder named out.gguf holding
    diffusion_pytorch_model.safetensors (a DST not ending in .safetensors is a folder), and said
    "wrote out.gguf"; it is refused now, before reading, naming the .safetensors file to give."""
    dst = tmp_path / name
    line = one_line_error("convert", str(tiny_model_dir / "transformer"), str(dst), "--to", "comfy")
    assert line == (f"Error: DST {dst}: convert writes safetensors{why}: give a .safetensors file "
                    f"({tmp_path / 'out.safetensors'}) or a folder (a name without a file extension)"), line
    assert list(tmp_path.iterdir()) == []


def test_convert_says_a_small_outputs_size_in_a_unit_that_shows_it(tiny_model_dir, tmp_path):
    """The line said '0.002 GB' for the tiny DiT (2,367,424 bytes of tensors)."""
    import re

    from click.testing import CliRunner

    from zimage_native.cli import main

    dst = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["convert", str(tiny_model_dir / "transformer"), str(dst), "--to", "comfy"])
    assert result.exit_code == 0, result.output
    size = re.search(r", ([\d.]+) (bytes|KB|MB|GB) in 1 file\(s\)\)$", result.output.strip())
    assert size is not None, result.output
    shown = float(size[1]) * {"bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[size[2]]
    assert abs(shown - dst.stat().st_size) <= 0.05 * dst.stat().st_size, (result.output, dst.stat().st_size)


@pytest.mark.parametrize("args, flag, value", [
    (["--guidance-scale", "1", "--negative-prompt", "--tiled-vae"], "--negative-prompt", "--tiled-vae"),
    (["-o", "--overwrite"], "-o", "--overwrite"),  # was "--output must be a .png file, got --overwrite"
    (["--output-dir", "--seed", "1"], "--output-dir", "--seed"),
])
def test_a_flag_whose_value_is_missing_is_not_given_the_next_flag(tmp_path, args, flag, value):
    """`--negative-prompt --tiled-vae` (the value forgotten) drew an image with the negative prompt
    "--tiled-vae" and without tiling: click takes the next word as the value, a flag too."""
    line = usage_error("generate", "a cat", "--model", str(tmp_path / "missing"), *args)
    assert line == (f"Error: {flag} takes a value, and the next word is the flag {value}: give the value after {flag} "
                    f"({flag} VALUE {value} ...) (see `zimage generate --help`)"), line


def test_a_flag_with_an_optional_value_before_another_flag_is_taken():
    """--compile alone means --compile blocks: the next flag is no value it lacks."""
    line = one_line_error("generate", "a cat", "--device", "cpu", "--compile", "--cuda-graphs")
    assert line == "Error: --cuda-graphs needs the DiT on a CUDA device; it is on cpu", line


@pytest.mark.parametrize("args, flag, value, path", [
    # a subcommand of a group: `--templates-dir --json` looked for a folder named --json
    (["templates", "show", "--templates-dir", "--json", "photo-aerial-drone"], "--templates-dir", "--json",
     "zimage templates show"),
    (["templates", "list", "--category", "--json"], "--category", "--json", "zimage templates list"),
    # the help flag: `--negative-prompt --help` ran the model with the negative prompt "--help"
    (["generate", "a cat", "--model", "/nonexistent", "--negative-prompt", "--help"], "--negative-prompt", "--help",
     "zimage generate"),
    (["generate", "a cat", "--model", "/nonexistent", "--negative-prompt", "-h"], "--negative-prompt", "-h",
     "zimage generate"),
])
def test_a_forgotten_value_before_a_subcommands_flag_or_the_help_flag_is_refused(args, flag, value, path):
    """docs/cli.md says the forgotten-value check holds for every command: the subcommands of
    `zimage templates` and the help flag (-h, --help) were left out of it."""
    line = usage_error(*args)
    assert line == (f"Error: {flag} takes a value, and the next word is the flag {value}: give the value after {flag} "
                    f"({flag} VALUE {value} ...) (see `{path} --help`)"), line


def test_only_a_command_whose_seed_takes_several_reads_the_numbers_after_it_as_seeds(monkeypatch):
    """`--seed 1 2 3` is generate's list of seeds. `zimage rewrite`'s --seed takes one, but the group read
    the numbers after every command's --seed as more seeds: `rewrite "a cat" --seed 1 2` ran with seed 2
    (the last, silently) and `rewrite --seed 5 1984` said the prompt was missing."""
    import importlib

    from click.testing import CliRunner

    from zimage_native.cli import main

    calls = []

    class Recorder:
        def rewrite(self, prompt, rewriter, system_prompt, max_new_tokens, temperature, seed, top_p, **kwargs):
            calls.append((prompt, seed))
            return "a rewritten prompt"

    monkeypatch.setattr(importlib.import_module("zimage_native.cli.rewrite"), "chat_rewriter", lambda *a: Recorder())
    result = CliRunner().invoke(main, ["rewrite", "--seed", "5", "1984"], prog_name="zimage")
    assert (result.exit_code, calls) == (0, [("1984", 5)]), result.output
    assert usage_error("rewrite", "a cat", "--seed", "1", "2") == (
        "Error: Got unexpected extra argument (2) (see `zimage rewrite --help`)")
    assert calls == [("1984", 5)]


@pytest.mark.parametrize("name, tensors, says", [
    # another model's all-in-one file: its UNet is no DiT; detection sees only its VAE
    ("sdxl.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                          "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)},
     "no transformer in this checkpoint: it is for Stable Diffusion 1.x/2.x/SDXL (UNet), not Z-Image"),
    ("flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": (24, 8), "img_in.weight": (8, 64)},
     "this checkpoint is for FLUX (double_blocks / single_blocks), not Z-Image"),
    ("unknown.safetensors", {"some.weight": (2, 2)}, "not recognised as a Z-Image DiT"),
    ("model.ckpt", None, "pickled PyTorch checkpoint (.pt/.ckpt/.bin) is refused"),
])
def test_another_models_file_as_the_only_file_is_named_before_the_missing_components(tmp_path, name, tensors, says):
    """`--transformer FILE` alone, FILE another model's: the file's own fault, not 'no vae or text_encoder given,
    pass --vae, --text-encoder' (which sent a user to fetch 8 GB of components for a file that never loads)."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / name
    if tensors is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, path)
    line = one_line_error("generate", "a cat", "--transformer", str(path), "--device", "cpu", "-o",
                          str(tmp_path / "cat.png"))
    assert line.startswith(f"Error: {path}: ") and says in line, line
    assert "--text-encoder" not in line, line
    assert "--vae" not in line, line  # an SDXL all-in-one's VAE is SDXL's 4-channel one, no Z-Image VAE


@pytest.mark.parametrize("to", ["comfyui", "diffusers"])
def test_converting_another_models_all_in_one_file_is_refused_naming_the_family(tmp_path, to):
    """`zimage convert sdxl.safetensors out.safetensors --to comfyui` wrote the SDXL VAE alone ("wrote ... (vae,
    ldm, 2 tensors)"), without a word about the UNet and CLIP tensors it left out: a file of another model is named
    as such, with what would be converted of it; the part is still taken out when named with --component."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = tmp_path / "sdxl.safetensors", tmp_path / "out.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, src)
    line = one_line_error("convert", str(src), str(dst), "--to", to)
    assert line == (f"Error: {src}: this checkpoint is for Stable Diffusion 1.x/2.x/SDXL (UNet), not Z-Image (key "
                    f"'model.diffusion_model.input_blocks.0.0.weight'): only its vae (2 of 4 tensors) would be "
                    f"converted; to take that part out alone, name it with --component"), line
    assert not dst.exists()
    from click.testing import CliRunner

    from zimage_native.cli import main

    info = CliRunner().invoke(main, ["info", str(src)])  # it listed the VAE alone, as if that were the file
    assert info.exit_code == 0, info.output
    assert ("  not for Z-Image: Stable Diffusion 1.x/2.x/SDXL (UNet) (key "
            "'model.diffusion_model.input_blocks.0.0.weight')\n") in info.output, info.output

    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--to", to, "--component", "vae"])
    assert result.exit_code == 0, result.output
    assert len(load_file(dst)) == 2


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_named_as_empty(tmp_path, prompt):
    """`zimage generate "$PROMPT"` with the variable unset: '' was told to give a PROMPT, as if none was typed,
    and '   ' made an image of no prompt; both say the prompt is empty, before any weights load."""
    line = one_line_error("generate", prompt, "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "cat.png"))
    assert line == (f"Error: the PROMPT is empty ({prompt!r}; an unset shell variable, as in \"$PROMPT\"?): give the "
                    f"text in quotes, or --prompts-file or --from-image"), line


def test_no_prompt_at_all_is_a_usage_error_as_in_the_other_prompt_commands(tmp_path):
    """`zimage generate` with no PROMPT (nor --prompts-file or --from-image) exited 1, where `zimage
    format-prompt` and `zimage rewrite` without theirs exit with click's 'Missing argument', 2."""
    line = usage_error("generate", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "cat.png"))
    assert line == "Error: give a PROMPT, --prompts-file or --from-image", line
    for command in ("format-prompt", "rewrite"):
        assert usage_error(command) == f"Error: Missing argument 'PROMPT'. (see `zimage {command} --help`)"


def test_an_empty_prompt_beside_a_prompts_file_runs_the_files_prompts(tmp_path):
    from zimage_native.cli._common import UsageLine
    from zimage_native.cli.generate import read_prompts

    (tmp_path / "prompts.txt").write_text("a red fox\n")
    assert read_prompts("", tmp_path / "prompts.txt") == ["a red fox"]
    assert read_prompts("a cat", tmp_path / "prompts.txt") == ["a cat", "a red fox"]
    with pytest.raises(UsageLine, match="give a PROMPT, --prompts-file or --from-image"):
        read_prompts(None, None)


@pytest.mark.parametrize("typed, meant", [("fats", "fast"), ("afst", "fast"), ("qualiyt", "quality"), ("8bg", "8gb"),
                                          ("tsaf", None), ("a100", None), ("fsta", None)])
def test_a_profile_with_two_letters_swapped_gets_the_one_meant(tmp_path, typed, meant):
    """`--profile fats` for [fast] got no "did you mean": a swapped pair scores 0.75 against the matcher's cutoff
    0.8, which stays (a100 scores 0.75 against h100, a100 is no H100); a name that is the typed one with two
    neighbouring letters swapped is named, and nothing further off."""
    config = tmp_path / "config.toml"
    config.write_text("[default]\nsteps = 2\n[fast]\nsteps = 4\n[quality]\nsteps = 9\n[8gb]\nsteps = 3\n"
                      "[h100]\nsteps = 5\n")
    line = one_line_error("generate", "a cat", "--config", str(config), "--profile", typed, "-o",
                          str(tmp_path / "a.png"))
    hint = f"; did you mean '{meant}'?" if meant else ""
    assert line == f"Error: {config}: no profile [{typed}]; its profiles are 8gb, fast, h100, quality{hint}", line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_file_is_not_called_missing():
    """`-o /proc/a.png` said "cannot write in the folder /proc (No such file or directory)", of a folder that is
    there: the system's word for a file it will not make there. A read-only mount ("Read-only file system"), a
    folder without permission ("Permission denied") and a file in the way (named above) read right as they were."""
    assert one_line_error("generate", "a cat", "--model", "/nonexistent", "-o", "/proc/a.png") == (
        "Error: --output: cannot write in the folder /proc (it is a folder but takes no new file or folder: "
        "No such file or directory)")
    assert one_line_error("generate", "a cat", "--model", "/nonexistent", "--output-dir", "/proc/zimage/out") == (
        "Error: --output-dir: cannot write in the folder /proc/zimage/out (/proc is a folder but takes no new file "
        "or folder: No such file or directory)")
