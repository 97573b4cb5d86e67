"""The server when things around it fail: a full disk, a broken history, a remote encoder that
fails or hangs, hostile uploads, odd tokens. Fake engine, CPU only."""

from __future__ import annotations

import errno
import sqlite3
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from zimage_native.server import FakeEngine, Limits, ServerSettings, create_app  # noqa: E402
from zimage_native.server.sse import follow  # noqa: E402
from zimage_native.server.testing import LiveServer  # noqa: E402

SMALL = dict(width=64, height=64, steps=2)


def settings_for(path, **kw) -> ServerSettings:
    limits = kw.pop("limits", None) or Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50,
                                              max_images=4, max_upload_bytes=200_000, max_body_bytes=400_000)
    return ServerSettings(data_dir=path, limits=limits, **kw)


def live(tmp_path, engine=None, **kw) -> LiveServer:
    return LiveServer(create_app(engine or FakeEngine(step_delay=0.01), settings_for(tmp_path, **kw)))


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def db_full(*args, **kwargs):
    raise sqlite3.OperationalError("database or disk is full")


def wait_status(client, job_id: str, statuses=("completed", "failed", "cancelled"), timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


# ------------------------------------------------------------------------------ 1. storage failures
def test_a_job_whose_images_and_row_cannot_be_written_fails_with_a_final_event(tmp_path):
    server = live(tmp_path)
    storage = server.app.state.storage
    real_update = storage.update_job

    def update_job(job_id, status, **kw):
        if status in ("completed", "failed", "cancelled"):
            db_full()
        return real_update(job_id, status, **kw)

    storage.save_image = disk_full
    storage.update_job = update_job
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL}).json()
        events = follow(client, job["events_url"], timeout=10)
        assert events[-1].type == "failed"
        assert "full" in events[-1].data["error"] and "No space left" in events[-1].data["error"]
        assert client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "failed"
        assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 409
        assert client.get("/health").json()["queue"]["running"] == 0
        listed = {j["id"]: j["status"] for j in client.get("/api/v1/jobs").json()["jobs"]}
        assert listed[job["id"]] == "failed"  # the memory's state, not the row that could not be written
        # The worker goes on: the next job (storage back to normal) completes.
        del storage.save_image, storage.update_job
        job = client.post("/api/v1/jobs", json={"prompt": "y", **SMALL}).json()
        assert follow(client, job["events_url"], timeout=10)[-1].type == "completed"


def test_a_job_whose_start_cannot_be_recorded_fails(tmp_path):
    server = live(tmp_path)
    storage = server.app.state.storage
    real_update = storage.update_job

    def update_job(job_id, status, **kw):
        if status == "running":
            raise sqlite3.OperationalError("disk I/O error")
        return real_update(job_id, status, **kw)

    storage.update_job = update_job
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL}).json()
        last = follow(client, job["events_url"], timeout=10)[-1]
        assert last.type == "failed" and "disk I/O error" in last.data["error"]
        del storage.update_job
        assert storage.get_job(job["id"])["status"] == "failed"


def test_an_unexpected_error_in_the_worker_still_ends_the_job(tmp_path):
    server = live(tmp_path)
    manager = server.app.state.manager

    def broken_run(job):
        raise RuntimeError("boom")

    manager._run = broken_run
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL}).json()
        last = follow(client, job["events_url"], timeout=10)[-1]
        assert last.type == "failed" and "boom" in last.data["error"]
        r = client.post("/api/generate", json={"prompt": "x", **SMALL}, timeout=10)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]


@pytest.mark.parametrize("error, status", [(db_full, 507), (disk_full, 507),
                                           (lambda *a, **k: (_ for _ in ()).throw(
                                               sqlite3.OperationalError("disk I/O error")), 503)])
def test_a_submit_that_cannot_be_recorded_is_refused_clearly(tmp_path, error, status):
    server = live(tmp_path)
    server.app.state.storage.insert_job = error
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        for route in ("/api/v1/jobs", "/api/generate", "/v1/images/generations"):
            r = client.post(route, json={"prompt": "x", "size": "64x64"})
            assert r.status_code == status, (route, r.text)
            message = r.json()["error"]["message"]
            assert "not queued" in message and ("full" in message) == (status == 507)
        assert client.get("/health").json()["queue"]["queued"] == 0


