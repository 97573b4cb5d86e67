"""Prompt handling: the Qwen3 chat formatter, the template library and the prompt rewriter.

The formatter and the templates need no torch; the rewriter's names are imported on first use.
"""

from .format import format_prompt
from .templates import Template, TemplateError, TemplateRegistry, UnknownTemplateError, default_registry

_LAZY = {"PromptRewriter", "RewriterMixin", "strip_think"}

__all__ = [
    "PromptRewriter",
    "RewriterMixin",
    "Template",
    "TemplateError",
    "TemplateRegistry",
    "UnknownTemplateError",
    "default_registry",
    "format_prompt",
    "strip_think",
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import rewriter

        value = getattr(rewriter, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zimage_native.prompt' has no attribute {name!r}")
