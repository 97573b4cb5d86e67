"""Image inputs and outputs, as diffusers' image processor handles them.

Inputs (``image``, ``mask_image``, ``control_image``) may be PIL images, numpy arrays (H, W, C) in
[0, 1] (uint8 and uint16 images, such as ``np.asarray(pil)``'s, are scaled from their type's range;
mask arrays are binarised as they are; grey image arrays and tensors, such as depth maps, are made
RGB by repeating their channel, as a grey PIL image is),
torch tensors (B, C, H, W) in [0, 1], or lists of one kind. PIL images are resized with
Lanczos, arrays and tensors with nearest interpolation; sizes round down to the latent grid.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from .finite import refuse_nonfinite_input

logger = logging.getLogger(__name__)


def _as_batch(image, what: str) -> tuple[str, Any]:
    """('pil', [images]) | ('np', (B, H, W, C) array) | ('pt', (B, C, H, W) tensor)."""
    from PIL import Image

    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{what} must not be an empty list")
    if all(isinstance(i, Image.Image) for i in items):
        return "pil", items
    for kind, cls in (("np", np.ndarray), ("pt", torch.Tensor)):
        if all(isinstance(i, cls) for i in items):
            size = lambda i: tuple(i.shape[1:] if i.ndim == 4 else i.shape)  # noqa: E731  (batches: their items)
            other = [i for i in items if size(i) != size(items[0])]
            if other:  # (else numpy's "all input arrays must have the same shape", torch's stack error)
                raise ValueError(f"{what}: the {'arrays' if kind == 'np' else 'tensors'} of a list must have one "
                                 f"shape, got {tuple(items[0].shape)} and {tuple(other[0].shape)}: resize them to one "
                                 f"size (PIL images are resized to the first one's size)")
            stack = (np.concatenate, np.stack) if kind == "np" else (torch.cat, torch.stack)
            return kind, stack[0](items) if items[0].ndim == 4 else stack[1](items)
    paths = [i for i in items if isinstance(i, (str, os.PathLike))]
    kinds = list(dict.fromkeys(type(i).__name__ for i in items))
    got = (f"a path ({str(paths[0])!r}): open it first, {what}=PIL.Image.open(path)" if paths
           else f"a list of {' and '.join(kinds)}" if len(kinds) > 1 else kinds[0])
    raise ValueError(f"{what} must be a PIL image, a numpy array (H, W, C) in [0, 1], a torch tensor (B, C, H, W) "
                     f"in [0, 1], or a list of one kind; got {got}")


def _layout_hint(image, kind: str) -> str:
    """The shape given (not the stacked batch's) and, where it says what is wrong, the fix: an RGBA
    array (``np.asarray`` of a PNG with alpha), a channels-last tensor, a channels-first array."""
    one = image[0] if isinstance(image, (list, tuple)) else image
    shape = tuple(one.shape)
    got = f"got a list of shape {shape} items" if isinstance(image, (list, tuple)) else f"got shape {shape}"
    if kind == "np" and len(shape) in (3, 4) and shape[-1] == 4:
        return f"{got}: an RGBA array; drop its alpha channel, array[..., :3]"
    if kind == "pt" and len(shape) in (3, 4) and shape[-3] == 4:
        return f"{got}: an RGBA tensor; drop its alpha channel, tensor[..., :3, :, :]"
    if kind == "pt" and len(shape) in (3, 4) and shape[-1] == 3 and shape[-3] != 3:
        order = "2, 0, 1" if len(shape) == 3 else "0, 3, 1, 2"
        return f"{got}: a channels-last tensor; tensors are channels-first, tensor.permute({order})"
    if kind == "np" and len(shape) in (3, 4) and shape[-3] == 3 and shape[-1] != 3:
        order = "1, 2, 0" if len(shape) == 3 else "0, 2, 3, 1"
        return f"{got}: a channels-first array; arrays are channels-last, array.transpose({order})"
    return got


def check_side(name: str, value, multiple: int) -> None:
    """An image side (width or height) must be a positive multiple of ``multiple``; the error names
    the nearest valid sizes."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            low = value // multiple * multiple
            hint = f" (nearest: {low} or {low + multiple})" if low else f" (the smallest is {multiple})"
        raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}{hint}")


