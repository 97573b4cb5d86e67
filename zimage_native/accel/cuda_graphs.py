"""One CUDA graph for the whole sampling loop (all N DiT forwards and Euler updates).

``GraphedSampler`` wraps ``ZImagePipeline.run_steps``. The first request of a given signature
(batch, latent size, caption bucket, steps, CFG pattern, dtypes) is run once eagerly to warm up
and then captured; later requests copy their tensors (noise, refined caption tokens, RoPE tables,
masks, modulation vectors) into the captured graph's static inputs and replay it. Graphs are cached
per signature. The replay makes no host syncs and launches no Python per step.

The capture mechanism is a parameter (``capture=``): ``cuda_capture`` on a GPU; the tests pass a
re-running stand-in to check the bookkeeping (signatures, copy-in, caching) on the CPU, and the
GPU script checks that replay equals eager.

Anything that changes weights (LoRA, fp8 conversion) after a capture invalidates it: call
``clear()`` (the pipeline does so when it changes the DiT).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


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
        spec.append(("C", o))
        return lambda it: o

    build = walk(obj)
    return tensors, lambda new: build(iter(new)), tuple(spec)


def cuda_capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
    """Warm up ``fn`` on a side stream, capture it in a CUDA graph; returns (static output, replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: lazy init, autotuning and allocator growth happen outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay


class GraphedSampler:
    """Capture-once, replay-many wrapper of ``pipe.run_steps`` keyed by the request's signature."""

    def __init__(self, pipe, capture: Callable = cuda_capture):
        self.pipe = pipe
        self.capture = capture
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, Callable[[], None]]] = {}
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        self.graphs.clear()

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, plan, progress: bool = False, callback=None) -> torch.Tensor:
        tensors, rebuild, signature = flatten((latents, plan))
        entry = self.graphs.get(signature)
        if entry is None:
            static = [t.clone() for t in tensors]
            static_latents, static_plan = rebuild(static)
            output, replay = self.capture(lambda: self.pipe.run_steps(static_latents, static_plan))
            entry = self.graphs[signature] = (static, output, replay)
            self.captures += 1
            logger.info("captured the sampling loop for %s (%d graphs cached)", tuple(latents.shape), len(self.graphs))
        static, output, replay = entry
        for dst, src in zip(static, tensors):
            dst.copy_(src)
        replay()
        self.replays += 1
        if callback is not None:  # the graph has no Python per step: report the steps at the end
            for k in range(len(plan.steps)):
                callback(k + 1, len(plan.steps))
        return output.clone()
