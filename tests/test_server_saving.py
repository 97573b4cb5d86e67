"""The writer thread: a job's images are stored off the worker thread that drives the engine (the
GPU), while the next job runs, and the job completes only once they are stored. Fake engine, CPU."""

from __future__ import annotations

import collections
import errno
import threading
import time

import pytest

from zimage_native.sampling import GenerationRequest
from zimage_native.server import FakeEngine, Limits, ServerSettings
from zimage_native.server.jobs import SAVE_QUEUE, JobManager
from zimage_native.server.storage import Storage

WAIT = 20.0  # seconds: only reached when the behaviour under test is broken


class SignallingEngine(FakeEngine):
    """Sets ``entered[prompt]`` when the worker starts generating that prompt."""

    def __init__(self):
        super().__init__()
        self.entered: dict[str, threading.Event] = collections.defaultdict(threading.Event)

    def generate(self, request, callback):
        self.entered[request.prompt].set()
        return super().generate(request, callback)


class GatedSaves:
    """Stands in for Storage.save_image: each save waits for ``release`` (a slow disk), then saves."""

    def __init__(self, storage: Storage):
        self.save = storage.save_image
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []
        storage.save_image = self

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(3 * WAIT)  # longer than any wait of the tests: a stuck worker shows as stuck
        return self.save(*args, **kwargs)


