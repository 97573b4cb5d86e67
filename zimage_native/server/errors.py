"""Error bodies and the app's exception handlers: every error is JSON in the OpenAI error shape,
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineUnavailable
from .jobs import QueueFull
from .schemas import ApiError

HTTP_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_body(status: int, message: str, type_: str, param: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status, **extra}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param, **extra), status_code=status, headers=headers)


def queue_full_response(e: QueueFull) -> JSONResponse:
    return error_response(429, f"The queue is full ({e.active} of {e.capacity} places taken). "
                               f"Try again in {e.retry_after} s.", "queue_full",
                          headers={"Retry-After": str(e.retry_after)}, retry_after=e.retry_after)


def install_error_handlers(app: FastAPI) -> None:
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
        return error_response(e.status_code, str(e.detail), HTTP_TYPES.get(e.status_code, "http_error"),
                              headers=getattr(e, "headers", None))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, e: QueueFull):
        return queue_full_response(e)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, e: EngineUnavailable):
        return error_response(503, str(e), "unavailable")