def _target_size(size_hw: tuple[int, int], width: int | None, height: int | None, multiple: int,
                 what: str | None = None) -> tuple[int, int]:
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            check_side(name, value, multiple)
    h = height if height is not None else size_hw[0] // multiple * multiple
    w = width if width is not None else size_hw[1] // multiple * multiple
    if w < multiple or h < multiple or w % multiple or h % multiple:
        raise ValueError(f"the input image must be at least {multiple}x{multiple} (its size is rounded down to a "
                         f"multiple of {multiple}: {size_hw[1]}x{size_hw[0]} gives {w}x{h}); give width= and height= "
                         f"to resize it")
    # Only a side taken from the image can have been rounded (a side given is the caller's choice).
    if what is not None and ((height is None and h != size_hw[0]) or (width is None and w != size_hw[1])):
        near = [given if given is not None else max(multiple, round(v / multiple) * multiple)
                for given, v in ((width, size_hw[1]), (height, size_hw[0]))]
        logger.warning("%s is %dx%d, whose sides are not all multiples of %d: the run uses %dx%d (rounded down, as "
                       "diffusers does); give width= and height= (multiples of %d, e.g. width=%d, height=%d) to "
                       "choose the size the image is resized to", what, size_hw[1], size_hw[0], multiple, w, h,
                       multiple, near[0], near[1])
    return h, w


def preprocess_image(image, width: int | None = None, height: int | None = None, multiple: int = 16,
                     what: str | None = None) -> torch.Tensor:
    """Image(s) -> (B, 3, H, W) fp32 in [-1, 1], as the reference's image processor does: PIL images
    resized with Lanczos, arrays and tensors (values in [0, 1]) with nearest interpolation, to
    ``width`` x ``height`` or down to multiples of ``multiple``. Grey arrays ((H, W), (H, W, 1),
    (B, H, W, 1)) and tensors ((H, W), (1, H, W), (B, 1, H, W)) get their channel repeated (the
    reference hands a one-channel image to the VAE, which fails). ``what``: the argument's name, for the
    warning given when a side is rounded down (the pipeline's inputs; not the by-hand image processor)."""
    kind, batch = _as_batch(image, "image")
    if kind == "pil":
        h, w = _target_size((batch[0].height, batch[0].width), width, height, multiple, what)
        arrays = [_pil_rgb(i, w, h) for i in batch]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2.0 - 1.0
    x = torch.from_numpy(np.ascontiguousarray(batch)) if kind == "np" else batch
    x = x.float() / _white(x.dtype)
    if x.ndim == 3:  # grey (H, W) arrays or tensors, stacked: add their channel
        x = x[..., None] if kind == "np" else x[:, None]
    if kind == "np" and x.ndim == 4:
        x = x.permute(0, 3, 1, 2)
    if x.ndim == 4 and x.shape[1] == 1:  # grey (a depth map): made RGB, as a grey PIL image is
        x = x.expand(-1, 3, -1, -1)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image arrays must be (H, W, 3) / (B, H, W, 3), or grey (H, W) / (H, W, 1) / (B, H, W, 1); "
                         f"tensors (3, H, W) / (B, 3, H, W), or grey (H, W) / (1, H, W) / (B, 1, H, W); "
                         f"{_layout_hint(image, kind)}")
    refuse_nonfinite_input(x, what or "image")
    if x.numel() and float(x.max()) > 1.0:
        raise ValueError(f"float image values must lie in [0, 1] (or [-1, 1]); got values up to {float(x.max()):g} "
                         f"(for 0-255 values divide by 255, or pass the uint8 array as it is)")
    h, w = _target_size(tuple(x.shape[-2:]), width, height, multiple, what)
    x = torch.nn.functional.interpolate(x, size=(h, w))
    if x.min() < 0:  # already in [-1, 1] (diffusers accepts this, deprecated, with a warning)
        logger.warning("image values go below 0 (down to %.3g): the image is read as [-1, 1], not [0, 1]; clamp an "
                       "image in [0, 1] that a resize pushed a little past its range (bicubic, Lanczos) to [0, 1] "
                       "first", float(x.min()))
        return x
    return x * 2.0 - 1.0


