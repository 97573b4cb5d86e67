"""Configs inferred from tensor shapes: a single file carries no config.

The released configs (Z-Image-Turbo DiT, FLUX VAE, Qwen3-4B) are the base, everything the tensor
shapes determine is inferred and checked, and what shapes cannot tell (RoPE axes, norm groups,
scaling factors, ...) can be overridden with a dict or a config.json; an override that
contradicts the shapes is an error that names both values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..config import TransformerConfig, VAEConfig, read_json
from .checkpoint import UnsupportedFormatError
from .detect import normalize_kind

#: The released Qwen3-4B text-encoder config (zimage-reference 2.5); shapes override what they determine.
RELEASED_QWEN3: dict[str, Any] = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2560, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=9728, hidden_act="silu",
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_scaling=None, max_position_embeddings=40960,
    vocab_size=151936, tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0,
    bos_token_id=151643, eos_token_id=151645, max_window_layers=36, use_sliding_window=False,
    sliding_window=None,
)


def read_overrides(overrides: dict | str | os.PathLike | None) -> dict[str, Any]:
    """A config override: None, a dict, or a path to a config.json (keys starting with '_' are dropped)."""
    if overrides is None:
        return {}
    if isinstance(overrides, (str, os.PathLike)):
        path = Path(overrides)
        if path.is_dir():
            path = path / "config.json"
        overrides = read_json(path)  # a cut file: named, not the parser's bare "Unterminated string"
    elif hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    if not isinstance(overrides, dict):
        raise TypeError(f"a config override must be a dict or a path to a config.json, got {type(overrides).__name__}")
    return {k: v for k, v in overrides.items() if not k.startswith("_")}


class ConfigMismatchError(ValueError):
    """A config value that contradicts what the checkpoint's tensor shapes give."""


class ConfigNeededError(ValueError):
    """A config value that shapes cannot tell and the default does not fit (a DiT's RoPE axes): the
    file loads with that value given (``config=``, or the config.json of a model folder).
    ``cli_message`` (where set): the message in the command line's words."""


#: How a command line gives a DiT's RoPE axes, which shapes cannot tell (``ConfigNeededError.cli_message``).
AXES_CLI = ("give them in a config.json ({\"axes_dims\": [...]}): zimage convert --config FILE, or zimage generate "
            "--model FOLDER (its transformer/config.json) with --transformer FILE, or a component folder holding "
            "the file and its config.json")


def _merge_checked(what: str, base: dict, inferred: dict, overrides: dict) -> dict:
    """base < inferred < overrides, where an override of an inferred value must agree with it."""
    for key, value in overrides.items():
        if key in inferred and _norm(value) != _norm(inferred[key]):
            raise ConfigMismatchError(
                f"{what}: config value {key}={value!r} does not match the checkpoint, whose tensor shapes give "
                f"{key}={inferred[key]!r}")
    return {**base, **inferred, **overrides}


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


def _need(shapes: dict[str, tuple], key: str, what: str) -> tuple:
    if key not in shapes:
        raise UnsupportedFormatError(f"{what}: the checkpoint has no {key}; cannot infer its config")
    return tuple(shapes[key])


