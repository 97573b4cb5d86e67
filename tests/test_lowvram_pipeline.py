"""Low-VRAM settings through the whole pipeline: ``text_encoder_quant`` and ``offload="blocks"``
from ``from_pretrained``, the CLI flags and TOML profiles (the units are in test_offload.py and
test_text_encoder_quant.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zimage_native import ZImagePipeline
from zimage_native.offload import RESIDENT, _streamed_tensors, dit_blocks
from zimage_native.quantize import Int8Embedding, Int8Linear, quantize_text_encoder

CALL = dict(width=32, height=48, num_inference_steps=3, seed=4, output_type="np")


def load(folder, **kwargs):
    pipe = ZImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, **kwargs)
    pipe.progress = False
    return pipe


class FakeMove:
    """A fake device move for the streamer: a copy (new storage) that logs the block it belongs to."""

    def __init__(self, streamer):
        self.streamer, self.log, self.most, self.bytes = streamer, [], 0, 0
        self.owner = {t.data_ptr(): i for i, b in enumerate(streamer.blocks) for t in _streamed_tensors(b, RESIDENT)}
        self.first = {_streamed_tensors(b, RESIDENT)[0].data_ptr() for b in streamer.blocks}  # one log per block copy
        streamer.transfer = self

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        block = self.owner[t.data_ptr()]
        if t.data_ptr() in self.first:
            self.log.append(block)
        self.most = max(self.most, len(self.streamer.loaded) + 1)
        self.bytes += t.nbytes
        return t.clone()


def test_offload_blocks_runs_the_pipeline_with_streamed_blocks_and_identical_results(tiny_model_dir, tiny_pipe):
    pipe = load(tiny_model_dir, offload="blocks")
    streamer = pipe.transformer.block_streamer
    assert pipe.offload == "blocks" and streamer.blocks == dit_blocks(pipe.transformer)
    move = FakeMove(streamer)
    ran = []
    for i, block in enumerate(streamer.blocks):  # registered after the streamer's hooks: sees the moved weights
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(
            (i, not {t.data_ptr() for t in _streamed_tensors(m, RESIDENT)} & set(move.owner))))
    for guidance in (0.0, 2.0):  # without and with CFG
        want = tiny_pipe("a cat on a mat", guidance_scale=guidance, **CALL).images
        got = pipe("a cat on a mat", guidance_scale=guidance, **CALL).images
        assert np.array_equal(got, want)
    n = len(streamer.blocks)
    refiner = len(pipe.transformer.context_refiner)
    # Every block ran on its moved copy, never on its CPU home; each run of a block had one copy.
    assert ran and all(on_copy for _, on_copy in ran)
    steps = CALL["num_inference_steps"] * (n - refiner)
    # with CFG the caption is refined twice (positives, negatives) and every step runs two forwards
    assert len(ran) == (refiner + steps) + (2 * refiner + 2 * steps)
    assert sorted(set(move.log)) == list(range(n)) and len(move.log) >= len(ran)
    assert move.most <= streamer.depth + 1  # at most the running block and its prefetch are moved
    # The block's tensors point at their CPU homes between runs (the prefetched one aside).
    assert len(streamer.loaded) <= streamer.depth


def test_offload_blocks_with_a_fused_lora_and_img2img(tiny_model_dir, tmp_path):
    """A LoRA fused after the blocks went to the CPU lands in the streamed copies: same images as a
    resident pipeline with the same LoRA, for txt2img and img2img."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    dim = load(tiny_model_dir).transformer.config.dim
    lora = {f"transformer.layers.{i}.feed_forward.w1.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.3
            for i in (0, 1) for ab, shape in (("A", (4, dim)), ("B", (int(dim / 3 * 8), 4)))}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    image = Image.fromarray((np.random.default_rng(1).random((48, 32, 3)) * 255).astype("uint8"))
    out = []
    for offload in ("none", "blocks"):
        pipe = load(tiny_model_dir, offload=offload)
        if offload == "blocks":
            FakeMove(pipe.transformer.block_streamer)
        pipe.load_lora(tmp_path / "lora.safetensors", scale=0.8)
        out.append((pipe("a cat", **CALL).images, pipe.img2img("a cat", image, strength=0.7, **CALL).images))
    (a, b), (c, d) = out
    assert np.array_equal(a, c) and np.array_equal(b, d)
    assert not np.array_equal(a, load(tiny_model_dir)("a cat", **CALL).images)  # the LoRA changed the image


