"""The image history: list (newest first), fetch (PNG or converted), thumbnail, delete."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from ..context import MEDIA, ServerContext, encode_output, not_found
from ..schemas import invalid
from ..storage import IMAGE_ID


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(tags=["images"])
    storage = ctx.storage

    @api.get("/api/v1/images/{image_id}")
    def get_image(image_id: str, format: str = "png", download: bool = False):
        """The image as stored (PNG with its generation metadata), or converted (jpeg, webp)."""
        if format not in MEDIA:
            raise invalid("format", f"must be one of {sorted(MEDIA)}, got {format!r}")
        row = ctx.image_row(image_id)
        path = storage.image_file(row)
        if path is None or not path.is_file():
            raise not_found("image file", image_id)
        headers = {"Cache-Control": "private, max-age=86400"}
        if download:
            headers["Content-Disposition"] = f'attachment; filename="{image_id}.{format}"'
        if format == "png":
            return FileResponse(path, media_type="image/png", headers=headers)
        return Response(encode_output(path, format), media_type=MEDIA[format], headers=headers)

    @api.get("/api/v1/images/{image_id}/thumbnail")
    def get_thumbnail(image_id: str):
        row = ctx.image_row(image_id)
        path = storage.thumb_file(row)
        if path is None or not path.is_file():
            path = storage.image_file(row)
            return FileResponse(path, media_type="image/png")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @api.get("/api/v1/images")
    def list_images(limit: int = 100, offset: int = 0):
        """The history, newest first."""
        return ctx.history(limit, offset)

    @api.delete("/api/v1/images/{image_id}")
    def delete_image(image_id: str):
        if not (IMAGE_ID.match(image_id) and storage.delete_image(image_id)):
            raise not_found("image", image_id)
        return {"deleted": image_id}

    return api