# ------------------------------------------------------------------------------ 2. sign-in with any token
@pytest.mark.parametrize("token", ["Ab3/x+Yz9w==", "two words", "a,b;c", 'say "hi"', "back\\slash", "ünï€ode"])
def test_web_sign_in_works_with_any_token(tmp_path, token):
    server = live(tmp_path, token=token)
    with server, httpx.Client(base_url=server.url, timeout=30) as browser:
        assert browser.get("/api/history").status_code == 401
        r = browser.post("/api/v1/login", json={"token": token})
        assert r.status_code == 200 and token not in r.headers["set-cookie"]  # the browser never keeps the token
        assert browser.get("/api/history").status_code == 200  # the cookie, as the browser sends it back
        job = browser.post("/api/v1/jobs", json={"prompt": "x", **SMALL}).json()
        assert follow(browser, job["events_url"], timeout=10)[-1].type == "completed"
        assert browser.get(f"/api/v1/images/{job['id']}-0").status_code == 200
        client = httpx.Client(base_url=server.url, timeout=30)
        header = {"Authorization": b"Bearer " + token.encode()}
        assert client.get("/api/history", headers=header).status_code == 200
        assert client.get("/api/history", headers={"Authorization": b"Bearer " + token.encode() + b"x"}).status_code == 401
        raw_cookie = {"Cookie": b"zimage_token=" + token.encode()}
        assert client.get("/api/history", headers=raw_cookie).status_code == 401  # the token itself is no cookie
        client.close()


# ------------------------------------------------------------------------------ 3. remote encoder limits
def test_the_remote_encoder_takes_what_the_dit_server_accepts(tmp_path):
    from zimage_native.server import RemoteEncoderError, RemoteTextEncoder

    engine = FakeEngine()
    server = LiveServer(create_app(engine, ServerSettings(data_dir=tmp_path)))  # the default limits
    with server:
        remote = RemoteTextEncoder(server.url, timeout=30)
        # Fields each within the DiT server's limit of 4000 characters, formatted by its pipeline.
        texts = engine.format_prompts(["p" * 3990], None) + \
            engine.format_prompts(["p" * 3550], "photo-portrait-85mm") + \
            engine.format_prompts(["p" * 3000], None, system_prompt="s" * 3000) + \
            engine.format_prompts(["p" * 4000], None, system_prompt="s" * 4000, thinking_content="t" * 4000,
                                  assistant_content="a" * 4000)
        assert all(len(t) > 4000 for t in texts)
        got = remote.encode(texts, 64)
        assert [f.shape[0] for f in got] == [64] * 4
        assert remote.tokenize(texts, 64) == engine.tokenize(texts, 64)
        # More texts than one call takes (max_texts 16): split, in order.
        many = [f"text {i}" for i in range(40)]
        features = remote.encode(many)
        assert len(features) == 40
        assert all(torch.equal(a, b) for a, b in zip(features, engine.encode(many)))
        assert remote.tokenize(many) == engine.tokenize(many)
        # Past the encoder's limit: a clear error before anything is sent.
        limit = remote.limits()["max_formatted_chars"]
        with pytest.raises(RemoteEncoderError, match=f"is {limit + 1} characters long; the text encoder at .* takes "
                                                     f"at most {limit}"):
            remote.encode(["x" * (limit + 1)])


# ------------------------------------------------------------------------------ 4. remote encoder failures
class RemoteBackedEngine(FakeEngine):
    """The fake engine with its text encoder on another server, as a --encoder-url server has."""

    def __init__(self, remote):
        super().__init__()
        self.remote = remote

    def encode(self, texts, max_sequence_length=None):
        return self.remote.encode(texts, max_sequence_length)

    def tokenize(self, texts, max_sequence_length=None):
        return self.remote.tokenize(texts, max_sequence_length)

    def rewrite(self, prompt, **kwargs):
        return self.remote.rewrite(prompt, **kwargs)


@pytest.mark.parametrize("case", ["unreachable", "refused"])
def test_remote_encoder_failures_are_502_or_503_with_their_message(tmp_path, case, refused_url):
    from zimage_native.server import RemoteTextEncoder

    encoder = LiveServer(create_app(FakeEngine(), ServerSettings(data_dir=tmp_path / "enc", token="right")))
    with encoder:
        url = refused_url if case == "unreachable" else encoder.url
        remote = RemoteTextEncoder(url, token="wrong", timeout=5)
        remote._caps = {"limits": {}}  # what the DiT server read at start-up
        dit = live(tmp_path / "dit", engine=RemoteBackedEngine(remote))
        status, words = (503, "cannot reach") if case == "unreachable" else (502, "HTTP 401")
        with dit, httpx.Client(base_url=dit.url, timeout=30) as client:
            for route, body in (("/api/encode", {"prompt": "a cat"}), ("/api/tokenize", {"texts": ["a cat"]}),
                                ("/api/rewrite", {"prompt": "a cat"}),
                                ("/api/format-prompt", {"prompt": "a cat", "tokens": True}),
                                ("/api/save-embeddings", {"prompt": "a cat"})):
                r = client.post(route, json=body)
                assert r.status_code == status, (route, r.text)
                message = r.json()["error"]["message"]
                assert message.startswith("the remote text encoder failed: ") and words in message, message


