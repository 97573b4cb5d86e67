"""ZImagePipeline: the models, their placement and accelerations, and the public calls.

A pipeline holds the three components (DiT, VAE, text encoder), where each runs, and the
accelerations applied to the DiT. Every call (``pipe(...)``, ``img2img``, ``inpaint``) builds one
:class:`~zimage_native.sampling.GenerationRequest` and runs it on the sampling core,
:mod:`zimage_native.sampling` (encode -> plan -> step loop -> decode; the semantics of diffusers
0.42.1 are stated there). Loading is in :mod:`zimage_native.loading`, LoRA in
:mod:`zimage_native.lora` (a :class:`~zimage_native.lora.LoraStack` collaborator), the rewriter in
:mod:`zimage_native.prompt.rewriter` (a :class:`~zimage_native.prompt.rewriter.Rewriter`), the
ControlNet in :mod:`zimage_native.control` (a :class:`~zimage_native.control.ControlNetSlot`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import math
import numbers
import os
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import control as _control  # noqa: F401  (registers the ControlNet tasks on the core)
from . import sampling
from .config import SchedulerConfig, TransformerConfig, VAEConfig
from .devices import OFFLOAD_MODES, parse_device, resolve_device, storage_device
from .hub import DEFAULT_MODEL
from .images import ImageProcessor
from .loading import check_quant, load_pretrained, load_single_files  # noqa: F401
from .lora import LoraAdapters, LoraReport, LoraStack
from .model.transformer import ZImageTransformer
from .model.vae import AutoencoderKL
from .offload import release_streamed
from .prompt.format import format_prompt
from .prompt.rewriter import Rewriter
from .sampling import (GenerationRequest, SamplingPlan, Step, check_request, preprocess_image,  # noqa: F401
                       preprocess_mask, to_pil)
from .sampling import cfg_combine, randn as _randn  # noqa: F401  (kept for older imports)
from .scheduler import Schedule
from .text_encoder import PromptCache, TextEncoder
from .tiling import TileConfig, tiled_decode, tiled_encode

logger = logging.getLogger(__name__)

OUTPUT_TYPES = sampling.OUTPUT_TYPES


@dataclass(frozen=True)
class VariantDefaults:
    num_inference_steps: int
    guidance_scale: float
    shift: float  # the released scheduler_config.json's


# Turbo is distilled for 8 forwards without CFG; the base model card recommends 50 steps, guidance 4.
VARIANTS = {"turbo": VariantDefaults(8, 0.0, 3.0), "base": VariantDefaults(50, 4.0, 6.0)}


@dataclass
class ZImageOutput:
    """``images``: PIL images, an (N, H, W, 3) array in [0, 1], or the final fp32 latents.

    ``seeds`` holds the seeds when seeds were used: one per image (each remakes its image alone), or
    one for the whole batch (one generator draws every image, as diffusers' single generator does;
    image k > 0 then needs the whole batch to be remade). ``info``: the request as run (formatted
    prompts, token counts, settings), which the CLI writes into PNG metadata.
    """

    images: Any
    seeds: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_tuple(self) -> tuple:
        """``(images,)``, as diffusers' pipeline outputs give (``return_dict=False``)."""
        return (self.images,)

    def __getitem__(self, key: int | str):
        """``out[0]`` and ``out["images"]`` as on diffusers' outputs."""
        return self.images if key == "images" else self.to_tuple()[key]


def _serialized(method):
    """One call at a time per pipeline (re-entrant): a run shares the pipeline's modules, offload moves,
    fused LoRA weights and CUDA-graph buffers, so calls from several threads (a web framework's worker
    threads) wait for each other instead of corrupting each other's images. Taken by :func:`_locks_of`,
    so that a wait for it from inside another pipeline's run is seen by :func:`_wait_for`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _locks_of(lambda: [self]):
            return method(self, *args, **kwargs)

    return wrapper


def _serialized_with_sharers(method):
    """:func:`_serialized` for a call that changes the DiT (``optimize``, the LoRA calls,
    ``load_controlnet``; the placement calls: :func:`_serialized_with_placed`): it also holds the locks of
    the other live pipelines holding the DiT (:meth:`ZImagePipeline._sharers`), all taken
    in one order (by ``id``), so that it can update their records and drop their graphs, and no run
    of theirs reads the DiT while it changes. Up to 0.21.0 a call took its own lock, then each other
    pipeline's while holding it: two such calls on two pipelines sharing a DiT, in two threads, each
    held its own lock and waited for the other's, forever. A call from inside a run (a step-end
    callback's ``set_adapters``) already holds its pipeline's lock, out of that order: the locks are
    taken by :func:`_take_locks`, which waits for one while holding none of the others it took."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _locks_of(lambda: [self, *self._sharers()]):
            return method(self, *args, **kwargs)

    return wrapper


def _serialized_run(method):
    """:func:`_serialized` for a call that runs the DiT or drops its streamed blocks (``generate``,
    ``denoise``, ``plan``, ``run_steps``, ``maybe_free_model_hooks``). Under offload="model" or "blocks" it also
    holds the locks of the other live pipelines holding the DiT (:meth:`ZImagePipeline._sharers`), as
    :func:`_serialized_with_sharers` does. "model": their runs visit the GPU with the one DiT one at a
    time anyway (``offload.visit``), and a run waiting for that visit held its own lock, out of sight of
    :func:`_take_locks`: a step-end callback of the visiting run that changed the DiT (``set_adapters``,
    ``optimize``) waited for that lock, and the waiting run for the callback's visit to end, forever
    (reproduced: both threads alive after 40 s); now the other run waits for the whole run, holding no
    lock, before its visit. "blocks": the streamer's state (the blocks on the device, the last block
    run, the pass's run counts) belongs to one run; a run or ``maybe_free_model_hooks`` of another
    pipeline sharing the DiT, in another thread, freed the blocks of a run in progress (``KeyError``
    where its block ended; on a GPU the block's weights pointed back at the CPU while it ran). A
    resident DiT is only read by a run: pipelines sharing it still run at once."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        def pipes():
            streamed = getattr(self.__dict__.get("_transformer"), "block_streamer", None) is not None
            return [self, *self._sharers()] if streamed or self.offload == "model" else [self]

        with _locks_of(pipes):
            return method(self, *args, **kwargs)

    return wrapper


def _serialized_with_placed(method):
    """:func:`_serialized_with_sharers` for the calls that place the components (``to``,
    ``enable_model_cpu_offload``): the locks of every pipeline placed with this one
    (:meth:`ZImagePipeline._placed_with`), so that no run of theirs reads a component while it moves."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _locks_of(self._placed_with):
            return method(self, *args, **kwargs)

    return wrapper


def _take_locks(locks: list) -> list:
    """Take every lock of ``locks`` (re-entrant ones: those this thread holds are taken again) and
    return them. A lock held by another thread is waited for after letting go of the ones taken so
    far, then everything is tried again: a thread waiting here holds no lock of ``locks`` but those
    it held before the call. Taking them in order and waiting while holding the first ones
    deadlocked with a thread that held a later one from before its call (a run, whose step-end
    callback changes the DiT shared with this pipeline) and waited for an earlier one."""
    while True:
        taken = []
        for lock in locks:
            if not lock.acquire(blocking=False):
                break
            taken.append(lock)
        else:
            return taken
        for held in reversed(taken):
            held.release()
        _wait_for(lock, list(_held_locks()))  # (those held from before the call)


#: The pipeline locks each thread holds (taken by :func:`_locks_of`), for :func:`_wait_for`.
_HELD = threading.local()


def _held_locks() -> list:
    """The pipeline locks this thread holds, in the order taken (:data:`_HELD`)."""
    if not hasattr(_HELD, "locks"):
        _HELD.locks = []
    return _HELD.locks


#: The threads waiting in :func:`_take_locks` while holding pipeline locks from before the call (a
#: run whose step-end callback calls a pipeline): thread id -> (lock waited for, locks held).
_WAITING: dict[int, tuple] = {}
_WAITING_LOCK = threading.Lock()


def _wait_for(lock, kept: list) -> None:
    """Wait until ``lock`` is free, holding ``kept``. A wait that closes a circle (the thread holding
    ``lock`` waits for one of ``kept``, maybe through others) is refused instead: two pipelines
    sharing a DiT, each running with a step-end callback that changes it (``set_adapters``), each
    waited for the other's run to end, forever (reproduced: both threads alive after 20 s). ``kept``
    is every pipeline lock the thread holds: up to 0.23.0 only those of the pipelines the call named,
    so a run's callback calling another pipeline (``other.optimize()``) waited unseen, holding its own
    run's lock, and two pipelines sharing only a VAE, each running with a callback calling the other
    (``optimize``, ``pipe.to``), waited for each other forever (both threads alive after 20 s)."""
    me = threading.get_ident()
    with _WAITING_LOCK:
        wanted, seen = lock, set()
        while (holder := next((t for t, (_, held) in _WAITING.items() if any(h is wanted for h in held)),
                              None)) is not None and holder not in seen:
            seen.add(holder)
            wanted = _WAITING[holder][0]
            if any(h is wanted for h in kept):
                raise RuntimeError("a call from inside a run (a step-end callback's set_adapters, optimize, "
                                   "pipe.to, a LoRA call, pipe.transformer = ...) that waits for another pipeline's "
                                   "run, which from inside it waits for this run (a change of a DiT both share, or a "
                                   "call into this pipeline): each waits for the other's run to end, forever. "
                                   "Refused here; change a shared DiT, or call another pipeline, from the step-end "
                                   "callbacks of one pipeline at a time, or give each pipeline a DiT of its own "
                                   "(copy.deepcopy(pipe.transformer))")
        if kept:
            _WAITING[me] = (lock, kept)
    try:
        with lock:  # until it is free (its holder's run or change is over)
            pass
    finally:
        with _WAITING_LOCK:
            _WAITING.pop(me, None)


@contextlib.contextmanager
def _locks_of(pipes: "Callable[[], list[ZImagePipeline]]"):
    """The locks of the pipelines ``pipes()`` names (:func:`_serialized`), each taken once, all in one
    order (by ``id``), by :func:`_take_locks`; named again once they are held, and taken again with
    any pipeline that came to hold the DiT meanwhile. They were named once, before the wait: an
    ``optimize`` waiting while another thread assigned the DiT to a pipeline (``pipe.transformer =``)
    compiled it during that pipeline's next run, without its lock (its record went from compile
    "off" to "blocks" between two steps)."""
    while True:
        wanted = {id(pipe): pipe for pipe in pipes()}
        taken = _take_locks([pipe._lock for pipe in sorted(wanted.values(), key=id)])
        if {id(pipe) for pipe in pipes()} <= wanted.keys():
            break
        for lock in reversed(taken):
            lock.release()
    held = _held_locks()
    held.extend(taken)
    try:
        yield
    finally:
        del held[len(held) - len(taken):]
        for lock in reversed(taken):
            lock.release()


#: The live pipelines (built, copied or unpickled), for :func:`_pipelines_holding`; read and added to
#: under _PIPELINES_LOCK (:func:`_register`): a WeakSet read in one thread while another adds to it
#: raises "Set changed size during iteration".
_PIPELINES: "weakref.WeakSet[ZImagePipeline]" = weakref.WeakSet()
_PIPELINES_LOCK = threading.Lock()


def _register(pipe: "ZImagePipeline") -> None:
    """Add ``pipe`` (built, copied or unpickled) to the live pipelines."""
    with _PIPELINES_LOCK:
        _PIPELINES.add(pipe)


def _pipelines_holding(module) -> "list[ZImagePipeline]":
    """The live pipelines holding ``module`` as their DiT, VAE or text encoder's model
    (``ZImagePipeline(pipe.transformer, ...)``, ``pipe.vae = other.vae``: :meth:`ZImagePipeline._placed`)."""
    if module is None:
        return []
    with _PIPELINES_LOCK:
        live = list(_PIPELINES)
    return [pipe for pipe in live if any(held is module for held in pipe._placed().values())]


def _held_as(name: str, device: torch.device, offload: str) -> tuple:
    """How a pipeline placed on ``device`` with ``offload`` holds its component ``name``: where it
    runs, where it rests between runs and whether it is streamed (the DiT under "blocks"); offload
    "none" and "text_encoder" hold the DiT and the VAE alike, "model", "text_encoder" and "blocks"
    the text encoder."""
    return device, storage_device(name, device, offload), name == "transformer" and offload == "blocks"


def _dtype_argument(dtype, torch_dtype):
    """``dtype``, or diffusers' ``torch_dtype`` for it (both only if they agree)."""
    if isinstance(torch_dtype, dict):
        raise ValueError("torch_dtype per component (a dict) is not supported: every component is loaded in one "
                         "dtype (dtype= or torch_dtype=); the VAE decodes in it too")
    if torch_dtype is None:
        return dtype
    if dtype is not None and dtype != torch_dtype:
        raise ValueError(f"give dtype or torch_dtype (diffusers' name for it), not both: {dtype} vs {torch_dtype}")
    return torch_dtype


# diffusers' from_pretrained options refused here, with what to use instead.
DIFFUSERS_LOAD_OPTIONS = {
    "device_map": "device= (and dit_device= / text_encoder_device= / vae_device=, or offload=) place the components",
    "token": "set HF_TOKEN (or run `hf auth login`) for a gated or private repository",
    "subfolder": "give the model folder itself (with model_index.json), or single files with from_single_files",
    "controlnet": "load it after the pipeline: pipe.load_controlnet(path)",
    "quantization_config": "the engine quantises on its own: fp8=True (the DiT's linears in e4m3), "
                           "text_encoder_quant='int8' or 'int4', or a GGUF DiT file with from_single_files",
}

# diffusers' options passed out of habit: ignored (logged once) with one of these values, since they
# change nothing here; another value is refused with the reason, as ignoring it would change the result.
IGNORED_LOAD_OPTIONS = {
    "low_cpu_mem_usage": ((True, False, None), "loading is always tensor by tensor onto modules built on the "
                                               "meta device"),
    "use_safetensors": ((True, None), "only safetensors files are loaded (pickled .bin / .pt weights are refused: "
                                      "loading them can run code)"),
    "safety_checker": ((None,), "there is no safety checker (diffusers' Z-Image pipeline has none either); "
                                "check the images yourself"),
    "requires_safety_checker": ((False, None), "there is no safety checker"),
    "feature_extractor": ((None,), "there is no safety checker to feed"),
    "force_download": ((False, None), "cached files are reused; run `hf download REPO --force-download` "
                                      "to fetch them again"),
}
_ignored_told: set[str] = set()


