"""diffusers' named-adapter calls (``load_lora_weights(..., adapter_name=)``, ``set_adapters``,
``disable_lora`` / ``enable_lora``, ``delete_adapters``, ``unfuse_lora``) against diffusers 0.42.1
with PEFT on the tiny model, fp32 on the CPU: each state gives diffusers' final latents."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from .utils import assert_rel, rel_err

pytest.importorskip("diffusers")
pytest.importorskip("peft")

KW = dict(height=32, width=32, num_inference_steps=2, output_type="latent")


def save_lora(pipe, path, seed):
    """A diffusers-spelled LoRA on every attention projection, random A and B (not zero)."""
    from safetensors.torch import save_file

    g, sd = torch.Generator().manual_seed(seed), {}
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, nn.Linear) and ".attention.to_" in name:
            out_features, in_features = m.weight.shape
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * 0.3
    save_file(sd, str(path))
    return path


def pipelines_and_loras(model_dir, tmp_path):
    """Our pipeline and diffusers', two LoRA files, and ``both(what)``: run both, compare (1e-5), ours' latents."""
    from .fixtures import our_pipeline, reference_pipeline

    ours, ref = our_pipeline(model_dir), reference_pipeline(model_dir)
    a, b = save_lora(ours, tmp_path / "a.safetensors", 1), save_lora(ours, tmp_path / "b.safetensors", 2)

    def both(what):
        got = ours("a cat", seed=0, **KW).images
        expected = ref("a cat", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **KW).images
        assert_rel(got, expected, 1e-5, what)
        return got

    return ours, ref, a, b, both


def test_adapter_calls_match_diffusers(tiny_model_dir, tmp_path):
    ours, ref, a, b, both = pipelines_and_loras(tiny_model_dir, tmp_path)
    plain = both("no LoRA")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.load_lora_weights(str(b), "b")  # diffusers' positional order: (path, adapter_name, hotswap)
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["b"]
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"transformer": ["a", "b"]}
    only_b = both("two adapters loaded: the last one applies")
    for pipe in (ours, ref):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    mixed = both("set_adapters(['a', 'b'], [0.7, 0.3])")
    assert rel_err(mixed, only_b) > 1e-2  # the control: the weights change the image
    for pipe in (ours, ref):
        pipe.fuse_lora()
        pipe.unfuse_lora()  # diffusers: the adapters still apply, unfused
    both("fuse_lora + unfuse_lora")
    for pipe in (ours, ref):
        pipe.disable_lora()
    assert_rel(both("disable_lora"), plain, 1e-5, "disable_lora gives the plain model")
    for pipe in (ours, ref):
        pipe.enable_lora()
    both("enable_lora")
    for pipe in (ours, ref):
        pipe.delete_adapters("a")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["b"]
    both("delete_adapters('a'): b keeps its weight 0.3")
    for pipe in (ours, ref):
        pipe.set_adapters("b")
    both("set_adapters('b'): weight 1")
    for pipe in (ours, ref):
        pipe.unload_lora_weights()
    assert ours.get_list_adapters() == {} and not ours.loras
    both("unload_lora_weights")


def test_fuse_lora_then_unload_lora_weights_keeps_the_loras_as_diffusers_does(tiny_model_dir, tmp_path):
    """diffusers' recipe to bake LoRAs in: ``fuse_lora()`` then ``unload_lora_weights()`` drops the
    adapters and keeps their weights merged (later adapters go on top of them; ``unfuse_lora()``
    before the unload undoes the fuse). Here the unload used to unfuse everything: the plain model
    (rel err 0.37 from diffusers' image on the tiny model)."""
    ours, ref, a, b, both = pipelines_and_loras(tiny_model_dir, tmp_path)
    plain = both("no LoRA")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.load_lora_weights(str(b), adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.7])
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    assert ours.get_list_adapters() == ref.get_list_adapters() == {} and len(ours.loras) == 2
    baked = both("fuse_lora + unload_lora_weights: the LoRAs stay fused")
    assert rel_err(baked, plain) > 1e-2  # the control: the LoRAs apply
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="c")
    both("an adapter on top of the fused LoRAs")
    for pipe in (ours, ref):
        pipe.disable_lora()
    assert_rel(both("disable_lora: the fused LoRAs are the model's weights now"), baked, 1e-6, "disabled")
    for pipe in (ours, ref):
        pipe.enable_lora()
        pipe.unload_lora_weights()  # not fused: c goes, the LoRAs fused before stay
    assert_rel(both("unload_lora_weights without fuse_lora"), baked, 1e-6, "unloaded")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="d")
        pipe.fuse_lora()
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    assert_rel(both("fuse_lora + unfuse_lora + unload_lora_weights"), baked, 1e-6, "unfused")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="e")
        pipe.load_lora_weights(str(b), adapter_name="f")
        pipe.set_adapters(["e", "f"])
        pipe.fuse_lora(["transformer"], 1.0, False, ["e"])  # diffusers' positional order
        pipe.unload_lora_weights()
    both("fuse_lora(adapter_names=['e']) + unload_lora_weights: only e stays")
    ours.unload_lora()  # the engine's own unload still restores the original weights
    assert_rel(ours("a cat", seed=0, **KW).images, plain, 1e-6, "unload_lora")


