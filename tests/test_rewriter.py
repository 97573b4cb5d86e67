"""The prompt rewriter on the tiny random Qwen3: the full model as a causal LM (all layers, the final
norm, the tied head), seeded and greedy decoding, think-part stripping and rewriter lookup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from zimage_native.prompt.format import format_prompt
from zimage_native.prompt.rewriter import (
    DEFAULT_REWRITER,
    PromptRewriter,
    RewriterMixin,
    _pick,
    build_rewrite_text,
    generate_ids,
    load_causal_lm,
    strip_think,
)
from zimage_native.prompt.templates import Template, UnknownTemplateError, default_registry

from .utils import assert_rel

NEW = 12  # new tokens per rewrite: enough to see the path run, few enough to stay fast


class Host(RewriterMixin):
    """The two attributes RewriterMixin needs from a pipeline."""

    def __init__(self, model_folder, text_encoder):
        self.model_folder = model_folder
        self.text_encoder = text_encoder


@pytest.fixture(scope="module")
def host(tiny_model_dir, tiny_pipe):
    h = Host(tiny_model_dir, tiny_pipe.text_encoder)
    yield h
    h.unload_rewriter()


@pytest.fixture(scope="module")
def lm(host):
    return host.load_rewriter()


# ---------------------------------------------------------------------------------------------
# Loading


def test_loads_the_full_model_and_matches_transformers_causal_lm(tiny_model_dir, lm, tiny_pipe):
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch.float32).eval()
    assert ref.config.tie_word_embeddings
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    assert len(lm.model.layers) == ref.config.num_hidden_layers
    assert type(lm.model.norm) is type(ref.model.norm)  # the final norm is there, not an identity
    assert lm.lm_head is None and lm.head_weight is lm.model.embed_tokens.weight  # tied head

    text = format_prompt("a watercolor painting of mountains", system_prompt="Describe it.")
    ids = torch.tensor([tiny_pipe.text_encoder.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = ref(ids).logits
        got = lm(ids)
        assert_rel(got, expected, 1e-5, "logits")
        # The cached path (prefill, then one token at a time) gives the same last-token logits.
        cache = lm.new_cache()
        lm(ids[:, :-3], cache=cache)
        for i in range(3, 0, -1):
            step = lm(ids[:, -i:][:, :1], cache=cache, last_only=True)
        assert_rel(step[0, -1], expected[0, -1], 1e-5, "cached logits")


def test_shares_the_text_encoders_weights(lm, tiny_pipe):
    enc = tiny_pipe.text_encoder.model
    n = len(lm.model.layers)
    assert lm.model.embed_tokens.weight.data_ptr() == enc.embed_tokens.weight.data_ptr()
    for i in range(n - 1):
        assert lm.model.layers[i].mlp.up_proj.weight.data_ptr() == enc.layers[i].mlp.up_proj.weight.data_ptr()
    assert lm.model.embed_tokens.weight is not enc.embed_tokens.weight  # own Parameter objects
    assert not lm.model.layers[n - 1].mlp.up_proj.weight.is_meta
    assert lm.model.rotary_emb.inv_freq.device == lm.device and not lm.model.rotary_emb.inv_freq.is_meta
    assert torch.equal(lm.model.rotary_emb.inv_freq, enc.rotary_emb.inv_freq)


def test_unshared_load_is_identical(tiny_model_dir, lm):
    alone = load_causal_lm(tiny_model_dir / "text_encoder", torch.float32, "cpu")
    for (name, a), (_, b) in zip(alone.state_dict().items(), lm.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_checkpoints_with_model_prefix_and_lm_head(tmp_path, tied):
    """A checkpoint saved by Qwen3ForCausalLM: ``model.`` keys, and a separate head when untied."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from zimage_native.testing import randomize_
    from .fixtures import TINY_QWEN3

    config = Qwen3Config(vocab_size=64, **dict(TINY_QWEN3, hidden_size=32, num_hidden_layers=2,
                                               tie_word_embeddings=tied))
    ref = randomize_(Qwen3ForCausalLM(config), seed=5).eval()
    if not tied:
        assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()
    ref.save_pretrained(tmp_path)
    got = load_causal_lm(tmp_path, torch.float32, "cpu")
    assert (got.lm_head is None) == tied
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert_rel(got(ids), ref(ids).logits, 1e-5, "logits")


