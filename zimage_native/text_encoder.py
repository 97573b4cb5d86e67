"""The Qwen3 text encoder: formatted prompt text -> caption features (hidden_states[-2]).

Z-Image conditions on the raw output of decoder layer N-2 of Qwen3-4B (layer 34 of 36), without
the final norm, keeping only real tokens. So only the first N-1 layers are built and loaded, and
transformers' final norm is replaced by an identity (its ``last_hidden_state`` would otherwise be
normed). With right padding and a causal model, real tokens never see the padding, so the
features equal those of an unpadded run.
"""

from __future__ import annotations

import copy
import logging
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .devices import check_component_fits
from .loading import (assign_state_dict, build_on_meta, check_keys, iter_tensors, read_header_keys, read_weights,
                      safetensors_files)
from .prompt.format import CAPTION_TOKENS_MOST
from .quantize import QUANT_MODES, quantize_items, swap_for_quantized_

logger = logging.getLogger(__name__)


def qwen3_on_meta(config) -> nn.Module:
    """transformers' model of ``config`` (a Qwen3 config) with SDPA attention, built on meta.

    Its modelling module is imported first, outside the meta device: importing it imports
    transformers' generation utilities and, through their ``torch.compiler.disable``, torch._dynamo,
    whose first import fails under a meta default device with torch 2.6 ("Tensor.item() cannot be
    called on meta tensors")."""
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    MODEL_MAPPING[type(config)]  # the lazy import, here
    return build_on_meta(lambda: AutoModel.from_config(config, attn_implementation="sdpa"))


def build_truncated_qwen3(full) -> tuple[nn.Module, object, int]:
    """From a full Qwen3 config: the model with the first N-1 layers and no final norm, built on
    meta (what Z-Image reads: hidden_states[-2]); returns (model, its config, N)."""
    config = copy.deepcopy(full)
    n = full.num_hidden_layers
    config.num_hidden_layers = n - 1
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[: n - 1]
    model = qwen3_on_meta(config)
    model.norm = nn.Identity()
    return model, config, n


def unused_key(key: str, n_layers: int) -> bool:
    """A canonical (``model.``-less) Qwen3 key the truncated encoder does not load: the last layer,
    the final norm and the LM head (``lm_head.*``, tied or not)."""
    return key.startswith((f"layers.{n_layers - 1}.", "lm_head.")) or key == "norm.weight"


def load_truncated_qwen3(full, items: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None,
                         device: torch.device | str, quant: str = "none",
                         prepare: Callable[[nn.Module], None] | None = None,
                         fp8_scales: dict[str, torch.Tensor] | None = None,
                         keys: Iterable[str] | None = None) -> nn.Module:
    """The one Qwen3 loader: from a full Qwen3 config and canonical (key, tensor) pairs, the model
    with the first N-1 layers and no final norm, loaded strictly (see :func:`unused_key`).

    Floating tensors are cast to ``dtype`` and moved to ``device`` as they are taken, skipped ones
    never. ``quant`` "int8" | "int4" quantises the weights (:mod:`zimage_native.quantize`) as they
    are taken, by chunks of rows cast and moved to ``device`` (:func:`~zimage_native.quantize.quantize_items`),
    so neither the host nor the device ever holds the encoder, or one of its weights, in ``dtype``:
    the host holds the quantised weights and the one being read as stored. ``prepare(model)`` runs on the model built on meta before the weights are
    assigned (the GGUF loader swaps in its packed linears there; they are kept as they are).
    With ``quant``, ``items`` may hold float8 tensors as a file stores them, with their scales by
    canonical key in ``fp8_scales``: they are dequantised by the same chunks of rows. ``keys``: every
    canonical key of the file (from its header), checked before any weight is read.
    """
    from .formats.tensors import cast

    model, config, n = build_truncated_qwen3(full)
    if prepare is not None:
        prepare(model)
    if keys is not None:
        check_keys(model, (k for k in keys if not unused_key(k, n)), "text_encoder")
    kept = ((k, t) for k, t in items if not unused_key(k, n))
    if quant == "none":
        taken = ((k, cast(t, dtype).to(device)) for k, t in kept)
    elif quant in QUANT_MODES:
        taken = quantize_items(kept, swap_for_quantized_(model, quant), device, dtype, fp8_scales)
    else:
        raise ValueError(f"text encoder quantisation must be one of {QUANT_MODES}, got {quant!r}")
    check_component_fits("text encoder", model, dtype, torch.device(device))  # what the device will hold
    state_dict = read_weights(taken, "text encoder", model, dtype)
    rotary = model.rotary_emb
    model.rotary_emb = None  # its inv_freq buffer is computed, not loaded: rebuild it below on the device
    assign_state_dict(model, state_dict, "text_encoder")
    del state_dict
    with torch.device(device):
        model.rotary_emb = type(rotary)(config=config)
    return model.eval().requires_grad_(False)