#: What white is in an integer image: uint8 (``np.asarray(pil)``) and uint16 (16-bit PNGs); bool is 0/1.
WHITE = {torch.uint8: 255.0, torch.uint16: 65535.0, torch.bool: 1.0} if hasattr(torch, "uint16") else \
    {torch.uint8: 255.0, torch.bool: 1.0}


def _white(dtype: torch.dtype) -> float:
    """The value that means white in an image of this dtype (floats: 1); other integer types are
    refused, since their range says nothing (0-255 values in int64 would otherwise read as black)."""
    if dtype.is_floating_point:
        return 1.0
    if dtype not in WHITE:
        raise ValueError(f"integer images must be uint8 (0-255) or uint16 (0-65535), got {dtype}: convert them "
                         f"(.astype(np.uint8)) or give floats in [0, 1]")
    return WHITE[dtype]


def is_wide_grey(image) -> bool:
    """Whether a PIL image is 16-bit or float grey (a depth map, a 16-bit mask), which Pillow's
    conversion to RGB or L clips (any value above 255 becomes white)."""
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


def _pil_wide_grey(image, w: int, h: int) -> np.ndarray:
    """A 16-bit or float grey PIL image as (h, w) float32 in [0, 1], scaled from its own range
    (0-65535; float images: 0-1) and resized with Lanczos."""
    from PIL import Image

    top = 1.0 if image.mode == "F" else 65535.0
    grey = np.asarray(image, dtype=np.float32) / top
    grey = np.asarray(Image.fromarray(grey, mode="F").resize((w, h), resample=Image.LANCZOS), dtype=np.float32)
    return np.clip(grey, 0.0, 1.0)


def _pil_rgb(image, w: int, h: int) -> np.ndarray:
    """A PIL image as (h, w, 3) float32 in [0, 1], resized with Lanczos. RGB images are resized, then
    read (the reference's order); other modes are made RGB first (a palette image resized as
    indices would fall back to nearest), and 16-bit or float grey images (depth maps) are scaled to
    [0, 1] from their own range, which a plain RGB conversion would clip to white."""
    from PIL import Image

    if is_wide_grey(image):
        return np.repeat(_pil_wide_grey(image, w, h)[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image.resize((w, h), resample=Image.LANCZOS), dtype=np.float32) / 255.0


def preprocess_mask(mask, height: int, width: int) -> torch.Tensor:
    """Mask(s) -> (B, 1, H, W) fp32 of 0 (keep) and 1 (repaint): PIL masks resized with Lanczos and
    made grey (16-bit and float grey ones scaled from their own range, 0-65535 or 0-1), arrays
    (H, W) / (H, W, 1) / (B, H, W) and tensors (H, W) / (B, H, W) / (B, 1, H, W) (or lists of them)
    with nearest interpolation; then binarised at 0.5, as the reference's mask processor does."""
    from PIL import Image

    if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[-1] in (3, 4):
        raise ValueError(f"mask_image arrays have one channel: give (H, W), (H, W, 1) or (B, H, W); got shape "
                         f"{mask.shape} (a PIL mask of any mode is made grey)")
    if isinstance(mask, np.ndarray) and mask.ndim == 2:
        mask = mask[..., None]
    elif isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[-1] != 1:  # (B, H, W), as the reference
        mask = mask[..., None]
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        mask = mask[None, None]
    elif isinstance(mask, torch.Tensor) and mask.ndim == 3:
        mask = mask[:, None]
    kind, batch = _as_batch(mask, "mask_image")
    if kind != "pil" and batch.ndim == 3:  # a list of (H, W) masks: add the channel, as the reference does
        batch = batch[..., None] if kind == "np" else batch[:, None]
    if kind == "pil":  # 16-bit and float grey masks by their own range, as images (Pillow's L would clip them)
        arrays = [_pil_wide_grey(m, width, height) if is_wide_grey(m) else
                  np.asarray(m.resize((width, height), resample=Image.LANCZOS).convert("L"), dtype=np.float32) / 255.0
                  for m in batch]
        m = torch.from_numpy(np.stack(arrays))[:, None]
    else:
        m = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)) if kind == "np" else batch.float()
        if kind == "np" and m.ndim == 4:
            m = m.permute(0, 3, 1, 2)
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"a mask array must be (H, W), (H, W, 1) or (B, H, W), a mask tensor (H, W) or "
                             f"(B, 1, H, W); got shape {tuple(batch.shape)}")
        m = torch.nn.functional.interpolate(m, size=(height, width))
    return (m >= 0.5).float()


