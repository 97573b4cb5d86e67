"""Scale-out on Ray Serve, on the CPU: the replica in Serve's local testing mode, and a real local
Ray cluster with logical GPUs (two replicas, backpressure, a replica replaced after a failed health
check, no accepted request lost)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import threading
import time
import types

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'zimage-native[ray]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from zimage_native.cli.serve import default_options  # noqa: E402
from zimage_native.metadata import JSON_KEY  # noqa: E402
from zimage_native.server.engine import GenerationRequest  # noqa: E402
from zimage_native.server.jobs import JobCancelled  # noqa: E402
from zimage_native.server.ray_serve import RayEngine, ZImageReplica, build_app, scaling_options  # noqa: E402

from .test_png_output import zlib_level_flag  # noqa: E402
from .utils import reserved_port  # noqa: E402

# One xdist group for both Ray modules: under `pytest -n 2 --dist loadgroup` they run on one worker,
# one after the other, never two Ray instances at once.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600), pytest.mark.xdist_group("ray")]


def fake_options(tmp_path, **extra):
    return {**default_options(), "fake": True, "fake_step_delay": 0.0, "data_dir": str(tmp_path), "min_side": 16,
            **extra}


def request(prompt="a cat", steps=3, seeds=(1, 2)):
    return GenerationRequest(prompt=prompt, width=32, height=32, steps=steps, guidance_scale=0.0, seeds=list(seeds))


# ------------------------------------------------------------------------------------------ local testing mode
@pytest.fixture
def local_replica(tmp_path):
    handle = serve.run(serve.deployment(ZImageReplica).bind(fake_options(tmp_path)), name="local",
                       _local_testing_mode=True)
    return handle


def test_replica_streams_steps_then_images(local_replica):
    from zimage_native.server.ray_serve import _request_payload

    items = list(local_replica.options(stream=True).generate.remote(_request_payload(request())))
    assert [i["type"] for i in items] == ["progress", "progress", "progress", "images"]
    assert [(i["step"], i["total"]) for i in items[:3]] == [(1, 3), (2, 3), (3, 3)]
    images = items[-1]["images"]
    assert [x["seed"] for x in images] == [1, 2] and images[0]["png"].startswith(b"\x89PNG")
    assert zlib_level_flag(images[0]["png"]) == 0  # written with metadata.save_png (tests/test_png_output.py)
    assert images[0]["record"]["prompt"] == "a cat" and "replica" in images[0]["record"]


def test_ray_engine_generates_reports_progress_and_cancels(local_replica):
    info = local_replica.info.remote().result()
    engine = RayEngine(local_replica, info)
    assert engine.default_steps == 8 and engine.can_generate and engine.describe()["scale_out"] == "ray serve"
    steps = []
    images = engine.generate(request(), lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)] and [im.seed for im in images] == [1, 2]
    assert images[0].image.size == (32, 32)

    def cancel(i, n):
        raise JobCancelled()

    with pytest.raises(JobCancelled):
        engine.generate(request(steps=5), cancel)
    assert len(engine.encode(["a cat", "a dog"])) == 2
    assert engine.tokenize(["ab"]) == [[97, 98]]
    # a prompt cut to max_sequence_length is counted on a replica, for the job's advice
    assert engine.token_counts(["ab", "abc"]) == [2, 3]
    long = GenerationRequest(prompt="a" * 600, width=32, height=32, steps=1, guidance_scale=0.0, seeds=[1])
    (advice,) = engine.length_advice(long, 1024)
    assert "more than max_sequence_length 512" in advice


def test_the_ingress_stores_a_replicas_png_as_it_came_with_the_metadata_of_the_local_path(local_replica, tmp_path):
    """The ingress writes the replica's PNG bytes as they are (no decode and encode again); the file
    carries the text chunks and pixels that the server without Ray stores for the same image and
    record, and the thumbnail is still made."""
    from PIL import Image

    from zimage_native.server.engine import GeneratedImage
    from zimage_native.server.storage import Storage

    engine = RayEngine(local_replica, local_replica.info.remote().result())
    (remote,) = engine.generate(request(seeds=[7]), lambda i, n: None)
    assert remote.png is not None and remote.record["replica"]
    pixels = Image.open(io.BytesIO(remote.png)).convert("RGB")
    local = GeneratedImage(pixels, remote.seed, remote.record)  # what a server without Ray would store
    stored = {}
    for name, result in (("ray", remote), ("local", local)):
        storage = Storage(tmp_path / name)
        row = storage.save_image("j" + "0" * 20, 0, result.image, result.record, result.pnginfo(), png=result.png)
        stored[name] = storage.image_file(row).read_bytes()
        with Image.open(storage.image_file(row)) as im:
            stored[name + " text"], stored[name + " pixels"] = dict(im.text), im.convert("RGB").tobytes()
        with Image.open(storage.thumb_file(row)) as thumb:
            assert thumb.format == "JPEG" and thumb.size == (32, 32)
        assert (row["width"], row["height"], row["seed"], row["record"]) == (32, 32, 7, remote.record)
        storage.close()
    assert stored["ray"] == remote.png  # stored as it came from the replica
    assert stored["ray text"] == stored["local text"] and stored["ray text"]
    assert json.loads(stored["ray text"][JSON_KEY]) == remote.record  # the replica's name included
    assert stored["ray pixels"] == stored["local pixels"] == pixels.tobytes()


def ray_task_error(error: Exception) -> Exception:
    """``error`` raised in a replica, as a deployment handle hands it to the ingress (checked on a
    real local cluster: the job of a "[fail]" prompt)."""
    import traceback

    try:  # raised, as in the replica: the text Ray keeps is its traceback
        raise error
    except Exception:
        text = traceback.format_exc()
    wrapped = ray.exceptions.RayTaskError("handle_request_with_rejection", text, error, pid=4321, ip="192.0.2.2",
                                          proctitle="ray::ServeReplica:zimage:ZImageReplica")
    return wrapped.as_instanceof_cause()


class FailingReplica:
    """A deployment handle whose replica raises ``error`` (after one step of a generation)."""

    def __init__(self, error: Exception):
        self.error = error

    def options(self, **kwargs):
        return self

    def __getattr__(self, method):  # generate, encode, tokenize, token_counts, rewrite
        return types.SimpleNamespace(remote=lambda *args: self)

    def __iter__(self):
        yield {"type": "progress", "step": 1, "total": 3}
        raise self.error

    def cancel(self):
        pass

    def result(self):
        raise self.error


def test_an_engine_error_on_a_replica_reaches_the_job_and_the_routes_as_the_engines_message(tmp_path):
    """Ray hands a replica's exception over wrapped: its text starts with the replica's process
    title, pid, address and actor in terminal colours. A job that failed on a replica said
    '\\x1b[36mray::ServeReplica:zimage:ZImageReplica.handle_request_with_rejection()\\x1b[39m
    (pid=12126, ip=..., actor_id=..., repr=<...>)' instead of the engine's error, and /api/encode
    answered 422 with that and the replica's traceback."""
    from zimage_native.server import Limits, ServerSettings
    from zimage_native.server.jobs import JobManager
    from zimage_native.server.storage import Storage

    info = ZImageReplica(fake_options(tmp_path, warmup=False)).info()
    engine = RayEngine(FailingReplica(ray_task_error(RuntimeError("the fake engine was asked to fail"))), info)
    storage = Storage(tmp_path / "data")
    limits = Limits(min_side=16, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    manager = JobManager(engine, storage, ServerSettings(data_dir=tmp_path / "data", limits=limits))
    job = manager.submit(request())
    manager.start()
    try:
        deadline = time.monotonic() + 30
        while not job.terminal and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        manager.stop()
        storage.close()
    assert job.status == "failed" and job.error == "the fake engine was asked to fail"
    assert job.events[-1].data["error"] == "the fake engine was asked to fail"
    encoder = RayEngine(FailingReplica(ray_task_error(ValueError("max_sequence_length must be >= 1"))), info)
    with pytest.raises(ValueError) as raised:  # what ctx.on_worker answers 422 with
        encoder.encode(["a cat"], 0)
    assert str(raised.value) == "max_sequence_length must be >= 1"


class BusyReplicas:
    """A deployment handle whose generation waits for a replica that does not free up (all busy, or
    one still starting): its stream yields nothing until it is cancelled, then raises as Ray does."""

    def __init__(self):
        self.waiting = threading.Event()  # a generation is waiting for a replica
        self.cancelled = threading.Event()

    def options(self, **kwargs):
        return self

    def __getattr__(self, method):
        return types.SimpleNamespace(remote=lambda *args: self)

    def __iter__(self):
        return self

    def __next__(self):
        self.waiting.set()
        assert self.cancelled.wait(60)
        raise concurrent.futures.CancelledError()

    def cancel(self):
        self.cancelled.set()

    def result(self):  # token counts for the job's advice: none
        raise RuntimeError("no replica")


@pytest.mark.parametrize("end", ["cancel", "timeout"])
def test_a_job_waiting_for_a_busy_replica_ends_at_once_on_a_cancel_or_its_time_limit(tmp_path, end):
    """A cancel (or the job's time limit) took effect at the job's next step: a job forwarded to a
    replica that was still busy (autoscaling with fewer replicas up than workers, or one starting)
    got none until it ran there. On a local cluster (min 1, max 2 replicas, one GPU, 40 steps of
    0.15 s ahead) its cancel took 5.01 s; 0.23 s now: the wait for the replica is cancelled."""
    from zimage_native.server import Limits, ServerSettings
    from zimage_native.server.jobs import JobManager
    from zimage_native.server.storage import Storage

    info = ZImageReplica(fake_options(tmp_path, warmup=False)).info()
    replica = BusyReplicas()
    storage = Storage(tmp_path / "data")
    limits = Limits(min_side=16, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    manager = JobManager(RayEngine(replica, info), storage, ServerSettings(
        data_dir=tmp_path / "data", limits=limits, job_timeout=0.5 if end == "timeout" else None))
    job = manager.submit(request())
    manager.start()
    try:
        # cancel once the request waits for a replica (a cancel before that ends the job before it
        # reaches the replicas: nothing to withdraw)
        assert replica.waiting.wait(30), "the job never asked the replicas"
        if end == "cancel":
            manager.cancel(job.id)
        deadline = time.monotonic() + 5  # the watch asks a few times a second
        while not job.terminal and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.terminal, "the job still waits for its replica"
        if end == "cancel":
            assert job.status == "cancelled" and job.events[-1].data["step"] == 0
        else:
            assert job.status == "failed" and job.error == "the job ran longer than the limit of 0.5 s"
        assert replica.cancelled.is_set()  # the request to the replicas was withdrawn
    finally:
        replica.cancelled.set()
        manager.stop()
        storage.close()


def test_scaling_options():
    fixed, workers = scaling_options({"replicas": 3})
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 1 and workers == 3
    assert fixed["ray_actor_options"]["num_gpus"] == 1
    auto, workers = scaling_options({"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2})
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    assert workers == 4 and "num_replicas" not in auto
    with pytest.raises(ValueError, match="min_replicas"):
        scaling_options({"min_replicas": 3, "max_replicas": 2})


def test_shipped_serve_config_is_valid():
    from pathlib import Path

    import yaml

    from zimage_native.server.ray_serve import scaling_options as check

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "deploy" / "serve_config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "zimage_native.server.ray_serve:app_builder"
    unknown = set(app["args"]) - set(default_options()) - {"health_check_period_s", "health_check_timeout_s"}
    assert not unknown, f"serve_config.yaml args that zimage serve does not know: {unknown}"
    check({**default_options(), **app["args"]})


# ------------------------------------------------------------------------------------------ a real local cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray with 4 CPUs and 2 logical GPUs, two replicas of the fake engine behind the ingress."""
    if ray.is_initialized():
        ray.shutdown()
    # Serve's controller gives the HTTP proxy 3 readiness checks of 5 s, then kills it and serve.start
    # fails after 60 s: on a loaded 2-core machine the proxy took longer to start (its worker
    # imports Ray Serve and uvicorn). The controller and its actors inherit the driver's environment.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    # The port stays reserved while the proxy starts (seconds, in an actor) and runs: see reserved_port.
    with reserved_port() as port:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = fake_options(tmp_path_factory.mktemp("ray-data"), fake_step_delay=0.15, replicas=2, queue_size=2,
                               health_check_period_s=1.0, health_check_timeout_s=5.0)
        serve.run(build_app(options), name="zimage", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        yield client
        client.close()
        serve.shutdown()
        ray.shutdown()


def submit(client, prompt, steps=4):
    return client.post("/api/v1/jobs", json={"prompt": prompt, "width": 32, "height": 32, "steps": steps})


def wait(client, job_id, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.slow
def test_two_replicas_serve_concurrently_and_excess_gets_429(cluster):
    assert cluster.get("/health").json()["queue"]["workers"] == 2
    # capacity: 2 running + 2 waiting. A job is 20 steps of 0.15 s (3 s): none ends (freeing a place)
    # while the seven requests are made, even when each takes 0.1 s or more (a loaded machine)
    replies = [submit(cluster, f"a cat {i}", steps=20) for i in range(7)]
    accepted = [r for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code == 429]
    assert len(accepted) == 4 and len(refused) == 3
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    jobs = [wait(cluster, r.json()["id"]) for r in accepted]
    assert all(j["status"] == "completed" for j in jobs)
    started = sorted(j["started"] for j in jobs)
    # the first two ran at the same time, on two replicas: the second started well within the first
    # job's 3 s (one after the other, it would have started once the first ended)
    assert started[1] - started[0] < 1.5
    history = cluster.get("/api/v1/images").json()
    assert history["total"] >= 4 and all(item["url"] for item in history["items"])  # kept at the ingress


@pytest.mark.slow
def test_unhealthy_replica_is_replaced_and_no_accepted_job_is_lost(cluster):
    handle = serve.get_deployment_handle("ZImageReplica", app_name="zimage")
    before = {handle.whoami.remote().result() for _ in range(20)}
    assert len(before) == 2
    accepted = [r.json()["id"] for r in (submit(cluster, f"a dog {i}", steps=8) for i in range(4))]
    broken = handle.break_for_test.remote("test").result()
    deadline = time.time() + 90
    now: set[str] = set()
    while time.time() < deadline:
        now = {handle.whoami.remote().result() for _ in range(20)}
        if broken not in now and len(now) == 2:
            break
        time.sleep(1)
    assert broken not in now and len(now) == 2, f"replica {broken} was not replaced: {now}"
    jobs = [wait(cluster, job_id) for job_id in accepted]
    assert [j["status"] for j in jobs] == ["completed"] * 4, [j.get("error") for j in jobs]

