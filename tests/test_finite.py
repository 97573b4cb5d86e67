"""No silent black images (zimage_native.finite): NaN or inf made by the text encoder, the DiT or
the VAE stops the run with an error naming the stage and the likely cause.

The float16 case is the one users meet: the tiny model with its feed-forward weights scaled up, so
that its activations exceed float16's range as the real DiT's do, gives a finite image in float32
and an all-black one in float16 without the check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage_native import ZImagePipeline
from zimage_native.finite import NonFiniteError, check_finite, finite_rows

RUN = dict(width=64, height=64, num_inference_steps=2, seed=[5, 6], num_images_per_prompt=2)


def _overflowing(tiny_model_dir, dtype):
    """The tiny model whose DiT feed-forward activations reach ~1e5 (beyond float16's 65504)."""
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=dtype)
    pipe.progress = False
    with torch.no_grad():
        for block in pipe.transformer.layers:
            for name, p in block.feed_forward.named_parameters():
                if name.startswith(("w1", "w3", "w13")):
                    p.mul_(400)
    return pipe


@pytest.fixture(scope="module")
def fp16_pipe(tiny_model_dir):
    return _overflowing(tiny_model_dir, torch.float16)


def test_the_overflow_is_real_float32_is_finite(tiny_model_dir):
    """The control: the same scaled weights in float32 make a finite, non-black image."""
    pipe = _overflowing(tiny_model_dir, torch.float32)
    images = pipe("a cat", output_type="np", **RUN).images
    assert np.isfinite(images).all() and images.max() > 0.1


def test_float16_overflow_is_an_error_not_a_black_image(fp16_pipe):
    for output_type in ("pil", "np", "pt", "latent"):
        with pytest.raises(NonFiniteError) as e:
            fp16_pipe("a cat", output_type=output_type, **RUN)
        message = str(e.value)
        assert message.startswith("the DiT made NaN or infinite latents for image 1, 2 of 2 (seed 5, 6)")
        assert "float16" in message and "bfloat16" in message and "\n" not in message


def test_the_unchecked_float16_output_is_black(fp16_pipe, monkeypatch):
    """What the check prevents: without it the same run returns an all-black image."""
    import zimage_native.sampling as sampling

    monkeypatch.setattr(sampling, "check_finite", lambda *a, **k: None)
    with np.errstate(invalid="ignore"):
        image = fp16_pipe("a cat", **RUN).images[0]
    assert image.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_only_the_bad_image_is_named(tiny_pipe):
    """Given latents, NaN in the second item only: the DiT keeps items apart."""
    latents = torch.randn(2, 16, 8, 8)
    latents[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"latents for image 2 of 2, so") as e:
        tiny_pipe(["a cat", "a dog"], width=64, height=64, num_inference_steps=2, latents=latents)
    assert "float16" not in str(e.value) and "damaged weights" in str(e.value)


class Forward(Exception):
    """A model ran."""