def infer_transformer_config(shapes: dict[str, tuple], overrides: dict | str | os.PathLike | None = None,
                             base: dict | None = None) -> TransformerConfig:
    """The DiT config: released Turbo values, with what canonical tensor shapes determine inferred and checked."""
    what = "transformer"
    overrides = read_overrides(overrides)
    given_base = base or {}
    base = {**TransformerConfig().to_dict(), **given_base}
    embed = [k for k in shapes if re.fullmatch(r"all_x_embedder\.\d+-\d+\.weight", k)]
    if len(embed) != 1:
        raise UnsupportedFormatError(f"{what}: expected one patch embedder, found {embed or 'none'}")
    patch, f_patch = (int(v) for v in embed[0].split(".")[1].split("-"))
    dim, patch_dim = _need(shapes, embed[0], what)
    inferred: dict[str, Any] = {"dim": dim, "all_patch_size": [patch], "all_f_patch_size": [f_patch]}
    if patch_dim % (patch * patch * f_patch):
        raise ValueError(f"{what}: patch embedder input {patch_dim} is not a multiple of {patch}*{patch}*{f_patch}")
    inferred["in_channels"] = patch_dim // (patch * patch * f_patch)
    inferred["cap_feat_dim"] = _need(shapes, "cap_embedder.0.weight", what)[0]
    inferred["n_layers"] = _count(shapes, r"^layers\.(\d+)\.", what)
    refiners = _count(shapes, r"^noise_refiner\.(\d+)\.", what)
    context = _count(shapes, r"^context_refiner\.(\d+)\.", what)
    _check_depth(what, shapes, inferred, overrides, given_base)
    if refiners != context:
        raise ValueError(f"{what}: {refiners} noise-refiner blocks but {context} context-refiner blocks")
    inferred["n_refiner_layers"] = refiners
    head_dim = _need(shapes, "layers.0.attention.norm_q.weight", what)[0]
    if dim % head_dim:
        raise ValueError(f"{what}: dim {dim} is not a multiple of the q/k-norm size (head dim) {head_dim}")
    inferred["n_heads"] = dim // head_dim
    merged = _merge_checked(what, base, inferred, overrides)
    if "n_kv_heads" not in overrides:  # unused by the model; the released config sets it to n_heads
        merged["n_kv_heads"] = merged["n_heads"]
    try:
        config = TransformerConfig.from_dict(merged)
    except ValueError as e:
        if head_dim == sum(merged["axes_dims"]):
            raise ValueError(f"{what}: {e}.") from None
        # never the released DiTs (head dim 128 = 32 + 48 + 48): one of other widths, such as a tiny test model
        said = (f"{what}: {e}. The checkpoint's head dim is {head_dim} (the q/k-norm size) but axes_dims "
                f"{list(merged['axes_dims'])} sums to {sum(merged['axes_dims'])}: RoPE axes cannot be read from shapes")
        error = ConfigNeededError(f"{said}, pass transformer_config={{'axes_dims': [...]}}.")
        error.cli_message = f"{said}; {AXES_CLI}"
        raise error from None
    _check_shapes(what, shapes, {
        "layers.0.feed_forward.w1.weight": (config.ffn_dim, dim),
        "layers.0.adaLN_modulation.0.weight": (4 * dim, config.adaln_dim),
        "t_embedder.mlp.2.weight": (config.adaln_dim, 1024),
        f"all_final_layer.{embed[0].split('.')[1]}.linear.weight": (config.patch_dim, dim),
        "cap_embedder.1.weight": (dim, config.cap_feat_dim),
    })
    return config


def _count(shapes: dict[str, tuple], pattern: str, what: str) -> int:
    """How many blocks ``pattern`` (a regex whose group 1 is the block index) finds; indices with a gap
    are refused (:class:`IncompleteCheckpointError`, naming the missing blocks)."""
    idx = _indices(shapes, pattern)
    if idx and idx != list(range(idx[-1] + 1)):
        name = _block_name(pattern)
        missing = sorted(set(range(idx[-1] + 1)) - set(idx))
        raise IncompleteCheckpointError(f"{what}: {name} {_spans(missing)} missing: the checkpoint holds {name} "
                                        f"{_spans(idx)} ({_blocks(len(idx))}). {INCOMPLETE}")
    return len(idx)


