"""What every router shares: the engine, the settings, the history, the job manager, and the few
operations several API families use (submit, wait for a job, run a call on the worker, look a job
or an image up)."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from .engine import Engine
from .jobs import TERMINAL, Conflict, Event, Job, JobManager, image_view
from .remote import RemoteEncoderError
from ..sampling import request_advice
from .schemas import ApiError, Models, build_models, resolve_generation
from .settings import Limits, ServerSettings
from .storage import IMAGE_ID, JOB_ID, Storage

MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"no {what} with id {ident!r}", "not_found")


def encode_output(path: Path, fmt: str, compression: int | None = None) -> bytes:
    """The stored PNG as is, or converted to JPEG/WebP (quality = output_compression, default 90)."""
    if fmt == "png":
        return path.read_bytes()
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buffer, format=fmt.upper(), quality=90 if compression is None else compression)
    return buffer.getvalue()


@dataclass
class ServerContext:
    engine: Engine
    settings: ServerSettings
    storage: Storage
    manager: JobManager
    models: Models | None = None  # the request bodies under these limits (built at start-up when None)

    def __post_init__(self):
        if self.models is None:
            registry = self.engine.registry
            names = [t.name for t in registry.list(None)]
            rewriters = [t.name for t in registry.list("rewriter")] if "rewriter" in registry.categories() else []

            def hint(name: str) -> str:
                try:
                    self.engine.template(name)
                except KeyError as e:
                    return str(e.args[0]) if e.args else f"unknown template {name!r}"
                return f"{name!r} is not a template of this server"

            self.models = build_models(self.limits, names, rewriters, hint)

    @property
    def limits(self) -> Limits:
        return self.settings.limits

    def require_generation(self) -> None:
        if not self.engine.can_generate:
            raise ApiError(503, "this server runs the text encoder only (--encoder-only); it cannot generate images",
                           "unavailable")

    def submit(self, body) -> Job:
        self.require_generation()
        request = resolve_generation(body, self.engine, self.limits)
        advice = request_advice(self.engine.variant, request.guidance_scale, request.steps,
                                body.negative_prompt not in (None, ""))
        return self.manager.submit(request, advice=advice)

    async def on_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread (which owns the model) and await its result."""
        try:
            return await asyncio.wrap_future(self.manager.call(fn))
        except RemoteEncoderError as e:  # --encoder-url: the encoder machine failed, not this request
            raise ApiError(e.status, f"the remote text encoder failed: {e}", "upstream") from None
        except (ValueError, KeyError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ApiError(422, str(message), "invalid_request_error") from None

    async def wait(self, job: Job, timeout: float,
                   disconnected: Callable[[], Awaitable[bool]] | None = None) -> Event:
        """The job's terminal event. The job is cancelled if it takes longer than ``timeout``, or
        once ``disconnected()`` (checked every half second) says the client has gone. A job that is
        too late to cancel (generated, its images being stored) is waited for: it will complete
        (or fail), and that is what is answered, never "cancelled"."""
        past, queue = self.manager.subscribe(job)
        try:
            for event in past:
                if event.type in TERMINAL:
                    return event
            deadline: float | None = time.monotonic() + timeout
            checked = time.monotonic()
            while True:
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    if self._cancel_quietly(job):
                        raise ApiError(504, f"the job did not finish within {timeout:g} s and was cancelled",
                                       "timeout")
                    deadline = remaining = disconnected = None  # too late to cancel: wait for its end
                if disconnected is not None and now - checked >= 0.5:  # progress events may never pause
                    checked = now
                    if await disconnected():
                        if self._cancel_quietly(job):  # nobody is left to receive the images
                            raise ApiError(499, "the client disconnected; the job was cancelled", "cancelled")
                        deadline = remaining = disconnected = None
                try:
                    event = await asyncio.wait_for(queue.get(), min(remaining, 0.5) if disconnected else remaining)
                except asyncio.TimeoutError:
                    continue
                if event.type in TERMINAL:
                    return event
        finally:
            self.manager.unsubscribe(job, queue)

    def _cancel_quietly(self, job: Job) -> bool:
        """Cancel ``job``; False when it is too late (ended meanwhile, or its images are being stored)."""
        try:
            self.manager.cancel(job.id)
        except (KeyError, Conflict):
            return False
        return True

    async def run_sync(self, body, request=None) -> tuple[Job, Event]:
        """Submit, wait for the job's end; a job that did not complete is an error (500 failed,
        409 cancelled). The synchronous routes (OpenAI, /api/generate) answer with this; given
        their ``request``, the job is cancelled when the client disconnects."""
        job = await asyncio.to_thread(self.submit, body)
        event = await self.wait(job, self.settings.sync_timeout, request.is_disconnected if request else None)
        if event.type != "completed":
            reason = event.data.get("error") or event.data.get("reason") or ""
            raise ApiError(500 if event.type == "failed" else 409, f"generation {event.type}: {reason}".rstrip(": "),
                           "server_error" if event.type == "failed" else "cancelled")
        return job, event

    def job_from_db(self, job_id: str) -> dict | None:
        row = self.storage.get_job(job_id) if JOB_ID.match(job_id) else None
        if row is None:
            return None
        images = [image_view(r) for r in self.storage.job_images(job_id)]
        return {"id": row["id"], "kind": row["kind"], "status": row["status"], "created": row["created"],
                "started": row["started"], "finished": row["finished"], "queue_position": None,
                "params": row["params"], "advice": [], "error": row["error"], "cancel_requested": False, "progress": None,
                "images": images, "events_url": f"/api/v1/jobs/{job_id}/events", "url": f"/api/v1/jobs/{job_id}"}

    def image_row(self, image_id: str) -> dict:
        row = self.storage.get_image(image_id) if IMAGE_ID.match(image_id) else None
        if row is None:
            raise not_found("image", image_id)
        return row

    def image_bytes(self, image_id: str, fmt: str = "png", compression: int | None = None) -> bytes:
        """A stored image's bytes (converted to ``fmt``); 404 when it is gone (deleted meanwhile)."""
        row = self.image_row(image_id)
        path = self.storage.image_file(row)
        try:
            if path is not None:
                return encode_output(path, fmt, compression)
        except FileNotFoundError:
            pass
        raise not_found("image file", image_id)

    def history(self, limit: int, offset: int) -> dict:
        limit = max(1, min(limit, 1000))
        items = [image_view(r) for r in self.storage.list_images(limit, max(0, offset))]
        return {"items": items, "total": self.storage.count_images(), "limit": limit, "offset": max(0, offset)}