def wait_until(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def setup(tmp_path):
    limits = Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    storage = Storage(tmp_path)
    engine = SignallingEngine()
    manager = JobManager(engine, storage, ServerSettings(data_dir=tmp_path, limits=limits, queue_size=8))
    gate = GatedSaves(storage)
    yield manager, engine, storage, gate
    gate.release.set()
    manager.stop()
    storage.close()


def submit(manager: JobManager, prompt: str):
    return manager.submit(GenerationRequest(prompt=prompt, width=64, height=64, steps=1, seeds=[1]))


def test_the_worker_starts_the_next_job_while_the_last_ones_images_are_written(setup):
    manager, engine, storage, gate = setup
    first, second = submit(manager, "first"), submit(manager, "second")
    manager.start()
    assert gate.entered.wait(WAIT)  # the first job's image is being written, and the disk is slow
    # The GPU's worker went on: the second job runs while the first one's image is still unwritten.
    assert engine.entered["second"].wait(WAIT), "the worker waited for the first job's images to be written"
    assert gate.threads == ["zimage-writer"]
    assert first.status == "running" and first.images == [] and storage.job_images(first.id) == []
    assert [e.type for e in first.events][-1] != "completed"
    assert manager.view(first)["queue_position"] == 0 and manager.stats()["saving"] >= 1
    gate.release.set()
    assert wait_until(lambda: second.terminal)
    assert first.status == second.status == "completed"
    # Completed only once stored: the rows and the files exist; the events end in one "completed".
    for job in (first, second):
        rows = storage.job_images(job.id)
        assert [r["id"] for r in rows] == [r["id"] for r in job.images] and len(rows) == 1
        assert storage.image_file(rows[0]).is_file() and storage.thumb_file(rows[0]).is_file()
        assert [e.type for e in job.events] == ["queued", "started", "progress", "completed"]
        assert storage.get_job(job.id)["status"] == "completed"
    assert first.finished <= second.finished  # the writer keeps the hand-off order


def test_the_hand_off_is_bounded_a_worker_waits_when_the_writer_is_behind(setup):
    manager, engine, storage, gate = setup
    jobs = [submit(manager, f"job {i}") for i in range(SAVE_QUEUE + 3)]
    manager.start()
    # One job is being written, SAVE_QUEUE wait for the writer, and the worker holds one more: it
    # waits for room, so the job after it has not started.
    held = jobs[SAVE_QUEUE + 1]
    assert wait_until(lambda: manager.stats()["saving"] == SAVE_QUEUE + 2 and manager._saves.full())
    assert all(j.status == "running" for j in jobs[: SAVE_QUEUE + 2]) and held in manager._saving
    assert jobs[-1].status == "queued" and not engine.entered[jobs[-1].request.prompt].is_set()
    gate.release.set()
    assert wait_until(lambda: all(j.terminal for j in jobs))
    assert all(j.status == "completed" for j in jobs)


def test_a_waiting_job_is_not_at_position_0_while_the_worker_holds_a_job_for_the_writer(setup):
    """Position 0 means running. A worker that waits for room in the hand-off is busy with a job
    that is no longer in _running: the first waiting job was told 0 (and its `queued` event said 0,
    shown as plain "Queued" by the web page) though it cannot start."""
    manager, engine, storage, gate = setup
    jobs = [submit(manager, f"job {i}") for i in range(SAVE_QUEUE + 3)]
    manager.start()
    assert wait_until(lambda: manager.stats()["saving"] == SAVE_QUEUE + 2 and manager._saves.full())
    assert manager.stats()["running"] == 0 and jobs[-1].status == "queued"
    assert manager.position(jobs[-1]) == 1 and manager.view(jobs[-1])["queue_position"] == 1
    late = submit(manager, "late")
    assert late.events[0].data["position"] == 2 and manager.position(late) == 2
    assert manager.position(jobs[SAVE_QUEUE + 1]) == 0  # the held job itself: generated, being handed over
    gate.release.set()
    assert wait_until(lambda: late.terminal) and late.status == "completed"
    assert manager._handing == 0 and manager.position(late) is None


def test_a_finished_job_is_neither_at_position_0_nor_active_while_the_writer_finishes_up(setup):
    """The writer completes a job, then takes it out of _saving: in between, position() said 0
    ("running") and active_jobs() listed the completed job (a race the test above once hit), and
    the queue object of /health counted it as saving."""
    manager, engine, storage, gate = setup
    gate.release.set()
    seen = []
    finish = manager._finish

    def recording(job, status, **kwargs):
        finish(job, status, **kwargs)
        seen.append((status, manager.position(job), job in manager.active_jobs(), manager.stats()["saving"]))

    manager._finish = recording
    job = submit(manager, "job")
    manager.start()
    assert wait_until(lambda: seen) and job.status == "completed"
    assert seen == [("completed", None, False, 0)]  # (/health's "saving" counted it too)


def test_the_average_behind_retry_after_is_the_workers_time_per_job_not_the_save_after_it(setup, monkeypatch):
    """Retry-After is (waiting + 1) x the average job time. The average took each job from its start
    to its images stored, though the worker starts the next job once it has handed them over: with
    a 1 s generation and a 5 s save it said 6 s per job. A clock that only the engine (1 s) and
    the save (5 s) move: the average is the worker's 1 s, the completed event still says 6 s."""
    import types

    from zimage_native.server import jobs as jobs_module

    manager, engine, storage, gate = setup
    now = [100.0]
    monkeypatch.setattr(jobs_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0], time=time.time,
                                                                     monotonic=time.monotonic))
    generate, save = engine.generate, gate.save

    def timed_generate(request, callback):
        now[0] += 1.0
        return generate(request, callback)

    def timed_save(*args, **kwargs):
        now[0] += 5.0
        return save(*args, **kwargs)

    engine.generate, gate.save = timed_generate, timed_save
    job = submit(manager, "job")
    manager.start()
    assert gate.entered.wait(WAIT)  # handed over, not yet saved; the average is the first guess until timed
    # the worker times the job after the hand-off: wait for that before the save moves the clock
    assert wait_until(lambda: manager._timed == 1)
    gate.release.set()
    assert wait_until(lambda: job.terminal) and job.status == "completed"
    assert job.events[-1].data["seconds"] == 6.0 and manager.stats()["average_job_seconds"] == 1.0
    assert manager.retry_after() == 1


def test_a_failing_save_fails_its_job_with_the_storage_error_and_the_next_job_completes(setup):
    manager, engine, storage, gate = setup
    gate.release.set()
    calls = []

    def save(job_id, *args, **kwargs):
        calls.append(job_id)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return gate(job_id, *args, **kwargs)

    storage.save_image = save
    first, second = submit(manager, "first"), submit(manager, "second")
    manager.start()
    assert wait_until(lambda: second.terminal)
    assert first.status == "failed" and first.images == []
    assert first.error.startswith("image 0 of the job could not be saved: the server's data folder is full")
    assert "No space left on device" in first.error and first.events[-1].data["error"] == first.error
    assert storage.get_job(first.id)["status"] == "failed" and storage.get_job(first.id)["error"] == first.error
    assert second.status == "completed" and len(storage.job_images(second.id)) == 1
    assert manager.stats()["saving"] == 0 and manager.stats()["running"] == 0


