"""The FastAPI app: job API with Server-Sent Events, OpenAI-compatible route, the predecessor's
``/api/*`` routes as thin adapters, the web page, and the middleware for limits and the token.

``create_app(engine, settings)`` builds it from one router per API family (:mod:`.routes`);
``zimage serve`` runs it with uvicorn. The route list with request and response shapes is in
docs/server.md and at ``/docs`` (OpenAPI).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.staticfiles import StaticFiles

from .. import __version__
from .context import ServerContext
from .engine import Engine
from .errors import install_error_handlers
from .jobs import JobManager
from .middleware import LimitsAndAuth
from .openapi import install_openapi
from .routes import FAMILIES
from .routes.server import web_dir
from .settings import ServerSettings
from .storage import DataDirLock, Storage

logger = logging.getLogger(__name__)


def create_app(engine: Engine, settings: ServerSettings | None = None, *, warmup: bool = False) -> FastAPI:
    """The server app around ``engine``; history lives in ``settings.data_dir``.

    At creation the data folder is locked for this app (a second app or server on it is refused with
    :class:`~.storage.DataDirInUse` until the first stops or its process ends) and the history is
    repaired (see :meth:`Storage.reconcile`); the worker thread starts with the app (lifespan) and
    stops with it, and the lock is released then. ``warmup``: run ``engine.warmup()`` on the worker
    thread during start-up, so that compiled code and captured graphs belong to the thread that
    later runs the jobs; uvicorn only starts listening once it is done.
    """
    settings = settings or ServerSettings()
    data_lock = DataDirLock(settings.data_dir)  # before the repair, which would take a live server's jobs
    try:
        storage = Storage(settings.data_dir, full_sync=settings.full_sync, thumbnail_size=settings.thumbnail_size)
    except BaseException:
        data_lock.release()
        raise
    repaired = storage.reconcile()
    manager = JobManager(engine, storage, settings)
    ctx = ServerContext(engine, settings, storage, manager)

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
            data_lock.release()

    app = FastAPI(title="zimage-native server", version=__version__, lifespan=lifespan,
                  description="Z-Image generation: job API with live progress, OpenAI-compatible images route, "
                              "remote text encoding, persistent history. See docs/server.md.")
    app.state.engine = engine
    app.state.settings = settings
    app.state.storage = storage
    app.state.data_lock = data_lock
    app.state.manager = manager
    app.state.repaired = repaired
    app.state.context = ctx
    app.add_middleware(LimitsAndAuth, token=settings.token, max_body=settings.limits.max_body_bytes)
    install_error_handlers(app)
    for family in FAMILIES:  # the routes as they are (no prefix), so that app.routes lists every route
        app.router.routes.extend(family.router(ctx).routes)
    for route in app.router.routes:  # operation ids are the handlers' names (the schema's links use them)
        if isinstance(route, APIRoute) and route.operation_id is None:
            route.operation_id = route.name
    app.mount("/static", StaticFiles(directory=web_dir()), name="static")
    install_openapi(app, token=settings.token is not None)
    return app
