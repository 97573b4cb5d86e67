"""What the server's worker thread drives: a real pipeline, a text encoder alone, or a fake.

Every engine answers the same calls, made only from the worker thread (the one thread that owns
the model and the GPU): ``generate``, ``encode``, ``tokenize``, ``rewrite``, ``warmup``. Prompt
formatting and template look-ups need no model and may run on any thread.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..metadata import png_info
from ..prompt.format import format_prompt
from ..prompt.templates import default_registry
from ..sampling import PROMPT_FIELDS, GenerationRequest, negative_prompts, optional_settings  # noqa: F401  (the one request type, re-exported)

logger = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine cannot do this (e.g. generation on an encoder-only server)."""


@dataclass
class GeneratedImage:
    image: Any  # PIL image
    seed: int
    record: dict[str, Any]  # the PNG metadata record (zimage_native.metadata.image_record)
    png: bytes | None = None  # the image already written as PNG with png_info(record) (a Ray replica's bytes)

    def pnginfo(self):
        return png_info(self.record)

    @classmethod
    def from_png(cls, png: bytes, seed: int, record: dict[str, Any]) -> "GeneratedImage":
        """An image that arrives as PNG bytes (a Ray replica's), stored as they are. Opened lazily;
        the writer decodes the bytes (Storage.save_image, which refuses them when they are not one
        whole PNG); bytes that do not even open leave ``image`` None for it to refuse."""
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(png))
        except Exception:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            image = None
        return cls(image, seed, record, png=png)


class Engine:
    """The interface the server uses; subclasses fill in the model-backed calls."""

    can_generate = True
    can_rewrite = True
    can_inpaint = False  # takes a mask (GenerationRequest.mask_image)
    can_control = False  # takes a control image (a ControlNet is loaded)
    cache_problem: str | None = None  # why requests cannot use the first-block cache (None: they can)

    def __init__(self, model_name: str, variant: str = "turbo", templates_dirs: list[str] | None = None):
        self.model_name = model_name
        self.variant = variant
        self.templates_dirs = list(templates_dirs or [])

    # -- facts
    @property
    def default_steps(self) -> int:
        return 8 if self.variant == "turbo" else 50

    @property
    def default_guidance(self) -> float:
        return 0.0 if self.variant == "turbo" else 4.0

    @property
    def scheduler_shift(self) -> float | None:
        return None

    @property
    def dynamic_shift(self) -> bool:
        return False

    def text_encoder_info(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "variant": self.variant, "engine": type(self).__name__,
                "scheduler_shift": self.scheduler_shift}

    # -- prompts (no model needed)
    @property
    def registry(self):
        return default_registry(self.templates_dirs)

    def template(self, name: str):
        """The template of that name; an unknown name raises KeyError with close matches."""
        return self.registry.get(name)

    def format_prompts(self, prompts: list[str], template: str | None = None, **fields) -> list[str]:
        fields = {k: v for k, v in fields.items() if v is not None}
        if template is not None:
            merged = self.template(template).prompt_fields(**fields)
        else:
            merged = fields
        return [format_prompt(p, **merged) for p in prompts]

    # -- model calls (worker thread only)
    def generate(self, request: GenerationRequest, callback: Callable[[int, int], None]) -> list[GeneratedImage]:
        raise EngineUnavailable("this server cannot generate images")

    def encode(self, texts: list[str], max_sequence_length: int | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def tokenize(self, texts: list[str], max_sequence_length: int | None = None) -> list[list[int]]:
        raise NotImplementedError

    def rewrite(self, prompt: str, **kwargs) -> str:
        raise EngineUnavailable("this server cannot rewrite prompts")

    def token_counts(self, texts: list[str]) -> list[int] | None:
        """Each chat-formatted text's token count before the cut to max_sequence_length; None when
        this engine cannot count them."""
        return None

    def length_advice(self, request: GenerationRequest, most: int) -> list[str]:
        """A sentence for each text of the request (its prompts and, with CFG, its negative prompts)
        longer than the request's max_sequence_length: its end is cut, as ``zimage generate`` warns.
        ``most``: the largest max_sequence_length this server takes."""
        if request.prompt_embeds is not None:
            return []
        texts = self.format_prompts(request.prompts, request.template, **request.fields)
        names = ["the prompt"] if len(texts) == 1 else [f"prompt {i + 1}" for i in range(len(texts))]
        if request.guidance_scale > 0 and request.negative_prompt_embeds is None:
            negatives = negative_prompts(request.negative_prompt, len(texts))
            texts += self.format_prompts(negatives)
            names += (["the negative prompt"] if len(negatives) == 1
                      else [f"negative prompt {i + 1}" for i in range(len(negatives))])
        limit = request.max_sequence_length
        # Qwen3's byte-level BPE makes at most one token per UTF-8 byte: a shorter text needs no count
        # (and a remote encoder no call).
        long = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) > limit]
        counts = self.token_counts([texts[i] for i in long]) if long else None
        said = []
        for i, count in zip(long, counts or ()):
            if count > limit:
                fix = (f"raise max_sequence_length (the web page's Token limit) to {count} to keep them"
                       if count <= most else
                       f"shorten it (this server takes max_sequence_length up to {most})")
                said.append(f"{names[i]} is {count} tokens long in the chat format, more than max_sequence_length "
                            f"{limit}: its last {count - limit} tokens (the end of the text and the chat format's "
                            f"closing tokens) are cut; {fix}.")
        return said

    def warmup(self) -> None:
        """Run whatever compiles or captures before the server reports ready (default: nothing)."""


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Token counts of chat-formatted texts as the text encoder tokenizes them, before any cut."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _running(pipe, name: str):
    """The pipeline's context that puts a component on its execution device (offload aware)."""
    running = getattr(pipe, "_running", None)
    return running(name) if running is not None else contextlib.nullcontext()


