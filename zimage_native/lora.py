"""LoRA for the Z-Image DiT: parse every common spelling, fuse into the weights, undo exactly.

Fusing means W <- W + user_scale * (alpha / rank) * dW for each targeted Linear, computed in fp32
and rounded once to the weight dtype. The originals are kept (on the CPU by default) the first
time a weight is touched, so ``unload_lora`` restores them bit for bit, however many LoRAs were
stacked. With ``undo=False`` nothing is kept and ``unload_lora`` asks for a reload instead.

Spellings accepted (``parse_lora``), in any combination:

- prefixes ``diffusion_model.``, ``model.diffusion_model.``, ``transformer.``, ``base_model.model.``,
  ``lora_unet_`` / ``lora_transformer_`` / ``lycoris_`` (module paths with dots written as ``_``);
- weights ``lora_down/lora_up``, ``lora_A/lora_B`` (optional ``.default`` or another adapter name),
  dotted ``.lora.down/.lora.up``, ``lora_linear_layer.down/up``; ``alpha`` tensors, else the PEFT
  config that diffusers / PEFT write into the safetensors metadata (``lora_adapter_metadata``:
  ``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else alpha = rank;
- LyCORIS LoKr (``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``), LoHa
  (``hada_w1_a/b``, ``hada_w2_a/b``) and full deltas (``diff``);
- module names of the diffusers tree (``to_q``, ``to_out.0``, ``feed_forward.w1``,
  ``adaLN_modulation.0``, ...) and of the original / ComfyUI tree (fused ``attention.qkv``, split
  into q | k | v row thirds; bare ``attention.out`` = ``to_out.0``; ``x_embedder``, ``final_layer``);
  our native-fused names (``to_qkv``, ``w13``) too.

When a file spells the same weights twice (``qkv`` and ``to_q/k/v``; ``out`` and ``to_out.0``), the
split / canonical spelling is applied and the other is reported as a duplicate, not added twice.
A LoRA for another model family (FLUX, SD/SDXL, SD3, Wan, ...) raises an error that names it.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .converters.keymap import DIT_COMFYUI, DIT_NATIVE_FUSED, Fuse, Rename
from .formats.families import QWEN3_TEXT_ENCODER_LORA_KEY, foreign_family
from .offload import release_streamed

logger = logging.getLogger(__name__)

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.",
             "lora_unet_", "lora_transformer_", "lycoris_")

_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?P<suffix>"
    r"lora_(?:down|up|A|B)(?:\.[^.]+)?\.weight|lora\.(?:down|up)\.weight|lora_linear_layer\.(?:down|up)\.weight"
    r"|lora_mid\.weight|alpha|lokr_(?:w1|w1_a|w1_b|w2|w2_a|w2_b|t2)|hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2)"
    r"|dora_scale|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?|diff|diff_b)$"
)


def _normal(name: str) -> str:
    """One spelling for dotted and underscored module paths: 'layers_0_attention_to_q' == 'layers.0.attention.to_q'."""
    return name.replace("_", ".")


def _role(suffix: str) -> str:
    if suffix.startswith(("lora_down", "lora_A", "lora.down", "lora_linear_layer.down")):
        return "down"
    if suffix.startswith(("lora_up", "lora_B", "lora.up", "lora_linear_layer.up")):
        return "up"
    if suffix.startswith(("dora_scale", "lora_magnitude_vector")):
        return "dora"
    if suffix == "lora_mid.weight":
        return "mid"
    return suffix


# =========================================================================== targets


@dataclass(frozen=True)
class Target:
    """A module name in a LoRA file and the canonical Linear(s) it stands for (several when fused)."""

    modules: tuple[str, ...]
    canonical: bool  # the name is our own module name (not an alias of the original tree)


def build_targets(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Target], dict[str, Target]]:
    """(exact names, normalised names) -> Target, for canonical Linear names with weight ``shapes``.

    Aliases come from the ComfyUI and native-fused key maps, so the LoRA names follow the same
    table as the checkpoints do.
    """
    exact: dict[str, Target] = {name: Target((name,), True) for name in shapes}
    fused: dict[str, list[str]] = {}
    for keymap in (DIT_COMFYUI, DIT_NATIVE_FUSED):
        for name in shapes:
            rule, foreign, index = keymap.inverse_key(name + ".weight")
            if rule is None or not foreign.endswith(".weight"):
                continue
            alias = foreign[: -len(".weight")]
            if alias == name:
                continue
            if isinstance(rule, Fuse):
                parts = fused.setdefault(alias, [None] * len(rule.dst))
                parts[index] = name
            elif isinstance(rule, Rename):
                exact.setdefault(alias, Target((name,), False))
    for alias, parts in fused.items():
        if all(p is not None for p in parts):
            exact.setdefault(alias, Target(tuple(parts), False))
    normal: dict[str, Target] = {}
    clashes = set()
    for name, target in exact.items():
        key = _normal(name)
        if key in normal and normal[key] != target:
            clashes.add(key)
        normal[key] = target
    for key in clashes:
        del normal[key]
    return exact, normal


def linear_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Canonical name -> (out, in) of every Linear in a transformer (packed GGUF / fp8 linears included)."""
    from .quant_linear import PackedLinear

    return {name: (m.out_features, m.in_features) for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, PackedLinear))}


# =========================================================================== parsing


def _factor(t: dict[str, torch.Tensor], a: str, b: str, full: str) -> torch.Tensor:
    """A LoKr factor: stored whole (``full``) or as the product of two low-rank halves."""
    if full in t:
        return t[full].float().flatten(1)
    return t[a].float().flatten(1) @ t[b].float().flatten(1)


