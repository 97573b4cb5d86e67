"""A truncated or corrupt weight file fails in one line naming the file and the problem, in every
loader (diffusers folder, single files, LoRA, GGUF), and the CLI exits 1 without writing an image."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from zimage_native.cli import main
from zimage_native.formats import CorruptCheckpointError, check_safetensors, detect_format
from zimage_native.loading import load_component

from .test_formats import TINY_AXES, comfy_dit, write

BASE = ["--device", "cpu", "--width", "32", "--height", "32", "--steps", "1", "--no-progress"]
PROBLEM = "truncated or not a safetensors file"


def cut(path: Path, keep: int | None = None, fraction: float = 0.5) -> Path:
    """Cut a file short, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep is not None else int(len(data) * fraction)])
    return path


def broken_header(path: Path) -> Path:
    """A header length that fits the file, but JSON that does not parse."""
    body = b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # no closing braces
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    return path


def one_line(message: str, path: Path) -> None:
    assert "\n" not in message and message.startswith(f"{path}: {PROBLEM}"), message


@pytest.fixture
def dit_file(tiny_model_dir, tmp_path) -> Path:
    return write(tmp_path / "z_image_turbo_bf16.safetensors", comfy_dit(tiny_model_dir))


@pytest.mark.parametrize("damage, detail", [
    (lambda p: cut(p), r"its tensors need [\d,]+ bytes, the file has [\d,]+"),
    (lambda p: cut(p, keep=100), r"the header needs [\d,]+ bytes, the file has 100"),
    (lambda p: cut(p, keep=0), "the file is empty"),
    (lambda p: cut(p, keep=5), "unrecognised header; 5 bytes"),
    (broken_header, "unreadable header: JSONDecodeError"),
])
def test_single_file_loader_names_the_file_and_the_problem(dit_file, damage, detail):
    damage(dit_file)
    with pytest.raises(CorruptCheckpointError, match=detail) as err:
        load_component("transformer", dit_file, None, "cpu", config=TINY_AXES)
    one_line(str(err.value), dit_file)
    with pytest.raises(CorruptCheckpointError):
        detect_format(dit_file)


def test_complete_files_pass_the_check(dit_file):
    assert check_safetensors(dit_file) == dit_file


def test_folder_loader(tiny_model_dir, tmp_path):
    from zimage_native import ZImagePipeline

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = cut(folder / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CorruptCheckpointError) as err:
        ZImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    one_line(str(err.value), weights)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(folder), "-o", str(out), *BASE])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines() == [f"Error: {err.value}"]


def test_text_encoder_folder_and_single_files_from_the_cli(tiny_model_dir, dit_file, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    te = cut(folder / "text_encoder" / "model.safetensors", fraction=0.9)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(folder), "-o", str(out), *BASE])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().startswith(f"Error: {te}: {PROBLEM}") and len(result.output.strip().splitlines()) == 1
    cut(dit_file)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--transformer",
                                       str(dit_file), "-o", str(out), *BASE])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().startswith(f"Error: {dit_file}: {PROBLEM}") and len(result.output.strip().splitlines()) == 1


def test_lora_loader(tiny_model_dir, tiny_pipe, tmp_path):
    w = tiny_pipe.transformer.layers[0].attention.to_q.weight
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.randn(4, w.shape[1]),
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.randn(w.shape[0], 4)}, lora)
    cut(lora)
    before = w.clone()
    with pytest.raises(CorruptCheckpointError) as err:
        tiny_pipe.load_lora(lora)
    one_line(str(err.value), lora)
    assert torch.equal(w, before)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--lora", str(lora),
                                       "-o", str(out), *BASE])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines() == [f"Error: {err.value}"]


