"""Prompt handling: the Qwen3 chat formatter, the template library and the prompt rewriter."""

from .format import format_prompt
from .rewriter import PromptRewriter, RewriterMixin, strip_think
from .templates import Template, TemplateError, TemplateRegistry, UnknownTemplateError, default_registry

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