# ------------------------------------------------------------------------------ 5. a remote encoder that hangs
class Silent:
    """A TCP server that accepts connections and reads requests but never answers (or, given
    ``first``, sends those bytes at once and then nothing: a reader then blocks inside the answer,
    as behind TLS 1.3, whose session tickets make the socket readable before any answer)."""

    def __init__(self, first: bytes = b""):
        import socket
        import threading

        self.first = first
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            if self.first:
                conn.sendall(self.first)

    def close(self):
        self.sock.close()
        for conn in self.connections:
            conn.close()


class EncodesFirst(RemoteBackedEngine):
    """Encodes the prompt on the remote encoder, then generates (as the pipeline does)."""

    def generate(self, request, callback):
        self.remote.encode([request.prompt])
        return super().generate(request, callback)


@pytest.fixture
def silent():
    server = Silent()
    yield server
    server.close()


def hanging_remote(url, timeout=60.0):
    from zimage_native.server import RemoteTextEncoder

    remote = RemoteTextEncoder(url, timeout=timeout)
    remote._caps = {"limits": {"max_texts": 16}}  # read at start-up, when the encoder still answered
    return remote


def test_cancel_stops_a_job_waiting_for_a_hanging_remote_encoder(tmp_path, silent):
    server = live(tmp_path, engine=EncodesFirst(hanging_remote(silent.url)))
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL}).json()
        # cancel once the job waits for the encoder (a cancel before that ends it without a call)
        deadline = time.monotonic() + 30
        while not silent.connections:
            assert time.monotonic() < deadline, "the job never called the remote encoder"
            time.sleep(0.01)
        t0 = time.monotonic()
        assert client.post(f"/api/v1/jobs/{job['id']}/cancel").json()["cancel_requested"] is True
        last = follow(client, job["events_url"], timeout=10)[-1]
        assert last.type == "cancelled" and time.monotonic() - t0 < 5


def test_an_abort_ends_a_read_already_blocked_inside_the_answer():
    """A cancel reaches a call whose socket has data but no whole answer (TLS 1.3's tickets, or a
    half-sent status line): waiting for the socket to be readable did not see it (the call hung
    for the whole --encoder-timeout); the socket is now shut down under the blocked read."""
    from zimage_native.server.remote import RemoteCallAborted, abort_when

    server = Silent(first=b"HTTP/1.1 2")
    try:
        remote, t0 = hanging_remote(server.url, timeout=30), time.monotonic()
        with abort_when(lambda: time.monotonic() - t0 > 0.5), pytest.raises(RemoteCallAborted, match="given up"):
            remote.encode(["a cat"])
        assert time.monotonic() - t0 < 5
    finally:
        server.close()


def test_the_job_timeout_stops_the_wait_for_a_hanging_remote_encoder(tmp_path, silent):
    server = live(tmp_path, engine=EncodesFirst(hanging_remote(silent.url)), job_timeout=0.5)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        t0 = time.monotonic()
        r = client.post("/api/generate", json={"prompt": "x", **SMALL})
        assert r.status_code == 500 and "longer than the limit of 0.5 s" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 5


def test_the_encoder_timeout_bounds_a_call_to_a_hanging_remote_encoder(tmp_path, silent):
    server = live(tmp_path, engine=RemoteBackedEngine(hanging_remote(silent.url, timeout=0.5)))
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        t0 = time.monotonic()
        r = client.post("/api/encode", json={"prompt": "a cat"})
        assert r.status_code == 503, r.text
        assert "did not answer POST /api/encode within 0.5 s (zimage serve --encoder-timeout)" in \
            r.json()["error"]["message"]
        assert time.monotonic() - t0 < 5


def test_serve_checks_the_encoder_timeout(tmp_path):
    from click.testing import CliRunner

    from zimage_native.cli.serve import serve

    result = CliRunner().invoke(serve, ["--fake", "--data-dir", str(tmp_path), "--encoder-timeout", "0"])
    assert result.exit_code != 0 and "--encoder-timeout must be > 0" in result.output


