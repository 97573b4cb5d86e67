"""The server's contract at the edge: no 5xx for bad input, a JSON 500 with a logged request id for
the unexpected, a schema that states the limits the checks enforce, 405 with Allow, and the
inpainting and ControlNet inputs of the job API (with the fake engine)."""

from __future__ import annotations

import base64
import io
import logging

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from zimage_native.server import FakeEngine, Limits, ServerSettings, create_app  # noqa: E402
from zimage_native.server.engine import seed_colour  # noqa: E402
from zimage_native.server.sse import follow  # noqa: E402
from zimage_native.server.testing import LiveServer  # noqa: E402

LIMITS = Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4, max_prompt_chars=200,
                max_upload_bytes=200_000, max_body_bytes=400_000, max_sequence_length=600, max_control_scale=1.5)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = FakeEngine(step_delay=0.002)
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("contract"), limits=LIMITS, token="sekrit")
    with LiveServer(create_app(engine, settings)) as server:
        server.engine = engine
        yield server


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live.url, timeout=30, headers={"Authorization": "Bearer sekrit"}) as c:
        yield c


def b64png(color=(10, 20, 30), size=(96, 64), mode="RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(client, **body):
    r = client.post("/api/v1/jobs", json={"prompt": "a fox", "steps": 2, **body})
    assert r.status_code == 202, r.text
    events = follow(client, r.json()["events_url"])
    assert events[-1].type == "completed", events[-1]
    return r.json(), events[-1].data["images"]


# ---------------------------------------------------------------------------------------------- no 5xx
@pytest.mark.parametrize("path, param", [
    ("/api/v1/images?limit=-84223&offset=462859953504213184544768", "limit"),  # the 500
    ("/api/history?offset=43924431711699591168&limit=100", "offset"),
    ("/api/v1/images?limit=0", "limit"), ("/api/v1/images?offset=-1", "offset"), ("/api/v1/jobs?limit=501", "limit"),
    ("/api/v1/jobs/not-a-job", "job_id"), ("/api/v1/jobs/j0000000000000000000z/events", "job_id"),
    ("/api/v1/jobs/j00000000000000000000/events?after=-1", "after"), ("/api/v1/images/j0-0/thumbnail", "image_id"),
    ("/api/v1/images/j00000000000000000000-0?format=gif", "format"), ("/api/embeddings/e1", "embedding_id"),
    ("/api/templates?category=nope", "category"),
])
def test_bad_parameters_are_422_naming_them(client, path, param):
    r = client.get(path)
    assert r.status_code == 422, (path, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_bad_header_and_bad_json_name_what_is_wrong(client):
    r = client.get("/api/v1/jobs/j00000000000000000000/events", headers={"Last-Event-ID": "abc"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "last-event-id", r.text
    r = client.post("/api/v1/jobs", content=b'{"prompt": "a",,}', headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "body" and "not valid JSON" in error["message"], error
    r = client.post("/api/v1/jobs", json=["not", "an", "object"])
    assert r.status_code == 422 and r.json()["error"]["param"] == "body", r.text
    # Strict JSON types: "5" is not 5, 1 is not true.
    for body, param in (({"steps": "5"}, "steps"), ({"strip_quotes": 1}, "strip_quotes")):
        r = client.post("/api/v1/jobs", json={"prompt": "a", **body})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    # A lone surrogate cannot be stored or echoed as UTF-8: refused at the edge.
    r = client.post("/api/format-prompt", content=b'{"prompt": "a\\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt", r.text


def test_unexpected_errors_are_json_500_with_a_logged_request_id(tmp_path, caplog):
    engine = FakeEngine()
    app = create_app(engine, ServerSettings(data_dir=tmp_path, limits=LIMITS))

    def broken():
        raise RuntimeError("boom")

    engine.describe = broken
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c, \
            caplog.at_level(logging.ERROR, logger="zimage_native.server.errors"):
        r = c.get("/api/v1/capabilities")
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        rid = error["request_id"]
        assert error["type"] == "server_error" and rid in error["message"] and r.headers["x-request-id"] == rid
        assert "boom" not in r.text  # details stay in the log
        assert any(rid in rec.getMessage() and "boom" in rec.getMessage() for rec in caplog.records)
        ok = c.get("/health")
        assert ok.status_code == 200 and len(ok.headers["x-request-id"]) == 16


def test_405_lists_the_paths_methods(client):
    r = client.put("/api/v1/images/j00000000000000000000-0")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
    r = client.request("OPTIONS", "/api/history")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}


# ---------------------------------------------------------------------------------------------- schema
def test_schema_states_the_limits_and_every_status(client):
    spec = client.get("/openapi.json").json()
    job = spec["components"]["schemas"]["JobRequest"]["properties"]
    width = job["width"]["anyOf"][0]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (32, 512, 16)
    assert job["steps"]["anyOf"][0]["maximum"] == 50 and job["n"]["maximum"] == 4
    assert job["prompt"]["maxLength"] == 200 and job["max_sequence_length"]["maximum"] == 600
    assert job["control_scale"]["anyOf"][0]["maximum"] == 1.5
    assert "film-noir" in job["template"]["anyOf"][0]["enum"]
    assert spec["components"]["schemas"]["JobRequest"]["additionalProperties"] is False
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer",
                                                                "description": "zimage serve --token"}
    paths = spec["paths"]
    create = paths["/api/v1/jobs"]["post"]
    assert {"202", "400", "401", "413", "422", "429", "500", "503"} <= set(create["responses"])
    assert create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert set(create["responses"]["202"]["links"]) == {"GetJob", "JobEvents", "CancelJob"}
    assert "text/event-stream" in paths["/api/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert set(paths["/api/v1/images/{image_id}"]["get"]["responses"]["200"]["content"]) == {
        "image/png", "image/jpeg", "image/webp"}
    assert set(paths["/api/v1/images"]["get"]["responses"]["200"]["links"]) == {
        "GetImage", "GetThumbnail", "DeleteImage"}
    assert "security" not in paths["/health"]["get"] and "401" not in paths["/health"]["get"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_defaults_fit_small_limits(tmp_path):
    small = Limits(min_side=16, max_side=128, max_pixels=128 * 128)
    with LiveServer(create_app(FakeEngine(), ServerSettings(data_dir=tmp_path, limits=small))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/api/v1/capabilities").json()["defaults"]["width"] == 128
        r = c.post("/api/v1/jobs", json={"prompt": "a", "steps": 1})
        assert r.status_code == 202 and r.json()["params"]["width"] == 128, r.text


# ---------------------------------------------------------------------------------------------- tasks
def test_inpaint_and_control_inputs(client):
    image = b64png((200, 10, 10), (96, 64))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))  # repaint the left half
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    mask_b64 = base64.b64encode(buf.getvalue()).decode()
    job, images = run(client, image=image, mask=mask_b64, seed=5)
    assert job["params"]["inpaint"] is True and job["params"]["strength"] == 1.0  # inpainting's default
    assert images[0]["params"]["task"] == "inpaint"
    out = Image.open(io.BytesIO(client.get(images[0]["url"]).content)).convert("RGB")
    assert out.size == (96, 64)
    assert out.getpixel((10, 30)) == seed_colour(5) and out.getpixel((80, 30)) == (200, 10, 10)

    job, images = run(client, control_image=b64png(size=(128, 96)), control_scale=0.5)
    assert images[0]["params"]["task"] == "control" and job["params"]["control_scale"] == 0.5
    assert (images[0]["width"], images[0]["height"]) == (128, 96)  # the control image's size
    _, images = run(client, control_image=b64png(size=(20, 15)))  # smaller than min_side: scaled up to it
    assert (images[0]["width"], images[0]["height"]) == (32, 32)
    job, images = run(client, image=image, mask=mask_b64, control_image=b64png())
    assert images[0]["params"]["task"] == "control_inpaint" and job["params"]["control_scale"] == 0.75
    assert "strength" not in job["params"]


@pytest.mark.parametrize("extra, param, words", [
    ({"mask": "MASK"}, "mask", "needs the image"),
    ({"image": "IMG", "mask": "bad base64!"}, "mask", "not valid base64"),
    ({"control_image": base64.b64encode(b"hello").decode()}, "control_image", "cannot be read"),
    ({"image": "IMG", "control_image": "IMG"}, "control_image", "needs a mask"),
    ({"image": "IMG", "mask": "MASK", "control_image": "IMG", "strength": 0.5}, "strength", "no strength"),
    ({"control_image": "IMG", "control_scale": 2.0}, "control_scale", "between 0 and 1.5"),
])
def test_task_inputs_are_checked_as_the_img2img_input(client, extra, param, words):
    swap = {"IMG": b64png(), "MASK": b64png((255,), mode="L")}
    body = {"prompt": "a", "steps": 2, **{k: swap.get(v, v) for k, v in extra.items()}}
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    big = base64.b64encode(b"\0" * 250_000).decode()
    r = client.post("/api/v1/jobs", json={"prompt": "a", "control_image": big})
    assert r.status_code == 413 and r.json()["error"]["param"] == "control_image"


def test_finished_jobs_drop_their_input_images(client, live, caplog):
    with caplog.at_level(logging.WARNING, logger="zimage_native.server.jobs"):
        job, _ = run(client, image=b64png(), mask=b64png((255,), mode="L"), control_image=b64png())
    kept = live.app.state.manager.get(job["id"]).request
    assert kept.image is None and kept.mask_image is None and kept.control_image is None
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


def test_legacy_generate_takes_mask_and_control(client):
    r = client.post("/api/generate", json={"prompt": "a", "steps": 1, "control_image": b64png(size=(64, 64))})
    assert r.status_code == 200 and r.json()["images"][0]["params"]["task"] == "control", r.text


def test_a_server_without_controlnet_says_so(tmp_path):
    engine = FakeEngine()
    engine.can_control = False
    with LiveServer(create_app(engine, ServerSettings(data_dir=tmp_path, limits=LIMITS))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/api/v1/capabilities").json()["features"]["control"] is False
        r = c.post("/api/v1/jobs", json={"prompt": "a", "control_image": b64png()})
        assert r.status_code == 422 and "no ControlNet" in r.json()["error"]["message"]
