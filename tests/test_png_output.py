"""From the decoded image to the file. The decoded image is made 8-bit on its device
(``images.to_uint8``, against its slow twin ``images.to_pil``). Every PNG writer (the CLI, the
server's history, the Ray replicas' transfers) uses ``metadata.save_png``, whose fast settings
are lossless and keep the metadata.

Pillow's default (zlib level 6, default strategy) took 576-802 ms for a 1024x1024 photo on the CPU,
the engine's settings 67-137 ms for a file 0.6% larger (docs/performance.md, "After the DiT"). The
level a PNG was written with is in its zlib header: FLEVEL (the top two bits of the second byte)
is 0 for level 1 or the run-length strategy and 2 for Pillow's default."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_native.metadata import PNG_OPTIONS, png_info, read_metadata, save_png

RECORD = {"prompt": "a lighthouse at dusk", "seed": 7, "steps": 8, "width": 96, "height": 64}


def photo_like(width=96, height=64) -> Image.Image:
    """Smooth colour fields and a little noise, as a decoded image has."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(3 * x + c) * np.cos(2 * y - c) for c in (0.0, 1.0, 2.0)], -1) * 0.4 + 0.5
    pixels = np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def zlib_level_flag(data: bytes) -> int:
    """FLEVEL of the first IDAT chunk's zlib stream."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            return data[pos + 9] >> 6
        pos += 12 + length
    raise AssertionError("no IDAT chunk")


def check_written(data: bytes, image: Image.Image, record: dict | None = RECORD) -> None:
    assert zlib_level_flag(data) == 0, "written with a slow zlib level (Pillow's default is FLEVEL 2)"
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == image.mode and np.array_equal(np.asarray(back), np.asarray(image))  # lossless


def test_save_png_is_lossless_keeps_metadata_and_uses_the_fast_settings(tmp_path):
    assert PNG_OPTIONS == {"compress_level": 1, "compress_type": zlib.Z_RLE}
    image = photo_like()
    save_png(image, tmp_path / "a.png", png_info(RECORD))
    check_written((tmp_path / "a.png").read_bytes(), image)
    assert read_metadata(tmp_path / "a.png") == RECORD
    default = io.BytesIO()
    image.save(default, format="PNG")
    assert zlib_level_flag(default.getvalue()) == 2  # the check above can tell Pillow's default apart


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_save_png_is_lossless_for_every_mode_the_engine_writes(mode):
    image = photo_like().convert(mode)
    buffer = io.BytesIO()
    save_png(image, buffer)
    check_written(buffer.getvalue(), image)


def test_the_cli_writes_its_pngs_with_the_fast_settings(tmp_path):
    from zimage_native.cli._common import save_image_atomic

    image = photo_like()
    path = tmp_path / "out" / "x.png"
    save_image_atomic(image, path, pnginfo=png_info(RECORD))
    check_written(path.read_bytes(), image)
    assert read_metadata(path) == RECORD


def test_the_server_stores_its_pngs_with_the_fast_settings(tmp_path):
    from zimage_native.server.storage import Storage

    store = Storage(tmp_path)
    try:
        image = photo_like()
        row = store.save_image("j" + "a" * 20, 0, image, RECORD, png_info(RECORD))
        check_written(store.image_file(row).read_bytes(), image)
        assert read_metadata(store.image_file(row)) == RECORD
    finally:
        store.close()


def test_the_ray_replica_sends_pngs_with_the_fast_settings():
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from zimage_native.server.engine import GenerationRequest
    from zimage_native.server.ray_serve import _request_payload

    image = photo_like()
    request = GenerationRequest(prompt="p", width=96, height=64, steps=2, guidance_scale=0.0, image=image,
                                strength=0.5)
    check_written(_request_payload(request)["image_png"], image)


# ---------------------------------------------------------------------------------- decoded image to 8 bits
def all_values_in_unit_range(dtype: torch.dtype) -> torch.Tensor:
    """Every value of a 16-bit float type in [0, 1], as (1, 3, H, W) (the three channels rolled)."""
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype).float()
    values = bits[torch.isfinite(bits) & (bits >= 0) & (bits <= 1)].to(dtype)
    values = torch.cat([values, values[: (-len(values)) % 64]])  # a whole number of 64-wide rows
    plane = values.reshape(-1, 64)
    return torch.stack([plane, plane.roll(1), plane.roll(2)])[None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_to_uint8_equals_to_pil_for_every_value(dtype):
    """The fast twin (uint8 where the image was decoded) against the slow one (numpy floats on the
    host): every bf16 and fp16 value in [0, 1], and fp32 values around every rounding tie."""
    from zimage_native.images import to_pil, to_uint8, uint8_to_pil

    if dtype == torch.float32:
        ties = (torch.arange(0, 255, dtype=torch.float64) + 0.5) / 255
        near = torch.cat([ties, torch.nextafter(ties.float(), torch.tensor(0.0)).double(),
                          torch.nextafter(ties.float(), torch.tensor(1.0)).double(), torch.rand(64 * 61,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64)])
        images = all_values_in_unit_range(torch.bfloat16).float()
        images[0, 0].view(-1)[: len(near)] = near.float()
    else:
        images = all_values_in_unit_range(dtype)
    slow = to_pil(images.permute(0, 2, 3, 1).float().numpy())
    fast = uint8_to_pil(to_uint8(images).cpu())
    assert len(fast) == len(slow) == 1 and fast[0].mode == slow[0].mode == "RGB"
    assert np.array_equal(np.asarray(fast[0]), np.asarray(slow[0]))


class HostCopies(torch.Tensor):
    """A tensor that records the dtype of every copy of it (or of what is computed from it) to the
    host: what crosses from the device where the image was decoded."""

    dtypes: list[torch.dtype] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cpu, torch.Tensor.numpy):
            cls.dtypes.append(args[0].dtype)
        return super().__torch_function__(func, types, args, kwargs)


def test_the_pil_output_is_made_8_bit_before_it_leaves_the_decoders_device(fresh_pipe, tiny_pipe, monkeypatch):
    """output_type="pil" copies uint8 pixels to the host (not the float image, converted there), and
    its images equal the slow twin's: to_pil of the "np" output."""
    decode = fresh_pipe.decode
    monkeypatch.setattr(fresh_pipe, "decode", lambda latents: decode(latents).as_subclass(HostCopies))
    HostCopies.dtypes = []
    kw = dict(height=32, width=48, num_inference_steps=2, seed=3)
    got = fresh_pipe(["a cat", "a red boat"], output_type="pil", **kw).images
    assert HostCopies.dtypes and set(HostCopies.dtypes) == {torch.uint8}, HostCopies.dtypes
    from zimage_native.images import to_pil

    expected = to_pil(tiny_pipe(["a cat", "a red boat"], output_type="np", **kw).images)
    assert [im.size for im in got] == [(48, 32)] * 2
    for a, b in zip(got, expected):
        assert np.array_equal(np.asarray(a), np.asarray(b))