class PipelineEngine(Engine):
    """A loaded :class:`~zimage_native.ZImagePipeline`."""

    def __init__(self, pipe, model_name: str | None = None, templates_dirs: list[str] | None = None):
        super().__init__(model_name or str(pipe.source or "z-image"), pipe.variant,
                         templates_dirs if templates_dirs is not None else list(getattr(pipe, "templates_dirs", [])))
        self.pipe = pipe
        pipe.templates_dirs = list(self.templates_dirs)
        pipe.progress = False

    @property
    def can_inpaint(self) -> bool:
        return callable(getattr(self.pipe, "inpaint", None))

    @property
    def can_control(self) -> bool:
        return getattr(self.pipe, "controlnet", None) is not None

    @property
    def cache_problem(self) -> str | None:
        from ..accel.block_cache import pipeline_cache_problem

        return pipeline_cache_problem(self.pipe)

    @property
    def default_steps(self) -> int:
        return self.pipe.defaults.num_inference_steps

    @property
    def default_guidance(self) -> float:
        return self.pipe.defaults.guidance_scale

    @property
    def scheduler_shift(self) -> float | None:
        return float(self.pipe.scheduler_config.shift)

    @property
    def dynamic_shift(self) -> bool:
        return bool(getattr(self.pipe.scheduler_config, "use_dynamic_shifting", False))

    @property
    def can_rewrite(self) -> bool:
        te = self.pipe.text_encoder
        if getattr(te, "model", None) is None:  # a remote encoder rewrites on its own machine
            return callable(getattr(te, "rewrite", None))
        return self.pipe.model_folder is not None

    def text_encoder_info(self) -> dict[str, Any]:
        te = self.pipe.text_encoder
        return {"dtype": str(te.dtype).removeprefix("torch."), "device": str(te.device),
                "hidden_size": int(self.pipe.transformer_config.cap_feat_dim),
                "max_sequence_length": int(getattr(te, "max_sequence_length", 512)),
                "remote": getattr(te, "model", None) is None}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(device=str(self.pipe.device), dtype=str(self.pipe.dtype).removeprefix("torch."),
                   loras=[[lr.path, lr.scale] for lr in getattr(self.pipe, "loras", [])] or None)
        return out

    def format_prompts(self, prompts, template=None, **fields):
        return self.pipe.format_prompts(prompts, template, **{k: v for k, v in fields.items() if v is not None})

    def generate(self, request: GenerationRequest, callback) -> list[GeneratedImage]:
        from ..metadata import image_record

        out = self.pipe.generate(request, progress=False, callback=callback)
        images = []
        for k, image in enumerate(out.images):
            record = image_record(out.info, k, 0)
            images.append(GeneratedImage(image, int(record.get("seed", request.seeds[k])), record))
        return images

    def encode(self, texts, max_sequence_length=None):
        with torch.no_grad(), _running(self.pipe, "text_encoder"):
            features = self.pipe.text_encoder.encode(list(texts), max_sequence_length)
            return [f.detach().to("cpu") for f in features]

    def tokenize(self, texts, max_sequence_length=None):
        return self.pipe.text_encoder.tokenize(list(texts), max_sequence_length)

    def token_counts(self, texts):
        te = self.pipe.text_encoder
        if getattr(te, "tokenizer", None) is not None:
            return count_tokens(te.tokenizer, texts)
        counts = getattr(te, "token_counts", None)  # a remote encoder asks its machine
        return counts(list(texts)) if callable(counts) else None

    def rewrite(self, prompt: str, **kwargs) -> str:
        if not self.can_rewrite:
            raise EngineUnavailable("this server has no text encoder to rewrite with")
        te = self.pipe.text_encoder
        if getattr(te, "model", None) is None:
            return te.rewrite(prompt, **kwargs)
        return self.pipe.rewrite(prompt, **kwargs)

    def warmup(self) -> None:
        t = time.perf_counter()
        self.pipe("warm-up", num_inference_steps=self.default_steps, seed=0, progress=False)
        logger.info("warm-up generation took %.1f s", time.perf_counter() - t)


