"""Health, the web page (no build step; files in ``server/web/``) and the page's token sign-in."""

import hmac
from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from ... import __version__
from ..context import ServerContext
from ..middleware import COOKIE, cookie_value
from ..openapi import errors
from ..schemas import ApiError


def web_dir() -> Path:
    return Path(str(resources.files("zimage_native.server") / "web"))


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(tags=["server"])
    engine, settings = ctx.engine, ctx.settings
    LoginRequest = ctx.models.login

    @api.get("/health")
    async def health():
        """Open without a token. ``status`` is ``ok`` once the model is loaded (the server only
        starts listening then)."""
        return {"status": "ok", "model": engine.model_name, "version": __version__, "queue": ctx.manager.stats(),
                "generate": engine.can_generate}

    @api.head("/health", include_in_schema=False)
    @api.head("/", include_in_schema=False)
    async def alive():
        """``curl -I`` and uptime monitors ask with HEAD (405 otherwise)."""
        return Response(status_code=200)

    @api.get("/", include_in_schema=False)
    async def index():
        return FileResponse(web_dir() / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @api.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @api.post("/api/v1/login", responses=errors(401))
    async def login(body: LoginRequest):
        """Check a token and set the sign-in cookie (HttpOnly, SameSite=Strict; its value is
        derived from the token) for the web page."""
        if settings.token is None:
            return {"auth": False}
        if not hmac.compare_digest(body.token.encode(), settings.token.encode()):
            raise ApiError(401, "wrong token", "unauthorized")
        response = JSONResponse({"auth": True})
        response.set_cookie(COOKIE, cookie_value(settings.token), httponly=True, samesite="strict", path="/")
        return response

    return api