def _indices(shapes: dict[str, tuple], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _block_name(pattern: str) -> str:
    """'layers', 'noise_refiner', ... from a block pattern such as ``^layers\\.(\\d+)\\.``."""
    return pattern.lstrip("^").split("\\.(")[0].replace("\\.", ".")


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0..2, 5, 7..8'."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in spans) or "none"


#: What to do about a checkpoint missing blocks, said once.
INCOMPLETE = "The file is incomplete (a partial conversion or download): download or convert it again"


class BlockCountError(ValueError):
    """A checkpoint whose number of blocks is not the one its config (or the released model of its
    widths) gives."""


class IncompleteCheckpointError(BlockCountError):
    """A checkpoint whose blocks have a gap, or fewer blocks than its config (or the released model
    of its widths) has: it would load as a shallower model and make wrong images."""


class DepthNeedsConfigError(BlockCountError, ConfigNeededError):
    """A checkpoint of the released widths with more blocks than the released model, and no config
    giving its depth: another model of these widths, which loads with its config (``zimage info``
    says so without calling it a file that cannot load, as for the RoPE axes)."""


def _check_block_count(what: str, shapes: dict[str, tuple], pattern: str, key: str, expected: int, source: str,
                       released: bool = False) -> None:
    """Refuse a checkpoint whose blocks ``pattern`` are not exactly 0..expected-1 (``key``, e.g.
    n_layers, as ``source`` gives it). ``released``: ``expected`` is the released model's count, no
    config's: a file with fewer blocks may also be another model of these widths (a pruned one),
    which loads with its config, and the message says so; one with more blocks is such a model
    (:class:`DepthNeedsConfigError`)."""
    idx = _indices(shapes, pattern)
    if idx == list(range(expected)):
        return
    name = _block_name(pattern)
    missing = sorted(set(range(expected)) - set(idx))
    holds = f"the checkpoint holds {name} {_spans(idx)} ({_blocks(len(idx))}), {source} {key}={expected}"
    if missing:
        other = (f"; if it is another model of these widths (fewer blocks: a pruned model), give its config "
                 f"({key}={len(idx)})" if released and idx else "")
        raise IncompleteCheckpointError(f"{what}: {name} {_spans(missing)} missing: {holds}. {INCOMPLETE}{other}")
    raise (DepthNeedsConfigError if released else BlockCountError)(
        f"{what}: {holds}: if the file is another model of these widths, give its config ({key}={len(idx)})")


#: The widths of the released DiTs (Z-Image-Turbo and Z-Image share them, zimage-reference 1.2),
#: whose depth a file of these widths must have unless a config says otherwise.
RELEASED_DIT = TransformerConfig()
_BLOCKS = (("n_layers", r"^layers\.(\d+)\."), ("n_refiner_layers", r"^noise_refiner\.(\d+)\."),
           ("n_refiner_layers", r"^context_refiner\.(\d+)\."))


def _check_depth(what: str, shapes: dict[str, tuple], inferred: dict, overrides: dict, base: dict) -> None:
    """A DiT missing blocks (a partial conversion, a cut file) loads as a shallower model and makes
    wrong images without a word: its blocks must be those its config gives (an override, else the
    component folder's config.json), else, at the released widths, the released depth (30 layers,
    2 refiner blocks of each kind). A config that gives the count the file has is taken at its word;
    one of other widths is another model's (refused by :func:`_merge_checked`, naming the widths).
    (Gaps in the indices are refused before, by :func:`_count`.)"""
    widths = ("dim", "cap_feat_dim", "in_channels")
    given = {**base, **overrides}
    if any(k in given and given[k] != inferred[k] for k in widths):
        return  # a config of another model: _merge_checked names the contradiction
    released = all(inferred[k] == getattr(RELEASED_DIT, k) for k in widths)
    for key, pattern in _BLOCKS:
        if key in overrides:
            expected, source = overrides[key], "the config gives"
            if len(_indices(shapes, pattern)) > expected:
                continue  # more blocks than the override: _merge_checked names both values
        elif key in base:
            expected, source = base[key], "its config.json gives"
        elif released:
            expected, source = getattr(RELEASED_DIT, key), (f"the released Z-Image DiTs of its widths (dim "
                                                           f"{RELEASED_DIT.dim}) have")
        else:
            continue
        _check_block_count(what, shapes, pattern, key, int(expected), source,
                           released=key not in overrides and key not in base)


def check_dit_blocks(keys, config: TransformerConfig, path) -> None:
    """Refuse, from a DiT folder's header keys, weights whose blocks are not those its
    config.json gives (:class:`BlockCountError`, naming ``path`` and the missing blocks): loaded
    against the config, they failed after every weight was read, naming a few missing keys."""
    shapes = dict.fromkeys(keys, ())
    try:
        for key, pattern in _BLOCKS:
            _count(shapes, pattern, "transformer")
            _check_block_count("transformer", shapes, pattern, key, getattr(config, key), "its config.json gives")
    except BlockCountError as e:
        raise type(e)(f"{path}: {e}") from None


def _check_shapes(what: str, shapes: dict[str, tuple], expected: dict[str, tuple]) -> None:
    for key, shape in expected.items():
        if key in shapes and tuple(shapes[key]) != tuple(shape):
            raise ValueError(f"{what}: {key} has shape {tuple(shapes[key])}, the config implies {tuple(shape)}")


def infer_vae_config(shapes: dict[str, tuple], overrides: dict | str | os.PathLike | None = None,
                     base: dict | None = None) -> VAEConfig:
    """The VAE config: released FLUX-VAE values, with widths, depth and channels read from the shapes."""
    what = "vae"
    overrides = read_overrides(overrides)
    base = {**VAEConfig().to_dict(), **(base or {})}
    n = _count(shapes, r"^encoder\.down_blocks\.(\d+)\.", what)
    if not n:
        raise UnsupportedFormatError(f"{what}: no encoder down blocks found")
    widths = [_need(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", what)[0] for i in range(n)]
    layers = _count(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", what)
    up_layers = _count(shapes, r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.", what)
    if up_layers != layers + 1:
        raise ValueError(f"{what}: decoder blocks have {up_layers} resnets, expected layers_per_block + 1 = "
                         f"{layers + 1}")
    inferred = {
        "block_out_channels": widths,
        "layers_per_block": layers,
        "in_channels": _need(shapes, "encoder.conv_in.weight", what)[1],
        "out_channels": _need(shapes, "decoder.conv_out.weight", what)[0],
        "latent_channels": _need(shapes, "decoder.conv_in.weight", what)[1],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "mid_block_add_attention": "decoder.mid_block.attentions.0.to_q.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }
    merged = _merge_checked(what, base, inferred, overrides)
    try:
        config = VAEConfig.from_dict(merged)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    _check_shapes(what, shapes, {"encoder.conv_out.weight": (2 * config.latent_channels, widths[-1], 3, 3)})
    return config


def infer_text_encoder_config(shapes: dict[str, tuple], overrides: dict | str | os.PathLike | None = None,
                              base: dict | None = None) -> dict[str, Any]:
    """Qwen3Config keyword arguments: released Qwen3-4B values, with sizes read from the shapes."""
    what = "text_encoder"
    overrides = read_overrides(overrides)
    base = {**RELEASED_QWEN3, **(base or {})}
    vocab, hidden = _need(shapes, "embed_tokens.weight", what)
    head_dim = _need(shapes, "layers.0.self_attn.q_norm.weight", what)[0]
    q_rows = _need(shapes, "layers.0.self_attn.q_proj.weight", what)[0]
    kv_rows = _need(shapes, "layers.0.self_attn.k_proj.weight", what)[0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise ValueError(f"{what}: q/k projections ({q_rows}, {kv_rows} rows) are not multiples of head_dim {head_dim}")
    n_layers = _count(shapes, r"^layers\.(\d+)\.", what)
    if "norm.weight" not in shapes:
        raise ValueError(f"{what}: the checkpoint has no final norm.weight: it looks truncated; Z-Image needs the "
                         f"full Qwen3 (it reads hidden_states[-2])")
    inferred = {
        "vocab_size": vocab, "hidden_size": hidden, "head_dim": head_dim, "num_hidden_layers": n_layers,
        "num_attention_heads": q_rows // head_dim, "num_key_value_heads": kv_rows // head_dim,
        "intermediate_size": _need(shapes, "layers.0.mlp.gate_proj.weight", what)[0],
        "attention_bias": "layers.0.self_attn.q_proj.bias" in shapes,
    }
    merged = _merge_checked(what, base, inferred, overrides)
    if merged.get("max_window_layers", 0) > n_layers and "max_window_layers" not in overrides:
        merged["max_window_layers"] = n_layers
    if merged.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"{what}: expected model_type 'qwen3', got {merged['model_type']!r}")
    return merged


def folder_config(path: Path) -> dict | None:
    """A component folder's own config.json (the base of inference), or None for a file."""
    if path.is_dir() and (path / "config.json").is_file():
        return read_overrides(path / "config.json")
    return None


def infer_config(kind: str, shapes: dict[str, tuple], overrides=None, base: dict | None = None):
    """The config of component ``kind`` from canonical shapes (a config object, or Qwen3Config kwargs)."""
    kind = normalize_kind(kind)
    fn = {"transformer": infer_transformer_config, "vae": infer_vae_config,
          "text_encoder": infer_text_encoder_config}[kind]
    return fn(shapes, overrides, base)
