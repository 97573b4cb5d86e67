"""Strict loading, sharded checkpoints, dtype casting and model resolution (local folders, Hub ids)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_native import ZImagePipeline
from zimage_native.config import TransformerConfig
from zimage_native.hub import HUB_FILES, resolve_model_folder
from zimage_native.loading import StateDictMismatchError, assign_state_dict, build_on_meta, load_module
from zimage_native.model.transformer import ZImageTransformer

from .dit_configs import TINY_DIT


def tiny_state():
    config = TransformerConfig.from_dict(TINY_DIT)
    model = ZImageTransformer(config)
    return config, {k: v.clone() for k, v in model.state_dict().items()}


def test_missing_and_unexpected_keys_are_named_with_counts():
    config, sd = tiny_state()
    del sd["layers.0.attention.to_q.weight"], sd["x_pad_token"]
    sd["layers.0.attention.qkv.weight"] = torch.zeros(3)
    with pytest.raises(StateDictMismatchError) as err:
        assign_state_dict(build_on_meta(lambda: ZImageTransformer(config)), sd, "transformer")
    msg = str(err.value)
    assert "2 missing keys" in msg and "layers.0.attention.to_q.weight" in msg and "x_pad_token" in msg
    assert "1 unexpected keys" in msg and "layers.0.attention.qkv.weight" in msg


def test_shape_mismatch_is_reported():
    config, sd = tiny_state()
    sd["x_pad_token"] = torch.zeros(1, 7)
    with pytest.raises(StateDictMismatchError, match="shape mismatches"):
        assign_state_dict(build_on_meta(lambda: ZImageTransformer(config)), sd, "transformer")


def test_sharded_fp32_checkpoint_is_cast_while_loading(tmp_path):
    config, sd = tiny_state()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = load_module(lambda: ZImageTransformer(config), tmp_path, torch.bfloat16, "cpu", "transformer")
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].to(torch.bfloat16)), k


def test_index_naming_a_missing_shard_raises(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_module(lambda: torch.nn.Linear(1, 1), tmp_path, None, "cpu", "x")


def test_text_encoder_with_model_prefix_loads(tiny_model_dir, tmp_path, tiny_pipe):
    """Hub text-encoder files carry a 'model.' prefix (and may carry lm_head); both load."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    te = folder / "text_encoder" / "model.safetensors"
    sd = load_file(te)
    sd = {f"model.{k}": v for k, v in sd.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, te)
    pipe = ZImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    a, b = pipe.encode_prompt(["a cat"])[0], tiny_pipe.encode_prompt(["a cat"])[0]
    assert torch.equal(a, b)


def test_missing_model_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ZImagePipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a Z-Image model folder"):
        ZImagePipeline.from_pretrained(tmp_path)


def test_an_omni_folder_is_named(tiny_model_dir, tmp_path):
    """Z-Image-Omni-Base's transformer (SigLIP image conditioning) is not implemented: the error names it."""
    folder = tmp_path / "omni"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "siglip_feat_dim": 1152}))
    with pytest.raises(ValueError, match=r"Z-Image-Omni transformer .* not implemented; zimage-native runs "
                                         r"Z-Image-Turbo and Z-Image \(base\)"):
        ZImagePipeline.from_pretrained(folder, device="cpu")


def test_a_component_folder_or_a_folder_of_single_files_says_what_to_give(tiny_model_dir, tmp_path):
    """`--model MODEL/transformer` and `--model ~/ComfyUI/models/diffusion_models` listed every missing
    part and nothing more."""
    with pytest.raises(FileNotFoundError, match=rf"missing .*; it is a part of the model folder "
                                                rf"{tiny_model_dir.resolve()}: give that folder$"):
        ZImagePipeline.from_pretrained(tiny_model_dir / "transformer")
    (tmp_path / "z_image_turbo_bf16.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing .*; for single-file checkpoints \(ComfyUI, GGUF\) give the "
                                                r"DiT file as transformer=FILE \(--transformer FILE\)"):
        ZImagePipeline.from_pretrained(tmp_path)


def test_a_folder_lacking_a_component_takes_it_from_its_own_file(tiny_model_dir, tmp_path):
    """A model folder without vae/ (ComfyUI users keep ae.safetensors elsewhere) was refused with
    "missing ['vae/config.json']" even with vae= (--vae FILE) given, and without it the error did not
    say what to do. Now the given file stands in for it (its config from its tensors, as from single
    files), and the error names vae=FILE (--vae FILE)."""
    folder = tmp_path / "novae"
    shutil.copytree(tiny_model_dir, folder, ignore=lambda d, names: ["vae"] if d == str(tiny_model_dir) else [])
    with pytest.raises(FileNotFoundError, match=re.escape("missing ['vae/config.json']; give vae=FILE (--vae FILE) "
                                                          "for what it lacks, or fetch the whole folder again")):
        ZImagePipeline.from_pretrained(folder, device="cpu")
    vae_file = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    pipe = ZImagePipeline.from_pretrained(folder, device="cpu", vae=vae_file)
    # the VAE's config from its tensors, as from single files (released scaling and shift factors)
    whole = ZImagePipeline.from_single_files(tiny_model_dir / "transformer", vae_file, tiny_model_dir / "text_encoder",
                                             tiny_model_dir / "tokenizer", device="cpu")
    kw = dict(width=32, height=32, num_inference_steps=2, seed=3)
    assert pipe("a cat", **kw).images[0].tobytes() == whole("a cat", **kw).images[0].tobytes()