def to_pil(images: np.ndarray):
    """(N, H, W, 3) floats in [0, 1] -> PIL images, rounding as the reference does."""
    from PIL import Image

    return [Image.fromarray((img * 255).round().astype("uint8")) for img in images]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on the same device, rounded as :func:`to_pil`
    rounds (x * 255 in fp32, half to even): the fast twin of ``to_pil`` for the decoded image. On a
    GPU the conversion is one kernel and a third of the bytes cross to the host (a quarter of fp32's
    bytes, half of bf16's); the host work of ``to_pil`` took 18-28 ms for a 1024x1024 image on the
    CPU (docs/performance.md, "After the DiT")."""
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def uint8_to_pil(pixels: torch.Tensor):
    """(B, H, W, 3) uint8 on the CPU -> PIL images."""
    from PIL import Image

    return [Image.fromarray(p) for p in pixels.numpy()]


class ImageProcessor:
    """diffusers' ``pipe.image_processor`` (its ``VaeImageProcessor`` with ``do_normalize``, and a
    ``vae_scale_factor`` of twice the VAE's, 16 for Z-Image) for scripts that decode or encode by
    hand: ``postprocess`` a decoded batch, ``preprocess`` an image to the VAE's input."""

    def __init__(self, vae_scale_factor: int):
        self.vae_scale_factor = vae_scale_factor

    def preprocess(self, image, height: int | None = None, width: int | None = None, resize_mode: str = "default",
                   crops_coords=None) -> torch.Tensor:
        """Image(s) as the pipeline's ``image=`` takes them -> (B, 3, H, W) fp32 in [-1, 1], resized to
        ``width`` x ``height`` or with the sides rounded down to multiples of ``vae_scale_factor``."""
        if resize_mode != "default" or crops_coords is not None:
            raise ValueError("image_processor.preprocess: resize_mode and crops_coords are not supported here; "
                             "crop or pad the image first, then give height= and width= (or neither)")
        return preprocess_image(image, width=width, height=height, multiple=self.vae_scale_factor)

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        """A decoded batch (B, 3, H, W) in [-1, 1] -> ``"pil"`` (a list of images), ``"np"`` ((B, H, W, 3)
        in [0, 1]), ``"pt"`` ((B, 3, H, W) in [0, 1]) or ``"latent"`` (the input itself).
        ``do_denormalize``: one flag per image (None: all), False leaves that image's values as they are."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            got = f"shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image_processor.postprocess takes a batch tensor (B, 3, H, W), as "
                             f"pipe.vae.decode(z).sample gives it; got {got}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if output_type == "latent":
            return image
        flags = [True] * image.shape[0] if do_denormalize is None else list(do_denormalize)
        if len(flags) != image.shape[0]:
            raise ValueError(f"image_processor.postprocess: do_denormalize has {len(flags)} flags for a batch of "
                             f"{image.shape[0]} images (one per image, or None: all)")
        image = torch.stack([(one * 0.5 + 0.5).clamp(0, 1) if flag else one for one, flag in zip(image, flags)])
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else to_pil(array)