class EncoderOnlyEngine(Engine):
    """Only the text encoder and its tokenizer: the encoding side of the distributed mode."""

    can_generate = False

    def __init__(self, text_encoder, model_name: str, model_folder=None, variant: str = "turbo",
                 templates_dirs: list[str] | None = None):
        super().__init__(model_name, variant, templates_dirs)
        self.text_encoder = text_encoder
        self.model_folder = model_folder
        self._rewriter = None

    @classmethod
    def from_pretrained(cls, path_or_id, device=None, dtype=None, *, templates_dirs=None, quant: str = "none",
                        **hub) -> "EncoderOnlyEngine":
        from ..devices import check_weights_fit, resolve_device, resolve_dtype
        from ..loading import folder_weight_bytes
        from ..prompt.rewriter import _rewriter_folder
        from ..text_encoder import TextEncoder

        folder = _rewriter_folder(path_or_id, **hub)  # a Hub id fetches text_encoder/ and tokenizer/ only
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if device.type == "cuda":
            check_weights_fit(folder_weight_bytes(folder, ["transformer", "vae"], dtype, quant),
                              {"text_encoder": device})
        te = TextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", dtype, device, quant)
        return cls(te, str(path_or_id), folder, templates_dirs=templates_dirs)

    @property
    def can_rewrite(self) -> bool:
        return self.model_folder is not None

    def text_encoder_info(self):
        te = self.text_encoder
        return {"dtype": str(te.dtype).removeprefix("torch."), "device": str(te.device),
                "hidden_size": int(te.model.config.hidden_size),
                "max_sequence_length": int(te.max_sequence_length), "remote": False}

    def encode(self, texts, max_sequence_length=None):
        with torch.no_grad():
            return [f.detach().to("cpu") for f in self.text_encoder.encode(list(texts), max_sequence_length)]

    def tokenize(self, texts, max_sequence_length=None):
        return self.text_encoder.tokenize(list(texts), max_sequence_length)

    def token_counts(self, texts):
        return count_tokens(self.text_encoder.tokenizer, texts)

    def rewrite(self, prompt: str, **kwargs) -> str:
        from pathlib import Path

        from ..prompt.rewriter import rewrite_prompt, load_causal_lm

        if self.model_folder is None:
            raise EngineUnavailable("this server has no model folder to load the rewriter from")
        te = self.text_encoder
        if self._rewriter is None:
            self._rewriter = load_causal_lm(Path(self.model_folder) / "text_encoder", te.dtype, te.device,
                                            share_from=te.model)
        args = dict(rewriter=None, system_prompt=None, max_new_tokens=512, temperature=0.7, seed=None, top_p=0.95)
        args.update({k: v for k, v in kwargs.items() if k in args})
        return rewrite_prompt(self._rewriter, te.tokenizer, prompt, args["rewriter"], args["system_prompt"],
                              args["max_new_tokens"], args["temperature"], args["seed"], args["top_p"],
                              force_think_block=kwargs.get("force_think_block"), registry=self.registry)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def seed_colour(seed: int) -> tuple[int, int, int]:
    """The fake engine's solid colour for a seed (distinct and reproducible)."""
    d = _digest(f"seed:{seed}")
    return (d & 0xFF, (d >> 8) & 0xFF, (d >> 16) & 0xFF)