def test_fuse_lora_with_a_scale_scales_the_active_adapters_as_diffusers_does(tiny_model_dir, tmp_path):
    """diffusers' recipe ``load_lora_weights(...)`` + ``fuse_lora(lora_scale=0.7)`` (then
    ``unload_lora_weights()`` to bake it in) was refused here, pointing at set_adapters. diffusers
    multiplies the active adapters' weights by the scale, and they keep it after unfuse_lora."""
    ours, ref, a, b, both = pipelines_and_loras(tiny_model_dir, tmp_path)
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="a")
    full = both("adapter a at weight 1")
    for pipe in (ours, ref):
        pipe.fuse_lora(lora_scale=0.7)
    scaled = both("fuse_lora(lora_scale=0.7)")
    assert rel_err(scaled, full) > 1e-2  # the control: the scale changes the image
    for pipe in (ours, ref):
        pipe.unfuse_lora()
    assert_rel(both("unfuse_lora: still at 0.7"), scaled, 1e-6, "unfused")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(b), adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.8])
        pipe.fuse_lora(lora_scale=0.6, adapter_names=["b", "a"])
        pipe.unfuse_lora()
    both("two adapters, fuse_lora(lora_scale=0.6)")
    assert ours.get_active_adapters() == ["a", "b"]
    with pytest.raises(ValueError, match=r"every active adapter \(\['a', 'b'\]\)"):
        ours.fuse_lora(lora_scale=0.5, adapter_names=["a"])  # diffusers gives neither weight then
    with pytest.raises(ValueError, match="finite number"):
        ours.fuse_lora(lora_scale=float("nan"))
    for pipe in (ours, ref):
        pipe.set_adapters("a", 0.7)
        pipe.fuse_lora(lora_scale=0.7)
        pipe.unload_lora_weights()
    assert ours.get_list_adapters() == ref.get_list_adapters() == {}
    baked = both("fuse_lora(lora_scale=0.7) at weight 0.7 + unload_lora_weights: baked at 0.49")
    ours.unload_lora()
    ours.load_lora_weights(str(a), adapter_name="check")
    ours.set_adapters("check", 0.49)
    assert_rel(ours("a cat", seed=0, **KW).images, baked, 1e-5, "baked at 0.49")
    ours.unload_lora()
    ours.load_lora(str(a))
    with pytest.raises(ValueError, match=r"load_lora\(path, scale=0.5\)"):
        ours.fuse_lora(lora_scale=0.5)  # a LoRA of load_lora() belongs to no adapter