def test_offload_blocks_refuses_transforms_that_change_blocks(tiny_model_dir):
    pipe = load(tiny_model_dir, offload="blocks")
    for kwargs in (dict(compile="blocks"), dict(fp8=True)):
        with pytest.raises(ValueError, match="offload='blocks'"):
            pipe.optimize(**kwargs)
    pipe.optimize(attention="sdpa")  # the attention backend is a leaf swap that streaming does not touch


@pytest.mark.parametrize("dit", ["folder", "gguf"])
def test_offload_blocks_takes_the_triton_kernels_with_the_gemms_left_apart(tiny_model_dir, tmp_path, dit):
    """The kernels under streamed blocks (Triton's interpreter on the CPU), on the folder's DiT and on
    the 8gb profile's GGUF DiT with its one-pass dequantisation: the images of the resident pipeline
    with the kernels, q|k|v and w1|w3 left apart (a fused buffer and its views would be copied
    twice), and the streamer copies the same bytes as without the kernels."""
    pytest.importorskip("triton")
    from zimage_native.accel import count_fused, load_kernels
    from zimage_native.accel.fused_ops import count_dequant
    from zimage_native.model.transformer import Attention

    kernels = load_kernels(interpret=not torch.cuda.is_available())
    files = {}
    if dit == "gguf":
        pytest.importorskip("gguf")
        from .gguf_files import gguf_state, write_gguf
        from .test_formats import comfy_dit

        file, _ = gguf_state(comfy_dit(tiny_model_dir), "Q8_0", np.random.default_rng(0))
        files["transformer"] = write_gguf(tmp_path / "z_image_turbo-Q8_0.gguf", file, "lumina2")
    images, copied = [], []
    for offload, kernel_choice in (("none", "triton"), ("blocks", "triton"), ("blocks", "none")):
        pipe = load(tiny_model_dir, offload=offload, **files)
        pipe.optimize(kernels=kernel_choice)
        if offload == "blocks":
            move = FakeMove(pipe.transformer.block_streamer)
        kernels.reset_launch_counts()
        images.append(pipe("a cat", **CALL).images)
        if kernel_choice == "triton":
            assert all(swapped == total > 0 for swapped, total in count_fused(pipe.transformer).values())
            assert sum(kernels.launch_counts().values()) > 0
        if dit == "gguf" and kernel_choice == "triton":
            assert all(done == total > 0 for done, total in count_dequant(pipe.transformer).values())
            assert kernels.launch_counts().get("dequantize_ggml", 0) > 0
        if offload == "blocks":
            assert all(m.to_qkv is None for m in pipe.transformer.modules() if isinstance(m, Attention))
            copied.append(move.bytes)
    if dit == "gguf":  # packed layers are never fused: the same GEMMs, the same bits
        assert np.array_equal(images[0], images[1])
    else:  # resident, q|k|v is one GEMM
        assert np.abs(images[0] - images[1]).max() <= 1e-5
    assert copied[0] == copied[1] > 0  # the same bytes streamed with and without the kernels


