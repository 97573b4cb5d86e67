"""The prompt rewriter: the text encoder's Qwen3 weights run as a causal language model.

Z-Image's text encoder is a full Qwen3 chat model, so the same weights can expand a short prompt
into a detailed one. The encoder itself only needs the first N-1 layers and no final norm; the
rewriter needs all N layers, the final norm and an LM head, which is the embedding matrix (Qwen3-4B
ties them) unless the checkpoint carries its own ``lm_head.weight`` and the config unties it.

Loading is on demand. Given the text encoder's module (``share_from``), every tensor it already
holds with the right shape, dtype and device is reused, not copied: only the last layer and the
final norm are read from disk (about 0.2 GB of the 8 GB of Qwen3-4B in bf16).

The request is a chat in the format of :func:`format_prompt`: the rewriter template's system prompt,
the user's prompt as the user message, then the assistant header (and, for most shipped rewriters,
an empty think block that tells Qwen3 to answer without reasoning first). Decoding samples one
token at a time with a KV cache until ``<|im_end|>`` or end-of-text; the sampling draws come from a
CPU ``torch.Generator``, so a seed gives the same text on every run on the same device and dtype.
A ``<think>...</think>`` part of the reply (also an unterminated one) is removed from the result.

Three ways in:

- ``pipe.rewrite(prompt, rewriter=...)`` on a pipeline, through its :class:`Rewriter` collaborator;
- :class:`PromptRewriter` ``.from_pretrained(model)``: the LM and tokenizer alone (no DiT, no VAE);
- :func:`rewrite_prompt` ``(lm, tokenizer, prompt, ...)`` with a loaded :class:`Qwen3CausalLM`.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import random
import threading
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import assign_state_dict, iter_tensors, read_header_keys, safetensors_files
from .request import (DEFAULT_REWRITER, REWRITER_CATEGORY, build_rewrite_text, check_sampling,  # noqa: F401
                      resolve_rewriter, strip_think)
from .templates import Template, TemplateRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_REWRITER",
    "PromptRewriter",
    "Qwen3CausalLM",
    "Rewriter",
    "RewriterMixin",
    "build_rewrite_text",
    "check_sampling",
    "generate_ids",
    "load_causal_lm",
    "resolve_rewriter",
    "rewrite_prompt",
    "strip_think",
]

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

# The files a standalone rewriter reads from a Hub snapshot.
REWRITER_HUB_FILES = ["model_index.json", "text_encoder/*.json", "text_encoder/*.safetensors", "tokenizer/*"]


# ---------------------------------------------------------------------------------------------
# The model


class Qwen3CausalLM(nn.Module):
    """A full Qwen3 (transformers' ``Qwen3Model``: all layers and the final norm) with an LM head.

    ``lm_head`` is None when the head is tied to the embedding matrix (Qwen3-4B).
    """

    def __init__(self, model: nn.Module, lm_head: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        if lm_head is None:
            self.register_parameter("lm_head", None)
        else:
            self.lm_head = nn.Parameter(lm_head, requires_grad=False)
        # transformers renamed ``past_key_values`` to ``cache`` in 5.x; pass the cache by the right name.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def config(self):
        return self.model.config

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm_head if self.lm_head is not None else self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self):
        """An empty KV cache for :meth:`forward` (filled in place by each call)."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # transformers 4.x
            return DynamicCache()

    def forward(self, input_ids: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, L, vocab) for ``input_ids`` (B, L), or (B, 1, vocab) with ``last_only``.

        With a ``cache`` from :meth:`new_cache`, ``input_ids`` continue the cached sequence and the
        cache grows by L positions.
        """
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        if last_only:
            hidden = hidden[:, -1:]
        return F.linear(hidden, self.head_weight)


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":  # "cuda" means the current device
        cur = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return a.index == b.index or a.index is None or b.index is None


def load_causal_lm(
    folder: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | str,
    share_from: nn.Module | None = None,
) -> Qwen3CausalLM:
    """Build the full Qwen3 of ``folder`` (a text_encoder folder) as a causal LM and load it strictly.

    Every weight is loaded: all ``num_hidden_layers`` layers, the final norm and the embeddings;
    an optional ``model.`` key prefix is accepted. The LM head is the embedding matrix when the
    config ties them (``tie_word_embeddings``, true for Qwen3-4B; a ``lm_head.weight`` in the
    checkpoint is then not read) and the checkpoint's ``lm_head.weight`` otherwise.

    ``share_from``: a module holding some of the same weights under the same names (the text
    encoder's truncated Qwen3). Its tensors are reused, not copied, where shape, dtype and device
    match; the rest is read from ``folder``.
    """
    from transformers import AutoConfig

    from ..text_encoder import qwen3_on_meta

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "qwen3":
        raise ValueError(f"{folder}: expected a Qwen3 text encoder (model_type 'qwen3'), got {config.model_type!r}")
    device = torch.device(device)
    model = qwen3_on_meta(config)
    rotary = model.rotary_emb
    model.rotary_emb = None  # its inv_freq buffer is computed, not loaded: rebuilt below on the device
    expected = model.state_dict(keep_vars=True)

    shared: dict[str, torch.Tensor] = {}
    if share_from is not None:
        for key, t in share_from.state_dict(keep_vars=True).items():
            key = key.replace("_orig_mod.", "").removeprefix("model.")  # torch.compile wrappers, prefixes
            want = expected.get(key)
            if (want is not None and not t.is_meta and tuple(t.shape) == tuple(want.shape)
                    and t.dtype == dtype and _same_device(t.device, device)):
                shared[key] = t.detach()  # a new Parameter over the same storage

    files = safetensors_files(folder)
    keys = read_header_keys(files)
    head_key = next((k for k in keys if k.removeprefix("model.") == "lm_head.weight"), None)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    if not tied and head_key is None:
        logger.warning("%s: the config unties the LM head but the checkpoint has no lm_head.weight; "
                       "using the embedding matrix as the head", folder)
    use_head = head_key is not None and not tied

    def keep(key: str) -> bool:
        if key == head_key:
            return use_head
        return key.removeprefix("model.") not in shared

    state_dict = dict(shared)
    lm_head = None
    for key, t in iter_tensors(files, dtype, device, keep):
        if key == head_key:
            lm_head = t
        else:
            state_dict[key.removeprefix("model.")] = t
    assign_state_dict(model, state_dict, "rewriter (Qwen3 causal LM)")
    with torch.device(device):
        model.rotary_emb = type(rotary)(config=config)
    logger.info("rewriter LM: %d layers on %s in %s; %d tensors shared with the text encoder, %d read from %s",
                config.num_hidden_layers, device, dtype, len(shared), len(state_dict) - len(shared), folder)
    return Qwen3CausalLM(model.eval(), lm_head).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Decoding


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from (vocab,) logits: argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    # Draw on the CPU generator so a seed reproduces the text whatever the model's device.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_ids(
    lm: Qwen3CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    generator: torch.Generator | None = None,
    stop_ids: Iterable[int] = (),
) -> list[int]:
    """Continue ``prompt_ids``; return the new ids, without the stop id that ended them (if any)."""
    stop = set(stop_ids)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None:
        if len(prompt_ids) >= limit:
            raise ValueError(f"the rewrite request has {len(prompt_ids)} tokens; the model takes at most {limit}")
        max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    cache = lm.new_cache()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=lm.device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = lm(ids, cache=cache, last_only=True)[0, -1]
        token = _pick(logits, temperature, top_p, generator)
        if token in stop:
            break
        out.append(token)
        ids = torch.tensor([[token]], dtype=torch.long, device=lm.device)
    return out


def _stop_ids(tokenizer) -> set[int]:
    ids = set()
    for token in STOP_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def rewrite_prompt(
    lm: Qwen3CausalLM,
    tokenizer,
    prompt: str,
    rewriter: str | Template | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    seed: int | None = None,
    top_p: float = 0.95,
    *,
    force_think_block: bool | None = None,
    registry: TemplateRegistry | None = None,
) -> str:
    """Rewrite ``prompt`` with a loaded LM; see :meth:`Rewriter.rewrite` for the arguments."""
    check_sampling(max_new_tokens, temperature, top_p)
    text, prefix = build_rewrite_text(prompt, rewriter, system_prompt, force_think_block=force_think_block,
                                      registry=registry)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    generator = None
    if temperature > 0:
        generator = torch.Generator("cpu").manual_seed(random.randrange(2**63) if seed is None else seed)
    new_ids = generate_ids(lm, prompt_ids, max_new_tokens, temperature, top_p, generator, _stop_ids(tokenizer))
    if len(new_ids) == max_new_tokens:
        logger.info("the rewrite used all %d new tokens; it may be cut short", max_new_tokens)
    # Keep special tokens while decoding (some tokenizers mark <think> special), strip them after.
    reply = strip_think(prefix + tokenizer.decode(new_ids, skip_special_tokens=False))
    for token in tokenizer.all_special_tokens:
        reply = reply.replace(token, "")
    reply = reply.strip()
    if not reply:
        logger.warning("the rewriter returned no text (%d new tokens, all reasoning or stop tokens); "
                       "raise max_new_tokens or use a rewriter with force_think_block", len(new_ids))
    return reply


# ---------------------------------------------------------------------------------------------
# Entry points

_LOAD_LOCK = threading.Lock()


class Rewriter:
    """The prompt rewriter of a pipeline (a collaborator, not a mixin): the text encoder's Qwen3 run
    as a language model, loaded on first use and sharing the encoder's weights, or an
    OpenAI-compatible chat server.

    It reads what it needs when it needs it, through three callables: the text encoder (a
    :class:`~zimage_native.text_encoder.TextEncoder`: ``.model``, ``.tokenizer``, ``.device``,
    ``.dtype``), the diffusers-layout model folder, and the template registry (None: the shipped
    templates), so a pipeline's later changes to them are seen.
    """

    def __init__(self, text_encoder, model_folder, registry=lambda: None):
        self._text_encoder, self._model_folder, self._registry = text_encoder, model_folder, registry
        self.lm: Qwen3CausalLM | None = None

    def load(self) -> Qwen3CausalLM:
        """The rewriter LM, loaded on first use from ``model_folder / "text_encoder"`` on the text
        encoder's device and dtype, sharing the encoder's weights, and kept until :meth:`unload`
        (or until the text encoder moves to another device or dtype)."""
        with _LOAD_LOCK:
            te = self._text_encoder()
            lm = self.lm
            if lm is None or lm.dtype != te.dtype or not _same_device(lm.device, te.device):
                self.lm = None
                lm = load_causal_lm(Path(self._model_folder()) / "text_encoder", te.dtype, te.device,
                                    share_from=te.model)
                self.lm = lm
            return lm

    def unload(self) -> None:
        """Free the rewriter LM (the weights it shares with the text encoder stay with the encoder)."""
        with _LOAD_LOCK:
            lm, self.lm = self.lm, None
        if lm is not None:
            on_cuda = lm.device.type == "cuda"
            del lm
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    def rewrite(
        self,
        prompt: str,
        rewriter: str | Template | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        seed: int | None = None,
        top_p: float = 0.95,
        *,
        force_think_block: bool | None = None,
        llm_url: str | None = None,
        llm_model: str | None = None,
        llm_timeout: float = 120.0,
    ) -> str:
        """Expand ``prompt`` with the text encoder's Qwen3 run as a language model, or with
        ``llm_url``: on that OpenAI-compatible chat server (``llm_model`` names the served model;
        see :mod:`zimage_native.prompt.remote`), without loading the rewriter LM here.

        - ``rewriter``: the name of a template of the ``rewriter`` category (``zimage templates
          list --category rewriter``), or a Template; ``system_prompt``: an ad-hoc instruction
          (with ``rewriter``, it replaces the template's system prompt). Neither: the default
          rewriter, ``rewriter-faithful-expansion``.
        - ``temperature`` 0 decodes greedily; otherwise top-p sampling, reproducible with ``seed``.
        - ``force_think_block``: overrides the template's empty think block (False lets Qwen3
          reason first; allow more ``max_new_tokens`` then). The reasoning is never returned.

        Returns the rewritten prompt (may be empty when the reply was all reasoning).
        """
        registry = self._registry()
        if llm_url is not None:
            from .remote import ChatRewriter

            chat = ChatRewriter(llm_url, llm_model, timeout=llm_timeout, template_registry=registry)
            return chat.rewrite(prompt, rewriter, system_prompt, max_new_tokens, temperature, seed, top_p,
                                force_think_block=force_think_block)
        check_sampling(max_new_tokens, temperature, top_p)
        build_rewrite_text(prompt, rewriter, system_prompt, force_think_block=force_think_block,
                           registry=registry)  # refuse bad input before loading weights
        return rewrite_prompt(self.load(), self._text_encoder().tokenizer, prompt, rewriter, system_prompt,
                              max_new_tokens, temperature, seed, top_p, force_think_block=force_think_block,
                              registry=registry)


class RewriterMixin:
    """``rewrite`` / ``load_rewriter`` / ``unload_rewriter`` on a class with ``model_folder`` and
    ``text_encoder`` (and optionally ``template_registry``), through a :class:`Rewriter`. Kept for
    code that mixes it in; the pipeline holds a Rewriter instead."""

    template_registry: TemplateRegistry | None = None

    @property
    def prompt_rewriter(self) -> Rewriter:
        rw = self.__dict__.get("_prompt_rewriter")
        if rw is None:
            rw = self.__dict__["_prompt_rewriter"] = Rewriter(lambda: self.text_encoder, lambda: self.model_folder,
                                                              lambda: self.template_registry)
        return rw

    @property
    def _rewriter_lm(self) -> Qwen3CausalLM | None:
        return self.prompt_rewriter.lm

    def load_rewriter(self) -> Qwen3CausalLM:
        """As :meth:`Rewriter.load`."""
        return self.prompt_rewriter.load()

    def unload_rewriter(self) -> None:
        """As :meth:`Rewriter.unload`."""
        self.prompt_rewriter.unload()

    def rewrite(self, prompt: str, *args, **kwargs) -> str:
        """As :meth:`Rewriter.rewrite`."""
        return self.prompt_rewriter.rewrite(prompt, *args, **kwargs)


def _rewriter_folder(path_or_id, revision=None, cache_dir=None, local_files_only=False) -> Path:
    """A local model folder as is; a Hub id downloads only the text encoder and the tokenizer."""
    from ..hub import _HUB_ID

    path = Path(path_or_id).expanduser()
    if not path.exists():
        text = str(path_or_id)
        if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
            raise FileNotFoundError(f"model folder not found: {text}")
        from ..hub import hub_snapshot

        path = hub_snapshot(text, "text encoder of", revision=revision, cache_dir=cache_dir,
                            allow_patterns=REWRITER_HUB_FILES, local_files_only=local_files_only)
    missing = [name for name in ("text_encoder/config.json", "tokenizer") if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a Z-Image model folder (diffusers layout): missing {missing}")
    return path


class PromptRewriter:
    """The rewriter without a pipeline: the Qwen3 LM and its tokenizer only.

    >>> rw = PromptRewriter.from_pretrained("Tongyi-MAI/Z-Image-Turbo", device="cuda")
    >>> rw.rewrite("a fox in the snow", rewriter="rewriter-cinematic", seed=0)
    """

    def __init__(self, lm: Qwen3CausalLM, tokenizer, template_registry: TemplateRegistry | None = None):
        self.lm = lm
        self.tokenizer = tokenizer
        self.template_registry = template_registry

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        template_registry: TemplateRegistry | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> "PromptRewriter":
        """Load ``text_encoder/`` and ``tokenizer/`` of a model folder or Hub id (device and dtype
        as for the pipeline: default bf16 on an accelerator, fp32 on the CPU)."""
        from transformers import AutoTokenizer

        from ..devices import resolve_device, resolve_dtype

        folder = _rewriter_folder(path_or_id, revision, cache_dir, local_files_only)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        return cls(load_causal_lm(folder / "text_encoder", dtype, device), tokenizer, template_registry)

    def rewrite(
        self,
        prompt: str,
        rewriter: str | Template | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        seed: int | None = None,
        top_p: float = 0.95,
        *,
        force_think_block: bool | None = None,
    ) -> str:
        """As :meth:`Rewriter.rewrite`."""
        return rewrite_prompt(self.lm, self.tokenizer, prompt, rewriter, system_prompt, max_new_tokens,
                              temperature, seed, top_p, force_think_block=force_think_block,
                              registry=self.template_registry)
