"""The OpenAI Images API (``POST /v1/images/generations``, ``GET /v1/models``) on the job queue."""

import asyncio
import base64

from fastapi import APIRouter, Request

from ..context import ServerContext
from ..openapi import errors
from ..schemas import openai_to_job


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(tags=["openai"])
    OpenAIImageRequest = ctx.models.openai

    @api.post("/v1/images/generations", responses=errors(409, 429, 503, 504, 507))
    async def openai_generate(body: OpenAIImageRequest, request: Request):
        """OpenAI Images API. Extensions: negative_prompt, num_inference_steps, guidance_scale,
        seed. Waits for the image on the same queue as the job API (429 when full)."""
        job, event = await ctx.run_sync(openai_to_job(body, ctx.models), request)
        fmt = body.output_format or "png"
        data = []
        base = str(request.base_url).rstrip("/")
        for image in event.data["images"]:
            if body.response_format == "url":
                url = base + image["url"] + ("" if fmt == "png" else f"?format={fmt}")
                data.append({"url": url, "revised_prompt": None})
            else:
                raw = await asyncio.to_thread(ctx.image_bytes, image["id"], fmt, body.output_compression)
                data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": None})
        first = event.data["images"][0]
        return {"created": int(job.created), "data": data, "output_format": fmt,
                "size": f"{first['width']}x{first['height']}"}

    @api.get("/v1/models")
    async def openai_models():
        return {"object": "list", "data": [{"id": ctx.engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "zimage-native"}]}

    return api