# ---------------------------------------------------------------------------------------------
# Decoding


class ScriptedLM:
    """Stands in for Qwen3CausalLM: step i puts all the mass on script[i]."""

    def __init__(self, script, vocab=16, max_positions=None):
        self.script, self.vocab = list(script), vocab
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.device = torch.device("cpu")
        self.inputs = []

    def new_cache(self):
        return []

    def __call__(self, ids, cache=None, last_only=False):
        self.inputs.append(ids[0].tolist())
        logits = torch.full((1, 1, self.vocab), -1e4)
        logits[0, 0, self.script[len(cache)]] = 0.0
        cache.append(None)
        return logits


def test_generation_stops_at_a_stop_id_and_feeds_one_token_at_a_time():
    fake = ScriptedLM([5, 6, 7, 2, 8])
    assert generate_ids(fake, [1, 3], max_new_tokens=10, temperature=0, stop_ids={2}) == [5, 6, 7]
    assert fake.inputs == [[1, 3], [5], [6], [7]]


def test_generation_respects_max_new_tokens_and_the_context_length():
    assert generate_ids(ScriptedLM([5, 6, 7, 8]), [1], max_new_tokens=2, temperature=0) == [5, 6]
    assert generate_ids(ScriptedLM([5, 6, 7, 8], max_positions=4), [1, 1], 10, temperature=0) == [5, 6]
    with pytest.raises(ValueError, match="at most 4"):
        generate_ids(ScriptedLM([5], max_positions=4), [1, 1, 1, 1], 10, temperature=0)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([0.0, 0.0, 6.0, 0.0])  # token 2 holds about 99% of the mass
    picks = {_pick(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(50)}
    assert picks == {2}
    spread = {_pick(torch.zeros(4), 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(50)}
    assert len(spread) > 1


def test_seeded_generation_is_deterministic_and_seeds_differ(lm, tiny_pipe):
    text, _ = build_rewrite_text("a cat", "rewriter-concise")
    ids = tiny_pipe.text_encoder.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(seed):
        return generate_ids(lm, ids, NEW, 1.0, 1.0, torch.Generator().manual_seed(seed))

    first = sample(0)
    assert len(first) == NEW and first == sample(0)
    assert len({tuple(sample(s)) for s in (1, 2, 3)} | {tuple(first)}) > 1


def test_rewrite_runs_and_is_deterministic_with_a_seed(host):
    a = host.rewrite("a cat on a chair", rewriter="rewriter-concise", max_new_tokens=NEW, seed=7)
    b = host.rewrite("a cat on a chair", rewriter="rewriter-concise", max_new_tokens=NEW, seed=7)
    assert isinstance(a, str) and a and a == b
    assert "<think>" not in a and "<|im_end|>" not in a


def test_greedy_is_deterministic_and_ignores_the_seed(host):
    a = host.rewrite("a cat", max_new_tokens=NEW, temperature=0, seed=1)
    assert a == host.rewrite("a cat", max_new_tokens=NEW, temperature=0, seed=2)
    assert a == host.rewrite("a cat", max_new_tokens=NEW, temperature=0)


def test_standalone_rewriter_matches_the_pipeline_one(tiny_model_dir, host):
    rw = PromptRewriter.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    kwargs = dict(rewriter="rewriter-cinematic", max_new_tokens=NEW, seed=3)
    assert rw.rewrite("a lighthouse", **kwargs) == host.rewrite("a lighthouse", **kwargs)


def test_unload_frees_and_the_next_call_reloads(tiny_model_dir, tiny_pipe):
    h = Host(tiny_model_dir, tiny_pipe.text_encoder)
    first = h.load_rewriter()
    assert h.load_rewriter() is first  # cached
    h.unload_rewriter()
    assert h._rewriter_lm is None
    assert h.load_rewriter() is not first
    h.unload_rewriter()


# ---------------------------------------------------------------------------------------------
# The request and the reply


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("A red fox.", "A red fox."),
        ("<think>\nThe user wants a fox.\n</think>\n\nA red fox in snow.", "A red fox in snow."),
        ("<think>\n\n</think>\n\n  A red fox.  ", "A red fox."),
        ("<think>a</think>A red <think>b</think>fox.", "A red fox."),
        ("<think>\nStill reasoning when the tokens ran ou", ""),
        ("A red fox.<think>\nmore reasoning", "A red fox."),
        ("reasoning opened in the request\n</think>\n\nA red fox.", "A red fox."),
    ],
)
def test_strip_think(reply, expected):
    assert strip_think(reply) == expected


