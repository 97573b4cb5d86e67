"""Request bodies of the server's routes, and their resolution into a :class:`GenerationRequest`.

Pydantic checks the types; :func:`resolve_generation` checks the ranges against the configured
:class:`~zimage_native.server.settings.Limits` (they are settings, not constants) and fills what
the request leaves unset: the template's suggested settings first, then the model's defaults.
Every problem raises :class:`ApiError`, which the app turns into a JSON error naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import random
import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from .engine import PROMPT_FIELDS, Engine, GenerationRequest
from .settings import Limits

MAX_SEED = 2**63 - 1
MAX_INPUT_SIDE = 8192  # an img2img input larger than this is refused before it is decoded


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.headers = headers


def invalid(param: str, message: str) -> ApiError:
    return ApiError(422, f"{param}: {message}", "invalid_request_error", param)


class PromptFields(BaseModel):
    """The chat-format fields (docs/prompting.md)."""

    template: str | None = None
    system_prompt: str | None = None
    thinking_content: str | None = None
    assistant_content: str | None = None
    force_think_block: bool | None = None
    strip_quotes: bool | None = None


class JobRequest(PromptFields):
    """``POST /api/v1/jobs``: every generation field of the library. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    size: str | None = Field(None, description="'WIDTHxHEIGHT', instead of width and height")
    steps: int | None = Field(None, validation_alias=AliasChoices("steps", "num_inference_steps"))
    guidance_scale: float | None = None
    seed: int | list[int] | None = Field(None, validation_alias=AliasChoices("seed", "seeds"))
    n: int = Field(1, validation_alias=AliasChoices("n", "num_images"))
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    max_sequence_length: int = 512
    shift: float | None = None
    image: str | None = Field(None, description="img2img input: base64 or a data: URL (PNG, JPEG, WebP)")
    strength: float = 0.6


