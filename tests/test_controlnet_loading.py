"""Loading Fun-ControlNet-Union checkpoints: config inference for each published layout, diffusers
folders, config overrides, strictness and the errors for files that are not ControlNets."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from zimage_native.config import ControlNetConfig, TransformerConfig
from zimage_native.formats.controlnet import infer_controlnet_config, load_controlnet
from zimage_native.formats import UnsupportedFormatError
from zimage_native.loading import StateDictMismatchError, build_on_meta
from zimage_native.model.controlnet import ZImageControlNet

from .test_controlnet_pipeline import control_files, control_model_dir  # noqa: F401 (fixtures)
from .test_controlnet_model import CONTROL_DIT, CONTROL_LAYOUTS, inputs, make_models, run_ours, run_reference
from .utils import WeightsRead, assert_rel, refuse_weight_reads

diffusers = pytest.importorskip("diffusers")

DIT = TransformerConfig.from_dict(CONTROL_DIT)


def control_state_dict(version: str) -> dict[str, torch.Tensor]:
    """The control tensors of the randomised diffusers model, as a published single file holds them."""
    return {k: v.contiguous() for k, v in make_models(version)[1].state_dict().items() if k.startswith("control_")}


def write(tmp_path, name, state_dict):
    path = tmp_path / name
    save_file(state_dict, str(path))
    return path


def expected_config(version: str) -> dict:
    return ControlNetConfig.from_dict(CONTROL_LAYOUTS[version]).to_dict()


@pytest.mark.parametrize("version", ["1.0", "2.1"])
@torch.no_grad()
def test_single_file_infers_the_layout_and_matches_diffusers(tmp_path, version):
    path = write(tmp_path, f"cn-{version}.safetensors", control_state_dict(version))
    cn = load_controlnet(path, transformer_config=DIT)
    got = cn.config.to_dict()
    want = expected_config(version)
    if version == "1.0":  # unused by 1.0; the inference leaves it unset
        want["control_refiner_layers_places"] = None
    assert got == want
    assert cn.config.version == version
    ref_dit, ref_cn, dit, _, config = make_models(version)
    latents, control, caps, t = inputs(version, [7, 40])
    _, expected = run_reference(ref_dit, ref_cn, latents, control, caps, t, 0.6)
    _, out, _ = run_ours(dit, cn, config, latents, control, caps, t, 0.6)
    assert_rel(out, expected, 1e-5, f"DiT output with the loaded {version} ControlNet")


@torch.no_grad()
def test_version_2_0_with_zero_refiner_is_told_from_2_1(tmp_path):
    """diffusers' rule: control_noise_refiner.0.before_proj all zeros (or absent) -> 2.0, and the
    untrained refiner tensors are dropped."""
    sd = control_state_dict("2.1")
    sd["control_noise_refiner.0.before_proj.weight"] = torch.zeros_like(sd["control_noise_refiner.0.before_proj.weight"])
    zero = load_controlnet(write(tmp_path, "zero.safetensors", sd), transformer_config=DIT)
    absent = {k: v for k, v in sd.items() if k != "control_noise_refiner.0.before_proj.weight"}
    no_before = load_controlnet(write(tmp_path, "absent.safetensors", absent), transformer_config=DIT)
    no_refiner = {k: v for k, v in sd.items() if not k.startswith("control_noise_refiner.")}
    bare = load_controlnet(write(tmp_path, "bare.safetensors", no_refiner), transformer_config=DIT)
    for cn in (zero, no_before, bare):
        assert cn.config.to_dict() == expected_config("2.0")
        assert cn.control_noise_refiner is None
    # The 2.0 layout computes what diffusers' 2.0 model computes with the same control layers.
    ref_dit, ref_cn, dit, _, config = make_models("2.0")
    same = {k: v for k, v in control_state_dict("2.0").items()}
    cn = load_controlnet(write(tmp_path, "v20.safetensors", same), transformer_config=DIT)
    latents, control, caps, t = inputs("2.0", [9])
    _, expected = run_reference(ref_dit, ref_cn, latents, control, caps, t, 0.75)
    _, out, _ = run_ours(dit, cn, config, latents, control, caps, t, 0.75)
    assert_rel(out, expected, 1e-5, "DiT output with the loaded 2.0 ControlNet")


def test_published_layouts_from_shapes():
    """The even-spacing rule against the published configs (a 30-layer DiT): 1.0 has 6 control
    layers at [0, 5, ..., 25] and 16 input channels; 2.0 and 2.1 have 15 at [0, 2, ..., 28], 33
    channels and refiner places [0, 1]."""
    dit = TransformerConfig()
    dim, ffn = dit.dim, dit.ffn_dim

    def shapes(n_layers, in_dim, refiner):
        s = {"control_all_x_embedder.2-1.weight": (dim, 4 * in_dim), "control_all_x_embedder.2-1.bias": (dim,),
             "control_layers.0.before_proj.weight": (dim, dim)}
        for k in range(n_layers):
            s[f"control_layers.{k}.attention.norm_q.weight"] = (128,)
            s[f"control_layers.{k}.after_proj.weight"] = (dim, dim)
            s[f"control_layers.{k}.feed_forward.w1.weight"] = (ffn, dim)
        for k in range(2 if refiner else 0):
            s[f"control_noise_refiner.{k}.attention.to_q.weight"] = (dim, dim)
            if refiner == "control":
                s[f"control_noise_refiner.{k}.after_proj.weight"] = (dim, dim)
        return s

    v1 = infer_controlnet_config(shapes(6, 16, "plain"), dit)
    lite = infer_controlnet_config(shapes(3, 33, "control"), dit, refiner_untrained=False)
    assert lite["control_layers_places"] == [0, 10, 20]  # z_image_control_2.1_lite.yaml
    v20 = infer_controlnet_config(shapes(15, 33, "control"), dit, refiner_untrained=True)
    v21 = infer_controlnet_config(shapes(15, 33, "control"), dit, refiner_untrained=False)
    assert (v1["control_layers_places"], v1["control_in_dim"], v1["add_control_noise_refiner"]) == (
        [0, 5, 10, 15, 20, 25], 16, None)
    for cfg, variant in ((v20, "control_layers"), (v21, "control_noise_refiner")):
        assert cfg["control_layers_places"] == list(range(0, 30, 2))
        assert (cfg["control_in_dim"], cfg["control_refiner_layers_places"], cfg["add_control_noise_refiner"]) == (
            33, [0, 1], variant)
        assert (cfg["dim"], cfg["n_heads"]) == (3840, 30)
    # Every published layout builds against the released DiT with its parameter count.
    for cfg in (v1, v20, v21):
        model = build_on_meta(lambda: ZImageControlNet(ControlNetConfig.from_dict(cfg), dit))
        assert len(model.control_layers) == len(cfg["control_layers_places"])


@torch.no_grad()
def test_diffusers_folder_and_config_override(tmp_path):
    _, ref_cn, *_ = make_models("2.1")
    folder = tmp_path / "controlnet"
    fresh = diffusers.ZImageControlNetModel(**CONTROL_LAYOUTS["2.1"])  # save_pretrained of the plain model
    fresh.load_state_dict(control_state_dict("2.1"))
    fresh.save_pretrained(folder)
    cn = load_controlnet(folder, transformer_config=DIT)
    assert cn.config.to_dict() == expected_config("2.1")
    assert torch.equal(cn.control_layers[1].after_proj.weight, ref_cn.control_layers[1].after_proj.weight)

    # The folder's config.json wins over the even-spacing rule ...
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, control_layers_places=[0, 3])))
    assert list(load_controlnet(folder, transformer_config=DIT).config.control_layers_places) == [0, 3]
    # ... and config= wins over both: here a 2.1 file run as 2.0.
    cn = load_controlnet(folder, {"add_control_noise_refiner": "control_layers"}, transformer_config=DIT)
    assert cn.config.version == "2.0" and cn.control_noise_refiner is None
    path = tmp_path / "override.json"
    path.write_text(json.dumps({"control_layers_places": [0, 1]}))
    single = write(tmp_path, "cn.safetensors", control_state_dict("1.0"))
    assert list(load_controlnet(single, path, transformer_config=DIT).config.control_layers_places) == [0, 1]


def test_config_must_agree_with_the_shapes(tmp_path):
    single = write(tmp_path, "cn.safetensors", control_state_dict("2.1"))
    with pytest.raises(ValueError, match="control_in_dim=16 does not match the checkpoint.*control_in_dim=33"):
        load_controlnet(single, {"control_in_dim": 16}, transformer_config=DIT)
    with pytest.raises(ValueError, match="names 3 layers but the checkpoint has 2 control layers"):
        load_controlnet(single, {"control_layers_places": [0, 1, 2]}, transformer_config=DIT)
    with pytest.raises(ValueError, match="does not fit the DiT.*transformer_config"):
        load_controlnet(single)  # the released DiT is 3840 wide; this one is 64


def test_strict_loading_names_the_keys(tmp_path):
    sd = control_state_dict("1.0")
    extra = dict(sd, **{"control_layers.0.surprise.weight": torch.zeros(2)})
    with pytest.raises(StateDictMismatchError, match="control_layers.0.surprise.weight"):
        load_controlnet(write(tmp_path, "extra.safetensors", extra), transformer_config=DIT)
    missing = {k: v for k, v in sd.items() if k != "control_layers.1.ffn_norm2.weight"}
    with pytest.raises(StateDictMismatchError, match="control_layers.1.ffn_norm2.weight"):
        load_controlnet(write(tmp_path, "missing.safetensors", missing), transformer_config=DIT)
    # A 1.0 file forced to the 2.1 layout: the refiner's projections are missing, by name.
    with pytest.raises(StateDictMismatchError, match="control_noise_refiner.0.before_proj.weight"):
        load_controlnet(write(tmp_path, "v1.safetensors", sd), {"add_control_noise_refiner": "control_noise_refiner",
                                                                "control_refiner_layers_places": [0, 1]},
                        transformer_config=DIT)


def test_files_that_are_not_controlnets(tmp_path):
    dit_like = {"layers.0.attention.to_q.weight": torch.zeros(4, 4), "x_pad_token": torch.zeros(1, 4)}
    with pytest.raises(UnsupportedFormatError, match="not a Z-Image Fun-ControlNet-Union.*2 tensors.*looks like a DiT"):
        load_controlnet(write(tmp_path, "dit.safetensors", dit_like), transformer_config=DIT)
    lora = {"control_layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 4)}
    with pytest.raises(UnsupportedFormatError, match="looks like a LoRA"):
        load_controlnet(write(tmp_path, "lora.safetensors", lora), transformer_config=DIT)
    gaps = {k.replace("control_layers.1.", "control_layers.3."): v for k, v in control_state_dict("1.0").items()}
    with pytest.raises(ValueError, match=r"control_layers 1\.\.2 missing: the checkpoint holds control_layers 0, 3 "):
        load_controlnet(write(tmp_path, "gaps.safetensors", gaps), transformer_config=DIT)
    pickled = tmp_path / "cn.ckpt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        load_controlnet(pickled, transformer_config=DIT)


@pytest.mark.parametrize("version, shown", [("1.0", "1.0"), ("2.0", "2.0"), ("2.1", "2.1"), ("2.0 zeros", "2.0")])
def test_zimage_info_describes_a_controlnet_from_its_headers(tmp_path, monkeypatch, version, shown):
    """From the headers, and for a file with control refiner blocks from the one tensor whose values
    tell 2.0 (all zeros: the refiner is dropped) from 2.1, read alone as the loader reads it: the
    version the loader decides and what it keeps."""
    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.devices import format_bytes
    from zimage_native.formats.controlnet import DECIDING

    sd = control_state_dict("2.1" if version == "2.0 zeros" else version)
    if version == "2.0":  # as published: no refiner tensors of its own
        sd = {k: v for k, v in sd.items() if not k.startswith("control_noise_refiner.")}
    if version == "2.0 zeros":  # 2.0 with the untrained refiner blocks (diffusers' rule: before_proj all zeros)
        sd[DECIDING] = torch.zeros_like(sd[DECIDING])
    path = write(tmp_path, f"cn-{version}.safetensors", sd)
    loaded = load_controlnet(path, transformer_config=DIT).state_dict()
    kept = {k: v for k, v in sd.items() if k in loaded}
    assert sorted(kept) == sorted(loaded)
    decided = refuse_weight_reads(monkeypatch)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert decided == ([DECIDING] if DECIDING in sd else [])  # that tensor alone is read
    want_in = CONTROL_LAYOUTS[shown]["control_in_dim"]
    assert f"ControlNet-Union {shown}: " in result.output and f"control input {want_in} channels" in result.output
    assert "2 control layers at DiT layers [0, 15]" in result.output  # placed for the released 30-layer DiT
    assert "zimage generate --controlnet" in result.output
    size = sum(v.numel() * v.element_size() for v in sd.values())
    assert f"{len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} params, {format_bytes(size)}" in result.output
    kept_line = (f"loads {len(kept)} tensors, {sum(v.numel() for v in kept.values()):,} params, "
                 f"{format_bytes(sum(v.numel() * v.element_size() for v in kept.values()))} as stored: its "
                 f"{len(sd) - len(kept)} control_noise_refiner tensors are untrained")
    assert (kept_line in result.output) == (version == "2.0 zeros"), result.output
    report = json.loads(CliRunner().invoke(main, ["info", "--json", str(path)]).output)["controlnet"]
    assert report["version"] == shown and report["parameters"] == sum(v.numel() for v in sd.values())
    assert report["kept"] == {"tensors": len(kept), "parameters": sum(v.numel() for v in kept.values()),
                              "bytes": sum(v.numel() * v.element_size() for v in kept.values())}


# ------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("version", sorted(CONTROL_LAYOUTS))
def test_a_controlnet_that_cannot_fit_on_the_gpu_is_refused_before_it_is_read(tmp_path, monkeypatch, version):
    """The branch read onto a GPU (the DiT resident there) is weighed against the card's free memory,
    which the components loaded before it have taken their share of, before a tensor is read: at one
    byte less than the loaded branch holds it is refused, at its bytes reading starts."""
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.formats.controlnet import DECIDING  # read alone first where the file holds it (2.1)
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, card

    path = write(tmp_path, f"cn-{version}.safetensors", control_state_dict(version))
    need = weight_bytes(load_controlnet(path, transformer_config=DIT, dtype=torch.bfloat16))
    decided = refuse_weight_reads(monkeypatch)
    card(monkeypatch, free=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the ControlNet \({format_bytes(need)} of weights\) does not "
                       rf"fit on cuda:0: the GPU has .* free of 16.00 GB, the components loaded before it included. "
                       rf"To fit, stream its blocks with the DiT's \(--offload blocks\), keep it in CPU memory except "
                       rf"while it runs \(--offload model\) or load a smaller ControlNet \(2.1 lite.*; in Python these "
                       rf"are from_pretrained's arguments: offload=\"blocks\", offload=\"model\"$") as e:
        load_controlnet(path, transformer_config=DIT, dtype=torch.bfloat16, device=CUDA)
    assert "in Python" not in e.value.cli_message  # the CLI prints its flags alone
    assert decided == ([DECIDING] if DECIDING in control_state_dict(version) else [])
    card(monkeypatch, free=need)  # exactly its bytes: reading starts
    with pytest.raises(WeightsRead):
        load_controlnet(path, transformer_config=DIT, dtype=torch.bfloat16, device=CUDA)


def test_a_2_0_file_holding_its_zero_refiner_is_weighed_without_it(tmp_path, monkeypatch):
    """Whether a file's control refiner is used (2.1) or dropped (2.0: its before_proj is zeros) is in
    that tensor's values. It was weighed from the headers as the file holds it, refiner counted (774
    MiB over at real width in bf16: a card that fits refused). That one tensor is read first, the only
    one read before the check, and the branch is weighed as it loads: refused one byte short of that,
    read at it."""
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.formats.controlnet import DECIDING
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, card

    sd = control_state_dict("2.1")
    sd[DECIDING] = torch.zeros_like(sd[DECIDING])
    path = write(tmp_path, "cn-2.0-zero-refiner.safetensors", sd)
    loaded = load_controlnet(path, transformer_config=DIT, dtype=torch.bfloat16)
    assert loaded.control_noise_refiner is None and loaded.config.version == "2.0"
    kept = weight_bytes(loaded)
    assert kept < sum(v.numel() for v in sd.values()) * 2  # the file's bytes in bf16, its refiner counted
    decided = refuse_weight_reads(monkeypatch)
    card(monkeypatch, free=kept - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the ControlNet \({format_bytes(kept)} of weights\) does not "):
        load_controlnet(path, transformer_config=DIT, dtype=torch.bfloat16, device=CUDA)
    assert decided == [DECIDING]  # the one tensor read before the refusal
    card(monkeypatch, free=kept)  # exactly what loads: reading starts
    with pytest.raises(WeightsRead):
        load_controlnet(path, transformer_config=DIT, dtype=torch.bfloat16, device=CUDA)


def test_pipe_load_controlnet_is_refused_when_the_ram_cannot_hold_it(control_model_dir, control_files,  # noqa: F811
                                                                    monkeypatch):
    """pipe.load_controlnet weighs the branch against the RAM before reading it: on the CPU against the
    available RAM and free swap; with offload="blocks" on a GPU, where its blocks are pinned for
    streaming, against the RAM alone. Each refusal names the branch's bytes and what to change, and
    leaves the pipeline without a ControlNet. The pinned refusal's advice names only routes that fit:
    --offload model (pageable) when the RAM and swap hold the branch, a smaller branch of a size that
    fits, and the RAM to free (it named --offload model where that was refused too)."""
    from zimage_native import ZImagePipeline
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, GB, card, host

    path = control_files["2.1"]
    need = weight_bytes(load_controlnet(path, transformer_config=DIT, dtype=torch.float32))
    card(monkeypatch, free=16 * GB)  # the part of a streamed branch that stays on the GPU fits there
    size = format_bytes(need)
    pipe = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32)
    blocks = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="blocks")
    model = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="model")
    monkeypatch.setitem(blocks.placement, "transformer", CUDA)  # its DiT runs on a GPU: the branch's blocks are pinned
    monkeypatch.setitem(model.placement, "transformer", CUDA)  # the branch rests in pageable CPU memory
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: ControlNet {size}, "
                       rf"and this machine has .* of RAM available of 32.00 GB and 0 bytes of free swap. To fit, load "
                       rf"a smaller ControlNet \(2.1 lite.*, load the pipeline in bfloat16 \(--dtype bfloat16\) or, "
                       rf"with a GPU, offload less \(--offload none\); in Python these are from_pretrained's "
                       rf"arguments: dtype=torch.bfloat16, offload=\"none\"$"):
        pipe.load_controlnet(path)
    assert pipe.controlnet is None
    host(monkeypatch, available=need - 1, swap=GB)  # swap may hold pageable weights: reading starts
    with pytest.raises(WeightsRead):
        pipe.load_controlnet(path)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: ControlNet {size}, of "
                       rf"which the ControlNet \({size}\) is pinned for streaming, which swap cannot hold, and this "
                       rf"machine has .* of RAM available of 32.00 GB. To fit, keep it in pageable CPU memory, which "
                       rf"swap can hold \(--offload model\), load a smaller ControlNet \(2.1 lite.*\) whose weights "
                       rf"take at most {format_bytes(need - 1)} or free 1 byte of RAM; in Python these are "
                       rf"from_pretrained's arguments: offload=\"model\"$"):
        blocks.load_controlnet(path)
    assert blocks.controlnet is None
    # without swap --offload model is refused too (above): the advice leaves it out and says why
    host(monkeypatch, available=need // 2, swap=need // 4)
    with pytest.raises(InsufficientMemoryError) as e:
        blocks.load_controlnet(path)
    assert str(e.value).endswith(
        f"To fit, load a smaller ControlNet (2.1 lite: 3 control layers, against 15 for 2.0 and 2.1) whose weights "
        f"take at most {format_bytes(need // 2)} or free {format_bytes(need - need // 2)} of RAM (--offload model does "
        f"not fit either: it keeps {size} of weights in pageable CPU memory, more than the RAM and free swap hold "
        f"together, {format_bytes(need // 2 + need // 4)})")
    with pytest.raises(InsufficientMemoryError, match=rf"and {format_bytes(need // 4)} of free swap"):
        model.load_controlnet(path)  # (the advice it gave before, followed: refused)
    host(monkeypatch, available=need // 2 + (need - need // 2), swap=need // 4)  # what it said to free, freed
    with pytest.raises(WeightsRead):  # the RAM holds it: reading starts
        blocks.load_controlnet(path)


BRANCH_BLOCKS, DIT_BLOCKS = ("control_layers.", "control_noise_refiner."), ("layers.", "noise_refiner.", "context_refiner.")


def streamed_on_gpu(state: dict[str, torch.Tensor], blocks: tuple[str, ...], kept: tuple[str, ...]) -> int:
    """Bytes of a model's ``state`` on the GPU while its ``blocks`` are streamed: all but the blocks' tensors
    outside their ``kept`` submodules, and 2 of the largest blocks' (the running one and its prefetch)."""
    resident = sum(v.numel() * v.element_size() for k, v in state.items()
                   if not k.startswith(blocks) or any(part in kept for part in k.split(".")))
    streamed = {}  # block -> bytes of what is streamed of it
    for k, v in state.items():
        if k.startswith(blocks) and not any(part in kept for part in k.split(".")):
            block = ".".join(k.split(".")[:2])
            streamed[block] = streamed.get(block, 0) + v.numel() * v.element_size()
    assert resident + sum(streamed.values()) == sum(v.numel() * v.element_size() for v in state.values())
    return resident + 2 * max(streamed.values())


