"""The predecessor's generate and history routes, as thin adapters over the job queue and history."""

import asyncio
import base64
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..context import ServerContext, not_found
from ..openapi import errors
from ..schemas import IdPath
from .images import Limit, Offset

HistoryRef = IdPath(re.compile(r"^(?:[0-9]{1,9}|j[0-9a-f]{20}-[0-9]{1,3})$"), "image (or history index)")


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(tags=["compat"])
    storage = ctx.storage
    LegacyGenerateRequest = ctx.models.legacy

    @api.post("/api/generate", responses=errors(409, 429, 503, 504, 507))
    async def legacy_generate(body: LegacyGenerateRequest, request: Request):
        """Synchronous generation (the predecessor's route): waits, then returns the first image as a
        data URL plus every image's id and URL."""
        job, event = await ctx.run_sync(body, request)
        images = event.data["images"]
        raw = await asyncio.to_thread(ctx.image_bytes, images[0]["id"])
        first = images[0]["params"]
        return {"image": "data:image/png;base64," + base64.b64encode(raw).decode("ascii"),
                "id": images[0]["id"], "job_id": job.id, "url": images[0]["url"], "seed": images[0]["seed"],
                "seeds": [i["seed"] for i in images], "width": images[0]["width"], "height": images[0]["height"],
                "formatted_prompt": first.get("formatted_prompt"), "generation_time": event.data.get("seconds"),
                "images": images, "advice": job.advice}

    @api.get("/api/history")
    def get_history(limit: Limit = 100, offset: Offset = 0):
        """The history, newest first (as ``GET /api/v1/images``)."""
        return ctx.history(limit, offset)

    @api.delete("/api/history")
    def clear_history():
        return {"deleted": storage.clear_images()}

    @api.delete("/api/history/{ref}", responses=errors(404))
    def delete_history_item(ref: HistoryRef):
        """Delete one image by its id. A number is the deprecated positional form: the index into
        the list ``GET /api/history`` returns (newest first); ids are stable, indexes are not."""
        if ref.isdigit():
            rows = storage.list_images(1, int(ref))
            if not rows:
                raise not_found("history index", ref)
            storage.delete_image(rows[0]["id"])
            return JSONResponse({"deleted": rows[0]["id"], "deprecated": "positional indexes are deprecated; "
                                 "use the image id"}, headers={"Deprecation": "true"})
        if not storage.delete_image(ref):
            raise not_found("image", ref)
        return {"deleted": ref}

    return api
