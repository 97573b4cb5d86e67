"""Prompt templates: markdown files with YAML frontmatter, and the registry that loads them.

A template bundles the optional parts of the Qwen3 chat format (see ``format.py``) under a name,
together with suggested generation settings. The project ships its templates in ``templates/`` at
the top of the repository (installed as the package data ``zimage_native.templates``); users can
add folders of their own.

File format
-----------
One template per ``*.md`` file. The file starts with a YAML frontmatter block between two lines
that hold only ``---``; the markdown body follows::

    ---
    name: photo-portrait-85mm                 # required: kebab-case, equal to the file stem
    description: Shallow-focus 85mm portrait  # required: one line
    category: photography                     # required: one of CATEGORIES
    thinking_content: ...                     # optional string: fills the <think> block
    assistant_content: ...                    # optional string: text after the think block
    force_think_block: false                  # optional bool: empty <think> block when no thinking_content
    settings:                                 # optional suggested generation settings
      width: 832                              #   positive int, multiple of 16
      height: 1216                            #   positive int, multiple of 16
      steps: 8                                #   positive int
      guidance_scale: 0.0                     #   number >= 0
      negative_prompt: blurry, low detail     #   string
    tags: [portrait, lens]                    # optional list of strings
    ---
    You are a portrait photographer ... (this body is the system prompt)

Rules:

- The markdown body is the system prompt, taken verbatim with only leading and trailing
  whitespace removed: what you write is exactly what the text encoder reads, line breaks
  included (write one paragraph per line). A template may instead give ``system_prompt`` in the
  frontmatter and leave the body empty; giving both is an error.
- A template must carry some text: a system prompt, ``thinking_content`` or ``assistant_content``.
- Unknown fields, unknown ``settings`` keys, an unknown category, a name that is not kebab-case or
  differs from the file stem, an empty required field, wrong types, a missing or unterminated
  frontmatter block and invalid YAML each raise :class:`TemplateError`, whose message starts with
  the file's path and names the problem.
- ``settings`` are suggestions for the caller (the CLI and the pipeline apply them where the user
  has not set a value); ``steps`` and ``guidance_scale`` depend on the model variant (Turbo: 8
  steps, guidance 0; base: about 50 steps, guidance 4), so shipped templates leave them out.

Folders and overriding
----------------------
:class:`TemplateRegistry` reads the shipped folder first and then each extra folder in the order
given. Every ``*.md`` file below a folder (subfolders included) is a template, except
``README.md`` and files whose name starts with ``_`` or ``.``. Two templates with the same name in
one folder are an error; a template in a later folder replaces the one with the same name from an
earlier folder (so a user folder can override a shipped template). Parsed templates are cached by
path, modification time and size, so building a second registry over the same folders reads no
file again, and an edited file is read again on :meth:`TemplateRegistry.reload`.

Rendering
---------
``Template.render(prompt, **overrides)`` calls :func:`format_prompt` with the template's fields;
an override that is not ``None`` wins over the template's field. Pass ``""`` to drop a text field
(``system_prompt=""`` renders without a system block) and ``force_think_block=False`` to drop a
forced think block.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .format import format_prompt

__all__ = [
    "CATEGORIES",
    "SETTINGS_KEYS",
    "Template",
    "TemplateError",
    "TemplateRegistry",
    "UnknownTemplateError",
    "default_registry",
    "parse_template",
    "shipped_templates_dir",
]

CATEGORIES: tuple[str, ...] = (
    "photography",
    "film",
    "illustration",
    "painting",
    "design",
    "typography",
    "product",
    "architecture",
    "character",
    "scene",
    "mood",
    "rewriter",
)

SETTINGS_KEYS: tuple[str, ...] = ("width", "height", "steps", "guidance_scale", "negative_prompt")

_REQUIRED_FIELDS = ("name", "description", "category")
_TEXT_FIELDS = ("system_prompt", "thinking_content", "assistant_content")
_KNOWN_FIELDS = frozenset(_REQUIRED_FIELDS + _TEXT_FIELDS + ("force_think_block", "settings", "tags"))
_NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_FENCE_RE = re.compile(r"^---[ \t]*$")
_TEMPLATES_PACKAGE = "zimage_native.templates"


class TemplateError(ValueError):
    """A malformed template file. ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnknownTemplateError(KeyError):
    """No template has the requested name; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Template:
    """One prompt template. ``settings`` is shared by every user of a cached template: copy it
    (``dict(t.settings)``) before changing it."""

    name: str
    description: str
    category: str
    system_prompt: str | None = None
    thinking_content: str | None = None
    assistant_content: str | None = None
    force_think_block: bool = False
    settings: dict[str, Any] = field(default_factory=dict, hash=False)
    tags: tuple[str, ...] = ()
    path: Path | None = None

    def prompt_fields(
        self,
        *,
        system_prompt: str | None = None,
        thinking_content: str | None = None,
        assistant_content: str | None = None,
        force_think_block: bool | None = None,
        strip_quotes: bool | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of :func:`format_prompt` (minus ``prompt``) for this template,
        with each override that is not ``None`` winning over the template's field."""

        def pick(override, own):
            return own if override is None else override

        return {
            "system_prompt": pick(system_prompt, self.system_prompt),
            "thinking_content": pick(thinking_content, self.thinking_content),
            "assistant_content": pick(assistant_content, self.assistant_content),
            "force_think_block": bool(pick(force_think_block, self.force_think_block)),
            "strip_quotes": bool(pick(strip_quotes, False)),
        }

    def render(
        self,
        prompt: str,
        *,
        system_prompt: str | None = None,
        thinking_content: str | None = None,
        assistant_content: str | None = None,
        force_think_block: bool | None = None,
        strip_quotes: bool | None = None,
    ) -> str:
        """Format ``prompt`` with this template (see :meth:`prompt_fields` for the overrides)."""
        return format_prompt(
            prompt,
            **self.prompt_fields(
                system_prompt=system_prompt,
                thinking_content=thinking_content,
                assistant_content=assistant_content,
                force_think_block=force_think_block,
                strip_quotes=strip_quotes,
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """The template as plain data (for JSON or YAML output); ``None`` fields are left out."""
        out: dict[str, Any] = {"name": self.name, "description": self.description, "category": self.category}
        for key in _TEXT_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.force_think_block:
            out["force_think_block"] = True
        if self.settings:
            out["settings"] = dict(self.settings)
        if self.tags:
            out["tags"] = list(self.tags)
        if self.path is not None:
            out["path"] = str(self.path)
        return out


# ---------------------------------------------------------------------------------------------
# Parsing


def _read_text(path: Path) -> str:
    """Read a template file (one function, so that tests can count the reads)."""
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


def _split_frontmatter(path: Path, text: str) -> tuple[str, str]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not lines or not _FENCE_RE.match(lines[0]):
        raise TemplateError(path, "no YAML frontmatter: the file must start with a line '---'")
    for i in range(1, len(lines)):
        if _FENCE_RE.match(lines[i]):
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :])
    raise TemplateError(path, "frontmatter is not closed: add a line '---' after it")


