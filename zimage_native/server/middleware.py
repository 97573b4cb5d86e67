"""Pure ASGI middleware: a request id on every response, the request body limit (413) and the
bearer token (401)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import error_body

logger = logging.getLogger("zimage_native.server.errors")

COOKIE = "zimage_token"
OPEN_PATHS = ("/health", "/", "/favicon.ico", "/api/v1/login")  # no token needed (the page shell and its assets too)
OPEN_PREFIXES = ("/static/",)


def cookie_value(token: str) -> str:
    """The sign-in cookie's value for ``token``: an HMAC of it, in hex digits.

    Not the token itself: any token works (a token with ``/``, ``+``, ``=``, spaces, commas or
    quotes would be quoted in a cookie, and read back with the quotes on), and the browser never
    stores the token."""
    return hmac.new(token.encode(), b"zimage-native web sign-in", hashlib.sha256).hexdigest()


class LimitsAndAuth:
    """Request body size (413) and the bearer token (401).

    The token comes as ``Authorization: Bearer <token>``, or the ``zimage_token`` cookie carries
    :func:`cookie_value` of it (set by ``POST /api/v1/login``, used by the web page, whose image and
    event requests cannot carry headers). Comparisons are constant-time. Open without a token:
    ``/health``, the page shell (``/``, ``/static/*``) and the login route, which checks the token
    itself.
    """

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = token.encode() if token else None
        self.cookie = cookie_value(token).encode() if token else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode()
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", raw_id)]}
            await send(message)

        try:
            return await self._call(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - the one place that turns the unexpected into a JSON 500
            logger.error("request %s (%s %s) failed: %s: %s", request_id, scope.get("method"), scope.get("path"),
                         type(e).__name__, e, exc_info=e)
            if started:  # a streamed response broke midway: nothing to answer, the connection ends
                raise
            await send_json(send_with_id, 500, error_body(
                500, f"internal server error (request id {request_id}; the server's log has the details)",
                "server_error", request_id=request_id))

    async def _call(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.token is not None and not is_open(path) and not self.authorized(headers):
            return await send_json(send, 401, error_body(401, "a valid bearer token is required "
                                                              "(Authorization: Bearer <token>)", "unauthorized"),
                                   {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await send_json(send, 400, error_body(400, "bad Content-Length", "invalid_request_error"))
            if too_big:
                return await send_json(send, 413, error_body(
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

    def authorized(self, headers: dict[str, str]) -> bool:
        """``headers`` as decoded by :meth:`_call` (latin-1, so ``encode("latin-1")`` gives the bytes sent)."""
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return hmac.compare_digest(auth[7:].strip(" \t").encode("latin-1"), self.token)
        good = False
        for part in headers.get("cookie", "").split(";"):  # every cookie of that name (paths may differ)
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                good |= hmac.compare_digest(value.strip(" \t").strip('"').encode("latin-1"), self.cookie)
        return good


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
