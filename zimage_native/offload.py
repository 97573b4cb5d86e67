"""Streamed block offload (``offload="blocks"``): the DiT's blocks live in pinned CPU memory and
visit the GPU one at a time.

:func:`stream_blocks` is a transform on a built model. Everything outside the blocks (embedders,
final layer, pad tokens) and the small per-block adaLN projections (which the pipeline calls
outside the blocks, to precompute the modulation vectors) move to the device for good. The rest of
each block stays in CPU memory, pinned so that copies are asynchronous, and :class:`BlockStreamer`
moves it in with forward hooks:

- before block k runs, its weights must be on the device (copied now if no prefetch brought them),
  and the copies of the next ``depth`` blocks are started on a side CUDA stream, so that they
  overlap block k's compute; the compute stream waits for block k's copy event only;
- after block k has run, its device copies are dropped (the tensors point at the CPU copies again;
  ``record_stream`` keeps the allocator from reusing their memory before the compute is done),
  unless block k is prefetched to run again next (it keeps its copy).

Which block comes next is learned from the order in which blocks ran before, per run: a run is
(block, its runs before it in this :func:`streamed_pass`; 0 outside one), and for each run, how
often each other run followed it; the most frequent successor is prefetched (the first seen on a
tie). Keying by run matters where a block runs twice in a pass with different successors: with a
ControlNet 2.x the DiT's noise-refiner blocks after the first refiner hint run twice in a row
(then the main layers follow), and a 2.0 branch runs its control layers twice. The sampling loop
runs the same order every step, so from the second pass on every block use but the very first is
prefetched, including the first block of the next step while the last one runs. Only the end of
a request would be mispredicted (its last block predicts another step; the next request starts
with the caption refiner, which is learned as no run's successor: the end of a request ends the
run, :meth:`BlockStreamer.release`): the sampling loop runs each forward in :func:`streamed_pass`, where a
block counts its runs, and in its last one no run is prefetched that this pass has had already
(the next step's first block), and what is still held when the loop ends
(an interrupted run's prefetch) it drops (:func:`release_streamed`), so that no block stays on the
device between requests (nor during the VAE decode). The caption passes are the other order that
frequencies cannot tell (with CFG the caption refiner's last block is followed by the negatives'
caption refiner and by the image's first block, once each per request): the sampling plan names the
block that runs next (:func:`runs_next`). The first-block cache (``accel.block_cache``) knows which
block follows the first main layer (the second, or the next forward's first) only once that layer
has run: it names no successor for it (nothing prefetched) and its decision prefetches what follows
(:func:`resume_after`). Within a run, a prefetch that turns out wrong is
dropped when the next block starts, so at most ``depth + 1`` blocks are ever on the device.

The copy itself is a hook (``transfer``), so the CPU tests can record the copy order with a fake
device move. Weights are swapped through ``tensor.data``, so in-place weight edits while a block is
on the CPU (fused LoRA, see :mod:`zimage_native.lora`) land in the CPU copy and are streamed too.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import weakref
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .process_local import ProcessLocal

# Submodules of a block that stay resident (the pipeline calls them outside the block's forward).
RESIDENT = ("adaLN_modulation",)


def _streamed_tensors(block: nn.Module, keep: tuple[str, ...]) -> list[torch.Tensor]:
    """The block's parameters and buffers, except those under a submodule named in ``keep``."""
    out = []
    for name, module in block.named_modules():
        if any(part in keep for part in name.split(".")):
            continue
        out += [t for t in module._parameters.values() if t is not None]
        out += [t for t in module._buffers.values() if t is not None]
    return out


