"""Request bodies of the server's routes, and their resolution into a :class:`GenerationRequest`.

Pydantic checks the types; :func:`resolve_generation` checks the ranges against the configured
:class:`~zimage_native.server.settings.Limits` (they are settings, not constants) and fills what
the request leaves unset: the template's suggested settings first, then the model's defaults.
Every problem raises :class:`ApiError`, which the app turns into a JSON error naming the field.
"""

import base64
import binascii
import io
import math
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, WithJsonSchema

from .engine import PROMPT_FIELDS, Engine, GenerationRequest
from .settings import Limits

MAX_SEED = 2**63 - 1
MAX_INT = 2**63 - 1  # SQLite's largest integer: the bound of offsets and event ids
MAX_INPUT_SIDE = 8192  # an img2img input larger than this is refused before it is decoded
SIZE_PATTERN = r"^(?:[0-9]{1,5}[xX][0-9]{1,5}|auto)$"


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


# ------------------------------------------------------------------------------ constrained types
# Each helper returns one annotated type whose check and whose JSON Schema come from the same
# arguments, so what /openapi.json promises is what the server enforces (the arguments come from
# the server's Limits). A failed check is a 422 naming the field (errors.py).


def _has_lone_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def Int(lo: int, hi: int, *, multiple_of: int | None = None, description: str | None = None) -> Any:
    """An integer in [lo, hi], optionally a multiple of ``multiple_of``."""
    schema: dict[str, Any] = {"type": "integer", "minimum": lo, "maximum": hi}
    if multiple_of:
        schema["multipleOf"] = multiple_of
    if description:
        schema["description"] = description

    def check(v: int) -> int:
        if multiple_of and v % multiple_of:
            raise ValueError(f"must be a multiple of {multiple_of}, got {v}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v

    return Annotated[int, AfterValidator(check), WithJsonSchema(schema)]


def Num(lo: float, hi: float, *, open_lo: bool = False, description: str | None = None) -> Any:
    """A finite number in [lo, hi] (or (lo, hi] with ``open_lo``)."""
    schema: dict[str, Any] = {"type": "number", "maximum": hi}
    schema["exclusiveMinimum" if open_lo else "minimum"] = lo
    if description:
        schema["description"] = description

    def check(v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        if (v <= lo if open_lo else v < lo) or v > hi:
            raise ValueError(f"must be {'>' if open_lo else 'between'} {lo}{' and <=' if open_lo else ' and'} {hi}, got {v}")
        return float(v)

    return Annotated[float, AfterValidator(check), WithJsonSchema(schema)]


def Text(max_len: int, *, nonblank: bool = False, min_len: int = 0, pattern: str | None = None,
         description: str | None = None) -> Any:
    """A string of at most ``max_len`` characters (no lone surrogates); ``nonblank``: not only
    whitespace; ``pattern``: must match it in full."""
    schema: dict[str, Any] = {"type": "string", "maxLength": max_len}
    if min_len:
        schema["minLength"] = min_len
    if nonblank:
        schema.update(minLength=1, pattern=r"\S")
    if pattern:
        schema["pattern"] = pattern
    if description:
        schema["description"] = description

    def check(v: str) -> str:
        if (nonblank and not re.search(r"\S", v)) or len(v) < min_len:
            raise ValueError("must not be empty")
        if len(v) > max_len:
            raise ValueError(f"is {len(v)} characters long; the limit is {max_len}")
        if pattern and not re.fullmatch(pattern.strip("^$"), v):
            raise ValueError(f"must match {pattern}, got {v[:40]!r}")
        if _has_lone_surrogate(v):
            raise ValueError("is not valid Unicode (a lone surrogate)")
        return v

    return Annotated[str, AfterValidator(check), WithJsonSchema(schema)]


def Choice(names: list[str], what: str, *, hint=None) -> Any:
    """One of ``names`` (a JSON Schema enum); ``hint(value)`` may give a friendlier message."""
    allowed = list(names)
    known = set(allowed)
    schema: dict[str, Any] = {"type": "string", "enum": allowed}

    def check(v: str) -> str:
        if v not in known:
            raise ValueError(hint(v) if hint else f"unknown {what} {v!r}; one of {allowed}")
        return v

    return Annotated[str, AfterValidator(check), WithJsonSchema(schema)]


def NoStream() -> Any:
    def check(v: bool) -> bool:
        if v:
            raise ValueError("streaming is not supported on this route; use the job API's events instead")
        return v

    return Annotated[bool, AfterValidator(check),
                     WithJsonSchema({"type": "boolean", "enum": [False],
                                     "description": "not supported (use the job API's events)"})]


IMAGE_DATA = {"type": "string", "contentEncoding": "base64",
              "description": "base64 or a data: URL of a PNG, JPEG or WebP image"}


def ImageData(description: str) -> Any:
    """A base64 image (its content is checked when it is decoded: format, size, upload limit)."""
    def check(v: str) -> str:
        if _has_lone_surrogate(v):
            raise ValueError("is not valid base64")
        return v

    return Annotated[str, AfterValidator(check), WithJsonSchema({**IMAGE_DATA, "description": description})]


def IdPath(regex: re.Pattern, what: str) -> Any:
    """A path id in the server's format (anything else is a 422 before any look-up)."""
    def check(v: str) -> str:
        if not regex.fullmatch(v):
            raise ValueError(f"is not a valid {what} id (the format is {regex.pattern})")
        return v

    return Annotated[str, AfterValidator(check), WithJsonSchema({"type": "string", "pattern": regex.pattern})]


class Strict(BaseModel):
    """JSON types are taken as they are: no "5" for 5, no 1 for true."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


@dataclass
class Models:
    """The request bodies of one app, with the constraints of its Limits (see :func:`build_models`)."""

    job: type[BaseModel]
    legacy: type[BaseModel]
    openai: type[BaseModel]
    encode: type[BaseModel]
    tokenize: type[BaseModel]
    format_prompt: type[BaseModel]
    rewrite: type[BaseModel]
    login: type[BaseModel]


def build_models(limits: Limits, templates: list[str], rewriters: list[str], template_hint=None) -> Models:
    """The request models for ``limits`` and the templates known at start-up.

    The limits become constraints in both the checks and the published schema (minimum, maximum,
    multipleOf, maxLength, enum), from the same numbers. What JSON Schema cannot say (width x
    height within max_pixels, one seed per image, the strength leaving a step to run) is checked
    by :func:`resolve_generation` and answered with a 422 too.
    """
    L = limits
    PromptTextT = Text(L.max_prompt_chars, nonblank=True)
    TextT = Text(L.max_prompt_chars)
    SideT = Int(L.min_side, L.max_side, multiple_of=16)
    StepsT = Int(1, L.max_steps)
    NImagesT = Int(1, L.max_images)
    SeedT = Int(0, MAX_SEED)
    # An image request's one seed: -1 draws a random one, as A1111's API and most UIs take it.
    ImageSeedT = Int(-1, MAX_SEED, description="-1 (or no seed) draws a random seed")
    GuidanceT = Num(0, L.max_guidance)
    SeqLenT = Int(1, L.max_sequence_length)
    default_len = min(512, L.max_sequence_length)
    SizeT = Text(11, pattern=SIZE_PATTERN, description="'WIDTHxHEIGHT' (or 'auto'), instead of width and height")
    TemplateT = Choice(templates, "template", hint=template_hint)
    RewriterT = Choice(rewriters, "rewriter", hint=template_hint)

    class PromptFields(Strict):
        """The chat-format fields (docs/prompting.md)."""

        template: TemplateT | None = None
        system_prompt: TextT | None = None
        thinking_content: TextT | None = None
        assistant_content: TextT | None = None
        force_think_block: bool | None = None
        strip_quotes: bool | None = None

    class JobRequest(PromptFields):
        """``POST /api/v1/jobs``: every generation field of the library. Unknown fields are refused.

        Tasks: text-to-image (no image), img2img (``image``), inpainting (``image`` + ``mask``, white
        = repaint), ControlNet (``control_image``, alone or with ``image`` + ``mask``)."""

        prompt: PromptTextT
        negative_prompt: TextT | None = None
        width: SideT | None = None
        height: SideT | None = None
        size: SizeT | None = None
        steps: StepsT | None = Field(None, validation_alias=AliasChoices("steps", "num_inference_steps"))
        guidance_scale: GuidanceT | None = None
        seed: ImageSeedT | Annotated[list[SeedT], Field(min_length=1, max_length=L.max_images)] | None = Field(
            None, validation_alias=AliasChoices("seed", "seeds"))
        n: NImagesT = Field(1, validation_alias=AliasChoices("n", "num_images"))
        cfg_normalization: Num(0, 100, description="0 = off") = 0.0
        cfg_truncation: Num(0, 1) = 1.0
        max_sequence_length: SeqLenT = default_len
        shift: Num(0, 100, open_lo=True) | None = None
        seed_variance: Num(0, 1000, description="more varied images across seeds (Turbo): noise amplitude on the "
                                                "prompt features of the first steps; 15-30 is usual, 0 = off") = 0.0
        seed_variance_share: Num(0, 1, open_lo=True, description="the fraction of feature values varied (needs "
                                                                 "seed_variance; default 0.5)") | None = None
        seed_variance_steps: Num(0, 1, open_lo=True, description="the fraction of the steps that see the noise "
                                                                 "(needs seed_variance; default 0.2)") | None = None
        first_block_cache: Num(0, 100, description="skip the DiT's main layers on steps whose first layer changed by "
                                                   "at most this fraction (lossy; 0.05-0.2 is usual, 0 = off)") = 0.0
        image: ImageData("img2img or inpainting input: base64 or a data: URL (PNG, JPEG, WebP)") | None = None
        mask: ImageData("inpainting mask (needs image): white = repaint, black = keep; base64 or data: URL") | None = None
        control_image: ImageData("ControlNet condition (pose, edges, depth, ...): base64 or data: URL") | None = None
        strength: Num(0, 1, description="img2img default 0.6, inpainting default 1.0") | None = None
        control_scale: Num(0, L.max_control_scale, description="ControlNet conditioning scale (default 0.75)") | None = None

    class LegacyGenerateRequest(JobRequest):
        """``POST /api/generate`` (the predecessor's route): as a job request, unknown fields ignored."""

        model_config = ConfigDict(extra="ignore")

    class OpenAIImageRequest(Strict):
        """``POST /v1/images/generations``; OpenAI-only knobs (quality, style, ...) are accepted and ignored."""

        model_config = ConfigDict(extra="ignore")

        prompt: PromptTextT
        model: Text(256) | None = None
        n: NImagesT = 1
        size: SizeT | None = None
        response_format: Literal["b64_json", "url"] | None = "b64_json"
        output_format: Literal["png", "jpeg", "webp"] | None = "png"
        output_compression: Int(0, 100) | None = None
        stream: NoStream() | None = None
        user: Text(256) | None = None
        # The extensions, named as vLLM-Omni and SGLang name them.
        negative_prompt: TextT | None = None
        num_inference_steps: StepsT | None = None
        guidance_scale: GuidanceT | None = None
        seed: ImageSeedT | None = None

    PromptsT = Annotated[list[Text(L.max_prompt_chars, min_len=1)], Field(min_length=1, max_length=L.max_texts)]
    TextsT = Annotated[list[Text(L.max_formatted_chars, min_len=1)], Field(min_length=1, max_length=L.max_texts)]

    class EncodeRequest(PromptFields):
        """``POST /api/encode`` and ``/api/save-embeddings``: pre-formatted ``texts`` or a ``prompt``."""

        model_config = ConfigDict(json_schema_extra={"oneOf": [
            {"required": ["texts"], "properties": {"texts": {"type": "array"}, "prompt": {"type": "null"},
                                                   **{k: {"type": "null"} for k in ("template", *PROMPT_FIELDS)}}},
            {"required": ["prompt"], "properties": {"prompt": {"type": ["string", "array"]},
                                                    "texts": {"type": "null"}}},
        ]})

        texts: TextsT | None = None
        prompt: PromptTextT | PromptsT | None = None
        max_sequence_length: SeqLenT = default_len

    class TokenizeRequest(Strict):
        texts: TextsT
        max_sequence_length: SeqLenT = default_len

    class FormatPromptRequest(PromptFields):
        prompt: PromptTextT
        tokens: bool = False
        max_sequence_length: SeqLenT = default_len

    class RewriteRequest(Strict):
        prompt: PromptTextT
        rewriter: RewriterT | None = None
        system_prompt: TextT | None = None
        max_new_tokens: Int(1, L.max_new_tokens) = min(512, L.max_new_tokens)
        temperature: Num(0, 5) = 0.7
        seed: SeedT | None = None
        top_p: Num(0, 1, open_lo=True) = 0.95
        force_think_block: bool | None = None

    class LoginRequest(Strict):
        token: Text(4096)

    return Models(JobRequest, LegacyGenerateRequest, OpenAIImageRequest, EncodeRequest, TokenizeRequest,
                  FormatPromptRequest, RewriteRequest, LoginRequest)


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


def check_prompt_fields(body, limits: Limits, engine: Engine) -> dict[str, Any]:
    for name in ("system_prompt", "thinking_content", "assistant_content"):
        check_text(name, getattr(body, name), limits)
    if body.template is not None:
        try:
            engine.template(body.template)
        except KeyError as e:
            raise invalid("template", str(e.args[0]) if e.args else f"unknown template {body.template!r}") from None
    return {k: getattr(body, k) for k in PROMPT_FIELDS if getattr(body, k) is not None}


def image_template(name: str | None, engine: Engine):
    """The template named for an image (None: none), refused if it is a rewriter's (its system
    prompt instructs the prompt rewriter, not the image)."""
    template = engine.template(name) if name else None
    if template is not None and template.category == "rewriter":
        raise invalid("template", f"{name} is a rewriter: its system prompt instructs the prompt rewriter, not the "
                                  f"image; rewrite first (POST /api/rewrite with rewriter {name}) and generate from "
                                  f"its answer, or pick an image template")
    return template


def check_max_len(value: int, limits: Limits) -> int:
    if not 1 <= value <= limits.max_sequence_length:
        raise invalid("max_sequence_length", f"must be between 1 and {limits.max_sequence_length}, got {value}")
    return value


def parse_size(text: str, param: str = "size") -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]{1,5})[xX]([0-9]{1,5})", text)
    if not match:
        raise invalid(param, f"must look like '1024x1024' (width x height), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_size(width: int, height: int, limits: Limits, size: str | None = None) -> None:
    """Sides in multiples of 16 within the limits. ``size``: the request's ``size`` text, which
    errors then name (the client sent no width or height)."""
    for name, value in (("width", width), ("height", height)):
        param, what = ("size", f"the {name} of {size} ") if size is not None else (name, "")
        if value % 16:
            raise invalid(param, f"{what}must be a multiple of 16, got {value}")
        if not limits.min_side <= value <= limits.max_side:
            raise invalid(param, f"{what}must be between {limits.min_side} and {limits.max_side}, got {value}")
    if width * height > limits.max_pixels:
        raise invalid("size", f"{width}x{height} has {width * height} pixels; the limit is {limits.max_pixels}")


def decode_image(data: str, limits: Limits, param: str = "image"):
    """A base64 string or data: URL -> a PIL image (RGB; ``L`` for a mask), within the upload limits
    (compressed bytes, then pixels, checked before the pixels are decoded), turned upright as its
    EXIF orientation says (a phone photo is stored sideways with a tag saying so)."""
    from PIL import Image, ImageOps

    text = data.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise invalid(param, "a data: URL must be base64-encoded")
    too_big = ApiError(413, f"{param}: the input image is larger than the limit of {limits.max_upload_bytes} bytes",
                       "payload_too_large", param)
    if len(text) > limits.max_upload_bytes * 4 // 3 + 8:
        raise too_big
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(param, "is not valid base64") from None
    if len(raw) > limits.max_upload_bytes:
        raise too_big
    try:
        image = Image.open(io.BytesIO(raw))
        if image.format not in ("PNG", "JPEG", "WEBP"):
            raise invalid(param, f"must be a PNG, JPEG or WebP image, got {image.format}")
        if max(image.size) > MAX_INPUT_SIDE:
            raise invalid(param, f"is {image.width}x{image.height}; the limit is {MAX_INPUT_SIDE} pixels a side")
        if image.width * image.height > limits.max_input_pixels:
            raise ApiError(413, f"{param}: the input image is {image.width}x{image.height} "
                                f"({image.width * image.height} pixels); the limit is {limits.max_input_pixels} "
                                f"pixels (scale it down before sending)", "payload_too_large", param)
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("L" if param == "mask" else "RGB")
    except ApiError:
        raise
    except Exception as e:  # a damaged file can fail in many ways inside PIL's decoders
        raise invalid(param, f"cannot be read as an image ({type(e).__name__}: {e})") from None


def default_side(limits: Limits) -> int:
    """The side of the default square image: 1024, or less where the limits allow less."""
    side = min(1024, limits.max_side, int(limits.max_pixels ** 0.5)) // 16 * 16
    return max(side, limits.min_side)


def _fit(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """An input image's size within the limits (scaled down, or up to min_side), in multiples of 16."""
    scale = min(1.0, limits.max_side / max(width, height), (limits.max_pixels / (width * height)) ** 0.5)
    if min(width, height) * scale < limits.min_side:  # too small: up to min_side if the other side fits
        scale = min(-(-limits.min_side // 16) * 16 / min(width, height), limits.max_side / max(width, height))
    w, h = int(width * scale) // 16 * 16, int(height * scale) // 16 * 16
    return max(w, 16, limits.min_side), max(h, 16, limits.min_side)


def _clamp_side(side: int, limits: Limits) -> int:
    """A side the request did not send (a template's or the default) within min_side..max_side, in
    multiples of 16."""
    low = -(-limits.min_side // 16) * 16
    return max(low, min(int(side), limits.max_side // 16 * 16) // 16 * 16)


def _to_size(image, width: int, height: int):
    """``image`` resized to width x height as the pipeline resizes its inputs (Lanczos); None stays None."""
    if image is None or image.size == (width, height):
        return image
    from PIL import Image

    return image.resize((width, height), resample=Image.LANCZOS)


def resolve_seeds(seed: int | list[int] | None, n: int, limits: Limits) -> list[int]:
    if isinstance(seed, list):
        if not seed:
            raise invalid("seed", "an empty list; give one seed, one per image, or none")
        if n == 1:
            n = len(seed)
        elif len(seed) != n:
            raise invalid("seed", f"got {len(seed)} seeds for n={n} images; give one seed or one per image")
        seeds = list(seed)
    elif seed is not None and seed != -1:  # -1: a random seed
        seeds = [seed + i for i in range(n)]
    else:
        seeds = [random.randrange(2**32) for _ in range(n)]
    if not 1 <= len(seeds) <= limits.max_images:
        raise invalid("n", f"must be between 1 and {limits.max_images}, got {len(seeds)}")
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise invalid("seed", f"must be between 0 and {MAX_SEED}, got {s}")
    return seeds


def resolve_generation(body, engine: Engine, limits: Limits) -> GenerationRequest:
    """Check a job request against the limits and fill its unset values (see the module docstring).

    The task follows from the inputs: ``image`` alone is img2img, ``image`` + ``mask`` inpainting,
    ``control_image`` ControlNet (with ``image`` + ``mask``: ControlNet inpainting, which, as in
    diffusers, takes no strength). Each image input is checked as the img2img input is.
    """
    check_text("prompt", body.prompt, limits, required=True)
    check_text("negative_prompt", body.negative_prompt, limits)
    fields = check_prompt_fields(body, limits, engine)
    template = image_template(body.template, engine)
    suggested = dict(getattr(template, "settings", None) or {})

    mask_given, control_given = getattr(body, "mask", None), getattr(body, "control_image", None)
    if mask_given and not body.image:
        raise invalid("mask", "inpainting needs the image to repaint: give image with the mask")
    if mask_given and not engine.can_inpaint:
        raise invalid("mask", "this server's model cannot inpaint")
    if control_given and not engine.can_control:
        raise invalid("control_image", "this server has no ControlNet loaded (zimage serve --controlnet FILE)")
    first_block_cache = float(getattr(body, "first_block_cache", 0.0))
    if first_block_cache and engine.cache_problem:
        raise invalid("first_block_cache", f"not on this server: {engine.cache_problem}")
    if control_given and body.image and not mask_given:
        raise invalid("control_image", "with an image, a control image needs a mask (ControlNet inpainting); "
                                       "ControlNet img2img is not supported")
    image = decode_image(body.image, limits, "image") if body.image else None
    mask = decode_image(mask_given, limits, "mask") if mask_given else None
    control = decode_image(control_given, limits, "control_image") if control_given else None
    width, height, size = body.width, body.height, None
    if body.size is not None and body.size != "auto":
        if width is not None or height is not None:
            raise invalid("size", "give either size or width and height, not both")
        width, height = parse_size(body.size)
        size = body.size
    reference = image if image is not None else control
    if reference is not None and width is None and height is None:
        width, height = _fit(reference.width, reference.height, limits)
    if width is None and height is None and "width" in suggested and "height" in suggested:
        # The template's suggested size, made to fit this server's limits (aspect ratio kept): the
        # request sent no size, so it must not be refused for one.
        width, height = _fit(int(suggested["width"]), int(suggested["height"]), limits)
    width = width if width is not None else _clamp_side(suggested.get("width", default_side(limits)), limits)
    height = height if height is not None else _clamp_side(suggested.get("height", default_side(limits)), limits)
    check_size(width, height, limits, size)
    # The pipeline resizes every input to the output size (Lanczos): do it now, so that a waiting
    # job keeps small images, not the uploads.
    image, mask, control = (_to_size(x, width, height) for x in (image, mask, control))

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
    if image is not None and not (mask is not None and control is not None):
        strength = body.strength if body.strength is not None else (1.0 if mask is not None else 0.6)
        if not 0 <= strength <= 1:
            raise invalid("strength", f"must be between 0 and 1, got {strength}")
        start = int(max(steps - min(steps * strength, steps), 0))  # as the pipeline computes it
        if steps - start < 1:
            raise invalid("strength", f"strength {strength} with {steps} steps leaves no step to run")
    elif image is not None and body.strength is not None:
        raise invalid("strength", "ControlNet inpainting takes no strength (it always starts from noise)")
    elif body.strength is not None:
        raise invalid("strength", "strength needs an image (img2img or inpainting); without one it would change nothing")
    control_scale = getattr(body, "control_scale", None)
    if control is None and control_scale is not None:
        raise invalid("control_scale", "control_scale needs a control_image; without one it would change nothing")
    variance = getattr(body, "seed_variance", 0.0)
    for name in ("seed_variance_share", "seed_variance_steps"):
        if not variance and getattr(body, name, None) is not None:
            raise invalid(name, f"{name} needs seed_variance > 0 (seed variance is off, so it would change nothing)")
    if control is not None:
        control_scale = 0.75 if control_scale is None else control_scale
        if not 0 <= control_scale <= limits.max_control_scale:
            raise invalid("control_scale", f"must be between 0 and {limits.max_control_scale}, got {control_scale}")
    return GenerationRequest(prompt=body.prompt, width=width, height=height, steps=steps,
                             guidance_scale=float(guidance), seeds=seeds, negative_prompt=negative,
                             template=body.template, fields=fields, cfg_normalization=float(body.cfg_normalization),
                             cfg_truncation=float(body.cfg_truncation), max_sequence_length=body.max_sequence_length,
                             shift=shift, strength=strength, image=image, mask_image=mask, control_image=control,
                             control_scale=control_scale,
                             seed_variance=float(variance),
                             seed_variance_share=getattr(body, "seed_variance_share", None),
                             seed_variance_steps=getattr(body, "seed_variance_steps", None),
                             first_block_cache=first_block_cache)


def openai_to_job(body, models: Models):
    """The job request an OpenAI images request stands for (already validated: no second check)."""
    if body.stream:
        raise invalid("stream", "streaming is not supported on this route; use the job API's events instead")
    if body.output_compression is not None and not 0 <= body.output_compression <= 100:
        raise invalid("output_compression", f"must be between 0 and 100, got {body.output_compression}")
    return models.job.model_construct(prompt=body.prompt, n=body.n, size=body.size,
                                      negative_prompt=body.negative_prompt, steps=body.num_inference_steps,
                                      guidance_scale=body.guidance_scale, seed=body.seed)