def test_stop_lets_the_writer_store_what_was_handed_to_it(setup):
    manager, engine, storage, gate = setup
    first, second = submit(manager, "first"), submit(manager, "second")
    manager.start()
    assert wait_until(lambda: first in manager._saving and second in manager._saving)
    seen_at_return = []

    def stop():
        manager.stop()
        seen_at_return.extend([first.status, second.status, manager._writer.is_alive()])

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert wait_until(lambda: not any(t.is_alive() for t in manager._threads))  # the worker has ended
    gate.release.set()  # only now can the images be written: stop must still be waiting for them
    stopper.join(WAIT)
    assert seen_at_return == ["completed", "completed", False]
    for job in (first, second):
        assert storage.get_job(job.id)["status"] == "completed"
        assert storage.image_file(storage.job_images(job.id)[0]).is_file()


def test_storage_writes_given_png_bytes_as_they_are_and_still_makes_the_thumbnail(tmp_path):
    """A Ray replica's image arrives as PNG bytes made with png_info(record): stored without being
    encoded again, the same file the image itself would give."""
    import io

    from PIL import Image

    from zimage_native.metadata import png_info, save_png

    image = Image.new("RGB", (300, 200), (10, 200, 30))
    record = {"prompt": "a field", "seed": 5, "replica": "r1"}
    buffer = io.BytesIO()
    save_png(image, buffer, png_info(record))
    storage = Storage(tmp_path)
    given = storage.save_image("j" + "1" * 20, 0, Image.open(io.BytesIO(buffer.getvalue())), record,
                               png=buffer.getvalue())
    encoded = storage.save_image("j" + "2" * 20, 0, image, record, png_info(record))
    assert storage.image_file(given).read_bytes() == buffer.getvalue() == storage.image_file(encoded).read_bytes()
    with Image.open(storage.thumb_file(given)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (256, 171)
    assert (given["width"], given["height"], given["seed"]) == (300, 200, 5)
    storage.close()


class ReplicaBytes(FakeEngine):
    """Returns its images as RayEngine.generate does (GeneratedImage.from_png): a replica's PNG
    bytes, opened lazily; ``mangle`` breaks the first job's bytes (a damaged transfer, a faulty replica)."""

    def __init__(self, mangle):
        super().__init__()
        self.mangle, self.made = mangle, 0

    def generate(self, request, callback):
        import io

        from zimage_native.metadata import png_info, save_png
        from zimage_native.server.engine import GeneratedImage

        self.made += 1
        out = []
        for result in super().generate(request, callback):
            buffer = io.BytesIO()
            save_png(result.image, buffer, png_info(result.record))
            data = self.mangle(buffer.getvalue()) if self.made == 1 else buffer.getvalue()
            out.append(GeneratedImage.from_png(data, result.seed, result.record))
        return out


@pytest.mark.parametrize("mangle", [lambda b: b[: b.index(b"IDAT") + 12],  # cut inside the pixel data
                                    lambda b: b[: b.index(b"IDAT") + 20] + bytes([b[b.index(b"IDAT") + 20] ^ 0xFF])
                                    + b[b.index(b"IDAT") + 21:],
                                    lambda b: b[: -len(b"\x00\x00\x00\x00IEND\xaeB`\x82")],  # cut after the pixels
                                    lambda b: b[:20],  # cut in the header
                                    lambda b: b"\x00" * 64],  # not an image
                         ids=["truncated", "flipped-byte", "cut-after-the-pixel-data", "cut-in-the-header", "no-image"])
def test_a_replica_png_that_does_not_decode_fails_its_job_as_such_and_leaves_no_file(tmp_path, mangle):
    """A replica's PNG is stored as it came and decoded only for the thumbnail: a broken one was
    written to images/ (a file without a row) and the job failed as "the server cannot write its
    history" (the disk's fault). It is decoded before anything is written now. Bytes cut after the
    pixel data decode (PIL does not need the IEND chunk): they were stored, a PNG without its end,
    and the job completed; bytes cut in the header (or no image at all) failed the job in the
    worker with PIL's words ("cannot identify image file <_io.BytesIO object at 0x7f...>").
    Every one fails as "its PNG cannot be decoded" now."""
    limits = Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    storage = Storage(tmp_path)
    manager = JobManager(ReplicaBytes(mangle), storage, ServerSettings(data_dir=tmp_path, limits=limits,
                                                                      queue_size=8))
    broken, fine = submit(manager, "broken"), submit(manager, "fine")
    manager.start()
    try:
        assert wait_until(lambda: fine.terminal)
        assert broken.status == "failed", broken.error
        assert broken.error.startswith("image 0 of the job: its PNG cannot be decoded ("), broken.error
        assert broken.error.endswith("); nothing was stored") and "history" not in broken.error
        assert storage.job_images(broken.id) == [] and not list(tmp_path.glob(f"images/*/{broken.id}-*"))
        assert not list(tmp_path.glob(f"thumbs/*/{broken.id}-*"))
        assert fine.status == "completed" and storage.image_file(storage.job_images(fine.id)[0]).is_file()
    finally:
        manager.stop()
        storage.close()


# ------------------------------------------------------------------ a cancel that comes too late
def test_a_cancel_of_a_job_whose_images_are_being_stored_is_refused_and_the_job_completes(setup):
    """The job was generated: a cancel while its images were stored answered "cancel requested"
    (cancel_requested true) and then the job completed. It is refused now (Conflict, 409)."""
    from zimage_native.server.jobs import Conflict

    manager, engine, storage, gate = setup
    job = submit(manager, "job")
    manager.start()
    assert gate.entered.wait(WAIT) and job in manager._saving
    with pytest.raises(Conflict, match=r"already generated and its images are being stored: it is too late to cancel"):
        manager.cancel(job.id)
    assert not job.cancel_requested
    gate.release.set()
    assert wait_until(lambda: job.terminal) and job.status == "completed"
    assert [e.type for e in job.events] == ["queued", "started", "progress", "completed"]


class HeldAfterTheLastStep(FakeEngine):
    """Generates, then waits for ``release`` before returning (a VAE decode after the last step)."""

    def __init__(self):
        super().__init__()
        self.done, self.release = threading.Event(), threading.Event()

    def generate(self, request, callback):
        out = super().generate(request, callback)
        self.done.set()
        assert self.release.wait(WAIT)
        return out


def test_a_cancel_accepted_after_the_last_step_still_cancels_the_job(tmp_path):
    """Control of the refusal: a running job's cancel is accepted and holds even when it arrives
    after the last step boundary (no callback left to raise): the job ends cancelled, unsaved."""
    limits = Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    storage = Storage(tmp_path)
    engine = HeldAfterTheLastStep()
    manager = JobManager(engine, storage, ServerSettings(data_dir=tmp_path, limits=limits, queue_size=8))
    job = submit(manager, "job")
    manager.start()
    try:
        assert engine.done.wait(WAIT)
        assert manager.cancel(job.id) is job and job.cancel_requested
        engine.release.set()
        assert wait_until(lambda: job.terminal)
        assert job.status == "cancelled" and job.images == [] and storage.job_images(job.id) == []
        assert [e.type for e in job.events] == ["queued", "started", "progress", "cancelled"]
        assert job.events[-1].data["step"] == 1 and storage.get_job(job.id)["status"] == "cancelled"
    finally:
        engine.release.set()
        manager.stop()
        storage.close()


def _live(tmp_path, engine, **kw):
    pytest.importorskip("fastapi")
    from zimage_native.server import create_app
    from zimage_native.server.testing import LiveServer

    limits = Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    return LiveServer(create_app(engine, ServerSettings(data_dir=tmp_path, limits=limits, **kw)))


def test_the_cancel_route_answers_409_for_a_job_whose_images_are_being_stored(tmp_path):
    httpx = pytest.importorskip("httpx")
    with _live(tmp_path, FakeEngine()) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        gate = GatedSaves(live.app.state.storage)
        try:
            job = client.post("/api/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 1}).json()
            assert gate.entered.wait(WAIT)
            r = client.post(f"/api/v1/jobs/{job['id']}/cancel")
            assert r.status_code == 409, r.text
            error = r.json()["error"]
            assert error["type"] == "conflict" and "too late to cancel" in error["message"]
            assert client.get(f"/api/v1/jobs/{job['id']}").json()["cancel_requested"] is False
        finally:
            gate.release.set()
        assert wait_until(lambda: client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "completed")


def test_a_sync_route_whose_limit_passes_while_the_images_are_stored_answers_them(tmp_path):
    """The OpenAI route's limit passed while its job's images were being stored: it cancelled the
    job ("cancel requested"), answered 504 "was cancelled", and the job then completed into the
    history. A job too late to cancel is waited for now: the route answers its images."""
    from zimage_native.server.jobs import Conflict

    httpx = pytest.importorskip("httpx")
    # The job must reach its save within the limit (2 s; a loaded machine takes a while to start it)
    with _live(tmp_path, FakeEngine(), sync_timeout=2.0) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        gate = GatedSaves(live.app.state.storage)
        manager = live.app.state.manager
        refused, cancel = threading.Event(), manager.cancel

        def recording_cancel(job_id):
            try:
                return cancel(job_id)
            except Conflict:
                refused.set()  # the route's limit passed while the images were being stored
                raise

        manager.cancel = recording_cancel

        def release_after_the_limit():
            assert gate.entered.wait(WAIT) and refused.wait(WAIT)
            gate.release.set()

        releaser = threading.Thread(target=release_after_the_limit)
        releaser.start()
        try:
            r = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64",
                                                            "num_inference_steps": 1, "response_format": "url"})
        finally:
            gate.release.set()
            releaser.join(WAIT)
        assert r.status_code == 200, r.text
        (job,) = client.get("/api/v1/jobs").json()["jobs"]
        assert job["status"] == "completed" and not manager.get(job["id"]).cancel_requested
        assert r.json()["data"][0]["url"].endswith(job["images"][0]["url"])