def test_default_rewriter_is_rendered_with_its_template():
    text, prefix = build_rewrite_text("a cat")
    template = default_registry().get(DEFAULT_REWRITER)
    assert template.category == "rewriter" and prefix == ""
    assert text == template.render("a cat")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the template forces the empty block


def test_ad_hoc_system_prompt_answers_without_reasoning_unless_asked():
    text, _ = build_rewrite_text("a cat", system_prompt="Expand it.")
    assert text == format_prompt("a cat", system_prompt="Expand it.", force_think_block=True)
    text, _ = build_rewrite_text("a cat", system_prompt="Expand it.", force_think_block=False)
    assert text == format_prompt("a cat", system_prompt="Expand it.")


def test_system_prompt_replaces_the_rewriters_and_overrides_apply():
    text, _ = build_rewrite_text("a cat", "rewriter-concise", system_prompt="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    text, _ = build_rewrite_text("a cat", "rewriter-concise", force_think_block=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_assistant_content_starts_the_reply_and_is_not_closed():
    t = Template(name="rw", description="d", category="rewriter", system_prompt="S.", assistant_content="Prompt:")
    text, prefix = build_rewrite_text("a cat", t)
    assert prefix == "Prompt:" and text.endswith("<|im_start|>assistant\nPrompt:")


def test_unknown_rewriter_is_a_clear_error_before_loading(tiny_pipe, tmp_path):
    h = Host(tmp_path / "no-model", tiny_pipe.text_encoder)  # loading would fail: the error must come first
    with pytest.raises(UnknownTemplateError, match="unknown rewriter 'rewriter-concize'.*rewriter-concise"):
        h.rewrite("a cat", rewriter="rewriter-concize")
    with pytest.raises(ValueError, match="category 'photography', not 'rewriter'"):
        h.rewrite("a cat", rewriter="photo-portrait-85mm")
    assert h._rewriter_lm is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(prompt="  "), "non-empty"),
    ],
)
def test_bad_arguments_are_refused(tiny_pipe, tmp_path, kwargs, message):
    h = Host(tmp_path / "no-model", tiny_pipe.text_encoder)
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=message):
        h.rewrite(**kwargs)


def test_pipeline_rewrite_is_wired(tiny_pipe):
    """ZImagePipeline's Rewriter: same text as the standalone rewriter, deterministic with a seed."""
    from zimage_native.prompt.rewriter import PromptRewriter

    a = tiny_pipe.rewrite("a cat", max_new_tokens=6, seed=3)
    b = tiny_pipe.rewrite("a cat", max_new_tokens=6, seed=3)
    standalone = PromptRewriter.from_pretrained(tiny_pipe.model_folder, device="cpu", dtype=torch.float32)
    assert a == b == standalone.rewrite("a cat", max_new_tokens=6, seed=3)
    tiny_pipe.unload_rewriter()