def test_what_a_streamed_branch_holds_on_the_gpu_is_weighed_there(control_model_dir,  # noqa: F811
                                                                    control_files, monkeypatch):  # noqa: F811
    """With offload="blocks" the branch's blocks rest in pinned CPU memory, weighed against the RAM;
    its embedder and its blocks' modulations and projections stay on the DiT's GPU, where they were
    not weighed (a real-width 2.1 branch: 663 MiB of its 6401 in bf16), and two of its blocks are
    there at a time while it runs (the running one and its prefetch, 2 x 337.5 MiB), which were not
    counted either. These are weighed against the card's free memory before any tensor is read: at
    one byte less they are refused, at their bytes reading starts."""
    from zimage_native import ZImagePipeline
    from zimage_native.devices import InsufficientMemoryError, format_bytes

    from .test_memory_check import CUDA, GB, card, host

    path = control_files["2.1"]
    on_gpu = streamed_on_gpu(load_controlnet(path, transformer_config=DIT, dtype=torch.float32).state_dict(),
                             BRANCH_BLOCKS, ("adaLN_modulation", "before_proj", "after_proj"))
    blocks = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="blocks")
    monkeypatch.setitem(blocks.placement, "transformer", CUDA)  # its DiT runs on a GPU
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=GB)  # the RAM holds the pinned blocks
    card(monkeypatch, free=on_gpu - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the ControlNet's part on the GPU while its blocks are "
                       rf"streamed \(its embedder, modulations and projections, and 2 blocks in flight\) "
                       rf"\({format_bytes(on_gpu)} of "
                       rf"weights\) does not fit on cuda:0: .* To fit, load a smaller ControlNet \(2.1 lite.*\) or "
                       rf"load the pipeline in bfloat16 \(--dtype bfloat16\); in Python these are from_pretrained's "
                       rf"arguments: dtype=torch.bfloat16$"):
        blocks.load_controlnet(path)
    assert blocks.controlnet is None
    card(monkeypatch, free=on_gpu)  # exactly its bytes: reading starts
    with pytest.raises(WeightsRead):
        blocks.load_controlnet(path)


