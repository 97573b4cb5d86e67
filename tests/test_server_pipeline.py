"""The server on the tiny random model: served images equal library images, remote encoding equals
local encoding (features, token ids and a whole generation), rewrite and shift."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from zimage_native import ZImagePipeline  # noqa: E402
from zimage_native.server import Limits, PipelineEngine, RemoteEncoderError, RemoteTextEncoder, ServerSettings  # noqa: E402
from zimage_native.server import create_app  # noqa: E402
from zimage_native.server.sse import follow  # noqa: E402
from zimage_native.server.testing import LiveServer  # noqa: E402

TOKEN = "tiny-token"


@pytest.fixture(scope="module")
def served(tiny_pipe, tmp_path_factory):
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("tiny-server"), token=TOKEN,
                              limits=Limits(min_side=32, max_side=256))
    with LiveServer(create_app(PipelineEngine(tiny_pipe, model_name="tiny"), settings)) as live:
        yield live


@pytest.fixture
def remote(served):
    return RemoteTextEncoder(served.url, token=TOKEN, timeout=60)


def test_served_image_equals_the_library_image(served, tiny_pipe):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=60) as c:
        body = {"prompt": "a cat", "width": 64, "height": 48, "steps": 2, "seed": [3, 4],
                "system_prompt": "You are a painter.", "negative_prompt": "blur", "guidance_scale": 1.5}
        job = c.post("/api/v1/jobs", json=body).json()
        events = follow(c, job["events_url"])
        assert [e.type for e in events] == ["queued", "started", "progress", "progress", "completed"]
        images = events[-1].data["images"]
        pngs = [c.get(i["url"]).content for i in images]
        capabilities = c.get("/api/v1/capabilities").json()
    expected = tiny_pipe("a cat", width=64, height=48, num_inference_steps=2, seed=[3, 4], num_images_per_prompt=2,
                         system_prompt="You are a painter.", negative_prompt="blur", guidance_scale=1.5)
    for png, want, seed in zip(pngs, expected.images, (3, 4)):
        with Image.open(io.BytesIO(png)) as im:
            assert np.array_equal(np.asarray(im), np.asarray(want))
            record = json.loads(im.info["zimage"])
        assert record["seed"] == seed and record["system_prompt"] == "You are a painter."
        assert record["formatted_prompt"] == expected.info["formatted_prompts"][0]
    assert capabilities["text_encoder"] == {"dtype": "float32", "device": "cpu", "hidden_size": 48,
                                            "max_sequence_length": 512, "remote": False}
    assert capabilities["scheduler_shift"] == tiny_pipe.scheduler_config.shift


def test_remote_encoding_equals_local_encoding(remote, tiny_pipe):
    texts = tiny_pipe.format_prompts(["a cat", "a watercolor of mountains at dawn, soft light"],
                                     system_prompt="S", thinking_content="T")
    local = tiny_pipe.text_encoder.encode(texts, 512)
    got = remote.encode(texts, 512)
    assert len(got) == 2
    for g, want in zip(got, local):
        assert g.dtype == want.dtype and g.shape == want.shape and torch.equal(g, want)
    assert remote.tokenize(texts, 5) == tiny_pipe.text_encoder.tokenize(texts, 5)
    short = remote.encode(texts, 4)
    assert [tuple(f.shape) for f in short] == [(4, 48), (4, 48)]
    assert remote.model is None and remote.tokenizer is None and remote.device == torch.device("cpu")
    assert remote.dtype == torch.float32 and remote.hidden_size == 48 and remote.encode([]) == []
    cast = RemoteTextEncoder(remote.url, token=TOKEN, dtype="bfloat16").encode(texts[:1])
    assert cast[0].dtype == torch.bfloat16


def test_generation_with_the_remote_encoder_equals_the_local_one(remote, tiny_pipe, tiny_model_dir, tmp_path):
    # The pipeline takes any object with the TextEncoder interface; the lead wires text_encoder_url to this.
    pipe = ZImagePipeline(tiny_pipe.transformer, tiny_pipe.vae, remote, tiny_pipe.scheduler_config,
                          tiny_pipe.vae_config, source=tiny_pipe.source, variant=tiny_pipe.variant,
                          model_folder=tiny_pipe.model_folder)
    pipe.progress = False
    call = dict(width=64, height=64, num_inference_steps=2, seed=5, output_type="np")
    want = tiny_pipe(["a red fox", "a lighthouse at dusk"], **call).images
    got = pipe(["a red fox", "a lighthouse at dusk"], **call).images
    assert np.array_equal(got, want)
    # The distributed mode end to end: a DiT server whose pipeline encodes on the encoder server.
    with LiveServer(create_app(PipelineEngine(pipe, model_name="dit"),
                               ServerSettings(data_dir=tmp_path, limits=Limits(min_side=32)))) as dit, \
            httpx.Client(base_url=dit.url, timeout=60) as c:
        job = c.post("/api/v1/jobs", json={"prompt": "a red fox", "width": 64, "height": 64, "steps": 2,
                                           "seed": 5}).json()
        image = follow(c, job["events_url"])[-1].data["images"][0]
        with Image.open(io.BytesIO(c.get(image["url"]).content)) as im:
            served = np.asarray(im)
        caps = c.get("/api/v1/capabilities").json()
        rewritten = c.post("/api/rewrite", json={"prompt": "a cat", "max_new_tokens": 5, "temperature": 0}).json()
    local = tiny_pipe("a red fox", width=64, height=64, num_inference_steps=2, seed=5).images[0]
    assert np.array_equal(served, np.asarray(local))
    assert caps["text_encoder"]["remote"] is True and caps["features"]["rewrite"] is True
    assert rewritten["rewritten"] == tiny_pipe.rewrite("a cat", max_new_tokens=5, temperature=0.0)
    # The same through from_pretrained(text_encoder_url=...): no local Qwen3 is loaded.
    wired = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32,
                                           text_encoder_url=remote.url, text_encoder_token=TOKEN)
    assert wired.text_encoder.model is None
    wired.progress = False
    assert np.array_equal(wired(["a red fox", "a lighthouse at dusk"], **call).images, want)


def test_the_distributed_mode_takes_the_prompts_the_dit_server_accepts(remote, tiny_pipe, tmp_path):
    """Each field within the DiT server's limit: the formatted text is longer, and more than one
    encoder call's worth of texts goes in several calls."""
    pipe = ZImagePipeline(tiny_pipe.transformer, tiny_pipe.vae, remote, tiny_pipe.scheduler_config,
                          tiny_pipe.vae_config, variant=tiny_pipe.variant)
    with LiveServer(create_app(PipelineEngine(pipe, model_name="dit"),
                               ServerSettings(data_dir=tmp_path, limits=Limits(min_side=32)))) as dit, \
            httpx.Client(base_url=dit.url, timeout=60) as c:
        for extra in ({"prompt": "a red fox " * 399}, {"prompt": "a fox " * 500, "system_prompt": "paint " * 500},
                      {"prompt": "a fox " * 590, "template": "photo-portrait-85mm"}):
            job = c.post("/api/v1/jobs", json={"width": 32, "height": 32, "steps": 1, "seed": 1,
                                               "max_sequence_length": 64, **extra}).json()
            last = follow(c, job["events_url"])[-1]
            assert last.type == "completed", last.data
            # the cut is reported as with a local encoder: the encoder machine counts the tokens
            advice = c.get(job["url"]).json()["advice"]
            assert len(advice) == 1 and "more than max_sequence_length 64" in advice[0], advice
    prompts = [f"prompt {i}" for i in range(20)]
    assert [f.shape for f in remote.encode(prompts)] == [f.shape for f in tiny_pipe.text_encoder.encode(prompts)]