def load_qwen3_encoder(folder: str | os.PathLike, dtype: torch.dtype, device: torch.device | str,
                       quant: str = "none") -> nn.Module:
    """The truncated Qwen3 of a transformers folder (config.json + safetensors), loaded strictly;
    ``quant`` as in :func:`load_truncated_qwen3`."""
    from transformers import AutoConfig

    folder = Path(folder)
    full = AutoConfig.from_pretrained(folder)
    if full.model_type != "qwen3":
        raise ValueError(f"{folder}: expected a Qwen3 text encoder (model_type 'qwen3'), got {full.model_type!r}")
    n = full.num_hidden_layers

    def keep(key: str) -> bool:  # skip reading what is not loaded
        return not unused_key(key.removeprefix("model."), n)

    files = safetensors_files(folder)
    # Quantised: each weight is read by the rows that are quantised (and cast), none through the file's map.
    read = iter_tensors(files, dtype, "cpu", keep) if quant == "none" else iter_tensors(files, None, "cpu", keep,
                                                                                        rows=True)
    items = ((k.removeprefix("model."), t) for k, t in read)
    keys = [k.removeprefix("model.") for k in read_header_keys(files)]
    return load_truncated_qwen3(full, items, dtype, device, quant, keys=keys)


def check_vocabulary(tokenizer, rows: int | None, text_encoder) -> None:
    """Refuse a tokenizer with more tokens than the text encoder's embedding has rows: they belong to
    different models, and its first prompt with such a token would fail with an index error (Qwen3's
    tokenizer has 151,669 tokens for 151,936 rows)."""
    if tokenizer is not None and rows is not None and len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer):,} tokens but the embedding of {text_encoder} has "
                         f"{rows:,} rows: they are of different models; give the tokenizer of the model the text "
                         f"encoder comes from (--tokenizer), or a Qwen3-4B text encoder, as Z-Image needs")


