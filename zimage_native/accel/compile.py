"""torch.compile presets for the DiT, with the shape policy of docs/performance.md.

- ``off``: eager.
- ``blocks``: regional compilation. One compiled function runs every transformer block (noise
  refiner, context refiner, main): all blocks share one code object, so dynamo keeps one graph per
  *shape class* of a block call instead of tracing 34 blocks: a short cold start.
- ``full``: the whole per-step forward (``forward_tokens``) as one graph (``fullgraph=True``) and
  the caption path (``encode_caption``) as another. Longest cold start, fewest launches.

The ControlNet branch (``model/controlnet.py``) is compiled by the same function: its blocks are
DiT blocks, so ``blocks`` runs them through the same compiled code; ``full`` compiles its per-step
``step`` as one graph.

Shape policy (``shapes=``):

- ``"dynamic"`` (default): the sequence dimension of every block input (tokens, RoPE tables, key
  mask) is marked dynamic before dynamo sees it, so one graph serves every caption length (each
  a multiple of 32) and every resolution. A block's shape class is then (modulated or not, batch,
  masked or not, dtype, device): at most 4 per batch size on one device. LoRA side paths on packed
  (GGUF, kept fp8) linears, added after compiling, are part of the class too (dynamo guards their
  ranks and kinds): each new rank bucket (``quant_linear.rank_bucket``: the rank padded with zeros
  to a power of two from 16 up) or kind loaded is one more class.
- ``"static"``: every sequence length is its own graph, compiled lazily the first time it occurs
  (up to 16 caption classes per resolution, batch and block kind).

The engine sets dynamo's recompile limit explicitly (:func:`recompile_limit_for`) to cover the
classes it can produce, and :class:`ShapeClasses` logs a warning naming the shape whenever a call
would exceed it (dynamo would then run that block eagerly). Dynamo keeps its graphs, and counts
the limit, per code object, and the code objects are shared process-wide (every DiT's and every
ControlNet branch's blocks run ``_block_forward``; every DiT's ``forward_tokens``), so the classes
are counted per code object too (:func:`shape_classes`), with the block's type in the key: a
ControlNet block is another class for dynamo (its type guard). The measurement behind the
default is in docs/performance.md ("Shape policy").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..process_local import ProcessLocal

logger = logging.getLogger(__name__)

#: Why a compiled DiT is not pickled, and what to do.
PICKLE_REFUSAL = ("cannot pickle a compiled DiT (optimize(compile=...)): its compiled functions belong to this process. "
                  "Save its weights instead (torch.save(pipe.transformer.state_dict(), PATH), or safetensors' "
                  "save_file) and load them into a new DiT, or pickle it before optimize(compile=...); "
                  "copy.deepcopy copies a compiled DiT")

COMPILE_MODES = ("off", "blocks", "full")
SHAPE_POLICIES = ("dynamic", "static")

# Shape classes the engine can produce, per batch size and resolution (see CompiledBlock): block
# variants = the DiT's (modulated, unmodulated) x (unmasked, masked), and a ControlNet's blocks
# (with before_proj, without: some PyTorch versions guard the submodule count) x (unmasked, masked);
# caption classes = 512 / 32.
BLOCK_VARIANTS = 4 + 4
CAPTION_CLASSES = 16
BATCH_CLASSES = 8  # distinct batch sizes a process is expected to serve before a warning
RESOLUTIONS = 4  # distinct resolutions (static policy only)


def recompile_limit_for(shapes: str) -> int:
    """The dynamo recompile limit for the shape classes the engine can produce under ``shapes``."""
    if shapes == "dynamic":
        return BLOCK_VARIANTS * BATCH_CLASSES
    dit = (1 + 2 * CAPTION_CLASSES) * 2  # noise refiner + (context refiner, main) x caption classes, x masks
    controlnet = (1 + CAPTION_CLASSES) * 2 * 2  # its refiner + its layers x caption classes, x masks, x before_proj
    return (dit + controlnet) * BATCH_CLASSES * RESOLUTIONS


def _dynamo_config():
    import torch._dynamo.config as config

    return config


def recompile_limit_name() -> str:
    """The name of dynamo's per-code-object recompile limit (``cache_size_limit`` in torch 2.6)."""
    return "recompile_limit" if hasattr(_dynamo_config(), "recompile_limit") else "cache_size_limit"


def set_recompile_limit(limit: int) -> int:
    """Raise dynamo's per-code-object recompile limit to at least ``limit``; returns the value set."""
    config = _dynamo_config()
    name = recompile_limit_name()
    value = max(int(getattr(config, name)), limit)
    setattr(config, name, value)
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * value)
    return value


