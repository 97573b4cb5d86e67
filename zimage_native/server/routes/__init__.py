"""One router per API family, each built by ``router(ctx)`` over the shared :class:`ServerContext`:

- :mod:`.server`: health, the web page and its sign-in;
- :mod:`.jobs`: the job API (capabilities, submit, list, status, events, cancel);
- :mod:`.images`: the image history (list, fetch, thumbnail, delete);
- :mod:`.openai`: the OpenAI-compatible images and models routes;
- :mod:`.encoder`: prompt and text-encoder routes (encode, tokenize, format, templates, rewrite);
- :mod:`.compat`: the predecessor's generate and history routes.
"""

from __future__ import annotations

from . import compat, encoder, images, jobs, openai, server

FAMILIES = (server, jobs, images, openai, encoder, compat)