def test_a_sync_route_whose_limit_passes_while_generating_still_cancels_the_job(tmp_path):
    """Control: a job still generating when the limit passes is cancelled and answered 504."""
    httpx = pytest.importorskip("httpx")
    with _live(tmp_path, FakeEngine(step_delay=0.2), sync_timeout=0.5) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        r = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "num_inference_steps": 20})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["message"] == "the job did not finish within 0.5 s and was cancelled"
        (job,) = client.get("/api/v1/jobs").json()["jobs"]
        assert wait_until(lambda: client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "cancelled")
        assert client.get("/api/v1/images").json()["total"] == 0


def test_a_sync_wait_whose_client_left_while_the_images_are_stored_does_not_claim_a_cancel(tmp_path):
    """The disconnect check of a synchronous route cancelled the job and answered 499 "the job was
    cancelled" even when it was too late (the images being stored: the job then completed). It waits
    for the job's end now. Control: a client that leaves while the job generates still cancels it."""
    import asyncio

    from zimage_native.server.schemas import ApiError

    async def gone():
        return True

    with _live(tmp_path, FakeEngine(step_delay=0.2)) as live:
        gate, manager, ctx = GatedSaves(live.app.state.storage), live.app.state.manager, live.app.state.context
        try:
            generating = manager.submit(GenerationRequest(prompt="generating", width=64, height=64, steps=20, seeds=[1]))
            with pytest.raises(ApiError, match="the client disconnected; the job was cancelled"):
                asyncio.run(ctx.wait(generating, 30.0, gone))
            assert wait_until(lambda: generating.terminal) and generating.status == "cancelled"
            saving = submit(manager, "saving")
            assert gate.entered.wait(WAIT) and saving in manager._saving
            threading.Timer(1.0, gate.release.set).start()  # after a disconnect check or two
            event = asyncio.run(ctx.wait(saving, 30.0, gone))
            assert event.type == "completed" and saving.status == "completed" and not saving.cancel_requested
        finally:
            gate.release.set()