@dataclass
class LoraModule:
    """One adapted module of a LoRA file: its factors and the canonical weights it changes."""

    source: str  # the module path as spelled in the file (prefix removed)
    target: Target
    tensors: dict[str, torch.Tensor]
    keys: list[str]  # the file keys it was read from
    scale_from_metadata: float | None = None  # alpha/rank from the file's PEFT metadata (no alpha tensor)
    native_lokr: bool = False  # written by musubi-tuner's own LoKr (see alpha_scale)

    @property
    def kind(self) -> str:
        roles = self.tensors
        if "down" in roles or "up" in roles:
            return "lora"
        if any(r.startswith("lokr_") for r in roles):
            return "lokr"
        if any(r.startswith("hada_") for r in roles):
            return "loha"
        if "diff" in roles:
            return "full"
        return "unknown"

    def check(self) -> None:
        """Raise if the factors are incomplete or of a kind we cannot fuse (before any weight changes)."""
        t, kind = self.tensors, self.kind
        where = f"LoRA module {self.source}"
        if "mid" in t or "lokr_t2" in t or "hada_t1" in t or "hada_t2" in t:
            raise ValueError(f"{where}: Tucker-decomposed (conv) factors are not supported for Linear layers")
        if kind == "lora" and not ("down" in t and "up" in t):
            raise ValueError(f"{where}: has {'down' if 'down' in t else 'up'} weights but not the other half")
        if kind == "lokr" and (self._shape("lokr_w1_a", "lokr_w1_b", "lokr_w1") is None
                               or self._shape("lokr_w2_a", "lokr_w2_b", "lokr_w2") is None):
            raise ValueError(f"{where}: incomplete LoKr factors {sorted(t)}")
        if kind == "loha" and not all(k in t for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            raise ValueError(f"{where}: incomplete LoHa factors {sorted(t)}")
        if kind == "unknown":
            raise ValueError(f"{where}: no LoRA weights (only {sorted(t)})")
        pairs = {"lora": [("up", "down")], "lokr": [("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")],
                 "loha": [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")]}.get(kind, [])
        for left, right in pairs:
            if left in t and right in t and t[left].shape[1] != t[right].shape[0]:
                raise ValueError(f"{where}: {left} {tuple(t[left].shape)} and {right} {tuple(t[right].shape)} do "
                                 f"not multiply (rank mismatch)")
        if kind == "loha" and (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]) != (
                t["hada_w2_a"].shape[0], t["hada_w2_b"].shape[1]):
            raise ValueError(f"{where}: the two LoHa products have different shapes")

    def _shape(self, a: str, b: str, full: str) -> tuple[int, int] | None:
        t = self.tensors
        if full in t:
            return tuple(t[full].shape[:2])
        if a in t and b in t:
            return t[a].shape[0], t[b].shape[1]
        return None

    def delta_shape(self) -> tuple[int, int]:
        t, kind = self.tensors, self.kind
        if kind == "lora":
            return t["up"].shape[0], t["down"].flatten(1).shape[1]
        if kind == "lokr":
            (a, b) = self._shape("lokr_w1_a", "lokr_w1_b", "lokr_w1")
            (c, d) = self._shape("lokr_w2_a", "lokr_w2_b", "lokr_w2")
            return a * c, b * d
        if kind == "loha":
            return t["hada_w1_a"].shape[0], t["hada_w1_b"].flatten(1).shape[1]
        return tuple(t["diff"].shape[:2])

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "lokr":
            for key in ("lokr_w2_b", "lokr_w1_b"):
                if key in t:
                    return t[key].shape[0]
            return None
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        return None

    @property
    def alpha_scale(self) -> float:
        """alpha / rank: the module's alpha tensor, else the file's PEFT metadata, else 1 (alpha = rank;
        also when there is no rank: full LoKr factors and full deltas). musubi-tuner's own LoKr
        (``native_lokr``) with a whole ``lokr_w2`` trains with alpha / max(w2's shape) instead, where
        LyCORIS (and diffusers and ComfyUI, reading LyCORIS files) use 1."""
        alpha, rank = self.tensors.get("alpha"), self.rank
        if self.native_lokr and "lokr_w2" in self.tensors:
            dim = max(self.tensors["lokr_w2"].shape[:2])
            return (dim if alpha is None else float(alpha.float().item())) / dim
        if alpha is None and self.scale_from_metadata is not None and rank is not None:
            return self.scale_from_metadata
        if alpha is None or rank is None:
            return 1.0
        return float(alpha.float().item()) / rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) in fp32 with ``B @ A`` equal to :meth:`delta` (alpha/rank in B), where those two are
        smaller than the dense delta; None where they are not (a full delta, a LoKr with a whole
        second factor). A LoRA: its own factors. A LoKr whose second factor is low-rank, W1 x (U V):
        B = W1 x U and A = I x V (the Kronecker product's mixed-product rule), of rank q r for a
        (p, q) W1. A LoHa, (B1 A1) * (B2 A2): the face-splitting product, rank r1 r2 (B's column
        (j, k) is B1[:, j] * B2[:, k], A's row (j, k) is A1[j] * A2[k])."""
        t, kind = self.tensors, self.kind
        if kind == "lora":
            down, up = t["down"].float().flatten(1), t["up"].float().flatten(1)
        elif kind == "lokr" and "lokr_w2_a" in t and "lokr_w2_b" in t:
            w1 = _factor(t, "lokr_w1_a", "lokr_w1_b", "lokr_w1")
            up = torch.kron(w1, t["lokr_w2_a"].float().flatten(1))
            down = torch.kron(torch.eye(w1.shape[1]), t["lokr_w2_b"].float().flatten(1))
        elif kind == "loha":
            b1, a1 = t["hada_w1_a"].float().flatten(1), t["hada_w1_b"].float().flatten(1)
            b2, a2 = t["hada_w2_a"].float().flatten(1), t["hada_w2_b"].float().flatten(1)
            up = (b1[:, :, None] * b2[:, None, :]).flatten(1)
            down = (a1[:, None, :] * a2[None, :, :]).flatten(0, 1)
        else:
            return None
        rows, cols = up.shape[0], down.shape[1]
        if kind != "lora" and down.shape[0] * (rows + cols) >= rows * cols:
            return None  # the dense delta is smaller
        return down, up * self.alpha_scale

    def kron_factors(self, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W1, W2) in fp32 with ``kron(W1, W2)`` equal to :meth:`delta` (alpha/rank in W2), for a
        LoKr with a whole second factor, whose delta has no smaller low-rank form but is held by
        these two small matrices; None for other modules, or where a split of the output ``rows``
        (a fused target's layers) does not fall on whole rows of W1."""
        t = self.tensors
        if self.kind != "lokr" or "lokr_w2" not in t:
            return None
        w2 = t["lokr_w2"].float().flatten(1) * self.alpha_scale
        if rows is not None and any(n % w2.shape[0] for n in rows):
            return None
        return _factor(t, "lokr_w1_a", "lokr_w1_b", "lokr_w1"), w2

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The unscaled update dW (fp32, (out, in)) times alpha/rank."""
        t = {k: v.to(device) if device is not None else v for k, v in self.tensors.items()}
        kind = self.kind
        if kind == "lora":
            d = t["up"].float().flatten(1) @ t["down"].float().flatten(1)
        elif kind == "lokr":
            d = torch.kron(_factor(t, "lokr_w1_a", "lokr_w1_b", "lokr_w1"),
                           _factor(t, "lokr_w2_a", "lokr_w2_b", "lokr_w2"))
        elif kind == "loha":
            d = (t["hada_w1_a"].float().flatten(1) @ t["hada_w1_b"].float().flatten(1)) * (
                t["hada_w2_a"].float().flatten(1) @ t["hada_w2_b"].float().flatten(1))
        else:
            d = t["diff"].float().reshape(self.delta_shape())
        return d * self.alpha_scale


@dataclass
class LoraReport:
    """What one LoRA did: how many modules matched, what was left out, which trainer wrote it."""

    path: str
    family: str
    scale: float = 1.0
    matched: int = 0  # LoRA modules applied
    weights: int = 0  # model weights changed (a fused qkv module changes three)
    unmatched: list[str] = field(default_factory=list)  # file keys that were not used
    duplicates: list[str] = field(default_factory=list)  # modules skipped: another spelling of the same weights
    kinds: dict[str, int] = field(default_factory=dict)  # lora / lokr / loha / full -> modules

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        text = (f"LoRA {self.path} (scale {self.scale:g}; {self.family}): {self.matched} modules matched "
                f"({self.weights} weights; {kinds}), {len(self.unmatched)} unmatched keys")
        if self.unmatched:
            text += f" e.g. {self.unmatched[:3]}"
        if self.duplicates:
            text += f", {len(self.duplicates)} duplicate modules skipped"
        return text


def detect_family(keys: Iterable[str]) -> str:
    """The trainer family / naming convention of a LoRA, from its key names."""
    keys = list(keys)
    found = []

    def has(pred) -> bool:
        return any(pred(k) for k in keys)

    if has(lambda k: k.startswith("lora_unet_") or k.startswith("lora_transformer_")):
        found.append("kohya / musubi-tuner (lora_unet_, lora_down/lora_up)")
    if has(lambda k: k.startswith("lycoris_")):
        found.append("LyCORIS (lycoris_ underscored names, SimpleTuner)")
    if has(lambda k: k.startswith(("diffusion_model.", "model.diffusion_model."))):
        found.append("ai-toolkit / musubi-converted / ComfyUI (diffusion_model. prefix)")
    if has(lambda k: k.startswith("transformer.")):
        found.append("diffusers / SimpleTuner (transformer. prefix)")
    if has(lambda k: k.startswith("base_model.model.") or ".default." in k):
        found.append("PEFT / DiffSynth-Studio (adapter-named lora_A/lora_B)")
    if has(lambda k: ".lora.down." in k or ".lora.up." in k):
        found.append("dotted .lora.down/.lora.up (Anime-Z style)")
    if has(lambda k: "lora_linear_layer" in k):
        found.append("OneTrainer / legacy diffusers (lora_linear_layer)")
    if has(lambda k: ".lokr_" in k):
        found.append("LyCORIS LoKr")
    if has(lambda k: ".hada_" in k):
        found.append("LyCORIS LoHa")
    if has(lambda k: re.search(r"attention[._]qkv[._]", k) is not None):
        found.append("original module tree (fused attention.qkv)")
    if not found and has(lambda k: ".lora_A." in k or ".lora_B." in k):
        found.append("PEFT / diffusers (bare module names)")
    return "; ".join(found) or "unknown"


_COMPONENT_NAMES = {"transformer": ("a Z-Image DiT", "--transformer", "transformer"),
                    "vae": ("a VAE", "--vae", "vae"), "text_encoder": ("a Qwen3 text encoder", "--text-encoder",
                                                                      "text_encoder")}


def refuse_model_file(path: str | os.PathLike, keys: Iterable[str]) -> None:
    """Refuse, by its key names alone (before any tensor is read: a DiT is 12 GB), a model checkpoint
    given as a LoRA: no key is a LoRA tensor and the format detection finds model components. The
    error says what the file holds and where it goes."""
    if any(_SUFFIX.match(_strip(k)) for k in keys):
        return
    from .formats import detect_format

    try:
        fmt = detect_format(path)
    except Exception:  # noqa: BLE001 - a file the detection refuses: the LoRA parser says what it can
        return
    found = [c for c in fmt.components if c.component in _COMPONENT_NAMES]
    if fmt.kind != "model" or not found:
        return
    what = ", ".join(f"{_COMPONENT_NAMES[c.component][0]} ({c.layout} layout)" for c in found)
    where = "; ".join(f"{_COMPONENT_NAMES[c.component][1]} FILE on the command line, "
                      f"{_COMPONENT_NAMES[c.component][2]}= in from_pretrained" for c in found)
    raise ValueError(f"{path}: this is not a LoRA but model weights: {what}; load it as such ({where})")


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the PEFT config


def lora_alpha_config(metadata: Mapping[str, str] | None) -> dict | None:
    """The alpha part of the PEFT config in a LoRA file's safetensors metadata, or None.

    diffusers writes ``LoraConfig.to_dict()`` as JSON under ``lora_adapter_metadata``, its keys
    prefixed with the component (``transformer.lora_alpha``); unprefixed keys are read too. Returns
    ``{"lora_alpha", "alpha_pattern", "use_rslora"}`` when the config gives ``lora_alpha``.
    """
    raw = (metadata or {}).get(LORA_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"the LoRA's {LORA_METADATA_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        return None
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    config = prefixed or config
    if config.get("lora_alpha") is None:
        return None
    return {"lora_alpha": float(config["lora_alpha"]), "alpha_pattern": dict(config.get("alpha_pattern") or {}),
            "use_rslora": bool(config.get("use_rslora", False)), "r": config.get("r"),
            "rank_pattern": dict(config.get("rank_pattern") or {})}


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's pattern rule: the first key equal to ``module`` or to a dotted suffix of it (keys are
    regular expressions), else ``default``."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def metadata_rank(config: Mapping, module: str) -> int | None:
    """The rank that a :func:`lora_alpha_config` gives ``module`` (``rank_pattern``, else ``r``)."""
    rank = _pattern_value(config.get("rank_pattern", {}), module, config.get("r"))
    return None if rank is None else int(rank)


def metadata_alpha(config: Mapping, module: str, rank: int) -> float:
    """alpha / rank (alpha / sqrt(rank) for rsLoRA) of ``module`` under a :func:`lora_alpha_config`.

    As in PEFT, an ``alpha_pattern`` key applies to the module whose name equals it or ends with
    ``.`` + it (keys are regular expressions; the first that matches wins), else ``lora_alpha``.
    """
    alpha = float(_pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
    return alpha / (math.sqrt(rank) if config["use_rslora"] else rank)


def parse_lora(state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
               name: str = "<dict>", metadata: Mapping[str, str] | None = None) -> tuple[list[LoraModule], LoraReport]:
    """Group a LoRA state dict by module, resolve every module onto canonical Linear names with
    weight ``shapes``, drop duplicate spellings and check all shapes. Changes nothing.

    ``metadata``: the file's safetensors metadata; its PEFT ``lora_alpha`` / ``alpha_pattern`` give
    the alpha of modules that have no ``alpha`` tensor (:func:`lora_alpha_config`).
    """
    alpha_config = lora_alpha_config(metadata)
    # musubi-tuner's own LoKr keeps its factor as a network-level tensor and names its module in the
    # kohya metadata; its full-w2 modules scale by alpha / max(w2's shape) (LoraModule.alpha_scale).
    native_lokr = "lokr_factor" in state_dict or str((metadata or {}).get("ss_network_module", "")).endswith("lokr")
    keys = [k for k in state_dict if k != "lokr_factor"]
    report = LoraReport(path=name, family=detect_family(keys))
    exact, normal = build_targets(shapes)
    groups: dict[str, LoraModule] = {}
    for key in keys:
        m = _SUFFIX.match(_strip(key))
        if m is None:
            report.unmatched.append(key)
            continue
        source, role = m.group("module"), _role(m.group("suffix"))
        target = exact.get(source) or normal.get(_normal(source))
        if target is None:
            report.unmatched.append(key)
            continue
        group = groups.setdefault(source, LoraModule(source, target, {}, []))
        if role in group.tensors:
            raise ValueError(f"{name}: two {role} tensors for module {source} ({group.keys} and {key})")
        group.tensors[role] = state_dict[key]
        group.keys.append(key)
    modules: list[LoraModule] = []
    for group in groups.values():
        if "dora" in group.tensors:
            raise ValueError(f"{name}: module {group.source} is DoRA (dora_scale / lora_magnitude_vector); DoRA "
                             f"re-normalises weights and is not supported")
        if group.kind == "unknown" and set(group.tensors) <= {"alpha", "diff_b"}:
            report.unmatched.extend(group.keys)  # an alpha without weights, or a bias delta
            continue
        if "diff_b" in group.tensors:
            report.unmatched.append(next(k for k in group.keys if k.endswith("diff_b")))
            del group.tensors["diff_b"]
        group.check()
        group.native_lokr = native_lokr and group.kind == "lokr"
        if alpha_config is not None and group.kind == "lora" and "alpha" not in group.tensors:
            group.scale_from_metadata = metadata_alpha(alpha_config, group.source, group.rank)
            meta_rank = metadata_rank(alpha_config, group.source)
            if meta_rank is not None and meta_rank != group.rank:
                logger.warning("%s: module %s has rank %d but the file's PEFT metadata (r / rank_pattern) says %d; "
                               "alpha / %d is used", name, group.source, group.rank, meta_rank, group.rank)
        modules.append(group)
    # One spelling per weight: canonical single-module names first, then aliases, then fused modules.
    modules.sort(key=lambda g: (len(g.target.modules) > 1, not g.target.canonical))
    claimed: dict[str, str] = {}
    kept: list[LoraModule] = []
    for group in modules:
        overlap = [m for m in group.target.modules if m in claimed]
        if overlap:
            report.duplicates.append(group.source)
            logger.info("%s: module %s duplicates %s; applied once", name, group.source, claimed[overlap[0]])
            continue
        for m in group.target.modules:
            claimed[m] = group.source
        kept.append(group)
    for group in kept:
        out = sum(shapes[m][0] for m in group.target.modules)
        want = (out, shapes[group.target.modules[0]][1])
        if tuple(group.delta_shape()) != want:
            got = tuple(group.delta_shape())
            hint = " (a Lumina-2 LoRA? Lumina-2 shares Z-Image's module names at width 2304)" if 2304 in got else ""
            raise ValueError(f"{name}: LoRA module {group.source} gives an update of shape {got} but the model "
                             f"weight is {want}: the LoRA is for a different model{hint}")
        report.kinds[group.kind] = report.kinds.get(group.kind, 0) + 1
    report.matched = len(kept)
    report.weights = sum(len(g.target.modules) for g in kept)
    foreign = foreign_family(report.unmatched)
    text_encoder = text_encoder_keys(report.unmatched)
    if not kept:
        if foreign:
            raise ValueError(f"{name}: this LoRA is for {foreign[0]}, not Z-Image (key {foreign[1]!r})")
        if text_encoder:
            raise ValueError(f"{name}: this is a LoRA for the Qwen3 text encoder ({len(text_encoder)} keys, e.g. "
                             f"{text_encoder[0]!r}), which this engine does not apply: it applies LoRAs to the "
                             f"DiT only, and this file has no DiT keys")
        raise ValueError(f"{name}: no key of this LoRA matches a Z-Image module (family: {report.family}; "
                         f"{len(keys)} keys, e.g. {keys[:3]})")
    if foreign:
        logger.warning("%s: some keys look like %s (e.g. %s); they were not applied", name, foreign[0], foreign[1])
    if text_encoder:
        logger.warning("%s: %d keys are for the Qwen3 text encoder (e.g. %s), which this engine does not apply "
                       "LoRAs to: skipped; the DiT part (%d modules) is applied", name, len(text_encoder),
                       text_encoder[0], len(kept))
    return kept, report


def text_encoder_keys(keys: Iterable[str]) -> list[str]:
    """The keys of a LoRA for the Qwen3 text encoder (kohya ``lora_te_model_layers_N_...``), which this
    engine does not apply (:data:`~zimage_native.formats.families.QWEN3_TEXT_ENCODER_LORA_KEY`)."""
    return [key for key in keys if QWEN3_TEXT_ENCODER_LORA_KEY.search(key)]


def describe_lora_keys(keys: Iterable[str]) -> dict:
    """Header-only summary of a LoRA file for ``zimage info``: family, module count, kinds."""
    keys = list(keys)
    foreign = foreign_family(keys)
    modules = {}
    for key in keys:
        m = _SUFFIX.match(_strip(key))
        if m:
            modules.setdefault(m.group("module"), set()).add(_role(m.group("suffix")))
    kinds: dict[str, int] = {}
    for roles in modules.values():
        kind = ("lora" if "down" in roles else "lokr" if any(r.startswith("lokr_") for r in roles)
                else "loha" if any(r.startswith("hada_") for r in roles) else "full" if "diff" in roles else "other")
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"family": detect_family(keys), "modules": len(modules), "kinds": kinds,
            "foreign": foreign[0] if foreign else None, "text_encoder_keys": len(text_encoder_keys(keys))}


# =========================================================================== files and fusing


def lora_file(path: str | os.PathLike) -> Path:
    """The LoRA's safetensors file (a save folder's weights file), checked from its header alone:
    a pickle, a damaged file or a model checkpoint is refused before any tensor is read."""
    path = Path(path).expanduser()
    if path.is_dir():  # a diffusers / PEFT save folder: its weights file
        files = sorted(path.glob("*.safetensors"))
        named = path / "pytorch_lora_weights.safetensors"
        if not (named.is_file() or len(files) == 1):
            raise FileNotFoundError(f"{path} is a folder with {len(files)} .safetensors files and no "
                                    f"pytorch_lora_weights.safetensors; give the LoRA file itself")
        path = named if named.is_file() else files[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    from safetensors import safe_open

    from .formats import check_safetensors

    check_safetensors(path)
    with safe_open(str(path), "pt") as f:
        refuse_model_file(path, f.keys())
    return path


def read_lora(path_or_state: str | os.PathLike | Mapping[str, torch.Tensor], *, with_metadata: bool = False):
    """(name, state dict) of a LoRA safetensors file; a dict is passed through. Pickles are refused.

    ``with_metadata=True``: (name, state dict, the file's safetensors metadata or None).
    """
    if isinstance(path_or_state, Mapping):
        return ("<dict>", dict(path_or_state), None) if with_metadata else ("<dict>", dict(path_or_state))
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = lora_file(path_or_state)
    if not with_metadata:
        return str(path), load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return str(path), load_file(str(path)), metadata


class LoraFiles:
    """LoRA files read once and held in CPU memory, for the refits of named adapters (each adapter
    change fuses the active adapters again): re-reading a rank-32 LoRA on every block linear of the
    real DiT (159 MB of bf16) took 0.08-0.11 s from the page cache, 0.3-0.55 s after the cache lost
    it (on the 2-core CPU machine), per adapter and change, where diffusers holds its adapters'
    weights; a held file is found in about 0.1 ms. Each held file costs its tensors' bytes (about
    its file size) of CPU memory while an adapter names it; a file whose size, modification time
    or inode changed is read again (and checked again, as :func:`read_lora` checks it). ``reads``
    counts the files read."""

    def __init__(self):
        self.held: dict[str, tuple[tuple[int, int, int], tuple]] = {}  # source -> (file stat, read_lora's result)
        self.reads = 0

    def read(self, source) -> tuple:
        """``read_lora(source, with_metadata=True)``, from memory where the file is unchanged."""
        if isinstance(source, Mapping):
            return read_lora(source, with_metadata=True)
        path = Path(source).expanduser()
        if not path.is_file():
            path = lora_file(path)  # a save folder's weights file, or the error for a missing file
        stat = path.stat()
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        held = self.held.get(os.fspath(source))
        if held is None or held[0] != key:
            self.reads += 1
            held = self.held[os.fspath(source)] = (key, read_lora(path, with_metadata=True))
        return held[1]

    def keep(self, sources: Iterable) -> None:
        """Let go of the files that none of ``sources`` names."""
        names = {os.fspath(s) for s in sources if not isinstance(s, Mapping)}
        for name in [n for n in self.held if n not in names]:
            del self.held[name]

    def held_bytes(self) -> int:
        """CPU memory the held files' tensors take."""
        return sum(t.numel() * t.element_size() for _, (_, state, _) in self.held.values() for t in state.values())


def fuse_lora_(weights: Mapping[str, torch.Tensor], modules: Sequence[LoraModule], scale: float,
               originals: dict[str, torch.Tensor] | None = None, undo_device: torch.device | str = "cpu",
               spare: dict[str, torch.Tensor] | None = None) -> int:
    """W <- W + scale * dW in place for each module (fp32 maths, one rounding). Returns weights changed.

    ``weights`` maps canonical module names to their weight tensors. Before a weight first changes,
    a copy goes to ``originals`` (if given) on ``undo_device``; or, where ``spare`` holds a copy of
    it on that device (one the weight was just restored from, equal to it), that copy is taken.
    """
    changed = 0
    with torch.no_grad():
        for module in modules:
            first = weights[module.target.modules[0]]
            if first.dtype in FP8:
                raise ValueError(
                    f"weight {module.target.modules[0]} is fp8: fuse LoRAs before quantising (load the LoRA on the "
                    f"bf16/fp32 model, then apply fp8; or bake it in with `zimage convert --lora ... --dtype fp8`)")
            delta = module.delta(first.device)
            rows = [weights[m].shape[0] for m in module.target.modules]
            for name, part in zip(module.target.modules, delta.split(rows, dim=0)):
                w = weights[name]
                if originals is not None and name not in originals:
                    kept = (spare or {}).pop(name, None)
                    if kept is None or kept.device != torch.device(undo_device):
                        kept = w.detach().to(undo_device, copy=True)
                    originals[name] = kept
                w.copy_((w.float() + scale * part).to(w.dtype))
                changed += 1
    return changed


def add_lora_side_paths_(layers: Mapping[str, nn.Module], modules: Sequence[LoraModule], scale: float,
                         dtype: torch.dtype | None = None) -> int:
    """Apply LoRA modules unfused, as side paths of packed (GGUF, kept fp8) linears whose weights
    cannot be rewritten: ``y += scale * (x A^T) B^T`` with B carrying alpha/rank, from the module's
    low-rank :meth:`LoraModule.factors` (a LoRA, a LoKr with a low-rank second factor, a LoHa);
    ``y += scale * (W1 kron W2) x`` from the two factors of a LoKr with a whole second factor; or
    ``y += scale * x dW^T`` (a full delta: the full weight's size in ``dtype``, which is logged). A
    fused target (``attention.qkv``) shares A and splits B (or W1) by rows. The factors are computed
    in fp32 and kept in ``dtype`` (the model's compute dtype, which a forward would cast them to).
    Returns the layers changed."""
    changed, dense, dense_bytes = 0, 0, 0
    with torch.no_grad():
        for module in modules:
            targets = [layers[m] for m in module.target.modules]
            rows = [layer.out_features for layer in targets]
            factors, kron = module.factors(), module.kron_factors(rows)
            if factors is not None:
                down, up = factors
                parts = [(down, b, False) for b in up.split(rows, dim=0)]
            elif kron is not None:
                w1, w2 = kron
                parts = [(part, w2, True) for part in w1.split([n // w2.shape[0] for n in rows], dim=0)]
            else:
                parts = [(d, None, False) for d in module.delta().split(rows, dim=0)]
                dense += 1
                dense_bytes += sum(d.numel() for d, _, _ in parts) * torch.finfo(dtype or torch.float32).bits // 8
            for layer, (a, b, is_kron) in zip(targets, parts):
                layer.add_lora(a, b, scale, dtype, kron=is_kron)
                changed += 1
    if dense:
        logger.warning("%d LoRA modules (full deltas) have no smaller form: they are kept beside the quantised "
                       "weights as dense side paths, %.2f GB in all (a low-VRAM run may not fit)", dense,
                       dense_bytes / 1e9)
    return changed


def _split_by_storage(modules: Sequence[LoraModule], packed: Mapping[str, nn.Module]
                      ) -> tuple[list[LoraModule], list[LoraModule]]:
    """(modules to fuse into weights, modules to apply as side paths of packed linears)."""
    fused, side = [], []
    for module in modules:
        on_packed = [m in packed for m in module.target.modules]
        if all(on_packed):
            side.append(module)
        elif not any(on_packed):
            fused.append(module)
        else:
            raise ValueError(f"LoRA module {module.source} targets packed and unpacked weights at once")
    return fused, side


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'PATH[:SCALE]' -> (path, scale); a Windows drive colon or a non-number after ':' is part of the path."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


# =========================================================================== the pipeline mixin


def _packed_linears(model: nn.Module) -> dict[str, nn.Module]:
    from .quant_linear import PackedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _settle_streamed_blocks(transformer: nn.Module) -> None:
    """With ``offload="blocks"`` a block can still be on the device between runs of a DiT called
    outside the pipeline's sampling loop, which drops it itself (the streamer prefetches the next
    pass's first block after the last one): its weights point at a device copy, which the streamer
    drops for the CPU copy when it moves on. A LoRA fused (or unfused, or added as a side path)
    there would change the copy and be lost (or survive an unload), so every block is pointed back
    at its CPU copy first (:func:`offload.release_streamed`)."""
    release_streamed(transformer)


def _one_value(value):
    """A 0-d tensor or array (a scale given as ``torch.tensor(0.8)``) as its Python number; anything
    else as it is, for the scale check to refuse by name."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0 and getattr(value, "is_meta", False) is False:
        return value.item()
    return value


class LoraStack:
    """The LoRAs fused into one DiT (a pipeline's collaborator): ``load``, ``unload`` with exact undo,
    and the reports of what is loaded. The transformer is passed to each call."""

    def __init__(self):
        self.originals: dict[str, torch.Tensor] = {}
        self.spare: dict[str, torch.Tensor] = {}  # originals of an unload(keep=True), equal to the weights again
        self.loaded: list[LoraReport] = []
        self.no_undo = False
        self.files: LoraFiles | None = None  # where set (an adapter refit), LoRA files are read through it

    def load(self, transformer: nn.Module, path_or_list, scale: float | Sequence[float] = 1.0, *,
             strict: bool = False, undo: bool = True, undo_device: torch.device | str = "cpu"):
        """Fuse one LoRA (a path or a state dict) or several (a list) into the transformer's weights.
        Linears whose weights are packed (GGUF) get the LoRA as an unfused side path instead.

        ``scale`` is a float or one per LoRA. Every file is parsed and checked before any weight
        changes. ``strict=True`` raises if any key is left unmatched. Returns a :class:`LoraReport`
        (a list of them for a list) and logs each one.
        """
        single = isinstance(path_or_list, (str, os.PathLike, Mapping))
        items = [path_or_list] if single else list(path_or_list)
        if not items:
            raise ValueError("load_lora: no LoRA given")
        scale = _one_value(scale)
        scalar = isinstance(scale, (numbers.Number, str, bytes)) or not isinstance(scale, Iterable)
        scales = [scale] * len(items) if scalar else [_one_value(s) for s in scale]
        if len(scales) != len(items):
            raise ValueError(f"load_lora: {len(items)} LoRAs but {len(scales)} scales")
        for s in scales:  # before any weight changes: a NaN fused into the weights made every image NaN
            if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
                raise ValueError(f"load_lora: scale must be a finite number (or, for a list of LoRAs, one per LoRA), "
                                 f"got {s!r}")
        scales = [float(s) for s in scales]
        shapes = linear_shapes(transformer)
        planned = []
        for item, s in zip(items, scales):
            name, state_dict, metadata = (self.files.read(item) if self.files is not None
                                          else read_lora(item, with_metadata=True))
            modules, report = parse_lora(state_dict, shapes, name, metadata=metadata)
            report.scale = s
            if strict and report.unmatched:
                raise ValueError(f"{name}: {len(report.unmatched)} keys match no Z-Image module, e.g. "
                                 f"{report.unmatched[:5]}")
            planned.append((modules, report))
        _settle_streamed_blocks(transformer)
        weights = {n: m.weight for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
        packed = _packed_linears(transformer)
        compute = next((p.dtype for p in transformer.parameters() if p.is_floating_point()), None)
        for modules, report in planned:
            fused, side = _split_by_storage(modules, packed)
            fuse_lora_(weights, fused, report.scale, self.originals if undo else None, undo_device, self.spare)
            add_lora_side_paths_(packed, side, report.scale, compute)
            self.no_undo |= not undo
            self.loaded.append(report)
            logger.info("%s", report)
            text_encoder = set(text_encoder_keys(report.unmatched))
            unmatched = [k for k in report.unmatched if k not in text_encoder]
            if unmatched:  # (the text encoder's keys: said once, by parse_lora)
                logger.warning("%s: %d keys matched no module, e.g. %s", report.path, len(unmatched), unmatched[:5])
        reports = [r for _, r in planned]
        return reports[0] if single else reports

    def unload(self, transformer: nn.Module, keep: bool = False) -> int:
        """Restore the weights as they were before the first ``load``, bit for bit. Returns weights restored.
        ``keep``: for a refit (unload, then load again at other scales): the copies the weights were
        restored from stay in ``spare``, and the next ``load`` takes them instead of copying the
        weights again (a copy to ``undo_device`` per fused weight: the GPU to the CPU, by default),
        and packed linears keep their side paths' tensors for the next ``load`` to write into
        (``PackedLinear.clear_lora``); the caller ends the refit with :meth:`end_refit`."""
        if self.no_undo:
            raise RuntimeError("a LoRA was fused with undo=False: the original weights were not kept; reload the "
                               "pipeline to remove it")
        _settle_streamed_blocks(transformer)
        weights = {n: m.weight for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
        with torch.no_grad():
            for name, original in self.originals.items():
                weights[name].copy_(original)
        count = len(self.originals) + sum(m.clear_lora(keep) for m in _packed_linears(transformer).values())
        if keep:
            self.spare.update(self.originals)
        self.originals.clear()
        self.loaded.clear()
        return count

    def release_unwritten(self, transformer: nn.Module, sources: Sequence) -> None:
        """In a refit, after ``unload(keep=True)`` and before the loads of ``sources`` (the LoRAs it
        fuses): where a packed linear keeps a dense side path (a delta the size of its weight), the
        kept side paths of the packed linears that none of ``sources`` adds a side path to are let
        go now, before the new ones are made (``PackedLinear.end_refit``): switching between
        full-delta adapters on different layers held both sets of deltas at the end of the refit.
        It parses ``sources`` once more (6 ms of CPU time for a rank-32 LoRA on every block linear
        of the real DiT), so only where a dense side path is kept."""
        packed = _packed_linears(transformer)
        if not any(m.keeps_dense() for m in packed.values()):
            return
        shapes = linear_shapes(transformer)
        written = set()
        for source in sources:
            name, state_dict, metadata = (self.files.read(source) if self.files is not None
                                          else read_lora(source, with_metadata=True))
            modules, _ = parse_lora(state_dict, shapes, name, metadata=metadata)
            written.update(n for module in modules for n in module.target.modules)
        for name, m in packed.items():
            if name not in written:
                m.end_refit()

    def end_refit(self, transformer: nn.Module, silence: bool = False) -> None:
        """After ``unload(keep=True)`` and the loads of a refit: the spare copies are let go, and each
        packed linear's side paths are checked against those it kept (``PackedLinear.end_refit``:
        the LoRA generation moves on only where their structure changed). ``silence``: low-rank and
        Kronecker side paths that the refit did not add again stay, zeroed (``disable_lora``)."""
        self.spare.clear()
        for m in _packed_linears(transformer).values():
            m.end_refit(silence)


class LoraAdapters:
    """diffusers' named adapters (``load_lora_weights(..., adapter_name=)``, ``set_adapters``, ...) as
    bookkeeping over fused LoRAs: each adapter keeps its source (a path or a state dict) and the
    pipeline fuses the active ones at their weights again whenever the active set or a weight
    changes (unfuse exactly, then fuse). The rules are diffusers 0.42.1's: a newly loaded adapter is
    the only active one, at weight 1; ``set_adapters`` picks the active ones (an unset weight is 1);
    ``disable_lora`` / ``enable_lora`` turn them all off and on again; ``delete_adapters`` drops some.

    ``fuse_lora`` marks the active adapters (or the named ones) as merged, and ``unload_lora_weights``
    then keeps the merged ones as ``baked`` LoRAs: fused, in no adapter, under every later adapter
    (diffusers' recipe to bake a LoRA in); ``unfuse_lora`` takes the mark back."""

    def __init__(self):
        self.sources: dict[str, tuple[object, dict]] = {}  # name -> (path or state dict, load options)
        self.active: dict[str, float] = {}  # name -> weight, in set_adapters' order
        self.enabled = True
        self.merged: dict[str, float] | None = None  # what fuse_lora merged (name -> weight); None: not called
        self.baked: list[tuple[object, float, dict]] = []  # (source, weight, options) kept by unload_lora_weights
        self.fused = 0  # LoRAs the stack holds for these adapters and the baked ones (others came from load_lora)
        self.files = LoraFiles()  # the files of the adapters and the baked ones, held for the refits

    def clear(self) -> None:
        self.files.held.clear()
        self.sources.clear()
        self.active.clear()
        self.enabled = True
        self.merged = None
        self.baked = []
        self.fused = 0

    def state(self) -> tuple:
        """What :meth:`restore` puts back (the sources, the active adapters and weights, enabled, the
        merged and the baked ones)."""
        return dict(self.sources), dict(self.active), self.enabled, self.merged, list(self.baked)

    def restore(self, state: tuple) -> None:
        sources, active, self.enabled, self.merged, baked = state
        self.sources, self.active, self.baked = dict(sources), dict(active), list(baked)

    def merge(self, adapter_names=None) -> None:
        """diffusers' ``fuse_lora``: mark the active adapters (or the named ones, which must be active)
        as merged, at their weights, for :meth:`bake`. Without adapters there is nothing to mark."""
        if not self.sources:
            return
        applied = self.active if self.enabled else {}
        names = list(applied) if adapter_names is None else self.names(adapter_names, "fuse_lora()")
        inactive = [n for n in names if n not in applied]
        if inactive:
            raise ValueError(f"fuse_lora(): the adapters {inactive} do not apply now (active: {list(applied)}); "
                             f"set_adapters() them first")
        self.merged = {n: applied[n] for n in names}

    def bake(self) -> None:
        """diffusers' ``unload_lora_weights``: forget the adapters; the merged ones stay as baked LoRAs."""
        self.baked += [(self.sources[n][0], w, self.sources[n][1]) for n, w in (self.merged or {}).items()]
        self.sources.clear()
        self.active.clear()
        self.enabled = True
        self.merged = None

    def keep_fused(self) -> None:
        """After a fuse that stopped part-way: keep only the LoRAs it fused (the first ``fused`` of
        :meth:`to_fuse`: the baked ones, then the active adapters), so the active ones are those that apply."""
        self.baked = self.baked[:self.fused]
        if self.enabled:
            self.active = dict(list(self.active.items())[:self.fused - len(self.baked)])

    def add(self, source, name: str | None, options: dict) -> str:
        """Register an adapter and make it the only active one, at weight 1 (diffusers' rule)."""
        if name is None:
            name = f"default_{len(self.sources)}"  # diffusers' default names
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in self.sources:
            raise ValueError(f"adapter name {name!r} is already in use (loaded: {list(self.sources)}); give another "
                             f"adapter_name, or delete_adapters({name!r}) first")
        self.sources[name] = (source, dict(options))
        self.active = {name: 1.0}
        self.enabled = True
        return name

    def names(self, adapter_names, what: str) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.sources]
        if unknown:
            raise ValueError(f"{what}: no adapter named {unknown} (loaded: {list(self.sources) or 'none'}; name "
                             f"them with load_lora_weights(..., adapter_name=))")
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: an adapter is named twice in {names}")
        return names

    def set(self, adapter_names, adapter_weights=None) -> None:
        """The active adapters and their weights, as diffusers' ``set_adapters``."""
        names = self.names(adapter_names, "set_adapters")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapters but {len(weights)} adapter_weights")
        values = []
        for w in weights:
            if isinstance(w, Mapping):
                raise ValueError("set_adapters: per-block weights (a dict) are not supported here: the LoRA is fused "
                                 "into the weights at one scale per adapter; give one number per adapter")
            try:
                value = 1.0 if w is None else float(w)
            except (TypeError, ValueError):
                value = math.nan
            if isinstance(w, bool) or not math.isfinite(value):
                raise ValueError(f"set_adapters: adapter_weights must be finite numbers (or None: 1), got {w!r}")
            values.append(value)
        self.active = dict(zip(names, values))
        self.enabled = True

    def delete(self, adapter_names) -> None:
        for name in self.names(adapter_names, "delete_adapters"):
            del self.sources[name]
            self.active.pop(name, None)

    def keep_files(self) -> None:
        """Hold only the files of the adapters and the baked LoRAs (:class:`LoraFiles`)."""
        self.files.keep([source for source, _ in self.sources.values()] + [source for source, _, _ in self.baked])

    def to_fuse(self) -> list[tuple[object, float, dict]]:
        """(source, weight, options) of each LoRA to fuse now: the baked ones, then the active adapters."""
        active = [(self.sources[n][0], w, self.sources[n][1]) for n, w in self.active.items()] if self.enabled else []
        return self.baked + active


class LoraMixin:
    """``load_lora`` / ``unload_lora`` / ``loras`` on a class with a ``transformer``, through a
    :class:`LoraStack`. Kept for code that mixes it in; the pipeline holds a LoraStack instead."""

    @property
    def lora_stack(self) -> LoraStack:
        stack = self.__dict__.get("_lora_stack")
        if stack is None:
            stack = self.__dict__["_lora_stack"] = LoraStack()
        return stack

    @property
    def loras(self) -> list[LoraReport]:
        """Reports of the LoRAs fused so far (since the last ``unload_lora``)."""
        return list(self.lora_stack.loaded)

    def load_lora(self, path_or_list, scale: float | Sequence[float] = 1.0, **options):
        """As :meth:`LoraStack.load` on ``self.transformer``."""
        return self.lora_stack.load(self.transformer, path_or_list, scale, **options)

    def unload_lora(self) -> int:
        """As :meth:`LoraStack.unload` on ``self.transformer``."""
        return self.lora_stack.unload(self.transformer)