class BlockStreamer(ProcessLocal):
    """Moves each block's weights to ``device`` just in time and back after use (see module doc)."""

    pickle_refusal = ("cannot pickle a DiT whose blocks are streamed (offload='blocks'): its streaming hooks belong to "
                      "this process. Save its weights instead (torch.save(pipe.transformer.state_dict(), PATH), or "
                      "safetensors' save_file) and load them into a new DiT, or load it with offload='none' to "
                      "pickle it")

    def __init__(self, blocks: Iterable[nn.Module], device: torch.device | str, depth: int = 1,
                 keep: tuple[str, ...] = RESIDENT, transfer: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.depth = depth
        self.keep = keep
        self.transfer = transfer or (lambda t: t.to(self.device, non_blocking=True))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # block index -> (its tensors, their CPU copies, the copy-done event or None)
        self.loaded: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], object]] = {}
        # A run of a block is keyed (block, its runs before it in this pass): 0 outside
        # :func:`streamed_pass`, so that a block run twice in a pass learns one successor per run.
        self.successor: dict[tuple[int, int], dict[tuple[int, int], int]] = {}  # run -> {next run: times seen}
        self.last: tuple[int, int] | None = None
        self.known: dict[int, int] = {}  # block -> the block the caller says runs next (:func:`runs_next`)
        self.upcoming: list[tuple[int, int]] = []  # the runs prefetched for while the current one runs
        # Within :func:`streamed_pass`: the runs of each block in this pass, and whether this pass
        # is the last (a run that this pass has had already is the next pass's: not prefetched).
        self.runs: collections.Counter | None = None
        self.last_pass = False
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._before, i)))
            self.handles.append(block.register_forward_hook(functools.partial(self._after, i)))

    # -------------------------------------------------------------- moves
    def load(self, i: int) -> None:
        """Start copying block ``i`` to the device (on the side stream when there is one)."""
        if i in self.loaded:
            return
        tensors = _streamed_tensors(self.blocks[i], self.keep)
        homes = []
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for t in tensors:
                home = t.data
                if self.stream is not None and not home.is_pinned():  # e.g. a module swapped in later
                    home = home.pin_memory()
                homes.append(home)
                t.data = self.transfer(home)
            event = self.stream.record_event() if self.stream is not None else None
        self.loaded[i] = (tensors, homes, event)

    def free(self, i: int) -> None:
        """Point block ``i`` at its CPU copies again (its device copies are released)."""
        tensors, homes, _ = self.loaded.pop(i)
        for t, home in zip(tensors, homes):
            t.data = home

    def release(self) -> None:
        """Drop every device copy (for example a prefetched block after the last step). The block
        that runs next starts another run (the next request's caption refiner): it is learned as no
        block's successor, as no prefetch could have served it."""
        for i in list(self.loaded):
            self.free(i)
        self.last = None

    def ahead(self, run: tuple[int, int]) -> list[tuple[int, int]]:
        """The runs to prefetch for while ``run`` (block, its runs before in this pass) runs: its
        next ``depth`` most frequent successors (in the last pass only runs still to come in it:
        :func:`streamed_pass`); a block the caller named (:func:`runs_next`; its first run in a
        pass) comes before the learned one."""
        out, j = [], run
        for _ in range(self.depth):
            seen = self.successor.get(j)
            if j[0] in self.known:
                if self.known[j[0]] is None:  # not known yet (:func:`resume_after` will say)
                    break
                j = (self.known[j[0]], 0)
            elif seen:
                j = max(seen, key=seen.get)  # the first seen of the most frequent
            else:
                break
            if j == run or j in out or (self.last_pass and j[1] < self.runs[j[0]]):
                break
            out.append(j)
        return out

    def prefetch(self, run: tuple[int, int], running: int | None = None) -> None:
        """Start the copies of the runs predicted to follow ``run`` (:meth:`ahead`) and drop every
        other block held but ``running`` (a wrong prefetch: the order changed)."""
        self.upcoming = self.ahead(run)
        upcoming = [k for k, _ in self.upcoming]
        for k in list(self.loaded):
            if k != running and k not in upcoming:
                self.free(k)
        for k in upcoming:
            self.load(k)

    # -------------------------------------------------------------- hooks
    def _before(self, i: int, module: nn.Module, args) -> None:
        run = (i, 0)
        if self.runs is not None:
            run = (i, self.runs[i])
            self.runs[i] += 1
        if self.last is not None:
            seen = self.successor.setdefault(self.last, {})
            seen[run] = seen.get(run, 0) + 1
        self.last = run
        self.load(i)
        self.prefetch(run, i)
        tensors, _, event = self.loaded[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in tensors:
                t.data.record_stream(compute)

    def _after(self, i: int, module: nn.Module, args, output) -> None:
        if all(k != i for k, _ in self.upcoming):  # (a block that runs again next keeps its copy)
            self.free(i)

    def remove(self) -> None:
        """Remove the hooks (the blocks stay where their weights are now: on the CPU)."""
        self.release()
        for handle in self.handles:
            handle.remove()
        self.handles = []


def release_streamed(*models: nn.Module | None) -> None:
    """Drop every device copy of the streamed blocks of ``models`` (those with a ``block_streamer``;
    others, and None, are skipped): the blocks point at their CPU copies again."""
    for model in models:
        streamer = getattr(model, "block_streamer", None)
        if streamer is not None:
            streamer.release()


@contextlib.contextmanager
def streamed_pass(*models: nn.Module | None, last: bool = False):
    """Within: one pass of the streamed blocks of ``models`` (those with a ``block_streamer``; others,
    and None, are skipped), each block's runs counted: a run is learned and predicted as (block, its
    runs before it in the pass), so that a block run twice in a pass (a ControlNet 2.x pass: the
    DiT's noise-refiner blocks after the first refiner hint, a 2.0 branch's control layers) has
    a successor per run. In the ``last`` pass of a run a block prefetches no run that this pass
    has had already (the next step's first block, which the last block predicts, for a pass that
    does not come)."""
    streamers = [s for s in (getattr(m, "block_streamer", None) for m in models) if s is not None]
    for streamer in streamers:
        streamer.runs, streamer.last_pass = collections.Counter(), last
    try:
        yield
    finally:
        for streamer in streamers:
            streamer.runs, streamer.last_pass = None, False


@contextlib.contextmanager
def runs_next(model: nn.Module | None, block: nn.Module, then: nn.Module | None):
    """Within: the streamed ``block`` of ``model`` (one with a ``block_streamer``; others, and None,
    are skipped) prefetches ``then``, which the caller knows runs next, rather than its most frequent
    successor. The sampling plan's caption passes need it: with CFG the caption refiner's last block
    is followed by the negatives' caption refiner once and by the image's first block once per
    request, a tie that frequencies cannot break. ``then`` None: not known while ``block`` runs, so
    nothing is prefetched after it (nor after a block whose prefetch reaches it) until the caller
    says what follows (:func:`resume_after`)."""
    streamer = getattr(model, "block_streamer", None)
    if streamer is None or block not in streamer.blocks or (then is not None and then not in streamer.blocks):
        yield  # (a block left resident, ``stream_blocks(blocks=...)``: the learned order goes on)
        return
    key = streamer.blocks.index(block)
    streamer.known[key] = None if then is None else streamer.blocks.index(then)
    try:
        yield
    finally:
        streamer.known.pop(key, None)


def resume_after(model: nn.Module | None, block: nn.Module) -> None:
    """The streamed blocks of ``model`` (one with a ``block_streamer``; others, and None, are
    skipped) go on as if ``block`` had just run: what follows its run in this pass is prefetched
    now, and the next block is learned as its successor. For a caller that decides which block runs
    next only after a block has run, with that block's successor named None (:func:`runs_next`) so
    that it prefetched nothing: the first-block cache, whose reused step skips from the first main
    layer to what follows the last (``accel.block_cache``); ``block`` is the block that ran for a
    step run in full."""
    streamer = getattr(model, "block_streamer", None)
    if streamer is None or block not in streamer.blocks:  # (a block left resident)
        return
    i = streamer.blocks.index(block)
    # What follows is said now: a block named followed by None predicts its learned successor again,
    # for the rest of the runs_next context (the first-block cache's full step runs its other layers in it).
    streamer.known = {k: then for k, then in streamer.known.items() if then is not None}
    if streamer.last is None or streamer.last[0] != i:  # skipped to: its run as if it ran now
        streamer.last = (i, 0 if streamer.runs is None else streamer.runs[i])
    streamer.prefetch(streamer.last)


# ---------------------------------------------------------------------------- whole components
def copy_storage(storage: torch.UntypedStorage, device: torch.device) -> torch.UntypedStorage:
    """One storage to ``device`` (the tests record the copies by replacing this)."""
    return storage.to(device=device, non_blocking=True)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module``, each once."""
    return list({id(t): t for m in module.modules() for table in (m._parameters, m._buffers)
                 for t in table.values() if t is not None}.values())


def _already_on(storage: torch.UntypedStorage, device: torch.device) -> bool:
    """Whether ``storage`` is on ``device`` ("cuda" is whichever GPU holds it)."""
    return storage.device.type == device.type and device.index in (None, storage.device.index)


def resides_on(module: nn.Module, device: torch.device | str) -> bool:
    """Whether every weight of ``module`` is on ``device`` already (:func:`move_` would copy nothing)."""
    device = torch.device(device)
    return all(_already_on(t.data.untyped_storage(), device) for t in _tensors(module))


def _place(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Point each tensor at a copy of its storage on ``device``, copying each storage once: weights
    that are views of one buffer (the fused q|k|v and w1|w3 GEMMs, ``accel.fusions``) stay views of one
    copy, where ``Module.to`` copies each separately (the fused GEMM then no longer sees edits of the
    checkpoint's weights, such as a fused LoRA, and the memory doubles)."""
    copies: dict[tuple[int, int], torch.UntypedStorage] = {}
    for t in tensors:
        home = t.data
        storage = home.untyped_storage()
        if _already_on(storage, device):
            continue
        key = (storage.data_ptr(), storage.nbytes())
        if key not in copies:
            copies[key] = copy_storage(storage, device)
        there = copies[key]
        t.data = torch.empty(0, dtype=home.dtype, device=there.device).set_(
            there, home.storage_offset(), home.size(), home.stride())


def move_(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)`` for a placement change (``pipe.to``, ``enable_model_cpu_offload``) that
    keeps views of one buffer views of one copy (see :func:`_place`). To "meta" (the tests' stand-in
    for a GPU, whose tensors cannot take another device's data) it is ``module.to``."""
    device = torch.device(device)
    if device.type == "meta":
        return module.to(device)
    _place(_tensors(module), device)
    return module


class _Visits:
    """A module's visits (:func:`visit`): ``lock`` held for a visit, so that a visit from another
    thread (a hand ``pipe.vae.decode`` while the pipeline's worker thread decodes) waits for it
    rather than running on weights that move back under it, and ``depth``, the holder's nested
    visits (only the outermost moves anything)."""

    def __init__(self):
        self.lock, self.depth = threading.RLock(), 0


#: The modules' visit locks, by module (weak: an entry goes with its module, ids are not reused).
_visits: weakref.WeakKeyDictionary[nn.Module, _Visits] = weakref.WeakKeyDictionary()
_visits_lock = threading.Lock()


@contextlib.contextmanager
def visit(module: nn.Module, device: torch.device):
    """``module``'s weights on ``device`` for the duration (``offload="model"`` / ``"text_encoder"``),
    then back where they rest, in CPU memory, without a copy back: a run does not change weights, so
    each tensor simply points at its resting copy again (a LoRA fused between runs edits that copy),
    and the GPU's cached blocks are released. Storages are copied once each (:func:`_place`). Inside
    a visit of the same module in the same thread (a :class:`VisitOnCall` inside the pipeline's
    decode) nothing moves; a visit from another thread waits until this one has ended."""
    with _visits_lock:
        visits = _visits.get(module)
        if visits is None:
            visits = _visits[module] = _Visits()
    with visits.lock:
        visits.depth += 1
        try:
            if visits.depth > 1:
                yield
                return
            device = torch.device(device)
            tensors = _tensors(module)
            homes = [t.data for t in tensors]
            try:
                _place(tensors, device)
                yield
            finally:
                for t, home in zip(tensors, homes):
                    t.data = home
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            visits.depth -= 1


class VisitOnCall:
    """``module.<name>(...)`` of a module resting in CPU memory (the VAE under ``offload="model"``),
    called by hand (``pipe.vae.decode(z)``, ``pipe.vae.encode(x)``): the call visits ``device`` as
    the pipeline's own decode does (:func:`visit`), so inputs on the execution device run (diffusers'
    model offload moves its VAE to the GPU for these calls with a hook too, and leaves it there until
    the next offload). It calls ``inner`` (what was the module's own attribute: a compiled decode) or
    else the class's method. Installed by :func:`visit_on_call_`."""

    def __init__(self, module: nn.Module, name: str, device: torch.device, inner: Callable | None = None):
        self.module, self.name, self.device, self.inner = module, name, torch.device(device), inner

    def __call__(self, *args, **kwargs):
        call = self.inner if self.inner is not None else getattr(type(self.module), self.name).__get__(self.module)
        with visit(self.module, self.device):
            return call(*args, **kwargs)


def visit_on_call_(module: nn.Module, names: Iterable[str], device: torch.device | None) -> None:
    """``module``'s methods ``names`` visit ``device`` when called (:class:`VisitOnCall`); with
    ``device`` None they are the module's own again."""
    for name in names:
        current = module.__dict__.pop(name, None)
        if isinstance(current, VisitOnCall):
            current = current.inner
        if current is not None:
            module.__dict__[name] = current
        if device is not None:
            module.__dict__[name] = VisitOnCall(module, name, device, current)


def dit_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The DiT's blocks in execution order: context refiner, noise refiner, main layers."""
    return [*transformer.context_refiner, *transformer.noise_refiner, *transformer.layers]


#: Pinned memory comes in slabs of this size (a power of two), the streamed tensors packed into them.
SLAB_BYTES = 1 << 29
SLAB_ALIGN = 512  # bytes between the starts of packed tensors (any dtype's alignment, DMA friendly)


def pinned_slab(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def pack_in_slabs(tensors: Iterable[torch.Tensor], allocate: Callable[[int], torch.Tensor] = pinned_slab,
                  slab_bytes: int | None = None) -> Iterator[torch.Tensor]:
    """Copies of ``tensors``, in order, packed first-fit into uint8 slabs of ``slab_bytes`` from
    ``allocate`` (page-locked memory by default); a tensor larger than a slab gets a slab of its own
    size. A generator: the caller can drop each original as its copy comes, so the two never all
    coexist.

    Why slabs: PyTorch's caching host allocator rounds every pinned allocation up to a power of
    two, so pinning the DiT's tensors one by one took 1.5x their bytes for the bf16 blocks (18.3 GB
    for 12.0 GB) and 1.35x for Q4_K; slabs of a power of two, filled first-fit, waste little more
    than the last slab's free end."""
    slab_bytes = slab_bytes or SLAB_BYTES
    open_slabs: list[list] = []  # [slab, bytes used]
    for t in tensors:
        n = t.numel() * t.element_size()
        if n > slab_bytes:
            home, start = allocate(n), 0
        else:
            for entry in open_slabs:
                start = -(-entry[1] // SLAB_ALIGN) * SLAB_ALIGN
                if start + n <= slab_bytes:
                    break
            else:
                entry, start = [allocate(slab_bytes), 0], 0
                open_slabs.append(entry)
            home, entry[1] = entry[0], start + n
        view = home[start:start + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        yield view


def stream_blocks(transformer: nn.Module, device: torch.device | str, depth: int = 1,
                  transfer: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  blocks: list[nn.Module] | None = None, keep: tuple[str, ...] = RESIDENT,
                  allocate: Callable[[int], torch.Tensor] | None = None) -> BlockStreamer:
    """Offload the DiT's blocks to (pinned) CPU memory and stream them to ``device``; everything
    else moves to ``device``. Returns the streamer (also kept as ``transformer.block_streamer``).
    ``blocks`` / ``keep``: another model's blocks in execution order and the submodules of a block
    that stay resident (the ControlNet branch: its blocks, whose projections run outside them).
    The streamed tensors are packed into slabs (:func:`pack_in_slabs`) from ``allocate``: pinned
    memory on a CUDA device by default; elsewhere plain CPU copies unless ``allocate`` is given.

    Apply it after transforms that compile blocks: a compiled block would trace the hooks.
    """
    device = torch.device(device)
    if getattr(transformer, "block_streamer", None) is not None:
        raise ValueError("the DiT's blocks are already streamed")
    blocks = dit_blocks(transformer) if blocks is None else list(blocks)
    if any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks):
        raise ValueError("offload='blocks' cannot stream compiled blocks: use compile='off' with block offload")
    order = list({id(t): t for b in blocks for t in _streamed_tensors(b, keep)}.values())  # execution order
    allocate = allocate or (pinned_slab if device.type == "cuda" else None)
    with torch.no_grad():
        homes = (t.data.cpu() for t in order) if allocate is None else pack_in_slabs((t.data for t in order), allocate)
        for t, home in zip(order, homes):  # one by one: each original is freed as its copy takes its place
            t.data = home
        streamed = {id(t) for t in order}
        for module in transformer.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or id(t) in streamed:
                        continue
                    if isinstance(t, nn.Parameter):
                        table[name] = nn.Parameter(t.data.to(device), requires_grad=t.requires_grad)
                    else:
                        table[name] = t.to(device)
    streamer = BlockStreamer(blocks, device, depth, keep=keep, transfer=transfer)
    transformer.block_streamer = streamer
    return streamer


def resident_tensors(model: nn.Module, blocks: list[nn.Module], keep: tuple[str, ...] = RESIDENT
                     ) -> list[torch.Tensor]:
    """The parameters and buffers of ``model`` that :func:`stream_blocks` (same ``blocks`` and
    ``keep``) moves to the device to stay there: all but the streamed parts of the blocks."""
    ids = {id(t) for b in blocks for t in _streamed_tensors(b, keep)}
    return [t for t in (*model.parameters(), *model.buffers()) if id(t) not in ids]


def streamed_bytes(transformer: nn.Module) -> tuple[int, int]:
    """(bytes that stay on the device, bytes of the largest streamed block) of a DiT."""
    blocks = dit_blocks(transformer)
    streamed = [sum(t.numel() * t.element_size() for t in _streamed_tensors(b, RESIDENT)) for b in blocks]
    resident = sum(t.numel() * t.element_size() for t in resident_tensors(transformer, blocks))
    return resident, max(streamed, default=0)
