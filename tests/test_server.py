"""The generation server with the fake engine: every route, SSE order, cancel, 429, auth, validation,
path safety, the OpenAI client, history persistence and start-up repair."""

from __future__ import annotations

import base64
import io
import json
import os
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from zimage_native.server import FakeEngine, Limits, ServerSettings, create_app  # noqa: E402
from zimage_native.sampling import unused_negative_advice  # noqa: E402
from zimage_native.server.engine import seed_colour  # noqa: E402
from zimage_native.server.remote import features_from_bytes  # noqa: E402
from zimage_native.server.sse import follow  # noqa: E402
from zimage_native.server.testing import LiveServer  # noqa: E402

SMALL = dict(width=64, height=64)


def settings_for(path, **kw) -> ServerSettings:
    limits = kw.pop("limits", None) or Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50,
                                              max_images=4, max_prompt_chars=200, max_upload_bytes=200_000,
                                              max_body_bytes=400_000)
    return ServerSettings(data_dir=path, limits=limits, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = FakeEngine(step_delay=0.01)
    app = create_app(engine, settings_for(tmp_path_factory.mktemp("server-data"), queue_size=4))
    with LiveServer(app) as live:
        live.engine = engine
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def submit(client, **body):
    body = {"prompt": "a red fox", **SMALL, "steps": 3, **body}
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def run_job(client, **body):
    job = submit(client, **body)
    events = follow(client, job["events_url"])
    return job, events


def png_bytes(color=(10, 20, 30), size=(96, 80), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- basics
def test_health_and_capabilities(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "fake"
    caps = client.get("/api/v1/capabilities").json()
    assert caps["variant"] == "turbo" and caps["defaults"]["steps"] == 8
    assert caps["limits"]["min_side"] == 32 and caps["queue"]["capacity"] == 5
    assert caps["features"]["generate"] and caps["text_encoder"]["hidden_size"] == 32
    assert all(32 <= p["width"] <= 512 for p in caps["presets"]) and caps["presets"]
    assert client.get("/openapi.json").json()["paths"]["/api/v1/jobs"]
    assert client.head("/health").status_code == 200 and client.head("/").status_code == 200  # curl -I, monitors


def test_job_events_arrive_in_order(client, server):
    import threading

    release = threading.Event()
    generate = server.engine.generate

    def held(request, callback):  # the job cannot end before its 202 answer is read
        assert release.wait(30)
        return generate(request, callback)

    server.engine.generate = held
    try:
        job = submit(client, steps=4, n=2, seed=7)
    finally:
        release.set()
        del server.engine.generate
    events = follow(client, job["events_url"])
    assert job["status"] in ("queued", "running") and job["queue_position"] == 0
    assert [e.type for e in events] == ["queued", "started"] + ["progress"] * 4 + ["completed"]
    assert [e.id for e in events] == list(range(1, 8))
    assert [(e.data["step"], e.data["total"]) for e in events if e.type == "progress"] == [(i, 4) for i in range(1, 5)]
    images = events[-1].data["images"]
    assert [i["seed"] for i in images] == [7, 8] and [i["index"] for i in images] == [0, 1]
    got = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert got["status"] == "completed" and got["progress"] == {"step": 4, "total": 4}
    assert [i["id"] for i in got["images"]] == [i["id"] for i in images]
    png = client.get(images[1]["url"])
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.size == (64, 64) and im.getpixel((5, 5)) == seed_colour(8)
        meta = json.loads(im.info["zimage"])
        assert meta["seed"] == 8 and meta["prompt"] == "a red fox" and "Seed: 8" in im.info["parameters"]
    # Resuming after an event id replays only what came later; a finished job with nothing left answers 204.
    with client.stream("GET", job["events_url"], headers={"Last-Event-ID": "5"}) as r:
        text = r.read().decode()
    assert "id: 6\n" in text and "id: 5\n" not in text and "event: completed" in text
    assert client.get(job["events_url"], headers={"Last-Event-ID": "7"}).status_code == 204


def test_formats_thumbnail_and_job_list(client):
    _, events = run_job(client)
    image = events[-1].data["images"][0]
    for fmt, media in (("jpeg", "image/jpeg"), ("webp", "image/webp")):
        r = client.get(image["url"], params={"format": fmt})
        assert r.status_code == 200 and r.headers["content-type"] == media
        Image.open(io.BytesIO(r.content)).verify()
    assert client.get(image["url"], params={"format": "gif"}).status_code == 422
    thumb = client.get(image["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg"
    jobs = client.get("/api/v1/jobs").json()["jobs"]
    assert image["job_id"] in [j["id"] for j in jobs]


def test_failed_job_reports_the_error(client):
    job, events = run_job(client, prompt="please [fail] now", steps=3)
    assert [e.type for e in events] == ["queued", "started", "progress", "failed"]
    assert "asked to fail" in events[-1].data["error"]
    got = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert got["status"] == "failed" and "asked to fail" in got["error"] and got["images"] == []


def test_cancel_a_running_job_between_steps(client, server):
    import threading

    server.engine.step_delay = 0.03
    answered = threading.Event()
    generate = server.engine.generate

    def held(request, callback):  # the job waits after step 2 until its cancel was answered
        def on_step(step, total):
            callback(step, total)
            if step == 2:
                assert answered.wait(30)
        return generate(request, on_step)

    server.engine.generate = held
    try:
        job = submit(client, steps=40)
        sent = []

        def on_event(event):
            if event.type == "progress" and event.data["step"] == 2 and not sent:
                r = client.post(f"/api/v1/jobs/{job['id']}/cancel")
                sent.append(r)
                answered.set()

        events = follow(client, job["events_url"], on_event)
    finally:
        answered.set()
        del server.engine.generate
        server.engine.step_delay = 0.01
    assert sent and sent[0].status_code == 200 and sent[0].json()["cancel_requested"] is True
    types = [e.type for e in events]
    assert types[:2] == ["queued", "started"] and types[-1] == "cancelled" and "completed" not in types
    steps = [e.data["step"] for e in events if e.type == "progress"]
    assert 2 <= steps[-1] < 40 and events[-1].data["step"] == steps[-1]
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 409
    assert client.post("/api/v1/jobs/jdeadbeefdeadbeefdead/cancel").status_code == 404


def test_queue_full_answers_429_with_retry_after(tmp_path):
    import threading

    release = threading.Event()

    class Held(FakeEngine):  # the running job holds its place until the test lets it go
        def generate(self, request, callback):
            def held(step, total):
                callback(step, total)
                assert release.wait(30)
            return super().generate(request, held)

    engine = Held()
    with LiveServer(create_app(engine, settings_for(tmp_path, queue_size=1))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        accepted = [submit(c, steps=50) for _ in range(2)]
        r = c.post("/api/v1/jobs", json={"prompt": "one more", **SMALL})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        body = r.json()["error"]
        assert body["type"] == "queue_full" and "queue is full" in body["message"]
        # A waiting job is cancelled at once (its events end), which frees a place.
        waiting = accepted[1]
        assert c.get(f"/api/v1/jobs/{waiting['id']}").json()["queue_position"] == 1
        assert c.post(f"/api/v1/jobs/{waiting['id']}/cancel").json()["status"] == "cancelled"
        assert [e.type for e in follow(c, waiting["events_url"])] == ["queued", "cancelled"]
        third = submit(c, steps=2)
        for job in (accepted[0], third):
            c.post(f"/api/v1/jobs/{job['id']}/cancel")
        release.set()
        assert follow(c, third["events_url"])[-1].type == "cancelled"


def test_warmup_job_timeout_and_history_pruning(tmp_path):
    # The limit counts from the job's start (its row written, its tokens counted): the short jobs
    # below must stay under it on a loaded machine too, so it is 1 s, and they take no step time.
    engine = FakeEngine(step_delay=0.05)
    settings = settings_for(tmp_path, job_timeout=1.0, max_history=2)
    with LiveServer(create_app(engine, settings, warmup=True)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        assert list(engine.calls) == ["warmup@zimage-worker"]  # before the server listened
        job, events = run_job(c, steps=40)  # 2 s of steps
        assert events[-1].type == "failed" and "longer than the limit of 1 s" in events[-1].data["error"]
        engine.step_delay = 0.0
        for seed in (1, 2, 3):
            assert run_job(c, seed=seed, steps=1)[1][-1].type == "completed"
        assert [i["seed"] for i in c.get("/api/history").json()["items"]] == [3, 2]
        assert len(list((tmp_path / "images").rglob("*.png"))) == 2


def test_a_completed_job_finds_the_history_already_pruned(tmp_path, monkeypatch):
    """The images beyond max_history are deleted before the job's "completed" event, so a client that
    lists the history or the files right after it sees them pruned (a slow disk stands in here)."""
    from zimage_native.server import storage

    unlink = storage.Storage._unlink

    def slow_unlink(self, *relatives):
        time.sleep(0.3)
        unlink(self, *relatives)

    monkeypatch.setattr(storage.Storage, "_unlink", slow_unlink)
    settings = settings_for(tmp_path, max_history=1)
    with LiveServer(create_app(FakeEngine(step_delay=0.0), settings)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        for seed in (1, 2):
            run_job(c, seed=seed, steps=1)
            assert len(list((tmp_path / "images").rglob("*.png"))) == 1


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("body, param, words", [
    ({"width": 65}, "width", "multiple of 16"),
    ({"width": 1024}, "width", "between 32 and 512"),
    ({"steps": 0}, "steps", "between 1 and 50"),
    ({"n": 9}, "n", "between 1 and 4"),
    ({"prompt": "x" * 201}, "prompt", "limit is 200"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({"guidance_scale": -1}, "guidance_scale", "between 0"),
    ({"seed": [1, 2], "n": 3}, "seed", "2 seeds for n=3"),
    ({"seed": -5}, "seed", "between -1"),
    ({"seed": [3, -1]}, "seed.1", "between 0"),  # -1 means random for one seed only
    ({"template": "no-such-template"}, "template", "no-such-template"),
    ({"template": "rewriter-cinematic"}, "template", "is a rewriter: its system prompt instructs the prompt rewriter"),
    ({"size": "64x64"}, "size", "either size or width"),
    ({"colour": "red"}, "colour", "Extra inputs"),
    ({"steps": "many"}, "steps", "valid integer"),
    ({"image": "not base64!!"}, "image", "not valid base64"),
    ({"image": base64.b64encode(b"hello").decode()}, "image", "cannot be read"),
    ({"max_sequence_length": 5000}, "max_sequence_length", "between 1 and"),
    ({"shift": 0}, "shift", "> 0"),
    ({"seed_variance": -1}, "seed_variance", "between 0"),
    ({"seed_variance": 20, "seed_variance_share": 0}, "seed_variance_share", "> 0"),
    ({"first_block_cache": -1}, "first_block_cache", "between 0"),
    # settings that would change nothing (they were ignored silently)
    ({"strength": 0.5}, "strength", "needs an image"),
    ({"control_scale": 0.5}, "control_scale", "needs a control_image"),
    ({"seed_variance_share": 0.3}, "seed_variance_share", "needs seed_variance > 0"),
    ({"seed_variance": 0, "seed_variance_steps": 0.5}, "seed_variance_steps", "needs seed_variance > 0"),
])
def test_validation_errors_are_clear_json(client, body, param, words):
    r = client.post("/api/v1/jobs", json={"prompt": "a cat", **SMALL, **body})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("route", ["/v1/images/generations", "/api/v1/jobs"])
def test_a_bad_size_is_blamed_on_size_not_on_width(client, route):
    """A request that sends only ``size`` was told "width: must be a multiple of 16"."""
    for size, words in (("1000x1008", "the width of 1000x1008 must be a multiple of 16, got 1000"),
                        ("64x1024", "the height of 64x1024 must be between 32 and 512, got 1024")):
        r = client.post(route, json={"prompt": "a cat", "size": size})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == "size" and words in error["message"], error


def test_malformed_json_and_oversized_bodies(client):
    r = client.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    r = client.post("/api/v1/jobs", content=b"x" * 500_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks():  # no Content-Length: the middleware counts the bytes
        for _ in range(50):
            yield b" " * 10_000

    r = client.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    big = base64.b64encode(b"\0" * 250_000).decode()
    r = client.post("/api/v1/jobs", json={"prompt": "a", **SMALL, "image": big})
    assert r.status_code == 413 and r.json()["error"]["param"] == "image"


def test_img2img_input(client):
    data = "data:image/png;base64," + base64.b64encode(png_bytes(size=(100, 70))).decode()
    job, events = run_job(client, image=data, strength=0.5, steps=4, width=None, height=None)
    assert events[-1].type == "completed"
    image = events[-1].data["images"][0]
    assert (image["width"], image["height"]) == (96, 64)  # the input's size, down to multiples of 16
    assert job["params"]["img2img"] is True and job["params"]["strength"] == 0.5
    r = client.post("/api/v1/jobs", json={"prompt": "a", **SMALL, "image": data, "strength": 0.0, "steps": 4})
    assert r.status_code == 422 and "leaves no step" in r.json()["error"]["message"]


def test_paths_never_come_from_user_input(client, server):
    _, events = run_job(client)
    good = events[-1].data["images"][0]["id"]
    for bad in ("..%2F..%2Fhistory.sqlite3", "..", "%2e%2e", good + ".png", "../" + good, "j0-0", good + "%00"):
        r = client.get(f"/api/v1/images/{bad}")
        assert r.status_code in (404, 422), bad  # 422: not an image id (checked before any look-up)
        assert b"SQLite" not in r.content
        assert client.delete(f"/api/history/{bad}").status_code in (404, 405, 422), bad
    for bad in ("/static/../app.py", "/static/..%2F..%2Fapp.py", "/static/%2e%2e/jobs.py"):
        r = client.get(bad)
        assert r.status_code == 404 and b"import" not in r.content, bad
    assert client.get("/api/embeddings/..%2Fhistory.sqlite3").status_code == 404
    # Everything the server wrote lies under its data folder with server-made names.
    root = server.app.state.storage.root
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root)


# ---------------------------------------------------------------------------------------------- history
def test_history_list_delete_and_clear(tmp_path):
    with LiveServer(create_app(FakeEngine(), settings_for(tmp_path))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        for seed in (1, 2, 3):
            run_job(c, seed=seed, steps=1)
        items = c.get("/api/history").json()["items"]
        assert [i["seed"] for i in items] == [3, 2, 1]  # newest first
        assert c.get("/api/v1/images", params={"limit": 1, "offset": 1}).json()["items"][0]["seed"] == 2
        r = c.delete(f"/api/history/{items[0]['id']}")
        assert r.json() == {"deleted": items[0]["id"]}
        assert c.get(items[0]["url"]).status_code == 404
        r = c.delete("/api/history/0")  # the deprecated positional alias (index into the newest-first list)
        assert r.json()["deleted"] == items[1]["id"] and r.headers["Deprecation"] == "true"
        assert c.delete("/api/history/7").status_code == 404
        assert c.delete(f"/api/v1/images/{items[2]['id']}").json() == {"deleted": items[2]["id"]}
        run_job(c, seed=4, steps=1)
        assert c.delete("/api/history").json() == {"deleted": 1}
        assert c.get("/api/history").json() == {"items": [], "total": 0, "limit": 100, "offset": 0}
        files = [p for p in (tmp_path / "images").rglob("*") if p.is_file()]
        files += [p for p in (tmp_path / "thumbs").rglob("*") if p.is_file()]
        assert files == []


def test_history_survives_a_restart(tmp_path):
    with LiveServer(create_app(FakeEngine(), settings_for(tmp_path))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        job, events = run_job(c, seed=11, n=2, steps=1)
        before = c.get("/api/history").json()
    with LiveServer(create_app(FakeEngine(), settings_for(tmp_path))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        after = c.get("/api/history").json()
        assert after == before and after["total"] == 2
        assert [i["index"] for i in after["items"]] == [0, 1]  # a job's images together, in order
        got = c.get(f"/api/v1/jobs/{job['id']}").json()
        assert got["status"] == "completed" and len(got["images"]) == 2
        assert c.get(after["items"][0]["url"]).status_code == 200
        # The events of a job from before the restart: its terminal event, from the database.
        events = follow(c, f"/api/v1/jobs/{job['id']}/events")
        assert [e.type for e in events] == ["completed"] and len(events[0].data["images"]) == 2


def test_start_up_repairs_what_a_crash_leaves(tmp_path):
    from zimage_native.metadata import png_info
    from zimage_native.server.storage import Storage, write_atomic

    store = Storage(tmp_path)
    image = Image.new("RGB", (32, 32), (1, 2, 3))
    store.insert_job("j" + "a" * 20, "generate", {"prompt": "p"}, time.time(), status="running")
    store.insert_job("j" + "b" * 20, "generate", {"prompt": "q"}, time.time(), status="queued")
    kept = store.save_image("j" + "a" * 20, 0, image, {"prompt": "p", "seed": 5})
    # A file renamed into place just before the crash, whose row was never inserted: adopted.
    day = kept["file"].split("/")[1]
    orphan = tmp_path / "images" / day / f"j{'a' * 20}-1.png"
    write_atomic(orphan, lambda f: image.save(f, format="PNG", pnginfo=png_info({"prompt": "p", "seed": 6})))
    # A file of an unknown job, a half-written temporary file, a row whose file is gone.
    stranger = tmp_path / "images" / day / f"j{'c' * 20}-0.png"
    stranger.write_bytes(orphan.read_bytes())
    (tmp_path / "images" / day / ".x.png.1234.tmp").write_bytes(b"partial")
    gone = store.save_image("j" + "a" * 20, 2, image, {"prompt": "p", "seed": 7})
    (tmp_path / gone["file"]).unlink()
    store.close()

    store = Storage(tmp_path)
    report = store.reconcile()
    assert report["failed"] == 1 and report["cancelled"] == 1 and report["adopted"] == 1
    assert report["orphans_removed"] == 1 and report["tmp_removed"] == 1 and report["rows_dropped"] == 1
    assert store.get_job("j" + "a" * 20)["status"] == "failed"
    assert store.get_job("j" + "b" * 20)["status"] == "cancelled"
    rows = store.list_images()
    assert sorted(r["seed"] for r in rows) == [5, 6]
    for row in rows:
        assert store.image_file(row).is_file() and store.thumb_file(row).is_file()
    assert not stranger.exists() and not list(tmp_path.rglob("*.tmp"))
    assert store.reconcile() == dict.fromkeys(report, 0)  # a second pass finds nothing to do
    store.close()


# ---------------------------------------------------------------------------------------------- OpenAI
def test_openai_client_b64_json_and_url(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a lighthouse", n=2, size="64x48", response_format="b64_json",
                                    extra_body={"num_inference_steps": 2, "seed": 21, "negative_prompt": "fog",
                                                "guidance_scale": 0.0})
    assert len(result.data) == 2
    with Image.open(io.BytesIO(base64.b64decode(result.data[1].b64_json))) as im:
        assert im.size == (64, 48) and im.getpixel((0, 0)) == seed_colour(22)
        assert json.loads(im.info["zimage"])["negative_prompt"] == "fog"
    result = client.images.generate(prompt="a lighthouse", size="64x64", response_format="url",
                                    output_format="jpeg", extra_body={"num_inference_steps": 1, "seed": 3})
    url = result.data[0].url
    assert url.startswith(server.url + "/api/v1/images/") and url.endswith("?format=jpeg")
    r = httpx.get(url)
    assert r.headers["content-type"] == "image/jpeg"
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt="a", size="65x64")
    r = httpx.post(server.url + "/v1/images/generations",
                   json={"prompt": "a", "size": "64x64", "quality": "hd", "style": "vivid", "user": "u",
                         "num_inference_steps": 1})
    assert r.status_code == 200 and r.json()["size"] == "64x64" and r.json()["output_format"] == "png"


def test_a_job_says_what_other_tools_habits_cost_here(client):
    # The fake engine is a Turbo model: ComfyUI's cfg 1 (guidance 1 here turns CFG on), a negative
    # prompt with CFG off, and the model card's 9 steps each get a sentence in the job's "advice".
    job = client.post("/api/v1/jobs", json={"prompt": "a cat", **SMALL, "steps": 9, "guidance_scale": 1.0}).json()
    assert len(job["advice"]) == 2 and "In ComfyUI and stable-diffusion.cpp cfg 1 means off" in job["advice"][0]
    assert "9 steps run 9 DiT forwards" in job["advice"][1]
    job = client.post("/api/v1/jobs", json={"prompt": "a cat", **SMALL, "steps": 2, "negative_prompt": "fog"}).json()
    assert job["advice"] == [unused_negative_advice(True, 0.0)]
    assert client.post("/api/v1/jobs", json={"prompt": "a cat", **SMALL, "steps": 2}).json()["advice"] == []
    assert client.get(job["url"]).json()["advice"] == job["advice"]


def test_seed_minus_one_draws_a_random_seed_as_a1111_does(client):
    # A1111's API and most UIs send -1 for "random"; it was refused with a 422
    drawn = []
    for _ in range(2):
        r = client.post("/api/generate", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "seed": -1})
        assert r.status_code == 200, r.text
        drawn.append(r.json()["seed"])
    job = client.post("/api/v1/jobs", json={"prompt": "a cat", **SMALL, "steps": 1, "seed": -1, "n": 2}).json()
    drawn += job["params"]["seeds"]
    assert all(0 <= s < 2**63 for s in drawn) and len(set(drawn)) == 4, drawn
    r = client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64", "seed": -1})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- predecessor routes
def test_legacy_generate(client):
    r = client.post("/api/generate", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 42,
                                           "system_prompt": "You are a painter.", "shift": 3.0, "unknown": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 42 and body["image"].startswith("data:image/png;base64,")
    assert body["formatted_prompt"].startswith("<|im_start|>system\nYou are a painter.")
    with Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1]))) as im:
        assert im.getpixel((0, 0)) == seed_colour(42)


def test_encode_returns_safetensors_with_dtype_and_shape(tmp_path):
    engine = FakeEngine(dtype=torch.bfloat16, hidden_size=24)
    with LiveServer(create_app(engine, settings_for(tmp_path))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/api/encode", json={"prompt": ["ab", "hello"], "system_prompt": "S"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        features, meta = features_from_bytes(r.content)
        texts = json.loads(meta["texts"])
        assert texts[0] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
        expected = engine.encode(texts)
        assert [f.dtype for f in features] == [torch.bfloat16] * 2
        assert [tuple(f.shape) for f in features] == [tuple(e.shape) for e in expected]
        assert all(torch.equal(f, e) for f, e in zip(features, expected))
        assert json.loads(meta["token_counts"]) == [e.shape[0] for e in expected]
        # A template is applied (it was ignored: the features of the bare prompt came back).
        r = c.post("/api/encode", json={"prompt": "ab", "template": "film-noir"})
        assert json.loads(features_from_bytes(r.content)[1]["texts"]) == engine.format_prompts(["ab"], "film-noir")
        assert "film noir" in engine.format_prompts(["ab"], "film-noir")[0].lower()
        # Pre-formatted texts are encoded as given; max_sequence_length cuts them.
        r = c.post("/api/encode", json={"texts": ["raw text"], "max_sequence_length": 3})
        (only,), _ = features_from_bytes(r.content)
        assert only.shape == (3, 24)
        for body, words in (({"texts": ["a"], "prompt": "b"}, "exactly one"), ({}, "exactly one"),
                            ({"texts": ["a"], "template": "film-noir"}, "no prompt fields"),
                            ({"texts": ["a"], "template": "x"}, "unknown template"),
                            ({"texts": ["a"] * 17}, "at most 16"),
                            ({"prompt": "a", "template": "no-such"}, "no-such"),
                            ({"prompt": "a", "template": "rewriter-cinematic"}, "is a rewriter")):
            r = c.post("/api/encode", json=body)
            assert r.status_code == 422 and words in r.json()["error"]["message"], (body, r.text)
        r = c.post("/api/tokenize", json={"texts": ["abc", "de"], "max_sequence_length": 2})
        assert r.json() == {"input_ids": [[97, 98], [100, 101]], "token_counts": [2, 2], "full_token_counts": [3, 2]}
        saved = c.post("/api/save-embeddings", json={"prompt": "ab"}).json()
        assert saved["count"] == 1
        download = c.get(saved["url"])
        features, _ = features_from_bytes(download.content)
        assert features[0].dtype == torch.bfloat16
        assert c.get("/api/embeddings/e" + "0" * 20).status_code == 404


def test_prompt_routes(client, server):
    r = client.post("/api/format-prompt", json={"prompt": "a cat", "thinking_content": "orange", "tokens": True})
    body = r.json()
    assert body["formatted_prompt"] == ("<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
                                        "<think>\norange\n</think>\n\n")
    assert body["token_count"] == len(body["formatted_prompt"].encode()) == len(body["token_ids"])
    templates = client.get("/api/templates").json()
    assert len(templates["templates"]) > 50 and "rewriter" in templates["categories"]
    assert all("path" not in t for t in templates["templates"])
    name = next(t["name"] for t in templates["templates"] if t["category"] != "rewriter")
    r = client.post("/api/format-prompt", json={"prompt": "x", "template": name})
    assert r.status_code == 200
    system = next(t["system_prompt"] for t in templates["templates"] if t["name"] == name)
    assert r.json()["formatted_prompt"].startswith(f"<|im_start|>system\n{system}<|im_end|>\n")  # (was ignored)
    only = client.get("/api/templates", params={"category": "rewriter"}).json()["templates"]
    assert only and all(t["category"] == "rewriter" for t in only)
    assert client.get("/api/templates", params={"category": "nope"}).status_code == 422
    rewriters = client.get("/api/rewriters").json()
    assert rewriters["available"] and [t["name"] for t in rewriters["rewriters"]] == [t["name"] for t in only]
    r = client.post("/api/rewrite", json={"prompt": "a cat", "rewriter": only[0]["name"], "seed": 1})
    assert r.json()["rewritten"] == f"a cat, rewritten ({only[0]['name']})"
    assert client.post("/api/rewrite", json={"prompt": "a", "max_new_tokens": 0}).status_code == 422
    assert client.post("/api/rewrite", json={"prompt": "a", "rewriter": "nope"}).status_code == 422
    # Model calls run on the worker thread, in order with the jobs.
    assert "rewrite@zimage-worker" in server.engine.calls
    assert {c.split("@")[1] for c in server.engine.calls} == {"zimage-worker"}


def test_encoder_only_server_refuses_generation(tmp_path):
    engine = FakeEngine()
    engine.can_generate = False
    with LiveServer(create_app(engine, settings_for(tmp_path))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/api/v1/jobs", json={"prompt": "a", **SMALL})
        assert r.status_code == 503 and "text encoder only" in r.json()["error"]["message"]
        assert c.post("/v1/images/generations", json={"prompt": "a"}).status_code == 503
        assert c.post("/api/encode", json={"texts": ["a"]}).status_code == 200
        assert c.get("/api/v1/capabilities").json()["features"]["generate"] is False


# ---------------------------------------------------------------------------------------------- auth
def test_token_is_required_everywhere_but_health(tmp_path):
    token = "s3cret-token"
    app = create_app(FakeEngine(), settings_for(tmp_path, token=token))
    open_paths = {"/health", "/", "/favicon.ico", "/api/v1/login"}
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        checked = 0
        for route in app.routes:
            path = getattr(route, "path", None)
            methods = getattr(route, "methods", None) or {"GET"}
            if path is None or path in open_paths:
                continue
            concrete = (path.replace("{job_id}", "j" + "0" * 20).replace("{image_id}", "j" + "0" * 20 + "-0")
                        .replace("{embedding_id}", "e" + "0" * 20).replace("{ref}", "0")
                        .replace("{path:path}", "style.css"))
            if path == "/static":
                continue
            for method in methods - {"HEAD", "OPTIONS"}:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + token}):
                    r = c.request(method, concrete, headers=headers, json={})
                    assert r.status_code == 401, (method, concrete, headers, r.status_code)
                    assert r.headers["www-authenticate"] == "Bearer"
                checked += 1
        assert checked >= 25
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        good = {"Authorization": f"Bearer {token}"}
        assert c.get("/api/v1/capabilities", headers=good).json()["auth"] is True
        with httpx.Client(base_url=live.url, timeout=30) as browser:  # the page's cookie login
            assert browser.post("/api/v1/login", json={"token": "nope"}).status_code == 401
            r = browser.post("/api/v1/login", json={"token": token})
            assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
            assert "samesite=strict" in r.headers["set-cookie"].lower()
            assert browser.get("/api/history").status_code == 200


def test_constant_time_comparison_is_used(monkeypatch):
    import hmac

    from zimage_native.server import middleware as app_module

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    gate = app_module.LimitsAndAuth(None, token="abc", max_body=10)
    assert gate.authorized({"authorization": "Bearer abc"}) and not gate.authorized({"authorization": "Bearer abd"})
    signed = app_module.cookie_value("abc").encode()
    assert gate.authorized({"cookie": f"x=1; zimage_token={signed.decode()}"}) and not gate.authorized({})
    assert calls == [(b"abc", b"abc"), (b"abd", b"abc"), (signed, signed)]


# ---------------------------------------------------------------------------------------------- CLI
def test_serve_cli_checks_options_and_reads_profiles(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import importlib

    from zimage_native.cli import main

    serve_module = importlib.import_module("zimage_native.cli.serve")  # the package attribute is the command

    seen = {}
    monkeypatch.setattr(serve_module, "run_server", lambda o: seen.update(o))
    config = tmp_path / "z.toml"
    config.write_text('[default]\nsteps = 9\nwidth = 768\nqueue_size = 3\n\n[fast]\nport = 9001\nfake = true\n'
                      'compile = "blocks"\nimage = "in.png"\n')  # flag names; image is zimage generate's: skipped
    result = CliRunner().invoke(main, ["serve", "--config", str(config), "--profile", "fast", "--port", "9002"])
    assert result.exit_code == 0, result.output
    assert seen["queue_size"] == 3 and seen["port"] == 9002 and seen["fake"] is True
    assert seen["compile_mode"] == "blocks" and seen["host"] == "127.0.0.1"
    config.write_text("[default]\nbogus = 1\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 1 and "unknown key 'bogus'" in result.output
    result = CliRunner().invoke(main, ["serve", "--profile", "x"])  # alone: a profile of the shipped example
    assert result.exit_code == 1 and "config.example.toml: no profile [x]; its profiles are 12gb, 16gb, 8gb, h100," \
        in result.output

    monkeypatch.undo()  # the real run_server: these fail before anything is loaded or bound
    for args, words in ((["--queue-size", "-1"], "--queue-size"), (["--min-side", "8"], "--min-side"),
                        (["--encoder-only", "--encoder-url", "http://x"], "exclude each other")):
        # --port 0: the port check comes first, and the default 8000 may be in use (another job, the
        # user's server): "Error: --port 8000: cannot listen on 127.0.0.1:8000" instead of the refusal
        result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--port", "0", *args])
        assert result.exit_code == 1 and words in result.output, result.output


def test_a_port_in_use_and_an_unwritable_data_dir_fail_before_the_model_loads(tmp_path, monkeypatch):
    """Both used to surface only once the server started: after the model had loaded (minutes, GBs),
    as uvicorn's own message with exit status 3, or a PermissionError traceback."""
    import importlib
    import socket
    import tempfile

    from click.testing import CliRunner

    from zimage_native.cli import main

    serve_module = importlib.import_module("zimage_native.cli.serve")  # the package attribute is the command
    monkeypatch.setattr(serve_module, "build_engine", lambda o: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: --port {port}: cannot listen on 127.0.0.1:{port}" in result.output
    assert "pick another port with --port" in result.output

    def refuse(*args, **kwargs):  # a read-only folder (root passes chmod, so the refusal is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--port", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: --data-dir: cannot write in the folder {tmp_path / 'd'} (Permission denied)" in result.output


def test_a_damaged_history_database_is_refused_in_one_line_before_the_model_loads(tmp_path, monkeypatch):
    """A damaged history.sqlite3 crashed the start with sqlite3's traceback, after the model loaded."""
    import importlib

    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.server.storage import Storage

    serve_module = importlib.import_module("zimage_native.cli.serve")
    monkeypatch.setattr(serve_module, "build_engine", lambda o: pytest.fail("the model was loaded"))
    data = tmp_path / "d"
    data.mkdir()
    (data / "history.sqlite3").write_bytes(b"not a database, " * 512)
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(data), "--port", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: {data / 'history.sqlite3'} is not a readable history database (file is not a database); " \
           f"move it away" in result.output
    with pytest.raises(ValueError, match="is not a readable history database"):
        Storage(data)  # the library's way in says the same
    (data / "history.sqlite3").unlink()
    Storage(data).close()  # a missing history is a new one


def test_a_second_server_on_a_data_folder_in_use_is_refused_and_leaves_the_first_alone(tmp_path):
    """Two servers on one --data-dir (say one per GPU with the default folder): the second's start-up
    repair marked the first's running job failed and its waiting job cancelled, and deleted its
    temporary files and the images without a row yet. Now the second is refused, naming the first."""
    import threading

    from zimage_native.server.storage import DataDirInUse

    generating, release = threading.Event(), threading.Event()

    class Held(FakeEngine):  # the first job runs until the second server was refused
        def generate(self, request, callback):
            generating.set()
            assert release.wait(30)
            return super().generate(request, callback)

    with LiveServer(create_app(Held(), settings_for(tmp_path, queue_size=2))) as first, \
            httpx.Client(base_url=first.url, timeout=30) as client:
        running, waiting = submit(client, steps=2), submit(client, steps=2)
        try:
            assert generating.wait(30)
            with pytest.raises(DataDirInUse) as refused:
                create_app(FakeEngine(), settings_for(tmp_path))
            assert client.get(f"/api/v1/jobs/{running['id']}").json()["status"] == "running"
            assert client.get(f"/api/v1/jobs/{waiting['id']}").json()["status"] == "queued"
        finally:
            release.set()
        message = str(refused.value)
        assert f"the data folder {tmp_path} is in use by another zimage server (pid {os.getpid()} on " in message
        assert "give each server its own --data-dir, or serve several GPUs from one server with --ray" in message
        events = follow(client, running["events_url"])
        assert events[-1].type == "completed"
    # The first server stopped: its lock is released and the folder serves again.
    with LiveServer(create_app(FakeEngine(), settings_for(tmp_path))) as again, \
            httpx.Client(base_url=again.url, timeout=30) as client:
        assert client.get("/health").status_code == 200


def test_the_data_folder_lock_goes_with_a_killed_server_and_the_cli_names_the_holder(tmp_path, monkeypatch):
    """A server killed with SIGKILL leaves no stale lock; a live one is named (pid, address) by
    ``zimage serve`` before the model loads."""
    import importlib
    import signal
    import subprocess
    import sys

    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.server.storage import DataDirLock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from zimage_native.server.storage import DataDirLock; "
                               "lock = DataDirLock(sys.argv[1]); lock.note('http://127.0.0.1:8123/'); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        serve_module = importlib.import_module("zimage_native.cli.serve")
        monkeypatch.setattr(serve_module, "build_engine", lambda o: pytest.fail("the model was loaded"))
        result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path), "--port", "0"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"Error: the data folder {tmp_path} is in use by another zimage server (pid {holder.pid} on " in \
               result.output
        assert "http://127.0.0.1:8123/); give each server its own --data-dir" in result.output
        ray = pytest.importorskip("ray")  # --ray with a local cluster: refused before Ray starts
        monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
        result = CliRunner().invoke(main, ["serve", "--ray", "--fake", "--data-dir", str(tmp_path), "--port", "0"])
        assert result.exit_code == 1 and f"Error: the data folder {tmp_path} is in use" in result.output, \
            result.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    DataDirLock(tmp_path).release()  # free again once the holder is dead


def test_an_encoder_server_keeps_its_own_data_folder(tmp_path, monkeypatch):
    """An encoder server and the generation server it feeds, on one machine with the default
    folders: they must not share one (a data folder serves one server at a time)."""
    from zimage_native.cli.serve import build_settings, default_options

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    encoder = build_settings({**default_options(), "encoder_only": True}).data_dir
    assert encoder == tmp_path / "zimage-native" / "server-encoder"
    assert build_settings({**default_options(), "fake": True, "encoder_only": True}).data_dir.name == "server-fake"


@pytest.mark.parametrize("name", ["run#2", "what?", "100%25"])
def test_a_history_in_a_folder_with_uri_characters_is_read_where_it_is(tmp_path, name):
    """The read-only check opens the database by URI: '#', '?' and '%' in the folder's path are
    escaped (they cut the path short: a valid history was refused, or a stray empty database was
    created beside the folder and checked instead)."""
    from zimage_native.server.storage import Storage, check_history

    data = tmp_path / name
    Storage(data).close()
    before = sorted(p.name for p in tmp_path.iterdir())
    check_history(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == before == [name]


def test_fake_server_keeps_its_own_history_folder(tmp_path, monkeypatch):
    from zimage_native.cli.serve import build_settings, default_options

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    real = build_settings({**default_options(), "fake": False}).data_dir
    fake = build_settings({**default_options(), "fake": True}).data_dir
    assert real == tmp_path / "zimage-native" / "server"
    assert fake == tmp_path / "zimage-native" / "server-fake"
    chosen = build_settings({**default_options(), "fake": True, "data_dir": tmp_path / "mine"}).data_dir
    assert chosen == tmp_path / "mine"


def test_two_cancels_of_a_waiting_job_race_without_an_error(tmp_path):
    """The soak's one 500: a waiting job is taken off the queue under the lock and finished (stored)
    outside it; a second cancel (or the shutdown) arriving in between found it "queued" but not in the
    queue. Now the second call returns the job being cancelled, and the job ends cancelled once."""
    import threading

    from zimage_native.sampling import GenerationRequest
    from zimage_native.server.jobs import JobManager
    from zimage_native.server.storage import Storage

    storage = Storage(tmp_path)
    manager = JobManager(FakeEngine(), storage, settings_for(tmp_path, queue_size=4))  # no worker: jobs wait
    job = manager.submit(GenerationRequest(prompt="a cat", width=64, height=64, steps=1))
    inside, release = threading.Event(), threading.Event()
    finish = manager._finish

    def slow_finish(*args, **kwargs):  # the first cancel stops between the queue and the job's end
        inside.set()
        release.wait(10)
        return finish(*args, **kwargs)

    manager._finish = slow_finish
    first = threading.Thread(target=manager.cancel, args=(job.id,))
    first.start()
    assert inside.wait(10)
    manager._finish = finish
    second = manager.cancel(job.id)  # raised ValueError (deque.remove) before the fix: a 500
    assert second is job and job.cancel_requested
    release.set()
    first.join(10)
    assert job.status == "cancelled" and [e.type for e in job.events] == ["queued", "cancelled"]
    manager.stop()