def test_a_prompt_cut_to_max_sequence_length_is_reported(served, tiny_pipe):
    """The CLI warns when a prompt is longer than max_sequence_length (its end is cut); a served job
    says it in its advice (the job, its started event, /api/generate), also when the features come
    from the prompt cache, and the token routes give the count before the cut."""
    long = "a cat on a windowsill " * 40
    formatted = tiny_pipe.format_prompts([long])[0]
    full = len(tiny_pipe.text_encoder.tokenizer(formatted, add_special_tokens=False)["input_ids"])
    assert full > 64
    call = {"width": 32, "height": 32, "steps": 1, "seed": 1, "max_sequence_length": 64}
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        for _ in range(2):  # the second run's features come from the prompt cache
            job = c.post("/api/v1/jobs", json={"prompt": long, **call}).json()
            events = follow(c, job["events_url"])
            assert events[-1].type == "completed"
            advice = c.get(job["url"]).json()["advice"]
            assert advice == [f"the prompt is {full} tokens long in the chat format, more than max_sequence_length "
                              f"64: its last {full - 64} tokens (the end of the text and the chat format's closing "
                              f"tokens) are cut; raise max_sequence_length (the web page's Token limit) to {full} "
                              f"to keep them."]
            assert events[1].type == "started" and events[1].data["advice"] == advice
        legacy = c.post("/api/generate", json={"prompt": long, **call}).json()
        assert legacy["advice"] == advice
        # with CFG the negative prompt is encoded too; a short prompt is not reported
        job = c.post("/api/v1/jobs", json={"prompt": "a cat", "negative_prompt": long, "guidance_scale": 2,
                                           **call}).json()
        follow(c, job["events_url"])
        advice = c.get(job["url"]).json()["advice"]
        assert len(advice) == 2 and "Turbo" in advice[0]
        assert advice[1].startswith(f"the negative prompt is {full} tokens long")
        job = c.post("/api/v1/jobs", json={"prompt": long, **call, "max_sequence_length": 1024}).json()
        events = follow(c, job["events_url"])
        assert c.get(job["url"]).json()["advice"] == [] and "advice" not in events[1].data
        counted = c.post("/api/format-prompt", json={"prompt": long, "tokens": True, "max_sequence_length": 64}).json()
        assert counted["token_count"] == 64 and counted["full_token_count"] == full
        tokens = c.post("/api/tokenize", json={"texts": [formatted, "a"], "max_sequence_length": 64}).json()
        assert tokens["token_counts"][0] == 64 and tokens["full_token_counts"] == [full, 1]


