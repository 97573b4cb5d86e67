"""The image history: list (newest first), fetch (PNG or converted), thumbnail, delete."""

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response

from ..context import MEDIA, ServerContext, encode_output, not_found
from ..openapi import errors, media
from ..schemas import MAX_INT, IdPath, Int
from ..storage import IMAGE_ID

ImageId = IdPath(IMAGE_ID, "image")
Limit = Int(1, 1000)
Offset = Int(0, MAX_INT)


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(tags=["images"])
    storage = ctx.storage

    @api.get("/api/v1/images/{image_id}", response_class=Response,
             responses={**media(*MEDIA.values(), description="The image"), **errors(404)})
    def get_image(image_id: ImageId, format: Literal["png", "jpeg", "webp"] = "png", download: bool = False):
        """The image as stored (PNG with its generation metadata), or converted (jpeg, webp)."""
        row = ctx.image_row(image_id)
        path = storage.image_file(row)
        headers = {"Cache-Control": "private, max-age=86400"}
        if download:
            headers["Content-Disposition"] = f'attachment; filename="{image_id}.{format}"'
        try:  # read here, not streamed later: a delete in between is a 404, not a failed response
            data = encode_output(path, format) if path is not None else None
        except FileNotFoundError:
            data = None
        if data is None:
            raise not_found("image file", image_id)
        return Response(data, media_type=MEDIA[format], headers=headers)

    @api.get("/api/v1/images/{image_id}/thumbnail", response_class=Response,
             responses={**media("image/jpeg", "image/png", description="A JPEG thumbnail (the PNG when there "
                                                                         "is none)"), **errors(404)})
    def get_thumbnail(image_id: ImageId):
        row = ctx.image_row(image_id)
        for path, media_type in ((storage.thumb_file(row), "image/jpeg"), (storage.image_file(row), "image/png")):
            try:
                data = path.read_bytes() if path is not None else None
            except FileNotFoundError:
                data = None
            if data is not None:
                return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})
        raise not_found("image file", image_id)

    @api.get("/api/v1/images")
    def list_images(limit: Limit = 100, offset: Offset = 0):
        """The history, newest first."""
        return ctx.history(limit, offset)

    @api.delete("/api/v1/images/{image_id}", responses=errors(404))
    def delete_image(image_id: ImageId):
        if not storage.delete_image(image_id):
            raise not_found("image", image_id)
        return {"deleted": image_id}

    return api