def test_a_lora_on_a_streamed_gguf_dit_streams_with_its_blocks(tiny_model_dir, tmp_path):
    """A LoRA on the 8gb profile's packed blocks is a side path whose A and B are buffers of the
    layer: the streamer copies them with the block (no per-forward copy from the CPU), and the images
    equal those of the same files and LoRA fully resident."""
    pytest.importorskip("gguf")
    from .gguf_files import gguf_state, write_gguf
    from .test_formats import comfy_dit

    file, _ = gguf_state(comfy_dit(tiny_model_dir), "Q8_0", np.random.default_rng(0))
    path = write_gguf(tmp_path / "z_image_turbo-Q8_0.gguf", file, "lumina2")
    g = torch.Generator().manual_seed(0)
    dim = load(tiny_model_dir).transformer.config.dim
    lora = {f"transformer.layers.{i}.attention.to_k.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.3
            for i in (0, 1) for ab, shape in (("A", (4, dim)), ("B", (dim, 4)))}
    images = []
    for offload in ("none", "blocks"):
        pipe = load(tiny_model_dir, transformer=path, offload=offload)
        pipe.load_lora(lora, scale=0.8)
        layer = pipe.transformer.layers[0].attention.to_k
        assert len(layer.lora) == 1 and layer.weight.dtype == torch.uint8  # a side path on the packed layer
        if offload == "blocks":
            move = FakeMove(pipe.transformer.block_streamer)  # after the LoRA: it knows the side paths' tensors
            a, b, _ = layer.side_paths()[0]
            assert a.device.type == "cpu" and (a.data_ptr() in move.owner and b.data_ptr() in move.owner)
        images.append(pipe("a cat", **CALL).images)
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], load(tiny_model_dir, transformer=path)("a cat", **CALL).images)


def test_text_encoder_quant_from_pretrained(tiny_model_dir, tiny_pipe):
    pipe = load(tiny_model_dir, text_encoder_quant="int8")
    model = pipe.text_encoder.model
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear) and isinstance(model.embed_tokens, Int8Embedding)
    want = quantize_text_encoder(copy.deepcopy(tiny_pipe.text_encoder.model), "int8")
    ids = tiny_pipe.text_encoder.encode(["a cat on a mat"])
    got = pipe.text_encoder.encode(["a cat on a mat"])
    ref = tiny_pipe.text_encoder.encode(["a cat on a mat"])
    ids = torch.tensor([tiny_pipe.text_encoder.tokenize(["a cat on a mat"])[0]])
    with torch.no_grad():
        exact = want(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).last_hidden_state[0]
    assert torch.equal(got[0], exact)  # quantised while loading = quantising the loaded model
    cos = torch.nn.functional.cosine_similarity(got[0], ref[0], dim=-1)
    assert cos.min() > 0.99
    # The rewriter reads the full-precision Qwen3 (it shares no quantised weight): same text.
    assert pipe.rewrite("a cat", max_new_tokens=4, seed=0) == load(tiny_model_dir).rewrite(
        "a cat", max_new_tokens=4, seed=0)
    # Both settings together, and the whole pipeline runs with them.
    both = load(tiny_model_dir, text_encoder_quant="int8", offload="blocks")
    assert np.array_equal(both("a cat", **CALL).images, pipe("a cat", **CALL).images)


def test_text_encoder_quant_is_checked(tiny_model_dir):
    with pytest.raises(ValueError, match=r"text_encoder_quant must be one of .*got 'int2'"):
        load(tiny_model_dir, text_encoder_quant="int2")
    with pytest.raises(ValueError, match="remote server's setting applies"):
        load(tiny_model_dir, text_encoder_quant="int8", text_encoder_url="http://127.0.0.1:9")
    from zimage_native.loading import load_component

    with pytest.raises(ValueError, match="text encoder only"):
        load_component("vae", tiny_model_dir / "vae", quant="int8")