def test_info_and_convert(dit_file, tmp_path):
    cut(dit_file)
    for args in (["info", str(dit_file)], ["convert", str(dit_file), str(tmp_path / "o.safetensors"), "--to", "diffusers"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert result.output.strip().startswith(f"Error: {dit_file}: {PROBLEM}")
    assert not (tmp_path / "o.safetensors").exists()


def test_header_entries_of_the_wrong_form(tmp_path):
    path = tmp_path / "odd.safetensors"
    body = json.dumps({"x": [1, 2, 3]}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CorruptCheckpointError, match="unreadable header: TypeError"):
        check_safetensors(path)


def test_a_cut_file_fails_before_any_weight_is_read(tiny_model_dir, dit_file, tmp_path, monkeypatch):
    """A text encoder shard cut short (an interrupted download) was found only after the DiT and the
    VAE had been read (the whole DiT, 12-25 GB for the released model): every weight file's header is
    checked first now, in the folder and in single files."""
    import zimage_native.loading as loading
    from zimage_native import ZImagePipeline

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    te = cut(folder / "text_encoder" / "model.safetensors", fraction=0.9)

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the cut file was found")

    monkeypatch.setattr(loading, "load_module", no_load)
    monkeypatch.setattr(loading, "load_component", no_load)
    with pytest.raises(CorruptCheckpointError) as err:
        ZImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    one_line(str(err.value), te)
    with pytest.raises(CorruptCheckpointError) as err:
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", text_encoder=te)
    one_line(str(err.value), te)
    with pytest.raises(CorruptCheckpointError) as err:
        ZImagePipeline.from_single_files(transformer=dit_file, vae=tiny_model_dir / "vae", text_encoder=te,
                                         tokenizer=tiny_model_dir / "tokenizer", device="cpu")
    one_line(str(err.value), te)


@pytest.mark.parametrize("damage, message", [
    # a config.json cut short by an interrupted download or copy
    (lambda f: cut(f / "transformer" / "config.json", keep=30),
     r"transformer/config\.json is not valid JSON \(line \d+ column \d+: .*\): the file is incomplete or damaged "
     r"\(a partial download or copy, or an edit\); download or copy it again$"),
    (lambda f: cut(f / "text_encoder" / "config.json", keep=30), r"text_encoder/config\.json is not valid JSON"),
    (lambda f: cut(f / "vae" / "config.json", keep=30), r"vae/config\.json is not valid JSON"),
    # a sharded component whose index names a shard the download never finished
    (lambda f: shard(f, write_second=True, index=lambda text: text[:40]),
     r"diffusion_pytorch_model\.safetensors\.index\.json is not valid JSON"),
    (lambda f: shard(f, write_second=False),
     r"index\.json lists shards that are not there: \[.*-00002-of-00002\.safetensors'\]; the folder is incomplete "
     r"\(a download or copy that stopped part way\): download the missing files again"),
])
def test_a_half_downloaded_folder_names_the_file_and_says_to_download_it_again(tiny_model_dir, tmp_path, damage,
                                                                                message):
    """A model folder whose download stopped part way: a cut config.json was the JSON parser's bare
    'Unterminated string starting at: line 2 column 18 (char 19)', naming no file; a missing shard named the file
    but not what to do. Both are one line naming the file and saying to download it again."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(folder), "-o", str(out), *BASE])
    assert result.exit_code == 1 and not out.exists(), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {folder}/"), result.output
    assert re.search(message, lines[0]), lines[0]


def shard(folder: Path, write_second: bool, index=lambda text: text) -> None:
    """The DiT of ``folder`` as two shards and an index, as the Hub ships the released one."""
    from safetensors.torch import load_file

    dit = folder / "transformer"
    tensors = load_file(dit / "diffusion_pytorch_model.safetensors")
    (dit / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tensors)
    names = {k: f"diffusion_pytorch_model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    for n in sorted(set(names.values()))[: 2 if write_second else 1]:
        save_file({k: tensors[k] for k in keys if names[k] == n}, dit / n)
    text = json.dumps({"metadata": {}, "weight_map": names})
    (dit / "diffusion_pytorch_model.safetensors.index.json").write_text(index(text))


@pytest.mark.parametrize("name", ["vae/config.json", "scheduler/scheduler_config.json"])
def test_zimage_info_names_a_cut_config_of_a_model_folder(tiny_model_dir, tmp_path, name):
    """`zimage info`, the command to look at a folder with, answered a cut config.json with the parser's
    bare 'Error: Unterminated string starting at: line 2 column 18 (char 19)'; it names the file now, as
    loading does."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    cut(folder / name, keep=30)
    result = CliRunner().invoke(main, ["info", str(folder)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"Error: {re.escape(str(folder / name))} is not valid JSON \(line \d+ column \d+: [^)]+\): the file is "
        r"incomplete or damaged \(a partial download or copy, or an edit\); download or copy it again", lines[0]), lines


@pytest.mark.parametrize("name, command", [
    # the tokenizer's files, read by transformers, which passed the parser's message on
    ("tokenizer/tokenizer_config.json", lambda f, src, out: ["generate", "a cat", "--model", f, "-o", out, *BASE]),
    ("tokenizer/tokenizer.json", lambda f, src, out: ["format-prompt", "a cat", "--model", f, "--tokens"]),
    # a component folder's config.json (formats.infer.read_overrides): a --vae folder, `zimage info` of one
    ("vae/config.json",
     lambda f, src, out: ["generate", "a cat", "--model", src, "--vae", f / "vae", "-o", out, *BASE]),
    ("transformer/config.json", lambda f, src, out: ["info", f / "transformer"]),
])
def test_a_cut_tokenizer_file_or_component_config_names_the_file(tiny_model_dir, tmp_path, name, command):
    """The JSON files that 3ebb0f6 left to the bare parser message: a cut tokenizer_config.json or
    tokenizer.json ('Error: Expecting property name enclosed in double quotes: line 3 column 2 (char
    30)', from transformers), and the config.json of a component folder given on its own ('--vae
    FOLDER'; `zimage info FOLDER/transformer` said 'cannot load: FOLDER: Unterminated string starting
    at: line 2 column 18 (char 19)' with exit status 0). Each names the file and says to download or
    copy it again now."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    cut(folder / name, keep=30)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, [str(a) for a in command(folder, tiny_model_dir, out)])
    assert not out.exists()
    message = rf"{re.escape(str(folder / name))} is not valid JSON \(line \d+ column \d+: [^)]+\): the file is " \
              r"incomplete or damaged \(a partial download or copy, or an edit\); download or copy it again"
    if name.startswith("transformer/"):  # info lists what it cannot load, one line each
        assert re.search(rf"cannot load: .*: {message}", result.output), result.output
    else:
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert re.fullmatch(rf"Error: {message}", lines[0]), lines