def test_a_controlnet_kept_as_stored_is_weighed_in_the_files_dtype(tmp_path, monkeypatch):
    """dtype=None keeps each tensor as the file stores it: a bf16 branch is weighed in bf16, not in
    the fp32 of the module built on meta (which refused one that fits, at twice its bytes)."""
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import host

    path = write(tmp_path, "cn-bf16.safetensors", {k: v.to(torch.bfloat16) for k, v in control_state_dict("2.1").items()})
    need = weight_bytes(load_controlnet(path, transformer_config=DIT))
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: ControlNet "
                                                      rf"{format_bytes(need)}, "):
        load_controlnet(path, transformer_config=DIT)
    host(monkeypatch, available=need)  # exactly its bytes: reading starts
    with pytest.raises(WeightsRead):
        load_controlnet(path, transformer_config=DIT)


def test_a_bfloat16_branch_short_of_ram_is_not_told_to_load_in_bfloat16(tmp_path, monkeypatch):
    """The advice for a branch that does not fit in CPU memory names --dtype bfloat16 only where the
    pipeline is wider: a bf16 pipeline is told what would change something."""
    from zimage_native.devices import InsufficientMemoryError

    from .test_memory_check import host

    path = write(tmp_path, "cn.safetensors", control_state_dict("2.1"))
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=1)
    with pytest.raises(InsufficientMemoryError, match=r"To fit, load a smaller ControlNet \(2.1 lite.*\) or, with a "
                       r"GPU, offload less \(--offload none\); in Python these are from_pretrained's arguments: "
                       r"offload=\"none\"$") as e:
        load_controlnet(path, transformer_config=DIT, dtype=torch.bfloat16)
    assert "bfloat16" not in str(e.value)