def run(*args):
    from zimage_native.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_cli_flags_and_profile_keys(tiny_model_dir, tmp_path):
    base = ["--model", tiny_model_dir, "--device", "cpu", "--dtype", "float32", "--width", 32, "--height", 48,
            "--steps", 2, "--seed", 4, "--no-progress"]
    run("generate", "a cat", "-o", tmp_path / "flags.png", "--offload", "blocks", "--text-encoder-quant", "int8", *base)
    config = tmp_path / "c.toml"
    # The predecessor's spelling: [x.encoder] quantization = "8bit".
    config.write_text('[small]\noffload = "blocks"\n[small.encoder]\nquantization = "8bit"\n')
    run("generate", "a cat", "-o", tmp_path / "profile.png", "--config", config, "--profile", "small", *base)
    pipe = load(tiny_model_dir, offload="blocks", text_encoder_quant="int8")
    want = pipe("a cat", width=32, height=48, num_inference_steps=2, seed=4).images[0]
    for name in ("flags.png", "profile.png"):
        with Image.open(tmp_path / name) as im:
            assert np.array_equal(np.asarray(im), np.asarray(want)), name


def test_serve_loads_with_the_settings(tiny_model_dir):
    import importlib

    serve_cli = importlib.import_module("zimage_native.cli.serve")  # the package exports the command as `serve`
    o = serve_cli.default_options()
    assert o["text_encoder_quant"] == "none" and o["offload"] == "none"
    o.update(model=str(tiny_model_dir), device="cpu", dtype="float32", text_encoder_quant="int8", offload="blocks")
    pipe = serve_cli.build_engine(o).pipe
    assert pipe.offload == "blocks" and pipe.transformer.block_streamer is not None
    assert isinstance(pipe.text_encoder.model.layers[0].mlp.up_proj, Int8Linear)
    o.update(encoder_only=True, offload="none")
    engine = serve_cli.build_engine(o)
    assert isinstance(engine.text_encoder.model.layers[0].mlp.up_proj, Int8Linear)