def test_adapter_changes_after_fuse_lora_are_refused(tiny_pipe, tmp_path):
    """Between fuse_lora() and unload_lora_weights(), diffusers' PEFT unmerges for some calls and not
    for others (set_adapters and delete_adapters keep the merge, loading another adapter undoes it);
    they are refused here, naming unfuse_lora()."""
    pipe = tiny_pipe
    a = save_lora(pipe, tmp_path / "a.safetensors", 1)
    try:
        pipe.fuse_lora()  # no adapter: nothing to keep, nothing refused after it
        pipe.load_lora_weights(a, adapter_name="a")
        with pytest.raises(ValueError, match=r"fuse_lora\(\): no adapter named \['x'\]"):
            pipe.fuse_lora(adapter_names=["x"])
        pipe.fuse_lora()
        for call in (lambda: pipe.set_adapters("a", 0.5), lambda: pipe.delete_adapters("a"), pipe.disable_lora,
                     lambda: pipe.load_lora_weights(a, adapter_name="b")):
            with pytest.raises(ValueError, match=r"after fuse_lora\(\).*unfuse_lora\(\) first"):
                call()
        assert pipe.get_active_adapters() == ["a"]
        pipe.unfuse_lora()
        pipe.set_adapters("a", 0.5)
    finally:
        pipe.unload_lora()


