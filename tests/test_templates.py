"""Prompt templates: every shipped template loads and renders; malformed files fail with the file's
name; the registry overrides, caches and suggests names."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from zimage_native.prompt import templates as tm
from zimage_native.prompt.format import format_prompt
from zimage_native.prompt.templates import (
    CATEGORIES,
    Template,
    TemplateError,
    TemplateRegistry,
    UnknownTemplateError,
    default_registry,
    parse_template,
    shipped_templates_dir,
)

SAMPLE = "a lighthouse on a rocky coast at dawn"
SHIPPED = TemplateRegistry()
SHIPPED_NAMES = SHIPPED.names()


def write(folder: Path, stem: str, front: str | None, body: str = "Render it simply.") -> Path:
    """Write folder/stem.md with the given frontmatter text (None: no frontmatter at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.md"
    text = body if front is None else f"---\n{front.strip()}\n---\n{body}\n"
    path.write_text(text, encoding="utf-8")
    return path


def front(name: str = "good", **extra: str) -> str:
    lines = [f"name: {name}", "description: A test template", "category: mood"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The shipped library


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_every_shipped_template_renders(name):
    t = SHIPPED.get(name)
    text = t.render(SAMPLE)
    assert SAMPLE in text
    assert t.system_prompt, f"{name} has no system prompt"
    assert f"<|im_start|>system\n{t.system_prompt}<|im_end|>\n" in text
    assert text == format_prompt(
        SAMPLE,
        system_prompt=t.system_prompt,
        thinking_content=t.thinking_content,
        assistant_content=t.assistant_content,
        force_think_block=t.force_think_block,
    )
    if t.thinking_content:
        assert f"<think>\n{t.thinking_content}\n</think>\n\n" in text
    if t.assistant_content:
        assert text.endswith(f"{t.assistant_content}<|im_end|>")


def test_library_size_and_categories():
    assert len(SHIPPED) >= 100
    assert len(SHIPPED.list("rewriter")) >= 10
    assert set(SHIPPED.categories()) == set(CATEGORIES)
    for category in CATEGORIES:
        assert SHIPPED.list(category), f"no template in {category}"
    typography = SHIPPED.list("typography")
    assert sum("chinese" in t.tags for t in typography) >= 3
    assert sum("english" in t.tags for t in typography) >= 3


def test_names_unique_and_match_files():
    files = tm._template_files(shipped_templates_dir())
    stems = [p.stem for p in files]
    assert len(stems) == len(set(stems)) == len(SHIPPED)
    assert sorted(stems) == SHIPPED_NAMES


def test_shipped_content_is_distinct_and_clean():
    prompts = [t.system_prompt for t in SHIPPED]
    descriptions = [t.description for t in SHIPPED]
    assert len(set(prompts)) == len(prompts)
    assert len(set(descriptions)) == len(descriptions)
    emoji = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\ufe0f]")
    for path in shipped_templates_dir().rglob("*.md"):
        assert not emoji.search(path.read_text(encoding="utf-8")), f"{path} contains an emoji"


def test_render_overrides_win():
    t = Template(
        name="x",
        description="d",
        category="mood",
        system_prompt="SYS",
        thinking_content="THINK",
        assistant_content="ASSIST",
        force_think_block=True,
    )
    assert t.render("p", system_prompt="OTHER").startswith("<|im_start|>system\nOTHER<|im_end|>")
    assert "THINK" not in t.render("p", thinking_content="T2")
    assert t.render("p", system_prompt="").startswith("<|im_start|>user\n")  # "" drops the field
    bare = Template(name="y", description="d", category="mood", system_prompt="S", force_think_block=True)
    assert "<think>\n\n</think>\n\n" in bare.render("p")
    assert "<think>" not in bare.render("p", force_think_block=False)
    assert '"' not in bare.render('say "hi"', strip_quotes=True)
    assert t.prompt_fields(assistant_content="A2")["assistant_content"] == "A2"
    assert hash(t) == hash(t) and t.to_dict()["system_prompt"] == "SYS"


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parse_minimal_and_frontmatter_system_prompt(tmp_path):
    t = parse_template(write(tmp_path, "good", front(tags="[a, b]", settings="{width: 832, height: 1216}")))
    assert (t.name, t.category, t.system_prompt, t.tags) == ("good", "mood", "Render it simply.", ("a", "b"))
    assert t.settings == {"width": 832, "height": 1216}
    t2 = parse_template(write(tmp_path, "good", front(system_prompt="From the field."), body=""))
    assert t2.system_prompt == "From the field."
    t3 = parse_template(write(tmp_path, "good", front(thinking_content="Only thinking."), body=""))
    assert t3.system_prompt is None and t3.thinking_content == "Only thinking."


def test_parse_crlf_and_bom(tmp_path):
    path = tmp_path / "good.md"
    path.write_bytes(("\ufeff---\r\n" + front() + "\r\n---\r\nLine one.\r\n").encode("utf-8"))
    assert parse_template(path).system_prompt == "Line one."


MALFORMED = {
    "no-frontmatter": (None, "no YAML frontmatter"),
    "unterminated": ("UNTERMINATED", "not closed"),
    "bad-yaml": ("name: [unclosed\ndescription: x", "invalid YAML"),
    "empty-frontmatter": ("# only a comment", "frontmatter is empty"),
    "not-mapping": ("- a\n- b", "must be a YAML mapping"),
    "missing-name": ("description: d\ncategory: mood", "missing required field 'name'"),
    "missing-description": ("name: missing-description\ncategory: mood", "missing required field 'description'"),
    "missing-category": ("name: missing-category\ndescription: d", "missing required field 'category'"),
    "empty-description": ('name: empty-description\ndescription: ""\ncategory: mood', "'description' is empty"),
    "multiline-description": (
        'name: multiline-description\ndescription: "one\\ntwo"\ncategory: mood',
        "single line",
    ),
    "unknown-field": (front("unknown-field", model="z-image"), "unknown field(s) model"),
    "unknown-category": ("name: unknown-category\ndescription: d\ncategory: photo", "unknown category 'photo'"),
    "name-mismatch": (front("other-name"), "differs from the file name stem"),
    "Not_Kebab": (front("Not_Kebab"), "not kebab-case"),
    "name-not-string": ("name: 5\ndescription: d\ncategory: mood", "'name' must be a string"),
    "force-not-bool": (front("force-not-bool", force_think_block='"yes"'), "'force_think_block' must be true or false"),
    "tags-not-list": (front("tags-not-list", tags="portrait"), "'tags' must be a list"),
    "tag-not-string": (front("tag-not-string", tags="[1]"), "non-empty strings"),
    "settings-not-mapping": (front("settings-not-mapping", settings="[1, 2]"), "'settings' must be a mapping"),
    "settings-unknown-key": (front("settings-unknown-key", settings="{cfg: 1}"), "unknown settings key(s) cfg"),
    "width-not-int": (front("width-not-int", settings='{width: "832"}'), "settings.width must be a positive integer"),
    "width-not-multiple": (front("width-not-multiple", settings="{width: 830}"), "multiple of 16"),
    "steps-negative": (front("steps-negative", settings="{steps: -1}"), "settings.steps must be a positive integer"),
    "guidance-bool": (front("guidance-bool", settings="{guidance_scale: true}"), "guidance_scale must be a number"),
    "negative-not-string": (front("negative-not-string", settings="{negative_prompt: 3}"), "must be a string"),
    "system-not-string": (front("system-not-string", system_prompt="[a]"), "'system_prompt' must be a string"),
    "both-system-and-body": (front("both-system-and-body", system_prompt="S"), "both a 'system_prompt' field and a body"),
    "no-text": (front("no-text"), "has no text"),
}


@pytest.mark.parametrize("stem", sorted(MALFORMED))
def test_malformed_template_names_file_and_problem(tmp_path, stem):
    frontmatter, problem = MALFORMED[stem]
    body = "" if stem == "no-text" else "Render it simply."
    if frontmatter == "UNTERMINATED":
        path = tmp_path / f"{stem}.md"
        path.write_text(f"---\n{front(stem)}\nRender it simply.\n", encoding="utf-8")
    else:
        path = write(tmp_path, stem, frontmatter, body)
    with pytest.raises(TemplateError) as info:
        parse_template(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert problem in message, message
    assert isinstance(info.value, ValueError) and info.value.path == path


def test_invalid_utf8_and_yaml_line_number(tmp_path):
    path = tmp_path / "bad-bytes.md"
    path.write_bytes(b"---\nname: bad-bytes\ndescription: \xff\xfe\ncategory: mood\n---\nx\n")
    with pytest.raises(TemplateError, match="not valid UTF-8") as info:
        parse_template(path)
    assert str(path) in str(info.value)
    path = write(tmp_path, "yaml-line", "name: yaml-line\ndescription: d\ncategory: mood\ntags: [a, b")
    with pytest.raises(TemplateError, match=r"invalid YAML in frontmatter at line \d+"):
        parse_template(path)


# ---------------------------------------------------------------------------------------------
# Registry


def test_malformed_file_in_folder_fails_registry_with_its_name(tmp_path):
    write(tmp_path, "fine", front("fine"))
    bad = write(tmp_path, "broken", front("broken", category="nonsense"))
    with pytest.raises(TemplateError, match=re.escape(str(bad.resolve()))):
        TemplateRegistry([tmp_path], include_shipped=False).names()


def test_extra_folder_overrides_shipped_and_earlier_folders(tmp_path):
    shipped_name = SHIPPED_NAMES[0]
    write(tmp_path / "a", shipped_name, front(shipped_name), body="Folder A version.")
    write(tmp_path / "a", "only-in-a", front("only-in-a"), body="A only.")
    write(tmp_path / "b", "only-in-a", front("only-in-a"), body="B wins.")
    reg = TemplateRegistry([tmp_path / "a", tmp_path / "b"])
    assert reg.get(shipped_name).system_prompt == "Folder A version."
    assert reg.get(shipped_name).path.parent == (tmp_path / "a").resolve()
    assert reg.get("only-in-a").system_prompt == "B wins."
    assert len(reg) == len(SHIPPED) + 1
    assert SHIPPED.get(shipped_name).system_prompt != "Folder A version."


def test_folder_scan_rules(tmp_path):
    write(tmp_path, "top", front("top"))
    write(tmp_path / "sub", "nested", front("nested"))
    (tmp_path / "README.md").write_text("# notes, not a template\n")
    (tmp_path / "_draft.md").write_text("no frontmatter\n")
    assert TemplateRegistry(tmp_path, include_shipped=False).names() == ["nested", "top"]
    write(tmp_path / "other", "top", front("top"))
    with pytest.raises(TemplateError, match="duplicate template name 'top'"):
        TemplateRegistry(tmp_path, include_shipped=False).names()
    with pytest.raises(FileNotFoundError, match="templates folder not found"):
        TemplateRegistry([tmp_path / "missing"])


def test_registry_caches_parsed_files(tmp_path, monkeypatch):
    for stem in ("one", "two", "three"):
        write(tmp_path, stem, front(stem))
    reads = []
    real_read = tm._read_text
    monkeypatch.setattr(tm, "_read_text", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(tm, "_PARSE_CACHE", {})

    reg = TemplateRegistry([tmp_path], include_shipped=False)
    assert reads == []  # loading is lazy
    assert reg.names() == ["one", "three", "two"]
    assert len(reads) == 3
    reg.get("one"), reg.list(), reg.categories()
    assert len(reads) == 3  # same registry: no second read
    again = TemplateRegistry([tmp_path], include_shipped=False)
    assert again.get("two").name == "two"
    assert len(reads) == 3  # new registry over the same unchanged files: served from the cache

    path = write(tmp_path, "two", front("two"), body="Edited body, longer than before.")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert reg.get("two").system_prompt == "Render it simply."  # kept until reload()
    reg.reload()
    assert reg.get("two").system_prompt == "Edited body, longer than before."
    assert len(reads) == 4  # only the edited file was read again


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownTemplateError) as info:
        SHIPPED.get("photo-portrait-85")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert message.startswith("unknown template 'photo-portrait-85'")
    assert "photo-portrait-85mm" in message
    with pytest.raises(KeyError, match="film-noir"):
        SHIPPED.get("film_noir")
    with pytest.raises(KeyError, match="templates list"):
        SHIPPED.get("zzzzzzzzzzzz")


def test_list_and_categories():
    rewriters = SHIPPED.list("rewriter")
    assert all(t.category == "rewriter" for t in rewriters)
    assert [t.name for t in SHIPPED.list()] == SHIPPED_NAMES
    assert SHIPPED.categories() == [c for c in CATEGORIES if SHIPPED.list(c)]
    assert "film-noir" in SHIPPED and "nope" not in SHIPPED
    with pytest.raises(ValueError, match="unknown category"):
        SHIPPED.list("photos")


def test_default_registry_is_shared(tmp_path):
    write(tmp_path, "extra-one", front("extra-one"))
    assert default_registry() is default_registry()
    reg = default_registry([tmp_path])
    assert reg is default_registry([str(tmp_path)])
    assert "extra-one" in reg and "extra-one" not in default_registry()


# ---------------------------------------------------------------------------------------------
# Locating the shipped folder


def test_shipped_dir_in_checkout():
    assert shipped_templates_dir() == Path(tm.__file__).resolve().parents[2] / "templates"


def test_shipped_dir_from_installed_package_data(tmp_path, monkeypatch):
    """Installed layout: templates/ is package data `<pkg>.templates` without an __init__.py."""
    pkg = tmp_path / "zn_fake_install"
    write(pkg / "templates", "packaged", front("packaged"))
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tm, "_TEMPLATES_PACKAGE", "zn_fake_install.templates")
    assert shipped_templates_dir().resolve() == (pkg / "templates").resolve()
    assert TemplateRegistry().names() == ["packaged"]


# ---------------------------------------------------------------------------------------------
# A rewriter template is not an image template


def test_the_pipeline_refuses_a_rewriter_template_for_an_image(tiny_pipe):
    """``pipe(template="rewriter-...")`` made the image from the rewriter's instructions ("You are a
    prompt rewriter...") as the text encoder's system prompt; the CLI and the server refused it, the
    library did not. A Template object is checked too; an image template still works."""
    rewriter = SHIPPED.list("rewriter")[0]
    for template in (rewriter.name, rewriter):
        with pytest.raises(ValueError, match=rf"template '{rewriter.name}' is a rewriter: its system prompt instructs "
                                             rf"the prompt rewriter, not the image; rewrite first"):
            tiny_pipe("a cat", template=template, width=32, height=32, num_inference_steps=1, output_type="latent")
        with pytest.raises(ValueError, match=rf"template '{rewriter.name}' is a rewriter"):
            tiny_pipe.encode_prompt("a cat", template=template)  # features for prompt_embeds= the same
    image = next(t.name for t in SHIPPED.list() if t.category != "rewriter")
    out = tiny_pipe("a cat", template=image, width=32, height=32, num_inference_steps=1, output_type="latent")
    assert out.images.shape[-1] == 4
    # Formatting a rewriter's text to read it stays possible (zimage format-prompt, /api/format-prompt).
    assert rewriter.system_prompt in tiny_pipe.format_prompts(["a cat"], rewriter.name)[0]
