"""The prompt commands: templates list/show, format-prompt (exact text, overrides, tokens) and rewrite."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from zimage_native.cli import main
from zimage_native.prompt.format import format_prompt
from zimage_native.prompt.templates import TemplateRegistry

SHIPPED = TemplateRegistry()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def fails_with_one_line(args, message):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    return result


def write_template(folder, name, category="mood", body="Make it moody.", extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(
        f"---\nname: {name}\ndescription: A user template\ncategory: {category}\n{extra}---\n{body}\n",
        encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# templates


def test_templates_list_shows_every_template_on_one_line():
    result = run("templates", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) >= 100 and len(lines) == len(SHIPPED)
    for line, t in zip(lines, SHIPPED):
        assert line.split()[:2] == [t.name, t.category] and line.endswith(t.description)


def test_templates_list_category_filter():
    lines = run("templates", "list", "--category", "rewriter").output.splitlines()
    assert len(lines) >= 10 and len(lines) == len(SHIPPED.list("rewriter"))
    assert all(line.split()[1] == "rewriter" for line in lines)
    assert run("templates", "list", "--category", "nonsense").exit_code == 2  # a choice click refuses: its usage status


def test_templates_list_json_and_extra_folder(tmp_path):
    folder = write_template(tmp_path / "mine", "my-moody-look")
    result = run("templates", "list", "--json", "--templates-dir", folder)
    items = json.loads(result.output)
    assert len(items) == len(SHIPPED) + 1
    mine = next(i for i in items if i["name"] == "my-moody-look")
    assert mine["system_prompt"] == "Make it moody." and mine["category"] == "mood"


def test_templates_list_reports_a_malformed_template_by_file(tmp_path):
    folder = write_template(tmp_path / "bad", "broken", category="nope")
    fails_with_one_line(["templates", "list", "--templates-dir", folder], f"{folder / 'broken.md'}: unknown category")


def test_templates_show():
    t = SHIPPED.get("rewriter-concise")
    result = run("templates", "show", "rewriter-concise")
    assert result.exit_code == 0, result.output
    assert "name:        rewriter-concise\n" in result.output
    assert f"description: {t.description}\n" in result.output
    assert "think block: forced (empty)\n" in result.output
    assert f"system prompt:\n{t.system_prompt}\n" in result.output
    assert json.loads(run("templates", "show", "rewriter-concise", "--json").output) == json.loads(
        json.dumps(t.to_dict()))


def test_templates_show_unknown_name():
    fails_with_one_line(["templates", "show", "rewriter-concize"], "did you mean: rewriter-concise")


# ---------------------------------------------------------------------------------------------
# format-prompt


def test_format_prompt_prints_the_exact_text():
    assert run("format-prompt", "a red fox").output == format_prompt("a red fox")
    args = ["format-prompt", 'a "fox"', "--system-prompt", "S.", "--thinking-content", "T.",
            "--assistant-content", "A.", "--strip-quotes"]
    assert run(*args).output == format_prompt('a "fox"', system_prompt="S.", thinking_content="T.",
                                              assistant_content="A.", strip_quotes=True)
    assert run("format-prompt", "a fox", "--force-think-block").output == format_prompt("a fox", force_think_block=True)


def test_format_prompt_with_a_template():
    t = SHIPPED.get("rewriter-concise")
    assert run("format-prompt", "a fox", "--template", "rewriter-concise").output == t.render("a fox")


def test_format_prompt_flags_override_the_template():
    t = SHIPPED.get("rewriter-concise")  # has a system prompt and a forced empty think block
    out = run("format-prompt", "a fox", "--template", t.name, "--system-prompt", "Mine.").output
    assert out == format_prompt("a fox", system_prompt="Mine.", force_think_block=True)
    out = run("format-prompt", "a fox", "--template", t.name, "--no-force-think-block").output
    assert out == format_prompt("a fox", system_prompt=t.system_prompt)
    out = run("format-prompt", "a fox", "--template", t.name, "--thinking-content", "Dark.").output
    assert out == format_prompt("a fox", system_prompt=t.system_prompt, thinking_content="Dark.")


def test_format_prompt_template_from_an_extra_folder(tmp_path):
    folder = write_template(tmp_path / "mine", "my-moody-look", extra="force_think_block: true\n")
    out = run("format-prompt", "a fox", "--template", "my-moody-look", "--templates-dir", folder).output
    assert out == format_prompt("a fox", system_prompt="Make it moody.", force_think_block=True)


def test_format_prompt_unknown_template():
    fails_with_one_line(["format-prompt", "a fox", "--template", "nope-not-here"], "unknown template 'nope-not-here'")


def test_format_prompt_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    text = format_prompt("a cat on a chair", system_prompt="S.")
    ids = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")(text, add_special_tokens=False)["input_ids"]
    result = run("format-prompt", "a cat on a chair", "--system-prompt", "S.", "--tokens", "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert result.output == f"{text}tokens: {len(ids)}\nids: {ids}\n"
    out = json.loads(run("format-prompt", "a cat on a chair", "--system-prompt", "S.", "--tokens", "--json",
                         "--model", tiny_model_dir / "tokenizer").output)  # a tokenizer folder works too
    assert out == {"text": text, "tokens": len(ids), "ids": ids}


def test_format_prompt_tokens_note_says_what_keeps_a_long_prompt(tiny_model_dir):
    from zimage_native.sampling import check_caption_fits
    from zimage_native.prompt.format import CAPTION_TOKENS_MOST as MOST_TOKENS
    from zimage_native.config import TransformerConfig

    check_caption_fits(MOST_TOKENS, TransformerConfig().axes_lens)
    with pytest.raises(ValueError):
        check_caption_fits(MOST_TOKENS + 1, TransformerConfig().axes_lens)
    lines = run("format-prompt", "a cat " * 200, "--tokens", "--model", tiny_model_dir).output.splitlines()
    count = int(lines[-3].removeprefix("tokens: "))
    assert 512 < count <= MOST_TOKENS
    assert lines[-1] == (f"note: {count} tokens is more than the default max_sequence_length 512; raise the limit "
                         f"(--max-sequence-length {count}) or the last {count - 512} tokens are cut")
    lines = run("format-prompt", "a cat " * 1000, "--tokens", "--model", tiny_model_dir).output.splitlines()
    count = int(lines[-3].removeprefix("tokens: "))
    assert lines[-1] == (f"note: {count} tokens is more than the released models take (--max-sequence-length 1504 "
                         f"at most): shorten the prompt, or its last {count - 1504} tokens are cut")


def test_format_prompt_model_needs_tokens(tiny_model_dir):
    fails_with_one_line(["format-prompt", "a fox", "--model", tiny_model_dir], "add --tokens")


# ---------------------------------------------------------------------------------------------
# rewrite


def test_rewrite_prints_the_rewritten_prompt(tiny_model_dir):
    from zimage_native.prompt.rewriter import PromptRewriter

    result = run("rewrite", "a cat on a chair", "--model", tiny_model_dir, "--rewriter", "rewriter-concise",
                 "--max-new-tokens", 12, "--seed", 7, "--device", "cpu")
    assert result.exit_code == 0, result.output
    expected = PromptRewriter.from_pretrained(tiny_model_dir, device="cpu").rewrite(
        "a cat on a chair", "rewriter-concise", max_new_tokens=12, seed=7)
    assert result.output == expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rewriter", "rewriter-concize"], "unknown rewriter 'rewriter-concize'"),
        (["--rewriter", "photo-portrait-85mm"], "not 'rewriter'"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    ],
)
def test_rewrite_refuses_bad_input_before_loading(args, message):
    fails_with_one_line(["rewrite", "a cat", "--model", "/no/such/model", *args], message)


def test_rewrite_missing_model():
    fails_with_one_line(["rewrite", "a cat", "--model", "/no/such/model"], "model folder not found")
