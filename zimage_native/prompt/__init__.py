"""Prompt handling: the Qwen3 chat formatter (and, later, templates and the rewriter)."""

from .format import format_prompt

__all__ = ["format_prompt"]