class ShapeClasses:
    """The shape classes seen by one compiled code object; warns (once per class) past the limit.
    ``code`` (the code object, if given): a new class is counted against the limit by the graphs
    dynamo holds for it (its own count for the limit), not by the classes seen, which outlive a
    ``torch._dynamo.reset()``; once dynamo holds no graph, the classes seen before are forgotten.
    Only a new class asks dynamo: a class seen before a reset and run again after it is not noted
    again (its graph still counts)."""

    def __init__(self, what: str, limit: int, code=None):
        self.what = what
        self.limit = limit
        self.code = code
        self.seen: dict[tuple, None] = {}
        self.warned: set[tuple] = set()

    def __deepcopy__(self, memo: dict) -> "ShapeClasses":
        # Process-wide, as dynamo's graphs for the code object are: a copied DiT (copy.deepcopy of
        # it or of its pipeline) runs the same graphs, so it shares the classes seen with the original.
        return self

    def note(self, key: tuple, describe) -> None:
        if key in self.seen:
            return
        held = None if self.code is None else _dynamo_graphs(self.code)
        if self.seen and held == 0:
            self.seen.clear()
        count = len(self.seen) if held is None else held
        if count >= self.limit and key not in self.warned:
            self.warned.add(key)
            logger.warning("torch.compile: %s gets a new shape class %s, number %d for one code object, past the "
                           "recompile limit %d: dynamo runs it eagerly (slow). Serve fewer shapes or raise the "
                           "limit (accel.compile.set_recompile_limit)", self.what, describe(), count + 1, self.limit)
            return
        self.seen[key] = None
        # A new class is a new graph: its first call pays the compile (Inductor: 30-90 s on the CPU of
        # docs/performance.md's shape-policy table), which a server's first request of a new batch size or
        # caption mix paid without a line (dynamo logs nothing at default levels).
        logger.info("torch.compile: %s gets a new shape class %s: compiled on this call (%d of the recompile "
                    "limit %d)", self.what, describe(), count + 1, self.limit)