@pytest.mark.parametrize("form", ["latents", "tensor", "array"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_img2img_input_holding_nan_is_refused_naming_it_before_any_forward(tiny_pipe, monkeypatch, form, bad):
    """img2img's image= (image latents, an image tensor or array) holding NaN or inf in its second
    item: the run made NaN latents and blamed the DiT ("the DiT made NaN ... damaged weights"). It is
    refused where the input is read, naming it and the item, before the VAE or the DiT runs; the
    same input made finite reaches a forward."""
    def forward(*args, **kwargs):
        raise Forward

    monkeypatch.setattr(tiny_pipe.transformer, "forward_tokens", forward)
    monkeypatch.setattr(tiny_pipe.vae.encoder, "forward", forward)
    shape = {"latents": (2, 16, 8, 8), "tensor": (2, 3, 64, 64), "array": (2, 64, 64, 3)}[form]
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    what = "the image latents given as image=" if form == "latents" else "image"

    def run(value):
        x = image.clone()
        x[1, 0, 3, 2] = value
        tiny_pipe(["a cat", "a dog"], image=x.numpy() if form == "array" else x, num_inference_steps=2,
                  strength=1.0)

    with pytest.raises(ValueError, match=rf"^NaN or infinite values in {what} \(item 2 of 2\) would make NaN "
                                         r"latents and black images: give finite values$"):
        run(bad)
    with pytest.raises(Forward):  # the same input, finite: a model runs
        run(0.5)


def test_text_encoder_nan_names_the_text_features(tiny_model_dir):
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = False
    with torch.no_grad():
        pipe.text_encoder.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="^the text features hold NaN or infinite values, so"):
        pipe("a cat", **RUN)


def test_given_embeddings_are_named(tiny_pipe):
    embeds = tiny_pipe.encode_prompt(["a cat"])
    embeds[0][3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="the prompt_embeds .* given hold them"):
        tiny_pipe(prompt_embeds=embeds, **RUN)


def test_vae_nan_names_the_decode(tiny_model_dir):
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = False
    with torch.no_grad():
        next(pipe.vae.decoder.parameters()).view(-1)[0] = float("nan")
    assert torch.isfinite(pipe("a cat", output_type="latent", **RUN).images).all()
    with pytest.raises(NonFiniteError, match="^the VAE decode made NaN or infinite pixels from finite latents "
                                             r"for image 1, 2 of 2 \(seed 5, 6\)"):
        pipe("a cat", **RUN)


def test_lora_and_fp8_are_suspects(fp16_pipe, monkeypatch):
    from zimage_native.lora import LoraReport

    monkeypatch.setitem(fp16_pipe._accel, "fp8", True)
    monkeypatch.setattr(fp16_pipe.lora_stack, "loaded", [LoraReport("style.safetensors", "kohya", scale=3.0)])
    with pytest.raises(NonFiniteError) as e:
        fp16_pipe("a cat", output_type="latent", **RUN)
    assert "fp8 linears (try without --fp8)" in str(e.value)
    assert "the LoRA style.safetensors at scale 3 (try a lower scale" in str(e.value)


def test_finite_runs_pass_and_flags_are_per_item(tiny_pipe):
    t = torch.zeros(3, 4, 2)
    t[1, 2, 0] = float("-inf")
    assert finite_rows(t).tolist() == [True, False, True]
    check_finite(tiny_pipe, torch.tensor([True]), torch.tensor([True, True]), torch.tensor([True, True]))
    check_finite(tiny_pipe, None, torch.tensor([True]))


def test_the_cli_prints_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    """A DiT file with a NaN weight (as a bad merge leaves): one line, exit 1, no image file."""
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from zimage_native.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["all_final_layer.2-1.linear.weight"][0, 0] = float("nan")
    save_file(state, path)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(folder), "--device", "cpu", "--width", "64",
                                       "--height", "64", "--steps", "2", "--seed", "9", "--no-progress", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith(
        "Error: the DiT made NaN or infinite latents for image 1 of 1 (seed 9), so the images would be black")
    assert f"damaged weights (`zimage info --check {folder}` finds tensors" in result.output
    assert not out.exists() and list(tmp_path.glob("*.png")) == []


# ----------------------------------------------------------------------------- zimage info --check

def _invoke(*args):
    from click.testing import CliRunner

    from zimage_native.cli import main

    return CliRunner().invoke(main, ["info", *map(str, args)])


def test_check_reads_every_tensor_of_a_model_folder(tiny_model_dir, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    clean = _invoke(tiny_model_dir, "--check")
    assert clean.exit_code == 0 and clean.output.strip().endswith("all values are finite")
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(k for k in state if k.startswith("decoder."))[0]
    state[key].view(-1)[:3] = float("nan")
    state[key].view(-1)[5] = float("-inf")
    save_file(state, path)
    bad = _invoke(folder, "--check")
    assert bad.exit_code == 1
    assert f"  vae/{key}: 3 NaN, 1 infinite of {state[key].numel():,} values" in bad.output.splitlines()
    report = json.loads(_invoke(folder / "vae", "--check", "--json").output)
    assert report["nonfinite"] == [{"name": key, "nan": 3, "inf": 1, "numel": state[key].numel()}]
    assert report["tensors"] == len(state) and report["values"] == sum(v.numel() for v in state.values())


def test_check_widens_fp8_and_skips_integers(tmp_path):
    from safetensors.torch import save_file

    from zimage_native.formats.scan import scan_nonfinite

    w = torch.tensor([[1.0, float("nan")], [448.0, -2.0]]).to(torch.float8_e4m3fn)
    save_file({"w": w, "q": torch.full((4,), -1, dtype=torch.int8), "b": torch.ones(2, dtype=torch.bfloat16)},
              tmp_path / "m.safetensors")
    report = scan_nonfinite(tmp_path / "m.safetensors")
    assert (report.tensors, report.values) == (2, 6)
    assert [(b.name, b.nan, b.inf) for b in report.bad] == [("w", 1, 0)]


def test_check_dequantises_gguf_blocks(tmp_path):
    from tests.gguf_files import random_blocks, write_gguf
    from zimage_native.formats.scan import scan_nonfinite

    rng = np.random.default_rng(0)
    blocks = random_blocks("Q8_0", 4, 64, rng)
    blocks[2, 34:36] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # row 2, block 1: its fp16 scale
    half = np.ones((2, 8), np.float16)
    half[1, 1] = np.inf
    path = write_gguf(tmp_path / "m.gguf", {"a.weight": (blocks, "Q8_0"), "b.weight": (half, "F16"),
                                            "c.weight": (random_blocks("Q4_K", 2, 256, rng), "Q4_K")}, arch=None)
    report = scan_nonfinite(path)
    assert report.tensors == 3 and report.values == 4 * 64 + 16 + 2 * 256
    assert [(b.name, b.nan, b.inf) for b in report.bad] == [("a.weight", 32, 0), ("b.weight", 0, 1)]


def test_check_refuses_an_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    result = _invoke(tmp_path / "x.png", "--check")
    assert result.exit_code == 1 and "--check reads model weights" in result.output


def test_the_server_fails_the_job_with_the_message(fp16_pipe, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from zimage_native.server import Limits, PipelineEngine, ServerSettings, create_app
    from zimage_native.server.sse import follow
    from zimage_native.server.testing import LiveServer

    settings = ServerSettings(data_dir=tmp_path / "server", limits=Limits(min_side=32, max_side=256))
    with LiveServer(create_app(PipelineEngine(fp16_pipe, model_name="tiny"), settings)) as live:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            job = c.post("/api/v1/jobs", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2,
                                               "seed": 4}).json()
            events = follow(c, job["events_url"])
            got = c.get(f"/api/v1/jobs/{job['id']}").json()
    assert events[-1].type == "failed"
    assert events[-1].data["error"].startswith("the DiT made NaN or infinite latents for image 1 of 1 (seed 4)")
    assert got["status"] == "failed" and got["images"] == [] and "float16" in got["error"]


def test_check_names_gguf_tensors_of_types_it_cannot_read(tmp_path):
    """`zimage info --check` on a GGUF with TQ1_0 tensors stopped at the first one ('tensor X has
    GGML type TQ1_0, which is not supported', exit status 1), also where those tensors are ones the
    engine never loads (a Qwen3 GGUF's LM head); it now checks the rest and names what it could not read."""
    import json

    from tests.gguf_files import random_blocks, write_gguf

    rng = np.random.default_rng(0)
    half = np.ones((2, 8), np.float16)
    half[1, 1] = np.inf
    path = write_gguf(tmp_path / "m.gguf", {"a.weight": (random_blocks("Q8_0", 4, 64, rng), "Q8_0"),
                                            "output.weight": (rng.integers(0, 256, (4, 54), dtype=np.uint8),
                                                              "TQ1_0"),
                                            "b.weight": (half, "F16")}, arch=None)
    result = _invoke(path, "--check")
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[:3] == [
        f"{path}: read 2 floating-point tensors (272 values)",
        "  not read: 1 tensor(s) of GGML types this engine does not dequantise (TQ1_0 1), e.g. output.weight",
        "  b.weight: 0 NaN, 1 infinite of 16 values"]
    report = json.loads(_invoke(path, "--check", "--json").output)
    assert report["unread"] == {"output.weight": "TQ1_0"} and report["tensors"] == 2
    half[1, 1] = 1.0
    write_gguf(path, {"output.weight": (rng.integers(0, 256, (4, 54), dtype=np.uint8), "TQ1_0"),
                      "b.weight": (half, "F16")}, arch=None)
    result = _invoke(path, "--check")
    assert result.exit_code == 0 and result.output.strip().endswith("  all values read are finite"), result.output


def test_info_names_the_tensors_a_dit_or_text_encoder_lacks(tiny_model_dir, tmp_path):
    """`zimage info` on a DiT or text encoder file lacking a tensor (a partial conversion) described it
    and exited 0 without a word that it cannot load (load_component refuses it); it says which tensors
    are missing now, from the header, and `--check` exits 1 (a file, a GGUF, a model folder)."""
    import json
    import shutil

    from safetensors.torch import save_file

    from zimage_native.config import TransformerConfig
    from zimage_native.model.transformer import ZImageTransformer
    from zimage_native.testing import randomize_

    from .dit_configs import REAL_HEADS_DIT
    from .test_formats import prefixed_te, write
    from .test_gguf import write_gguf, write_qwen3

    tail = ("The file is incomplete (a partial conversion or download) or holds another model: download it again or "
            "use another file")
    dit = {k: v.contiguous() for k, v in
           randomize_(ZImageTransformer(TransformerConfig.from_dict(REAL_HEADS_DIT))).state_dict().items()}
    te = prefixed_te(tiny_model_dir)
    whole = [write(tmp_path / "dit.safetensors", dit), write(tmp_path / "te.safetensors", te)]
    for path in whole:  # the control: complete files load, and say nothing of it
        result = _invoke(path)
        assert result.exit_code == 0 and "cannot load" not in result.output, result.output
        result = _invoke(path, "--check")
        assert result.exit_code == 0 and "cannot load" not in result.output, result.output
    from transformers import AutoTokenizer

    from zimage_native.formats.gguf import GGUFCheckpoint

    with GGUFCheckpoint(write_qwen3(tmp_path / "te.gguf", len(AutoTokenizer.from_pretrained(
            tiny_model_dir / "tokenizer")), "Q4_K")[0]) as ckpt:
        gguf_te = {k: (np.array(t.data), t.qtype) for k, t in ckpt.tensors.items() if "blk.1.ffn_up" not in k}
        meta = {k: v for k, v in ckpt.metadata.items() if k.startswith("qwen3.")}
    w2, up = "layers.0.feed_forward.w2.weight", "layers.1.mlp.up_proj.weight"
    cases = [(write(tmp_path / "dit-cut.safetensors", {k: v for k, v in dit.items() if w2 not in k}),
              "transformer", w2),
             (write(tmp_path / "te-cut.safetensors", {k: v for k, v in te.items() if up not in k}), "text_encoder", up),
             (write_gguf(tmp_path / "te-cut.gguf", gguf_te, "qwen3", meta), "text_encoder", up)]
    for path, kind, key in cases:
        message = f"{path}: {kind}: the checkpoint does not match the model. 1 missing keys, e.g. ['{key}']. {tail}"
        result = _invoke(path)
        assert result.exit_code == 0 and f"  cannot load: {message}" in result.output.splitlines(), result.output
        result = _invoke(path, "--check")
        assert result.exit_code == 1 and f"  cannot load: {message}" in result.output.splitlines(), result.output
        assert json.loads(_invoke(path, "--check", "--json").output)["cannot_load"] == [message]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = sorted((folder / "text_encoder").glob("*.safetensors"))
    assert len(weights) == 1, weights
    state = {k: v for k, v in prefixed_te(tiny_model_dir).items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, weights[0])
    result = _invoke(folder, "--check")
    message = (f"{folder / 'text_encoder'}: text_encoder: the checkpoint does not match the model. 1 missing keys, "
               f"e.g. ['{up}']. {tail}")
    assert result.exit_code == 1 and f"  cannot load: {message}" in result.output.splitlines(), result.output



def test_check_says_a_dit_whose_config_cannot_be_inferred_cannot_load(tiny_model_dir, tmp_path):
    """`zimage info --check` on a DiT file whose config cannot be inferred from its header (its patch
    embedder or caption embedder missing, a gap in its layers) read every tensor, found them finite
    and exited 0: load_component refuses such a file. It says `cannot load:` with why now, and exits
    1; a DiT that loads once a config gives its RoPE axes (what shapes cannot tell) is not refused."""
    import json

    from zimage_native.config import TransformerConfig
    from zimage_native.model.transformer import ZImageTransformer
    from zimage_native.testing import randomize_

    from .dit_configs import REAL_HEADS_DIT
    from .test_formats import comfy_dit, write

    dit = {k: v.contiguous() for k, v in
           randomize_(ZImageTransformer(TransformerConfig.from_dict(REAL_HEADS_DIT))).state_dict().items()}
    cases = [("no-embedder", "all_x_embedder.", "transformer: expected one patch embedder, found none"),
             ("no-caption-embedder", "cap_embedder.0.",
              "transformer: the checkpoint has no cap_embedder.0.weight; cannot infer its config"),
             ("gap", "layers.0.", "transformer: layers 0 missing: the checkpoint holds layers 1 (1 block). The file "
                                  "is incomplete (a partial conversion or download): download or convert it again")]
    for name, drop, why in cases:
        path = write(tmp_path / f"{name}.safetensors", {k: v for k, v in dit.items() if not k.startswith(drop)})
        result = _invoke(path, "--check")
        assert result.exit_code == 1 and f"  cannot load: {path}: {why}" in result.output.splitlines(), result.output
        assert json.loads(_invoke(path, "--check", "--json").output)["cannot_load"] == [f"{path}: {why}"]
        result = _invoke(path)
        assert result.exit_code == 0 and f"  cannot load: {path}: {why}" in result.output.splitlines(), result.output
    path = write(tmp_path / "tiny-comfy.safetensors", comfy_dit(tiny_model_dir))  # axes_dims [8, 12, 12] needed
    result = _invoke(path, "--check")
    assert result.exit_code == 0 and "cannot load" not in result.output, result.output
    assert "head dim is 32" in _invoke(path).output