class LegacyGenerateRequest(JobRequest):
    """``POST /api/generate`` (the predecessor's route): as a job request, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class OpenAIImageRequest(BaseModel):
    """``POST /v1/images/generations``; OpenAI-only knobs (quality, style, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = None
    stream: bool | None = None
    user: str | None = None
    # The extensions, named as vLLM-Omni and SGLang name them.
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


class EncodeRequest(PromptFields):
    """``POST /api/encode`` and ``/api/save-embeddings``: pre-formatted ``texts`` or a ``prompt``."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = None
    prompt: str | list[str] | None = None
    max_sequence_length: int = 512


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str]
    max_sequence_length: int = 512


class FormatPromptRequest(PromptFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    tokens: bool = False
    max_sequence_length: int = 512


class RewriteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    rewriter: str | None = None
    system_prompt: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.7
    seed: int | None = None
    top_p: float = 0.95
    force_think_block: bool | None = None


class LoginRequest(BaseModel):
    token: str


# ---------------------------------------------------------------------------------------------


def check_text(param: str, value: str | None, limits: Limits, *, required: bool = False) -> None:
    if value is None:
        if required:
            raise invalid(param, "is required")
        return
    if required and not value.strip():
        raise invalid(param, "must not be empty")
    if len(value) > limits.max_prompt_chars:
        raise invalid(param, f"is {len(value)} characters long; the limit is {limits.max_prompt_chars}")


def check_prompt_fields(body: PromptFields, limits: Limits, engine: Engine) -> dict[str, Any]:
    for name in ("system_prompt", "thinking_content", "assistant_content"):
        check_text(name, getattr(body, name), limits)
    if body.template is not None:
        try:
            engine.template(body.template)
        except KeyError as e:
            raise invalid("template", str(e.args[0]) if e.args else f"unknown template {body.template!r}") from None
    return {k: getattr(body, k) for k in PROMPT_FIELDS if getattr(body, k) is not None}


def check_max_len(value: int, limits: Limits) -> int:
    if not 1 <= value <= limits.max_sequence_length:
        raise invalid("max_sequence_length", f"must be between 1 and {limits.max_sequence_length}, got {value}")
    return value


def parse_size(text: str, param: str = "size") -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", text)
    if not match:
        raise invalid(param, f"must look like '1024x1024' (width x height), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_size(width: int, height: int, limits: Limits) -> None:
    for name, value in (("width", width), ("height", height)):
        if value % 16:
            raise invalid(name, f"must be a multiple of 16, got {value}")
        if not limits.min_side <= value <= limits.max_side:
            raise invalid(name, f"must be between {limits.min_side} and {limits.max_side}, got {value}")
    if width * height > limits.max_pixels:
        raise invalid("size", f"{width}x{height} has {width * height} pixels; the limit is {limits.max_pixels}")


def decode_image(data: str, limits: Limits):
    """A base64 string or data: URL -> an RGB PIL image, within the upload limits."""
    from PIL import Image, UnidentifiedImageError

    text = data.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise invalid("image", "a data: URL must be base64-encoded")
    if len(text) > limits.max_upload_bytes * 4 // 3 + 8:
        raise ApiError(413, f"image: the input image is larger than the limit of {limits.max_upload_bytes} bytes",
                       "payload_too_large", "image")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image", "is not valid base64") from None
    if len(raw) > limits.max_upload_bytes:
        raise ApiError(413, f"image: the input image is larger than the limit of {limits.max_upload_bytes} bytes",
                       "payload_too_large", "image")
    try:
        image = Image.open(io.BytesIO(raw))
        if image.format not in ("PNG", "JPEG", "WEBP"):
            raise invalid("image", f"must be a PNG, JPEG or WebP image, got {image.format}")
        if max(image.size) > MAX_INPUT_SIDE:
            raise invalid("image", f"is {image.width}x{image.height}; the limit is {MAX_INPUT_SIDE} pixels a side")
        image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise invalid("image", f"cannot be read as an image ({e})") from None
    return image.convert("RGB")


def _fit(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """An input image's size, scaled down to the limits and rounded down to multiples of 16."""
    scale = min(1.0, limits.max_side / max(width, height), (limits.max_pixels / (width * height)) ** 0.5)
    w, h = int(width * scale) // 16 * 16, int(height * scale) // 16 * 16
    return max(w, 16), max(h, 16)


def resolve_seeds(seed: int | list[int] | None, n: int, limits: Limits) -> list[int]:
    if isinstance(seed, list):
        if not seed:
            raise invalid("seed", "an empty list; give one seed, one per image, or none")
        if n == 1:
            n = len(seed)
        elif len(seed) != n:
            raise invalid("seed", f"got {len(seed)} seeds for n={n} images; give one seed or one per image")
        seeds = list(seed)
    elif seed is not None:
        seeds = [seed + i for i in range(n)]
    else:
        seeds = [random.randrange(2**32) for _ in range(n)]
    if not 1 <= len(seeds) <= limits.max_images:
        raise invalid("n", f"must be between 1 and {limits.max_images}, got {len(seeds)}")
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise invalid("seed", f"must be between 0 and {MAX_SEED}, got {s}")
    return seeds


def resolve_generation(body: JobRequest, engine: Engine, limits: Limits) -> GenerationRequest:
    """Check a job request against the limits and fill its unset values (see the module docstring)."""
    check_text("prompt", body.prompt, limits, required=True)
    check_text("negative_prompt", body.negative_prompt, limits)
    fields = check_prompt_fields(body, limits, engine)
    fields.pop("template", None)
    suggested = dict(getattr(engine.template(body.template), "settings", None) or {}) if body.template else {}

    image = decode_image(body.image, limits) if body.image else None
    width, height = body.width, body.height
    if body.size is not None and body.size != "auto":
        if width is not None or height is not None:
            raise invalid("size", "give either size or width and height, not both")
        width, height = parse_size(body.size)
    if image is not None and width is None and height is None:
        width, height = _fit(image.width, image.height, limits)
    width = width if width is not None else suggested.get("width", 1024)
    height = height if height is not None else suggested.get("height", 1024)
    check_size(width, height, limits)

    steps = body.steps if body.steps is not None else suggested.get("steps", engine.default_steps)
    if not 1 <= steps <= limits.max_steps:
        raise invalid("steps", f"must be between 1 and {limits.max_steps}, got {steps}")
    guidance = body.guidance_scale
    if guidance is None:
        guidance = suggested.get("guidance_scale", engine.default_guidance)
    if not 0 <= guidance <= limits.max_guidance:
        raise invalid("guidance_scale", f"must be between 0 and {limits.max_guidance}, got {guidance}")
    negative = body.negative_prompt if body.negative_prompt is not None else suggested.get("negative_prompt")
    if not 0 <= body.cfg_normalization <= 100:
        raise invalid("cfg_normalization", f"must be between 0 (off) and 100, got {body.cfg_normalization}")
    if not 0 <= body.cfg_truncation <= 1:
        raise invalid("cfg_truncation", f"must be between 0 and 1, got {body.cfg_truncation}")
    check_max_len(body.max_sequence_length, limits)
    if body.n < 1 or body.n > limits.max_images:
        raise invalid("n", f"must be between 1 and {limits.max_images}, got {body.n}")
    seeds = resolve_seeds(body.seed, body.n, limits)

    shift = body.shift
    if shift is not None:
        if not 0 < shift <= 100:
            raise invalid("shift", f"must be > 0 and <= 100, got {shift}")
        if engine.dynamic_shift:
            raise invalid("shift", "this model's scheduler shifts by resolution; a fixed shift is not supported")
    strength = None
    if image is not None:
        if not 0 <= body.strength <= 1:
            raise invalid("strength", f"must be between 0 and 1, got {body.strength}")
        start = int(max(steps - min(steps * body.strength, steps), 0))  # as the pipeline computes it
        if steps - start < 1:
            raise invalid("strength", f"strength {body.strength} with {steps} steps leaves no step to run")
        strength = body.strength
    return GenerationRequest(prompt=body.prompt, width=width, height=height, steps=steps,
                             guidance_scale=float(guidance), seeds=seeds, negative_prompt=negative,
                             template=body.template, fields=fields, cfg_normalization=float(body.cfg_normalization),
                             cfg_truncation=float(body.cfg_truncation), max_sequence_length=body.max_sequence_length,
                             shift=shift, strength=strength, image=image)


def openai_to_job(body: OpenAIImageRequest) -> JobRequest:
    if body.stream:
        raise invalid("stream", "streaming is not supported on this route; use the job API's events instead")
    if body.output_compression is not None and not 0 <= body.output_compression <= 100:
        raise invalid("output_compression", f"must be between 0 and 100, got {body.output_compression}")
    return JobRequest(prompt=body.prompt, n=body.n, size=body.size, negative_prompt=body.negative_prompt,
                      steps=body.num_inference_steps, guidance_scale=body.guidance_scale, seed=body.seed)