def test_a_served_job_with_seed_variance_equals_the_library_image(served, tiny_pipe):
    variance = {"seed_variance": 20.0, "seed_variance_share": 0.5, "seed_variance_steps": 0.5}
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        job = c.post("/api/v1/jobs", json={"prompt": "a cat", "width": 64, "height": 48, "steps": 2, "seed": 3,
                                           **variance}).json()
        image = follow(c, job["events_url"])[-1].data["images"][0]
        png = c.get(image["url"]).content
    expected = tiny_pipe("a cat", width=64, height=48, num_inference_steps=2, seed=3, **variance).images[0]
    with Image.open(io.BytesIO(png)) as im:
        assert np.array_equal(np.asarray(im), np.asarray(expected))
        record = json.loads(im.info["zimage"])
    assert {k: record[k] for k in variance} == variance
    assert not np.array_equal(np.asarray(expected), np.asarray(
        tiny_pipe("a cat", width=64, height=48, num_inference_steps=2, seed=3).images[0]))


def test_a_served_job_with_the_first_block_cache_equals_the_library_image(served, tiny_pipe, monkeypatch):
    call = {"width": 64, "height": 48, "steps": 3, "seed": 3}
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        job = c.post("/api/v1/jobs", json={"prompt": "a cat", **call, "first_block_cache": 100}).json()
        png = c.get(follow(c, job["events_url"])[-1].data["images"][0]["url"]).content
        expected = tiny_pipe("a cat", width=64, height=48, num_inference_steps=3, seed=3, first_block_cache=100)
        with Image.open(io.BytesIO(png)) as im:
            assert np.array_equal(np.asarray(im), np.asarray(expected.images[0]))
            record = json.loads(im.info["zimage"])
        assert record["first_block_cache"] == 100 and record["first_block_cache_forwards"] == {"full": 1, "reused": 2}
        assert c.get("/api/v1/capabilities").json()["features"]["first_block_cache"] is True
        # A server whose pipeline runs CUDA graphs says so (the web page hides the field) and refuses the
        # option up front (422), naming it.
        monkeypatch.setattr(tiny_pipe, "_graphed", object())
        assert c.get("/api/v1/capabilities").json()["features"]["first_block_cache"] is False
        r = c.post("/api/v1/jobs", json={"prompt": "a cat", **call, "first_block_cache": 0.1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "first_block_cache"
    assert "turn off CUDA graphs" in r.json()["error"]["message"]


def test_a_repeated_prompt_is_not_sent_to_the_remote_encoder_again(remote, tiny_pipe, monkeypatch):
    pipe = ZImagePipeline(tiny_pipe.transformer, tiny_pipe.vae, remote, tiny_pipe.scheduler_config,
                          tiny_pipe.vae_config, variant=tiny_pipe.variant)
    sent, encode = [], remote.encode
    monkeypatch.setattr(remote, "encode", lambda texts, *a: sent.append(list(texts)) or encode(texts, *a))
    call = dict(width=32, height=32, num_inference_steps=1, output_type="np", progress=False)
    first = pipe("a red fox", seed=1, **call).images
    pipe("a red fox", seed=2, **call)
    assert len(sent) == 1
    assert np.array_equal(first, pipe("a red fox", seed=1, **call).images)


def test_remote_errors_are_clear(served):
    with pytest.raises(RemoteEncoderError, match=r"HTTP 401: .*; pass the server's --token with --encoder-token "
                                                 r"TOKEN \(or set ZIMAGE_ENCODER_TOKEN\)$"):
        RemoteTextEncoder(served.url).encode(["x"])
    with pytest.raises(RemoteEncoderError, match=r"HTTP 401: .*; the token given is not the server's --token \(check "
                                                 r"--encoder-token or ZIMAGE_ENCODER_TOKEN\)$"):
        RemoteTextEncoder(served.url, token="wrong").encode(["x"])
    with pytest.raises(RemoteEncoderError, match="HTTP 422: max_sequence_length"):
        RemoteTextEncoder(served.url, token=TOKEN).encode(["x"], 100_000)
    with pytest.raises(RemoteEncoderError, match="cannot reach"):
        RemoteTextEncoder("http://127.0.0.1:9", timeout=5).encode(["x"])
    with pytest.raises(ValueError, match="http"):
        RemoteTextEncoder("ftp://host")


def test_remote_rewrite_equals_local(remote, tiny_pipe):
    kwargs = dict(max_new_tokens=6, temperature=0.0)
    assert remote.rewrite("a cat", **kwargs) == tiny_pipe.rewrite("a cat", **kwargs)


def test_engine_shift_is_the_pipeline_shift(tiny_pipe):
    """The server's ``shift`` reaches make_schedule as the pipeline's does (no re-derived sigmas):
    the engine's latents equal the library's with the same shift, and differ from the model's own."""
    from zimage_native.server.engine import GenerationRequest

    engine = PipelineEngine(tiny_pipe, model_name="tiny")
    kw = dict(prompt="a cat", width=32, height=32, steps=3, guidance_scale=0.0, seeds=[5], output_type="latent")
    served = engine.generate(GenerationRequest(shift=6.0, **kw), lambda i, n: None)
    assert served[0].record["shift"] == 6.0
    direct = tiny_pipe("a cat", width=32, height=32, num_inference_steps=3, seed=5, shift=6.0, output_type="latent")
    assert torch.equal(served[0].image, direct.images[0])
    own = tiny_pipe("a cat", width=32, height=32, num_inference_steps=3, seed=5, output_type="latent").images
    assert not torch.equal(direct.images, own)


def test_encoder_only_engine_matches_the_pipeline_encoder(tiny_model_dir, tiny_pipe, tmp_path):
    from zimage_native.server import EncoderOnlyEngine

    engine = EncoderOnlyEngine.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    texts = tiny_pipe.format_prompts(["a cat", "two dogs"])
    for got, want in zip(engine.encode(texts, 512), tiny_pipe.text_encoder.encode(texts, 512)):
        assert torch.equal(got, want)
    assert engine.text_encoder_info()["hidden_size"] == 48 and not engine.can_generate
    settings = ServerSettings(data_dir=tmp_path)
    with LiveServer(create_app(engine, settings, warmup=True)) as live:  # zimage serve --encoder-only --warmup
        remote = RemoteTextEncoder(live.url)
        assert torch.equal(remote.encode(texts[:1])[0], tiny_pipe.text_encoder.encode(texts[:1])[0])
        assert remote.token_counts(texts) == [len(ids) for ids in tiny_pipe.text_encoder.tokenize(texts, 10**6)]
        kwargs = dict(max_new_tokens=5, temperature=0.0)
        assert remote.rewrite("a cat", **kwargs) == tiny_pipe.rewrite("a cat", **kwargs)


def test_serve_builds_each_engine(tiny_model_dir, tmp_path):
    import importlib

    serve = importlib.import_module("zimage_native.cli.serve")
    from zimage_native.server import EncoderOnlyEngine, FakeEngine

    def options(*args):
        return serve.serve.make_context("serve", ["--data-dir", str(tmp_path), *args]).params

    assert isinstance(serve.build_engine(options("--fake")), FakeEngine)
    assert isinstance(serve.build_engine(options("--model", str(tiny_model_dir), "--encoder-only", "--device", "cpu")),
                      EncoderOnlyEngine)
    engine = serve.build_engine(options("--model", str(tiny_model_dir), "--device", "cpu", "--tiled-vae"))
    assert isinstance(engine, PipelineEngine) and engine.pipe.vae_tiling is not None
    assert engine.model_name == str(tiny_model_dir) and engine.default_steps == 8


def test_serve_encoder_timeout_reaches_the_remote_encoder(served, tiny_model_dir, tmp_path):
    import importlib

    serve = importlib.import_module("zimage_native.cli.serve")
    options = serve.serve.make_context("serve", ["--data-dir", str(tmp_path), "--model", str(tiny_model_dir),
                                                 "--device", "cpu", "--encoder-url", served.url, "--encoder-token",
                                                 TOKEN, "--encoder-timeout", "7.5"]).params
    engine = serve.build_engine(options)
    assert isinstance(engine.pipe.text_encoder, RemoteTextEncoder) and engine.pipe.text_encoder.timeout == 7.5


def test_generate_cli_with_a_remote_encoder(served, tiny_model_dir, tiny_pipe, tmp_path):
    """zimage generate --encoder-url: the image equals the local one, and no Qwen3 is loaded here."""
    from click.testing import CliRunner

    from zimage_native.cli import main

    remote = served  # the encoder server of the fixture above
    out = tmp_path / "remote.png"
    result = CliRunner().invoke(main, ["generate", "a red fox", "--model", str(tiny_model_dir), "--device", "cpu",
                                       "--encoder-url", remote.url, "--encoder-token", TOKEN, "--width", "32",
                                       "--height", "32", "--steps", "2", "--seed", "3", "--no-progress",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    want = tiny_pipe("a red fox", width=32, height=32, num_inference_steps=2, seed=3).images[0]
    from PIL import Image

    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), np.asarray(want))


def test_served_inpainting_equals_the_library(served, tiny_pipe):
    """The job API's image + mask reach pipe.inpaint unchanged (same pixels as the library call)."""
    import base64

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 40))

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=60) as c:
        job = c.post("/api/v1/jobs", json={"prompt": "a cat", "steps": 2, "seed": 5, "image": b64(picture),
                                           "mask": b64(mask), "strength": 0.9}).json()
        assert follow(c, job["events_url"])[-1].type == "completed"
        got = Image.open(io.BytesIO(c.get(f"/api/v1/images/{job['id']}-0").content))
        assert job["params"]["inpaint"] is True and (got.width, got.height) == (64, 48)
    want = tiny_pipe.inpaint("a cat", image=picture, mask_image=mask, strength=0.9, width=64, height=48,
                             num_inference_steps=2, seed=5).images[0]
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def test_served_controlnet_equals_the_library(tmp_path):
    """zimage serve --controlnet FILE: a job's control_image and control_scale reach the pipeline."""
    import base64
    import importlib

    from safetensors.torch import save_file

    from .fixtures import build_model_folder
    from .test_controlnet_model import CONTROL_DIT, make_models

    serve = importlib.import_module("zimage_native.cli.serve")
    model_dir = build_model_folder(tmp_path / "model", dit_kwargs=CONTROL_DIT)
    state = {k: v.contiguous() for k, v in make_models("2.1")[1].state_dict().items() if k.startswith("control_")}
    save_file(state, str(tmp_path / "cn.safetensors"))
    options = serve.serve.make_context("serve", ["--data-dir", str(tmp_path / "data"), "--model", str(model_dir),
                                                 "--device", "cpu", "--dtype", "float32", "--controlnet",
                                                 str(tmp_path / "cn.safetensors"), "--min-side", "32"]).params
    engine = serve.build_engine(options)
    assert engine.can_control and engine.can_inpaint
    control = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    control.save(buf, format="PNG")
    with LiveServer(create_app(engine, serve.build_settings(options))) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.get("/api/v1/capabilities").json()["features"]["control"] is True
        job = c.post("/api/v1/jobs", json={"prompt": "a pose", "steps": 2, "seed": 2, "control_scale": 0.5,
                                           "control_image": base64.b64encode(buf.getvalue()).decode()}).json()
        assert follow(c, job["events_url"])[-1].type == "completed", job
        got = Image.open(io.BytesIO(c.get(f"/api/v1/images/{job['id']}-0").content)).convert("RGB")
    want = engine.pipe("a pose", control_image=control, controlnet_conditioning_scale=0.5, width=48, height=32,
                       num_inference_steps=2, seed=2).images[0]
    assert got.size == (48, 32) and np.array_equal(np.asarray(got), np.asarray(want))