def test_adapter_mistakes_are_named(tiny_pipe, tmp_path):
    pipe = tiny_pipe
    a = save_lora(pipe, tmp_path / "a.safetensors", 1)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    try:
        pipe.load_lora_weights(a, adapter_name="a")
        with pytest.raises(ValueError, match=r"adapter name 'a' is already in use"):
            pipe.load_lora_weights(a, adapter_name="a")
        with pytest.raises(ValueError, match=r"no adapter named \['c'\] \(loaded: \['a'\]"):
            pipe.set_adapters(["a", "c"])
        with pytest.raises(ValueError, match=r"per-block weights \(a dict\) are not supported"):
            pipe.set_adapters("a", {"layers": 0.5})
        with pytest.raises(ValueError, match=r"1 adapters but 2 adapter_weights"):
            pipe.set_adapters("a", [0.5, 0.5])
        with pytest.raises(ValueError, match=r"finite numbers"):
            pipe.set_adapters("a", float("nan"))
        (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
        fused = pipe.transformer.layers[0].attention.to_k.weight.clone()
        with pytest.raises(Exception):
            pipe.load_lora_weights(tmp_path / "bad.safetensors", adapter_name="bad")
        assert pipe.get_list_adapters() == {"transformer": ["a"]} and pipe.get_active_adapters() == ["a"]
        assert torch.equal(pipe.transformer.layers[0].attention.to_k.weight, fused)  # a still applies
        pipe.load_lora(a, 0.5)  # the engine's own call: fused, in no adapter
        with pytest.raises(ValueError, match=r"LoRAs loaded with load_lora\(\) are fused and belong to no adapter"):
            pipe.set_adapters("a", 0.5)
    finally:
        pipe.unload_lora()
    assert pipe.get_list_adapters() == {} and all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def test_joint_attention_kwargs_as_diffusers_reads_them(tiny_pipe, tmp_path):
    """diffusers' Z-Image reads only ``scale`` (a per-call LoRA scale) from joint_attention_kwargs:
    None, {} and scale 1 change nothing; without a LoRA no scale does; with fused LoRAs another
    scale cannot apply and is refused, saying how to set it."""
    pipe = tiny_pipe
    plain = pipe("a cat", seed=0, **KW).images
    for kwargs in (None, {}, {"scale": 1.0}, {"scale": 0.5}):
        assert torch.equal(pipe("a cat", seed=0, joint_attention_kwargs=kwargs, **KW).images, plain), kwargs
    with pytest.raises(ValueError, match=r"\['attn_mask'\] have no meaning here; only 'scale'"):
        pipe("a cat", joint_attention_kwargs={"attn_mask": None}, **KW)
    with pytest.raises(TypeError, match=r"must be a dict such as \{'scale': 0.8\}"):
        pipe("a cat", joint_attention_kwargs=0.5, **KW)
    pipe.load_lora_weights(save_lora(pipe, tmp_path / "a.safetensors", 1), adapter_name="a")
    try:
        fused = pipe("a cat", seed=0, joint_attention_kwargs={"scale": 1.0}, **KW).images
        assert not torch.equal(fused, plain)  # the control: the LoRA applies
        with pytest.raises(ValueError, match=r"pipe.set_adapters\(names, adapter_weights=...\)"):
            pipe("a cat", joint_attention_kwargs={"scale": 0.5}, **KW)
        one = pipe("a cat", seed=0, joint_attention_kwargs={"scale": torch.tensor(1.0)}, **KW).images
        assert torch.equal(one, fused)
        with pytest.raises(ValueError, match=r"\{'scale': 0.5\}: LoRAs are fused into the weights here"):
            pipe("a cat", joint_attention_kwargs={"scale": torch.tensor(0.5)}, **KW)
    finally:
        pipe.unload_lora_weights()


def fake_hub_cache(cache, repo_id, files: dict):
    """A Hugging Face cache holding ``files`` (name -> source path) of ``repo_id`` at one commit, as
    snapshot_download leaves it: what local_files_only=True reads without a network."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return cache


def test_load_lora_weights_takes_a_hub_id_as_diffusers_does(tiny_pipe, tmp_path, monkeypatch):
    """diffusers' load_lora_weights("owner/name", weight_name=...) fetches the LoRA from the Hub; here
    it was read as a local path ("LoRA file not found: owner/name/..."). A Hub id is fetched now (only
    the named file, or the .safetensors files), from the cache here; no network or no such cache is
    a HubError that names the LoRA; a mistyped local file stays a local error; diffusers' other
    options are named when refused."""
    pipe = tiny_pipe
    lora = save_lora(pipe, tmp_path / "a.safetensors", 1)
    pipe.load_lora(lora)
    expected = pipe("a cat", seed=0, **KW).images
    pipe.unload_lora()
    cache = fake_hub_cache(tmp_path / "hub", "someone/style", {"pytorch_lora_weights.safetensors": lora,
                                                                 "v2/style.safetensors": lora})
    try:
        report = pipe.load_lora_weights("someone/style", adapter_name="root", cache_dir=cache, local_files_only=True)
        assert report.path.endswith("pytorch_lora_weights.safetensors")
        assert torch.equal(pipe("a cat", seed=0, **KW).images, expected)
        report = pipe.load_lora_weights("someone/style", weight_name="style.safetensors", subfolder="v2",
                                        adapter_name="sub", cache_dir=cache, local_files_only=True,
                                        low_cpu_mem_usage=True)
        assert report.path.endswith("v2/style.safetensors") and pipe.get_active_adapters() == ["sub"]
    finally:
        pipe.unload_lora_weights()
    from zimage_native.hub import HubError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=r"^cannot fetch the LoRA someone/other from the Hugging Face Hub: "
                       r"local_files_only is set .* or give the path of a LoRA file instead"):
        pipe.load_lora_weights("someone/other", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"LoRA not found: loras/style.safetensors \(give a LoRA file"):
        pipe.load_lora_weights("loras/style.safetensors")  # a relative path, not looked up on the Hub
    with pytest.raises(ValueError, match=r"hotswap=True\): LoRAs are fused into the weights here"):
        pipe.load_lora_weights(lora, hotswap=True)
    with pytest.raises(ValueError, match=r"set HF_TOKEN"):
        pipe.load_lora_weights("someone/style", token="hf_x")
    with pytest.raises(TypeError, match=r"load_lora_weights\(\) got unknown arguments \['prefix'\]"):
        pipe.load_lora_weights(lora, prefix="unet")
    assert pipe.get_list_adapters() == {} and not pipe.loras


def test_an_adapter_refit_that_fails_part_way_names_what_applies(fresh_pipe, tmp_path):
    """set_adapters refits from the adapters' sources; a file gone since it was loaded fails the refit
    part-way. The adapters are put back and fused again; where that fails too, the active adapters
    are the ones fused (here none): get_active_adapters tells the truth and the next call works."""
    pipe = fresh_pipe
    plain = pipe("a cat", seed=0, **KW).images
    b = save_lora(pipe, tmp_path / "b.safetensors", 2)
    a = save_lora(pipe, tmp_path / "a.safetensors", 1)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["b", "a"])
    a.unlink()
    with pytest.raises(Exception):
        pipe.set_adapters("a", 0.5)  # b is unfused, a cannot be read: fused as before (b, a) fails at a
    assert pipe.get_active_adapters() == ["b"] and len(pipe.lora_stack.loaded) == pipe.lora_adapters.fused == 1
    only_b = pipe("a cat", seed=0, **KW).images
    pipe.set_adapters("b")
    assert torch.equal(pipe("a cat", seed=0, **KW).images, only_b)
    assert rel_err(only_b, plain) > 1e-2  # the control: b applies


def test_a_failed_refit_over_baked_loras_names_what_applies(fresh_pipe, tmp_path):
    """With a LoRA baked in (fuse_lora + unload_lora_weights), a refit that fails part-way keeps the
    LoRAs it fused: the baked one counts among them, so the active adapters are the fused ones after
    it. They were counted from the start of the active ones: ['b', 'a'] with only b fused."""
    pipe = fresh_pipe
    x = save_lora(pipe, tmp_path / "x.safetensors", 3)
    a, b = save_lora(pipe, tmp_path / "a.safetensors", 1), save_lora(pipe, tmp_path / "b.safetensors", 2)
    pipe.load_lora_weights(str(x), adapter_name="x")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["b", "a"])
    a.unlink()
    with pytest.raises(FileNotFoundError):
        pipe.set_adapters("a", 0.5)  # fused again as before (x, b, a): fails at a
    assert pipe.get_active_adapters() == ["b"] and len(pipe.lora_stack.loaded) == pipe.lora_adapters.fused == 2
    with_b = pipe("a cat", seed=0, **KW).images
    pipe.set_adapters("b")
    assert torch.equal(pipe("a cat", seed=0, **KW).images, with_b)


def test_load_lora_weights_refuses_the_old_positional_weight_name(tiny_pipe, tmp_path):
    """load_lora_weights now takes diffusers' order (path, adapter_name, hotswap); a call in its former
    order (path, weight_name, adapter_name) loaded a folder's one file as the adapter
    'style.safetensors', or was refused as hotswap=True. Both are named, with nothing loaded."""
    pipe = tiny_pipe
    (tmp_path / "loras").mkdir()
    save_lora(pipe, tmp_path / "loras" / "style.safetensors", 1)
    try:
        for args in (("style.safetensors",), ("style.safetensors", "style")):
            with pytest.raises(TypeError, match=r"diffusers' \(adapter_name, hotswap\); give the file .* weight_name="):
                pipe.load_lora_weights(tmp_path / "loras", *args)
            assert pipe.get_list_adapters() == {} and not pipe.loras
        pipe.load_lora_weights(tmp_path / "loras", "style", weight_name="style.safetensors")
        assert pipe.get_active_adapters() == ["style"]
    finally:
        pipe.unload_lora()



def test_adapter_refits_read_each_lora_file_once(fresh_pipe, tiny_model_dir, tmp_path, monkeypatch):
    """Each adapter change fuses the active adapters again; their files were read again each time
    (a rank-32 LoRA of the real DiT: 159 MB, about 0.1 s per file and change). They are read once
    and held while an adapter names them; a file that changed is read again, and a deleted
    adapter's file is let go. The images equal a pipeline that reads the files anew."""
    import os

    from zimage_native import lora as lora_module

    from .fixtures import our_pipeline

    pipe, ref = fresh_pipe, our_pipeline(tiny_model_dir)
    a, b = save_lora(pipe, tmp_path / "a.safetensors", 1), save_lora(pipe, tmp_path / "b.safetensors", 2)

    def reference():
        ref.load_lora([str(b), str(a)], [0.3, 0.2])
        try:
            return ref("a cat", seed=0, **KW).images
        finally:
            ref.unload_lora()

    want_both = reference()
    reads = []
    real = lora_module.read_lora
    monkeypatch.setattr(lora_module, "read_lora", lambda source, **kw: reads.append(source) or real(source, **kw))
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.8])
    pipe.disable_lora()
    pipe.enable_lora()
    pipe.set_adapters(["b", "a"], [0.3, 0.2])
    assert len(reads) == 2, reads  # (each change read every active file again: 8 reads here)
    assert torch.equal(pipe("a cat", seed=0, **KW).images, want_both)
    stat = a.stat()
    save_lora(pipe, a, 3)  # another LoRA in the same file (of the same size)
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    pipe.set_adapters(["b", "a"], [0.3, 0.2])
    assert len(reads) == 3 and str(reads[-1]) == str(a)
    changed = pipe("a cat", seed=0, **KW).images
    monkeypatch.undo()
    want_changed = reference()
    assert torch.equal(changed, want_changed) and not torch.equal(want_changed, want_both)

    def tensor_bytes(file):  # a safetensors file: 8 bytes of header length, the header, the tensors
        with open(file, "rb") as f:
            return os.path.getsize(file) - 8 - int.from_bytes(f.read(8), "little")

    assert pipe.lora_adapters.files.held_bytes() == tensor_bytes(a) + tensor_bytes(b)  # the files' tensors
    pipe.delete_adapters("b")
    assert list(pipe.lora_adapters.files.held) == [str(a)]
    pipe.unload_lora_weights()
    assert not pipe.lora_adapters.files.held