def test_replacing_a_controlnet_counts_the_loaded_one(control_model_dir, control_files, monkeypatch):  # noqa: F811
    """pipe.load_controlnet(B) with A loaded holds A until B has loaded, so A's bytes are not free
    while B is weighed: a refusal says so, and that pipe.unload_controlnet() frees them first (in the
    library's words only: the CLI holds one). A stays loaded; with none loaded the sentence is absent."""
    from zimage_native import ZImagePipeline
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import host

    pipe = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32)
    loaded = pipe.load_controlnet(control_files["2.1"])
    need = weight_bytes(load_controlnet(control_files["1.0"], transformer_config=DIT, dtype=torch.float32))
    held = (f"the ControlNet loaded now (cn-2.1.safetensors, {format_bytes(weight_bytes(loaded))}) stays in memory "
            f"until this one has loaded, so its bytes are not free: pipe.unload_controlnet() frees them first")
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: ControlNet "
                       rf"{format_bytes(need)}, .*; in Python these are from_pretrained's arguments: "
                       rf"dtype=torch.bfloat16, offload=\"none\"; {re.escape(held)}$") as e:
        pipe.load_controlnet(control_files["1.0"])
    assert "unload_controlnet" not in e.value.cli_message
    assert pipe.controlnet is loaded
    pipe.unload_controlnet()
    with pytest.raises(InsufficientMemoryError) as e:
        pipe.load_controlnet(control_files["1.0"])
    assert "unload_controlnet" not in str(e.value)
    assert str(e.value).endswith('offload="none"')