def pop_diffusers_options(load: dict, method: str = "from_pretrained", known: list[str] | None = None,
                          options: str = "") -> None:
    """Take diffusers' loading options out of ``load``: accepted where they change nothing here
    (IGNORED_LOAD_OPTIONS, logged once each), else refused saying what to use. Any other keyword not in
    ``known`` is refused naming ``method`` (not the internal loader) and ``options``; ``known`` None:
    from_pretrained's, the options of load_pretrained."""
    for name in [k for k in load if k in IGNORED_LOAD_OPTIONS]:
        harmless, why = IGNORED_LOAD_OPTIONS[name]
        value = load.pop(name)
        if not any(value is h for h in harmless):
            raise ValueError(f"{name}={value!r} is diffusers' option; here {why}")
        if name not in _ignored_told:
            _ignored_told.add(name)
            logger.info("%s: %s=%r ignored (diffusers' option): %s", method, name, value, why)
    for name in [k for k in load if k in DIFFUSERS_LOAD_OPTIONS]:
        raise ValueError(f"{name}= is diffusers' option; here {DIFFUSERS_LOAD_OPTIONS[name]}")
    if known is None:
        parameters = inspect.signature(load_pretrained).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return  # a loader that takes any keyword (a wrapped or stand-in load_pretrained) says itself
        known = [k for k in parameters if k not in ("path_or_id", "device", "dtype")]
        options = f"device, dtype, variant, kernels, attention, compile, cuda_graphs, fp8, {', '.join(known)}"
    for name in load:
        if name not in known:
            raise TypeError(f"ZImagePipeline.{method}() got an unexpected keyword argument {name!r} (its "
                            f"loading options: {options}; docs/tasks.md)")


#: diffusers' ``encode_prompt`` arguments, refused by name by :meth:`ZImagePipeline.encode_prompt`.
DIFFUSERS_ENCODE_OPTIONS = {"device", "do_classifier_free_guidance", "negative_prompt", "prompt_embeds",
                            "negative_prompt_embeds"}


def check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)} (the model: its step, guidance and shift "
                         f"defaults), got {variant!r}; it is not diffusers' weight-file variant (fp16, bf16): the "
                         f"weights are cast to dtype= / torch_dtype=")


def detect_variant(source: str, scheduler_config: SchedulerConfig, single_file: bool = False) -> str:
    """'turbo' or 'base' from the model's name, else from the scheduler shift (Turbo 3, base 6). A
    folder or Hub id named ``Z-Image`` is the base model; a single DiT file (whose scheduler is the
    default) named ``z_image...`` without "turbo" is too (Comfy-Org's ``z_image_bf16.safetensors``).
    Anything else is Turbo, as InvokeAI also assumes."""
    name = Path(str(source).rstrip("/\\")).name.lower()
    if "turbo" in name:
        return "turbo"
    if single_file:
        return "base" if re.match(r"z[-_]?image([-_.]|$)", name) else "turbo"
    if scheduler_config.shift == VARIANTS["base"].shift or name == "z-image":
        return "base"
    return "turbo"


def variant_scheduler(scheduler_config: SchedulerConfig, variant: str) -> SchedulerConfig:
    """The scheduler for ``variant``: the released shift of the other variant (a Turbo folder's, or the
    single files' default, with a Base DiT) becomes this variant's; any other shift is kept."""
    own = VARIANTS[variant].shift
    released = {v.shift for v in VARIANTS.values()}
    if scheduler_config.shift in released and scheduler_config.shift != own:
        logger.info("variant %s: scheduler shift %s instead of %s", variant, own, scheduler_config.shift)
        return dataclasses.replace(scheduler_config, shift=own)
    return scheduler_config


class _PipelineCall:
    """A diffusers name on a pipeline's component (``pipe.vae.enable_tiling``,
    ``pipe.transformer.set_attention_backend``) that calls the pipeline's method ``name``; it holds
    the pipelines and the component weakly.

    A component shared by several pipelines (a second pipeline built with the first's DiT and VAE,
    ``ZImagePipeline(pipe.transformer, pipe.vae, ...)``) calls every live pipeline that still holds
    it, the first built first, as diffusers' names set the shared module (tiling, slicing and the
    attention backend are each pipeline's settings here); with ``every=False`` (compile: the one DiT
    is compiled once) only the last of them. A copy of the component alone (``copy.deepcopy``,
    pickle) belongs to no pipeline: the name refuses, saying so (it set the original pipeline's
    tiling or attention), until a pipeline built with the copy binds it anew. In a copy of the whole
    pipeline it is bound to the copy."""

    def __init__(self, owners: "list[ZImagePipeline]", module: "torch.nn.Module | None", name: str, component: str,
                 attribute: str, every: bool = True):
        self.owners = [weakref.ref(pipe) for pipe in owners]
        self.module = None if module is None else weakref.ref(module)
        self.name, self.component, self.attribute, self.every = name, component, attribute, every

    def pipelines(self) -> "list[ZImagePipeline]":
        """The live pipelines that hold the component, in the order they were built with it."""
        module = self.module() if self.module is not None else None
        return [pipe for ref in self.owners
                if (pipe := ref()) is not None and module is not None and getattr(pipe, self.component, None) is module]

    def __call__(self, *args, **kwargs):
        label, what = f"{self.component}.{self.attribute}", "VAE" if self.component == "vae" else "DiT"
        if not self.owners:
            setting = ("the attention backend and compiling" if self.component == "transformer" else
                       "tiling and slicing")
            raise RuntimeError(f"{label}: this {what} is a copy (copy.deepcopy or pickle) and belongs to no pipeline, "
                               f"and {setting} are a pipeline's settings: give it to a pipeline "
                               f"(ZImagePipeline(..., {self.component}=...)), whose pipe.{label}() sets that "
                               f"pipeline's, or copy the whole pipeline")
        pipes = self.pipelines()
        if not pipes:
            live = [pipe for ref in self.owners if (pipe := ref()) is not None]
            if live and all(getattr(pipe, self.component, None) is None for pipe in live):
                raise RuntimeError(f"{label}: the pipeline this {what} belonged to holds no {what} now "
                                   f"(pipe.{self.component} = None)")
            if live:
                raise RuntimeError(f"{label}: the pipeline this {what} belonged to holds another {what} now "
                                   f"(pipe.{self.component} was replaced): call it on pipe.{self.component}")
            raise RuntimeError(f"{label}: the pipeline this {what} belonged to is gone")
        results = [getattr(pipe, self.name)(*args, **kwargs) for pipe in (pipes if self.every else pipes[-1:])]
        return results[-1]

    def bound(self, pipe: "ZImagePipeline", module: torch.nn.Module) -> "_PipelineCall":
        """This name bound to ``pipe`` too, after the pipelines that still hold ``module``."""
        earlier = [p for p in self.pipelines() if p is not pipe] if self.module is not None and \
            self.module() is module else []
        return _PipelineCall(earlier + [pipe], module, self.name, self.component, self.attribute, self.every)

    def __deepcopy__(self, memo: dict) -> "_PipelineCall":
        module = self.module() if self.module is not None else None
        owners = [memo[id(pipe)] for pipe in self.pipelines() if id(pipe) in memo]
        return _PipelineCall(owners, memo.get(id(module)) if owners else None, self.name, self.component,
                             self.attribute, self.every)

    def __reduce__(self):
        return _PipelineCall, ([], None, self.name, self.component, self.attribute, self.every)


