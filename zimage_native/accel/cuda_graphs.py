"""CUDA graphs of the sampling loop, fit for a server.

``GraphedSampler`` wraps the step loop (``pipe.run_steps``) in one of two modes:

- ``"step"`` (default): one graph per *step kind* (batch, latent size, sequence class, CFG on or
  off for that step, dtypes), replayed once per step. Before each replay the step's own tensors
  (its modulation vectors and its two sigmas) are copied into the graph's static inputs on the
  device; the request's tensors (refined caption tokens, RoPE tables, guidance values) are copied
  in once per request. The number of steps is not part of the key, so one or two graphs serve
  every schedule. After each replay a CUDA event is recorded; progress and cancellation are
  handled one step behind (the callback for step k runs while step k+1 is already queued), so the
  GPU never waits for Python and the loop has no synchronising call other than those events.
  A callback that raises stops the run after at most one more step; ``pipe._interrupt`` (set by a
  step-end callback or another thread) is read after each replay and stops the run there.
- ``"loop"``: the whole loop (all N forwards and Euler updates) as one graph per (request shape,
  steps run, CFG pattern): the run is numbered from its first step (:func:`loop_plan`), so where
  it starts in the schedule (an img2img strength) is not part of the key. Fewest launches;
  progress is reported only at the end and a cancel takes effect only after the run (nor does
  ``pipe._interrupt`` stop it: no capture reads the flag). A run with a step-end callback, which
  needs Python between the steps, replays step graphs instead (captured once per step kind, in
  the same cache and pool). Kept for
  the GPU check to measure against ``"step"`` (the issue's rule: keep ``"step"`` unless
  ``"loop"`` is more than 2% faster).

Guidance values (``guidance_scale`` and the CFG norm limit) are device tensors copied in, never
part of the key: a new guidance value replays the same graph.

The cache is bounded: at most ``max_graphs`` graphs, least recently used first out; an evicted
graph is released before the next capture. All graphs of a sampler are captured into one memory
pool (:class:`SharedPoolCapture`), so the pool holds about one graph's temporaries, not one set per
graph, and a server can afford a graph per caption class (the default cache holds 32). Sharing is
safe because no tensor in the pool carries data from one replay to another: a step graph's state
lives in its static inputs (allocated outside the pool, and written by ``copy_``), a loop graph's
output is cloned right after its replay and stays allocated (so no later capture takes its
memory), and replays are serial on one stream. The GPU check's CFG case replays graphs out of
capture order (the guided graph, captured second, then the plain one) against the eager run.

The capture mechanism is a parameter (``capture=``, with ``new_event=``): :func:`cuda_capture` and
CUDA events on a GPU; the CPU tests pass a re-running stand-in and a recording event to check the
bookkeeping (keys, copy-in, eviction and release, per-step progress and cancel), and the GPU
script checks that replay equals the compiled eager run.

Anything that replaces what a graph runs (fp8 conversion, a LoRA side path on a packed linear)
after a capture invalidates it: call ``clear()`` (the pipeline does so when it changes the DiT).
A ControlNet loaded or unloaded changes only the graphs of control requests, whose keys hold the
branch: ``release_holding(branch)`` drops those and keeps the others. A
LoRA fused into ordinary weights writes them in place, and the graphs replay the new values.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

GRAPH_MODES = ("step", "loop")
DEFAULT_MAX_GRAPHS = 32  # a caption class each (16) with and without CFG, for one size; one shared pool
EVICTED_MEMORY = 4096  # evicted signatures remembered to recognise a recapture (a thrash); then forgotten


def graphs_problem(device: torch.device, offload: str) -> str | None:
    """Why the sampling loop cannot be captured for a DiT running on ``device`` (None if it can)."""
    if device.type != "cuda":
        return f"cuda_graphs needs the DiT on a CUDA device; it is on {device}"
    if offload != "none":
        return "cuda_graphs needs the DiT to stay on the GPU: use offload='none'"
    return None


def flatten(obj: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any], tuple]:
    """Tensors of a nested structure (dataclasses, tuples, lists), a function that rebuilds the
    structure from new tensors, and a signature of everything else (shapes, dtypes, constants)."""
    tensors: list[torch.Tensor] = []
    spec: list = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o)
            spec.append(("T", tuple(o.shape), o.dtype, o.device.type))
            return lambda it: next(it)
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            parts = {f.name: walk(getattr(o, f.name)) for f in dataclasses.fields(o)}
            return lambda it: dataclasses.replace(o, **{k: b(it) for k, b in parts.items()})
        if isinstance(o, (list, tuple)):
            parts = [walk(v) for v in o]
            spec.append((type(o).__name__, len(o)))
            return lambda it: type(o)(b(it) for b in parts)
        if isinstance(o, dict):
            keys = sorted(o)
            parts = [walk(o[k]) for k in keys]
            spec.append(("dict", tuple(keys)))
            return lambda it: {k: b(it) for k, b in zip(keys, parts)}
        spec.append(("C", o))
        return lambda it: o

    build = walk(obj)
    return tensors, lambda new: build(iter(new)), tuple(spec)


def _holds(key: tuple, obj: Any) -> bool:
    """Whether the nested tuple ``key`` (a graph's signature) holds ``obj`` itself."""
    return any(part is obj or (type(part) is tuple and _holds(part, obj)) for part in key)


@dataclasses.dataclass
class Captured:
    """What a capture hook returns: the static output, how to replay, how to free the graph."""

    output: torch.Tensor
    replay: Callable[[], None]
    release: Callable[[], None] = lambda: None


def cuda_capture(fn: Callable[[], torch.Tensor], pool=None) -> Captured:
    """Warm up ``fn`` on a side stream, capture it in a CUDA graph, in memory pool ``pool`` (a
    ``torch.cuda.graph_pool_handle()``; None: a pool of its own)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: lazy init, autotuning and allocator growth happen outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return Captured(out, graph.replay, graph.reset)


class SharedPoolCapture:
    """:func:`cuda_capture` into one memory pool for every graph it captures (see the module doc)."""

    def __init__(self):
        self.pool = None

    def __call__(self, fn: Callable[[], torch.Tensor]) -> Captured:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return cuda_capture(fn, self.pool)


def cuda_event():
    return torch.cuda.Event()


@dataclasses.dataclass
class Entry:
    static: list[torch.Tensor]  # the graph's inputs, in flatten order
    latents: torch.Tensor  # the static latents (step mode: the state carried between replays)
    captured: Captured
    sources: list[Any] = dataclasses.field(default_factory=list)  # what was last copied into each slot


def guidance_tensors(plan, device: torch.device):
    """``plan`` with guidance_scale and norm_limit as fp32 device scalars (copied in, not keyed)."""
    def as_tensor(value):
        return value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float32,
                                                                           device=device)
    return dataclasses.replace(plan, guidance_scale=as_tensor(plan.guidance_scale),
                               norm_limit=as_tensor(plan.norm_limit))


def step_kind(plan) -> str:
    """What besides the latents' shape keys a graph, in words: the caption lengths (the 32-token
    class), CFG, the inpainting blend and the ControlNet's hints, for the capture's log line (each
    is a capture of its own at a size already captured)."""
    def tokens(branch):
        return branch[1].shape[1] if isinstance(branch[1], torch.Tensor) else "?"
    cfg = f"CFG with negatives of {tokens(plan.negative)} tokens" if plan.negative is not None else "no CFG"
    blend = ", inpainting blend" if plan.blend is not None else ""
    extra = ", ControlNet hints" if plan.extra is not None else ""  # (the one extra DiT input: control.ControlHints)
    return f"caption {tokens(plan.plain)} tokens, {cfg}{blend}{extra}"


def one_step_plan(plan, step):
    """The plan of a single step: that step (as index 0), its two sigmas, and as ``plain`` the caption
    tokens its positives read (a seed-variance step's are ``plan.varied``: one graph serves both
    kinds of step, the tokens copied in at the switch). An unguided step has no negatives: the
    steps CFG truncation leaves unguided replay the graph of a run without CFG."""
    plain = plan.varied if step.varied else plan.plain
    return dataclasses.replace(plan, steps=[dataclasses.replace(step, index=0, varied=False)], plain=plain,
                               negative=plan.negative if step.guided else None, varied=None,
                               sigmas=plan.sigmas[step.index:step.index + 2])


def loop_plan(plan):
    """The plan of a whole run from its first step: the steps numbered from 0 and the sigmas from
    that step on. A loop graph then depends on the steps run, not on where they start in the
    schedule: an img2img / inpainting run of 2 steps (strength 0.5 of 4, 0.4 of 5, 0.3 of 6) and
    a text-to-image run of 2 steps replay one graph, their sigmas copied in (with the schedule's
    indices as Python constants each (steps, start) pair was a capture of its own). A run with no
    guided step has no negatives: a CFG run that truncation leaves unguided throughout (a late
    img2img start) replays the loop graph of a run without CFG."""
    start = plan.steps[0].index if plan.steps else 0
    guided = any(step.guided for step in plan.steps)
    return dataclasses.replace(plan, steps=[dataclasses.replace(step, index=step.index - start) for step in plan.steps],
                               negative=plan.negative if guided else None, sigmas=plan.sigmas[start:])


class GraphedSampler:
    """Capture-once, replay-many wrapper of ``pipe.run_steps``, with a bounded LRU graph cache."""

    def __init__(self, pipe, capture: Callable[[Callable[[], torch.Tensor]], Captured] | None = None,
                 mode: str = "step", max_graphs: int = DEFAULT_MAX_GRAPHS, new_event: Callable | None = None):
        if mode not in GRAPH_MODES:
            raise ValueError(f"graph mode must be one of {GRAPH_MODES}, got {mode!r}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.pipe = pipe
        self.capture = capture or SharedPoolCapture()
        self.mode = mode
        self.max_graphs = max_graphs
        self.new_event = new_event or cuda_event
        self.graphs: OrderedDict[tuple, Entry] = OrderedDict()
        self.captures = 0
        self.replays = 0
        self.evictions = 0
        self.recaptures = 0  # captures of a step kind this cache had evicted (a thrash: see _entry)
        self.guided_replays = 0  # replays that ran a CFG step (the GPU check asks for at least one)
        self._evicted: set[int] = set()  # what _memo keeps of the evicted signatures (bounded, see _entry)
        self._numbers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see _memo
        self._counter = itertools.count()
        self._warned_thrash = False

    def clear(self) -> None:
        # every step kind is captured again after this, whatever the cache's size: no thrash to tell
        self._evicted.clear()
        while self.graphs:
            self._release(self.graphs.popitem(last=False)[1])

    def release_holding(self, obj: Any) -> int:
        """Release the graphs whose key holds ``obj`` (a ControlNet that control requests ran: the key
        holds the plan's non-tensor parts, the branch among them) and keep the others; returns how
        many were released. Loading or unloading a ControlNet leaves a request without a control
        image as it was, so its graphs stay."""
        held = [key for key in self.graphs if _holds(key, obj)]
        for key in held:
            self._release(self.graphs.pop(key))
        return len(held)

    def _memo(self, signature: tuple) -> int:
        """What the evicted memory keeps of ``signature``: its hash, with every object in it compared by
        identity (a ControlNet branch, the DiT) counted by a number given to that object alone. Such
        an object hashes by its address, which an object made after it is freed can take: a
        ControlNet loaded after one was unloaded took the freed branch's address in 6 of 100 rounds
        of load, control request, plain request (room for one graph), and its first capture counted
        as a recapture (105 for 99, with the thrash warning). The numbers are held weakly (keeping
        the signatures would keep the branches alive)."""
        def part(p):
            if type(p) is tuple:
                return tuple(part(q) for q in p)
            if type(p).__eq__ is not object.__eq__:  # compared by value: hashed as it is
                return p
            try:
                number = self._numbers.get(p)
            except TypeError:  # not weakly referable: None, a dtype (they live as long as the process)
                return p
            if number is None:
                number = self._numbers[p] = next(self._counter)
            return ("object", number)
        return hash(part(signature))

    def _release(self, entry: Entry) -> None:
        entry.captured.release()
        entry.static.clear()
        entry.sources.clear()

    def _entry(self, signature: tuple, tensors: list[torch.Tensor], rebuild, make_fn) -> Entry:
        entry = self.graphs.get(signature)
        if entry is not None:
            self.graphs.move_to_end(signature)
            return entry
        while len(self.graphs) >= self.max_graphs:  # free before capturing the next one
            # no local name for the evicted entry: its output (in its graph's pool) dies here
            evicted = next(iter(self.graphs))
            self._release(self.graphs.pop(evicted))
            self.evictions += 1
            if len(self._evicted) >= EVICTED_MEMORY:
                self._evicted.clear()
            self._evicted.add(self._memo(evicted))
        memo = self._memo(signature)
        if memo in self._evicted:
            self._evicted.discard(memo)
            self.recaptures += 1
            self._warn_thrash()
        static = [t.clone() for t in tensors]
        latents, plan = rebuild(static)
        captured = self.capture(make_fn(latents, plan))
        entry = self.graphs[signature] = Entry(static, latents, captured)
        self.captures += 1
        logger.info("captured a CUDA graph (%s mode) for latents %s, %s (%d of at most %d cached)", self.mode,
                    tuple(latents.shape), step_kind(plan), len(self.graphs), self.max_graphs)
        return entry

    def _warn_thrash(self) -> None:
        """Once per sampler: a step kind evicted for lack of room is captured again, so the stream
        runs more step kinds (sizes, batch sizes, caption classes, CFG on or off) than the cache
        holds and each such request pays an eager warm-up step and a capture instead of a replay."""
        if self._warned_thrash:
            return
        self._warned_thrash = True
        logger.warning("CUDA graphs: a graph evicted from the full cache (max_graphs=%d) is captured again: the "
                       "requests use more step kinds (sizes, batch sizes, caption classes, CFG on or off) than the "
                       "cache holds, so requests pay a capture instead of a replay (%d evictions so far). Raise "
                       "graph_cache_size (--graph-cache-size; the graphs share one memory pool) or serve fewer "
                       "sizes", self.max_graphs, self.evictions)

    @staticmethod
    def _copy_in(entry: Entry, tensors: list[torch.Tensor]) -> None:
        """Copy the tensors that changed since the last copy into this graph's inputs (device copies)."""
        if len(entry.sources) != len(tensors):
            entry.sources = [None] * len(tensors)
        dst, src = [], []
        for i, t in enumerate(tensors):
            if entry.sources[i] is not t:
                dst.append(entry.static[i])
                src.append(t)
                entry.sources[i] = t
        if dst:
            torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, plan, progress: bool = False, callback=None,
                 on_step_end=None, info: dict | None = None) -> torch.Tensor:
        """Run ``plan`` from ``latents``. ``on_step_end`` (see ``sampling.run_steps``) is called after
        each replay with a copy of the latents, and what it returns is copied in: a loop graph has no
        Python between its steps, so in loop mode such a run replays step graphs, captured on demand
        and cached beside the loop graphs. Step mode reads ``pipe._interrupt`` after each replay and
        stops there (recorded in ``info``); a loop graph runs every step in one replay and is not
        stopped. No capture reads the flag."""
        plan = guidance_tensors(plan, latents.device)
        if self.mode == "loop" and on_step_end is None:
            return self._run_loop(latents, plan, callback)
        return self._run_steps(latents, plan, progress, callback, on_step_end, info)

    def _run_loop(self, latents, plan, callback):
        plan = loop_plan(plan)
        tensors, rebuild, signature = flatten((latents, plan))

        def make_fn(static_latents, static_plan):
            return lambda: self.pipe.run_steps(static_latents, static_plan, interruptible=False)

        entry = self._entry(("loop", signature), tensors, rebuild, make_fn)
        entry.sources = []  # a new request: copy everything in
        self._copy_in(entry, tensors)
        entry.captured.replay()
        self.replays += 1
        self.guided_replays += any(step.guided for step in plan.steps)
        if callback is not None:  # one graph, no Python per step: the steps are reported at the end
            for k in range(len(plan.steps)):
                callback(k + 1, len(plan.steps))
        return entry.captured.output.clone()

    def _run_steps(self, latents, plan, progress, callback, on_step_end=None, info=None):
        from ..sampling import denoise_bar, guidance_after_step_end, interrupted

        n = len(plan.steps)
        bar = denoise_bar(self.pipe, progress, total=n)
        report = callback is not None or progress
        events: list = []
        done = 0

        def finish_up_to(k: int) -> None:  # wait for step k's event, then report steps up to k
            nonlocal done
            events[k].synchronize()
            while done <= k:
                done += 1
                bar.update(1)
                if callback is not None:
                    callback(done, n)

        def make_fn(static_latents, static_plan):
            return lambda: static_latents.copy_(self.pipe.run_steps(static_latents, static_plan, interruptible=False))

        current = latents
        returned = None  # what the last step-end callback returned: the run's result, as in the eager loop
        fresh: set[int] = set()
        scale = None  # a guidance scale a step-end callback set (0: the later steps run without CFG)
        try:
            for k, step in enumerate(plan.steps):
                if scale == 0:
                    step = dataclasses.replace(step, guided=False)
                tensors, rebuild, signature = flatten((current, one_step_plan(plan, step)))
                entry = self._entry(("step", signature), tensors, rebuild, make_fn)
                if id(entry) not in fresh:  # first use of this graph in this request: copy everything
                    entry.sources = []
                    fresh.add(id(entry))
                self._copy_in(entry, tensors)
                entry.captured.replay()
                self.replays += 1
                self.guided_replays += bool(step.guided)
                current = entry.latents
                if on_step_end is not None:  # queued behind the replay: no wait here
                    before = getattr(self.pipe, "_guidance_scale", None)
                    # a copy: the next replay of this graph overwrites its latents, which the callback may keep
                    returned = on_step_end(k, step.index, current.clone())
                    current = returned.to(current.dtype)  # the graph's input in fp32 (the eager step casts it)
                    # What it was given (an inpainting mask) it may have changed in place, which the eager
                    # loop reads: the next replay copies every input in, not only the tensors replaced.
                    fresh.clear()
                    changed = guidance_after_step_end(self.pipe, plan, before, scale)
                    if changed != scale:  # a value copied in, as the plan's
                        scale = changed
                        plan = guidance_tensors(dataclasses.replace(plan, guidance_scale=scale), latents.device)
                if report:
                    events.append(self.new_event())
                    events[-1].record()
                    if k >= 1:
                        finish_up_to(k - 1)  # step k is queued behind it: the GPU keeps working
                if interrupted(self.pipe, k, n, info):  # set by the step-end callback or another thread
                    break
            if report and events:
                finish_up_to(len(events) - 1)
        finally:
            bar.close()
        return current.clone() if returned is None else returned  # (latents of another dtype stay so)
