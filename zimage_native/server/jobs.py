"""The job queue and the worker thread that owns the engine (and so the model and the GPU).

- Workers: one by default (one GPU, one model). Behind a Ray Serve ingress there is one worker
  per replica (``settings.workers``), each forwarding its job to a replica.
- Admission: at most ``queue_size + workers`` generation jobs are active (the running ones, the
  rest waiting). A submit beyond that raises :class:`QueueFull`, which the app answers with 429 and a
  ``Retry-After`` estimated from the queue length and a moving average of job durations.
- Other model calls (encode, tokenize, rewrite) are short tasks that the same worker runs before
  the next waiting job; they have their own bound.
- Events: each job keeps its full event log (``queued``, ``started``, ``progress`` per step, then
  one of ``completed``, ``failed``, ``cancelled``), numbered from 1. A subscriber gets the events
  after the id it asks for, then every new one, in order: the log and the subscription are read
  and registered under one lock, so no event is lost or repeated.
- Cancel: a waiting job is removed at once; a running one stops at its next step boundary (the
  pipeline's per-step callback raises), or, asked after its last one, before its images are handed
  to the writer. A job being saved is generated: a cancel is refused (:class:`Conflict`), it completes.
- Saving: once the engine has returned a job's images, the worker hands them to one writer thread
  (PNG, thumbnail, fsync, database row) and takes the next job, so the GPU does not wait on the
  disk. The job stays ``running`` until its images are stored; only then is it ``completed`` (a
  storage error fails it, as before). The hand-off holds at most :data:`SAVE_QUEUE` jobs: a worker
  that finds it full waits, so unsaved images cannot pile up. The writer saves in hand-off order;
  :meth:`JobManager.stop` lets it finish what was handed to it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import errno
import logging
import math
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import Engine, GenerationRequest
from .remote import RemoteCallAborted, abort_when
from .settings import ServerSettings
from .storage import BrokenImage, Storage, new_job_id

logger = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled")
KEEP_FINISHED = 256  # finished jobs kept in memory (older ones are answered from the database)
SAVE_QUEUE = 1  # jobs waiting for the writer thread (besides the one it writes)


class QueueFull(Exception):
    def __init__(self, retry_after: int, active: int, capacity: int, what: str = "job"):
        super().__init__(f"the {what} queue is full ({active} of {capacity}); retry in {retry_after} s")
        self.retry_after = retry_after
        self.active = active
        self.capacity = capacity


class JobCancelled(Exception):
    pass


class StorageFailed(Exception):
    """The history could not be written (disk full, database error): answered 507 or 503."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


def storage_failure(e: BaseException, what: str) -> StorageFailed:
    """A storage error in the server's words: 507 when the disk (or the database) is full, else 503."""
    text = str(e).strip() or type(e).__name__
    full = getattr(e, "errno", None) == errno.ENOSPC or "full" in text.lower()
    if full:
        return StorageFailed(f"{what}: the server's data folder is full ({text}); free some space "
                             f"(delete images from the history) and try again", 507)
    return StorageFailed(f"{what}: the server cannot write its history ({text})", 503)


class JobTimedOut(Exception):
    pass


class ImageBroken(Exception):
    """An image the engine returned cannot be stored as it is (a Ray replica's PNG that does not decode)."""