def _check_text(path: Path, key: str, value: Any, *, one_line: bool = False) -> str:
    if not isinstance(value, str):
        raise TemplateError(path, f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise TemplateError(path, f"field '{key}' is empty")
    if one_line and "\n" in value.strip():
        raise TemplateError(path, f"field '{key}' must be a single line")
    return value.strip()


def _check_settings(path: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TemplateError(path, f"field 'settings' must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in SETTINGS_KEYS)
    if unknown:
        raise TemplateError(
            path, f"unknown settings key(s) {', '.join(unknown)} (allowed: {', '.join(SETTINGS_KEYS)})"
        )
    out: dict[str, Any] = {}
    for key in SETTINGS_KEYS:
        if key not in value:
            continue
        v = value[key]
        if key in ("width", "height", "steps"):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise TemplateError(path, f"settings.{key} must be a positive integer, got {v!r}")
            if key != "steps" and v % 16:
                raise TemplateError(path, f"settings.{key} must be a multiple of 16, got {v}")
        elif key == "guidance_scale":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise TemplateError(path, f"settings.guidance_scale must be a number >= 0, got {v!r}")
            v = float(v)
        else:  # negative_prompt
            v = _check_text(path, "settings.negative_prompt", v)
        out[key] = v
    return out


def _check_tags(path: Path, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TemplateError(path, f"field 'tags' must be a list of strings, got {type(value).__name__}")
    tags = []
    for tag in value:
        if not isinstance(tag, str) or not tag.strip():
            raise TemplateError(path, f"field 'tags' must hold non-empty strings, got {tag!r}")
        tags.append(tag.strip())
    return tuple(tags)


def parse_template(path: str | os.PathLike) -> Template:
    """Read and validate one template file; raise :class:`TemplateError` naming the file and
    the problem when it is malformed (the rules are in the module docstring)."""
    path = Path(path)
    try:
        text = _read_text(path)
    except UnicodeDecodeError as exc:
        raise TemplateError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TemplateError(path, f"cannot be read: {exc.strerror or exc}") from None
    front, body = _split_frontmatter(path, text)

    try:
        data = yaml.safe_load(front)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""  # +1: 0-based, +1: the '---' line
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TemplateError(path, f"invalid YAML in frontmatter{where}: {problem}") from None
    if data is None:
        raise TemplateError(path, "frontmatter is empty (needs at least name, description and category)")
    if not isinstance(data, dict):
        raise TemplateError(path, f"frontmatter must be a YAML mapping, got {type(data).__name__}")

    unknown = sorted(str(k) for k in data if k not in _KNOWN_FIELDS)
    if unknown:
        raise TemplateError(
            path, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_KNOWN_FIELDS))})"
        )
    for key in _REQUIRED_FIELDS:
        if key not in data:
            raise TemplateError(path, f"missing required field '{key}'")

    name = _check_text(path, "name", data["name"], one_line=True)
    if not _NAME_RE.match(name):
        raise TemplateError(path, f"name {name!r} is not kebab-case (lowercase letters, digits and '-')")
    if name != path.stem:
        raise TemplateError(path, f"name {name!r} differs from the file name stem {path.stem!r}")
    description = _check_text(path, "description", data["description"], one_line=True)
    category = _check_text(path, "category", data["category"], one_line=True)
    if category not in CATEGORIES:
        close = difflib.get_close_matches(category, CATEGORIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TemplateError(path, f"unknown category {category!r}{hint}; allowed: {', '.join(CATEGORIES)}")

    texts = {key: _check_text(path, key, data[key]) for key in _TEXT_FIELDS if key in data}
    body = body.strip()
    if body:
        if "system_prompt" in texts:
            raise TemplateError(
                path, "has both a 'system_prompt' field and a body; the body is the system prompt, keep one"
            )
        texts["system_prompt"] = body
    if not texts:
        raise TemplateError(
            path, "has no text: write the system prompt as the body, or give thinking_content or assistant_content"
        )

    force = data.get("force_think_block", False)
    if not isinstance(force, bool):
        raise TemplateError(path, f"field 'force_think_block' must be true or false, got {force!r}")
    settings = _check_settings(path, data["settings"]) if "settings" in data else {}
    tags = _check_tags(path, data["tags"]) if "tags" in data else ()

    return Template(
        name=name,
        description=description,
        category=category,
        system_prompt=texts.get("system_prompt"),
        thinking_content=texts.get("thinking_content"),
        assistant_content=texts.get("assistant_content"),
        force_think_block=force,
        settings=settings,
        tags=tags,
        path=path,
    )


# Parsed templates by resolved path, valid while (mtime_ns, size) is unchanged.
_PARSE_CACHE: dict[Path, tuple[tuple[int, int], Template]] = {}
_PARSE_LOCK = threading.Lock()


def _load_cached(path: Path) -> Template:
    st = path.stat()
    key = (st.st_mtime_ns, st.st_size)
    with _PARSE_LOCK:
        hit = _PARSE_CACHE.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    template = parse_template(path)
    with _PARSE_LOCK:
        _PARSE_CACHE[path] = (key, template)
    return template


# ---------------------------------------------------------------------------------------------
# Folders


def _as_directory(root: Any) -> Path | None:
    """A real directory for an ``importlib.resources`` Traversable, or None (e.g. inside a zip)."""
    if isinstance(root, Path):
        return root if root.is_dir() else None
    try:  # a namespace package gives a MultiplexedPath, whose children are real paths
        for child in root.iterdir():
            if isinstance(child, Path):
                return child.parent
    except (OSError, AttributeError, NotADirectoryError):
        pass
    return None


def shipped_templates_dir() -> Path:
    """The folder of the templates that ship with zimage-native.

    In an installed package this is the package data ``zimage_native.templates`` (found with
    ``importlib.resources``); in a source checkout, where that package does not exist, it is the
    repository's ``templates/`` folder next to ``zimage_native/``.
    """
    try:
        root = importlib.resources.files(_TEMPLATES_PACKAGE)
    except (ImportError, AttributeError, TypeError, ValueError):
        root = None
    if root is not None:
        path = _as_directory(root)
        if path is not None and _template_files(path):
            return path
    checkout = Path(__file__).resolve().parents[2] / "templates"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"shipped templates not found: no package {_TEMPLATES_PACKAGE!r} with *.md files and no folder {checkout}"
    )