class TextEncoder:
    """Tokenizer + truncated Qwen3. ``encode(texts)`` -> list of (L_i, hidden) features."""

    def __init__(self, model: nn.Module, tokenizer, max_sequence_length: int = 512):
        check_vocabulary(tokenizer, getattr(getattr(model, "embed_tokens", None), "num_embeddings", None),
                         "the text encoder")
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_folders(cls, encoder_dir, tokenizer_dir, dtype: torch.dtype, device, quant: str = "none") -> "TextEncoder":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        return cls(load_qwen3_encoder(encoder_dir, dtype, device, quant), tokenizer)

    def __getattr__(self, name: str):
        # Only names the class does not have reach here. diffusers' pipe.text_encoder is the Qwen3 module
        # (pipe.text_encoder.to("cuda"), .parameters(), .half()): say where that module is here.
        if not name.startswith("_") and hasattr(nn.Module, name):
            raise AttributeError(f"'TextEncoder' object has no attribute {name!r}: pipe.text_encoder is the tokenizer "
                                 f"and the Qwen3 module together, the module is pipe.text_encoder.model; its device "
                                 f"and dtype are the pipeline's (pipe.to(device), or text_encoder_device= and dtype= "
                                 f"when loading)")
        raise AttributeError(f"'TextEncoder' object has no attribute {name!r}")

    def _norm_weight(self) -> torch.Tensor:
        # The first layer norm: always in the compute dtype, also when the linears are quantised.
        return self.model.layers[0].input_layernorm.weight

    @property
    def config(self):
        """The Qwen3 config of the module held (``self.model.config``; diffusers' ``text_encoder.config``).
        ``num_hidden_layers`` (and ``layer_types``) count the layers built: one fewer than the checkpoint's
        and diffusers' (the last layer is never read: Z-Image takes ``hidden_states[-2]``)."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self._norm_weight().device

    @property
    def dtype(self) -> torch.dtype:
        return self._norm_weight().dtype

    def tokenize(self, texts: list[str], max_sequence_length: int | None = None) -> list[list[int]]:
        """Token ids per text, cut to ``max_sequence_length`` from the right (as the reference does)."""
        limit = max_sequence_length or self.max_sequence_length
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > limit:
                fix = (f"Raise max_sequence_length to {len(row)} to keep them" if len(row) <= CAPTION_TOKENS_MOST else
                       f"Shorten the prompt to keep them (the released DiTs take max_sequence_length up to "
                       f"{CAPTION_TOKENS_MOST})")
                logger.warning(
                    "prompt %d has %d tokens, more than max_sequence_length %d: the last %d tokens "
                    "(including the chat scaffold's closing tokens) are cut. %s.",
                    i, len(row), limit, len(row) - limit, fix,
                )
        return [row[:limit] for row in ids]

    @torch.no_grad()
    def encode(self, texts: list[str], max_sequence_length: int | None = None) -> list[torch.Tensor]:
        ids = self.tokenize(texts, max_sequence_length)
        longest = max(len(row) for row in ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.bool)
        for i, row in enumerate(ids):  # right padding
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        hidden = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state  # = hidden_states[-2] of the full model
        return [hidden[i, : len(row)] for i, row in enumerate(ids)]


class PromptCache:
    """The caption features of recent text-encoder batches, least recently used out.

    A request asked for again (the same prompt with other seeds, one image at a time, as ``zimage
    generate --num-images`` and a server's users do) is not encoded again, and an offloaded text
    encoder does not visit the GPU for it: ``ZImagePipeline.encode_texts`` runs the encoder only on a
    miss. The key is the whole batch (its formatted texts in order, and the token limit), not each
    text: a text's features can differ in the last bits with the batch it is encoded in (the GEMM
    shapes change with it), so keying by batch keeps every result equal, bit for bit, to the one
    the same request gives without the cache, whatever ran before it.

    At most ``max_entries`` batches and ``max_bytes`` of features are kept (stored as compact copies,
    not views of the encoder's padded output; handed out as copies). The cache belongs to one encoder:
    a different ``source`` empties it, and the pipeline empties it when the encoder moves. It holds
    the encoder only weakly. ``max_entries = 0`` turns it off.
    """

    def __init__(self, max_entries: int = 32, max_bytes: int = 64 * 2**20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._source: Callable[[], object] | None = None
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:
        """Pickled empty: the encoder it holds weakly is another object once unpickled (a cache
        whose source changed empties itself at its next use)."""
        return {**self.__dict__, "_entries": OrderedDict(), "_source": None}

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for features in self._entries.values() for f in features)

    def clear(self) -> None:
        self._entries.clear()

    def encode(self, source, texts: list[str], max_sequence_length: int | None,
               run: Callable[[list[str]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The features of ``texts``: cached, or ``run(texts)`` (then kept). ``source`` is the encoder
        they come from."""
        if self._source is None or self._source() is not source:
            self.clear()
            try:
                self._source = weakref.ref(source)
            except TypeError:  # an object that cannot be weakly referenced
                self._source = lambda: source
        if self.max_entries <= 0:
            self.clear()
            return run(texts)
        key = (tuple(texts), max_sequence_length)
        stored = self._entries.get(key)
        if stored is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return [f.clone() for f in stored]
        self.misses += 1
        features = run(texts)
        if sum(f.nbytes for f in features) <= self.max_bytes:  # (a batch larger than that is not kept)
            self._entries[key] = [f.clone() for f in features]
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
        return features