def _dynamo_graphs(code) -> int | None:
    """How many graphs dynamo holds for ``code`` (None where this PyTorch does not say)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(code))
    except Exception:  # a private helper: absent or changed in some PyTorch
        return None


_CLASSES: dict[str, ShapeClasses] = {}


def shape_classes(name: str, what: str, limit: int, code=None) -> ShapeClasses:
    """The process-wide :class:`ShapeClasses` of one compiled code object (``name``), with its limit
    raised to ``limit``: every model compiled with that code object shares it, as dynamo does."""
    classes = _CLASSES.setdefault(name, ShapeClasses(what, limit, code))
    classes.limit = max(classes.limit, limit)
    return classes


def _mark_sequence_dynamic(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.ndim >= 2:
            torch._dynamo.maybe_mark_dynamic(t, 1)


class CompiledBlock(ProcessLocal):
    """A block's ``forward``: notes its shape class, marks the sequence dim dynamic (under the dynamic
    policy), and calls the one compiled function shared by all blocks."""

    pickle_refusal = PICKLE_REFUSAL

    def __init__(self, block: nn.Module, compiled, classes: ShapeClasses, dynamic: bool):
        self.block = block
        self.compiled = compiled
        self.classes = classes
        self.dynamic = dynamic
        # What dynamo guards about the block itself: its type and its submodules (a ControlNet chain's
        # first block has a before_proj, the others none; torch 2.6 guards the count).
        self.kind = type(block).__name__
        self.structure = (self.kind, tuple(block._modules))
        self.packed = _packed_linears(block)
        self.sides = SidePathCache(self.packed)

    def __call__(self, x, rope, mask, c=None, mod=None):
        modulated = mod is not None or c is not None
        seq = None if self.dynamic else x.shape[1]
        kind = self.kind
        sides = self.sides()
        key = (self.structure, modulated, x.shape[0], seq, mask is not None, x.dtype, x.device, sides)
        self.classes.note(key, lambda: (f"({kind} {'modulated' if modulated else 'unmodulated'}, batch {x.shape[0]}, "
                                        f"sequence {x.shape[1]}, {'masked' if mask is not None else 'no mask'}, "
                                        f"{str(x.dtype).removeprefix('torch.')}, {x.device}"
                                        f"{_describe_sides(sides)})"))
        if self.dynamic:
            _mark_sequence_dynamic(x, *rope, mask)
        return self.compiled(self.block, x, rope, mask, c, mod)


def _packed_linears(model: nn.Module) -> list[nn.Module]:
    from ..quant_linear import PackedLinear

    return [m for m in model.modules() if isinstance(m, PackedLinear)]


def _method_packed(model: nn.Module, name: str) -> list[nn.Module]:
    """The packed linears a ``full`` method's graph runs: the caption path's for ``encode_caption``,
    the others for ``forward_tokens`` (the branch's ``step``: all of its)."""
    caption = ([*_packed_linears(model.cap_embedder), *_packed_linears(model.context_refiner)]
               if name in ("encode_caption", "forward_tokens") else [])
    if name == "encode_caption":
        return caption
    return [m for m in _packed_linears(model) if all(m is not c for c in caption)]


def side_path_structure(packed: list[nn.Module]) -> tuple:
    """What dynamo guards about the LoRA side paths of packed (GGUF, kept fp8) linears, which a
    ``load_lora`` adds after compiling and ``unload_lora`` removes: per layer, each side path's
    factor shapes (the rank bucket) and kind (the scale is in the factors). Every new combination
    is a new graph."""
    return tuple(tuple((tuple(getattr(m, a).shape), None if b is None else tuple(getattr(m, b).shape), k)
                       for a, b, k in m.lora) for m in packed)


class SidePathCache:
    """:func:`side_path_structure` of a fixed list of packed linears, computed again only after a
    side path was added or cleared somewhere (``quant_linear.lora_generation``): every
    ``load_lora`` / ``unload_lora`` goes through ``add_lora`` / ``clear_lora``. Walking every
    layer's side paths on each compiled call cost about 1.4 ms of host time per DiT forward with a
    LoRA on the 270 packed block linears of a 30-layer DiT (docs/performance.md)."""

    def __init__(self, packed: list[nn.Module]):
        from ..quant_linear import lora_generation

        self.packed = packed
        self.current = lora_generation
        self.generation: int | None = None
        self.value: tuple = ()

    def __call__(self) -> tuple:
        generation = self.current()
        if generation != self.generation:
            self.value, self.generation = side_path_structure(self.packed), generation
        return self.value


def _describe_sides(sides: tuple) -> str:
    n = sum(len(layer) for layer in sides)
    return f", {n} LoRA side paths" if n else ""


def _block_forward(block, x, rope, mask, c, mod):
    return type(block).forward(block, x, rope, mask, c, mod)


class CompiledMethod(ProcessLocal):
    """``forward_tokens`` / ``encode_caption`` of the ``full`` preset, with the same bookkeeping.

    Marked dynamic (dim 1): the token inputs (x for forward_tokens, the caption features or
    tokens), every tensor of the layout, the ControlNet hints and the image tokens it passes on;
    never c or the modulation vectors.
    """

    pickle_refusal = PICKLE_REFUSAL

    def __init__(self, name: str, compiled, classes: ShapeClasses, dynamic: bool, packed: list[nn.Module],
                 module: nn.Module):
        self.name = name
        self.compiled = compiled  # the class's function, compiled: the module is its first argument
        self.module = module  # (a bound method would stay the original's in a copy of the module)
        self.classes = classes
        self.dynamic = dynamic
        self.packed = packed  # the model's packed linears, whose LoRA side paths the graph holds
        self.sides = SidePathCache(packed)

    def __call__(self, *args, **kwargs):
        from .cuda_graphs import flatten

        tokens, layout_at = {"forward_tokens": (args[:2], 3), "encode_caption": (args[:1], 1),
                             "step": (args[1:4], 4)}[self.name]  # step(dit, x, cap_tokens, ctx, layout, ...)
        layout = kwargs.get("layout", args[layout_at])
        hints = kwargs.get("control_hints", args[5] if len(args) > 5 and self.name == "forward_tokens" else None)
        image = kwargs.get("image_tokens", args[6] if len(args) > 6 and self.name == "forward_tokens" else None)
        sequence = [*tokens, *flatten(layout)[0], *flatten(hints)[0], *flatten(image)[0]]
        batch, masked = tokens[0].shape[0], layout.joint_mask is not None
        seq = None if self.dynamic else tuple(t.shape[1] for t in sequence if t.ndim >= 2)
        sides = self.sides()
        key = (batch, masked, seq, tokens[0].dtype, tokens[0].device, tuple(sorted(hints or ())), sides)
        self.classes.note(key, lambda: f"({self.name}, batch {batch}, {'masked' if masked else 'no mask'}, "
                                       f"token shapes {[tuple(t.shape) for t in tokens]}, {tokens[0].device}"
                                       f"{_describe_sides(sides)})")
        if self.dynamic:
            _mark_sequence_dynamic(*sequence)
        return self.compiled(self.module, *args, **kwargs)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of the DiT (or of the ControlNet branch, built from the same block)."""
    from ..model.transformer import TransformerBlock

    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def _methods(model: nn.Module) -> tuple[str, ...]:
    """What ``full`` compiles: the DiT's step and caption path, or the branch's step."""
    from ..model.controlnet import ZImageControlNet

    return ("step",) if isinstance(model, ZImageControlNet) else ("forward_tokens", "encode_caption")


def gpu_compile_problem(capability: tuple[int, int], name: str, dtypes: set[torch.dtype],
                        what: str = "the DiT") -> str | None:
    """Why torch.compile's inductor would not compile the DiT on this GPU (None if it would): inductor
    skips every graph with bfloat16 inputs or outputs on a CUDA GPU without native bfloat16 (compute
    capability below 8.0: Turing, Volta, Pascal), with a warning, and ``what`` runs eagerly."""
    if getattr(torch.version, "hip", None) or torch.bfloat16 not in dtypes or tuple(capability) >= (8, 0):
        return None
    major, minor = capability
    return (f"torch.compile (inductor) does not compile bfloat16 graphs on {name} (sm{major}{minor}; native "
            f"bfloat16 starts at compute capability 8.0): it would skip them and run {what} eagerly. Run "
            f"without compile on this GPU (CUDA graphs and the Triton kernels still apply)")


def check_compile_supported(model: nn.Module, backend: str | object, what: str = "the DiT",
                            device: torch.device | None = None) -> None:
    """Raise :class:`AccelerationUnavailable` where the inductor backend would not compile: without
    Triton, which inductor writes its CUDA kernels in (it would fail at the first call, after the
    weights are loaded), or where it would silently skip the model's graphs. ``device``: where the
    model runs (None: where its weights are)."""
    from ._kernels import AccelerationUnavailable, triton_unavailable_reason

    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else param.device if param is not None else None
    if backend != "inductor" or param is None or device.type != "cuda":
        return
    triton = triton_unavailable_reason()
    if triton:
        raise AccelerationUnavailable(f"torch.compile (inductor) writes its CUDA kernels in Triton, and {triton}; "
                                      f"or run without compile")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    problem = gpu_compile_problem(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device),
                                  dtypes, what)
    if problem:
        raise AccelerationUnavailable(problem)


def compile_transformer_(transformer: nn.Module, mode: str = "blocks", backend: str | object = "inductor",
                         shapes: str = "dynamic") -> str:
    """Compile the DiT in place; returns one log line. ``backend`` is for tests (e.g. a counter)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if shapes not in SHAPE_POLICIES:
        raise ValueError(f"shapes must be one of {SHAPE_POLICIES}, got {shapes!r}")
    if mode == "off":
        return "compile: off"
    uncompile_(transformer)
    limit = set_recompile_limit(recompile_limit_for(shapes))
    dynamic = shapes == "dynamic"
    # dynamic=False: only the dims marked above are symbolic (no automatic dynamic on the batch).
    options = dict(backend=backend, dynamic=False)
    if mode == "blocks":
        blocks = _blocks(transformer)
        compiled = torch.compile(_block_forward, **options)
        classes = shape_classes("_block_forward", "the transformer block", limit, _block_forward.__code__)
        for block in blocks:
            block.forward = CompiledBlock(block, compiled, classes, dynamic)
        transformer._zimage_compiled = ("blocks", shapes, classes)
        return (f"compile: blocks ({len(blocks)} blocks share one compiled function; shapes {shapes}, "
                f"recompile limit {limit})")
    methods = _methods(transformer)
    for name in methods:
        function = getattr(type(transformer), name)
        compiled = torch.compile(function, fullgraph=True, **options)
        classes = shape_classes(f"{type(transformer).__name__}.{name}", f"the compiled {name}", limit,
                                function.__code__)
        setattr(transformer, name, CompiledMethod(name, compiled, classes, dynamic,
                                                    _method_packed(transformer, name), transformer))
    transformer._zimage_compiled = ("full", shapes, classes)
    return f"compile: full ({' and '.join(methods)}, fullgraph; shapes {shapes}, recompile limit {limit})"


def uncompile_(transformer: nn.Module) -> str | None:
    """Undo :func:`compile_transformer_` (to apply a transform that must come before compile, such as
    fp8, and compile again). Returns the mode that was undone, or None."""
    state = transformer.__dict__.pop("_zimage_compiled", None)
    for block in _blocks(transformer):
        block.__dict__.pop("forward", None)
    for name in _methods(transformer):
        transformer.__dict__.pop(name, None)
    return None if state is None else state[0]


def compiled_mode(transformer: nn.Module) -> tuple[str, str] | None:
    """(mode, shapes) of a compiled DiT, or None."""
    state = transformer.__dict__.get("_zimage_compiled")
    return None if state is None else state[:2]
