"""The shape policy under torch.compile: a sweep of the request shapes the engine produces
(3 caption lengths in 3 different 32-token classes, 2 sizes, CFG off / on with truncation,
batch 1 / 2) through ``compile="blocks"`` with a graph-inspecting counting backend.

Checked: no single-image request (with or without CFG) ever calls a masked attention graph; no
recompile-limit hit (dynamo's warning) and no engine warning; a handful of graphs in all. And the
checks can fail: a batch that mixes caption lengths does call masked graphs, and the static
policy under dynamo's default limit hits it, with the engine's warning naming the shape.
"""

from __future__ import annotations

import logging

import pytest
import torch

from zimage_native import ZImagePipeline

PROMPTS = ["a cat",  # 14 tokens with the test tokenizer: class 32
           "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat",  # 45: 64
           "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat drifting "
           "near the shore under pine trees, birds in the sky, reflections on calm water"]  # 104: 128
SIZES = [(32, 48), (48, 48)]
CFG = [dict(guidance_scale=0.0), dict(guidance_scale=3.0, cfg_truncation=0.5)]  # truncation: guided + plain steps


class InspectingBackend:
    """Counts graphs and records, for every call of a compiled block graph, whether it takes a mask
    (a 2-D bool input: the key mask; the block's other inputs are float)."""

    def __init__(self):
        self.graphs = 0
        self.masked_graphs = 0
        self.calls: list[bool] = []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        masked = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.ndim == 2 for t in example_inputs)
        self.masked_graphs += masked

        def run(*args):
            self.calls.append(masked)
            return gm.forward(*args)

        return run


def sweep(pipe, backend, prompts=PROMPTS, sizes=SIZES):
    for prompt in prompts:
        for height, width in sizes:
            for cfg in CFG:
                for batch in (1, 2):
                    backend.calls.clear()
                    pipe(prompt, height=height, width=width, num_inference_steps=2, num_images_per_prompt=batch,
                         output_type="latent", seed=0, **cfg)
                    assert backend.calls, "the compiled blocks did not run"
                    assert not any(backend.calls), (f"masked attention for {prompt[:12]!r} {height}x{width} {cfg} "
                                                    f"batch {batch}")


class LimitHits(logging.Handler):
    """Dynamo's own 'hit config.recompile_limit' warnings (its loggers do not propagate to caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "hit config." in record.getMessage():
            self.messages.append(record.getMessage())


@pytest.fixture
def limit_hits():
    handler, logger = LimitHits(), logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def pipe(tiny_model_dir):
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = False
    return pipe


def test_sweep_has_no_masks_for_single_images_and_no_recompile_limit_hit(pipe, caplog, limit_hits):
    torch._dynamo.reset()
    backend = InspectingBackend()
    lines = pipe.optimize(compile="blocks", compile_backend=backend)
    assert "shapes dynamic" in lines[-1]
    with caplog.at_level(logging.WARNING):
        sweep(pipe, backend)
    assert not limit_hits.messages, limit_hits.messages
    assert not [r.message for r in caplog.records if "recompile limit" in r.message]
    # One symbolic sequence dim: graphs per (modulated or not) x (batch 1, 2) x CFG-independent shapes.
    print(f"shape sweep: {backend.graphs} graphs for {len(PROMPTS) * len(SIZES) * len(CFG) * 2} requests")
    assert backend.graphs <= 4 and backend.masked_graphs == 0
    backend.calls.clear()
    pipe(PROMPTS[:2], height=32, width=48, num_inference_steps=1, output_type="latent", seed=0)
    assert any(backend.calls), "a batch mixing caption lengths must use the masked path"


def test_static_shapes_under_the_default_limit_warn_naming_the_shape(pipe, caplog, limit_hits):
    import torch._dynamo.config as config

    from zimage_native.accel.compile import recompile_limit_name, set_recompile_limit

    torch._dynamo.reset()
    # Restored by hand: pytest >= 9.2's monkeypatch deletes a torch config entry on undo (hiding it).
    name = recompile_limit_name()  # cache_size_limit in torch 2.6
    saved = getattr(config, name)
    try:
        backend = InspectingBackend()
        pipe.optimize(compile="blocks", compile_backend=backend, shapes="static")
        set_recompile_limit(0)  # keeps the engine's limit; now force dynamo's default back:
        setattr(config, name, 8)
        pipe.transformer._zimage_compiled[2].limit = 8
        with caplog.at_level(logging.WARNING):
            sweep(pipe, backend, sizes=SIZES[:1] + [(64, 64)])
    finally:
        setattr(config, name, saved)
    assert any(f"hit config.{name}" in m for m in limit_hits.messages), "static shapes exceed 8 classes"
    messages = [r.getMessage() for r in caplog.records]
    ours = [m for m in messages if m.startswith("torch.compile: the transformer block gets a new shape class (TransformerBlock")]
    assert ours and "sequence" in ours[0] and "past the recompile limit 8" in ours[0], messages