def test_adapters_forgotten_by_unload_lora_weights_let_go_of_their_files(fresh_pipe, tmp_path):
    """After fuse_lora(), unload_lora_weights() keeps the merged adapter in the weights and forgets the
    others without a refit: the forgotten adapters' files stayed held in CPU memory (LoraFiles) until
    some later adapter change; only the baked LoRA's file is held now."""
    pipe = fresh_pipe
    a, b = save_lora(pipe, tmp_path / "a.safetensors", 1), save_lora(pipe, tmp_path / "b.safetensors", 2)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")  # b the only active one
    assert sorted(pipe.lora_adapters.files.held) == [str(a), str(b)]
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and [str(s) for s, _, _ in pipe.lora_adapters.baked] == [str(b)]
    assert list(pipe.lora_adapters.files.held) == [str(b)]


class _WatchedLock:
    """A pipeline's re-entrant lock that tells when a thread other than ``owner`` (once set) tries to take it."""

    def __init__(self):
        self.lock, self.owner, self.tried = threading.RLock(), None, threading.Event()

    def acquire(self, blocking=True, timeout=-1):
        if self.owner is not None and threading.get_ident() != self.owner:
            self.tried.set()
        return self.lock.acquire(blocking, timeout)

    def release(self):
        self.lock.release()

    def _is_owned(self):
        return self.lock._is_owned()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def test_a_step_end_callback_changing_a_shared_dit_does_not_deadlock_with_another_pipelines_change(fresh_pipe,
                                                                                                     tmp_path):
    """diffusers' LoRA schedule (``set_adapters`` from a ``callback_on_step_end``) on pipeline A while
    another thread calls ``optimize`` on pipeline B, which shares A's DiT. Both calls take the locks of
    every pipeline holding the DiT in id order, but the callback's run already held A's: with B first
    in that order, B's call took B's lock and waited for A's, and the callback waited for B's, forever
    (reproduced: both threads alive after 20 s). The callback waits here until B's call has tried A's
    lock (so B's call took B's first)."""
    from zimage_native import ZImagePipeline

    other = ZImagePipeline(fresh_pipe.transformer, fresh_pipe.vae, fresh_pipe.text_encoder,
                           fresh_pipe.scheduler_config, fresh_pipe.vae_config)
    running, changing = sorted([fresh_pipe, other], key=id, reverse=True)  # the run's lock comes second
    running.load_lora_weights(str(save_lora(running, tmp_path / "a.safetensors", 1)), adapter_name="a")
    running._lock = _WatchedLock()
    started, results = threading.Event(), {}

    def on_step_end(pipe, i, t, tensors):
        if i == 0:
            running._lock.owner = threading.get_ident()  # the run's thread, which holds it
            started.set()
            assert running._lock.tried.wait(10)
            pipe.set_adapters("a", adapter_weights=0.5)
        return tensors

    def run():
        results["run"] = running("a cat", seed=0, callback_on_step_end=on_step_end, **KW).images

    def change():
        started.wait(10)
        results["change"] = changing.optimize(attention="sdpa")

    threads = [threading.Thread(target=run, daemon=True), threading.Thread(target=change, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads), "the callback's set_adapters and optimize deadlocked"
    assert set(results) == {"run", "change"} and running.lora_adapters.active == {"a": 0.5}


def test_two_runs_whose_callbacks_change_a_shared_dit_refuse_one_change_instead_of_waiting_forever(fresh_pipe,
                                                                                                   tmp_path):
    """Two pipelines sharing a DiT, each running in a thread with a step-end callback that calls
    ``set_adapters``: each change waits for the other pipeline's run, whose callback waits for this
    one's (reproduced: both threads alive after 20 s). The second to wait is refused, naming why; the
    other run ends with its change made. The barrier holds both callbacks until both runs are in."""
    from zimage_native import ZImagePipeline

    other = ZImagePipeline(fresh_pipe.transformer, fresh_pipe.vae, fresh_pipe.text_encoder,
                           fresh_pipe.scheduler_config, fresh_pipe.vae_config)
    other.progress = False
    # (the adapter is the shared DiT's: loaded through one, both pipelines hold it)
    fresh_pipe.load_lora_weights(str(save_lora(fresh_pipe, tmp_path / "a.safetensors", 1)), adapter_name="a")
    barrier, results = threading.Barrier(2, timeout=10), {}

    def on_step_end(pipe, i, t, tensors):
        if i == 0:
            barrier.wait()
            pipe.set_adapters("a", adapter_weights=0.5)
        return tensors

    def run(pipe):
        try:
            results[pipe] = pipe("a cat", seed=0, callback_on_step_end=on_step_end, **KW).images
        except RuntimeError as error:
            results[pipe] = error

    threads = [threading.Thread(target=run, args=(pipe,), daemon=True) for pipe in (fresh_pipe, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads), "the two callbacks' set_adapters deadlocked"
    refused = [pipe for pipe, result in results.items() if isinstance(result, RuntimeError)]
    assert len(results) == 2 and len(refused) == 1, results
    assert "each waits for the other's run to end" in str(results[refused[0]])
    ran = other if refused[0] is fresh_pipe else fresh_pipe
    assert isinstance(results[ran], torch.Tensor) and ran.lora_adapters.active == {"a": 0.5}


def test_pipelines_sharing_a_dit_share_its_loras(fresh_pipe, tmp_path):
    """Two pipelines holding one DiT kept a LoRA record each, over the one set of weights:
    first.load_lora(a), second.load_lora(b), first.unload_lora() (the weights as first's load found
    them: b gone, second still reporting it), second.unload_lora() (as second's load found them: a
    back in, max abs weight change 1.2 on the tiny model), and both reported no LoRA. The records are
    the DiT's now: each pipeline reports what is fused, either one's unload restores the weights, a
    pipeline built on the DiT takes them, and one given another DiT (pipe.transformer = dit) reports
    none and leaves the new DiT as it is at unload (it wrote the old DiT's original weights into 16
    of the new one's weights)."""
    import copy

    from zimage_native import ZImagePipeline

    first = fresh_pipe
    second = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    a, b = (str(save_lora(first, tmp_path / f"{name}.safetensors", seed)) for name, seed in (("a", 1), ("b", 2)))

    def weights(dit):
        return {name: tensor.clone() for name, tensor in dit.state_dict().items()}

    def unchanged(dit, before):
        return all(torch.equal(tensor, before[name]) for name, tensor in dit.state_dict().items())

    original = weights(first.transformer)
    for loads, unloads in ((first, second), (second, first)):
        loads.load_lora(a)
        unloads.load_lora(b)
        assert [r.path for r in first.loras] == [r.path for r in second.loras] == [a, b]
        assert unloads.unload_lora() > 0
        assert first.loras == second.loras == [] and unchanged(first.transformer, original)
        assert loads.unload_lora() == 0 and unchanged(first.transformer, original)
    first.load_lora_weights(a, adapter_name="a")
    third = ZImagePipeline(first.transformer, first.vae, first.text_encoder, first.scheduler_config, first.vae_config)
    assert second.get_list_adapters() == third.get_list_adapters() == {"transformer": ["a"]}
    third.unload_lora_weights()
    assert first.loras == [] and first.get_list_adapters() == {} and unchanged(first.transformer, original)

    first.load_lora(a)
    own = copy.deepcopy(first.transformer)
    with torch.no_grad():
        for parameter in own.parameters():
            parameter.add_(0.01)  # (another fine-tune)
    own_weights = weights(own)
    second.transformer = own
    assert second.loras == [] and [r.path for r in first.loras] == [a]
    assert second.unload_lora() == 0 and unchanged(own, own_weights)
    first.unload_lora()
    assert unchanged(first.transformer, original)


def test_a_second_scaled_fuse_lora_without_unfuse_is_refused(tiny_pipe, tmp_path):
    """diffusers 0.42.1 with PEFT, after load + fuse_lora(lora_scale=0.7) + fuse_lora(lora_scale=0.7):
    the images are the first fuse's (weight 0.7), but the adapter's scale is 0.49, so unfuse_lora() +
    unload_lora_weights() leaves the LoRA at 0.21 in the weights (measured on the tiny model: 3e-7
    from weight 0.21). Refused, saying so, rather than copied."""
    pipe = tiny_pipe
    a = save_lora(pipe, tmp_path / "a.safetensors", 1)
    try:
        pipe.load_lora_weights(a, adapter_name="a")
        pipe.fuse_lora(lora_scale=0.7)
        pipe.fuse_lora()  # a scale of 1 changes nothing, as in diffusers
        with pytest.raises(ValueError, match=r"fuse_lora\(lora_scale=0.7\) after fuse_lora\(\): diffusers keeps the "
                                             r"weights fused at the first scale.*unfuse_lora\(\) first"):
            pipe.fuse_lora(lora_scale=0.7)
        pipe.unfuse_lora()
        pipe.fuse_lora(lora_scale=0.7)  # after unfuse_lora: 0.49, as in diffusers (test above)
    finally:
        pipe.unload_lora()


def test_delete_adapters_passes_over_names_not_loaded_as_diffusers_does(tiny_model_dir, tmp_path, caplog):
    """delete_adapters('a') after unload_lora_weights() (a common clean-up) was refused here ("no
    adapter named ['a']"); diffusers does nothing for a name not loaded. Now passed over with a warning."""
    ours, ref, a, b, both = pipelines_and_loras(tiny_model_dir, tmp_path)
    plain = both("no LoRA")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.unload_lora_weights()
        pipe.delete_adapters("a")
    assert ours.get_list_adapters() == ref.get_list_adapters() == {}
    assert_rel(both("delete_adapters('a') after unload_lora_weights()"), plain, 1e-6, "plain")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.load_lora_weights(str(b), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.5, 0.8])
    with caplog.at_level("WARNING", logger="zimage_native.pipeline"):
        for pipe in (ours, ref):
            pipe.delete_adapters(["x", "a"])  # x was never loaded: a goes, b keeps its weight
    assert "no adapter named ['x'] is loaded (loaded: ['a', 'b'])" in caplog.text
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"transformer": ["b"]}
    assert rel_err(both("delete_adapters(['x', 'a'])"), plain) > 1e-2  # the control: b still applies