class FakeEngine(Engine):
    """Solid-colour images after ``step_delay`` seconds per step; deterministic fake features.

    Inpainting paints the seed's colour where the mask is white and keeps the input elsewhere;
    a control image is accepted and recorded (task, control_scale) in the image's metadata.

    For tests and demos: no weights, no GPU. A prompt that contains ``fail_marker`` fails after
    its first step (to exercise the failed path). Features are random tensors of ``hidden_size``
    columns, one row per UTF-8 byte of the text (capped at the token limit), seeded by the text.
    """

    can_inpaint = True
    can_control = True

    def __init__(self, step_delay: float = 0.0, *, model_name: str = "fake", variant: str = "turbo",
                 hidden_size: int = 32, dtype: torch.dtype = torch.float32, fail_marker: str | None = "[fail]",
                 templates_dirs: list[str] | None = None):
        super().__init__(model_name, variant, templates_dirs)
        self.step_delay = step_delay
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.fail_marker = fail_marker
        self.calls: collections.deque[str] = collections.deque(maxlen=1000)  # what ran, and on which thread

    @property
    def scheduler_shift(self) -> float:
        return 3.0

    def text_encoder_info(self):
        return {"dtype": str(self.dtype).removeprefix("torch."), "device": "cpu", "hidden_size": self.hidden_size,
                "max_sequence_length": 512, "remote": False}

    def generate(self, request, callback):
        from PIL import Image

        from .. import __version__

        self.calls.append(f"generate@{threading.current_thread().name}")
        for step in range(request.steps):
            if self.step_delay:
                time.sleep(self.step_delay)
            if self.fail_marker and self.fail_marker in request.prompt and step == 1:
                raise RuntimeError("the fake engine was asked to fail")
            callback(step + 1, request.steps)
        formatted = self.format_prompts([request.prompt], request.template, **request.fields)[0]
        images = []
        for seed in request.seeds:
            record = {"prompt": request.prompt, "formatted_prompt": formatted,
                      "negative_prompt": request.negative_prompt, "width": request.width, "height": request.height,
                      "steps": request.steps, "guidance_scale": request.guidance_scale, "seed": seed,
                      "template": request.template, **request.fields, "model": self.model_name,
                      "variant": self.variant, "version": __version__, "strength": request.strength,
                      "shift": request.shift, "task": request.task,
                      "control_scale": request.control_scale if request.control_image is not None else None,
                      **optional_settings(request)}
            record = {k: v for k, v in record.items() if v is not None}
            image = Image.new("RGB", (request.width, request.height), seed_colour(seed))
            if request.mask_image is not None:  # inpainting: the seed's colour where the mask is white
                size = (request.width, request.height)
                keep = request.image.convert("RGB").resize(size)
                image = Image.composite(image, keep, request.mask_image.convert("L").resize(size))
            images.append(GeneratedImage(image, seed, record))
        return images

    def warmup(self) -> None:
        self.calls.append(f"warmup@{threading.current_thread().name}")

    def tokenize(self, texts, max_sequence_length=None):
        limit = max_sequence_length or 512
        return [list(t.encode("utf-8"))[:limit] for t in texts]

    def token_counts(self, texts):
        return [len(t.encode("utf-8")) for t in texts]

    def encode(self, texts, max_sequence_length=None):
        self.calls.append(f"encode@{threading.current_thread().name}")
        out = []
        for text, ids in zip(texts, self.tokenize(texts, max_sequence_length)):
            g = torch.Generator().manual_seed(_digest(text) % (2**63))
            out.append(torch.randn(max(len(ids), 1), self.hidden_size, generator=g).to(self.dtype))
        return out

    def rewrite(self, prompt: str, **kwargs) -> str:
        self.calls.append(f"rewrite@{threading.current_thread().name}")
        if self.step_delay:
            time.sleep(self.step_delay)
        style = kwargs.get("rewriter") or "default"
        return f"{prompt}, rewritten ({style})"
