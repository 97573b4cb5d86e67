"""Prompt and text-encoder routes: encode (safetensors features), tokenize, save-embeddings,
format-prompt, templates, rewriters, rewrite. An ``--encoder-only`` server serves all of them."""

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from ..context import ServerContext, not_found
from ..openapi import errors, media
from ..remote import features_to_bytes
from ..schemas import (ApiError, Choice, IdPath, check_max_len, check_prompt_fields, check_text, image_template,
                       invalid)
from ..storage import EMBEDDING_ID

EmbeddingId = IdPath(EMBEDDING_ID, "embeddings")


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()
    engine, limits, storage = ctx.engine, ctx.limits, ctx.storage
    models = ctx.models
    EncodeRequest, TokenizeRequest, FormatPromptRequest, RewriteRequest = (
        models.encode, models.tokenize, models.format_prompt, models.rewrite)
    Category = Choice(engine.registry.categories(), "category")

    def check_texts(texts: list[str]) -> None:
        if not 1 <= len(texts) <= limits.max_texts:
            raise invalid("texts", f"give between 1 and {limits.max_texts} texts, got {len(texts)}")
        for text in texts:  # already chat-formatted: the limit is the formatted one
            if not text:
                raise invalid("texts", "must not contain empty texts")
            if len(text) > limits.max_formatted_chars:
                raise invalid("texts", f"a text is {len(text)} characters long; the limit is "
                                       f"{limits.max_formatted_chars}")

    def encode_texts(body) -> list[str]:
        if (body.texts is None) == (body.prompt is None):
            raise invalid("texts", "give exactly one of texts (already chat-formatted) and prompt")
        check_max_len(body.max_sequence_length, limits)
        if body.texts is not None:
            if any(f is not None for f in (body.template, body.system_prompt, body.thinking_content,
                                           body.assistant_content, body.force_think_block, body.strip_quotes)):
                raise invalid("texts", "pre-formatted texts take no prompt fields (template, system_prompt, ...)")
            check_texts(body.texts)
            return body.texts
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        for p in prompts:
            check_text("prompt", p, limits, required=True)
        fields = check_prompt_fields(body, limits, engine)
        image_template(body.template, engine)  # features for an image
        texts = engine.format_prompts(prompts, body.template, **fields)
        if not 1 <= len(texts) <= limits.max_texts:
            raise invalid("texts", f"give between 1 and {limits.max_texts} texts, got {len(texts)}")
        return texts

    async def encoded(body) -> tuple[bytes, list[str]]:
        texts = encode_texts(body)
        features = await ctx.on_worker(lambda: engine.encode(texts, body.max_sequence_length))
        return await asyncio.to_thread(features_to_bytes, features, texts), texts

    @api.post("/api/encode", tags=["compat", "remote encoder"], response_class=Response,
              responses={**media("application/octet-stream",
                                 description="safetensors: features.0 ... features.N-1, (L_i, hidden)"),
                         **errors(502, 503)})
    async def encode(body: EncodeRequest):
        """Prompt features as safetensors bytes (dtype and shape kept). Body: ``texts`` (already
        chat-formatted, what RemoteTextEncoder sends) or ``prompt`` plus the chat-format fields."""
        data, texts = await encoded(body)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Zimage-Format": "zimage-features/1", "X-Zimage-Count": str(len(texts))})

    @api.post("/api/tokenize", tags=["remote encoder"], responses=errors(502, 503))
    async def tokenize(body: TokenizeRequest):
        """Token ids of already chat-formatted texts, cut to max_sequence_length; ``full_token_counts``:
        the counts before the cut (a count above max_sequence_length: the text's end is cut)."""
        check_max_len(body.max_sequence_length, limits)
        check_texts(body.texts)
        ids, full = await ctx.on_worker(lambda: (engine.tokenize(body.texts, body.max_sequence_length),
                                                 engine.token_counts(body.texts)))
        return {"input_ids": ids, "token_counts": [len(r) for r in ids], "full_token_counts": full}

    @api.post("/api/save-embeddings", tags=["compat"], responses=errors(502, 503))
    async def save_embeddings(body: EncodeRequest):
        """Encode and keep the features on the server as a safetensors file; returns its id and URL."""
        data, texts = await encoded(body)
        eid = await asyncio.to_thread(storage.save_embeddings, data)
        return {"id": eid, "url": f"/api/embeddings/{eid}", "count": len(texts), "bytes": len(data)}

    @api.get("/api/embeddings/{embedding_id}", tags=["compat"], response_class=Response,
             responses={**media("application/octet-stream", description="safetensors"), **errors(404)})
    def get_embeddings(embedding_id: EmbeddingId):
        path = storage.embeddings_file(embedding_id)
        try:
            data = path.read_bytes() if path is not None else None
        except FileNotFoundError:
            data = None
        if data is None:
            raise not_found("embeddings file", embedding_id)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{embedding_id}.safetensors"'})

    @api.post("/api/format-prompt", tags=["compat"], responses=errors(502, 503))
    async def format_prompt(body: FormatPromptRequest):
        """The exact text the encoder reads; with ``tokens: true`` also the token ids and count (cut to
        max_sequence_length) and ``full_token_count``, the count before the cut."""
        check_text("prompt", body.prompt, limits, required=True)
        fields = check_prompt_fields(body, limits, engine)
        text = engine.format_prompts([body.prompt], body.template, **fields)[0]
        out: dict[str, Any] = {"formatted_prompt": text, "chars": len(text)}
        if body.tokens:
            check_max_len(body.max_sequence_length, limits)
            ids, full = await ctx.on_worker(lambda: (engine.tokenize([text], body.max_sequence_length)[0],
                                                     engine.token_counts([text])))
            out.update(token_ids=ids, token_count=len(ids), full_token_count=full[0] if full else None)
        return out

    def template_list(category: str | None) -> list[dict]:
        out = []
        for t in engine.registry.list(category):
            d = t.to_dict()
            d.pop("path", None)
            out.append(d)
        return out

    @api.get("/api/templates", tags=["compat"])
    def templates(category: Category = None):  # absent: None (no null in the schema)
        registry = engine.registry
        return {"templates": template_list(category), "categories": registry.categories()}

    @api.get("/api/rewriters", tags=["compat"])
    def rewriters():
        return {"rewriters": template_list("rewriter") if "rewriter" in engine.registry.categories() else [],
                "available": engine.can_rewrite or getattr(engine, "llm_rewriter", None) is not None}

    @api.post("/api/rewrite", tags=["compat"], responses=errors(502, 503))
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
        llm = getattr(engine, "llm_rewriter", None)  # `zimage serve --llm-url`: a chat server rewrites
        if llm is None and not engine.can_rewrite:
            raise ApiError(503, "this server cannot rewrite prompts (no local text encoder)", "unavailable")
        args = body.model_dump(exclude={"prompt"})
        if llm is not None:
            from ...prompt.remote import ChatServerError

            try:  # a network call, not a model call: off the GPU worker
                text = await asyncio.to_thread(llm.rewrite, body.prompt, registry=engine.registry, **args)
            except ChatServerError as e:
                raise ApiError(502, str(e), "upstream") from None
        else:
            text = await ctx.on_worker(lambda: engine.rewrite(body.prompt, **args))
        return {"prompt": body.prompt, "rewritten": text, "rewriter": body.rewriter}

    return api