# ------------------------------------------------------------------------------ 6, 7. input images
def encoded(image, fmt="PNG", **save) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_input_image_with_too_many_pixels_is_refused_before_decoding(tmp_path):
    from PIL import Image

    server = live(tmp_path, limits=Limits(min_side=32, max_side=512, max_pixels=512 * 512,
                                          max_upload_bytes=200_000, max_body_bytes=400_000))
    big = encoded(Image.new("RGB", (1300, 1300), (9, 9, 9)))  # a few kB of PNG, 1.69 megapixels decoded
    assert len(big) < 200_000
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/api/v1/capabilities").json()["limits"]["max_input_pixels"] == 6 * 512 * 512
        for field in ("image", "control_image"):
            r = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL, field: big})
            assert r.status_code == 413, r.text
            error = r.json()["error"]
            assert error["param"] == field and "1300x1300 (1690000 pixels); the limit is 1572864 pixels" in \
                error["message"]
        ok = encoded(Image.new("RGB", (1200, 1300), (9, 9, 9)))
        assert client.post("/api/v1/jobs", json={"prompt": "x", **SMALL, "image": ok}).status_code == 202


def test_input_images_are_shrunk_to_the_output_size_when_decoded():
    from PIL import Image

    from zimage_native.server.schemas import build_models, resolve_generation

    engine = FakeEngine()
    limits = Limits(min_side=32, max_side=512, max_pixels=512 * 512)
    models = build_models(limits, [t.name for t in engine.registry.list(None)], [])
    body = models.job(prompt="x", width=64, height=96, image=encoded(Image.new("RGB", (800, 1000), (200, 0, 0))),
                      mask=encoded(Image.new("L", (800, 1000), 255)),
                      control_image=encoded(Image.new("RGB", (900, 900), (0, 0, 200))))
    request = resolve_generation(body, engine, limits)
    assert request.image.size == request.mask_image.size == request.control_image.size == (64, 96)
    assert request.image.getpixel((10, 10)) == (200, 0, 0) and request.mask_image.mode == "L"


def sideways_jpeg(size=(96, 64), mode="RGB") -> str:
    """A JPEG stored landscape, left half dark, whose EXIF orientation 6 says: turn 90 degrees clockwise."""
    from PIL import Image

    image = Image.new(mode, size, 255 if mode == "L" else (255, 255, 255))
    image.paste(0 if mode == "L" else (0, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif, quality=95)


def test_exif_orientation_is_applied_to_every_input_image():
    from zimage_native.server.schemas import decode_image

    limits = Limits(min_side=32)
    for param, mode in (("image", "RGB"), ("mask", "L"), ("control_image", "RGB")):
        upright = decode_image(sideways_jpeg(mode=mode), limits, param)
        assert upright.size == (64, 96), param  # portrait, as the photo was taken
        top, bottom = upright.convert("L").getpixel((32, 10)), upright.convert("L").getpixel((32, 85))
        assert top < 50 and bottom > 200, (param, top, bottom)  # the dark half is now on top


def test_a_sideways_photo_gives_a_portrait_image(tmp_path):
    server = live(tmp_path)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "image": sideways_jpeg()}).json()
        image = follow(client, job["events_url"], timeout=10)[-1].data["images"][0]
        assert (image["width"], image["height"]) == (64, 96)


# ------------------------------------------------------------------------------ 8. --ray without GPUs
def ray_options(*args):
    from zimage_native.cli.serve import serve

    return serve.make_context("serve", ["--ray", "--fake", *args]).params


def test_serve_ray_refuses_replicas_a_local_cluster_cannot_place():
    from zimage_native.cli.serve import plan_ray_replicas

    with pytest.raises(ValueError, match=r"wait forever for GPUs: 1 replica x --gpus-per-replica 1 = 1 GPUs, and "
                                         r"this Ray cluster has 0; to run on the CPU .* pass --gpus-per-replica 0"):
        plan_ray_replicas(ray_options(), 0)
    with pytest.raises(ValueError, match=r"3 replicas x --gpus-per-replica 1 = 3 GPUs, and this Ray cluster has 2; "
                                         r"ask for fewer replicas"):
        plan_ray_replicas(ray_options("--replicas", "3"), 2)
    with pytest.raises(ValueError, match="2 replicas"):
        plan_ray_replicas(ray_options("--min-replicas", "2", "--max-replicas", "4"), 1)
    with pytest.raises(ValueError, match="--gpus-per-replica must be >= 0"):
        plan_ray_replicas(ray_options("--gpus-per-replica", "-1"), 4)


