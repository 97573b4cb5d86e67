"""Ulysses sequence parallelism for the DiT's main layers, at module boundaries.

The joint [image, caption] sequence of the 30 main blocks is split across the ranks of a process
group. Everything in a block is per token except attention, so only the attention seam changes:
an all-to-all turns (all heads, my tokens) into (my heads, all tokens), attention runs as usual
with the full key mask, and a second all-to-all turns it back. The split and the gather happen in
hooks on the first and last main block, and each block's RoPE tables are sliced to the rank's
tokens, so the model code is unchanged (the ``_sp_plan`` idea of vLLM-Omni and xDiT).

Constraints: the number of heads (30 for Z-Image) must be divisible by the group size (2, 3, 5, 6,
10, 15, 30); the joint length, a multiple of 32, must be divisible by it too. Ring attention has no
head constraint and is the planned path for larger groups (docs/scaling.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange equal chunks of dim 0 between the ranks: out[r] is rank r's chunk for this rank."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x (empty_like of a permuted view would keep its strides)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(t: torch.Tensor, group) -> torch.Tensor:
    """(B, H, L/W, Dh) on each rank -> (B, H/W, L, Dh): this rank's heads for the whole sequence."""
    w = dist.get_world_size(group)
    b, h, ls, d = t.shape
    chunks = t.reshape(b, w, h // w, ls, d).permute(1, 0, 2, 3, 4)  # (W, B, H/W, Ls, Dh) by head group
    got = _all_to_all(chunks, group)  # got[r]: rank r's tokens for my head group
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // w, w * ls, d)


def heads_to_seq(t: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: (B, H/W, L, Dh) -> (B, H, L/W, Dh)."""
    w = dist.get_world_size(group)
    b, hw, length, d = t.shape
    chunks = t.reshape(b, hw, w, length // w, d).permute(2, 0, 1, 3, 4)  # (W, B, H/W, Ls, Dh) by token shard
    got = _all_to_all(chunks, group)  # got[r]: rank r's heads for my tokens
    return got.permute(1, 0, 2, 3, 4).reshape(b, w * hw, length // w, d)


def ulysses(attn_fn, group):
    """Wrap an attention function (the seam's signature) in the two all-to-alls."""

    def attention(q, k, v, mask=None):
        out = attn_fn(seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group), mask)
        return heads_to_seq(out, group)

    return attention


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if t.shape[1] % world:
        raise ValueError(f"sequence length {t.shape[1]} is not divisible by the group size {world}")
    return t.chunk(world, dim=1)[rank]


class UlyssesHandle:
    """Returned by :func:`enable_ulysses_`; ``remove()`` restores the model."""

    def __init__(self, hooks, attention_fns):
        self.hooks, self.attention_fns = hooks, attention_fns

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module, fn in self.attention_fns:
            module.attn_fn = fn


def enable_ulysses_(transformer: nn.Module, group=None) -> UlyssesHandle:
    """Run ``transformer.layers`` sequence-parallel over ``group`` (every rank calls the model with the
    same full inputs and gets the same full output)."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    heads = transformer.config.n_heads
    if heads % world:
        raise ValueError(f"Ulysses needs the group size to divide the {heads} heads; got {world}")
    blocks = list(transformer.layers)

    def split_inputs(module, args, kwargs):
        x, rope, mask = args[:3]
        if module is blocks[0]:
            x = _shard(x, rank, world)
        rope = tuple(_shard(t, rank, world) for t in rope)  # the rank's tokens' rotations
        return (x, rope, mask, *args[3:]), kwargs  # the key mask stays whole: attention sees every key

    def gather_output(module, args, kwargs, out):
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    hooks = [b.register_forward_pre_hook(split_inputs, with_kwargs=True) for b in blocks]
    hooks.append(blocks[-1].register_forward_hook(gather_output, with_kwargs=True))
    attention_fns = []
    for b in blocks:
        attention_fns.append((b.attention, b.attention.attn_fn))
        b.attention.attn_fn = ulysses(b.attention.attn_fn, group)
    return UlyssesHandle(hooks, attention_fns)
