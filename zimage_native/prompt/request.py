"""The rewrite request, without torch: the rewriter template, the chat text, the sampling checks,
and the removal of the reasoning from a reply. Shared by the local rewriter (:mod:`.rewriter`) and
the rewriter through an OpenAI-compatible chat server (:mod:`.remote`)."""

from __future__ import annotations

import difflib
import re

from .format import format_prompt
from .templates import Template, TemplateRegistry, UnknownTemplateError, default_registry

DEFAULT_REWRITER = "rewriter-faithful-expansion"
REWRITER_CATEGORY = "rewriter"


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_think(text: str) -> str:
    """Remove the reasoning from a Qwen3 reply and trim it.

    Every ``<think>...</think>`` block goes; a ``</think>`` without its opening tag drops all that
    precedes it (the block was opened in the request); an unterminated ``<think>`` drops all that
    follows it (the reply ran out of tokens while reasoning).
    """
    text = _THINK_BLOCK.sub("", text)
    end = text.rfind("</think>")
    if end != -1:
        text = text[end + len("</think>"):]
    start = text.find("<think>")
    if start != -1:
        text = text[:start]
    return text.strip()


def resolve_rewriter(rewriter: str | Template, registry: TemplateRegistry | None = None) -> Template:
    """The rewriter template called ``rewriter`` (or ``rewriter`` itself when it is a Template).

    An unknown name raises :class:`UnknownTemplateError` (a KeyError) listing the rewriters; a
    template of another category raises ValueError.
    """
    if isinstance(rewriter, Template):
        template = rewriter
    else:
        registry = registry if registry is not None else default_registry()
        try:
            template = registry.get(rewriter)
        except UnknownTemplateError:
            names = [t.name for t in registry.list(REWRITER_CATEGORY)]
            close = difflib.get_close_matches(str(rewriter), names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownTemplateError(
                f"unknown rewriter {rewriter!r}{hint} (rewriters: {', '.join(names)})") from None
    if template.category != REWRITER_CATEGORY:
        raise ValueError(
            f"template {template.name!r} is in category {template.category!r}, not {REWRITER_CATEGORY!r}; "
            "list the rewriters with `zimage templates list --category rewriter`"
        )
    return template


def check_image_template(template: Template | None) -> None:
    """Refuse a rewriter template where an image template belongs (the text encoder's system prompt
    for a generation): its system prompt instructs the rewriter LM, and the image would be made
    from "You are a prompt rewriter..." with the user's prompt."""
    if template is not None and getattr(template, "category", None) == REWRITER_CATEGORY:
        raise ValueError(f"template {template.name!r} is a rewriter: its system prompt instructs the prompt "
                         f"rewriter, not the image; rewrite first (pipe.rewrite(prompt, rewriter={template.name!r})) "
                         f"and generate from its answer, or pick an image template "
                         f"(pipe.template_registry.list())")


def build_rewrite_text(
    prompt: str,
    rewriter: str | Template | None = None,
    system_prompt: str | None = None,
    *,
    force_think_block: bool | None = None,
    registry: TemplateRegistry | None = None,
) -> tuple[str, str]:
    """The chat text the LM continues, and the reply prefix it ends with.

    ``rewriter`` names a template of the ``rewriter`` category, rendered with
    :meth:`Template.render` (its think block settings apply); ``system_prompt`` replaces its system
    prompt. ``system_prompt`` alone is an ad-hoc instruction, rendered with an empty think block
    (the model answers directly) unless ``force_think_block=False``. Neither: ``DEFAULT_REWRITER``.
    A template's ``assistant_content`` is not closed here: it starts the reply, which the LM
    continues, and is part of the returned text.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt to rewrite must be a non-empty string")
    if rewriter is None and system_prompt is None:
        rewriter = DEFAULT_REWRITER
    if rewriter is not None:
        template = resolve_rewriter(rewriter, registry)
        prefix = template.assistant_content or ""
        text = template.render(prompt, system_prompt=system_prompt, force_think_block=force_think_block,
                               assistant_content="")
    else:
        prefix = ""
        text = format_prompt(prompt, system_prompt=system_prompt,
                             force_think_block=True if force_think_block is None else force_think_block)
    return text + prefix, prefix


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


