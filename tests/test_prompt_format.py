"""The Qwen3 chat formatter: each content-driven think-block rule, exactly."""

from __future__ import annotations

import pytest

import zimage_native
from zimage_native.prompt.format import format_prompt

PROMPT = "a red fox in the snow"
HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The test tokenizer, whose chat template renders what Qwen3's does for one user message."""
    from .fixtures import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_default_is_the_user_turn_and_the_assistant_header():
    assert format_prompt(PROMPT) == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_default_equals_the_chat_template_with_thinking_enabled(chat_tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    expected = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=True)
    assert format_prompt(PROMPT) == expected


def test_forced_think_block_equals_the_chat_template_with_thinking_disabled(chat_tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    expected = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)
    assert format_prompt(PROMPT, force_think_block=True) == expected


def test_system_prompt_comes_first(chat_tokenizer):
    text = format_prompt(PROMPT, system_prompt="You are a painter.")
    assert text == (f"<|im_start|>system\nYou are a painter.<|im_end|>\n"
                    f"<|im_start|>user\n{PROMPT}<|im_end|>\n{HEADER}")
    messages = [{"role": "system", "content": "You are a painter."}, {"role": "user", "content": PROMPT}]
    assert text == chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=True)


def test_thinking_content_adds_a_think_block_after_the_header():
    text = format_prompt(PROMPT, thinking_content="Orange fur, green eyes.")
    assert text == format_prompt(PROMPT) + "<think>\nOrange fur, green eyes.\n</think>\n\n"


def test_force_think_block_adds_an_empty_block():
    assert format_prompt(PROMPT, force_think_block=True) == format_prompt(PROMPT) + "<think>\n\n</think>\n\n"


def test_force_think_block_with_thinking_content_gives_one_block():
    text = format_prompt(PROMPT, thinking_content="Soft light.", force_think_block=True)
    assert text == format_prompt(PROMPT, thinking_content="Soft light.")
    assert text.count("<think>") == 1


def test_assistant_content_follows_the_think_block_and_is_closed():
    text = format_prompt(PROMPT, thinking_content="Soft light.", assistant_content="Here is the fox:")
    assert text == format_prompt(PROMPT) + "<think>\nSoft light.\n</think>\n\nHere is the fox:<|im_end|>"


def test_assistant_content_without_think_block_is_closed():
    text = format_prompt(PROMPT, assistant_content="Here is the fox:")
    assert text == format_prompt(PROMPT) + "Here is the fox:<|im_end|>"


def test_assistant_content_after_a_forced_empty_block():
    text = format_prompt(PROMPT, assistant_content="Here:", force_think_block=True)
    assert text == format_prompt(PROMPT) + "<think>\n\n</think>\n\nHere:<|im_end|>"


def test_all_parts_together():
    text = format_prompt(PROMPT, system_prompt="S.", thinking_content="T.", assistant_content="A.")
    assert text == (f"<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n"
                    f"<|im_start|>assistant\n<think>\nT.\n</think>\n\nA.<|im_end|>")


def test_strip_quotes_removes_double_quotes_from_the_prompt_only():
    prompt = 'a sign that says "OPEN", "24h"'
    assert format_prompt(prompt, strip_quotes=True) == format_prompt("a sign that says OPEN, 24h")
    assert format_prompt(prompt) == f"<|im_start|>user\n{prompt}<|im_end|>\n{HEADER}"  # kept by default
    text = format_prompt(prompt, system_prompt='Say "hi".', strip_quotes=True)
    assert text.startswith('<|im_start|>system\nSay "hi".<|im_end|>') and '"OPEN"' not in text


def test_empty_parts_count_as_absent():
    assert format_prompt(PROMPT, system_prompt="", thinking_content="", assistant_content="") == format_prompt(PROMPT)


def test_prompt_text_is_kept_verbatim():
    prompt = "  two lines\nwith <tags> and 中文  "
    assert format_prompt(prompt) == f"<|im_start|>user\n{prompt}<|im_end|>\n{HEADER}"


def test_non_string_prompt_is_refused():
    with pytest.raises(TypeError, match="prompt must be a str"):
        format_prompt(["a", "b"])


def test_exported_at_the_top_level():
    assert zimage_native.format_prompt is format_prompt