def test_replacing_a_streamed_controlnet_counts_what_the_loaded_one_holds_where_it_was_refused(
        control_model_dir, control_files, monkeypatch):  # noqa: F811
    """With offload="blocks" the loaded branch A holds its blocks in (pinned) CPU memory and its
    other tensors (embedder, modulations, projections) on the DiT's GPU. A refusal of B names what A
    holds in the memory that was short: its blocks for the RAM check, its other tensors for the GPU's
    (the whole branch, named for both, was more than either held)."""
    from zimage_native import ZImagePipeline
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, GB, card, host

    blocks = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="blocks")
    loaded = blocks.load_controlnet(control_files["2.1"])  # its blocks streamed (on the CPU, a dry run)
    kept = ("adaLN_modulation", "before_proj", "after_proj")
    state = loaded.state_dict()
    streamed = sum(v.numel() * v.element_size() for k, v in state.items()
                   if k.startswith(("control_layers.", "control_noise_refiner."))
                   and not any(part in kept for part in k.split(".")))
    resident = weight_bytes(loaded) - streamed
    assert 0 < resident < streamed < weight_bytes(loaded)
    monkeypatch.setitem(blocks.placement, "transformer", CUDA)  # its DiT runs on a GPU: B's blocks are pinned

    def refusal() -> InsufficientMemoryError:
        with pytest.raises(InsufficientMemoryError) as e:
            blocks.load_controlnet(control_files["1.0"])
        assert blocks.controlnet is loaded and "unload_controlnet" not in e.value.cli_message
        return e.value

    need = weight_bytes(load_controlnet(control_files["1.0"], transformer_config=DIT, dtype=torch.float32))
    refuse_weight_reads(monkeypatch)
    card(monkeypatch, free=16 * GB)
    host(monkeypatch, available=need - 1)  # the RAM is short of B's pinned blocks
    e = refusal()
    assert str(e).startswith("the weights do not fit in CPU memory") and e.device == torch.device("cpu")
    assert str(e).endswith(f"; the ControlNet loaded now (cn-2.1.safetensors, {format_bytes(streamed)} in CPU memory: "
                           f"its blocks, pinned for streaming) stays in memory until this one has loaded, so its bytes "
                           f"are not free: pipe.unload_controlnet() frees them first")
    host(monkeypatch, available=GB)
    card(monkeypatch, free=1)  # the GPU is short of what stays there
    e = refusal()
    assert str(e).startswith("the ControlNet's part on the GPU while its blocks are streamed") and e.device == CUDA
    assert str(e).endswith(f"; the ControlNet loaded now (cn-2.1.safetensors, {format_bytes(resident)} on cuda:0: its "
                           f"embedder, modulations and projections, its blocks resting in CPU memory) stays in memory "
                           f"until this one has loaded, so its bytes are not free: pipe.unload_controlnet() frees them "
                           f"first")


