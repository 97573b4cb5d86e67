"""The FastAPI app: job API with Server-Sent Events, OpenAI-compatible route, the predecessor's
``/api/*`` routes as thin adapters, the web page, and the middleware for limits and the token.

``create_app(engine, settings)`` builds it; ``zimage serve`` runs it with uvicorn. The route list
with request and response shapes is in docs/server.md and at ``/docs`` (OpenAPI).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from .. import __version__
from .engine import Engine, EngineUnavailable
from .jobs import TERMINAL, Conflict, Event, Job, JobManager, QueueFull, image_view
from .remote import features_to_bytes
from .schemas import (
    ApiError,
    EncodeRequest,
    FormatPromptRequest,
    JobRequest,
    LegacyGenerateRequest,
    LoginRequest,
    OpenAIImageRequest,
    RewriteRequest,
    TokenizeRequest,
    check_max_len,
    check_prompt_fields,
    check_text,
    invalid,
    openai_to_job,
    resolve_generation,
)
from .settings import ServerSettings
from .storage import IMAGE_ID, JOB_ID, Storage

logger = logging.getLogger(__name__)

COOKIE = "zimage_token"
OPEN_PATHS = ("/health", "/", "/favicon.ico", "/api/v1/login")  # no token needed (the page shell and its assets too)
OPEN_PREFIXES = ("/static/",)
PRESETS = [("1:1", 1024, 1024), ("2:3", 832, 1248), ("3:2", 1248, 832), ("3:4", 864, 1152), ("4:3", 1152, 864),
           ("9:16", 720, 1280), ("16:9", 1280, 720), ("1:1 small", 512, 512)]
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def web_dir() -> Path:
    return Path(str(resources.files("zimage_native.server") / "web"))


def error_body(status: int, message: str, type_: str, param: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status, **extra}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param, **extra), status_code=status, headers=headers)


def queue_full_response(e: QueueFull) -> JSONResponse:
    return error_response(429, f"The queue is full ({e.active} of {e.capacity} places taken). "
                               f"Try again in {e.retry_after} s.", "queue_full",
                          headers={"Retry-After": str(e.retry_after)}, retry_after=e.retry_after)


# ------------------------------------------------------------------------------------ middleware
class LimitsAndAuth:
    """Pure ASGI middleware: request body size (413) and the bearer token (401).

    The token comes as ``Authorization: Bearer <token>`` or in the ``zimage_token`` cookie (set by
    ``POST /api/v1/login``, used by the web page, whose image and event requests cannot carry
    headers). Comparison is constant-time. Open without a token: ``/health``, the page shell
    (``/``, ``/static/*``) and the login route, which checks the token itself.
    """

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.token is not None and not self._open(path) and not self.authorized(headers):
            return await self._send(send, 401, error_body(401, "a valid bearer token is required "
                                                               "(Authorization: Bearer <token>)", "unauthorized"),
                                    {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await self._send(send, 400, error_body(400, "bad Content-Length", "invalid_request_error"))
            if too_big:
                return await self._send(send, 413, error_body(
                    413, f"the request body is larger than the limit of {self.max_body} bytes", "payload_too_large"))
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise StarletteHTTPException(413, f"the request body is larger than the limit of "
                                                      f"{self.max_body} bytes")
            return message

        return await self.app(scope, counted, send)

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def authorized(self, headers: dict[str, str]) -> bool:
        given = None
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif "cookie" in headers:
            for part in headers["cookie"].split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    given = value
        return given is not None and hmac.compare_digest(given.encode(), self.token)

    @staticmethod
    async def _send(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------ helpers
def sse(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data, ensure_ascii=False)}\n\n"


def encode_output(path: Path, fmt: str, compression: int | None = None) -> bytes:
    """The stored PNG as is, or converted to JPEG/WebP (quality = output_compression, default 90)."""
    if fmt == "png":
        return path.read_bytes()
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buffer, format=fmt.upper(), quality=90 if compression is None else compression)
    return buffer.getvalue()


def _after(value: str | None) -> int:
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        return 0


def create_app(engine: Engine, settings: ServerSettings | None = None, *, warmup: bool = False) -> FastAPI:
    """The server app around ``engine``; history lives in ``settings.data_dir``.

    At creation the history is repaired (see :meth:`Storage.reconcile`); the worker thread starts
    with the app (lifespan) and stops with it. ``warmup``: run ``engine.warmup()`` on the worker
    thread during start-up, so that compiled code and captured graphs belong to the thread that
    later runs the jobs; uvicorn only starts listening once it is done.
    """
    settings = settings or ServerSettings()
    limits = settings.limits
    storage = Storage(settings.data_dir, full_sync=settings.full_sync, thumbnail_size=settings.thumbnail_size)
    repaired = storage.reconcile()
    manager = JobManager(engine, storage, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        if warmup:
            t = time.perf_counter()
            await asyncio.wrap_future(manager.call(engine.warmup))
            logger.info("warm-up done in %.1f s", time.perf_counter() - t)
        try:
            yield
        finally:
            await asyncio.to_thread(manager.stop)
            storage.close()

    app = FastAPI(title="zimage-native server", version=__version__, lifespan=lifespan,
                  description="Z-Image generation: job API with live progress, OpenAI-compatible images route, "
                              "remote text encoding, persistent history. See docs/server.md.")
    app.state.engine = engine
    app.state.settings = settings
    app.state.storage = storage
    app.state.manager = manager
    app.state.repaired = repaired
    app.add_middleware(LimitsAndAuth, token=settings.token, max_body=limits.max_body_bytes)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        details, parts = [], []
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
            field = ".".join(loc) or "body"
            details.append({"param": field, "message": err.get("msg", "invalid")})
            parts.append(f"{field}: {err.get('msg', 'invalid')}")
        return error_response(422, "; ".join(parts) or "invalid request", "invalid_request_error",
                              details[0]["param"] if details else None, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        types = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 401: "unauthorized"}
        return error_response(e.status_code, str(e.detail), types.get(e.status_code, "http_error"),
                              headers=getattr(e, "headers", None))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, e: QueueFull):
        return queue_full_response(e)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, e: EngineUnavailable):
        return error_response(503, str(e), "unavailable")

    def not_found(what: str, ident: str) -> ApiError:
        return ApiError(404, f"no {what} with id {ident!r}", "not_found")

    def require_generation() -> None:
        if not engine.can_generate:
            raise ApiError(503, "this server runs the text encoder only (--encoder-only); it cannot generate images",
                           "unavailable")

    async def on_worker(fn):
        """Run ``fn`` on the worker thread (which owns the model) and await its result."""
        try:
            return await asyncio.wrap_future(manager.call(fn))
        except (ValueError, KeyError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ApiError(422, str(message), "invalid_request_error") from None

    def submit(body: JobRequest) -> Job:
        require_generation()
        return manager.submit(resolve_generation(body, engine, limits))

    async def wait(job: Job, timeout: float) -> Event:
        """The job's terminal event (the job is cancelled if it takes longer than ``timeout``)."""
        past, queue = manager.subscribe(job)
        try:
            for event in past:
                if event.type in TERMINAL:
                    return event
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    try:
                        manager.cancel(job.id)
                    except (KeyError, Conflict):
                        pass
                    raise ApiError(504, f"the job did not finish within {timeout:g} s and was cancelled", "timeout")
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
                if event.type in TERMINAL:
                    return event
        finally:
            manager.unsubscribe(job, queue)

    def job_from_db(job_id: str) -> dict | None:
        row = storage.get_job(job_id)
        if row is None:
            return None
        images = [image_view(r) for r in storage.job_images(job_id)]
        return {"id": row["id"], "kind": row["kind"], "status": row["status"], "created": row["created"],
                "started": row["started"], "finished": row["finished"], "queue_position": None,
                "params": row["params"], "error": row["error"], "cancel_requested": False, "progress": None,
                "images": images, "events_url": f"/api/v1/jobs/{job_id}/events", "url": f"/api/v1/jobs/{job_id}"}

    def capabilities() -> dict[str, Any]:
        presets = [{"label": label, "width": w, "height": h} for label, w, h in PRESETS
                   if limits.min_side <= min(w, h) and max(w, h) <= limits.max_side and w * h <= limits.max_pixels]
        return {
            "version": __version__,
            **engine.describe(),
            "features": {"generate": engine.can_generate, "img2img": engine.can_generate, "encode": True,
                         "rewrite": engine.can_rewrite, "openai": engine.can_generate},
            "defaults": {"width": 1024, "height": 1024, "steps": engine.default_steps,
                         "guidance_scale": engine.default_guidance, "max_sequence_length": 512, "strength": 0.6,
                         "n": 1},
            "limits": limits.as_dict(),
            "queue": manager.stats(),
            "presets": presets,
            "output_formats": list(MEDIA),
            "text_encoder": engine.text_encoder_info(),
            "auth": settings.token is not None,
        }

    # ------------------------------------------------------------------ health, page, login
    @app.get("/health", tags=["server"])
    async def health():
        """Open without a token. ``status`` is ``ok`` once the model is loaded (the server only
        starts listening then)."""
        return {"status": "ok", "model": engine.model_name, "version": __version__, "queue": manager.stats(),
                "generate": engine.can_generate}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(web_dir() / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=web_dir()), name="static")

    @app.post("/api/v1/login", tags=["server"])
    async def login(body: LoginRequest):
        """Check a token and set it as an HttpOnly, SameSite=Strict cookie (for the web page)."""
        if settings.token is None:
            return {"auth": False}
        if not hmac.compare_digest(body.token.encode(), settings.token.encode()):
            raise ApiError(401, "wrong token", "unauthorized")
        response = JSONResponse({"auth": True})
        response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", path="/")
        return response

    # ------------------------------------------------------------------ job API
    @app.get("/api/v1/capabilities", tags=["jobs"])
    async def get_capabilities():
        """Model, variant, defaults, limits, queue, resolution presets, text encoder facts."""
        return capabilities()

    @app.post("/api/v1/jobs", status_code=202, tags=["jobs"])
    async def create_job(body: JobRequest):
        """Queue a generation. 202 with the job (id, status, queue_position, events_url); 429 with
        Retry-After when the queue is full."""
        job = await asyncio.to_thread(submit, body)
        return JSONResponse(manager.view(job), status_code=202, headers={"Location": f"/api/v1/jobs/{job.id}"})

    @app.get("/api/v1/jobs", tags=["jobs"])
    def list_jobs(limit: int = 50):
        """Active jobs (running, then waiting) followed by the most recent finished ones."""
        limit = max(1, min(limit, 500))
        active = [manager.view(j) for j in manager.active_jobs()]
        seen = {j["id"] for j in active}
        recent = [job_from_db(r["id"]) for r in storage.list_jobs(limit) if r["id"] not in seen]
        return {"jobs": active + [r for r in recent if r][: max(0, limit - len(active))], "queue": manager.stats()}

    @app.get("/api/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str):
        job = manager.get(job_id)
        if job is not None:
            return manager.view(job)
        found = job_from_db(job_id) if JOB_ID.match(job_id) else None
        if found is None:
            raise not_found("job", job_id)
        return found

    @app.get("/api/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request, after: int | None = None):
        """Server-Sent Events: ``queued``, ``started``, ``progress`` (step, total) per step, then
        ``completed`` (images), ``failed`` (error) or ``cancelled``. Each event has an id; a client
        resumes with ``Last-Event-ID`` (or ``?after=``). 204 once a finished job has nothing more."""
        job = manager.get(job_id)
        if job is None:
            found = job_from_db(job_id) if JOB_ID.match(job_id) else None
            if found is None:
                raise not_found("job", job_id)
            if found["status"] not in TERMINAL:
                raise ApiError(409, f"job {job_id} is {found['status']} but not known to this server",
                               "conflict")
            data = {"job_id": job_id, "images": found["images"]} if found["status"] == "completed" else \
                {"job_id": job_id, "error": found["error"]}
            text = sse(Event(1, found["status"], data, found["finished"] or time.time()))
            return StreamingResponse(iter([text]), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        start = _after(request.headers.get("last-event-id")) if after is None else max(0, after)
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

    @app.post("/api/v1/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel_job(job_id: str):
        """A waiting job is cancelled at once; a running one stops at its next step (its events
        end with ``cancelled``). 409 for a finished job."""
        try:
            job = manager.cancel(job_id)
        except KeyError:
            found = job_from_db(job_id) if JOB_ID.match(job_id) else None
            if found is None:
                raise not_found("job", job_id) from None
            raise ApiError(409, f"job {job_id} is already {found['status']}", "conflict") from None
        except Conflict as e:
            raise ApiError(409, str(e), "conflict") from None
        return manager.view(job)

    # ------------------------------------------------------------------ images and history
    def image_row(image_id: str) -> dict:
        row = storage.get_image(image_id) if IMAGE_ID.match(image_id) else None
        if row is None:
            raise not_found("image", image_id)
        return row

    @app.get("/api/v1/images/{image_id}", tags=["images"])
    def get_image(image_id: str, format: str = "png", download: bool = False):
        """The image as stored (PNG with its generation metadata), or converted (jpeg, webp)."""
        if format not in MEDIA:
            raise invalid("format", f"must be one of {sorted(MEDIA)}, got {format!r}")
        row = image_row(image_id)
        path = storage.image_file(row)
        if path is None or not path.is_file():
            raise not_found("image file", image_id)
        headers = {"Cache-Control": "private, max-age=86400"}
        if download:
            headers["Content-Disposition"] = f'attachment; filename="{image_id}.{format}"'
        if format == "png":
            return FileResponse(path, media_type="image/png", headers=headers)
        return Response(encode_output(path, format), media_type=MEDIA[format], headers=headers)

    @app.get("/api/v1/images/{image_id}/thumbnail", tags=["images"])
    def get_thumbnail(image_id: str):
        row = image_row(image_id)
        path = storage.thumb_file(row)
        if path is None or not path.is_file():
            path = storage.image_file(row)
            return FileResponse(path, media_type="image/png")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    def history(limit: int, offset: int) -> dict:
        limit = max(1, min(limit, 1000))
        items = [image_view(r) for r in storage.list_images(limit, max(0, offset))]
        return {"items": items, "total": storage.count_images(), "limit": limit, "offset": max(0, offset)}

    @app.get("/api/v1/images", tags=["images"])
    def list_images(limit: int = 100, offset: int = 0):
        """The history, newest first."""
        return history(limit, offset)

    @app.delete("/api/v1/images/{image_id}", tags=["images"])
    def delete_image(image_id: str):
        if not (IMAGE_ID.match(image_id) and storage.delete_image(image_id)):
            raise not_found("image", image_id)
        return {"deleted": image_id}

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.post("/v1/images/generations", tags=["openai"])
    async def openai_generate(body: OpenAIImageRequest, request: Request):
        """OpenAI Images API. Extensions: negative_prompt, num_inference_steps, guidance_scale,
        seed. Waits for the image on the same queue as the job API (429 when full)."""
        job = await asyncio.to_thread(submit, openai_to_job(body))
        event = await wait(job, settings.sync_timeout)
        if event.type != "completed":
            raise ApiError(500 if event.type == "failed" else 409,
                           f"generation {event.type}: {event.data.get('error') or event.data.get('reason') or ''}"
                           .rstrip(": "), "server_error" if event.type == "failed" else "cancelled")
        fmt = body.output_format or "png"
        data = []
        base = str(request.base_url).rstrip("/")
        for image in event.data["images"]:
            if body.response_format == "url":
                url = base + image["url"] + ("" if fmt == "png" else f"?format={fmt}")
                data.append({"url": url, "revised_prompt": None})
            else:
                path = storage.image_file(storage.get_image(image["id"]))
                raw = await asyncio.to_thread(encode_output, path, fmt, body.output_compression)
                data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": None})
        first = event.data["images"][0]
        return {"created": int(job.created), "data": data, "output_format": fmt,
                "size": f"{first['width']}x{first['height']}"}

    @app.get("/v1/models", tags=["openai"])
    async def openai_models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "zimage-native"}]}

    # ------------------------------------------------------------------ the predecessor's routes
    @app.post("/api/generate", tags=["compat"])
    async def legacy_generate(body: LegacyGenerateRequest, request: Request):
        """Synchronous generation (the predecessor's route): waits, then returns the first image as a
        data URL plus every image's id and URL."""
        job = await asyncio.to_thread(submit, body)
        event = await wait(job, settings.sync_timeout)
        if event.type != "completed":
            raise ApiError(500 if event.type == "failed" else 409,
                           f"generation {event.type}: {event.data.get('error') or ''}".rstrip(": "),
                           "server_error" if event.type == "failed" else "cancelled")
        images = event.data["images"]
        path = storage.image_file(storage.get_image(images[0]["id"]))
        raw = await asyncio.to_thread(path.read_bytes)
        first = images[0]["params"]
        return {"image": "data:image/png;base64," + base64.b64encode(raw).decode("ascii"),
                "id": images[0]["id"], "job_id": job.id, "url": images[0]["url"], "seed": images[0]["seed"],
                "seeds": [i["seed"] for i in images], "width": images[0]["width"], "height": images[0]["height"],
                "formatted_prompt": first.get("formatted_prompt"), "generation_time": event.data.get("seconds"),
                "images": images}

    def encode_texts(body: EncodeRequest) -> list[str]:
        if (body.texts is None) == (body.prompt is None):
            raise invalid("texts", "give exactly one of texts (already chat-formatted) and prompt")
        check_max_len(body.max_sequence_length, limits)
        if body.texts is not None:
            texts = body.texts
            if any(f is not None for f in (body.template, body.system_prompt, body.thinking_content,
                                           body.assistant_content, body.force_think_block, body.strip_quotes)):
                raise invalid("texts", "pre-formatted texts take no prompt fields (template, system_prompt, ...)")
            for text in texts:
                if not text:
                    raise invalid("texts", "must not contain empty texts")
                check_text("texts", text, limits)
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            for p in prompts:
                check_text("prompt", p, limits, required=True)
            fields = check_prompt_fields(body, limits, engine)
            template = fields.pop("template", None)
            texts = engine.format_prompts(prompts, template, **fields)
        if not 1 <= len(texts) <= limits.max_texts:
            raise invalid("texts", f"give between 1 and {limits.max_texts} texts, got {len(texts)}")
        return texts

    async def encoded(body: EncodeRequest) -> tuple[bytes, list[str]]:
        texts = encode_texts(body)
        features = await on_worker(lambda: engine.encode(texts, body.max_sequence_length))
        return await asyncio.to_thread(features_to_bytes, features, texts), texts

    @app.post("/api/encode", tags=["compat", "remote encoder"],
              responses={200: {"content": {"application/octet-stream": {}},
                               "description": "safetensors: features.0 ... features.N-1, (L_i, hidden)"}})
    async def encode(body: EncodeRequest):
        """Prompt features as safetensors bytes (dtype and shape kept). Body: ``texts`` (already
        chat-formatted, what RemoteTextEncoder sends) or ``prompt`` plus the chat-format fields."""
        data, texts = await encoded(body)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Zimage-Format": "zimage-features/1", "X-Zimage-Count": str(len(texts))})

    @app.post("/api/tokenize", tags=["remote encoder"])
    async def tokenize(body: TokenizeRequest):
        """Token ids of already chat-formatted texts, cut to max_sequence_length."""
        check_max_len(body.max_sequence_length, limits)
        if not 1 <= len(body.texts) <= limits.max_texts:
            raise invalid("texts", f"give between 1 and {limits.max_texts} texts, got {len(body.texts)}")
        for text in body.texts:
            if not text:
                raise invalid("texts", "must not contain empty texts")
            check_text("texts", text, limits)
        ids = await on_worker(lambda: engine.tokenize(body.texts, body.max_sequence_length))
        return {"input_ids": ids, "token_counts": [len(r) for r in ids]}

    @app.post("/api/save-embeddings", tags=["compat"])
    async def save_embeddings(body: EncodeRequest):
        """Encode and keep the features on the server as a safetensors file; returns its id and URL."""
        data, texts = await encoded(body)
        eid = await asyncio.to_thread(storage.save_embeddings, data)
        return {"id": eid, "url": f"/api/embeddings/{eid}", "count": len(texts), "bytes": len(data)}

    @app.get("/api/embeddings/{embedding_id}", tags=["compat"])
    def get_embeddings(embedding_id: str):
        path = storage.embeddings_file(embedding_id)
        if path is None:
            raise not_found("embeddings file", embedding_id)
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{embedding_id}.safetensors"'})

    @app.post("/api/format-prompt", tags=["compat"])
    async def format_prompt(body: FormatPromptRequest):
        """The exact text the encoder reads; with ``tokens: true`` also the token ids and count."""
        check_text("prompt", body.prompt, limits, required=True)
        fields = check_prompt_fields(body, limits, engine)
        template = fields.pop("template", None)
        text = engine.format_prompts([body.prompt], template, **fields)[0]
        out: dict[str, Any] = {"formatted_prompt": text, "chars": len(text)}
        if body.tokens:
            check_max_len(body.max_sequence_length, limits)
            ids = (await on_worker(lambda: engine.tokenize([text], body.max_sequence_length)))[0]
            out.update(token_ids=ids, token_count=len(ids))
        return out

    def template_list(category: str | None) -> list[dict]:
        out = []
        for t in engine.registry.list(category):
            d = t.to_dict()
            d.pop("path", None)
            out.append(d)
        return out

    @app.get("/api/templates", tags=["compat"])
    def templates(category: str | None = None):
        registry = engine.registry
        if category is not None and category not in registry.categories():
            raise invalid("category", f"unknown category {category!r}; the categories are {registry.categories()}")
        return {"templates": template_list(category), "categories": registry.categories()}

    @app.get("/api/rewriters", tags=["compat"])
    def rewriters():
        return {"rewriters": template_list("rewriter") if "rewriter" in engine.registry.categories() else [],
                "available": engine.can_rewrite}

    @app.post("/api/rewrite", tags=["compat"])
    async def rewrite(body: RewriteRequest):
        """Expand a prompt with the Qwen3 weights (runs on the worker, between jobs)."""
        check_text("prompt", body.prompt, limits, required=True)
        check_text("system_prompt", body.system_prompt, limits)
        if not 1 <= body.max_new_tokens <= limits.max_new_tokens:
            raise invalid("max_new_tokens", f"must be between 1 and {limits.max_new_tokens}, got {body.max_new_tokens}")
        if not 0 <= body.temperature <= 5:
            raise invalid("temperature", f"must be between 0 and 5, got {body.temperature}")
        if not 0 < body.top_p <= 1:
            raise invalid("top_p", f"must be in (0, 1], got {body.top_p}")
        if body.rewriter is not None:
            try:
                engine.template(body.rewriter)
            except KeyError as e:
                raise invalid("rewriter", str(e.args[0]) if e.args else "unknown rewriter") from None
        if not engine.can_rewrite:
            raise ApiError(503, "this server cannot rewrite prompts (no local text encoder)", "unavailable")
        args = body.model_dump(exclude={"prompt"})
        text = await on_worker(lambda: engine.rewrite(body.prompt, **args))
        return {"prompt": body.prompt, "rewritten": text, "rewriter": body.rewriter}

    @app.get("/api/history", tags=["compat"])
    def get_history(limit: int = 100, offset: int = 0):
        """The history, newest first (as ``GET /api/v1/images``)."""
        return history(limit, offset)

    @app.delete("/api/history", tags=["compat"])
    def clear_history():
        return {"deleted": storage.clear_images()}

    @app.delete("/api/history/{ref}", tags=["compat"])
    def delete_history_item(ref: str):
        """Delete one image by its id. A number is the deprecated positional form: the index into
        the list ``GET /api/history`` returns (newest first); ids are stable, indexes are not."""
        if ref.isdigit() and len(ref) <= 9:
            rows = storage.list_images(1, int(ref))
            if not rows:
                raise not_found("history index", ref)
            storage.delete_image(rows[0]["id"])
            return JSONResponse({"deleted": rows[0]["id"], "deprecated": "positional indexes are deprecated; "
                                 "use the image id"}, headers={"Deprecation": "true"})
        if not (IMAGE_ID.match(ref) and storage.delete_image(ref)):
            raise not_found("image", ref)
        return {"deleted": ref}

    return app