def test_a_folder_lacking_its_tokenizer_takes_the_one_given(tiny_model_dir, tmp_path):
    """A model folder without tokenizer/ was refused ("missing ['tokenizer']") even with tokenizer=
    (--tokenizer) given, as a folder without vae/ was with vae= before 3a0461d."""
    folder = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, folder, ignore=lambda d, names: ["tokenizer"] if d == str(tiny_model_dir) else [])
    with pytest.raises(FileNotFoundError, match=re.escape("missing ['tokenizer']")):
        ZImagePipeline.from_pretrained(folder, device="cpu")
    pipe = ZImagePipeline.from_pretrained(folder, device="cpu", tokenizer=tiny_model_dir / "tokenizer")
    whole = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu")
    kw = dict(width=32, height=32, num_inference_steps=2, seed=3)
    assert pipe("a cat", **kw).images[0].tobytes() == whole("a cat", **kw).images[0].tobytes()


def test_hub_id_downloads_only_needed_files(tiny_model_dir, monkeypatch):
    calls = {}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        return str(tiny_model_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = resolve_model_folder("Tongyi-MAI/Z-Image-Turbo", revision="main")
    assert folder == tiny_model_dir
    assert calls["repo_id"] == "Tongyi-MAI/Z-Image-Turbo" and calls["revision"] == "main"
    assert calls["allow_patterns"] == HUB_FILES
    assert "transformer/*.safetensors" in HUB_FILES and not any(p.endswith(".bin") for p in HUB_FILES)


def test_hub_cache_layout_loads_offline(tiny_model_dir, tmp_path):
    """A Hub id already in the huggingface_hub cache loads with local_files_only (no network)."""
    repo = tmp_path / "models--Tongyi-MAI--Z-Image-Turbo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder = resolve_model_folder("Tongyi-MAI/Z-Image-Turbo", cache_dir=tmp_path, local_files_only=True)
    assert (folder / "transformer" / "config.json").is_file()


class RecordingBar:
    """Stands in for tqdm: records each bar's description, total, what was read and whether it shows."""

    bars: list = []

    def __init__(self, total=None, desc=None, disable=False, **kwargs):
        self.total, self.desc, self.disable, self.n = total, desc, disable, 0
        RecordingBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.n += n


def test_loading_shows_progress_in_bytes_for_large_components(tiny_model_dir, tmp_path, monkeypatch):
    """Every component's weights are read under a bar whose total is what the component holds in the
    load dtype, and which ends there; below PROGRESS_MIN_BYTES (the tiny model) the bar is off."""
    import tqdm.auto

    import zimage_native.loading as loading
    from zimage_native import ZImagePipeline

    from .test_formats import comfy_dit, write

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    RecordingBar.bars = []
    ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    assert {b.desc for b in RecordingBar.bars} == {"loading transformer", "loading vae", "loading text encoder"}
    assert all(b.disable is True and b.n == b.total > 0 for b in RecordingBar.bars)  # tiny: no bar

    monkeypatch.setattr(loading, "PROGRESS_MIN_BYTES", 0)
    RecordingBar.bars = []
    single = write(tmp_path / "dit.safetensors", comfy_dit(tiny_model_dir))
    loading.load_component("transformer", single, torch.bfloat16, "cpu", {"axes_dims": [8, 12, 12]})
    (bar,) = RecordingBar.bars
    assert bar.desc == "loading transformer" and bar.disable is None and bar.n == bar.total  # shown on a terminal


def test_a_text_encoder_of_another_width_is_refused_before_any_weight_is_read(tiny_model_dir, tmp_path, monkeypatch):
    """A Qwen3 whose hidden size is not the DiT's caption width (another Qwen3 size) was found only
    after the DiT, the VAE and the encoder had all been loaded: now from the headers, before."""
    from transformers import Qwen3Config, Qwen3Model

    import zimage_native.loading as loading
    from zimage_native.testing import randomize_

    from .fixtures import TINY_QWEN3

    wide = tmp_path / "wide"
    config = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    randomize_(Qwen3Model(Qwen3Config(**dict(TINY_QWEN3, vocab_size=config["vocab_size"], hidden_size=64))), 1
               ).save_pretrained(wide)
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(wide, folder / "text_encoder")

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the widths were compared")

    monkeypatch.setattr(loading, "load_module", no_load)
    monkeypatch.setattr(loading, "load_component", no_load)
    width = r"text encoder hidden size 64 \(.*\) does not match the transformer's cap_feat_dim 48"
    with pytest.raises(ValueError, match=width):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", text_encoder=wide / "model.safetensors")
    with pytest.raises(ValueError, match=width):
        ZImagePipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match=width):
        ZImagePipeline.from_single_files(transformer=tiny_model_dir / "transformer", vae=tiny_model_dir / "vae",
                                         text_encoder=wide, tokenizer=tiny_model_dir / "tokenizer", device="cpu")
    assert loading.header_width("transformer", tiny_model_dir / "transformer") == 48
    assert loading.header_width("text_encoder", tmp_path / "nothing.safetensors") is None
