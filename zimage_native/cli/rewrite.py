"""``zimage rewrite``: expand a prompt with the model's own Qwen3 text encoder, or with a model on an
OpenAI-compatible chat server (``--llm-url``)."""

from __future__ import annotations

import click

from ..hub import DEFAULT_MODEL
from . import PromptCommand
from ._common import user_errors
from .options import DtypeChoice, stack
from .templates import templates_dir_option

# The rewriter on an OpenAI-compatible chat server (vLLM, SGLang, llama.cpp's server, Ollama, ...).
llm_options = stack(
    click.option("--llm-url", default=None, envvar="ZIMAGE_LLM_URL",
                 help="Rewrite on this OpenAI-compatible chat server (http://host:port or .../v1) instead of "
                      "loading Qwen3 here [env ZIMAGE_LLM_URL]; its API key from $ZIMAGE_LLM_API_KEY."),
    click.option("--llm-model", default=None, envvar="ZIMAGE_LLM_MODEL",
                 help="Model name on that server (e.g. Qwen/Qwen3-4B, or an Ollama tag) [env ZIMAGE_LLM_MODEL]."),
    click.option("--llm-timeout", type=float, default=120.0, show_default=True,
                 help="Seconds to wait for the chat server's answer."),
)


def chat_rewriter(llm_url, llm_model, llm_timeout, registry=None):
    """The chat-server rewriter of the --llm-* flags, or None without --llm-url."""
    if llm_url is None:
        if llm_model is not None:
            raise ValueError("--llm-model needs --llm-url (the chat server that serves it)")
        return None
    if not llm_timeout > 0:
        raise ValueError(f"--llm-timeout must be > 0 seconds, got {llm_timeout}")
    from ..prompt.remote import ChatRewriter

    return ChatRewriter(llm_url, llm_model, timeout=llm_timeout, template_registry=registry)


@click.command(cls=PromptCommand)
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
@click.option("--dtype", type=DtypeChoice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help="auto: bfloat16 on GPU, float32 on CPU (bf16, fp32, fp16 too).")
@llm_options
@user_errors
def rewrite(prompt, model, rewriter, system_prompt, force_think_block, templates_dirs, max_new_tokens,
            temperature, top_p, seed, device, dtype, llm_url, llm_model, llm_timeout):
    """Rewrite PROMPT into a detailed prompt and print it (with --llm-url: on a chat server)."""
    from ..prompt.request import build_rewrite_text, check_sampling
    from .templates import registry_for

    registry = registry_for(templates_dirs)
    # Refuse bad input before loading weights.
    check_sampling(max_new_tokens, temperature, top_p)
    build_rewrite_text(prompt, rewriter, system_prompt, force_think_block=force_think_block, registry=registry)
    rw = chat_rewriter(llm_url, llm_model, llm_timeout, registry)
    if rw is None:
        from ..prompt.rewriter import PromptRewriter

        rw = PromptRewriter.from_pretrained(model, device=device, dtype=dtype, template_registry=registry)
    text = rw.rewrite(prompt, rewriter, system_prompt, max_new_tokens, temperature, seed, top_p,
                      force_think_block=force_think_block)
    if not text:
        raise ValueError("the model returned no prompt (its reply was empty or all reasoning); "
                         "raise --max-new-tokens or use --force-think-block")
    click.echo(text)
