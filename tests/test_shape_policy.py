"""The shape policy under torch.compile: a sweep of the request shapes the engine produces
(3 caption lengths in 3 different 32-token classes, 2 sizes, CFG off / on with truncation,
batch 1 / 2) through ``compile="blocks"`` with a graph-inspecting counting backend.

Checked: no single-image request (with or without CFG) ever calls a masked attention graph; no
recompile-limit hit (dynamo's warning) and no engine warning; a handful of graphs in all. And the
checks can fail: a batch that mixes caption lengths does call masked graphs, and the static
policy under dynamo's default limit hits it, with the engine's warning naming the shape.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from zimage_native import ZImagePipeline

PROMPTS = ["a cat",  # 14 tokens with the test tokenizer: class 32
           "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat",  # 45: 64
           "a watercolor painting of mountains at dawn, soft light, mist over the lake, a small red boat drifting "
           "near the shore under pine trees, birds in the sky, reflections on calm water"]  # 104: 128
SIZES = [(32, 48), (48, 48)]
CFG = [dict(guidance_scale=0.0), dict(guidance_scale=3.0, cfg_truncation=0.2)]  # truncation: guided + plain steps
# (2 steps at shift 3 run at model times 0 and 0.25: the first guided, the second plain)


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


def test_shape_classes_after_a_reset_count_the_graphs_dynamo_holds(caplog, limit_hits):
    """After torch._dynamo.reset(), a class seen before and run again first (dynamo compiles it again:
    1 graph) must not leave the other classes seen before counted: the next new classes are counted
    by the graphs dynamo holds (1, then 2, under a limit of 3), and the warning still comes when it
    holds 3 and dynamo runs the next class eagerly."""
    import torch._dynamo.config as config
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import ShapeClasses, _dynamo_graphs, recompile_limit_name

    def f(x):
        return x.sin() + 1

    name = recompile_limit_name()
    saved = getattr(config, name)
    held = []
    try:
        setattr(config, name, 3)
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(f, backend=counter, dynamic=False)
        classes = ShapeClasses("f", 3, f.__code__)
        torch._dynamo.reset()
        with caplog.at_level(logging.WARNING):
            for n in (1, 2, 3, "reset", 1, 4, 5, 6):
                if n == "reset":
                    torch._dynamo.reset()
                    continue
                classes.note((n,), lambda: f"(size {n})")
                compiled(torch.ones(n))
                held.append(_dynamo_graphs(f.__code__))
    finally:
        setattr(config, name, saved)
    assert held == [1, 2, 3, 1, 2, 3, 3], held
    ours = [r.getMessage() for r in caplog.records if "past the recompile limit" in r.getMessage()]
    assert len(ours) == 1 and "(size 6), number 4" in ours[0], ours
    assert len(limit_hits.messages) == 1, limit_hits.messages  # dynamo's own, for size 6 only


def packed_tiny_dit():
    """The tiny DiT with every block's to_q and w2 kept in fp8 (FP8StoredLinear, a packed linear, as a
    GGUF one is): LoRAs on them are side paths added after compiling."""
    from zimage_native.config import TransformerConfig
    from zimage_native.model.transformer import ZImageTransformer
    from zimage_native.quant_linear import FP8StoredLinear
    from zimage_native.testing import randomize_

    from .dit_configs import TINY_DIT

    model = randomize_(ZImageTransformer(TransformerConfig.from_dict(TINY_DIT))).eval()
    for block in (*model.noise_refiner, *model.context_refiner, *model.layers):
        for parent, name in ((block.attention, "to_q"), (block.feed_forward, "w2")):
            linear = getattr(parent, name)
            packed = FP8StoredLinear.like(linear, torch.float8_e4m3fn)
            packed.weight.copy_(linear.weight.detach().to(torch.float8_e4m3fn).view(torch.uint8))
            packed.scale.fill_(1.0)
            setattr(parent, name, packed)
    return model


def block_lora(dim: int, ffn: int, g: torch.Generator, rank: int) -> dict[str, torch.Tensor]:
    """A LoRA of ``rank`` on to_q and w2 of one block of each kind (modulated and unmodulated)."""
    out = {}
    for where in ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"):
        for module, width in (("attention.to_q", dim), ("feed_forward.w2", ffn)):
            out[f"diffusion_model.{where}.{module}.lora_A.weight"] = torch.randn(rank, width, generator=g) * 0.05
            out[f"diffusion_model.{where}.{module}.lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.05
    return out


def packed_dit_and_inputs():
    """:func:`packed_tiny_dit`, the generator its LoRAs draw from (seeded 0) and one forward's inputs
    (an 8x8 latent, a 5-token caption)."""
    from zimage_native.model.sequence import build_layout, pad_captions, patchify

    model = packed_tiny_dit()
    g = torch.Generator().manual_seed(0)
    layout = build_layout(model.config, [5], 8, 8, "cpu")
    inputs = (patchify(torch.randn(1, 16, 8, 8, generator=g)),
              pad_captions([torch.randn(5, model.config.cap_feat_dim, generator=g)], layout.caption_pad.shape[1]),
              torch.tensor([0.3]), layout)
    return model, g, inputs


def test_lora_side_paths_loaded_after_compiling_are_counted_as_shape_classes(caplog, no_classes_seen):
    """A LoRA on packed linears is a side path that dynamo guards (its rank, its kind): every load of a
    new rank or kind compiles the block again, so the engine counts each as a shape class, and warns
    when dynamo's limit is reached instead of letting the block run eagerly unannounced."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import _block_forward, _dynamo_graphs, compile_transformer_
    from zimage_native.lora import LoraStack

    model, g, inputs = packed_dit_and_inputs()
    dim, ffn = model.config.dim, model.layers[0].feed_forward.w2.in_features

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    # Ranks 2 and 20: the buckets 16 and 32 (ranks are padded to buckets: see the next test).
    loras = [{"diffusion_model.layers.0.attention.to_q.lora_A.weight": r(rank, dim),
              "diffusion_model.layers.0.attention.to_q.lora_B.weight": r(dim, rank)} for rank in (2, 20)]
    loras.append({"lycoris_layers_0_feed_forward_w2.lokr_w1": r(2, 2),  # a LoKr: a Kronecker side path
                  "lycoris_layers_0_feed_forward_w2.lokr_w2": r(dim // 2, ffn // 2)})
    loras.append({f"lycoris_layers_1_attention_to_q.hada_{w}": r(*shape)  # a LoHa (rank 5 x 8: bucket 64) on another block
                  for w, shape in (("w1_a", (dim, 5)), ("w1_b", (5, dim)), ("w2_a", (dim, 8)), ("w2_b", (8, dim)))})
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compile_transformer_(model, "blocks", counter)
    classes = model._zimage_compiled[2]
    stack = LoraStack()
    with torch.no_grad():
        model(*inputs)
        for lora in loras:
            stack.load(model, lora)
            model(*inputs)
            stack.unload(model)
            model(*inputs)  # back to the graphs without side paths
        frames = counter.frame_count
        stack.load(model, loras[0], 0.5)  # a rank seen before, at another scale: the scale is in the weights
        model(*inputs)
        stack.unload(model)
        assert counter.frame_count == frames, "a LoRA scale change recompiled"
    graphs = _dynamo_graphs(_block_forward.__code__)
    assert counter.frame_count == 2 + len(loras)  # (modulated, unmodulated) blocks, and one per side path
    assert len(classes.seen) == counter.frame_count and graphs in (None, counter.frame_count)
    # Past the limit, the next new side-path structure is named in the engine's warning.
    classes.limit = len(classes.seen)
    stack.load(model, {"diffusion_model.layers.0.feed_forward.w2.lora_A.weight": r(8, ffn),
                       "diffusion_model.layers.0.feed_forward.w2.lora_B.weight": r(dim, 8)})
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(*inputs)
    assert "1 LoRA side paths" in caplog.text and "past the recompile limit" in caplog.text, caplog.text


def fused_eager_copy(model, lora, scale=1.0):
    """An eager copy of a packed DiT with every packed linear as an nn.Linear of its dequantised
    weight (fp32) and ``lora`` (one or a list, at ``scale``: one or one per LoRA) fused into those
    weights: the reference for side paths."""
    import copy

    from zimage_native.lora import LoraStack
    from zimage_native.quant_linear import PackedLinear

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, PackedLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(m.dequantize(torch.float32))
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, linear)
    if not isinstance(lora, list) or lora:
        LoraStack().load(ref, lora, scale)
    return ref


def test_lora_ranks_are_padded_to_buckets_so_a_rank_swap_reuses_the_graph(no_classes_seen):
    """A server swapping LoRAs of ranks 4, 8, 16, 32 and 64 on a compiled packed DiT: each side
    path's rank is padded with zeros to its bucket (16, 32, 64 here: the layers are 64 wide), so
    dynamo compiles one block graph per bucket and kind of block (modulated or not), not one per
    rank (2 + 2 x 5 = 12 graphs before the padding, 2 + 2 x 3 = 8 with it). The compiled outputs
    equal the eager model with each LoRA fused into the dequantised weights."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import compile_transformer_
    from zimage_native.lora import LoraStack

    from .utils import assert_rel

    model, g, inputs = packed_dit_and_inputs()
    dim, ffn = model.config.dim, model.layers[0].feed_forward.w2.in_features

    lora = functools.partial(block_lora, dim, ffn, g)

    loras = {rank: lora(rank) for rank in (4, 8, 16, 32, 64)}
    references = {}
    with torch.no_grad():
        for rank, state in loras.items():
            references[rank] = fused_eager_copy(model, state)(*inputs)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compile_transformer_(model, "blocks", counter)
    stack = LoraStack()
    with torch.no_grad():
        model(*inputs)
        for rank, state in loras.items():
            stack.load(model, state)
            assert {tuple(getattr(model.layers[0].attention.to_q, name).shape)
                    for name in model.layers[0].attention.to_q.lora[0][:2]} == {(dim, max(16, rank)), (max(16, rank), dim)}
            assert_rel(model(*inputs), references[rank], 1e-5, f"compiled side paths of rank {rank}")
            stack.unload(model)
    assert counter.frame_count == 2 + 2 * 3, counter.frame_count


@pytest.fixture
def no_classes_seen():
    """The engine's shape classes are process-wide, and forgotten after torch._dynamo.reset() only when
    a new one comes: a test that counts them from none starts from none and leaves none behind."""
    from zimage_native.accel.compile import _CLASSES

    for classes in _CLASSES.values():
        classes.seen.clear()
    yield
    for classes in _CLASSES.values():
        classes.seen.clear()


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_side_path_structure_is_walked_again_only_after_a_lora_change(monkeypatch, no_classes_seen, mode):
    """The side paths' structure (part of every compiled call's shape class) is cached per compiled
    call site and walked again only after a load_lora / unload_lora: forwards without a change do
    not walk the layers, while a load and an unload still change the key (the classes seen) and
    the output."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel import compile as compiled
    from zimage_native.lora import LoraStack

    model, g, inputs = packed_dit_and_inputs()
    dim = model.config.dim
    lora = {"diffusion_model.layers.1.attention.to_q.lora_A.weight": torch.randn(4, dim, generator=g),
            "diffusion_model.layers.1.attention.to_q.lora_B.weight": torch.randn(dim, 4, generator=g)}
    walks = []
    real = compiled.side_path_structure
    monkeypatch.setattr(compiled, "side_path_structure", lambda packed: walks.append(1) or real(packed))
    torch._dynamo.reset()
    compiled.compile_transformer_(model, mode, CompileCounterWithBackend("eager"))
    sites = 4 if mode == "blocks" else 2  # 4 blocks; or forward_tokens and encode_caption
    classes = model._zimage_compiled[2] if mode == "blocks" else compiled._CLASSES["ZImageTransformer.forward_tokens"]
    stack = LoraStack()
    with torch.no_grad():
        plain = model(*inputs)
        assert len(walks) == sites
        for _ in range(2):
            model(*inputs)
        assert len(walks) == sites, "the side paths were walked again without a LoRA change"
        seen = len(classes.seen)
        stack.load(model, lora)
        with_lora = model(*inputs)
        assert len(walks) == 2 * sites and not torch.equal(with_lora, plain)
        assert len(classes.seen) == seen + 1 and any(compiled._describe_sides(key[-1]) for key in classes.seen)
        model(*inputs)
        assert len(walks) == 2 * sites
        stack.unload(model)
        assert torch.equal(model(*inputs), plain) and len(walks) == 3 * sites
        assert len(classes.seen) == seen + 1  # back to the class without side paths


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compiled_side_paths_follow_load_unload_rescale_and_stack(no_classes_seen, mode):
    """A compiled, partly packed DiT (to_q and w2 packed, to_k not) through a server's LoRA changes
    between runs: each output equals the eager DiT with the same LoRAs fused into its (dequantised)
    weights, and never an earlier graph's weights or side paths."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import compile_transformer_
    from zimage_native.lora import LoraStack

    from .utils import assert_rel

    model, g, inputs = packed_dit_and_inputs()
    dim, ffn = model.config.dim, model.layers[0].feed_forward.w2.in_features

    def lora(rank):
        out = {}
        for where in ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"):
            for module, width in (("attention.to_q", dim), ("attention.to_k", dim), ("feed_forward.w2", ffn)):
                out[f"diffusion_model.{where}.{module}.lora_A.weight"] = torch.randn(rank, width, generator=g) * 0.05
                out[f"diffusion_model.{where}.{module}.lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.05
        return out

    a, b = lora(4), lora(24)
    runs = [([], []), ([a], [1.0]), ([], []), ([a], [0.5]), ([a, b], [0.5, 0.8]), ([], []), ([b], [-1.0]), ([], [])]
    with torch.no_grad():
        references = [fused_eager_copy(model, loras, scales)(*inputs) for loras, scales in runs]
    torch._dynamo.reset()
    compile_transformer_(model, mode, CompileCounterWithBackend("eager"))
    stack = LoraStack()
    for i, ((loras, scales), want) in enumerate(zip(runs, references)):
        stack.unload(model)
        if loras:
            stack.load(model, loras, scales)
        with torch.no_grad():
            assert_rel(model(*inputs), want, 1e-5, f"run {i}: {len(loras)} LoRAs at {scales}")


def test_stacked_loras_join_one_side_path_per_layer(no_classes_seen):
    """LoRAs stacked on a packed linear join its one low-rank side path (their factors side by side,
    without the padding's zero rows): 1, 2 or 3 stacked rank-4 LoRAs are one side path of rank 4, 8
    or 12 in bucket 16, so the compiled blocks keep one graph per kind of block (before: one more
    side path, and a new graph pair, per LoRA stacked). Outputs equal the eager DiT with the LoRAs
    fused."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import compile_transformer_
    from zimage_native.lora import LoraStack

    from .utils import assert_rel

    model, g, inputs = packed_dit_and_inputs()
    dim = model.config.dim
    loras = [{f"diffusion_model.{where}.attention.to_q.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.05
              for where in ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")
              for ab, shape in (("A", (4, dim)), ("B", (dim, 4)))} for _ in range(3)]
    with torch.no_grad():
        references = [fused_eager_copy(model, loras[:n], [0.5] * n)(*inputs) for n in (1, 2, 3)]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compile_transformer_(model, "blocks", counter)
    stack = LoraStack()
    layer = model.layers[0].attention.to_q
    with torch.no_grad():
        for n, want in zip((1, 2, 3), references):
            stack.load(model, loras[n - 1], 0.5)
            assert len(layer.lora) == 1 and layer.side_paths()[0].a.shape == (16, dim)
            assert int(layer.side_paths()[0].a.ne(0).any(dim=1).sum()) == 4 * n  # the ranks side by side
            assert_rel(model(*inputs), want, 1e-5, f"{n} stacked LoRAs")
    assert counter.frame_count == 2, counter.frame_count


def test_loras_stacked_past_a_layers_smaller_side_are_held_as_one_delta(no_classes_seen):
    """Factors past the cap of rank_bucket (the layer's smaller side) were kept at their rank: each
    stack of rank-48 LoRAs on the 64-wide packed layers was a side path of rank 48 n (A (48 n, 64),
    B (64, 48 n): 12288 values for 2, 30720 for 5, where the delta B A is 4096) and a new block
    graph pair for every stack size (12 graphs for 1..5 LoRAs). Past the cap the side path is the
    delta itself, and later LoRAs add to it: one shape whatever the stack (6 graphs: none, bucket
    64, the delta). The outputs equal the eager DiT with the LoRAs fused."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import compile_transformer_
    from zimage_native.lora import LoraStack

    from .utils import assert_rel

    model, g, inputs = packed_dit_and_inputs()
    dim = model.config.dim
    layer = model.layers[0].attention.to_q
    assert min(layer.in_features, layer.out_features) == dim == 64

    def lora():
        return {f"diffusion_model.{where}.attention.to_q.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.05
                for where in ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")
                for ab, shape in (("A", (48, dim)), ("B", (dim, 48)))}

    stacks = {n: [lora() for _ in range(n)] for n in (1, 2, 3, 4)}
    with torch.no_grad():
        references = {n: fused_eager_copy(model, stack, [0.5] * n)(*inputs) for n, stack in stacks.items()}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compile_transformer_(model, "blocks", counter)
    loaded = LoraStack()
    with torch.no_grad():
        model(*inputs)
        for n, stack in stacks.items():
            loaded.load(model, stack, [0.5] * n)
            (side,) = layer.side_paths()
            if n == 1:  # rank 48, in bucket 64
                assert side.a.shape == (64, dim) and side.b.shape == (dim, 64)
            else:
                assert side.b is None and side.a.shape == (dim, dim)
            assert_rel(model(*inputs), references[n], 1e-5, f"{n} stacked rank-48 LoRAs")
            loaded.unload(model)
    assert counter.frame_count == 2 + 2 * 2, counter.frame_count


def test_a_full_delta_lora_stacked_on_a_packed_layers_side_path_joins_it():
    """A LoRA stacked on a packed layer joined its low-rank side path, or (since 9c2d829) was added to
    its delta, but a full-delta LoRA (b None) was always a side path of its own: a stack of n full
    deltas held n (out, in) deltas, one shape class more per stack size, and low-rank then full was
    two side paths where full then low-rank was one. Any LoRA on a layer with a delta now adds to it,
    and a full delta on low-rank factors joins them as the delta B A + D; removing the LoRAs gives the
    layer back exactly."""
    model, g, _ = packed_dit_and_inputs()
    layer = model.layers[0].feed_forward.w2  # (64, 170): packed, not square
    out, inp = layer.out_features, layer.in_features
    assert out != inp and not layer.lora
    x = torch.randn(3, inp, generator=g)
    with torch.no_grad():
        base = layer(x)

        def check(*terms):
            (side,) = layer.side_paths()
            assert side.b is None and side.a.shape == (out, inp)
            want = base + x @ sum(terms).T
            assert ((layer(x) - want).norm() / want.norm()).item() < 1e-6

        d1, d2 = (torch.randn(out, inp, generator=g) * 0.01 for _ in range(2))
        a, b = torch.randn(8, inp, generator=g) * 0.1, torch.randn(out, 8, generator=g) * 0.1
        layer.add_lora(d1, None, 0.5)
        layer.add_lora(d2, None, 2.0)
        check(0.5 * d1, 2.0 * d2)
        layer.add_lora(a, b, 0.7)
        check(0.5 * d1, 2.0 * d2, 0.7 * b @ a)
        assert layer.clear_lora() == 1 and torch.equal(layer(x), base)
        layer.add_lora(a, b, 0.7)
        layer.add_lora(d1, None, 0.5)
        check(0.7 * b @ a, 0.5 * d1)
        assert [name for name in layer._buffers if name.startswith("lora_")] == ["lora_a0"]
        assert layer.clear_lora() == 1 and torch.equal(layer(x), base)


def test_rank_buckets():
    from zimage_native.quant_linear import rank_bucket

    assert [rank_bucket(r, 3840, 3840) for r in (1, 4, 16, 17, 33, 128, 2049)] == [16, 16, 16, 32, 64, 128, 3840]
    assert rank_bucket(8, 64, 3840) == 16 and rank_bucket(40, 64, 3840) == 64  # capped by the smaller side
    assert rank_bucket(64, 3840, 64) == 64 and rank_bucket(100, 3840, 64) == 100  # at or past it: kept
    assert rank_bucket(4, 8, 3840) == 8


def test_full_graphs_count_the_side_paths_they_run(no_classes_seen):
    """compile="full": the per-step graph runs the blocks' side paths, the caption graph those of the
    context refiner; each method counts exactly the graphs dynamo keeps for it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import _CLASSES, _dynamo_graphs, compile_transformer_
    from zimage_native.lora import LoraStack
    from zimage_native.model.transformer import ZImageTransformer

    model, g, inputs = packed_dit_and_inputs()
    dim = model.config.dim
    torch._dynamo.reset()
    compile_transformer_(model, "full", CompileCounterWithBackend("eager"))
    stack = LoraStack()
    with torch.no_grad():
        model(*inputs)
        for where, rank in (("layers.0", 2), ("layers.0", 20), ("context_refiner.0", 2)):  # buckets 16, 32, 16
            stack.load(model, {f"diffusion_model.{where}.attention.to_q.lora_A.weight": torch.randn(rank, dim, generator=g),
                               f"diffusion_model.{where}.attention.to_q.lora_B.weight": torch.randn(dim, rank, generator=g)})
            model(*inputs)
            stack.unload(model)
    for name, graphs in (("forward_tokens", 3), ("encode_caption", 2)):
        seen = len(_CLASSES[f"ZImageTransformer.{name}"].seen)
        held = _dynamo_graphs(getattr(ZImageTransformer, name).__code__)
        assert seen == graphs and held in (None, graphs), (name, seen, held)


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_a_copied_dit_shares_the_shape_classes_and_graphs_of_the_original(caplog, limit_hits, monkeypatch,
                                                                         no_classes_seen, mode):
    """copy.deepcopy of a compiled DiT copied its shape classes too: a class the original ran after the
    copy was new to the copy, which, with dynamo holding as many graphs as its limit, warned "number 3
    ... past the recompile limit 2: dynamo runs it eagerly" (full) for a class whose graph dynamo held and
    ran (no new graph). The copy runs the original's graphs (the module is an input of the graph),
    so it shares its classes: no warning, no graph more, and the copy's own weights."""
    import copy

    import torch._dynamo.config as config
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel.compile import _CLASSES, compile_transformer_, recompile_limit_name, uncompile_
    from zimage_native.model.sequence import build_layout, pad_captions, patchify

    model, g, one = packed_dit_and_inputs()
    layout = build_layout(model.config, [5, 5], 8, 8, "cpu")
    two = (patchify(torch.randn(2, 16, 8, 8, generator=g)),
           pad_captions([torch.randn(5, model.config.cap_feat_dim, generator=g)] * 2, layout.caption_pad.shape[1]),
           torch.tensor([0.3, 0.3]), layout)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compile_transformer_(model, mode, counter)
    limit = {"full": 2, "blocks": 4}[mode]  # the classes of batch 1 and 2 (a block: modulated or not)
    monkeypatch.setattr(config, recompile_limit_name(), limit)
    for classes in _CLASSES.values():
        monkeypatch.setattr(classes, "limit", limit)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        model(*one)
        twin = copy.deepcopy(model)
        model(*two)
        frames = counter.frame_count
        for p in twin.layers[0].feed_forward.parameters():
            p.mul_(3)
        got = twin(*two)
    ours = [r.getMessage() for r in caplog.records if "past the recompile limit" in r.getMessage()]
    assert ours == [] and limit_hits.messages == [] and counter.frame_count == frames, (ours, counter.frame_count)
    eager = copy.deepcopy(twin)
    uncompile_(eager)
    with torch.no_grad():
        assert torch.equal(got, eager(*two))


def test_a_side_path_refit_of_one_structure_writes_in_place():
    """A refit (``clear_lora(keep=True)``, the LoRAs added again, ``end_refit``) that keeps the side
    paths' structure writes the new factors into the tensors they had (a captured CUDA graph holds
    their addresses), never into the caller's tensors, and keeps the LoRA generation; another
    bucket, another kind, a side path more or fewer, or a delta for factors is a new structure and
    moves the generation. Outputs equal a layer given the same LoRA from scratch."""
    from zimage_native.quant_linear import lora_generation

    model, g, _ = packed_dit_and_inputs()
    layer = model.layers[0].attention.to_q  # 64 x 64, packed
    x = torch.randn(3, 64, generator=g)

    def lo(rank):
        return torch.randn(rank, 64, generator=g) * 0.1, torch.randn(64, rank, generator=g) * 0.1

    kron, kron2 = ((torch.randn(2, 2, generator=g), torch.randn(32, 32, generator=g) * 0.1) for _ in range(2))
    (a4, b4), (a8, b8), (a20, b20) = lo(4), lo(8), lo(20)
    delta = torch.randn(64, 64, generator=g) * 0.01

    def fresh(*loras):
        other = packed_tiny_dit().layers[0].attention.to_q
        other.load_state_dict(layer.state_dict())
        for a, b, s, k in loras:
            other.add_lora(a, b, s, kron=k)
        return other(x)

    def refit(*loras):
        before = lora_generation()
        tensors = [t for t in layer._buffers.values() if t is not None]
        layer.clear_lora(keep=True)
        for a, b, s, k in loras:
            layer.add_lora(a, b, s, kron=k)
        layer.end_refit()
        same = lora_generation() == before
        kept = all(any(t is u for u in tensors) for name, t in layer._buffers.items() if name.startswith("lora_"))
        with torch.no_grad():
            assert torch.equal(layer(x), fresh(*loras))
        return same, kept

    callers = [t.clone() for t in (a4, b4, a8, b8, *kron, *kron2)]
    with torch.no_grad():
        layer.add_lora(a4, b4, 0.5)
        layer.add_lora(*kron, 0.7, kron=True)
        assert refit((a4, b4, 0.9, False), (*kron, -0.3, True)) == (True, True)  # other weights
        assert refit((a8, b8, 0.9, False), (*kron2, 0.7, True)) == (True, True)  # other LoRAs, same bucket
        assert refit((a4, b4, 0.5, False), (a8, b8, 0.2, False), (*kron, 1.0, True)) == (True, True)  # stacked: rank 12
        assert refit((*kron, 1.0, True), (a4, b4, 0.5, False)) == (False, False)  # the kinds' order swapped
        assert refit((*kron, 0.5, True), (a8, b8, 0.5, False)) == (True, True)
        assert refit((*kron, 0.5, True), (a20, b20, 0.5, False)) == (False, False)  # bucket 32: A and B anew
        assert refit((*kron, 0.5, True), (a20, b20, 0.3, False)) == (True, True)
        assert refit((*kron, 0.5, True)) == (False, True)  # a side path fewer
        assert refit((*kron, 0.5, True), (delta, None, 1.0, False)) == (False, False)  # a delta
        assert refit((*kron, 0.5, True), (delta, None, 2.0, False)) == (True, True)
        assert refit() == (False, True)
    assert all(torch.equal(t, c) for t, c in zip((a4, b4, a8, b8, *kron, *kron2), callers))  # not written into
    before = lora_generation()
    layer.add_lora(a4, b4, 0.5)
    layer.add_lora(a4, b4, 0.5)  # stacked on a side path of the same bucket, outside a refit: in place
    assert lora_generation() == before + 1 and len(layer.lora) == 1


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_a_compiled_dit_keeps_its_code_across_side_path_refits(monkeypatch, no_classes_seen, mode):
    """A server's adapter changes on a compiled packed DiT (another weight, another LoRA of the same
    rank bucket) as the pipeline refits them (``unload(keep=True)``, ``load``, ``end_refit``): the
    side paths are written in place, so dynamo compiles nothing and the side paths' structure is not
    walked again (the LoRA generation stays); the outputs equal the eager DiT with each LoRA fused."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from zimage_native.accel import compile as compiled
    from zimage_native.lora import LoraStack

    from .utils import assert_rel

    model, g, inputs = packed_dit_and_inputs()
    dim, ffn = model.config.dim, model.layers[0].feed_forward.w2.in_features

    lora = functools.partial(block_lora, dim, ffn, g)

    a, b = lora(4), lora(8)
    runs = [(a, 0.5), (b, 1.0), (a, -0.7), (b, 0.2)]
    with torch.no_grad():
        references = [fused_eager_copy(model, state, scale)(*inputs) for state, scale in runs]
    walks = []
    real = compiled.side_path_structure
    monkeypatch.setattr(compiled, "side_path_structure", lambda packed: walks.append(1) or real(packed))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled.compile_transformer_(model, mode, counter)
    stack = LoraStack()
    with torch.no_grad():
        stack.load(model, a, 0.5)
        assert_rel(model(*inputs), references[0], 1e-5, "the first LoRA")
        frames, walked = counter.frame_count, len(walks)
        for i, ((state, scale), want) in enumerate(zip(runs[1:], references[1:])):
            stack.unload(model, keep=True)
            stack.load(model, state, scale)
            stack.end_refit(model)
            assert_rel(model(*inputs), want, 1e-5, f"refit {i}")
    assert (counter.frame_count, len(walks)) == (frames, walked)


def test_each_compiled_shape_class_is_logged_once_when_its_first_call_compiles(pipe, caplog):
    """A server's first request of a new batch size (or caption mix) compiles new block graphs: the
    engine says so, once per graph dynamo compiles, and stays quiet for a new prompt length or size
    (the sequence dim is dynamic: no compile)."""
    torch._dynamo.reset()
    backend = InspectingBackend()
    pipe.optimize(compile="blocks", compile_backend=backend)
    kw = dict(num_inference_steps=1, output_type="latent", seed=0)
    said = []
    for prompt, height, batch in ((PROMPTS[0], 32, 1), (PROMPTS[1], 48, 1), (PROMPTS[2], 32, 1), (PROMPTS[0], 32, 2)):
        caplog.clear()
        graphs = backend.graphs
        with caplog.at_level(logging.INFO, logger="zimage_native.accel.compile"):
            pipe(prompt, height=height, width=48, num_images_per_prompt=batch, **kw)
        lines = [r.getMessage() for r in caplog.records if "compiled on this call" in r.getMessage()]
        said.append((len(lines), backend.graphs - graphs))
        assert all(f"batch {batch}," in line for line in lines), lines
    assert said == [(2, 2), (0, 0), (0, 0), (2, 2)], said
