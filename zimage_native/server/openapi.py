"""The published schema (``/openapi.json``): every status a route answers, with the error body;
the response media types; the bearer scheme; and the links the job and image routes form.

Routes declare their own statuses next to their code (``responses=errors(404, 409)``);
:func:`install_openapi` adds what applies to whole classes of routes (401 with a token, 413 and
422 where a body or parameters are read, 500 everywhere) and the links and security scheme.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from .middleware import is_open

DESCRIPTIONS = {
    400: "Bad request framing (for example an unreadable Content-Length)",
    401: "A bearer token is required (Authorization: Bearer <token>, or the page's cookie)",
    404: "No such resource",
    405: "Method not allowed (the Allow header lists the path's methods)",
    409: "Conflict with the resource's state",
    413: "The request body or an input image is larger than the limit",
    422: "Invalid request: the error names the parameter",
    429: "The queue is full; retry after Retry-After seconds",
    500: "Unexpected server error (the body carries a request id that is in the server's log) or a failed "
         "generation on a synchronous route",
    502: "A server this one relies on failed (the remote text encoder of --encoder-url, the chat server of "
         "--llm-url); the message says what it answered",
    503: "This server cannot do this (for example generation on an --encoder-only server, or its history "
         "cannot be written), or the remote text encoder of --encoder-url cannot be reached",
    504: "The synchronous route's job did not finish in time and was cancelled",
    507: "The server's data folder is full: the job was not queued",
}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"message", "type", "param", "code", ...}}`` (the OpenAI shape)."""

    error: ErrorDetail


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it answers besides the common ones."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": DESCRIPTIONS.get(status, "Error")}
        if status == 429:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        out[status] = entry
    return out


def media(*types: str, description: str = "Successful Response", status: int = 200) -> dict[int, dict[str, Any]]:
    """``responses=`` for a route that answers bytes of the given media types."""
    return {status: {"description": description,
                     "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in types}}}


BINARY = {"type": "string", "format": "binary"}

# One Server-Sent Event of GET /api/v1/jobs/{job_id}/events (an OpenAPI 3.1 `schema` under
# text/event-stream describes each event); `data` is JSON naming the job.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["queued", "started", "progress", "completed", "failed", "cancelled"]},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"description": "reconnection delay in milliseconds"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object", "required": ["job_id"],
                                   "properties": {"job_id": {"type": "string"}}}},
    },
}

# OpenAPI links: what the stateful phase of a fuzzer (and a generated client) can follow.
JOB_ID = "$response.body#/id"
FIRST_IMAGE = "$response.body#/items/0/id"
LINKS = {
    ("post", "/api/v1/jobs", "202"): {
        "GetJob": ("get_job", {"job_id": JOB_ID}),
        "JobEvents": ("job_events", {"job_id": JOB_ID}),
        "CancelJob": ("cancel_job", {"job_id": JOB_ID}),
    },
    ("get", "/api/v1/jobs/{job_id}", "200"): {
        "JobEvents": ("job_events", {"job_id": JOB_ID}),
        "CancelJob": ("cancel_job", {"job_id": JOB_ID}),
    },
    ("get", "/api/v1/images", "200"): {
        "GetImage": ("get_image", {"image_id": FIRST_IMAGE}),
        "GetThumbnail": ("get_thumbnail", {"image_id": FIRST_IMAGE}),
        "DeleteImage": ("delete_image", {"image_id": FIRST_IMAGE}),
    },
    ("get", "/api/history", "200"): {
        "GetImage": ("get_image", {"image_id": FIRST_IMAGE}),
        "DeleteHistoryItem": ("delete_history_item", {"ref": FIRST_IMAGE}),
    },
    ("post", "/api/save-embeddings", "200"): {
        "GetEmbeddings": ("get_embeddings", {"embedding_id": "$response.body#/id"}),
    },
}


def build_schema(app: FastAPI, token: bool) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {}))
    components["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components["ErrorBody"].pop("$defs", None)
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}

    def error(status: int) -> dict[str, Any]:
        return {"description": DESCRIPTIONS[status], "content": {"application/json": {"schema": error_ref}}}

    if token:
        schema["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "zimage serve --token"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "zimage_token",
                       "description": "set by POST /api/v1/login (the web page)"},
        }
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            has_input = bool(op.get("parameters") or op.get("requestBody"))
            if has_input or "422" in responses:
                responses["422"] = error(422)
            if op.get("requestBody"):
                responses.setdefault("413", error(413))
                responses.setdefault("400", error(400))
            if token and not is_open(path):
                responses.setdefault("401", error(401))
                op["security"] = [{"bearer": []}, {"cookie": []}]
            responses.setdefault("500", error(500))
            for (m, p, status), links in LINKS.items():
                if m == method and p == path and status in responses:
                    responses[status]["links"] = {
                        name: {"operationId": op_id, "parameters": params} for name, (op_id, params) in links.items()}
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_openapi(app: FastAPI, token: bool) -> None:
    """Replace ``app.openapi`` with :func:`build_schema` (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, token)
        return app.openapi_schema

    app.openapi = openapi
