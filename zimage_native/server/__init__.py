"""The generation server behind ``zimage serve`` (optional extra ``zimage-native[server]``).

Pieces, one module each:

- :mod:`.settings`: limits and server settings (queue size, token, data folder);
- :mod:`.engine`: what the worker drives: :class:`PipelineEngine` around a ``ZImagePipeline``,
  :class:`EncoderOnlyEngine` (text encoder only) and :class:`FakeEngine` (solid-colour images,
  for tests and demos);
- :mod:`.jobs`: the bounded job queue and the one worker thread that owns the engine;
- :mod:`.storage`: image files plus a SQLite index in WAL mode, crash-consistent;
- :mod:`.app`: the FastAPI app (job API with SSE, OpenAI-compatible route, the predecessor's
  ``/api/*`` routes, the web page);
- :mod:`.remote`: :class:`RemoteTextEncoder`, the client of ``POST /api/encode`` (stdlib only,
  so the pipeline can use a remote encoder without the server extra).

Only :mod:`.app` imports FastAPI; importing this package does not.
"""

from __future__ import annotations

from .remote import RemoteEncoderError, RemoteTextEncoder
from .settings import Limits, ServerSettings

__all__ = [
    "Limits",
    "RemoteEncoderError",
    "RemoteTextEncoder",
    "ServerSettings",
    "create_app",
    "EncoderOnlyEngine",
    "FakeEngine",
    "PipelineEngine",
]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("EncoderOnlyEngine", "FakeEngine", "PipelineEngine"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