def test_a_remote_encoder_is_asked_before_any_weight_is_read(remote, tiny_model_dir, monkeypatch):
    """text_encoder_url: an encoder that is down, or whose features are not the DiT's caption width,
    was found only after the DiT and the VAE had been loaded; now before any weight is read."""
    import zimage_native.loading as loading

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the remote encoder was asked")

    monkeypatch.setattr(loading, "load_module", no_load)
    monkeypatch.setattr(loading, "load_component", no_load)
    with pytest.raises(RemoteEncoderError):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", text_encoder_url="http://127.0.0.1:9")
    info = RemoteTextEncoder.info
    monkeypatch.setattr(RemoteTextEncoder, "info", lambda self: {**info(self), "hidden_size": 64})
    with pytest.raises(ValueError, match=r"text encoder hidden size 64 \(http://.*\) does not match the "
                                         r"transformer's cap_feat_dim 48"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", text_encoder_url=remote.url,
                                       text_encoder_token=TOKEN)


def test_a_job_whose_cpu_decode_cannot_fit_fails_and_the_server_keeps_running(served, tiny_pipe, monkeypatch):
    """On the CPU an untiled VAE decode that the RAM and swap cannot hold got the whole server killed at
    the end of sampling, with every queued job. Now the job fails before sampling with the library's
    message, and the next job runs."""
    from zimage_native import devices

    monkeypatch.setattr(tiny_pipe, "vae_tiling", None)
    need = devices.decode_bytes(64, 48, 2, tiny_pipe.vae_config.block_out_channels[0], torch.float32)
    monkeypatch.setattr(devices, "host_memory", lambda: (need // 2, need // 4, 8 * need))
    monkeypatch.setattr(tiny_pipe, "denoise", lambda *a, **k: pytest.fail("sampled"))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"prompt": "a cat", "width": 64, "height": 48, "steps": 2, "seed": [3, 4]}
    with httpx.Client(base_url=served.url, headers=headers, timeout=60) as c:
        events = follow(c, c.post("/api/v1/jobs", json=body).json()["events_url"])
        assert events[-1].type == "failed", events
        assert events[-1].data["error"].startswith(
            "the VAE decode of 2 images at 64x48 in one piece needs about 6.3 MB of CPU memory, and this machine has "
            "3.1 MB of RAM available (of 50.3 MB) and 1.6 MB of free swap: the system would stop the run at the end "
            "of sampling; use --tiled-vae"), events[-1].data
        monkeypatch.undo()
        events = follow(c, c.post("/api/v1/jobs", json=body).json()["events_url"])
        assert events[-1].type == "completed" and len(events[-1].data["images"]) == 2, events