# ------------------------------------------------------------------ a save that fails half-way
@pytest.mark.parametrize("fail", ["thumbnail", "row"])
def test_a_save_that_fails_after_the_png_leaves_no_file_that_a_restart_would_adopt(tmp_path, fail):
    """The PNG is written first, then the thumbnail, then the row. A full disk at the thumbnail (or
    a database error at the row) failed the job but left its PNG (and thumbnail) behind: a file
    without a row, which start-up adopts since its job is known, so after a restart the failed job
    had an image in the history (and the full disk kept a file no one could delete from the page)."""
    limits = Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    storage = Storage(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    setattr(storage, "_write_thumbnail" if fail == "thumbnail" else "_insert_image", disk_full)
    manager = JobManager(FakeEngine(), storage, ServerSettings(data_dir=tmp_path, limits=limits, queue_size=8))
    job = submit(manager, "job")
    manager.start()
    try:
        assert wait_until(lambda: job.terminal)
    finally:
        manager.stop()
        storage.close()
    assert job.status == "failed" and "the server's data folder is full" in job.error
    assert [p.name for p in tmp_path.glob("images/*/*") if p.is_file()] == []
    assert [p.name for p in tmp_path.glob("thumbs/*/*") if p.is_file()] == []
    restarted = Storage(tmp_path)
    try:
        assert restarted.reconcile()["adopted"] == 0
        assert restarted.get_job(job.id)["status"] == "failed" and restarted.job_images(job.id) == []
    finally:
        restarted.close()


@pytest.mark.parametrize("error", ["disk full", "broken png", "unexpected"])
def test_a_batch_job_whose_second_image_fails_to_save_keeps_none_of_its_images(tmp_path, error):
    """A job of three images whose image 1 could not be stored failed, but image 0 stayed in the
    history: listed by /api/v1/images and, once the job left memory (or after a restart), under the
    failed job in /api/v1/jobs/{id}, while the job's own view said no images (and a broken replica
    PNG said "nothing was stored"). The images stored before the failing one are deleted now."""
    from zimage_native.server.storage import BrokenImage

    limits = Limits(min_side=32, max_side=512, max_pixels=512 * 512, max_steps=50, max_images=4)
    storage = Storage(tmp_path)
    save = storage.save_image

    def failing_at_1(job_id, index, *args, **kwargs):
        if index == 1 and job_id == batch.id:
            raise {"disk full": OSError(errno.ENOSPC, "No space left on device"),
                   "broken png": BrokenImage("its PNG cannot be decoded (x); nothing was stored"),
                   "unexpected": ValueError("bad mode")}[error]
        return save(job_id, index, *args, **kwargs)

    storage.save_image = failing_at_1
    manager = JobManager(FakeEngine(), storage, ServerSettings(data_dir=tmp_path, limits=limits, queue_size=8))
    batch = manager.submit(GenerationRequest(prompt="batch", width=64, height=64, steps=1, seeds=[1, 2, 3]))
    after = manager.submit(GenerationRequest(prompt="after", width=64, height=64, steps=1, seeds=[4, 5]))
    manager.start()
    try:
        assert wait_until(lambda: after.terminal)
    finally:
        manager.stop()
        storage.close()
    assert batch.status == "failed" and batch.images == [], batch.error
    assert batch.error.startswith("image 1 of the job" if error != "unexpected" else "internal error: ValueError")
    assert after.status == "completed" and len(after.images) == 2
    restarted = Storage(tmp_path)
    try:
        assert restarted.reconcile()["adopted"] == 0
        assert restarted.job_images(batch.id) == [] and restarted.get_job(batch.id)["status"] == "failed"
        assert sorted(r["id"] for r in restarted.list_images()) == [f"{after.id}-0", f"{after.id}-1"]
        files = sorted(p.stem for p in tmp_path.glob("images/*/*.png"))
        thumbs = sorted(p.stem for p in tmp_path.glob("thumbs/*/*.jpg"))
        assert files == thumbs == [f"{after.id}-0", f"{after.id}-1"]
    finally:
        restarted.close()


# ------------------------------------------------------------------ restart after a crash while saving
def test_a_restart_completes_a_job_left_running_whose_images_are_all_stored(tmp_path):
    """A job's row says running until the writer has stored every image, pruned the history and sent
    "completed"; a crash in between (a long prune, or after the completed event but before the row
    update) left a job with all its images that start-up called failed ("interrupted"), though
    clients may have been told it completed. Start-up completes such a job now; a job with part of
    its images (or none) still fails, and so does one whose count is unknown."""
    from PIL import Image

    from zimage_native.server.storage import write_atomic

    image = Image.new("RGB", (32, 32), (1, 2, 3))
    storage = Storage(tmp_path)
    whole, adopted, partial, unknown = ("j" + c * 20 for c in "abcd")
    for job_id, n in ((whole, 2), (adopted, 2), (partial, 3), (unknown, None)):
        storage.insert_job(job_id, "generate", {"prompt": "p", **({"n": n} if n else {})}, time.time(), "running")
    for job_id, count in ((whole, 2), (adopted, 1), (partial, 1), (unknown, 1)):
        for k in range(count):
            storage.save_image(job_id, k, image, {"prompt": "p", "seed": k})
    # The last image of `adopted`: renamed into place, its row not inserted before the crash.
    day = storage.job_images(adopted)[0]["file"].split("/")[1]
    write_atomic(tmp_path / "images" / day / f"{adopted}-1.png", lambda f: image.save(f, format="PNG"))
    storage.close()

    restarted = Storage(tmp_path)
    try:
        report = restarted.reconcile()
        for job_id in (whole, adopted):
            row = restarted.get_job(job_id)
            assert (row["status"], row["error"]) == ("completed", None) and row["finished"] is not None
            assert len(restarted.job_images(job_id)) == 2
        for job_id in (partial, unknown):
            row = restarted.get_job(job_id)
            assert (row["status"], row["error"]) == ("failed", "interrupted: the server stopped while the job ran")
        assert (report["completed"], report["failed"], report["adopted"]) == (2, 2, 1)
        assert restarted.reconcile() == dict.fromkeys(report, 0)
    finally:
        restarted.close()


def test_a_restart_does_not_bring_back_an_image_whose_delete_a_crash_cut_short(tmp_path):
    """Deletes go row first, then files (a delete, a prune, "Clear all" of many images). A crash in
    between left files without rows, and start-up adopted every such file whose job it knew: the
    deleted images came back into the history. Only a job that was running (a file renamed into
    place just before its row) has its files adopted now; a finished job's are removed."""
    from PIL import Image

    from zimage_native.server.storage import write_atomic

    image = Image.new("RGB", (32, 32), (1, 2, 3))
    storage = Storage(tmp_path)
    finished, running = "j" + "a" * 20, "j" + "b" * 20
    storage.insert_job(finished, "generate", {"prompt": "p", "n": 3}, time.time(), "completed")
    storage.insert_job(running, "generate", {"prompt": "q", "n": 2}, time.time(), "running")
    rows = [storage.save_image(finished, k, image, {"prompt": "p", "seed": k}) for k in range(3)]
    storage.save_image(running, 0, image, {"prompt": "q", "seed": 0})
    day = rows[0]["file"].split("/")[1]
    write_atomic(tmp_path / "images" / day / f"{running}-1.png", lambda f: image.save(f, format="PNG"))
    storage._unlink = lambda *relatives: None  # the crash: rows deleted, files not yet
    assert storage.delete_image(rows[1]["id"]) and storage.prune(1, spare_job=running) == 2
    assert [r["id"] for r in storage.list_images()] == [f"{running}-0"]
    storage.close()

    restarted = Storage(tmp_path)
    try:
        report = restarted.reconcile()
        assert sorted(r["id"] for r in restarted.list_images()) == [f"{running}-0", f"{running}-1"]
        assert sorted(p.stem for p in tmp_path.glob("images/*/*.png")) == [f"{running}-0", f"{running}-1"]
        assert sorted(p.stem for p in tmp_path.glob("thumbs/*/*.jpg")) == [f"{running}-0", f"{running}-1"]
        assert (report["adopted"], report["orphans_removed"], report["thumbs_removed"]) == (1, 3, 3)
        assert restarted.get_job(running)["status"] == "completed"  # (its images are all stored)
    finally:
        restarted.close()