class Conflict(Exception):
    """The job is in a state that does not allow this (e.g. cancelling a finished job)."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


@dataclass
class Event:
    id: int
    type: str
    data: dict[str, Any]
    time: float


@dataclass(eq=False)  # identity semantics: jobs are looked up in the queue by identity
class Job:
    id: str
    kind: str
    request: GenerationRequest
    params: dict[str, Any]
    created: float
    status: str = "queued"
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    progress: tuple[int, int] | None = None
    images: list[dict] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)  # what the request should be told (sampling.request_advice)
    events: list[Event] = field(default_factory=list)
    subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def image_view(row: dict) -> dict[str, Any]:
    """An image row as the API shows it."""
    record = row.get("record") or {}
    return {"id": row["id"], "job_id": row["job_id"], "index": row["idx"], "created": row["created"],
            "url": f"/api/v1/images/{row['id']}", "thumbnail_url": f"/api/v1/images/{row['id']}/thumbnail",
            "width": row["width"], "height": row["height"], "seed": row.get("seed"),
            "prompt": record.get("prompt"), "params": record}


class JobManager:
    def __init__(self, engine: Engine, storage: Storage, settings: ServerSettings):
        self.engine = engine
        self.storage = storage
        self.settings = settings
        self.workers = settings.workers
        self.capacity = settings.queue_size + self.workers
        self.task_capacity = max(4, settings.queue_size)
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._running: list[Job] = []
        self._saving: list[Job] = []  # generated, their images handed to the writer thread
        self._handing = 0  # workers waiting for room in the hand-off (busy, though running no job)
        self._saves: queue.Queue = queue.Queue(maxsize=SAVE_QUEUE)
        self._writer: threading.Thread | None = None
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._avg_seconds = 2.0  # moving average of a worker's time per job (a guess until the first one)
        self._timed = 0  # jobs in that average
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.completed_count = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if not self._threads:
            names = ["zimage-worker"] if self.workers == 1 else [f"zimage-worker-{i}" for i in range(self.workers)]
            self._threads = [threading.Thread(target=self._loop, name=name, daemon=True) for name in names]
            for thread in self._threads:
                thread.start()
            self._writer = threading.Thread(target=self._write_loop, name="zimage-writer", daemon=True)
            self._writer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admission, cancel waiting jobs, ask the running one to stop, join the worker, then let
        the writer store the images handed to it (their jobs complete) and join it."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            for job in waiting:
                job.cancel_requested = True
            tasks = list(self._tasks)
            self._tasks.clear()
            for job in self._running:
                job.cancel_requested = True
            self._cond.notify_all()
        for job in waiting:
            self._finish(job, "cancelled", error="the server shut down before the job ran")
        for _, future in tasks:
            future.cancel()
        for thread in self._threads:
            thread.join(timeout)
        if self._writer is not None and self._writer.is_alive():
            try:  # after the joined workers' hand-offs: the writer stores them, then ends
                self._saves.put(None, timeout=timeout)
            except queue.Full:
                logger.warning("the writer thread is stuck; images handed to it may not be stored")
            self._writer.join(timeout)

    # ------------------------------------------------------------------ admission
    def retry_after(self) -> int:
        with self._cond:
            waiting = len(self._queue)
        return int(min(3600, max(1, math.ceil((waiting + 1) * self._avg_seconds / self.workers))))

    def stats(self) -> dict[str, Any]:
        with self._cond:
            saving = sum(not j.terminal for j in self._saving)  # (as in active_jobs)
            return {"running": len(self._running), "saving": saving, "workers": self.workers,
                    "queued": len(self._queue), "capacity": self.capacity, "queue_size": self.settings.queue_size,
                    "tasks": len(self._tasks), "average_job_seconds": round(self._avg_seconds, 3)}

    def submit(self, request: GenerationRequest, kind: str = "generate", advice: list[str] = ()) -> Job:
        now = time.time()
        job = Job(id=new_job_id(), kind=kind, request=request, params=request.params(), created=now,
                  advice=list(advice))
        with self._cond:
            if self._stopping:
                raise QueueFull(5, self.capacity, self.capacity)
            active = len(self._queue) + len(self._running)
            if active >= self.capacity:
                raise QueueFull(self._retry_after_locked(), active, self.capacity)
            ahead = active + self._handing
            try:
                self.storage.insert_job(job.id, kind, job.params, now)
            except (sqlite3.Error, OSError) as e:
                logger.error("job %s not queued: cannot record it: %s", job.id, e)
                raise storage_failure(e, "the job was not queued") from None
            self._jobs[job.id] = job
            self._queue.append(job)
            # jobs ahead of this one: the running ones, and a worker's job waiting for the writer
            self._publish_locked(job, "queued", {"position": ahead})
            self._cond.notify_all()
        return job

    def _retry_after_locked(self) -> int:
        return int(min(3600, max(1, math.ceil((len(self._queue) + 1) * self._avg_seconds / self.workers))))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread (before the next waiting job); returns its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise QueueFull(5, self.task_capacity, self.task_capacity, "task")
            if len(self._tasks) >= self.task_capacity:
                raise QueueFull(max(1, math.ceil(self._avg_seconds)), len(self._tasks), self.task_capacity, "task")
            self._tasks.append((fn, future))
            self._cond.notify_all()
        return future

    # ------------------------------------------------------------------ queries
    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def active_jobs(self) -> list[Job]:
        with self._cond:  # (a job the writer has just finished is still in _saving for a moment)
            return [j for j in self._saving if not j.terminal] + list(self._running) + list(self._queue)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of this one (running jobs count, and a job a worker holds until the writer takes
        it): 0 when running (or saving), None when finished."""
        with self._cond:
            if job.terminal:  # the writer finishes a job before it leaves _saving
                return None
            if any(job is running for running in self._running + self._saving):
                return 0
            try:
                return self._queue.index(job) + len(self._running) + self._handing
            except ValueError:
                return None

    def view(self, job: Job) -> dict[str, Any]:
        with self._cond:
            progress = job.progress
            status = job.status
        out = {"id": job.id, "kind": job.kind, "status": status, "created": job.created, "started": job.started,
               "finished": job.finished, "queue_position": self.position(job), "params": job.params,
               "advice": job.advice, "error": job.error, "cancel_requested": job.cancel_requested,
               "progress": {"step": progress[0], "total": progress[1]} if progress else None,
               "images": [image_view(r) for r in job.images],
               "events_url": f"/api/v1/jobs/{job.id}/events", "url": f"/api/v1/jobs/{job.id}"}
        return out

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> Job:
        """Cancel a waiting job now, or ask a running one to stop at its next step boundary. A
        :class:`Conflict` for a finished job, or one whose images are being stored (too late)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.terminal:
                raise Conflict(f"job {job_id} is already {job.status}", job.status)
            if any(job is saving for saving in self._saving):  # generated: it will complete (or fail) as is
                raise Conflict(f"job {job_id} is already generated and its images are being stored: "
                               f"it is too late to cancel it", job.status)
            if job.status == "queued":
                if job.cancel_requested:  # out of the queue already: another cancel (or stop) is finishing it
                    return job
                self._queue.remove(job)
                job.cancel_requested = True
                waiting = True
            else:
                job.cancel_requested = True
                waiting = False
        if waiting:
            self._finish(job, "cancelled", error=None)
        return job

    # ------------------------------------------------------------------ events
    def _publish_locked(self, job: Job, type_: str, data: dict[str, Any]) -> Event:
        event = Event(len(job.events) + 1, type_, {"job_id": job.id, **data}, time.time())
        job.events.append(event)
        for loop, inbox in list(job.subscribers):  # (not `queue`: the module of the writer's hand-off)
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the subscriber's loop is closed
                job.subscribers.remove((loop, inbox))
        return event

    def publish(self, job: Job, type_: str, data: dict[str, Any]) -> Event:
        with self._cond:
            return self._publish_locked(job, type_, data)

    def subscribe(self, job: Job, after: int = 0) -> tuple[list[Event], asyncio.Queue]:
        """Events after id ``after`` so far, and a queue that receives every later one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            past = [e for e in job.events if e.id > after]
            job.subscribers.append((loop, queue))
        return past, queue

    def unsubscribe(self, job: Job, queue: asyncio.Queue) -> None:
        with self._cond:
            job.subscribers[:] = [(lp, q) for lp, q in job.subscribers if q is not queue]

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._tasks and not self._queue:
                    self._cond.wait()
                if self._stopping:
                    return
                if self._tasks:
                    task, job = self._tasks.popleft(), None
                else:
                    task, job = None, self._queue.popleft()
                    self._running.append(job)
                    job.status = "running"
                    job.started = time.time()
            if task is not None:
                fn, future = task
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                        future.set_exception(e)
                continue
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                logger.exception("job %s: unexpected error in the worker", job.id)
                if not job.terminal:  # every job ends with a final event, whatever went wrong
                    self._finish(job, "failed", error=f"internal error: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._running = [j for j in self._running if j is not job]
                    self._cond.notify_all()

    def _run(self, job: Job) -> None:
        request = job.request
        timeout = self.settings.job_timeout
        t0 = time.perf_counter()

        def timed_out() -> bool:
            return timeout is not None and time.perf_counter() - t0 > timeout

        def callback(step: int, total: int) -> None:
            with self._cond:
                job.progress = (step, total)
                self._publish_locked(job, "progress", {"step": step, "total": total})
                cancel = job.cancel_requested
            if cancel:
                raise JobCancelled()
            if timed_out():
                raise JobTimedOut()

        try:
            try:
                self.storage.update_job(job.id, "running", started=job.started)
            except (sqlite3.Error, OSError) as e:
                raise storage_failure(e, "the job could not be started") from None
            # A remote text encoder (--encoder-url) that is slow to answer gives up on a cancel or the time limit.
            with abort_when(lambda: job.cancel_requested or timed_out()):
                try:
                    advice = self._length_advice(request)
                    with self._cond:
                        job.advice = job.advice + advice
                        self._publish_locked(job, "started", {"steps": request.steps, "n": request.n,
                                                              **({"advice": job.advice} if advice else {})})
                    if job.cancel_requested:
                        raise JobCancelled()
                    results = self.engine.generate(request, callback)
                except RemoteCallAborted:
                    if job.cancel_requested:
                        raise JobCancelled() from None
                    raise JobTimedOut() from None
            made = time.time()  # one timestamp: the history lists a job's images together, in order
            with self._cond:
                if job.cancel_requested:  # accepted after the last step boundary: the cancel still holds
                    raise JobCancelled()
                self._running = [j for j in self._running if j is not job]
                self._saving.append(job)
                self._handing += 1
                self._cond.notify_all()
            try:
                self._saves.put((job, results, t0, made))  # waits while the writer is SAVE_QUEUE jobs behind
            finally:
                with self._cond:
                    self._handing -= 1
                    # The worker's time for the job (generating, then waiting for room in the hand-off):
                    # what each job ahead costs a waiting one, the writer saving alongside (Retry-After).
                    busy = time.perf_counter() - t0
                    self._avg_seconds = 0.7 * self._avg_seconds + 0.3 * busy if self._timed else busy
                    self._timed += 1
        except Exception as e:  # noqa: BLE001 - every job ends with a final event
            self._end_with(job, e)

    def _write_loop(self) -> None:
        """The writer thread: store each handed-off job's images, then complete (or fail) the job."""
        while True:
            item = self._saves.get()
            if item is None:
                return
            job = item[0]
            try:
                self._store(*item)
            except Exception as e:  # noqa: BLE001 - the writer must survive anything
                logger.exception("job %s: unexpected error while saving its images", job.id)
                if not job.terminal:
                    self._finish(job, "failed", error=f"internal error: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._saving = [j for j in self._saving if j is not job]
                    self._cond.notify_all()

    def _store(self, job: Job, results: list, t0: float, made: float) -> None:
        try:
            rows = self._save_images(job, results, made)
            job.images = rows
            seconds = time.perf_counter() - t0  # the job's time until its images were stored
            with self._cond:
                self.completed_count += 1
            if self.settings.max_history is not None:  # before "completed": a client that then lists the
                try:  # history or the files sees them pruned
                    self.storage.prune(self.settings.max_history, spare_job=job.id)
                except (sqlite3.Error, OSError) as e:  # the images are saved: the job still completed
                    logger.error("job %s: pruning the history failed: %s", job.id, e)
            self._finish(job, "completed", data={"images": [image_view(r) for r in rows],
                                                 "seconds": round(seconds, 4)})
        except (StorageFailed, ImageBroken) as e:
            self._end_with(job, e)

    def _save_images(self, job: Job, results: list, made: float) -> list[dict]:
        """Store the job's images, all or none: when one fails, those stored before it are deleted
        again (a failed job has no images in the history)."""
        rows: list[dict] = []
        try:
            for k, result in enumerate(results):
                try:
                    rows.append(self.storage.save_image(job.id, k, result.image, result.record, result.pnginfo(),
                                                        created=made, png=result.png))
                except BrokenImage as e:  # a replica's PNG that does not decode (not the disk's fault)
                    raise ImageBroken(f"image {k} of the job: {e}") from None
                except (sqlite3.Error, OSError) as e:
                    raise storage_failure(e, f"image {k} of the job could not be saved") from None
        except BaseException:
            for row in rows:
                try:
                    self.storage.delete_image(row["id"])
                except Exception as e:  # noqa: BLE001 - the job fails all the same
                    logger.error("job %s: image %s stays in the history of the failed job: %s", job.id, row["id"], e)
            raise
        return rows

    def _end_with(self, job: Job, e: Exception) -> None:
        """End a job that raised ``e`` while it ran or while its images were saved."""
        if isinstance(e, JobCancelled):
            step = job.progress[0] if job.progress else 0
            self._finish(job, "cancelled", data={"step": step})
        elif isinstance(e, JobTimedOut):
            self._finish(job, "failed", error=f"the job ran longer than the limit of {self.settings.job_timeout:g} s")
        elif isinstance(e, StorageFailed):
            logger.error("job %s failed: %s", job.id, e)
            self._finish(job, "failed", error=str(e))
        else:  # reported to the client as a failed job
            logger.warning("job %s failed: %s", job.id, e, exc_info=logger.isEnabledFor(logging.DEBUG))
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._finish(job, "failed", error=message)

    def _length_advice(self, request: GenerationRequest) -> list[str]:
        """The request's texts that are cut to its max_sequence_length (Engine.length_advice); a
        count that fails (a remote encoder down) says nothing here: the encoding reports it."""
        try:
            return self.engine.length_advice(request, self.settings.limits.max_sequence_length)
        except RemoteCallAborted:
            raise
        except Exception as e:  # noqa: BLE001 - advice only
            logger.debug("the prompts' token counts failed: %s", e)
            return []

    def _finish(self, job: Job, status: str, *, error: str | None = None, data: dict | None = None) -> None:
        """End the job: its state in memory and its final event first (what clients wait for), then
        its row. A row that cannot be written is logged; start-up repairs it (a row left running
        becomes failed)."""
        now = time.time()
        with self._cond:
            if job.terminal:  # ended already (a cancel and a shutdown can meet here)
                return
            # Do not keep input images in memory (the request is frozen: keep a copy without them).
            job.request = dataclasses.replace(job.request, image=None, mask_image=None, control_image=None)
            job.status = status
            job.error = error
            job.finished = now
            payload = dict(data or {})
            if status == "failed":
                payload["error"] = error
            elif error:
                payload["reason"] = error
            self._publish_locked(job, status, payload)
            job.subscribers.clear()
            self._evict_locked()
        try:
            self.storage.update_job(job.id, status, error=error, finished=now)
        except Exception as e:  # noqa: BLE001 - the job has ended for its clients; only the history lags
            logger.error("job %s %s, but its history row could not be updated: %s", job.id, status, e)

    def _evict_locked(self) -> None:
        finished = [jid for jid, j in self._jobs.items() if j.terminal]
        for jid in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[jid]
