"""``zimage rewrite``: expand a prompt with the model's own Qwen3 text encoder."""

from __future__ import annotations

import click

from ..hub import DEFAULT_MODEL
from ._common import user_errors
from .templates import templates_dir_option


@click.command()
@click.argument("prompt")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model folder (diffusers layout) or Hub id; only text_encoder/ and tokenizer/ are read.")
@click.option("--rewriter", default=None,
              help="Rewriter template (`zimage templates list --category rewriter`) "
                   "[default: rewriter-faithful-expansion, or none with --system-prompt].")
@click.option("--system-prompt", default=None, help="Ad-hoc rewriting instruction (replaces the rewriter's).")
@click.option("--force-think-block/--no-force-think-block", default=None,
              help="Empty think block: answer without reasoning (--no-... lets Qwen3 reason first).")
@templates_dir_option
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 decodes greedily.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Sampling seed (same seed, same text).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")
@user_errors
def rewrite(prompt, model, rewriter, system_prompt, force_think_block, templates_dirs, max_new_tokens,
            temperature, top_p, seed, device, dtype):
    """Rewrite PROMPT into a detailed prompt and print it."""
    from ..prompt.rewriter import PromptRewriter, check_sampling, build_rewrite_text
    from .templates import registry_for

    registry = registry_for(templates_dirs)
    # Refuse bad input before loading weights.
    check_sampling(max_new_tokens, temperature, top_p)
    build_rewrite_text(prompt, rewriter, system_prompt, force_think_block=force_think_block, registry=registry)
    rw = PromptRewriter.from_pretrained(model, device=device, dtype=dtype, template_registry=registry)
    text = rw.rewrite(prompt, rewriter, system_prompt, max_new_tokens, temperature, seed, top_p,
                      force_think_block=force_think_block)
    if not text:
        raise ValueError("the model returned no prompt (its reply was empty or all reasoning); "
                         "raise --max-new-tokens or use --force-think-block")
    click.echo(text)
