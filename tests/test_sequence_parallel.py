"""Sequence-parallel readiness: the module boundaries SP engines hook into, and Ulysses attention over
the attention seam with torch.distributed (gloo, 2 processes) equal to one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zimage_native.config import TransformerConfig
from zimage_native.model.sequence import SequenceLayout, build_layout, pad_captions, patchify
from zimage_native.model.transformer import FinalLayer, ZImageTransformer
from zimage_native.testing import randomize_

from .dit_configs import REAL_HEADS_DIT


def make_inputs():
    torch.manual_seed(0)
    config = TransformerConfig.from_dict(REAL_HEADS_DIT)
    dit = randomize_(ZImageTransformer(config).eval(), seed=3)
    g = torch.Generator().manual_seed(1)
    caps = [torch.randn(9, config.cap_feat_dim, generator=g), torch.randn(40, config.cap_feat_dim, generator=g)]
    layout = build_layout(config, [9, 40], 12, 20)  # 60 patches -> 64 image rows; captions 32 and 64
    x = patchify(torch.randn(2, 16, 12, 20, generator=g))
    cap = pad_captions(caps, layout.caption_pad.shape[1])
    t = torch.tensor([0.3, 0.3])
    return dit, x, cap, t, layout


def test_module_boundaries_for_sequence_parallel_engines():
    """SP plans shard and gather at module boundaries: the joint sequence is built by
    model.sequence (outside forward), the blocks are a ModuleList, the final layer a module."""
    dit, x, cap, t, layout = make_inputs()
    assert isinstance(layout, SequenceLayout) and layout.joint_rope[0].shape[1] == 64 + 64
    assert isinstance(dit.layers, torch.nn.ModuleList) and isinstance(dit.final_layer, FinalLayer)
    seen = []
    dit.layers[0].register_forward_pre_hook(lambda m, a: seen.append(("first block", a[0].shape)))
    dit.final_layer.register_forward_pre_hook(lambda m, a: seen.append(("final layer", a[0].shape)))
    with torch.no_grad():
        dit(x, cap, t, layout)
    assert seen == [("first block", torch.Size([2, 128, 256])), ("final layer", torch.Size([2, 64, 256]))]


def _worker(rank: int, world: int, store: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from zimage_native.accel.sequence_parallel import enable_ulysses_

        dit, x, cap, t, layout = make_inputs()
        with torch.no_grad():
            expected = dit(x, cap, t, layout)
            handle = enable_ulysses_(dit)
            got = dit(x, cap, t, layout)
            handle.remove()
            again = dit(x, cap, t, layout)
        err = ((got - expected).norm() / expected.norm()).item()
        queue.put((rank, err, torch.equal(again, expected)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ulysses_attention_over_two_processes_equals_one_process(tmp_path):
    # The rendezvous is a file in tmp_path, not MASTER_PORT: a port picked and closed here was bound
    # by rank 0 only after the spawned processes imported torch, and under -n 2 the other worker's
    # servers could be handed it meanwhile (rank 0 then failed: address already in use).
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), queue), nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    for rank, err, restored in results:
        assert err < 1e-5, f"rank {rank}: relative error {err:.2e}"
        assert restored, f"rank {rank}: remove() did not restore the model"


def test_ulysses_rejects_a_group_that_does_not_divide_the_heads(monkeypatch):
    from zimage_native.accel import sequence_parallel as sp

    monkeypatch.setattr(sp.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(sp.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(sp.dist, "group", type("G", (), {"WORLD": None}))
    dit = ZImageTransformer(TransformerConfig.from_dict(dict(REAL_HEADS_DIT, dim=384, n_heads=3)))
    with pytest.raises(ValueError, match="divide the 3 heads"):
        sp.enable_ulysses_(dit)
