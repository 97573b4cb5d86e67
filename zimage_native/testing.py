"""Small models built in code, for tests and benchmarks (no downloads).

``build_tokenizer`` writes a byte-level BPE tokenizer with the Qwen special tokens and a ChatML
chat template; ``randomize_`` re-draws every parameter of a module from a seed. The test suite's
tiny model folders (tests/fixtures.py) and the GPU benchmark's full-size random models use them.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# A ChatML template written for the tests; it renders what Qwen3's template renders for one user
# message (no <think> block with enable_thinking=True, an empty one with enable_thinking=False).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

CORPUS = [
    "a photo of a cat sitting on a red chair in the sun",
    "a watercolor painting of mountains at dawn, soft light, mist over the lake",
    "cinematic portrait of an astronaut, dramatic lighting, 35mm film grain",
    "a poster with the words HELLO WORLD in bold letters",
    "user assistant system think the quick brown fox jumps over the lazy dog",
    "中文 文字 海报 城市 夜景 灯光",
]

def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="right")
    fast.save_pretrained(folder)
    return fast


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Re-initialise every parameter with seeded noise so parity tests see non-trivial weights.

    1-D weights (norms) get 1 + noise, matrices get 1/sqrt(fan_in) noise, biases small noise.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if p.ndim == 1 and name.endswith("weight"):  # norm weights multiply: keep them near 1
                noise = noise + 1.0
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) / fan_in**0.5
            p.copy_(noise.to(p.dtype))
    return module