def test_a_hub_model_with_a_transformer_file_does_not_fetch_the_hub_transformer(tiny_model_dir, monkeypatch):
    """A low-VRAM profile names a DiT file over the Hub model: only the Hub DiT's config is fetched,
    not its 24.6 GB of weights (nor the text encoder's, with a remote encoder)."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append(kw["allow_patterns"]) or str(tiny_model_dir))
    dit = tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", device="cpu", dtype=torch.float32,
                                          transformer=dit)
    assert "transformer/*.safetensors" not in calls[0] and "transformer/*.json" in calls[0]
    assert "text_encoder/*.safetensors" in calls[0] and "vae/*.safetensors" in calls[0]
    assert pipe.transformer.config.dim == load(tiny_model_dir).transformer.config.dim


def test_the_8gb_combination_gguf_dit_streamed_with_an_int8_encoder(tiny_model_dir, tmp_path):
    """The `8gb` profile's settings together on the tiny model: a GGUF DiT (kept packed) whose
    blocks stream, and an int8 text encoder; same images as the same files fully resident."""
    pytest.importorskip("gguf")
    from .gguf_files import gguf_state, write_gguf
    from .test_formats import comfy_dit

    file, _ = gguf_state(comfy_dit(tiny_model_dir), "Q8_0", np.random.default_rng(0))
    path = write_gguf(tmp_path / "z_image_turbo-Q8_0.gguf", file, "lumina2")
    images = []
    for offload in ("none", "blocks"):
        pipe = load(tiny_model_dir, transformer=path, offload=offload, text_encoder_quant="int8")
        assert pipe.transformer.layers[0].attention.to_q.weight.dtype == torch.uint8  # packed
        if offload == "blocks":
            move = FakeMove(pipe.transformer.block_streamer)
        images.append(pipe("a cat", **CALL).images)
    assert np.array_equal(images[0], images[1]) and move.log


def test_a_profile_naming_a_gguf_text_encoder_that_is_not_there_says_where_to_get_one(tmp_path, monkeypatch):
    """The 8gb profile's comment suggests a llama.cpp Qwen3-4B GGUF as the text encoder; a profile
    naming one that is not there said only that the path does not exist (the DiT's said where to get one)."""
    from zimage_native.cli import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "my.toml"
    config.write_text('[lv]\ntext_encoder = "models/Qwen3-4B-Q4_K_M.gguf"\n')
    result = CliRunner().invoke(main, ["generate", "a cat", "--config", str(config), "--profile", "lv",
                                       "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {config}: [lv].text_encoder: Path 'models/Qwen3-4B-Q4_K_M.gguf' does not exist (relative paths are "
        f"read from the current folder, {tmp_path}; --text-encoder on the command line replaces it); download a GGUF "
        f"of Qwen3-4B there (a llama.cpp file, architecture qwen3), for example from Qwen/Qwen3-4B-GGUF on the "
        f"Hugging Face Hub"], result.output


def test_offload_on_a_cpu_only_run_says_it_changes_nothing(tiny_model_dir, caplog):
    """The 8gb profile on a machine without a GPU: its offload ran silently, as if it saved memory.
    It says now that everything runs on the CPU, where it changes nothing; no note without offload."""
    import logging

    said = 'keeps weights in CPU memory until they run on the GPU; here every component runs on the CPU'
    for offload, noted in (("blocks", True), ("model", True), ("text_encoder", True), ("none", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="zimage_native.loading"):
            load(tiny_model_dir, offload=offload)
        assert any(said in r.getMessage() and f'offload "{offload}"' in r.getMessage()
                   for r in caplog.records) == noted, (offload, caplog.text)


def test_adapter_refits_on_a_streamed_gguf_dit_write_the_side_paths_in_place(tiny_model_dir, tmp_path):
    """Adapter changes of one side-path structure on the 8gb profile's streamed GGUF blocks: the new
    factors are written into the side paths' CPU tensors in place (the same tensors after the
    refit), which the streamer then copies with each block, so every image equals the same files
    and adapters fully resident. Between requests the first block can still point at its device
    copy (the streamer's prefetch); a write there would be lost at the next request."""
    pytest.importorskip("gguf")
    from .gguf_files import gguf_state, write_gguf
    from .test_formats import comfy_dit

    file, _ = gguf_state(comfy_dit(tiny_model_dir), "Q8_0", np.random.default_rng(0))
    path = write_gguf(tmp_path / "z_image_turbo-Q8_0.gguf", file, "lumina2")
    g = torch.Generator().manual_seed(0)
    dim = load(tiny_model_dir).transformer.config.dim
    adapters = [{f"transformer.{where}.attention.to_k.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.3
                 for where in ("context_refiner.0", "layers.0", "layers.1")
                 for ab, shape in (("A", (rank, dim)), ("B", (dim, rank)))} for rank in (4, 8)]
    changes = [lambda p: p.load_lora_weights(adapters[0], adapter_name="a"),
               lambda p: p.load_lora_weights(adapters[1], adapter_name="b"),
               lambda p: p.set_adapters(["a", "b"], [0.4, -0.9]), lambda p: p.set_adapters("a", 0.7)]
    images, held = [], []
    for offload in ("none", "blocks"):
        pipe = load(tiny_model_dir, transformer=path, offload=offload)
        runs = []
        for change in changes:
            change(pipe)
            if offload == "blocks":
                FakeMove(pipe.transformer.block_streamer)  # (it knows the tensors there are now)
            runs.append(pipe("a cat", **CALL).images)
            layer = pipe.transformer.layers[0].attention.to_k
            held.append((offload, layer.side_paths()[0].a, layer.side_paths()[0].b))
        images.append(runs)
    for k, (resident, streamed) in enumerate(zip(*images)):
        assert np.array_equal(resident, streamed), f"after change {k}"
    assert len({r.tobytes() for r in images[0]}) == len(changes)  # each change changed the image
    streamed = [(a, b) for offload, a, b in held if offload == "blocks"]
    assert all(a is streamed[0][0] and b is streamed[0][1] for a, b in streamed)  # written in place