def test_serve_ray_plans_replicas_that_fit():
    from zimage_native.cli.serve import plan_ray_replicas

    assert plan_ray_replicas(ray_options("--gpus-per-replica", "0"), 0) == (
        {**ray_options("--gpus-per-replica", "0"), "replicas": 1}, None)
    assert plan_ray_replicas(ray_options(), 4)[0]["replicas"] == 4  # one per GPU
    assert plan_ray_replicas(ray_options("--gpus-per-replica", "2"), 5)[0]["replicas"] == 2
    options, warning = plan_ray_replicas(ray_options("--ray-address", "ray://head:10001"), 0)
    assert options["replicas"] == 1 and "wait until the Ray cluster has the GPUs" in warning  # it may autoscale


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "Error: --replicas must be >= 1, got 0"),
    (["--replicas", "-1"], "Error: --replicas must be >= 1, got -1"),
    (["--min-replicas", "3", "--max-replicas", "2"], "Error: need 1 <= min_replicas <= max_replicas, got 3 and 2"),
])
def test_serve_ray_refuses_replica_counts_before_starting_ray(monkeypatch, args, message):
    """--replicas 0 was deployed as one replica (``options.get("replicas") or 1``), and -1 or a minimum
    above the maximum were refused only once Ray and Serve had started. Now status 1 before Ray starts."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from click.testing import CliRunner

    from zimage_native.cli import main

    def started(*args, **kwargs):
        raise AssertionError("ray.init ran")

    monkeypatch.setattr(ray, "init", started)
    result = CliRunner().invoke(main, ["serve", "--ray", "--fake", *args])
    assert (result.exit_code, result.output.strip()) == (1, message), (result.output, result.exception)


# ------------------------------------------------------------------------------ 9. --max-history below n
def test_max_history_never_prunes_the_images_of_the_job_that_made_them(tmp_path):
    server = live(tmp_path, max_history=1)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL, "n": 3}).json()
        images = follow(client, job["events_url"], timeout=10)[-1].data["images"]
        assert len(images) == 3
        assert all(client.get(image["url"]).status_code == 200 for image in images)
        assert client.get("/api/v1/images").json()["total"] == 3
        later = client.post("/api/v1/jobs", json={"prompt": "y", **SMALL}).json()
        follow(client, later["events_url"], timeout=10)
        history = client.get("/api/v1/images").json()
        assert history["total"] == 1 and history["items"][0]["job_id"] == later["id"]
        assert all(client.get(image["url"]).status_code == 404 for image in images)


# ------------------------------------------------------------------------------ 10. a template's size and the limits
def test_a_template_size_is_fitted_to_the_limits(tmp_path):
    server = live(tmp_path, limits=Limits(min_side=32, max_side=512, max_pixels=512 * 512))
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        # architecture-archviz suggests 1344x768: over max_side 512; shrunk keeping 7:4, in multiples of 16.
        job = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 1, "template": "architecture-archviz"})
        assert job.status_code == 202, job.text
        params = job.json()["params"]
        assert (params["width"], params["height"]) == (512, 288)
        # A side the request sent still counts; the other comes from the template, within the limits.
        params = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 1, "width": 256,
                                                   "template": "architecture-archviz"}).json()["params"]
        assert (params["width"], params["height"]) == (256, 512)
        # Explicit sizes are still checked as sent.
        r = client.post("/api/v1/jobs", json={"prompt": "x", "size": "1024x512", "template": "architecture-archviz"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "size"  # the field sent, not "width"
        assert "the width of 1024x512 must be between" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------ 11. a synchronous client that leaves
@pytest.mark.parametrize("route", ["/api/generate", "/v1/images/generations"])
def test_a_synchronous_job_is_cancelled_when_its_client_disconnects(tmp_path, route):
    server = live(tmp_path, engine=FakeEngine(step_delay=0.1))
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"prompt": "x", "size": "64x64", "num_inference_steps": 40} if route == "/v1/images/generations" else \
            {"prompt": "x", "width": 64, "height": 64, "steps": 40}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + route, json=body, timeout=0.8)  # the client gives up and hangs up
        job_id = client.get("/api/v1/jobs").json()["jobs"][0]["id"]
        job = wait_status(client, job_id, timeout=4)  # 40 steps would take 4 s
        assert job["status"] == "cancelled" and job["progress"]["step"] < 35, job