def test_the_pinned_controlnet_refusal_names_offload_model_only_where_the_dit_and_branch_fit_on_the_gpu(
        control_model_dir, control_files, monkeypatch):  # noqa: F811
    """A ControlNet too large for the RAM to pin under offload="blocks" named --offload model wherever
    the RAM and swap hold it, without asking the GPU; under model offload the branch visits the GPU
    with the DiT, whole. It is named only where both fit in the card's free memory (as the pipeline's
    own pinned refusal does: devices.model_offload_gpu_short), and the refusal says why not."""
    from zimage_native import ZImagePipeline
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, GB, card, host

    path = control_files["2.1"]
    need = weight_bytes(load_controlnet(path, transformer_config=DIT, dtype=torch.float32))
    blocks = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="blocks")
    monkeypatch.setitem(blocks.placement, "transformer", CUDA)
    visit = weight_bytes(blocks.transformer) + need  # what visits the GPU under model offload: the DiT and branch
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=need - 1, swap=GB)  # RAM and swap hold the branch, the RAM cannot pin it
    asked = card(monkeypatch, free=visit - 1)  # (its resident part and 2 blocks in flight fit)
    with pytest.raises(InsufficientMemoryError) as e:
        blocks.load_controlnet(path)
    assert CUDA in asked
    assert "(--offload model)" not in str(e.value) and 'offload="model"' not in str(e.value)
    assert str(e.value).endswith(f"(--offload model does not fit either: the transformer visits cuda:0 whole, "
                                 f"{format_bytes(visit)}, and the GPU has {format_bytes(visit - 1)} free)")
    card(monkeypatch, free=visit)  # they fit: named
    with pytest.raises(InsufficientMemoryError) as e:
        blocks.load_controlnet(path)
    assert "(--offload model)" in str(e.value) and 'offload="model"' in str(e.value)
    assert blocks.controlnet is None