def _template_files(folder: Path) -> list[Path]:
    files = []
    for p in folder.rglob("*.md"):
        rel = p.relative_to(folder)
        if any(part.startswith((".", "_")) for part in rel.parts) or p.name.lower() == "readme.md":
            continue
        if p.is_file():
            files.append(p)
    return sorted(files)


class TemplateRegistry:
    """All templates from the shipped folder (unless ``include_shipped=False``) and the extra
    folders ``dirs``, loaded on first use and kept.

    Folders are read in order (shipped first); a template in a later folder replaces an earlier
    one with the same name. Call :meth:`reload` to pick up files added or changed since.
    """

    def __init__(self, dirs: Iterable[str | os.PathLike] | str | os.PathLike = (), *, include_shipped: bool = True):
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        folders = [shipped_templates_dir()] if include_shipped else []
        for d in dirs:
            folder = Path(d).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"templates folder not found: {folder}")
            folders.append(folder)
        self.dirs: tuple[Path, ...] = tuple(folders)
        self._templates: dict[str, Template] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Template]:
        templates: dict[str, Template] = {}
        for folder in self.dirs:
            seen: dict[str, Path] = {}
            for path in _template_files(folder):
                template = _load_cached(path.resolve())
                if template.name in seen:
                    raise TemplateError(
                        path, f"duplicate template name {template.name!r} (also defined in {seen[template.name]})"
                    )
                seen[template.name] = path
                templates[template.name] = template
        return dict(sorted(templates.items()))

    def _all(self) -> dict[str, Template]:
        if self._templates is None:
            with self._lock:
                if self._templates is None:
                    self._templates = self._load()
        return self._templates

    def reload(self) -> None:
        """Rescan the folders (unchanged files come from the parse cache)."""
        with self._lock:
            self._templates = self._load()

    def get(self, name: str) -> Template:
        """The template called ``name``; :class:`UnknownTemplateError` (a KeyError) lists close matches."""
        templates = self._all()
        try:
            return templates[name]
        except KeyError:
            pass
        close = difflib.get_close_matches(name, templates, n=5, cutoff=0.5)
        needle = name.lower().replace("_", "-")
        close += [n for n in templates if needle and needle in n and n not in close]
        hint = f"; did you mean: {', '.join(close[:5])}?" if close else "; see `zimage templates list`"
        raise UnknownTemplateError(f"unknown template {name!r}{hint}")

    def names(self) -> list[str]:
        """All template names, sorted."""
        return list(self._all())

    def list(self, category: str | None = None) -> list[Template]:
        """All templates sorted by name, or those of one category."""
        if category is not None and category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; allowed: {', '.join(CATEGORIES)}")
        return [t for t in self._all().values() if category is None or t.category == category]

    def categories(self) -> list[str]:
        """The categories that have at least one template, in the order of CATEGORIES."""
        present = {t.category for t in self._all().values()}
        return [c for c in CATEGORIES if c in present]

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[Template]:
        return iter(self._all().values())

    def __repr__(self) -> str:
        loaded = "not loaded" if self._templates is None else f"{len(self._templates)} templates"
        return f"TemplateRegistry({[str(d) for d in self.dirs]}, {loaded})"


@functools.lru_cache(maxsize=16)
def _default_registry(extra: tuple[str, ...]) -> TemplateRegistry:
    return TemplateRegistry(extra)


def default_registry(extra_dirs: Iterable[str | os.PathLike] = ()) -> TemplateRegistry:
    """A shared registry of the shipped templates plus ``extra_dirs``: the same object for the
    same folders, so that the CLI, the pipeline and a server load each template once."""
    if isinstance(extra_dirs, (str, os.PathLike)):
        extra_dirs = [extra_dirs]
    return _default_registry(tuple(str(Path(d).expanduser().resolve()) for d in extra_dirs))
