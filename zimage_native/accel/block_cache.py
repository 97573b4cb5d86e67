"""First-block cache: reuse the main layers' work on steps where it would barely change.

The idea is ParaAttention's First Block Cache (also diffusers' ``FirstBlockCacheConfig`` and the
F1B0 setting of cache-dit's DBCache): on every step the DiT runs its noise refiner and the first
main layer as usual. The first layer's residual r = layer_0(h) - h is compared with the one of the
last step that ran every layer:

    change = mean |r - r_full| / mean |r_full|

If the change is at most the threshold, the other main layers are skipped: their residual of that
full step (its output minus the first layer's output) is added to the first layer's output, and the
final layer runs as usual. Otherwise every layer runs and both residuals are kept for later steps.
The comparison is always with the last full step, so a run of skipped steps cannot drift away from
it unnoticed. The first step of a request always runs in full (there is nothing to compare with).

Each forward of a request keeps its own residuals: with CFG the positives and the negatives (two
forwards per step, ``sampling.run_steps``) decide separately, as cache-dit does with its separate
CFG option. A batch of several images decides once for the batch, on the mean over all of it.

ControlNet hints are added after their layers on full steps; a skipped step adds the first layer's
hint only (the other layers' hints are part of the reused residual). Its ControlNet branch still
runs every step.

The decision reads one number on the host per forward (a sync, as in every dynamic cache), so the
cache runs on the eager step loop: not under CUDA graphs (whose replay has no host decisions) and
not with ``compile="full"`` (one graph for the whole forward, which the cache runs in parts);
``compile="blocks"`` compiles the layers themselves and works with it. :func:`cache_problem` says
so before a request runs.

With streamed blocks (``offload="blocks"``) the first layer prefetches nothing while the cache
decides, and the decision prefetches what follows it: the second layer or the next forward's first
block (``offload.runs_next`` with None, ``offload.resume_after``), so each block is copied once per use.

It is lossy: the threshold trades quality for speed (``sampling.GenerationRequest.first_block_cache``;
docs/performance.md, "First-block cache").
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field

import torch

from ..offload import resume_after, runs_next


def check_threshold(threshold) -> None:
    """A first-block cache threshold must be a finite number >= 0 (0 turns the cache off); any real
    number (numpy's float32 too), as the other settings take."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) \
            or threshold < 0:
        raise ValueError(f"first_block_cache must be a number >= 0 (0 = off; 0.05 to 0.2 is a usual range), "
                         f"got {threshold!r}")


def cache_problem(cuda_graphs: bool, compile_mode: str | None) -> str | None:
    """Why the first-block cache cannot run with these speed settings (None when it can)."""
    if cuda_graphs:
        return ("the first-block cache decides on the host at every step, which a CUDA graph replay cannot: "
                "turn off CUDA graphs (--no-cuda-graphs) or the cache")
    if compile_mode == "full":
        return ("the first-block cache runs the DiT forward in parts, which compile mode \"full\" compiles as "
                "one graph: use compile mode \"blocks\" (--compile blocks) with the cache")
    return None


def pipeline_cache_problem(pipe) -> str | None:
    """:func:`cache_problem` for a pipeline's current settings."""
    from .compile import compiled_mode

    mode = compiled_mode(pipe.transformer)
    return cache_problem(getattr(pipe, "_graphed", None) is not None, mode[0] if mode else None)


@dataclass
class _Branch:
    head_residual: torch.Tensor | None = None  # the first layer's residual at the last full step
    tail_residual: torch.Tensor | None = None  # the other layers' residual at that step


@dataclass
class FirstBlockCache:
    """The cache of one request (see the module doc). ``forward`` stands in for
    ``ZImageTransformer.forward_tokens``, run within :meth:`deciding` with the forward's ControlNet
    hints; ``branch`` names the forward's residuals ("positive", "negative"). ``full`` /
    ``reused`` count the forwards of each kind."""

    threshold: float
    branches: dict[str, _Branch] = field(default_factory=dict)
    full: int = 0
    reused: int = 0

    def forward(self, dit, branch: str, x: torch.Tensor, cap_tokens: torch.Tensor, layout, mods: list[torch.Tensor],
                control_hints: dict[int, torch.Tensor] | None = None,
                image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        state = self.branches.setdefault(branch, _Branch())
        decides = state.head_residual is not None  # (the first forward of a branch runs in full)
        h = dit.joint_tokens(x, cap_tokens, layout, mods, image_tokens)
        head = dit.run_layers(h, layout, mods, control_hints, 0, 1)
        residual = head - h
        if decides and self.small_change(residual, state.head_residual):
            resume_after(dit, dit.layers[-1])  # what follows the skipped layers: the next forward
            self.reused += 1
            out = head + state.tail_residual
        else:
            if decides:
                resume_after(dit, dit.layers[0])  # the next layer
            self.full += 1
            out = dit.run_layers(head, layout, mods, control_hints, 1)
            state.head_residual, state.tail_residual = residual, out - head
        return dit.final_tokens(out, x.shape[1], mods)

    def deciding(self, dit, branch: str):
        """Within: the forward of ``branch`` (:meth:`forward`) and its ControlNet hints, which a
        ControlNet 2.x computes with the DiT's noise-refiner blocks before it. Streamed blocks
        (offload="blocks"): when the cache decides on this forward, which block follows the first
        main layer is known only once it has, so that layer prefetches nothing, nor does a block whose
        prefetch reaches it (``offload.runs_next`` with None), and the decision says what follows
        (``offload.resume_after``). When only :meth:`forward` named the first layer's successor None, a
        prefetch of depth 2 from the hints' last refiner block (run before the forward) copied the
        second main layer in for nothing on every reused step."""
        state = self.branches.get(branch)
        if state is None or state.head_residual is None:  # (runs in full)
            return contextlib.nullcontext()
        return runs_next(dit, dit.layers[0], None)

    def small_change(self, residual: torch.Tensor, before: torch.Tensor) -> bool:
        change = (residual - before).abs().mean() / before.abs().mean()
        return bool(change.item() <= self.threshold)  # one host read per forward

    def counts(self) -> dict[str, int]:
        """What the cache did: DiT forwards run in full and forwards that reused the main layers."""
        return {"full": self.full, "reused": self.reused}