def test_a_controlnet_under_model_offload_is_weighed_with_the_dit_it_visits_the_gpu_with(
        control_model_dir, control_files, monkeypatch):  # noqa: F811
    """With offload="model" the branch rests in CPU memory and visits the GPU with the DiT while a step
    runs: only the RAM was asked, so a DiT and a branch that each fit but not together loaded and ran out
    of GPU memory at the first step. The two are weighed together before the branch is read: refused one
    byte short of their sum, naming both and --offload blocks where its peak (the DiT's and the branch's
    resident parts and blocks in flight) fits, the reason where it does not; read at their sum. A branch
    loaded before, resting in CPU memory, holds none of the GPU: the refusal does not say it does."""
    from zimage_native import ZImagePipeline
    from zimage_native.devices import InsufficientMemoryError, format_bytes
    from zimage_native.formats.controlnet import SMALLER
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, GB, card, host

    path = control_files["2.1"]
    model = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.float32, offload="model")
    monkeypatch.setitem(model.placement, "transformer", CUDA)  # its DiT runs on a GPU, resting in CPU memory
    card(monkeypatch, free=16 * GB)
    model.load_controlnet(control_files["1.0"])  # loaded before, resting in CPU memory
    loaded = model.controlnet
    branch = load_controlnet(path, transformer_config=DIT, dtype=torch.float32).state_dict()
    dit, need = weight_bytes(model.transformer), sum(v.numel() * v.element_size() for v in branch.values())
    together = dit + need
    streamed = (streamed_on_gpu(model.transformer.state_dict(), DIT_BLOCKS, ("adaLN_modulation",))
                + streamed_on_gpu(branch, BRANCH_BLOCKS, ("adaLN_modulation", "before_proj", "after_proj")))
    assert max(dit, need, streamed) < together - 1  # each alone fits, and so does --offload blocks
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=GB)  # the RAM holds it
    visit = (f"the DiT ({format_bytes(dit)}) and the ControlNet ({format_bytes(need)}) visit cuda:0 together while a "
             f"step runs (--offload model), {format_bytes(together)} of weights, and the GPU has ")
    card(monkeypatch, free=together - 1)
    with pytest.raises(InsufficientMemoryError) as e:
        model.load_controlnet(path)
    assert str(e.value) == (f"{visit}{format_bytes(together - 1)} free of 16.00 GB. To fit, stream their blocks "
                            f"(--offload blocks: {format_bytes(streamed)} at the peak) or {SMALLER}; in Python these "
                            f"are from_pretrained's arguments: offload=\"blocks\"")
    assert e.value.device == CUDA and "in Python" not in e.value.cli_message
    assert model.controlnet is loaded  # kept; and it holds none of the GPU: no word of unload_controlnet
    card(monkeypatch, free=streamed - 1)
    with pytest.raises(InsufficientMemoryError) as e:
        model.load_controlnet(path)
    assert str(e.value).endswith(f"To fit, {SMALLER} or use a smaller DiT (a GGUF file, --transformer FILE.gguf) "
                                 f"(--offload blocks does not fit either: {format_bytes(streamed)} at the peak); in "
                                 f"Python these are from_pretrained's arguments: transformer=\"FILE.gguf\"")
    card(monkeypatch, free=together)  # both fit: reading starts
    with pytest.raises(WeightsRead):
        model.load_controlnet(path)


