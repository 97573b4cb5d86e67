"""The Qwen3 chat formatter that turns a prompt into the text the Z-Image text encoder reads.

The default output is exactly what diffusers and ComfyUI feed the encoder (Qwen3's chat
template with one user message, ``add_generation_prompt=True`` and ``enable_thinking=True``)::

    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

The optional parts follow content-driven rules:

- ``system_prompt`` puts ``<|im_start|>system\\n{system}<|im_end|>\\n`` first;
- ``thinking_content`` adds ``<think>\\n{content}\\n</think>\\n\\n`` after the assistant header;
- ``force_think_block`` adds an empty ``<think>\\n\\n</think>\\n\\n`` when there is no thinking content;
- ``assistant_content`` follows the think block (if any) and is closed with ``<|im_end|>``;
- ``strip_quotes`` removes ``"`` from the prompt (Z-Image renders quoted text literally).
"""

from __future__ import annotations

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The released DiTs number the caption rows (padded to a multiple of 32) on their first RoPE axis,
# 1536 positions: (1536 - 2) // 32 * 32 is the longest chat-formatted prompt, in tokens, they take.
CAPTION_TOKENS_MOST = 1504


def format_prompt(
    prompt: str,
    system_prompt: str | None = None,
    thinking_content: str | None = None,
    assistant_content: str | None = None,
    force_think_block: bool = False,
    strip_quotes: bool = False,
) -> str:
    """Render one prompt in the Qwen3 chat format described in the module docstring."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if strip_quotes:
        prompt = prompt.replace('"', "")
    text = ""
    if system_prompt:
        text += f"{IM_START}system\n{system_prompt}{IM_END}\n"
    text += f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"
    if thinking_content:
        text += f"<think>\n{thinking_content}\n</think>\n\n"
    elif force_think_block:
        text += "<think>\n\n</think>\n\n"
    if assistant_content:
        text += f"{assistant_content}{IM_END}"
    return text