class ZImagePipeline:
    """Z-Image text-to-image, img2img and inpainting. Build with :meth:`from_pretrained` (or
    ``from_single_files`` for ComfyUI / all-in-one / fp8 files), call like a function.

    Collaborators: ``lora_stack`` (:class:`~zimage_native.lora.LoraStack`, behind ``load_lora`` /
    ``unload_lora`` / ``loras``) and ``prompt_rewriter`` (:class:`~zimage_native.prompt.rewriter.Rewriter`,
    behind ``rewrite`` / ``load_rewriter`` / ``unload_rewriter``).
    """

    # diffusers' names a step-end callback may ask for (callback_on_step_end_tensor_inputs=
    # pipe._callback_tensor_inputs); every task offers them (inpainting also "mask")
    _callback_tensor_inputs = list(sampling.STEP_END_TENSORS)

    def __init__(
        self,
        transformer: ZImageTransformer,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        scheduler_config: SchedulerConfig,
        vae_config: VAEConfig,
        source: str | None = None,
        variant: str | None = None,
        model_folder: str | os.PathLike | None = None,
        placement: dict[str, torch.device] | None = None,
        offload: str = "none",
    ):
        self._lock = threading.RLock()  # see _serialized
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        here = transformer.x_pad_token.device
        self.placement = {"text_encoder": here, "transformer": here, "vae": here, **(placement or {})}
        self.offload = offload
        self.transformer = transformer  # (refused on a DiT other pipelines place otherwise: _check_held_alike)
        self._check_held_alike("vae", vae)
        self._vae = vae  # prepared below, once the placement is known (the setter does it for a later VAE)
        self.text_encoder = text_encoder  # (refused likewise)
        self.vae_config = vae_config
        self.source = source
        self.model_folder = Path(model_folder) if model_folder is not None else None
        check_variant(variant)
        self.variant = variant or detect_variant(source or "", scheduler_config)
        self.scheduler_config = variant_scheduler(scheduler_config, self.variant)
        if offload == "blocks" and getattr(transformer, "block_streamer", None) is None:
            self._stream_the_dit(transformer)  # the resident parts move there
        self.vae_tiling: TileConfig | None = None
        self.vae_slicing = False  # decode and encode one image at a time (enable_vae_slicing)
        self._bind_vae_calls()
        self._fit_vae_hand_calls()
        self._accel = {"kernels": "none", "attention": "sdpa", "compile": "off", "fp8": False, "cuda_graphs": False,
                       "vae_compile": False}
        self._graphed = None
        self._compile_options: tuple = ("inductor", "dynamic")  # backend and shape policy of the compile
        self._vae_compile_backend: str | object = "inductor"  # the VAE decode's (optimize(vae_compile=True))
        self._record_the_dit()  # (a DiT compiled already, or held by another pipeline, keeps its record)
        self.templates_dirs: list[str] = []
        self.progress = True
        self.progress_bar_config: dict[str, Any] = {}  # tqdm options (set_progress_bar_config)
        self.lora_stack = LoraStack()
        self.lora_adapters = LoraAdapters()  # diffusers' named adapters over lora_stack
        self._take_the_dits_loras(None)  # (those of another pipeline holding the DiT)
        self.prompt_rewriter = self._new_rewriter()
        self.controlnets = _control.ControlNetSlot()
        self.prompt_cache = PromptCache()  # features of recent prompts (encode_texts)
        self.advised: set[str] = set()  # advice about requests, logged once each (sampling.generate)
        self._interrupt = False  # diffusers' way to stop a run from callback_on_step_end
        self._guidance_scale: float | None = None  # diffusers' run state (see guidance_scale, num_timesteps)
        self._num_timesteps: int | None = None
        self._fit_attention()
        _register(self)

    @property
    def template_registry(self):
        """The shipped templates plus ``templates_dirs`` (cached per set of folders)."""
        from .prompt.templates import default_registry

        return default_registry(self.templates_dirs)

    _SCHEDULER_ADVICE = ("the sampler here is FlowMatch Euler, built for each call from the model's "
                         "scheduler_config.json (pipe.scheduler_config); a scheduler object is not used. Give "
                         "shift= or sigmas= to the call instead (shift=6.0 runs what diffusers' "
                         "FlowMatchEulerDiscreteScheduler with shift 6 does)")

    @property
    def scheduler(self):
        """diffusers' ``pipe.scheduler``: not here (see ``scheduler_config``, and ``shift=`` / ``sigmas=``
        of the call); reading or assigning it raises, so an assigned scheduler is not silently unused."""
        raise AttributeError(f"pipe.scheduler: {self._SCHEDULER_ADVICE}")

    @scheduler.setter
    def scheduler(self, value):
        raise ValueError(f"pipe.scheduler = {type(value).__name__}(...): {self._SCHEDULER_ADVICE}")

    @property
    def transformer(self) -> ZImageTransformer:
        """The DiT."""
        return self._transformer

    @transformer.setter
    def transformer(self, module) -> None:
        """``pipe.transformer = other_dit``: the DiT is placed as this pipeline's own (:meth:`_place_the_dit`).
        A DiT compiled with torch.compile's wrapper, one whose blocks are streamed on a pipeline not
        streaming them, and one another pipeline places otherwise (:meth:`_check_held_alike`) are
        refused."""
        if hasattr(module, "_orig_mod"):  # torch.compile's wrapper (OptimizedModule): its __call__ is never called
            raise ValueError("pipe.transformer = torch.compile(pipe.transformer): the pipeline runs the DiT's "
                             "forward_tokens, which the wrapper leaves eager; call pipe.transformer.compile() (or "
                             "compile_repeated_blocks()), or pipe.optimize(compile='blocks' | 'full')")
        # A run of this pipeline finishes with the DiT it started with, and another pipeline holding
        # the DiT assigned does not change it (nor its record, read below) meanwhile.
        with _locks_of(lambda: [self, *_pipelines_holding(module)]):
            self._check_held_alike("transformer", module)
            if module is not None and "_accel" in self.__dict__:  # (the constructor takes it where it was loaded)
                self._place_the_dit(module)
            before = getattr(self, "_transformer", None)
            replaced = before is not module
            self._transformer = module
            self._bind_transformer_calls()
            if replaced and "lora_stack" in self.__dict__:  # (the constructor takes them once they are made)
                self._take_the_dits_loras(before)
            if replaced and getattr(self, "_graphed", None) is not None:
                # A graph replays the kernels and weights it was captured with: the old DiT's (its
                # tokens refined by the new one), not the DiT assigned.
                self._graphed.clear()
            if "_accel" in self.__dict__:  # (the constructor records and fits it once its record is made)
                self._record_the_dit()
                self._fit_attention()  # (SDPA bounded where it has only its math path, as at a placement)

    def _place_the_dit(self, module) -> None:
        """A DiT assigned rests where this pipeline's DiT rests: on the execution device when resident,
        in CPU memory under offload="model" (its runs visit the execution device, :meth:`_running`),
        and under "blocks" its blocks streamed from (pinned, on a GPU) CPU memory with its other parts
        on the execution device, as ``from_pretrained`` streams the DiT it loads (a DiT streamed
        already, held by another pipeline streaming it, is left so). Up to 0.23.0 it stayed where it was
        loaded: a DiT on the CPU assigned to a pipeline resident on a GPU failed its run with a device
        mismatch, one on a GPU stayed resident under "model", and under "blocks" a plain DiT ran
        unstreamed."""
        streamed = getattr(module, "block_streamer", None) is not None
        if self.offload != "blocks":
            if streamed:
                raise ValueError(f"pipe.transformer = dit: its blocks are streamed (offload='blocks') and this "
                                 f"pipeline runs its DiT with offload={self.offload!r}; assign it to a pipeline "
                                 f"loaded with offload='blocks', or load the DiT again without streaming")
            from .offload import move_

            move_(module, storage_device("transformer", self.placement["transformer"], self.offload))
        elif not streamed:
            self._stream_the_dit(module)

    def _stream_the_dit(self, module) -> None:
        """``offload="blocks"``: the DiT's blocks streamed to its execution device (``offload.stream_blocks``:
        packed into pinned slabs on a GPU), its other parts moved there."""
        from .offload import stream_blocks

        stream_blocks(module, self.placement["transformer"])

    def _take_the_dits_loras(self, before) -> None:
        """The LoRA records (``lora_stack``, ``lora_adapters``) of the DiT this pipeline now holds, which
        replaced ``before``: the LoRAs are fused into the DiT's weights, so every pipeline holding it
        shares one record of them, that of another pipeline holding it; a DiT no other pipeline holds
        gets empty ones (the LoRAs fused into ``before`` stay in it, recorded by the pipelines still
        holding it). A pipeline left without a DiT (None) keeps its records for the DiT given back, and
        a DiT given to a pipeline without one takes them. Up to 0.23.0 each pipeline kept its own:
        with two pipelines sharing a DiT, first.load_lora(a), second.load_lora(b), first.unload_lora()
        and second.unload_lora() left ``a`` in the weights (each undo restored the weights as its own
        load had found them), both pipelines reporting no LoRA; and after ``pipe.transformer =
        other_dit`` the pipeline still reported the old DiT's LoRAs, and ``unload_lora()`` wrote the old
        DiT's original weights into the new one."""
        sharers = self._sharers()
        if sharers:
            self.lora_stack, self.lora_adapters = sharers[0].lora_stack, sharers[0].lora_adapters
        elif (before is not None and self.transformer is not None) or \
                any(pipe is not self for pipe in _pipelines_holding(before)):
            self.lora_stack, self.lora_adapters = LoraStack(), LoraAdapters()

    def _check_held_alike(self, name: str, module) -> None:
        """Refuse ``module``, this pipeline's component ``name`` (built with, or assigned to, it), where
        another live pipeline holding it places it otherwise: another execution device, or another
        place where it rests between runs (resident, CPU memory under offload="model", streamed blocks
        under "blocks"). A component rests in one place, and each pipeline's runs follow its own offload
        mode: up to 0.22.0 a pipeline built with offload="none" on a DiT another offloaded ran it on
        the CPU, and one given a streamed DiT moved its blocks off their CPU copies at ``pipe.to``; a
        shared VAE or text encoder was placed likewise by one pipeline under the other's runs.
        Pipelines placed alike stay so: :meth:`_place_holders` places them together."""
        if module is None or "placement" not in self.__dict__:
            return
        what = {"transformer": "DiT", "vae": "VAE", "text_encoder": "text encoder"}[name]
        held = _held_as(name, self.placement[name], self.offload)
        for other in _pipelines_holding(module):
            if other is not self and _held_as(name, other.placement[name], other.offload) != held:
                raise ValueError(
                    f"this {what} is held by another pipeline, which runs it on {other.placement[name]} with "
                    f"offload={other.offload!r}; this pipeline would run it on {self.placement[name]} "
                    f"with offload={self.offload!r}. Pipelines sharing a component place it alike (pipe.to and "
                    f"enable_model_cpu_offload through one place every one): build this one with "
                    f"placement=other.placement, offload={other.offload!r} (or, before assigning the {what}, "
                    f"place this one so), or give each pipeline its own {what} (copy.deepcopy(other.{name}))")

    def _record_the_dit(self) -> None:
        """This pipeline's record of the transforms applied to its DiT (a DiT built with, or assigned
        to, it): another live pipeline's holding the DiT (:meth:`_sharers`), with its compile backend
        and shape policy, else what the DiT itself holds: its kernel swaps, fp8, the attention
        backend its modules run ("auto" kept where it picks that one) and its compile
        (``accel.compile.compiled_mode``). The transforms applied to the DiT it replaces are not
        applied to it (``optimize`` applies them when asked). Up to 0.21.0 a pipeline built on a
        compiled DiT recorded compile "off" (``optimize(compile="full")`` compiled the "blocks" DiT
        again instead of being refused, and a ControlNet it loaded stayed eager beside the compiled
        DiT); and a DiT assigned kept the record of the DiT it replaced: with kernels, fp8 or an
        attention backend on, the new DiT ran without them and ``optimize`` asking for them again
        did nothing (it returned [])."""
        from .accel.attention_backends import backend_in_place, check_attention_backend
        from .accel.compile import compiled_mode
        from .accel.fp8 import fp8_applied
        from .accel.fused_ops import count_fused

        dit = self.transformer
        if dit is None:
            return
        sharers = self._sharers()
        if sharers:
            self._accel.update({key: sharers[0]._accel[key] for key in self._DIT_SETTINGS})
            self._compile_options = sharers[0]._compile_options
            return
        attention = backend_in_place(dit) or "sdpa"
        if self._accel["attention"] == "auto" and check_attention_backend(dit, "auto", self.device)[0] == attention:
            attention = "auto"  # (chosen again at a move)
        compiled = compiled_mode(dit)
        self._accel.update(kernels="triton" if any(swapped for swapped, _ in count_fused(dit).values()) else "none",
                           fp8=fp8_applied(dit), attention=attention, compile=compiled[0] if compiled else "off")
        if compiled:
            self._compile_options = (self._compile_options[0], compiled[1])

    @property
    def vae(self) -> AutoencoderKL:
        """The VAE."""
        return self._vae

    @vae.setter
    def vae(self, module) -> None:
        """diffusers' ``pipe.vae = other_vae``: the VAE is prepared as a loaded one is. Its config becomes
        ``vae_config`` (scaling, shift, downscale), its weights rest where the VAE's placement keeps them
        (CPU memory under offload="model"), its ``decode`` / ``encode`` called by hand visit the
        execution device, its ``enable_tiling()`` and the other diffusers names set this pipeline's,
        SDPA is fitted to where it runs and, with ``vae_compile`` on, its decode is compiled. The VAE it
        replaces gets its own ``decode`` / ``encode`` back. None drops the VAE (as to free its memory).
        A VAE another pipeline places otherwise is refused (:meth:`_check_held_alike`)."""
        with _locks_of(lambda: [self, *_pipelines_holding(module)]):  # (as the transformer setter)
            self._check_held_alike("vae", module)
            self._set_vae(module)

    def _set_vae(self, module) -> None:
        if module is not None and not isinstance(module, AutoencoderKL):
            raise ValueError(f"pipe.vae = {type(module).__module__}.{type(module).__name__}(...): the pipeline runs "
                             f"its own VAE class; load the VAE's file or folder with "
                             f"zimage_native.loading.load_component('vae', path, dtype) and assign that, or give "
                             f"vae= to from_pretrained / from_single_files")
        from .accel.attention_backends import fit_sdpa_
        from .offload import move_, visit_on_call_

        old = self._vae
        if old is not None and old is not module and all(pipe is self for pipe in _pipelines_holding(old)):
            # (a compiled decode stays the old VAE's own; one another pipeline holds keeps its visits)
            visit_on_call_(old, ("decode", "encode"), None)
        self._vae = module
        if module is None:
            return
        self.vae_config = module.config
        move_(module, storage_device("vae", self.placement["vae"], self.offload))
        self._bind_vae_calls()
        if self._accel["vae_compile"]:
            from .accel.vae import compile_vae_decode_

            logger.info(compile_vae_decode_(module, backend=self._vae_compile_backend, device=self.placement["vae"]))
        self._fit_vae_hand_calls()
        line = fit_sdpa_(module, self.placement["vae"])
        if line:
            logger.info(line)

    @property
    def text_encoder(self):
        """The text encoder (:class:`~zimage_native.text_encoder.TextEncoder`, a remote one, or None)."""
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder) -> None:
        """``pipe.text_encoder = other.text_encoder``: its model rests where this pipeline's text encoder
        rests (as a VAE assigned: the execution device when resident, CPU memory under offload="model",
        "text_encoder" and "blocks", whose runs visit the execution device; an encoder placed on the
        CPU stays there). Up to 0.23.0 it stayed where it was: on a pipeline resident on a GPU an
        encoder loaded on the CPU ran on the CPU, and under offload="model" one loaded on a GPU
        stayed resident there. One whose model another pipeline
        places otherwise is refused (:meth:`_check_held_alike`)."""
        model = getattr(encoder, "model", None)  # (None for a remote encoder, or none: nothing placed)
        with _locks_of(lambda: [self, *_pipelines_holding(model)]):  # (a run ends with the encoder it started with)
            self._check_held_alike("text_encoder", model)
            self._text_encoder = encoder
            if model is not None and "_accel" in self.__dict__:  # (the constructor takes them where they were loaded)
                from .offload import move_

                move_(model, storage_device("text_encoder", self.placement["text_encoder"], self.offload))

    @property
    def tokenizer(self):
        """diffusers' ``pipe.tokenizer``: the text encoder's tokenizer (a transformers tokenizer)."""
        tokenizer = getattr(self.text_encoder, "tokenizer", None)
        if tokenizer is None:
            where = ("the text encoder is remote (text_encoder_url): its server tokenizes" if self.text_encoder
                     is not None else "this pipeline has no text encoder")
            raise AttributeError(f"pipe.tokenizer: {where}")
        return tokenizer

    @property
    def components(self) -> dict:
        """diffusers' ``pipe.components``: the loaded parts by name (transformer, vae, text_encoder,
        tokenizer). No ``scheduler``: the sampler is built for each call (``pipe.scheduler`` says how)."""
        out = {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}
        out["tokenizer"] = getattr(self.text_encoder, "tokenizer", None)
        return out

    @property
    def defaults(self) -> VariantDefaults:
        return VARIANTS[self.variant]

    @property
    def transformer_config(self) -> TransformerConfig:
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        """Where the DiT runs (its execution device, also with offloading)."""
        return self.placement["transformer"]

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_pad_token.dtype

    @property
    def vae_scale_factor(self) -> int:
        """The VAE's spatial downscale (2 ** (len(block_out_channels) - 1)): 8 for the released VAE."""
        return self.vae_config.scale_factor

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' name for where the pipeline runs: :attr:`device`."""
        return self.device

    @property
    def image_processor(self) -> ImageProcessor:
        """diffusers' ``pipe.image_processor``, for latents decoded by hand and images encoded by hand
        (docs/tasks.md, "Decoding by hand")."""
        return ImageProcessor(2 * self.vae_scale_factor)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        variant: str | None = None,
        kernels: str = "none",
        attention: str | None = None,
        compile: str = "off",
        cuda_graphs: bool = False,
        fp8: bool = False,
        **load,
    ) -> "ZImagePipeline":
        """Load a diffusers-layout folder or a Hub id; ``load`` holds the loading options of
        :func:`zimage_native.loading.load_pretrained` (per-component devices, ``offload``, Hub
        ``revision``/``cache_dir``/``local_files_only``, component files ``transformer``/``vae``/
        ``text_encoder``/``tokenizer``, a remote ``text_encoder_url``/``text_encoder_token``).

        Accelerations (see :meth:`optimize` and docs/performance.md): ``kernels`` "none" | "triton",
        ``attention`` a backend name or "auto" (default: $ZIMAGE_ATTENTION, else "sdpa"),
        ``compile`` "off" | "blocks" | "full", ``cuda_graphs``, ``fp8``. ``torch_dtype=`` (diffusers'
        name) is accepted for ``dtype``.
        """
        from .accel import attention_from_env, check_before_loading

        dtype = _dtype_argument(dtype, load.pop("torch_dtype", None))
        pop_diffusers_options(load)
        check_variant(variant)  # before a download: diffusers' variant="fp16" means something else
        attention = attention or attention_from_env()
        dit_device = device if load.get("dit_device") is None else load["dit_device"]  # dit_device=0 is cuda:0
        check_before_loading(dit_device, dtype, load.get("offload", "none"), kernels=kernels, compile=compile,
                             fp8=fp8, cuda_graphs=cuda_graphs, attention=attention)
        pipe = cls(**load_pretrained(path_or_id, device, dtype, **load), variant=variant)
        if variant is None:
            logger.info("variant %s (defaults: %s)", pipe.variant, pipe.defaults)
        pipe.optimize(kernels=kernels, attention=attention, compile=compile, cuda_graphs=cuda_graphs, fp8=fp8)
        return pipe

    @classmethod
    def from_single_files(cls, transformer=None, vae=None, text_encoder=None, tokenizer=None, device=None, dtype=None,
                          **kwargs) -> "ZImagePipeline":
        """Build from single files (ComfyUI split, all-in-one, fp8) or component folders; see
        :func:`zimage_native.loading.load_single_files` for the arguments. Other keyword arguments
        (``variant=``, ...) go to the constructor; ``torch_dtype=`` (diffusers' name) is accepted for
        ``dtype``. An unknown keyword is refused before anything loads."""
        names = ("transformer_config", "vae_config", "text_encoder_config", "scheduler_config", "text_encoder_quant")
        built = ("self", "transformer", "vae", "text_encoder", "scheduler_config", "vae_config", "source")
        known = [*names, *(k for k in inspect.signature(cls.__init__).parameters if k not in built)]
        dtype = _dtype_argument(dtype, kwargs.pop("torch_dtype", None))
        pop_diffusers_options(kwargs, "from_single_files", known,
                              f"transformer, vae, text_encoder, tokenizer, device, dtype, {', '.join(known)}; "
                              f"accelerations (kernels, attention, compile, cuda_graphs, fp8) with pipe.optimize() "
                              f"after loading")
        check_variant(kwargs.get("variant"))
        loaded = load_single_files(transformer, vae, text_encoder, tokenizer, device, dtype,
                                   **{k: kwargs.pop(k) for k in names if k in kwargs})
        if kwargs.get("variant") is None:  # from the DiT file's name, not the other components' paths
            kwargs["variant"] = detect_variant(str(transformer), loaded["scheduler_config"], single_file=True)
            logger.info("variant %s (from %s; variant= or --variant sets it)", kwargs["variant"], Path(transformer).name)
        return cls(**loaded, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs) -> "ZImagePipeline":
        """diffusers' ``ZImageImg2ImgPipeline.from_pipe(pipe)`` (and its inpainting and ControlNet
        pipelines') makes a pipeline of another task over the same weights. Here one pipeline runs
        every task, so there is nothing to make: refused, naming the calls that do it."""
        raise ValueError("ZImagePipeline.from_pipe(pipe): one pipeline runs every task here, so call pipe itself: "
                         "img2img with pipe(prompt, image=..., strength=...) or pipe.img2img(prompt, image, strength), "
                         "inpainting with pipe.inpaint(prompt, image, mask_image) (or image= and mask_image=), "
                         "ControlNet with pipe.load_controlnet(path) and control_image=; a second pipeline over the "
                         "same weights is ZImagePipeline(pipe.transformer, pipe.vae, pipe.text_encoder, "
                         "pipe.scheduler_config, pipe.vae_config)")

    # ------------------------------------------------------------------ ControlNet
    @property
    def controlnet(self):
        """The loaded ControlNet-Union branch (:meth:`load_controlnet`), or None."""
        return self.controlnets.model

    @controlnet.setter
    def controlnet(self, value):
        """diffusers' ``pipe.controlnet = model``: None unloads (:meth:`unload_controlnet`); a model built
        elsewhere (diffusers' ``ZImageControlNetModel``) is refused, naming :meth:`load_controlnet`."""
        if value is not None:
            raise ValueError(f"pipe.controlnet = {type(value).__name__}(...): load the ControlNet's file or folder "
                             f"with pipe.load_controlnet(path) (it is built for this pipeline's DiT, dtype and "
                             f"accelerations); pipe.controlnet = None unloads it")
        self.unload_controlnet()

    @_serialized_with_sharers  # (an "auto" attention picked again reaches the DiT: _fit_attention)
    def load_controlnet(self, path: str | os.PathLike, config=None):
        """Load a Fun-ControlNet-Union (a diffusers folder or a published single file: versions 1.0,
        2.0, 2.1, 2.1 lite) for this pipeline's DiT, replacing any loaded one. ``config`` (a dict, a
        config.json or a folder holding one) overrides what is inferred from the tensors. The branch
        gets the DiT's dtype, device and accelerations. Returns it (also ``pipe.controlnet``)."""
        state = self._accel
        backend, shapes = self._compile_options
        blocks = self.offload == "blocks"  # then the branch's blocks are streamed like the DiT's
        accel = dict(kernels=state["kernels"], attention=state["attention"], fp8=state["fp8"],
                     compile=state["compile"], compile_backend=backend, shapes=shapes, fuse=not blocks,
                     device=self.device)  # where it runs (with offload="model" it rests in CPU memory)
        device = torch.device("cpu") if blocks else self.transformer.x_pad_token.device
        replaced = self.controlnet
        # Its blocks are packed into pinned slabs on a GPU: read them into memory of their own, as the DiT's.
        # Streamed, its blocks rest in CPU memory and its other tensors stay on the DiT's GPU (weighed there).
        model = self.controlnets.load(path, config, transformer_config=self.transformer_config, dtype=self.dtype,
                                      device=device, accel=accel,
                                      stream_to=self.placement["transformer"] if blocks else None,
                                      model_gpu=self._model_offload_short if blocks else None,
                                      visits=self._check_branch_visit if self.offload == "model" else None)
        if blocks:
            from .offload import stream_blocks

            stream_blocks(model, self.placement["transformer"], blocks=_control.branch_blocks(model),
                          keep=_control.BRANCH_RESIDENT)
        self._fit_attention()
        self._release_control_graphs(replaced)
        return model

    def _model_offload_short(self, branch: int) -> str | None:
        """Why this pipeline would not fit on its GPU under ``offload="model"`` with a ControlNet of
        ``branch`` bytes, which visits with the DiT (``devices.model_offload_gpu_short``; the bytes are
        the loaded components' tensors', not the pinned slabs' that hold streamed blocks); None where it
        would."""
        from .devices import model_offload_gpu_short

        needs = self._gpu_needs("model")
        needs["transformer"] += branch
        return model_offload_gpu_short(needs, {name: self.placement[name] for name in needs})

    def _gpu_needs(self, offload: str) -> dict[str, int]:
        """The bytes each loaded component holds on its device while it runs under ``offload``: "model",
        all of its tensors; "blocks", the DiT's resident part and its 2 largest blocks in flight (the running
        one and its prefetch, ``offload.streamed_bytes``). Where this pipeline runs under "model", each
        storage once (``quantize.weight_bytes``: what ``offload.visit`` copies; by tensor, the views of a
        fused q|k|v or w1|w3 GEMM counted it twice); else by tensor (not the pinned slabs, whole, that
        hold streamed blocks)."""
        from .devices import bytes_in
        from .offload import streamed_bytes
        from .quantize import weight_bytes

        modules = {"text_encoder": self._module("text_encoder"), "transformer": self.transformer, "vae": self.vae}
        weigh = weight_bytes if self.offload == "model" else (lambda m: bytes_in((*m.parameters(), *m.buffers()), None))
        needs = {name: weigh(m) for name, m in modules.items() if m is not None}
        if offload == "blocks":
            resident, block = streamed_bytes(self.transformer)
            needs["transformer"] = resident + 2 * block
        return needs

    def _check_branch_visit(self, branch: torch.nn.Module) -> None:
        """``offload="model"``: the ControlNet ``branch`` (built on meta, weighed in this pipeline's dtype,
        or as the DiT's fp8 converts it after loading: ``accel.fp8.fp8_bytes``) visits the DiT's GPU with
        the DiT while a step runs; refuse where both cannot fit there (``control.check_branch_visit``)."""
        from .accel.fp8 import fp8_bytes
        from .devices import bytes_in

        model = self._gpu_needs("model")
        weighed = (fp8_bytes(branch, self.dtype) if self._accel["fp8"]
                   else bytes_in((*branch.parameters(), *branch.buffers()), self.dtype))
        _control.check_branch_visit(weighed,
                                    bytes_in(_control.branch_on_gpu(branch), self.dtype), model,
                                    self._gpu_needs("blocks"), {name: self.placement[name] for name in model})

    @_serialized
    def unload_controlnet(self) -> bool:
        """Drop the loaded ControlNet; returns whether one was loaded."""
        self._release_control_graphs(self.controlnet)
        return self.controlnets.unload()

    def _release_control_graphs(self, branch) -> None:
        """Captured graphs of control requests hold ``branch`` (a ControlNet being replaced or dropped):
        released. The others (requests without a control image) run the DiT alone, which a load or
        an unload leaves as it was: kept. Up to 0.20.0 every graph was dropped, so a server loading
        and unloading a ControlNet between requests captured its plain graphs again each time."""
        if self._graphed is not None and branch is not None:
            self._graphed.release_holding(branch)

    # ------------------------------------------------------------------ placement
    @_serialized_with_placed
    def to(self, *args, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           silence_dtype_warnings: bool = False) -> "ZImagePipeline":
        """Every component on ``device``, resident (diffusers' ``pipe.to``; offloading ends), and so
        every other pipeline sharing a component with it (:meth:`_place_holders`). Returns the pipeline.
        Streamed blocks cannot move this way: load again with ``offload="none"``. The dtype is
        chosen when loading (``dtype=`` / ``torch_dtype=``): a dtype here is refused, unless every
        component holds it already (diffusers' ``pipe.to("cuda", torch.bfloat16)`` after loading in
        bfloat16), where it changes nothing; a remote text encoder's dtype (its machine's) is not
        checked. Without a device only the dtype is checked. ``silence_dtype_warnings`` (diffusers'
        switch for its warning about float16 on the CPU) is accepted and changes nothing: no such
        warning is given here."""
        dtypes = [a for a in args if isinstance(a, torch.dtype)] + ([dtype] if dtype is not None else [])
        if len(dtypes) > 1:
            raise ValueError(f"pipe.to() takes one dtype, got {dtypes}")
        # the weights this pipeline holds: a remote text encoder's dtype is the other machine's (asking for it
        # is a request there, and its features are cast to the DiT's)
        local = (self.vae, self.text_encoder if self._module("text_encoder") is not None else None)
        held = {self.dtype, *(getattr(part, "dtype", None) for part in local)} - {None} if dtypes else set()
        if dtypes and (dtypes[0] not in held or len(held) > 1):
            raise ValueError(f"pipe.to({dtypes[0]}): the dtype is chosen when loading; load again with "
                             f"dtype={str(dtypes[0]).removeprefix('torch.')!r} (or torch_dtype=); this pipeline "
                             f"holds {', '.join(sorted(str(d).removeprefix('torch.') for d in held))}")
        places = [a for a in args if not isinstance(a, torch.dtype)] + ([device] if device is not None else [])
        if not places and dtypes:
            return self  # diffusers' pipe.to(torch.bfloat16) on a pipeline loaded so
        if len(places) != 1:
            raise ValueError(f"pipe.to() takes one device, got {places}")
        device = places[0]
        if any(pipe.offload == "blocks" for pipe in self._placed_with()):
            raise ValueError("pipe.to() cannot move a DiT whose blocks are streamed (offload='blocks': this "
                             "pipeline's, or another's sharing a component with it); load it again with "
                             "offload='none'")
        self._place_holders(resolve_device(device), "none")
        return self

    @_serialized_with_placed
    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """diffusers' name for ``offload="model"``: every component stays in CPU memory and visits
        ``device`` (cuda:``gpu_id``, or the index in ``device``: "cuda:1") only while it runs; so
        do those of every other pipeline sharing a component with it (:meth:`_place_holders`)."""
        asked = parse_device(device)  # "CUDA", as device= everywhere
        kind, index = asked.type, asked.index
        if gpu_id is not None and index is not None and gpu_id != index:
            raise ValueError(f"enable_model_cpu_offload(gpu_id={gpu_id}, device={str(device)!r}): two GPUs; give the "
                             f"index once")
        index = gpu_id if gpu_id is not None else index
        try:
            device = resolve_device(kind if index is None else f"{kind}:{index}")
        except ValueError:
            if kind != "cuda" or torch.cuda.is_available():
                raise
            raise ValueError(f"enable_model_cpu_offload(): it keeps the components in CPU memory and moves each to "
                             f"the GPU while it runs, but this torch {torch.__version__} sees no CUDA GPU; without a "
                             f"GPU the pipeline runs from CPU memory already: leave the call out (on a Mac give "
                             f"device='mps')") from None
        if any(pipe.offload == "blocks" for pipe in self._placed_with()):
            raise ValueError("the DiT's blocks are already streamed (offload='blocks': this pipeline's, or another's "
                             "sharing a component with it); load it again with offload='model'")
        self._place_holders(device, "model")

    def _place_holders(self, device: torch.device, offload: str) -> None:
        """Place this pipeline and every other live pipeline placed with it (:meth:`_placed_with`: those
        sharing a component with it, theirs, and so on; the locks of all are held) on ``device`` with
        ``offload`` ("none" or "model"), each whole: a pipeline's offload mode covers its three
        components, and a component rests in one place, so pipelines sharing one are placed together
        (:meth:`_check_held_alike` refuses a pipeline that would join them placed otherwise). Checked
        for all before anything moves. Up to 0.22.0 only the pipeline asked changed its mode: another
        holding the DiT with offload="none" ran a DiT left in CPU memory on the GPU (a device-mismatch
        RuntimeError), and one offloading it kept a DiT made resident by another's ``pipe.to``
        resident, reporting offload="model"; a shared VAE or text encoder likewise. Another pipeline
        whose shared components are already held as asked is left as it was built: the placement of
        what it does not share (offload="text_encoder", its own text encoder on the CPU) is its own."""
        holders = [self, *(pipe for pipe in self._placed_with()[1:] if pipe._shares_otherwise(device, offload))]
        for pipe in holders:
            pipe._check_graphs_fit(device, offload)
            pipe._check_accelerations_fit(device)
        for pipe in holders:
            pipe._place_components(device, offload, "" if pipe is self else " of another pipeline placed with it")

    def _shares_otherwise(self, device: torch.device, offload: str) -> bool:
        """Whether a component this pipeline shares with another is held otherwise than ``device`` with
        ``offload`` would hold it (:func:`_held_as`): then :meth:`_place_holders` places it whole."""
        return any(module is not None and len(_pipelines_holding(module)) > 1
                   and _held_as(name, self.placement[name], self.offload) != _held_as(name, device, offload)
                   for name, module in self._placed().items())

    def _place_components(self, device: torch.device, offload: str, whose: str) -> None:
        """This pipeline's components placed on ``device`` with ``offload`` (:meth:`_place_holders`);
        already so placed (a script's ``pipe.to("cuda")`` before every call), nothing moves and the
        cached features and captured graphs stay; dropping them re-encoded and re-captured every call."""
        from .offload import move_, resides_on

        modules = {name: module for name in ("text_encoder", "transformer", "vae")
                   if (module := self._module(name)) is not None}  # (a remote text encoder stays where it is)
        moved = (self.offload != offload or any(place != device for place in self.placement.values())
                 or not all(resides_on(m, storage_device(n, device, offload)) for n, m in modules.items()))
        for name, module in modules.items():
            move_(module, storage_device(name, device, offload))
        self.placement = dict.fromkeys(self.placement, device)
        self.offload = offload
        self._fit_vae_hand_calls()
        self._fit_attention()
        if moved:
            self.prompt_cache.clear()  # its features are on the old devices
            for line in self._drop_graphs("moved", whose):  # graphs hold tensors of the old placement
                logger.info(line)

    def _check_graphs_fit(self, device: torch.device, offload: str) -> None:
        """Refuse a placement that this pipeline's captured CUDA graphs cannot follow (checked for every
        pipeline placed with it: :meth:`_place_holders`): a graph replays the weights at the
        addresses it was captured with, and an offloaded DiT is copied to the GPU anew on every visit
        (and freed after it), a DiT on the CPU has no graph to replay."""
        from .accel.cuda_graphs import graphs_problem

        problem = graphs_problem(device, offload) if self._graphed is not None else None
        if problem:
            raise ValueError(f"{problem}; CUDA graphs are on (cuda_graphs=True): load the pipeline again without "
                             f"them to place it so")

    def _check_accelerations_fit(self, device: torch.device) -> None:
        """Refuse a placement where an applied acceleration cannot run (a GPU-only attention backend,
        the Triton kernels or fp8 moved to the CPU), before anything moves, rather than fail inside
        a library at the next call."""
        from .accel import AccelerationUnavailable, placement_problem

        for model in (self.transformer, self.controlnet):
            problem = model is not None and placement_problem(model, self._accel, device, self._compile_options[0])
            if problem:
                raise AccelerationUnavailable(f"the pipeline cannot run on {device}: {problem}")

    @_serialized_run
    def maybe_free_model_hooks(self) -> None:
        """diffusers' end-of-call step: there model offload's hooks leave the last component on the GPU,
        and this moves every component back to the CPU and arms the hooks again. Here there are no
        hooks to arm: under ``offload="model"`` a component visits the GPU only while it runs and rests
        in CPU memory when the call returns. Under ``offload="blocks"`` the sampling loop's last forward
        fetches no block for a step that does not come, and the loop drops what an interrupted run
        left, so after a pipeline call nothing is left to free either. What it still drops are the blocks a
        DiT or ControlNet called by hand (``pipe.transformer(...)``) left on the device for its next
        pass (``offload.release_streamed``). Otherwise it does nothing, as diffusers' without
        offload."""
        release_streamed(self.transformer, self.controlnet)

    def enable_sequential_cpu_offload(self, *args, **kwargs) -> None:
        """diffusers' lowest-memory offload. Here it is chosen when loading, as ``offload="blocks"``
        (the DiT's blocks stream from pinned CPU memory one ahead of their use): refused with that."""
        raise ValueError("enable_sequential_cpu_offload(): here the lowest-memory mode is chosen when loading: "
                         "from_pretrained(..., offload='blocks') streams the DiT's blocks from CPU memory; "
                         "enable_model_cpu_offload() works after loading")

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one image at a time, as diffusers' slicing does: the VAE's
        memory is one image's, the images the same (each is decoded on its own either way)."""
        self.vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self.vae_slicing = False

    def _bind_vae_calls(self) -> None:
        """diffusers' Z-Image pipeline has no enable_vae_tiling(): its users call
        ``pipe.vae.enable_tiling()`` / ``enable_slicing()`` (and ``disable_*``). Those names on this
        pipeline's VAE set the pipeline's tiling and slicing (through a weak reference, so the VAE
        does not keep the pipeline alive). ``pipe.transformer``'s names are bound likewise, by
        :meth:`_bind_transformer_calls` (see :class:`_PipelineCall` for copies)."""
        if self.vae is None:
            return
        for vae_name, name in (("enable_tiling", "enable_vae_tiling"), ("disable_tiling", "disable_vae_tiling"),
                               ("enable_slicing", "enable_vae_slicing"), ("disable_slicing", "disable_vae_slicing")):
            self._bind_call(self.vae, vae_name, _PipelineCall([], None, name, "vae", vae_name))

    def _bind_transformer_calls(self) -> None:
        """``pipe.transformer.set_attention_backend``, ``.compile`` and ``.compile_repeated_blocks`` call
        the pipeline (a DiT assigned to ``pipe.transformer`` gets them too): nn.Module.compile would
        compile the module's ``__call__``, which the pipeline never calls."""
        if self.transformer is None:  # (pipe.transformer = None, as to free its memory)
            return
        self._bind_call(self.transformer, "set_attention_backend",
                        _PipelineCall([], None, "_set_diffusers_attention_backend", "transformer",
                                      "set_attention_backend"))
        for name in ("compile", "compile_repeated_blocks"):
            self._bind_call(self.transformer, name,
                            _PipelineCall([], None, "_diffusers_compile", "transformer", name, every=False), name)

    def _bind_call(self, module: torch.nn.Module, attribute: str, call: _PipelineCall, *leading) -> None:
        """Set ``module.attribute`` to ``call`` bound to this pipeline, after the live pipelines that
        the name was bound to and that still hold ``module`` (see :class:`_PipelineCall`); ``leading``
        arguments go first in each call."""
        existing = module.__dict__.get(attribute)
        if isinstance(existing, functools.partial):
            existing = existing.func
        call = (existing if isinstance(existing, _PipelineCall) else call).bound(self, module)
        object.__setattr__(module, attribute, functools.partial(call, *leading) if leading else call)

    def __deepcopy__(self, memo: dict) -> "ZImagePipeline":
        """A pipeline of its own: its components copied, its settings (tiling, slicing, attention, the
        LoRA stack) with them, and the diffusers names on its VAE and DiT bound to the copy (they
        stayed bound to the original). It gets its own lock; its prompt rewriter reads the copy's text
        encoder and loads its LM anew when used. Refused with CUDA graphs captured (a graph replays
        the addresses of the original's tensors)."""
        if self._graphed is not None:
            raise TypeError("copy.deepcopy(pipe): the pipeline has captured CUDA graphs (optimize(cuda_graphs=True)), "
                            "which replay the original's tensors; copy it before capturing them")
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied  # before the components: their bound names look the copy up here
        with self._lock:
            for key, value in self.__dict__.items():
                if key not in self._PROCESS_PARTS:
                    copied.__dict__[key] = copy.deepcopy(value, memo)
        copied._own_process_parts()  # (a component copied before the pipeline, in one deepcopy, was bound to none)
        return copied

    #: What a copy or an unpickled pipeline makes anew (:meth:`_own_process_parts`), not copied.
    _PROCESS_PARTS = ("_lock", "prompt_rewriter")

    def _own_process_parts(self) -> None:
        """A copied or unpickled pipeline's own lock and prompt rewriter (reading its text encoder; the
        rewriter's LM loads anew when used), and the diffusers names on its VAE and DiT bound to it."""
        self._lock = threading.RLock()
        self.prompt_rewriter = self._new_rewriter()
        self._bind_vae_calls()
        self._bind_transformer_calls()
        _register(self)

    def _new_rewriter(self) -> Rewriter:
        """A prompt rewriter reading this pipeline's text encoder, model folder and templates. It holds
        the pipeline weakly: a pipeline in a reference cycle with its rewriter stayed alive after
        ``del pipe`` until the garbage collector ran, in the registry of live pipelines, and so was
        placed with a pipeline it had shared a component with (its DiT copied to the GPU)."""
        ref = weakref.ref(self)

        def read(name: str):
            def reader():
                pipe = ref()
                if pipe is None:
                    raise RuntimeError("the pipeline this prompt rewriter belonged to is gone")
                return getattr(pipe, name)
            return reader

        return Rewriter(read("text_encoder"), read("model_folder"), read("template_registry"))

    def __getstate__(self) -> dict:
        """``pickle`` / ``torch.save(pipe)`` (then ``torch.load(PATH, weights_only=False)``) of a plain
        pipeline: its components, settings and LoRA stack, as :meth:`__deepcopy__` copies them; the
        lock and the prompt rewriter are made anew when unpickled. Refused with CUDA graphs captured;
        a compiled DiT and streamed blocks (offload="blocks") refuse themselves
        (:class:`~zimage_native.process_local.ProcessLocal`)."""
        if self._graphed is not None:
            raise TypeError("cannot pickle a pipeline with CUDA graphs (optimize(cuda_graphs=True)): its graphs belong "
                            "to this process. Save the DiT's weights instead "
                            "(torch.save(pipe.transformer.state_dict(), PATH)), or pickle the pipeline before "
                            "optimize(cuda_graphs=True)")
        with self._lock:
            return {key: value for key, value in self.__dict__.items() if key not in self._PROCESS_PARTS}

    def __setstate__(self, state: dict) -> None:
        from .accel.fusions import rejoin_fused_views_

        self.__dict__.update(state)
        for model in (self.transformer, getattr(self, "controlnet", None)):
            if model is not None:  # (pickle.dumps copied the fused GEMMs' views apart)
                rejoin_fused_views_(model)
        self._own_process_parts()

    def _set_diffusers_attention_backend(self, backend: str) -> list[str]:
        """diffusers' ``pipe.transformer.set_attention_backend(name)``: its backend names mapped to this
        engine's (``optimize(attention=...)``); names with no counterpart here are refused."""
        from .accel.attention_backends import ATTENTION_CHOICES

        name = str(backend).lower()
        mapped = ("sdpa" if name == "native" or name.startswith("_native_") and name not in ("_native_npu", "_native_xla")
                  else "flash_attn_3" if name.startswith("_flash_3") or name == "_flash_varlen_3"
                  else "flash_attn_2" if name.startswith("flash") and not name.startswith("flash_4")
                  else "sage" if name.startswith(("sage", "_sage"))
                  else "xformers" if name == "xformers" else None)
        if name in ATTENTION_CHOICES:
            mapped = name
        if mapped is None:
            raise ValueError(f"set_attention_backend({backend!r}): no such backend here; diffusers' native, flash, "
                             f"_flash_3, sage and xformers (and their variants) map to this engine's "
                             f"{list(ATTENTION_CHOICES)}, which pipe.optimize(attention=...) also takes")
        return self.optimize(attention=mapped)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> list[str]:
        """diffusers' switch to xformers attention: ``optimize(attention="xformers")`` (checked as that
        checks it; ``attention_op`` is refused: xformers picks its kernel)."""
        if attention_op is not None:
            raise ValueError(f"enable_xformers_memory_efficient_attention(attention_op={attention_op!r}): not taken "
                             f"here; xformers picks its kernel")
        return self.optimize(attention="xformers")

    def disable_xformers_memory_efficient_attention(self) -> list[str]:
        """diffusers' switch back: ``optimize(attention="sdpa")``."""
        return self.optimize(attention="sdpa")

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """diffusers' name. In diffusers 0.42.1 it changes nothing for Z-Image (no Z-Image module slices
        its attention), nor does it here: accepted, with a warning saying what saves memory instead."""
        self._warn_once("enable_attention_slicing() changes nothing for Z-Image (in diffusers neither: no Z-Image "
                        "module slices its attention). For less GPU memory: enable_model_cpu_offload(), "
                        "from_pretrained(..., offload='blocks'), pipe.vae.enable_tiling()")

    def disable_attention_slicing(self) -> None:
        """diffusers' name; changes nothing (see :meth:`enable_attention_slicing`)."""

    def _warn_once(self, advice: str) -> None:
        if advice not in self.advised:
            self.advised.add(advice)
            logger.warning(advice)

    def _diffusers_compile(self, name: str, *args, **kwargs) -> list[str]:
        """diffusers' ``pipe.transformer.compile()`` (``nn.Module.compile``: the whole forward) and
        ``pipe.transformer.compile_repeated_blocks()`` (regional) as this engine's ``compile="full"`` and
        ``compile="blocks"`` (:meth:`optimize`). ``nn.Module.compile`` itself compiles the module's
        ``__call__``, which the pipeline never calls (it runs ``forward_tokens``): the run stayed eager.
        ``backend=`` is the compile backend, ``dynamic=False`` the static shape policy; ``fullgraph``
        changes nothing (the modes fix it); ``mode=`` and other options of torch.compile are refused."""
        mode = "full" if name == "compile" else "blocks"
        if args:
            raise TypeError(f"transformer.{name}() takes keyword arguments here (backend=, dynamic=, fullgraph=)")
        kwargs.pop("fullgraph", None)
        backend, dynamic = kwargs.pop("backend", "inductor"), kwargs.pop("dynamic", None)
        torch_mode = kwargs.pop("mode", None)
        if torch_mode not in (None, "default"):
            instead = ("CUDA graphs are pipe.optimize(cuda_graphs=True)" if torch_mode == "reduce-overhead"
                       else "the engine compiles with inductor's default mode")
            raise ValueError(f"transformer.{name}(mode={torch_mode!r}): not taken here; {instead}")
        if kwargs:
            raise ValueError(f"transformer.{name}(): {sorted(kwargs)} are not taken here; it takes backend=, dynamic= "
                             f"and fullgraph= (pipe.optimize(compile=...) has the engine's own options)")
        return self.optimize(compile=mode, compile_backend=backend, shapes="static" if dynamic is False else "dynamic")

    def _fit_attention(self) -> None:
        """SDPA bounded to slices of the queries where it has only its math path (a bfloat16 model on a
        GPU below sm80: ``accel.attention_backends.sdpa_math_only``), for the DiT, the ControlNet
        branch and the VAE, on the devices where they run."""
        from .accel.attention_backends import fit_sdpa_, set_attention_backend

        if self._accel["attention"] == "auto":  # chosen again for the device the DiT now runs on
            # (with the ControlNets of the other pipelines holding the DiT, which share its record: one
            # kept the backend picked before beside the DiT running the new pick)
            for model in (self.transformer, *(pipe.controlnet for pipe in (self, *self._sharers()))):
                if model is not None:
                    logger.info(set_attention_backend(model, "auto", self.placement["transformer"]))
        for name, model in (("transformer", self.transformer), ("transformer", self.controlnet), ("vae", self.vae)):
            line = fit_sdpa_(model, self.placement[name]) if model is not None else None
            if line:
                logger.info(line)

    def set_progress_bar_config(self, disable: bool = False, **options) -> None:
        """diffusers' settings of the per-step progress bar: ``disable`` (``pipe.progress``) and tqdm's
        own options (``leave``, ``desc``, ``position``, ...), which replace the earlier ones, as in
        diffusers."""
        self.progress = not disable
        self.progress_bar_config = dict(options)

    def progress_bar(self, iterable=None, total=None):
        """diffusers' bar for a denoising loop of one's own (``with pipe.progress_bar(total=n) as bar:``
        ... ``bar.update()``, or ``for t in pipe.progress_bar(timesteps)``): the pipeline's own per-step
        bar, with the :meth:`set_progress_bar_config` options and ``pipe.progress``."""
        if iterable is None and total is None:
            raise ValueError("progress_bar() needs iterable= or total=, as in diffusers")
        return sampling.denoise_bar(self, self.progress, iterable, **({} if total is None else {"total": total}))

    def _module(self, name: str) -> torch.nn.Module:
        if name == "transformer" and self.controlnet is not None:
            return torch.nn.ModuleList([self.transformer, self.controlnet])  # the branch runs with the DiT
        return self.text_encoder.model if name == "text_encoder" else getattr(self, name)

    @contextlib.contextmanager
    def _running(self, name: str):
        """A component on its execution device while it runs; an offloaded one visits it from CPU
        memory (``offload.visit``: copied there, nothing copied back). The DiT and the ControlNet
        branch visit each as itself: a visit waits for another thread's visit of the same module
        (another pipeline holding the DiT), and the ModuleList of both that :meth:`_module` makes
        anew at each call was a module no other visit held, so two pipelines sharing a DiT, one with
        a ControlNet, ran their visits at once: the one ending last pointed the DiT back at the other's
        device copies (92 of the tiny DiT's 131 tensors left resting there)."""
        device = self.placement[name]
        module = self._module(name)
        if module is None or storage_device(name, device, self.offload) == device:  # None: a remote encoder
            yield device
            return
        from .offload import visit

        parts = [self.transformer, self.controlnet] if name == "transformer" and self.controlnet is not None \
            else [module]
        with contextlib.ExitStack() as visits:
            for part in parts:
                visits.enter_context(visit(part, device))
            yield device

    def _fit_vae_hand_calls(self) -> None:
        """``pipe.vae.decode`` / ``encode`` called by hand visit the VAE's execution device, as the
        pipeline's decode does, while the VAE rests in CPU memory (offload="model"); else they are
        the VAE's own (see ``offload.VisitOnCall``)."""
        from .offload import visit_on_call_

        if self.vae is not None:
            device = self.placement["vae"]
            visiting = storage_device("vae", device, self.offload) != device
            visit_on_call_(self.vae, ("decode", "encode"), device if visiting else None)

    # ------------------------------------------------------------------ acceleration
    @_serialized_with_sharers
    def optimize(
        self,
        kernels: str | None = None,
        attention: str | None = None,
        compile: str | None = None,
        cuda_graphs: bool | None = None,
        fp8: bool | None = None,
        compile_backend: str | object = "inductor",
        fp8_fast_accum: bool = True,
        shapes: str = "dynamic",
        graph_mode: str = "step",
        graph_cache_size: int | None = None,
        vae_compile: bool | None = None,
    ) -> list[str]:
        """Apply accelerations to the DiT in place, in the one order of ``accel.optimize`` (kernel
        swaps, fp8, attention backend, torch.compile), then CUDA graphs of the sampling loop.

        Calls are cumulative: ``None`` keeps the current setting, and a transform already applied is
        not applied again. Turning one off again needs a reload. A transform that must come before
        compile (kernels, fp8, the attention backend) asked for on a compiled DiT undoes the
        compilation, applies it and compiles again, so fp8 is always quantised before compile.
        ``shapes`` is the compile shape policy ("dynamic" or "static", ``accel.compile``);
        ``graph_mode`` ("step" or "loop") and ``graph_cache_size`` configure the CUDA graphs
        (``accel.cuda_graphs``). ``vae_compile``: the VAE decode compiled with its weights in
        channels_last (``accel.vae``). Returns the log lines.
        """
        from .accel import blocks_conflict
        from .accel import optimize as optimize_dit
        from .accel.compile import uncompile_
        from .accel.cuda_graphs import DEFAULT_MAX_GRAPHS, GraphedSampler, graphs_problem

        state = self._accel
        wanted = {"kernels": kernels, "attention": attention, "compile": compile, "fp8": fp8,
                  "cuda_graphs": cuda_graphs, "vae_compile": vae_compile}
        changes = {k: v for k, v in wanted.items() if v is not None and v != state[k]}
        for key in ("kernels", "compile", "fp8", "cuda_graphs", "vae_compile"):
            if key in changes and state[key] not in ("none", "off", False):
                raise ValueError(f"{key} is already {state[key]!r}; reload the pipeline to change it")
        problem = (changes.get("cuda_graphs") and graphs_problem(self.device, self.offload)
                   or blocks_conflict(self.offload, changes))
        if problem:
            raise ValueError(problem)
        lines = []
        installed = ("attention" in changes and not changes.keys() & {"kernels", "fp8"}  # (those undo compile anyway)
                     and self._attention_in_place(changes["attention"]))
        if installed:
            # The backend asked for is the one every attention module already runs ("auto" where it
            # picks it, or its name): nothing to swap, so the compiled code and the captured graphs
            # stay (up to 0.20.0 they were undone, compiled again and captured again for the same
            # function). The name is kept (with the other changes, once the call went through):
            # "auto" is chosen again at a move.
            lines.append(f"{installed} (already in place)")
        if changes.get("fp8") and not self.lora_adapters.enabled and self.lora_adapters.active:
            # The zeroed side paths of disabled adapters (_fuse_adapters) go: fp8 makes fp8 GEMMs only
            # of linears without side paths, and no adapter can be enabled after it.
            self._fuse_adapters(silence=False)
        before_compile = not installed and any(k in changes for k in ("kernels", "attention", "fp8"))
        compile_mode = changes.get("compile", "off")
        if "compile" in changes:
            self._compile_options = (compile_backend, shapes)
        if before_compile and state["compile"] != "off":
            uncompile_(self.transformer)  # compile again after the transform, as it was compiled
            if self.controlnet is not None:
                uncompile_(self.controlnet)
            compile_mode = state["compile"]
            compile_backend, shapes = self._compile_options
            lines.append(f"compile: {compile_mode} undone, to apply {sorted(set(changes) & {'kernels', 'attention', 'fp8'})} "
                         "before compiling again")
        transform = dict(kernels=changes.get("kernels", "none"), attention=changes.get("attention", state["attention"]),
                         fp8=bool(changes.get("fp8", False)), compile=compile_mode, compile_backend=compile_backend,
                         fp8_fast_accum=fp8_fast_accum, shapes=shapes)
        if before_compile or compile_mode != "off":
            # The same transforms on the ControlNet branch (built from the DiT's block), if loaded.
            lines += optimize_dit(self.transformer, **transform, fuse=self.offload != "blocks", device=self.device)
            lines += self._transform_controlnet(transform)
        if changes.get("cuda_graphs"):
            size = graph_cache_size or DEFAULT_MAX_GRAPHS
            self._graphed = GraphedSampler(self, mode=graph_mode, max_graphs=size)
            lines.append(f"cuda graphs: {'one graph per step kind' if graph_mode == 'step' else 'the whole loop'}, "
                         f"at most {size} cached (LRU)")
        elif before_compile or "compile" in changes:
            lines += self._drop_graphs("compiled" if "compile" in changes else "changed")
        if changes.get("vae_compile"):
            from .accel.vae import compile_vae_decode_

            lines.append(compile_vae_decode_(self.vae, backend=compile_backend, device=self.placement["vae"]))
            self._vae_compile_backend = compile_backend  # (a VAE assigned later is compiled alike)
            self._fit_vae_hand_calls()  # (the compiled decode replaced the visiting one)
        state.update(changes)
        if before_compile or "compile" in changes or installed:
            lines += self._dit_changed_for_sharers({k: v for k, v in changes.items() if k in self._DIT_SETTINGS},
                                                   None if installed else transform)
        return lines

    def _transform_controlnet(self, transform: dict, whose: str = "") -> list[str]:
        """Apply ``transform`` (``accel.optimize``'s arguments, as optimize applied them to the DiT) to
        the loaded ControlNet branch, if any, on this pipeline's device (with offload="model" its
        weights rest in CPU memory; streamed blocks keep q|k|v and w1|w3 apart); its log lines."""
        from .accel import optimize as optimize_dit

        if self.controlnet is None:
            return []
        applied = optimize_dit(self.controlnet, **transform, fuse=self.offload != "blocks", device=self.device)
        return [f"ControlNet{whose}: {line}" for line in applied]

    #: What optimize() records about the DiT itself (every pipeline holding it shares them).
    _DIT_SETTINGS = ("kernels", "attention", "fp8", "compile")

    def _drop_graphs(self, how: str, whose: str = "") -> list[str]:
        """Drop the captured graphs after the DiT changed (``how``: "compiled", "changed" or "moved"); the
        log line, if any were captured. They hold the old modules (a transform before compile), or replay
        the kernels of the code they were captured from: eager kernels where compile is asked after
        the graphs were on, so the compile bought nothing until the cache turned over."""
        dropped = len(self._graphed.graphs) if self._graphed is not None else 0
        if not dropped:
            return []
        self._graphed.clear()
        return [f"cuda graphs: {dropped} captured graph{'s' if dropped > 1 else ''}{whose} dropped, captured again "
                f"from the {how} DiT at the next requests"]

    def _sharers(self) -> "list[ZImagePipeline]":
        """The other live pipelines holding this pipeline's DiT (:func:`_pipelines_holding`)."""
        return [pipe for pipe in _pipelines_holding(self.transformer) if pipe is not self]

    def _placed(self) -> dict:
        """The modules this pipeline places, by component (a remote text encoder has none)."""
        return {"transformer": self.__dict__.get("_transformer"), "vae": self.__dict__.get("_vae"),
                "text_encoder": getattr(self.__dict__.get("_text_encoder"), "model", None)}

    def _placed_with(self) -> "list[ZImagePipeline]":
        """This pipeline and the live pipelines placed with it (:meth:`_place_holders`): those holding
        one of its components (a DiT, a VAE, a text encoder's model), those holding one of theirs,
        and so on."""
        group = [self]
        for pipe in group:  # (grows while it is read)
            for module in pipe._placed().values():
                group += [other for other in _pipelines_holding(module) if not any(other is p for p in group)]
        return group

    def _dit_changed_for_sharers(self, changes: dict, transform: dict | None) -> list[str]:
        """Every other live pipeline holding this DiT (:meth:`_sharers`; their locks are held,
        :func:`_serialized_with_sharers`) records ``changes``, the transforms optimize() just applied
        to the DiT they share, applies ``transform`` (what optimize applied to the DiT) to its own
        loaded ControlNet, as optimize does to this pipeline's, and drops its captured graphs. Up to
        0.21.0 only the pipeline asked did (``pipe.transformer.compile()`` asks the last one built
        with it): another kept replaying graphs captured from the eager DiT, reported compile "off",
        and its ControlNet stayed eager under a record saying it was compiled. ``transform`` None:
        an attention backend already in place everywhere (:meth:`_attention_in_place`), only its
        name is recorded (the DiT, the ControlNets and the graphs stay)."""
        from .accel.compile import uncompile_

        lines = []
        for other in self._sharers():
            other._accel.update(changes)
            if "compile" in changes:
                other._compile_options = self._compile_options
            if transform is None:
                continue
            if other.controlnet is not None:
                uncompile_(other.controlnet)  # (compiled again by the transform, as the DiT was)
                lines += other._transform_controlnet(transform, " of another pipeline holding this DiT")
            lines += other._drop_graphs("compiled" if "compile" in changes else "changed",
                                        " of another pipeline holding this DiT")
        return lines

    def _attention_in_place(self, name: str) -> str | None:
        """Install backend ``name`` on the DiT and the ControlNet branches of every pipeline holding it
        (checked first, as optimize does); its log line if every attention module kept the function it
        had, else None (then optimize installs it again, undoing and redoing compile and dropping the
        graphs). Each
        backend's function is made once per process (``attention_backends.attention_function``), so
        a backend installed again, by its name or by "auto", counts: up to 0.20.0 FlashAttention,
        Sage and xFormers made a new function at each install and never did.
        Otherwise every module gets its function back: optimize checks the whole call (a compile
        mode, its backend) before it touches the models, and a call that fails there leaves them as
        they were (the new backend installed under the old name, optimize(attention=old) found
        nothing to change and the models kept running the new one)."""
        from .accel.attention_backends import dit_attention_modules, set_attention_backend

        branches = [pipe.controlnet for pipe in (self, *self._sharers())]
        models = [m for m in (self.transformer, *branches) if m is not None]
        modules = [module for m in models for module in dit_attention_modules(m)]
        before = [module.attn_fn for module in modules]
        same = False
        try:
            lines = [set_attention_backend(m, name, self.device) for m in models]
            same = bool(modules) and all(module.attn_fn is fn for module, fn in zip(modules, before))
        finally:
            if not same:  # (also when the install raised half-way)
                for module, fn in zip(modules, before):
                    module.attn_fn = fn
        return lines[0] if same else None

    # ------------------------------------------------------------------ LoRA and the rewriter (collaborators)
    @property
    def loras(self) -> list[LoraReport]:
        """Reports of the LoRAs fused so far (since the last ``unload_lora``)."""
        return list(self.lora_stack.loaded)

    @_serialized_with_sharers
    def load_lora(self, path_or_list, scale=1.0, **options):
        """Fuse LoRA weights into the DiT (:meth:`LoraStack.load`). Captured graphs are kept for a
        LoRA fused into the weights (in place: a graph reads the new values at the same addresses)
        and dropped for one that adds side paths to packed linears (:meth:`_lora_changed_graphs`).
        Refused once fp8 has quantised the DiT's block linears (load LoRAs before fp8)."""
        from .accel.fp8 import lora_problem
        from .quant_linear import lora_generation

        problem = lora_problem(self.transformer)
        if problem:
            raise ValueError(f"load_lora: {problem}")
        before = lora_generation()
        report = self.lora_stack.load(self.transformer, path_or_list, scale, **options)
        self._lora_changed_graphs(before)
        return report

    def _lora_changed_graphs(self, generation: int, requantized: bool = False) -> None:
        """Drop the captured graphs after a LoRA change that replaced what they run: a side path added
        to or cleared from a packed (GGUF, kept fp8) linear (``quant_linear.lora_generation`` moved
        on from ``generation``: new tensors and Python state the graphs never ran), or fp8 linears
        made anew (``requantized``). A LoRA fused into (or unfused from) ordinary weights is written
        into them in place (``lora.fuse_lora_``, ``LoraStack.unload``), so the graphs stay: dropping
        them made every LoRA change (a ``set_adapters`` weight, a load, an unload) capture each graph
        again, with its eager warm-up step."""
        from .quant_linear import lora_generation

        if requantized or lora_generation() != generation:
            for pipe in (self, *self._sharers()):  # (every pipeline holding the DiT: their locks are held)
                if pipe._graphed is not None:
                    pipe._graphed.clear()

    @_serialized_with_sharers
    def load_lora_weights(self, path, adapter_name: str | None = None, hotswap: bool = False, *,
                          weight_name: str | None = None, subfolder: str | None = None, revision: str | None = None,
                          cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                          low_cpu_mem_usage: bool | None = None, **options):
        """diffusers' name, with its positional order (path, adapter_name, hotswap): load a LoRA (a
        file, a folder with ``weight_name`` or one LoRA file in it, a Hub repository id, or a state
        dict) as the adapter ``adapter_name`` (default
        ``default_N``), which becomes the only active one, at weight 1, as in diffusers: an adapter
        loaded before it is unfused until :meth:`set_adapters` names it again. From the Hub only
        ``weight_name`` (else the repository's .safetensors files) is downloaded; a failure raises
        :class:`~zimage_native.hub.HubError`. ``low_cpu_mem_usage`` changes nothing here;
        ``options``: :meth:`LoraStack.load`'s (``strict``, ``undo``, ``undo_device``). Returns the
        new LoRA's report."""
        from .hub import resolve_lora_source

        if not isinstance(hotswap, bool) or str(adapter_name).lower().endswith((".safetensors", ".bin", ".pt")):
            raise TypeError(f"load_lora_weights(path, {adapter_name!r}, {hotswap!r}): the arguments after the path are "
                            f"diffusers' (adapter_name, hotswap); give the file in a folder or repository as "
                            f"weight_name=")
        if hotswap:
            raise ValueError("load_lora_weights(hotswap=True): LoRAs are fused into the weights here; switch with "
                             "set_adapters(), or unload_lora_weights() and load the new one")
        if "token" in options:
            raise ValueError("load_lora_weights(token=...): set HF_TOKEN in the environment (or run `hf auth login`)")
        unknown = sorted(set(options) - {"strict", "undo", "undo_device"})
        if unknown:
            raise TypeError(f"load_lora_weights() got unknown arguments {unknown}; it takes weight_name, adapter_name, "
                            f"subfolder, revision, cache_dir, local_files_only, low_cpu_mem_usage, and load_lora's "
                            f"strict, undo, undo_device")
        self._check_adapters("load_lora_weights")
        source = resolve_lora_source(path, weight_name, subfolder, revision=revision, cache_dir=cache_dir,
                                     local_files_only=local_files_only)
        self._refit_adapters("load_lora_weights", lambda: self.lora_adapters.add(source, adapter_name, options))
        return self.lora_stack.loaded[-1]

    @_serialized_with_sharers
    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """diffusers' ``set_adapters``: the adapters (names given to :meth:`load_lora_weights`) that
        apply, each at its weight (a number, or None for 1); the others are unfused. The active ones
        are fused again at the new weights."""
        self._check_adapters("set_adapters")
        self._refit_adapters("set_adapters", lambda: self.lora_adapters.set(adapter_names, adapter_weights))

    def get_active_adapters(self) -> list[str]:
        """diffusers' name: the adapters that apply now."""
        return list(self.lora_adapters.active) if self.lora_adapters.enabled else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """diffusers' name: the loaded adapters (all on the DiT, ``"transformer"``)."""
        return {"transformer": list(self.lora_adapters.sources)} if self.lora_adapters.sources else {}

    @_serialized_with_sharers
    def disable_lora(self) -> None:
        """diffusers' name: unfuse every adapter (they stay loaded; :meth:`enable_lora` applies them again).
        Their low-rank side paths on packed linears stay, zeroed, so captured graphs stay (:meth:`_fuse_adapters`)."""
        self._check_adapters("disable_lora")
        self._refit_adapters("disable_lora", lambda: setattr(self.lora_adapters, "enabled", False))

    @_serialized_with_sharers
    def enable_lora(self) -> None:
        """diffusers' name: apply the active adapters again after :meth:`disable_lora`."""
        self._check_adapters("enable_lora")
        self._refit_adapters("enable_lora", lambda: setattr(self.lora_adapters, "enabled", True))

    @_serialized_with_sharers
    def delete_adapters(self, adapter_names) -> None:
        """diffusers' name: drop these adapters (unfused if they applied); the others keep their weights.
        Names of no loaded adapter (gone with :meth:`unload_lora_weights`, or never loaded) are passed
        over with a warning, as diffusers passes them over."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = list(self.lora_adapters.sources)
        missing = [name for name in names if name not in loaded]
        if missing:
            logger.warning("delete_adapters: no adapter named %s is loaded (loaded: %s); nothing to delete for %s",
                           missing, loaded or "none", "it" if len(missing) == 1 else "them")
        names = [name for name in names if name in loaded]
        if not names:
            return
        self._check_adapters("delete_adapters")
        self._refit_adapters("delete_adapters", lambda: self.lora_adapters.delete(names))

    def _check_adapters(self, what: str) -> None:
        """The adapter methods refit the fused LoRAs from their sources: refused while ``load_lora``
        has fused LoRAs that no adapter names (they would be lost)."""
        if len(self.lora_stack.loaded) != self.lora_adapters.fused:
            raise ValueError(f"{what}: LoRAs loaded with load_lora() are fused and belong to no adapter; call "
                             f"unload_lora() first, or load every LoRA with load_lora_weights(..., adapter_name=)")
        if self.lora_adapters.merged is not None:  # diffusers' PEFT unmerges for some of these calls, not others
            raise ValueError(f"{what} after fuse_lora(): unload_lora_weights() keeps the fused adapters in the "
                             f"weights, as in diffusers; to change the adapters instead, call unfuse_lora() first")

    def _refit_adapters(self, what: str, change: Callable[[], Any]) -> None:
        """Make ``change`` to the adapters and fuse the active ones again (:meth:`_fuse_adapters`).
        Refused with nothing changed where fp8 would stop the refit part-way (:meth:`_refit_problem`);
        a failure part-way (a LoRA file gone since it was loaded) puts the adapters back as they were
        and fuses them again, and if that fails too, the active adapters are the ones fused: in every
        case ``get_active_adapters()`` names what applies."""
        adapters = self.lora_adapters
        before = adapters.state()
        change()
        problem = self._refit_problem()
        if problem:
            adapters.restore(before)
            raise ValueError(f"{what}: {problem}")
        try:
            self._fuse_adapters()
        except Exception:
            adapters.restore(before)
            try:
                self._fuse_adapters()
            except Exception:
                logger.warning("%s failed, and fusing the adapters as they were failed too: the active adapters are "
                               "the ones fused (%s)", what, adapters.fused)
                adapters.keep_fused()
            raise

    def _refit_problem(self) -> str | None:
        """Why the adapters cannot be fused again now (None if they can): fp8 keeps no weight to
        unfuse a LoRA fused before it from, and allows no LoRA after it (an fp8 file's linears that
        keep a LoRA as a side path become fp8 GEMMs once it is unfused, see :meth:`_requantize_fp8`)."""
        from .accel.fp8 import fp8_applied, lora_problem

        if self.lora_stack.loaded:
            problem = lora_problem(self.transformer, restore=self.lora_stack.originals)
            if problem:
                return problem
        if not self.lora_adapters.to_fuse():
            return None
        problem = lora_problem(self.transformer)
        if problem is None and self.lora_stack.loaded and fp8_applied(self.transformer):
            problem = "fp8 quantised the DiT: once its LoRAs are unfused no LoRA can be fused into it again"
        if problem:
            return (f"{problem}. The adapters cannot be changed after optimize(fp8=True): set them before it, or "
                    f"disable_lora() / unload_lora_weights() to remove them")
        return None

    def _fuse_adapters(self, silence: bool | None = None) -> None:
        """Unfuse every LoRA (exactly), then fuse the active adapters at their weights. The copies of
        the original weights are reused, not made again (``LoraStack.unload(keep=True)``), and side
        paths of packed linears that come back with the same structure (layers, rank buckets,
        kinds) are written into their tensors in place: the captured graphs stay, as for fused
        weights; a change of structure drops them (:meth:`_lora_changed_graphs`).

        ``silence`` (by default: while the adapters are disabled, some are active, and fp8 has not
        quantised the DiT, after which they could not be enabled again): the low-rank and Kronecker
        side paths of the adapters stay, with zero factors (``PackedLinear.end_refit``), so
        ``disable_lora`` / ``enable_lora`` keep the graphs."""
        from .accel.fp8 import fp8_applied
        from .quant_linear import lora_generation

        if silence is None:
            adapters = self.lora_adapters
            silence = not adapters.enabled and bool(adapters.active) and not fp8_applied(self.transformer)
        before = lora_generation()
        try:
            self._unfuse_loras(keep=True)
            self.lora_adapters.fused = 0
            self.lora_stack.files = self.lora_adapters.files  # each file read once (lora.LoraFiles)
            if not silence:  # (kept dense deltas that nothing writes into go before new ones are made)
                self.lora_stack.release_unwritten(self.transformer, [s for s, _, _ in self.lora_adapters.to_fuse()])
            for source, weight, options in self.lora_adapters.to_fuse():
                self.load_lora(source, weight, **options)
                self.lora_adapters.fused += 1
        finally:
            self.lora_stack.files = None
            self.lora_adapters.keep_files()
            self.lora_stack.end_refit(self.transformer, silence)
            self._lora_changed_graphs(before)

    @_serialized_with_sharers
    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None,
                  **ignored) -> None:
        """diffusers' name. LoRAs are fused when loaded here; as in diffusers, the active adapters (or
        ``adapter_names``) are marked merged, and a following :meth:`unload_lora_weights` keeps them in
        the weights (diffusers' recipe to bake a LoRA in). ``lora_scale`` multiplies the weights of the
        active adapters, as diffusers' does (it stays after :meth:`unfuse_lora`; the adapters are
        fused again at the new weights); with ``adapter_names`` naming only some of them it is refused
        (diffusers then gives neither weight), and so is it for LoRAs of ``load_lora`` (no adapter).
        The arguments are in diffusers' order; ``components`` (the LoRAs are the DiT's: without
        ``"transformer"`` nothing is marked) and ``safe_fusing`` change nothing else here."""
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real) or not math.isfinite(lora_scale):
            raise ValueError(f"fuse_lora(lora_scale={lora_scale!r}): the scale must be a finite number such as 0.8")
        if components is not None and "transformer" not in components:
            return
        adapters = self.lora_adapters
        if lora_scale != 1.0 and (adapters.sources or self.lora_stack.loaded):
            if not adapters.sources:
                raise ValueError(f"fuse_lora(lora_scale={lora_scale}): the LoRAs of load_lora() are fused at their "
                                 f"scale and belong to no adapter; unload_lora() and load_lora(path, "
                                 f"scale={lora_scale}), or load them with load_lora_weights()")
            if adapters.merged is not None:
                raise ValueError(f"fuse_lora(lora_scale={lora_scale}) after fuse_lora(): diffusers keeps the weights "
                                 f"fused at the first scale but multiplies the adapters' scale again, so a later "
                                 f"unfuse_lora() leaves part of the LoRA in the weights (0.7 - 0.49 for two "
                                 f"fuse_lora(lora_scale=0.7)); call unfuse_lora() first, or set_adapters(names, "
                                 f"adapter_weights=...) for the weights wanted")
            self._check_adapters("fuse_lora")
            if adapter_names is not None and set(adapters.names(adapter_names, "fuse_lora()")) != set(adapters.active):
                raise ValueError(f"fuse_lora(lora_scale={lora_scale}, adapter_names={adapter_names!r}): the scale "
                                 f"applies to every active adapter ({list(adapters.active)}); set their weights with "
                                 f"set_adapters(names, adapter_weights=...) and call fuse_lora(adapter_names=...)")
            scaled = {name: weight * lora_scale for name, weight in adapters.active.items()}
            self._refit_adapters("fuse_lora", lambda: setattr(adapters, "active", scaled))
        adapters.merge(adapter_names)

    def unfuse_lora(self, components=None, **ignored) -> None:
        """diffusers' name. There, the LoRA still applies after it (unfused, through its adapter
        layers); here it stays fused: the same images. It takes back :meth:`fuse_lora`'s mark, so
        :meth:`unload_lora_weights` removes the adapters again. To remove them now: :meth:`disable_lora`
        or :meth:`unload_lora_weights`."""
        self.lora_adapters.merged = None

    @_serialized_with_sharers
    def unload_lora_weights(self) -> int:
        """diffusers' name: remove the adapters. After :meth:`fuse_lora` the adapters it merged stay in
        the weights, as in diffusers (they belong to no adapter then, and later adapters go on top;
        :meth:`unload_lora` restores the original weights). Otherwise, as :meth:`unload_lora`, except
        that LoRAs kept so before stay. Returns the LoRAs unfused."""
        adapters = self.lora_adapters
        if not adapters.baked and adapters.merged is None:
            return self.unload_lora()
        if len(self.lora_stack.loaded) != adapters.fused:  # load_lora's LoRAs too: unload_lora takes them all
            return self.unload_lora()
        before = len(adapters.to_fuse())
        if adapters.enabled and adapters.merged == adapters.active:  # every fused adapter is kept: no refit
            adapters.bake()
            adapters.keep_files()  # (the forgotten adapters' files, as a refit would)
        else:
            self._refit_adapters("unload_lora_weights", adapters.bake)
        return before - len(adapters.to_fuse())

    @property
    def guidance_scale(self) -> float | None:
        """diffusers' run state: the guidance scale of the current (or last) call. A
        ``callback_on_step_end`` may set ``pipe._guidance_scale`` for the later steps, as in diffusers
        (0 turns CFG off; turning it on in a run started without CFG is refused)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers' run state: whether the current (or last) call guides (``guidance_scale > 0``)."""
        return bool(self._guidance_scale)

    @property
    def num_timesteps(self) -> int | None:
        """diffusers' run state: the steps the current (or last) call runs (img2img: after ``strength``)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """diffusers' flag: set ``pipe._interrupt = True`` in ``callback_on_step_end`` to stop the run
        after that step (the image is decoded from the latents so far); reset at each call."""
        return self._interrupt

    @_serialized_with_sharers
    def unload_lora(self) -> int:
        """Restore the DiT's weights exactly (:meth:`LoraStack.unload`) and forget the adapters;
        captured graphs are dropped. Refused for a LoRA fused before fp8 quantised the DiT's block
        linears (reload instead)."""
        restored = self._unfuse_loras()
        self.lora_adapters.clear()
        return restored

    def _unfuse_loras(self, keep: bool = False) -> int:
        from .accel.fp8 import lora_problem
        from .quant_linear import lora_generation

        problem = lora_problem(self.transformer, restore=self.lora_stack.originals)
        if problem:
            raise ValueError(f"unload_lora: {problem}")
        before = lora_generation()
        restored = self.lora_stack.unload(self.transformer, keep)
        self._lora_changed_graphs(before, requantized=self._requantize_fp8())
        return restored

    def _requantize_fp8(self) -> bool:
        """After an unload: the fp8 file's linears that fp8 left weight-only for their LoRA side paths
        become fp8 GEMMs as the others did (``accel.fp8.requantize_fp8_``); a compiled DiT is
        compiled again around them, as it was. Returns whether any linear was made anew."""
        from .accel.compile import compile_transformer_, compiled_mode, uncompile_
        from .accel.fp8 import fp8_waiting, requantize_fp8_

        if not fp8_waiting(self.transformer):
            return False
        compiled = compiled_mode(self.transformer)
        if compiled:
            uncompile_(self.transformer)
        logger.info("%s", requantize_fp8_(self.transformer))
        if compiled:
            logger.info("%s", compile_transformer_(self.transformer, compiled[0], self._compile_options[0], compiled[1]))
        return True

    @_serialized
    def rewrite(self, prompt: str, *args, **kwargs) -> str:
        """Expand a prompt with the Qwen3 weights or a chat server (:meth:`Rewriter.rewrite`); with a
        remote text encoder and no ``llm_url``, the remote server rewrites."""
        if getattr(self.text_encoder, "model", None) is None and kwargs.get("llm_url") is None:
            return self.text_encoder.rewrite(prompt, *args, **kwargs)
        return self.prompt_rewriter.rewrite(prompt, *args, **kwargs)

    @_serialized
    def load_rewriter(self):
        """The rewriter LM, loaded on first use (:meth:`Rewriter.load`)."""
        return self.prompt_rewriter.load()

    @_serialized
    def unload_rewriter(self) -> None:
        self.prompt_rewriter.unload()

    @property
    def _rewriter_lm(self):
        return self.prompt_rewriter.lm

    def enable_vae_tiling(self, tile_size: int = 512, overlap: int = 64) -> None:
        """Decode (and encode) through the VAE in overlapping tiles; for 2K+ images."""
        self.vae_tiling = TileConfig(tile_size, overlap)

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    # ------------------------------------------------------------------ stages
    def format_prompts(self, prompts: list[str], template=None, **fields) -> list[str]:
        """The chat text for each prompt: template fields, overridden by explicit non-None fields."""
        template = self._template(template)
        if template is not None:
            merged = template.prompt_fields(**fields)
        else:
            merged = {k: v for k, v in fields.items() if v is not None}
        return [format_prompt(p, **merged) for p in prompts]

    @_serialized
    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | list[str], max_sequence_length: int = 512, template=None, **fields
    ) -> list[torch.Tensor]:
        """Chat-format and encode prompts (a string is one prompt): ONE list of (L_i, cap_feat_dim)
        features on the DiT device, not diffusers' (prompt_embeds, negative_prompt_embeds) pair;
        ``fields``: the chat format's parts (``system_prompt``, ...)."""
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, numbers.Integral):
            raise TypeError(f"encode_prompt(prompt, {max_sequence_length!r}, ...): the arguments here are (prompt, "
                            f"max_sequence_length=512, template=None), not diffusers' (prompt, device, "
                            f"do_classifier_free_guidance, negative_prompt): it returns one list of features per "
                            f"prompt, on the pipeline's device; for diffusers' pair use pipe.encode_prompt(prompts), "
                            f"pipe.encode_prompt(negative_prompts or [''] * len(prompts))")
        unknown = set(fields) - set(sampling.PROMPT_FIELDS)
        if unknown & DIFFUSERS_ENCODE_OPTIONS:
            raise TypeError(f"encode_prompt() takes no {sorted(unknown & DIFFUSERS_ENCODE_OPTIONS)}: it returns one "
                            f"list of features per prompt, on the pipeline's device; for diffusers' pair use "
                            f"pipe.encode_prompt(prompts), pipe.encode_prompt(negative_prompts or [''] * len(prompts))")
        if unknown:
            raise TypeError(f"encode_prompt() got unknown arguments {sorted(unknown)}; the chat format's parts are "
                            f"{list(sampling.PROMPT_FIELDS)}")
        from .prompt.request import check_image_template

        check_image_template(self._template(template))  # features for an image, as generate's
        prompts = [prompt] if isinstance(prompt, str) else prompt
        return self.encode_texts(self.format_prompts(prompts, template, **fields), max_sequence_length)

    @_serialized
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents (B, 16, h, w) -> images (B, 3, f*h, f*w) in [0, 1] (f: ``vae_scale_factor``)."""
        with self._running("vae") as device:
            dtype = next(self.vae.parameters()).dtype
            # Contiguous, as encode_image's pixels: channels_last latents (a caller's ``latents=``, which
            # the step loop keeps in their layout) reached the decoder's GroupNorms channels_last, and
            # the images moved with the CPU thread count (docs/numerics.md).
            z = latents.to(device, dtype).contiguous()
            z = z / self.vae_config.scaling_factor + (self.vae_config.shift_factor or 0.0)  # in the VAE dtype

            def decode(z):
                if self.vae_tiling is not None:
                    return tiled_decode(self.vae, z, self.vae_tiling, self.vae_config.scale_factor).to(dtype)
                return self.vae.decode(z, return_dict=False)[0]

            image = torch.cat([decode(one) for one in z.split(1)]) if self.vae_slicing else decode(z)
            return (image * 0.5 + 0.5).clamp(0, 1)

    @_serialized
    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generators: list[torch.Generator] | None,
                     dtype: torch.dtype | None = None, spread: Callable | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents: a posterior *sample* (one draw per
        generator), or with ``generators=None`` the posterior *mode* (the mean: no draw), as
        diffusers' ControlNet pipelines encode their control and masked images. ``spread`` maps the
        posterior of each input image to the batch before the draw (one image encoded once, one draw
        per output)."""
        with self._running("vae") as device:
            vae_dtype = next(self.vae.parameters()).dtype
            # Contiguous (B, 3, H, W): pixels from PIL or arrays are an NHWC array seen as NCHW
            # (channels_last strides), and torch's CPU GroupNorm on channels_last sums the pixels and
            # their squares (far less exact than the contiguous kernel), by thread from H*W >= 1024, so
            # the latents moved with the thread count too (docs/numerics.md).
            x = image.to(device, dtype or image.dtype).to(vae_dtype).contiguous()

            def encode(x):
                if self.vae_tiling is not None:
                    return tuple(t.to(vae_dtype) for t in tiled_encode(self.vae, x, self.vae_tiling,
                                                                      self.vae_config.scale_factor))
                return self.vae.encode(x)

            if self.vae_slicing:
                mean, logvar = (torch.cat(parts) for parts in zip(*(encode(one) for one in x.split(1))))
            else:
                mean, logvar = encode(x)
            if spread is not None:
                mean, logvar = spread(mean), spread(logvar)
            if generators is None:
                z = mean
            else:
                eps = _randn(mean.shape, generators, vae_dtype).to(device)
                z = mean + torch.exp(0.5 * logvar) * eps
            shift = self.vae_config.shift_factor or 0.0
            return ((z - shift) * self.vae_config.scaling_factor).to(self.device)

    @_serialized
    @torch.no_grad()
    def encode_texts(self, texts: list[str], max_sequence_length: int = 512) -> list[torch.Tensor]:
        """Encode already formatted texts in one text-encoder batch; features on the DiT device. Texts
        in ``prompt_cache`` are not encoded again, and when all are, the encoder does not run (nor,
        offloaded, visit its device)."""
        def run(missing):
            with self._running("text_encoder"):
                return self.text_encoder.encode(missing, max_sequence_length)

        features = self.prompt_cache.encode(self.text_encoder, texts, max_sequence_length, run)
        return [f.to(self.device) for f in features]

    # ------------------------------------------------------------------ the sampling core (see sampling.py)
    @_serialized_run
    def denoise(self, latents, prompt_embeds, negative_embeds, schedule: Schedule, guidance_scale=0.0,
                cfg_normalization=False, cfg_truncation=1.0, progress=True, start=0, callback=None, **hooks):
        """Run the step loop from ``latents`` at schedule step ``start`` (:func:`sampling.denoise`)."""
        return sampling.denoise(self, latents, prompt_embeds, negative_embeds, schedule, guidance_scale,
                                cfg_normalization, cfg_truncation, progress, start, callback, **hooks)

    @_serialized_run  # (it runs the DiT's caption-refiner blocks)
    def plan(self, *args, **kwargs) -> SamplingPlan:
        """The step loop's static inputs for one request (:func:`sampling.plan`)."""
        return sampling.plan(self, *args, **kwargs)

    @_serialized_run
    def run_steps(self, latents: torch.Tensor, plan: SamplingPlan, progress: bool = False, callback=None,
                  on_step_end=None, info=None, interruptible: bool = True) -> torch.Tensor:
        """The step loop (:func:`sampling.run_steps`); what the graphed sampler captures."""
        return sampling.run_steps(self, latents, plan, progress, callback, on_step_end, info, interruptible)

    def _template(self, template):
        from .prompt.templates import Template

        if template is None or isinstance(template, Template):
            return template
        if not isinstance(template, str):  # (else "'int' object has no attribute 'prompt_fields'")
            raise TypeError(f"template must be a template's name (zimage templates list) or a Template, got "
                            f"{type(template).__name__}")
        return self.template_registry.get(template)

    # ------------------------------------------------------------------ requests
    @_serialized_run
    def generate(self, request: GenerationRequest, **run) -> ZImageOutput:
        """Run one :class:`GenerationRequest` (any task); ``run``: ``progress``, ``callback``,
        ``callback_on_step_end``, ``callback_on_step_end_tensor_inputs`` (:func:`sampling.generate`)."""
        from .prompt.request import check_image_template

        check_image_template(self._template(request.template))
        return sampling.generate(self, request, **run)

    def _call(self, prompt, *, seed, num_inference_steps, fields, progress, callback, callback_on_step_end,
              callback_on_step_end_tensor_inputs, **kw) -> ZImageOutput:
        if isinstance(seed, (np.ndarray, torch.Tensor)):  # seeds drawn with numpy or torch (0-d: one seed)
            seed = seed.tolist()  # Python numbers: a float array is refused as floats are
        seeds = None if seed is None else list(seed) if isinstance(seed, (list, tuple)) else [seed]
        request = GenerationRequest(prompt=prompt, seeds=seeds, steps=num_inference_steps,
                                    fields={k: v for k, v in fields.items() if v is not None}, **kw)
        return self.generate(request, progress=progress, callback=callback, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs
                             if isinstance(callback_on_step_end_tensor_inputs, str)  # refused by name in generate
                             else tuple(callback_on_step_end_tensor_inputs))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,  # diffusers' positional order is (prompt, height, width, ...): keywords only, nothing swapped
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = None,
        output_type: str = "pil",
        sigmas: list[float] | None = None,
        cfg_normalization: float | bool = False,
        cfg_truncation: float | None = 1.0,
        max_sequence_length: int = 512,
        template: str | Any | None = None,
        system_prompt: str | None = None,
        thinking_content: str | None = None,
        assistant_content: str | None = None,
        force_think_block: bool | None = None,
        strip_quotes: bool | None = None,
        progress: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
        shift: float | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        image=None,
        strength: float | None = None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | None = None,
        seed_variance: float = 0.0,
        seed_variance_share: float | None = None,
        seed_variance_steps: float | None = None,
        first_block_cache: float = 0.0,
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> ZImageOutput | tuple:
        """Generate images (every argument after ``prompt`` by keyword). ``return_dict=False`` returns
        ``(images,)`` as diffusers does. Unset ``width``/``height``/``num_inference_steps``/``guidance_scale`` come
        from the template's suggested settings, then from the variant (Turbo: 8 steps, guidance 0;
        base: 50 steps, guidance 4). ``seed`` may be a list with one seed per image (unset,
        ``num_images_per_prompt`` is then the seeds per prompt; else 1).

        ``output_type``: "pil" | "np" | "pt" | "latent". ``prompt_embeds`` /
        ``negative_prompt_embeds``: lists of (tokens, features) tensors instead of prompts.
        ``callback(step, total)`` after each step; ``callback_on_step_end(pipe, i, t, tensors)`` as
        in diffusers (may return new ``latents``). ``shift`` replaces the scheduler's shift.
        ``image`` (+ ``strength``), ``mask_image``, ``control_image`` select img2img, inpainting or
        ControlNet as :meth:`img2img` / :meth:`inpaint` do.

        ``control_image`` (with a ControlNet loaded, :meth:`load_controlnet`): a pose / depth / edge
        image that steers the layout, as diffusers' ``ZImageControlNetPipeline``; its hints are
        weighted by ``controlnet_conditioning_scale`` (default None: 0.75 with a control image; refused
        without one, where it would change nothing). An unset size comes from the control image.

        ``seed_variance`` > 0 (Turbo, whose images change little with the seed; 15 to 30 is a usual
        range): for the first ``seed_variance_steps`` of the schedule the prompt features carry
        seeded noise, uniform in [-seed_variance, seed_variance] on ``seed_variance_share`` of their
        values (:func:`sampling.vary`), so seeds give more different compositions; the later steps
        see the prompt as it is. Unset, the share is 0.5 and the steps 0.2; either without
        ``seed_variance`` is refused (it would change nothing).

        ``first_block_cache`` > 0 (a threshold, 0.05 to 0.2 is a usual range; lossy): on a step where
        the first main layer's residual changed by at most this fraction since the last full step,
        the other main layers are skipped and their residual of that step is reused
        (``accel.block_cache``). Most useful with many steps (the base model's 50 with CFG). Not with
        CUDA graphs or ``compile="full"``. ``output.info["first_block_cache_forwards"]`` counts the
        forwards run in full and reused.

        ``masked_image_latents`` (inpainting): accepted and ignored with a warning, as diffusers'
        ``ZImageInpaintPipeline`` effectively ignores it (the same images either way).

        ``joint_attention_kwargs``: diffusers' per-call LoRA scale (``{"scale": s}``: a number or a
        0-d real tensor), the only key diffusers' Z-Image reads. LoRAs are fused here, so with one
        loaded a scale other than 1 is refused (set it with :meth:`set_adapters` or
        ``load_lora(path, scale=)``); without one it changes nothing, as in diffusers.
        """
        self._check_attention_kwargs(joint_attention_kwargs)
        if masked_image_latents is not None:
            if mask_image is None:
                raise ValueError("masked_image_latents= belongs to inpainting (diffusers' ZImageInpaintPipeline), and "
                                 "there it changes nothing; give image= and mask_image= (pipe.inpaint)")
            logger.warning("masked_image_latents= is ignored, as diffusers' Z-Image inpainting ignores it (it "
                           "encodes image= either way and never reads them): the kept area comes from image= "
                           "and mask_image=")
        out = self._call(prompt, width=width, height=height, num_inference_steps=num_inference_steps, seed=seed,
                         generator=generator, latents=latents, guidance_scale=guidance_scale,
                         negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                         output_type=output_type, sigmas=sigmas, cfg_normalization=cfg_normalization,
                         cfg_truncation=cfg_truncation, max_sequence_length=max_sequence_length, template=template,
                         fields=dict(system_prompt=system_prompt, thinking_content=thinking_content,
                                     assistant_content=assistant_content, force_think_block=force_think_block,
                                     strip_quotes=strip_quotes),
                         progress=progress, callback=callback, shift=shift, prompt_embeds=prompt_embeds,
                         negative_prompt_embeds=negative_prompt_embeds, callback_on_step_end=callback_on_step_end,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, image=image,
                         strength=strength, mask_image=mask_image, control_image=control_image,
                         control_scale=controlnet_conditioning_scale, seed_variance=seed_variance,
                         seed_variance_share=seed_variance_share, seed_variance_steps=seed_variance_steps,
                         first_block_cache=first_block_cache)
        return out if return_dict else out.to_tuple()

    def _check_attention_kwargs(self, kwargs) -> None:
        if kwargs is None:
            return
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"joint_attention_kwargs must be a dict such as {{'scale': 0.8}}, got {type(kwargs).__name__}")
        other = sorted(set(kwargs) - {"scale"})
        if other:
            raise ValueError(f"joint_attention_kwargs: {other} have no meaning here; only 'scale' (diffusers' per-call "
                             f"LoRA scale) is read, and diffusers' Z-Image reads nothing else either")
        scale = kwargs.get("scale", 1.0)
        if (isinstance(scale, torch.Tensor) and scale.ndim == 0 and scale.device.type != "meta"
                and not scale.dtype.is_complex and scale.dtype != torch.bool):
            scale = scale.item()  # a 0-d tensor, as some diffusers scripts pass
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"joint_attention_kwargs={{'scale': {scale!r}}}: the LoRA scale must be a finite number "
                             f"such as 0.8 (1.0, or no joint_attention_kwargs, applies the LoRAs as loaded)")
        if scale != 1.0 and self.lora_stack.loaded:
            raise ValueError(f"joint_attention_kwargs={{'scale': {scale}}}: LoRAs are fused into the weights here, so "
                             f"a per-call LoRA scale cannot apply; set it before the call with "
                             f"pipe.set_adapters(names, adapter_weights=...) (adapters of load_lora_weights) or "
                             f"unload_lora() and load_lora(path, scale=...)")

    def img2img(self, prompt: str | list[str] | None, image, strength: float = 0.6, **kwargs) -> ZImageOutput:
        """Image-to-image: start from ``image`` (PIL, numpy (H, W, C) in [0, 1], torch (B, C, H, W) in
        [0, 1], or a list) noised to ``strength``. The image is resized down to multiples of 16 (or to
        ``width`` x ``height`` when given); ``strength`` 1 starts from pure noise, 0.6 runs the last 60%
        of the schedule. Other arguments as for ``__call__``."""
        if image is None:
            raise ValueError("img2img needs image=")
        return self(prompt, image=image, strength=strength, **kwargs)

    def inpaint(self, prompt: str | list[str] | None, image, mask_image, strength: float = 1.0,
                **kwargs) -> ZImageOutput:
        """Inpainting, as diffusers' ``ZImageInpaintPipeline``: repaint where ``mask_image`` is white
        (>= 0.5 after resizing), keep ``image`` where it is black. After every step the kept area is
        reset to the image's latents noised to the current level. ``strength`` as for img2img (1:
        the repainted area starts from pure noise). Other arguments as for ``__call__``.

        With ``control_image`` (and a 2.x ControlNet loaded), ControlNet inpainting as diffusers'
        ``ZImageControlNetInpaintPipeline``: from pure noise, no ``strength`` (leave it at 1), no
        per-step blend; the image and mask reach the model through the control context."""
        if image is None or mask_image is None:
            raise ValueError("inpaint needs image= and mask_image=")
        return self(prompt, image=image, mask_image=mask_image, strength=strength, **kwargs)
