"""The job API: submit (202 or 429), list, status, Server-Sent Events, cancel, capabilities."""

# No `from __future__ import annotations`: the request body's type is built per app (its limits)
# and FastAPI must see it as an object, not as a name to look up.
import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ... import __version__
from ..context import MEDIA, ServerContext, not_found
from ..jobs import TERMINAL, Conflict, Event
from ..openapi import SSE_EVENT, errors
from ..schemas import MAX_INT, ApiError, IdPath, Int, Text, default_side
from ..storage import JOB_ID

JobId = IdPath(JOB_ID, "job")
EventId = Text(18, pattern=r"^[0-9]{1,18}$", description="the id of the last event received (SSE resume)")

PRESETS = [("1:1", 1024, 1024), ("2:3", 832, 1248), ("3:2", 1248, 832), ("3:4", 864, 1152), ("4:3", 1152, 864),
           ("9:16", 720, 1280), ("16:9", 1280, 720), ("1:1 small", 512, 512)]


def sse(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data, ensure_ascii=False)}\n\n"


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(tags=["jobs"])
    engine, manager, limits = ctx.engine, ctx.manager, ctx.limits
    JobRequest = ctx.models.job

    @api.get("/api/v1/capabilities")
    async def get_capabilities():
        """Model, variant, defaults, limits, queue, resolution presets, text encoder facts."""
        presets = [{"label": label, "width": w, "height": h} for label, w, h in PRESETS
                   if limits.min_side <= min(w, h) and max(w, h) <= limits.max_side and w * h <= limits.max_pixels]
        out: dict[str, Any] = {
            "version": __version__,
            **engine.describe(),
            "features": {"generate": engine.can_generate, "img2img": engine.can_generate,
                         "inpaint": engine.can_generate and engine.can_inpaint,
                         "control": engine.can_generate and engine.can_control, "encode": True,
                         "rewrite": engine.can_rewrite, "openai": engine.can_generate,
                         "first_block_cache": engine.can_generate and engine.cache_problem is None},
            "defaults": {"width": default_side(limits), "height": default_side(limits), "steps": engine.default_steps,
                         "guidance_scale": engine.default_guidance,
                         "max_sequence_length": min(512, limits.max_sequence_length), "strength": 0.6,
                         "inpaint_strength": 1.0, "control_scale": 0.75, "n": 1},
            "limits": limits.as_dict(),
            "queue": manager.stats(),
            "presets": presets,
            "output_formats": list(MEDIA),
            "text_encoder": engine.text_encoder_info(),
            "auth": ctx.settings.token is not None,
        }
        return out

    @api.post("/api/v1/jobs", status_code=202, responses=errors(429, 503, 507))
    async def create_job(body: JobRequest):
        """Queue a generation. 202 with the job (id, status, queue_position, events_url); 429 with
        Retry-After when the queue is full."""
        job = await asyncio.to_thread(ctx.submit, body)
        return JSONResponse(manager.view(job), status_code=202, headers={"Location": f"/api/v1/jobs/{job.id}"})

    @api.get("/api/v1/jobs")
    def list_jobs(limit: Int(1, 500) = 50):
        """Active jobs (running, then waiting) followed by the most recent finished ones."""
        active = [manager.view(j) for j in manager.active_jobs()]
        seen = {j["id"] for j in active}
        recent = []
        for row in ctx.storage.list_jobs(limit):
            if row["id"] not in seen:  # a job still in memory is more current than its row
                job = manager.get(row["id"])
                recent.append(manager.view(job) if job is not None else ctx.job_from_db(row["id"]))
        return {"jobs": active + [r for r in recent if r][: max(0, limit - len(active))], "queue": manager.stats()}

    @api.get("/api/v1/jobs/{job_id}", responses=errors(404))
    def get_job(job_id: JobId):
        job = manager.get(job_id)
        if job is not None:
            return manager.view(job)
        found = ctx.job_from_db(job_id)
        if found is None:
            raise not_found("job", job_id)
        return found

    @api.get("/api/v1/jobs/{job_id}/events", responses={
        200: {"description": "The job's events as Server-Sent Events",
              "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        204: {"description": "The job has ended and the client has seen every event"},
        **errors(404, 409)})
    async def job_events(job_id: JobId, after: Int(0, MAX_INT) = None,
                         last_event_id: Annotated[EventId, Header()] = None):
        # Optional parameters typed without "| None": absent means None, and the schema does not
        # offer null (which would travel as the text "null" in a query or a header).
        """Server-Sent Events: ``queued``, ``started``, ``progress`` (step, total) per step, then
        ``completed`` (images), ``failed`` (error) or ``cancelled``. Each event has an id; a client
        resumes with ``Last-Event-ID`` (or ``?after=``). 204 once a finished job has nothing more."""
        job = manager.get(job_id)
        if job is None:
            found = ctx.job_from_db(job_id)
            if found is None:
                raise not_found("job", job_id)
            if found["status"] not in TERMINAL:
                raise ApiError(409, f"job {job_id} is {found['status']} but not known to this server", "conflict")
            data = {"job_id": job_id, "images": found["images"]} if found["status"] == "completed" else \
                {"job_id": job_id, "error": found["error"]}
            text = sse(Event(1, found["status"], data, found["finished"] or time.time()))
            return StreamingResponse(iter([text]), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        start = int(last_event_id or 0) if after is None else after
        past, queue = manager.subscribe(job, start)
        if job.terminal and not past:
            manager.unsubscribe(job, queue)
            return Response(status_code=204)

        async def stream():
            try:
                yield "retry: 1000\n\n"
                for event in past:
                    yield sse(event)
                    if event.type in TERMINAL:
                        return
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), 15.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield sse(event)
                    if event.type in TERMINAL:
                        return
            finally:
                manager.unsubscribe(job, queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/api/v1/jobs/{job_id}/cancel", responses=errors(404, 409))
    def cancel_job(job_id: JobId):
        """A waiting job is cancelled at once; a running one stops at its next step (its events
        end with ``cancelled``). 409 for a finished job."""
        try:
            job = manager.cancel(job_id)
        except KeyError:
            found = ctx.job_from_db(job_id)
            if found is None:
                raise not_found("job", job_id) from None
            raise ApiError(409, f"job {job_id} is already {found['status']}", "conflict") from None
        except Conflict as e:
            raise ApiError(409, str(e), "conflict") from None
        return manager.view(job)

    return api
