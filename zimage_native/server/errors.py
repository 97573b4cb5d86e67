"""Error bodies and the app's exception handlers: every error is JSON in the OpenAI error shape,
``{"error": {"message", "type", "param", "code"}}``.

No request ends in a bare 500: an unexpected exception is logged with the request's id and
answered ``{"error": {..., "type": "server_error", "request_id": ...}}``; the id is also in the
``X-Request-ID`` header of every response (middleware.py).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineUnavailable
from .jobs import QueueFull, StorageFailed
from .schemas import ApiError

logger = logging.getLogger(__name__)

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
        details, parts, seen = [], [], set()
        # A value in a union (seed: int or list) fails once per member: report the member whose
        # own check failed (a value_error) before the members of the wrong type, once per field.
        for err in sorted(e.errors(), key=lambda err: err.get("type") != "value_error"):
            field, message = describe_validation_error(err)
            if field in seen:
                continue
            seen.add(field)
            details.append({"param": field, "message": message})
            parts.append(f"{field}: {message}")
        return error_response(422, "; ".join(parts) or "invalid request", "invalid_request_error",
                              details[0]["param"] if details else None, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return error_response(e.status_code, str(e.detail), HTTP_TYPES.get(e.status_code, "http_error"),
                              headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        request_id = request.scope.get("state", {}).get("request_id", "-")
        logger.error("request %s (%s %s) failed: %s: %s", request_id, request.method, request.url.path,
                     type(e).__name__, e, exc_info=e)
        return error_response(500, f"internal server error (request id {request_id}; the server's log has the "
                                   f"details)", "server_error", request_id=request_id,
                              headers={"X-Request-ID": request_id})

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, e: QueueFull):
        return queue_full_response(e)

    @app.exception_handler(StorageFailed)
    async def _storage_failed(request: Request, e: StorageFailed):
        return error_response(e.status, str(e), "insufficient_storage" if e.status == 507 else "unavailable")

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, e: EngineUnavailable):
        return error_response(503, str(e), "unavailable")


def describe_validation_error(err: dict) -> tuple[str, str]:
    """(param, message) of one pydantic error, in the server's words: a bad JSON body names the
    body (not the byte offset pydantic puts in its location); a header names the header."""
    loc = [str(x) for x in err.get("loc", ())]
    kind = err.get("type", "")
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "json_invalid":
        position = loc[1] if len(loc) > 1 else "?"
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        return "body", f"the request body is not valid JSON ({reason} at character {position})"
    if loc[:1] == ["body"] and len(loc) == 1:
        return "body", "a JSON object is required" if kind != "missing" else "a JSON body is required"
    if loc[:1] == ["header"]:
        return (loc[1] if len(loc) > 1 else "header"), message
    if loc[:1] and loc[0] in ("body", "query", "path", "cookie"):
        loc = loc[1:]
    field = ".".join(x for x in loc if x and not _is_type_tag(x))
    return field or "body", message


def _is_type_tag(part: str) -> bool:
    """pydantic's names of union members in an error location (``int``, ``list[int]``, ...)."""
    return "[" in part or part in ("int", "float", "str", "bool", "list", "dict", "none", "nullable",
                                   "constrained-str", "constrained-int", "constrained-float")


def allowed_methods(app, scope) -> list[str]:
    """The methods the app's routes take at this path (what a 405's Allow header lists)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        route_methods = getattr(route, "methods", None)
        if not route_methods:
            continue
        match, _ = route.matches({**scope, "method": next(iter(route_methods))})
        if match == Match.FULL:
            methods |= set(route_methods)
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))