def test_a_dit_with_fused_gemms_is_weighed_under_model_offload_as_the_memory_it_visits_with(
        control_model_dir, control_files, monkeypatch):  # noqa: F811
    """Under offload="model" the DiT visits the GPU storage by storage (``offload.visit``): the views of
    a fused q|k|v or w1|w3 GEMM (fp8 or Triton kernels fuse them) are copied with the buffer they share.
    Weighed tensor by tensor, a fused DiT counted each fused weight twice (the tiny DiT with fp8: 2,008,032
    B for the 1,555,424 B that visit; at real width about 4.2 GB of fp8 q|k|v and w1|w3 more), and a
    branch that fits beside it was refused. Weighed as it visits: refused one byte short, read at it."""
    from zimage_native import ZImagePipeline
    from zimage_native.accel import optimize
    from zimage_native.devices import InsufficientMemoryError, bytes_in
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, GB, card, host

    model = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.bfloat16, offload="model")
    model.optimize(fp8=True)  # fuses q|k|v and w1|w3 (the CPU's fp8 GEMM: torch 2.13)
    dit = weight_bytes(model.transformer)
    assert bytes_in((*model.transformer.parameters(), *model.transformer.buffers()), None) > dit  # views shared
    branch = load_controlnet(control_files["2.1"], transformer_config=model.transformer_config, dtype=torch.bfloat16)
    optimize(branch, fp8=True, device=torch.device("cpu"))  # converted with the DiT's fp8, as ControlNetSlot.load does
    monkeypatch.setitem(model.placement, "transformer", CUDA)
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=GB)
    card(monkeypatch, free=dit + weight_bytes(branch) - 1)
    with pytest.raises(InsufficientMemoryError, match=r"^the DiT \(.*\) and the ControlNet \(.*\) visit cuda:0 together"):
        model.load_controlnet(control_files["2.1"])
    card(monkeypatch, free=dit + weight_bytes(branch))  # both fit: reading starts
    with pytest.raises(WeightsRead):
        model.load_controlnet(control_files["2.1"])


def test_a_branch_under_model_offload_with_fp8_is_weighed_as_fp8_converts_it(
        control_model_dir, control_files, monkeypatch):  # noqa: F811
    """With the DiT's fp8 on (``optimize(fp8=True)``), a ControlNet loaded under offload="model" is converted
    as it loads (its blocks are DiT blocks) and visits the GPU in fp8. It was weighed in the pipeline's dtype
    before: the tiny 2.1 branch 594,816 B for the 533,376 B that visit (at real width about 6.7 GB for 3.7),
    and a branch that fits beside the DiT was refused. Weighed as fp8 converts it (``accel.fp8.fp8_bytes``):
    refused one byte short of the DiT and the converted branch, read at them."""
    from zimage_native import ZImagePipeline
    from zimage_native.accel import optimize
    from zimage_native.devices import InsufficientMemoryError
    from zimage_native.quantize import weight_bytes

    from .test_memory_check import CUDA, GB, card, host

    model = ZImagePipeline.from_pretrained(control_model_dir, device="cpu", dtype=torch.bfloat16, offload="model")
    model.optimize(fp8=True)  # (the CPU's fp8 GEMM: torch 2.13)
    dit = weight_bytes(model.transformer)
    branch = load_controlnet(control_files["2.1"], transformer_config=model.transformer_config, dtype=torch.bfloat16)
    loaded = weight_bytes(branch)
    optimize(branch, fp8=True, device=torch.device("cpu"))  # as ControlNetSlot.load converts it with the DiT's fp8
    converted = weight_bytes(branch)
    assert converted < loaded
    monkeypatch.setitem(model.placement, "transformer", CUDA)
    refuse_weight_reads(monkeypatch)
    host(monkeypatch, available=GB)
    card(monkeypatch, free=dit + converted - 1)
    with pytest.raises(InsufficientMemoryError, match=r"^the DiT \(.*\) and the ControlNet \(.*\) visit cuda:0 together"):
        model.load_controlnet(control_files["2.1"])
    card(monkeypatch, free=dit + converted)  # both fit: reading starts
    with pytest.raises(WeightsRead):
        model.load_controlnet(control_files["2.1"])
