"""Weight loading: components from a diffusers folder or a single file, into modules built on meta.

- :func:`load_module`: a diffusers component folder (safetensors, sharded or not) into a module;
- :func:`load_component`: one component from any supported file (ComfyUI / all-in-one / fp8 single
  files, component folders; what a file is comes from :mod:`zimage_native.formats`);
- :func:`load_single_files`: a whole pipeline from single files (``ZImagePipeline.from_single_files``).

The policy, stated once:
- a file cut short or not a safetensors file fails in one line naming it (``CorruptCheckpointError``),
  before safetensors reads it; a pipeline's loads check every weight file's header before reading
  any weight (:func:`check_weight_files`);
- modules are built on the ``meta`` device (no memory, no init cost) and weights are assigned;
- every tensor is cast to the requested dtype as it is read, one tensor at a time, so a 24.6 GB
  fp32 checkpoint loads into 12.3 GB of bf16 without ever holding two full copies;
- loading is strict: missing or unexpected keys raise :class:`StateDictMismatchError`, which
  names the first few of each and the counts.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from .config import SchedulerConfig, read_json
from .devices import bytes_in, check_component_fits, format_bytes, keeps_fp8_here, weight_peak
from .formats.checkpoint import (WEIGHT_FILE_NAMES, WEIGHT_INDEX_NAMES, Checkpoint, check_safetensors, read_header,
                                 safetensors_files, sniff)
from .formats.detect import inspect_checkpoint, normalize_kind
from .formats.fp8 import read_scales
from .formats.infer import folder_config, infer_text_encoder_config, infer_transformer_config, infer_vae_config
from .formats.infer import BlockCountError, ConfigMismatchError, check_dit_blocks, read_overrides
from .formats.tensors import canonical_items, canonical_shapes, cast

logger = logging.getLogger(__name__)

__all__ = ["WEIGHT_FILE_NAMES", "WEIGHT_INDEX_NAMES", "safetensors_files"]  # re-exported from formats.checkpoint


class StateDictMismatchError(KeyError):
    """Raised when a checkpoint's keys do not match the module's parameters."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], shape_errors: list[str] = ()):
        self.missing, self.unexpected, self.shape_errors = missing, unexpected, list(shape_errors)
        parts = [f"{what}: the checkpoint does not match the model."]
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        if self.shape_errors:
            parts.append(f"{len(self.shape_errors)} shape mismatches, e.g. {self.shape_errors[:3]}")
        self.message = " ".join(parts)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message

    def in_file(self, path: str | os.PathLike) -> "StateDictMismatchError":
        """The same mismatch, said of the file ``path`` and with what to do about it."""
        e = StateDictMismatchError("", self.missing, self.unexpected, self.shape_errors)
        e.message = (f"{path}: {self.message.rstrip('.')}. The file is incomplete (a partial conversion or download) or holds "
                     f"another model: download it again or use another file")
        return e


def check_keys(module: nn.Module, keys: Iterable[str], what: str) -> None:
    """Refuse, from a header's canonical keys alone (before any weight is read), a checkpoint that
    lacks tensors of ``module`` or has others (:func:`assign_state_dict` checks again, with shapes)."""
    expected, keys = set(module.state_dict(keep_vars=True)), set(keys)
    if expected != keys:
        raise StateDictMismatchError(what, sorted(expected - keys), sorted(keys - expected))


def check_header_keys(kind: str, config, keys: Iterable[str]) -> None:
    """What :func:`load_component` refuses before reading a weight, for ``zimage info``: a DiT
    (``config`` a TransformerConfig) or text encoder (Qwen3Config kwargs) whose header's canonical
    keys lack tensors of the model or hold others. Other kinds are not checked here."""
    if kind == "transformer":
        from .model.transformer import ZImageTransformer

        check_keys(build_on_meta(lambda: ZImageTransformer(config)), keys, kind)
    elif kind == "text_encoder":
        from transformers import Qwen3Config

        from .text_encoder import build_truncated_qwen3, unused_key

        model, _, n = build_truncated_qwen3(Qwen3Config(**{k: v for k, v in config.items()
                                                           if k not in ("model_type", "transformers_version")}))
        check_keys(model, (k for k in keys if not unused_key(k, n)), kind)


def read_header_keys(files: Iterable[Path]) -> list[str]:
    keys: list[str] = []
    for file in files:
        with safe_open(str(check_safetensors(file)), framework="pt") as f:
            keys.extend(f.keys())
    return keys


def iter_tensors(
    files: Iterable[Path],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    keep: Callable[[str], bool] | None = None,
    rows: bool = False,
    copies: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one tensor at a time, cast to ``dtype`` (floating tensors only) on ``device``.

    A tensor that is cast is read from the file by blocks of rows into its result
    (:func:`~zimage_native.formats.tensors.cast_rows`); one kept as stored is a view of the file's
    memory map. Cast through the map, every page read stayed resident until the file was done (a
    bf16 DiT shard of 1.4 GB loaded in fp32: 4190 MiB at the peak for 2790 MiB of weights).
    ``rows``: a tensor of two or more dimensions kept as stored comes as a
    :class:`~zimage_native.formats.tensors.StoredRows`, read by rows where it is used (quantised),
    valid until the next one is taken (``device`` does not apply to it). ``copies``: tensors kept as
    stored are read into memory of their own, not views of the map (``Checkpoint``'s ``copies``)."""
    from .formats.tensors import StoredRows, cast_rows, converted

    for file in files:
        with Checkpoint(check_safetensors(file), copies=copies) as ckpt:
            for key in sorted(ckpt.keys()):
                if keep is not None and not keep(key):
                    continue
                info = ckpt.tensors[key]
                if converted(info, dtype):
                    t = cast_rows(ckpt, key, dtype)
                elif rows and len(info.shape) >= 2 and info.torch_dtype is not None:
                    yield key, StoredRows(ckpt, key)
                    continue
                else:
                    t = ckpt.get(key)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                yield key, t.to(device)


def load_state_dict(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a whole component (file or folder, sharded or not) into a dict, casting as it goes."""
    return dict(iter_tensors(safetensors_files(path), dtype, device, keep))


def unviewed(t: torch.Tensor) -> torch.Tensor:
    """``t``, or where it is a view of another tensor, the same memory as a tensor of its own.

    A GGUF weight kept packed, and a float8 / int8 weight a DiT keeps, are views of the tensor read
    from the file's memory map, and a view holds that base to its end: ``t.data = ...`` (how
    offload="blocks" packs the blocks into pinned slabs, and ``offload.move_`` moves a model)
    replaces what it shows, not its base, so the map and every page read from it stayed resident
    beside the copies (a Q4_K DiT of 296 MiB: 287 MiB of the file after the pack, besides the slabs)."""
    if t._base is None:
        return t
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                               t.stride())


def assign_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "model") -> nn.Module:
    """Strictly assign ``state_dict`` to a module built on meta (or anywhere). Returns the module."""
    expected = dict(module.state_dict(keep_vars=True))
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    shape_errors = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shape_errors:
        raise StateDictMismatchError(what, missing, unexpected, shape_errors)
    module.load_state_dict({k: unviewed(t) for k, t in state_dict.items()}, strict=True, assign=True)
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"{what}: tensors left on the meta device after loading: {still_meta[:5]}")
    return module


#: Components with fewer bytes than this load without a progress bar (the VAE, the tiny test models).
PROGRESS_MIN_BYTES = 256 * 2**20


def read_weights(items: Iterable[tuple[str, torch.Tensor]], what: str, module: nn.Module,
                 dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Take (key, tensor) pairs, already cast and placed, into a state dict for ``module`` (built on
    meta), with a progress bar in bytes against what it holds in ``dtype``: on a terminal only, and
    for components of :data:`PROGRESS_MIN_BYTES` or more."""
    from tqdm.auto import tqdm

    total = bytes_in(module.state_dict().values(), dtype)
    state = {}
    with tqdm(total=total, desc=f"loading {what}", unit="B", unit_scale=True, leave=False,
              disable=True if total < PROGRESS_MIN_BYTES else None) as bar:
        for key, t in items:
            state[key] = t
            bar.update(t.numel() * t.element_size())
    return state


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def take_dtypes(module: nn.Module, dtypes: dict[str, torch.dtype | None]) -> nn.Module:
    """Give the tensors of ``module`` (built on meta, in the fp32 of its constructor) named in
    ``dtypes`` those dtypes, for a load that keeps them as stored (``dtype=None``): it is then weighed
    (``devices.check_component_fits``) in the bytes it will hold, not fp32's, which refused a bf16
    component that fits at twice its bytes. The tensors read are assigned over them."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if name in dtypes:
            t.data = t.data.to(dtypes[name])
    return module


def take_stored_dtypes(module: nn.Module, files: Iterable[Path]) -> nn.Module:
    """:func:`take_dtypes` with the dtypes that ``files`` store the tensors in (their headers), for a
    module whose names are the file's."""
    return take_dtypes(module, {k: info.torch_dtype for file in files for k, info in read_header(file)[0].items()})


def load_module(
    factory: Callable[[], nn.Module],
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    device: torch.device | str,
    what: str,
    pinned: bool = False,
) -> nn.Module:
    """Build ``factory()`` on meta and strictly load the weights at ``path`` into it; ``pinned`` as in
    :func:`load_component`."""
    files = safetensors_files(path)
    module = build_on_meta(factory)
    if dtype is None:  # kept as stored
        take_stored_dtypes(module, files)
    check_component_fits(what, module, dtype, torch.device(device), pinned)
    state_dict = read_weights(iter_tensors(files, dtype, device, copies=pinned), what, module, dtype)
    return assign_state_dict(module, state_dict, what).eval().requires_grad_(False)


def inspect_weights(path: str | os.PathLike) -> dict:
    """Tensor count, parameter count and dtypes of a component, read from the safetensors headers only."""
    files = safetensors_files(path)
    tensors, params, dtypes = 0, 0, {}
    for file in files:
        with safe_open(str(check_safetensors(file)), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                n = 1
                for d in s.get_shape():
                    n *= d
                tensors += 1
                params += n
                dt = s.get_dtype()
                dtypes[dt] = dtypes.get(dt, 0) + n
    return {"files": len(files), "tensors": tensors, "parameters": params, "dtypes": dtypes}


# =========================================================================== single files and component folders


def read_component_state_dict(path: str | os.PathLike, kind: str, *, dequantize_fp8: bool = True,
                              dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical state dict, fp8 scales by canonical weight key) of one component of a checkpoint.

    With ``dequantize_fp8=False`` fp8 weights stay fp8 (for an fp8 compute path) and their scales are
    returned separately (a fused weight's per-tensor scale is given to each part). ``dtype`` casts
    the floating, non-fp8 tensors.
    """
    with Checkpoint(path) as ckpt:
        info = inspect_checkpoint(ckpt).component(kind)
        state = {key: cast(t, dtype).to(device)
                 for key, t in canonical_items(ckpt, info, dequant=dequantize_fp8, dtype=dtype)}
        scales = {}
        if not dequantize_fp8 and info.quantization in ("scaled-fp8", "comfy-quant"):
            scales = read_scales(ckpt, info.keys, info.keymap(), device)
        return state, scales


def load_component(kind: str, path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", config: dict | str | os.PathLike | None = None,
                   quant: str = "none", keep_fp8: bool | None = None, pinned: bool = False) -> nn.Module:
    """Load one component from a single file (any supported layout / fp8 form) or a component folder.

    ``kind``: 'transformer' | 'vae' | 'text_encoder'. Returns a ``ZImageTransformer``, an
    ``AutoencoderKL`` (its ``.config`` is the VAEConfig) or the truncated Qwen3 ``nn.Module`` (wrap it
    with ``TextEncoder(module, tokenizer)``). ``config`` overrides what shapes cannot tell (a dict or
    a config.json path); a component folder's own config.json is the base. Weights are dequantised
    (fp8), renamed, cast to ``dtype`` and moved to ``device`` one tensor at a time; loading is strict.
    ``quant`` ("none" | "int8" | "int4", text encoder only) quantises the text encoder's weights
    while loading (:mod:`zimage_native.quantize`).

    An fp8 DiT file's linears can keep their float8 weights (``keep_fp8=True``): each becomes a
    :class:`~zimage_native.quant_linear.FP8StoredLinear` that dequantises them per forward exactly
    as loading would (the same results) at half of the bf16 bytes; with them, the ``int8_tensorwise``
    layers of a ComfyUI mixed-precision file stay int8 (``Int8StoredLinear``), its ``nvfp4`` / ``mxfp8``
    layers their codes (``BlockScaledLinear``, bit for bit the same results too). ``keep_fp8=False`` dequantises
    them while loading, as for the other components; None (the default) keeps them in CPU memory,
    and on a GPU only where the upcast weights would not fit (``devices.keeps_fp8_here``).
    ``pinned``: the component is read into CPU memory to be page-locked there (the DiT of
    ``offload="blocks"`` on a GPU): the RAM alone must hold it, swap cannot
    (``devices.check_component_fits``), and its tensors are read into memory of their own, not
    views of the file's map, each freed as its pinned copy is made (through the map, the pages the
    copies read stayed resident to the end: the file and the slabs at once).
    """
    kind = normalize_kind(kind)
    try:
        return _load_component(kind, path, dtype, device, config, quant, keep_fp8, pinned)
    except StateDictMismatchError as e:
        raise e.in_file(Path(path).expanduser()) from None
    except BlockCountError as e:
        raise type(e)(f"{Path(path).expanduser()}: {e}") from None
    except ConfigMismatchError as e:
        given = f" (the config: {config})" if isinstance(config, (str, os.PathLike)) else ""
        raise ConfigMismatchError(f"{Path(path).expanduser()}: {e}{given}: the file holds another model than the "
                                  f"config describes; give a file of that model, or a model folder (--model) of the "
                                  f"file's model") from None


def _load_component(kind: str, path: str | os.PathLike, dtype: torch.dtype | None, device: torch.device | str,
                    config: dict | str | os.PathLike | None, quant: str, keep_fp8: bool | None,
                    pinned: bool) -> nn.Module:
    if quant != "none" and kind != "text_encoder":
        raise ValueError(f"quant={quant!r} applies to the text encoder only, not to the {kind}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{kind}: no such file or folder: {path}")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if path.is_file() and sniff(path) == "gguf":
        from .gguf_loading import load_gguf_component

        return load_gguf_component(kind, path, dtype, device, config, quant, pinned)
    with Checkpoint(path, copies=pinned) as ckpt:
        info = inspect_checkpoint(ckpt).component(kind)
        kept_fp8 = kind == "transformer" and info.has_fp8_weights and keep_fp8 is not False
        if kept_fp8 and keep_fp8 is None:  # auto: see devices.keeps_fp8_here
            upcast = bytes_in((t for _, t in canonical_items(ckpt, info, meta=True)), dtype)
            kept_fp8 = keeps_fp8_here(upcast, device)
        if info.quantization and not kept_fp8:
            logger.info("%s: %s weights in %s, dequantised to %s while loading", kind, info.quantization, path,
                        dtype or "float32")
        shapes = canonical_shapes(ckpt, info)
        base = folder_config(path)
        # Kept as stored (dtype=None): the dtypes the canonical tensors are read in (the file's;
        # fp32 where dequantised), in which the module is weighed (take_dtypes).
        read_dtypes = {k: t.dtype for k, t in canonical_items(ckpt, info, meta=True)} if dtype is None else {}
        if kind == "text_encoder":
            from transformers import Qwen3Config

            from .text_encoder import load_truncated_qwen3, unused_key

            kwargs = infer_text_encoder_config(shapes, config, base)
            full = Qwen3Config(**{k: v for k, v in kwargs.items() if k not in ("model_type", "transformers_version")})
            n = full.num_hidden_layers  # the last layer, the final norm and lm_head are neither read nor dequantised
            keep = lambda k: not unused_key(k, n)  # noqa: E731
            prepare = lambda model: take_dtypes(model, read_dtypes)  # noqa: E731
            if quant == "none":
                items = canonical_items(ckpt, info, dtype=dtype, keep=keep)
                return load_truncated_qwen3(full, items, dtype, device, quant, prepare=prepare, keys=shapes)
            # Quantised: fp8 weights come as stored, and are dequantised by the chunks of rows that are
            # quantised (quantize.quantize_items), never whole in dtype (fp32: 1.56 GB for the embedding).
            kept = [k for k in info.keys if any(keep(c) for c in info.keymap().canonical_keys(k))]
            items = canonical_items(ckpt, info, dequant=False, keep=keep, rows=True)
            return load_truncated_qwen3(full, items, dtype, device, quant, prepare=prepare,
                                        fp8_scales=read_scales(ckpt, kept, info.keymap()), keys=shapes)
        if kind == "transformer":
            from .model.transformer import ZImageTransformer

            cfg = infer_transformer_config(shapes, config, base)
            module = build_on_meta(lambda: ZImageTransformer(cfg))
            check_keys(module, shapes, kind)
            if kept_fp8:
                return load_kept_fp8(ckpt, info, module, dtype, device, path, pinned, read_dtypes)
        else:
            from .model.vae import AutoencoderKL

            cfg = infer_vae_config(shapes, config, base)
            module = build_on_meta(lambda: AutoencoderKL(cfg))
        take_dtypes(module, read_dtypes)
        check_component_fits(kind, module, dtype, device, pinned)
        items = ((k, cast(t, dtype).to(device)) for k, t in canonical_items(ckpt, info, dtype=dtype))
        assign_state_dict(module, read_weights(items, kind, module, dtype), kind)
        logger.info("%s: loaded %s (%s layout%s)", kind, path, info.layout,
                    f", {info.quantization}" if info.quantization else "")
        return module.eval().requires_grad_(False)


def kept_formats(ckpt, info) -> dict[str, torch.dtype | str]:
    """Canonical weight key -> how a DiT that keeps its fp8 weights (``keep_fp8``) stores it, from the
    header alone: "nvfp4" / "mxfp8" for a comfy_quant block-scaled layer, its float8 dtype or
    ``torch.int8`` for a stored float8 / int8 weight. Of these, the weights of ``nn.Linear`` modules
    stay so (``swap_fp8_linears_``); the others are dequantised while loading."""
    from .formats.fp8 import TORCH_FP8
    from .formats.microscale import BLOCK_FORMATS

    keymap = info.keymap()
    blocks = {canon: fmt for key, fmt in info.comfy_quant.items() if fmt in BLOCK_FORMATS
              for canon in keymap.canonical_keys(key)}
    stored = TORCH_FP8 + (torch.int8,)
    items = canonical_items(ckpt, info, meta=True, dequant=False, keep_stored=True)
    return {k: blocks.get(k, t.dtype) for k, t in items if k in blocks or t.dtype in stored}


def load_kept_fp8(ckpt, info, module: nn.Module, dtype: torch.dtype | None, device: torch.device,
                  path: Path, pinned: bool = False, read_dtypes: dict[str, torch.dtype] | None = None) -> nn.Module:
    """An fp8 DiT file into ``module`` (built on meta): linears with float8 weights become
    FP8StoredLinear, those of a comfy_quant file's int8_tensorwise layers Int8StoredLinear, its nvfp4
    and mxfp8 layers BlockScaledLinear (the file's values and scales; a fused qkv's per-row scales
    and block scales split with its rows); the other tensors are dequantised and cast.
    ``read_dtypes``: with ``dtype`` None, the dtypes the other tensors are read in (:func:`take_dtypes`)."""
    from .formats.fp8 import TORCH_FP8, dequantize
    from .formats.microscale import code_scales, read_block_codes, scaled_values
    from .quant_linear import quantized_bytes, swap_fp8_linears_

    stored = TORCH_FP8 + (torch.int8,)
    blocks = read_block_codes(ckpt, info.comfy_quant, info.keymap(), device)  # canonical key -> (fmt, codes, scale)
    fp8 = kept_formats(ckpt, info)
    swapped = swap_fp8_linears_(module, fp8)
    take_dtypes(module, {k: v for k, v in (read_dtypes or {}).items() if k not in swapped})
    check_component_fits("transformer", module, dtype, device, pinned)
    scales = (read_scales(ckpt, info.keys, info.keymap(), device, int8=True)
              if info.quantization in ("scaled-fp8", "comfy-quant") else {})

    def items():
        for key, t in canonical_items(ckpt, info, dequant=False, dtype=dtype, keep_stored=True):
            t = t.to(device)
            stem = key[: -len("weight")]
            if key in blocks:  # the codes as bytes, their block-scale codes and per-tensor scale
                fmt, codes, second = blocks[key]
                if key in swapped:
                    yield key, t.contiguous().view(torch.uint8)
                    yield stem + "block_scale", codes
                    yield stem + "scale_2", second
                else:  # (not a linear's weight: dequantised as the loader does)
                    yield key, scaled_values(t, code_scales(codes, fmt, second), fmt).to(dtype or torch.float32)
            elif key in swapped:  # the values (float8 as bytes, int8 as they are), and their scale as one value per row
                scale = scales.get(key, torch.ones((), device=device)).float()
                yield key, t.contiguous() if t.dtype == torch.int8 else t.contiguous().view(torch.uint8)
                yield stem + "scale", scale.reshape(-1, 1).expand(t.shape[0], 1).contiguous()
            else:
                yield key, (dequantize(t, scales.get(key), dtype or torch.float32) if t.dtype in stored else
                            cast(t, dtype))

    assign_state_dict(module, read_weights(items(), "transformer", module, dtype), "transformer")
    kept = ", ".join(f"{kind} {n / 2**20:.1f} MiB" for kind, n in sorted(quantized_bytes(module).items()))
    logger.info("transformer: loaded %s (%s layout, %s): %d linears keep their float8, int8, nvfp4 or mxfp8 weights "
                "(%s), dequantised per forward; %d other tensors dequantised or cast to %s", path, info.layout,
                info.quantization, len(swapped), kept, len(fp8) - len(swapped), dtype or "float32")
    return module.eval().requires_grad_(False)


def check_weight_files(paths: Iterable[str | os.PathLike]) -> None:
    """Before any weight is read: raise :class:`CorruptCheckpointError` if a weight file of ``paths``
    (component files or folders) is cut short or damaged, so that an interrupted download fails at
    once rather than after the components loaded before it (the whole DiT, before a cut text
    encoder shard). Reads headers only; any other problem is left to the load, which names it."""
    from .formats.checkpoint import CorruptCheckpointError

    for path in paths:
        try:
            path = Path(path).expanduser()
            if path.is_file() and sniff(path) == "gguf":
                from .formats.gguf import check_gguf

                check_gguf(path)
            elif path.exists():
                for file in safetensors_files(path):
                    check_safetensors(file)
        except CorruptCheckpointError:
            raise
        except Exception:  # noqa: BLE001 - reported by the load, in its words
            continue


def check_component_paths(call: str, given: dict[str, Any]) -> None:
    """The component options (``transformer=``, ``vae=``, ``text_encoder=``, ``tokenizer=``) are paths
    here. diffusers' ``from_pretrained(..., vae=vae)`` passes a built module: refused saying so (it
    failed inside pathlib), and for a VAE of this engine, that assigning it after loading works."""
    from .model.vae import AutoencoderKL

    for name, value in given.items():
        if value is None or isinstance(value, (str, os.PathLike)):
            continue
        instead = ("load without it and assign it, pipe.vae = vae (prepared as a loaded VAE)"
                   if isinstance(value, AutoencoderKL) else
                   "give the path of its files (a weights file, or the folder its save_pretrained wrote)")
        raise TypeError(f"{call}({name}={type(value).__name__}(...)): {name}= takes the path of a file or folder "
                        f"here, not a loaded object; {instead}")


def check_components(files: dict[str, str | os.PathLike | None]) -> None:
    """Before any weight is read: each single file of ``files`` (component -> path) must hold that
    component in a form the engine loads, so that a wrong file (a text encoder given as the DiT, an
    TQ1_0 GGUF, another model) is refused from its header at once, not after the components loaded
    before it. Folders, and headers that cannot be read, are left to the load."""
    for kind, path in files.items():
        if path is None or not Path(path).expanduser().is_file():
            continue
        try:
            fmt, _ = header_facts(path)
        except Exception:  # noqa: BLE001 - reported by the load, in its words
            continue
        fmt.component(kind)


def header_facts(path: str | os.PathLike) -> tuple[Any, dict[str, dict[str, tuple]]]:
    """What a weight file's header (or a component folder's) tells the checks before a load: its
    :class:`~zimage_native.formats.detect.FileFormat` and each component's canonical shapes. A file's
    are read once (until it changes: its inode, size or time): the checks ask several times, and a GGUF header takes seconds
    to parse (a Qwen3 GGUF holds its tokenizer)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return _read_facts(path)
    stat = path.stat()
    return _file_facts(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_facts(path: str, inode: int, size: int, mtime_ns: int) -> tuple[Any, dict[str, dict[str, tuple]]]:
    return _read_facts(Path(path))


def _read_facts(path: Path) -> tuple[Any, dict[str, dict[str, tuple]]]:
    from .formats.detect import detect_format

    def shapes(read, ckpt, fmt) -> dict[str, dict[str, tuple]]:
        out = {}
        for info in fmt.components:
            try:
                out[info.component] = read(ckpt, info)
            except Exception:  # noqa: BLE001 - that component's load says why
                pass
        return out

    container = sniff(path) if path.is_file() else "folder"
    if container == "gguf":
        from .formats.gguf import GGUFCheckpoint, inspect_gguf
        from .formats.gguf import canonical_shapes as gguf_shapes

        with GGUFCheckpoint(path) as ckpt:
            fmt = inspect_gguf(ckpt)
            return fmt, shapes(gguf_shapes, ckpt, fmt)
    if container not in ("safetensors", "folder"):
        return detect_format(path), {}
    with Checkpoint(path) as ckpt:
        fmt = inspect_checkpoint(ckpt)
        return fmt, shapes(canonical_shapes, ckpt, fmt)


def header_width(kind: str, path: str | os.PathLike, axis: int | None = None) -> int | None:
    """From the headers alone: the caption width a DiT at ``path`` takes (``cap_feat_dim``), or the
    hidden size of a text encoder there (a file in any supported format, or a component folder);
    ``axis=0`` with a text encoder: its vocabulary (embedding rows). None when the headers cannot
    tell (the load then says why)."""
    key = {"transformer": ("cap_embedder.0.weight", 0), "text_encoder": ("embed_tokens.weight", 1)}[kind]
    if axis is not None:
        key = (key[0], axis)
    try:
        fmt, shapes = header_facts(path)
        fmt.component(kind)
        return int(shapes[kind][key[0]][key[1]])
    except Exception:  # noqa: BLE001 - a file that cannot be read is reported by its load, in its words
        return None


def qwen3_hidden_size(config_json: Path) -> int | None:
    """The hidden size in a Qwen3 config.json; None for another model (refused, with its reason, when it loads)."""
    config = read_json(config_json)
    return config.get("hidden_size") if config.get("model_type") == "qwen3" else None


def check_widths(cap_feat_dim: int | None, hidden: int | None, transformer, text_encoder) -> None:
    """Refuse, before any weight is read, a text encoder whose hidden size is not the DiT's caption
    width (a Qwen3 other than the 4B, say): found after loading, it cost the whole load first."""
    if cap_feat_dim is not None and hidden is not None and cap_feat_dim != hidden:
        raise ValueError(f"text encoder hidden size {hidden} ({text_encoder}) does not match the transformer's "
                         f"cap_feat_dim {cap_feat_dim} ({transformer}): Z-Image's DiT takes the features of "
                         f"Qwen3-4B (hidden size 2560)")


def read_scheduler_config(scheduler_config: SchedulerConfig | dict | str | os.PathLike | None) -> SchedulerConfig:
    """None: the released Turbo scheduler (shift 3.0); else a SchedulerConfig, a dict or a scheduler_config.json."""
    if scheduler_config is None:
        return SchedulerConfig()
    if isinstance(scheduler_config, SchedulerConfig):
        return scheduler_config
    if isinstance(scheduler_config, (str, os.PathLike)) and Path(scheduler_config).is_dir():
        scheduler_config = Path(scheduler_config) / "scheduler_config.json"
    return SchedulerConfig.from_dict(read_overrides(scheduler_config))


def load_single_files(
    transformer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    transformer_config: dict | str | os.PathLike | None = None,
    vae_config: dict | str | os.PathLike | None = None,
    text_encoder_config: dict | str | os.PathLike | None = None,
    scheduler_config: SchedulerConfig | dict | str | os.PathLike | None = None,
    text_encoder_quant: str = "none",
) -> dict[str, Any]:
    """The pieces of a pipeline from single files (ComfyUI split files, all-in-one files, fp8 files,
    component folders): a dict of the pipeline constructor's arguments (``transformer``, ``vae``,
    ``text_encoder`` (a TextEncoder), ``scheduler_config``, ``vae_config``, ``source``).

    A component left out is taken from ``transformer``'s file when that file also holds it
    (all-in-one checkpoints). ``tokenizer``: a folder or Hub id (default: the tokenizer/ folder of
    Tongyi-MAI/Z-Image-Turbo, fetched alone). The scheduler defaults to the released Turbo one
    (pass the Base one, shift 6.0, for Z-Image Base). ``text_encoder_quant``: "none" | "int8" |
    "int4" (:mod:`zimage_native.quantize`).
    """
    from .devices import resolve_device, resolve_dtype, warn_if_cpu_fallback
    from .formats.detect import detect_format
    from .hub import load_tokenizer
    from .text_encoder import TextEncoder, check_vocabulary

    check_component_paths("from_single_files", {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
                                                "tokenizer": tokenizer})
    if transformer is None:
        raise ValueError("from_single_files needs transformer= (a DiT file or folder)")
    # A file that is no Z-Image DiT (an SDXL or FLUX checkpoint, a pickle) is named as such first, not
    # after the VAE and text encoder it lacks are asked for (gigabytes to fetch for a file that never loads).
    check_components({"transformer": transformer})
    given = {"vae": vae, "text_encoder": text_encoder}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        present = {c.component for c in detect_format(transformer).components}
        for name in missing:
            if name in present:
                given[name] = transformer
        still = [name for name in missing if given[name] is None]
        if still:
            raise ValueError(f"from_single_files: no {' or '.join(still)} given, and {transformer} does not "
                             f"contain one; pass {', '.join(n + '=' for n in still)} (on the command line "
                             f"{', '.join('--' + n.replace('_', '-') for n in still)})")
    resolved = resolve_device(device)
    warn_if_cpu_fallback(device, resolved)
    device, dtype = resolved, resolve_dtype(dtype, resolved)
    scfg = read_scheduler_config(scheduler_config)
    check_weight_files(dict.fromkeys((transformer, given["vae"], given["text_encoder"])))
    check_components(given)
    check_widths(header_width("transformer", transformer), header_width("text_encoder", given["text_encoder"]),
                 transformer, given["text_encoder"])
    tok = load_tokenizer(tokenizer)
    check_vocabulary(tok, header_width("text_encoder", given["text_encoder"], axis=0), given["text_encoder"])
    dit = load_component("transformer", transformer, dtype, device, transformer_config)
    ae = load_component("vae", given["vae"], dtype, device, vae_config)
    if ae.config.latent_channels != dit.config.in_channels:  # before the text encoder loads; it failed at the decode
        raise ValueError(f"the VAE {given['vae']} has {ae.config.latent_channels} latent channels and the transformer "
                         f"{transformer} makes {dit.config.in_channels}: Z-Image decodes with the 16-channel FLUX VAE "
                         f"(ae.safetensors); a 4-channel one is Stable Diffusion's or SDXL's")
    te = load_component("text_encoder", given["text_encoder"], dtype, device, text_encoder_config,
                        quant=text_encoder_quant)
    if te.config.hidden_size != dit.config.cap_feat_dim:
        raise ValueError(f"text encoder hidden size {te.config.hidden_size} does not match the transformer's "
                         f"cap_feat_dim {dit.config.cap_feat_dim}")
    source = f"single files: transformer={transformer}, vae={given['vae']}, text_encoder={given['text_encoder']}"
    return dict(transformer=dit, vae=ae, text_encoder=TextEncoder(te, tok), scheduler_config=scfg,
                vae_config=ae.config, source=source)


# =========================================================================== a whole pipeline from a model folder


def check_quant(text_encoder_quant: str, text_encoder_url: str | None = None) -> str:
    """Refuse an unknown text encoder quantisation, or one asked for a remote text encoder."""
    from .quantize import QUANT_MODES

    if text_encoder_quant not in QUANT_MODES:
        raise ValueError(f"text_encoder_quant must be one of {QUANT_MODES}, got {text_encoder_quant!r}")
    if text_encoder_url is not None and text_encoder_quant != "none":
        raise ValueError("text_encoder_quant applies to a local text encoder; with text_encoder_url the remote "
                         "server's setting applies (start it with --text-encoder-quant)")
    return text_encoder_quant


def _own_config(folder: Path, component: str) -> Path | None:
    """The model folder's config.json of a component given as its own file: what its tensors cannot
    tell, if the folder has it (a folder may lack the components given as files)."""
    path = folder / component / "config.json"
    return path if path.is_file() else None


def folder_weight_bytes(folder: Path, skip: Iterable[str], dtype: torch.dtype, text_encoder_quant: str = "none",
                        offload: str = "none", files: dict[str, str | os.PathLike] | None = None) -> dict[str, int]:
    """The weight bytes each component of a diffusers-layout folder holds on its device while it runs,
    loaded in ``dtype`` (computed from its config by :mod:`zimage_native.footprint`; with ``offload``
    "blocks" the DiT's resident part and the blocks in flight), except the components in ``skip``
    (replaced by other files or a remote encoder). ``files``: components of ``skip`` given as files
    (component -> path or None), each weighed from the file's header the same way
    (``footprint.dit_file_bytes`` with the packed layers kept packed, the least the loader keeps;
    ``footprint.text_encoder_file_bytes``; ``footprint.vae_file_bytes``), with the folder's
    config.json beside them as the loader reads it."""
    from . import footprint
    from .config import TransformerConfig, VAEConfig

    size = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    needs = {}
    files = files or {}
    if files.get("transformer") is not None:
        needs["transformer"] = footprint.dit_file_bytes(files["transformer"], size, "blocks" if offload == "blocks"
                                                        else "none", config=_own_config(folder, "transformer"))
    if files.get("text_encoder") is not None:
        needs["text_encoder"] = footprint.text_encoder_file_bytes(files["text_encoder"], size, text_encoder_quant,
                                                                  _own_config(folder, "text_encoder"))
    if files.get("vae") is not None:
        needs["vae"] = footprint.vae_file_bytes(files["vae"], size, _own_config(folder, "vae"))
    if "transformer" not in skip:
        needs["transformer"] = footprint.dit_bytes(TransformerConfig.from_json(folder / "transformer" / "config.json"),
                                                   size, "blocks" if offload == "blocks" else "none")
    if "text_encoder" not in skip:
        config = read_json(folder / "text_encoder" / "config.json")
        if config.get("model_type") == "qwen3":  # anything else is refused, with its reason, when it loads
            needs["text_encoder"] = footprint.text_encoder_bytes(config, text_encoder_quant, size)
    if "vae" not in skip:
        needs["vae"] = footprint.vae_bytes(VAEConfig.from_json(folder / "vae" / "config.json"), size)
    return needs


#: The offload and text encoder settings weighed by :func:`setting_peaks`, in the CLI's words.
SETTINGS = (("none", "none"), ("none", "int8"), ("none", "int4"), ("blocks", "none"), ("blocks", "int8"),
            ("model", "none"), ("model", "int8"))


def setting_peaks(folder: Path, skip: list[str], dtype: torch.dtype, placement: dict[str, torch.device],
                  device: torch.device, files: dict[str, str | os.PathLike] | None = None) -> list[tuple[str, int]]:
    """(flags, peak bytes of weights on ``device``) for each of :data:`SETTINGS` this folder (with the
    component ``files`` of :func:`folder_weight_bytes`) allows (int4 needs widths in multiples of its group)."""
    out = []
    for offload, quant in SETTINGS:
        try:
            needs = folder_weight_bytes(folder, skip, dtype, quant, offload, files)
        except ValueError:
            continue
        flags = " ".join(f for f in (f"--offload {offload}" if offload != "none" else "",
                                     f"--text-encoder-quant {quant}" if quant != "none" else "") if f)
        out.append((flags or "everything resident", weight_peak(needs, placement, offload, device)[0]))
    return out


def settings_that_fit(folder: Path, skip: list[str], dtype: torch.dtype, placement: dict[str, torch.device],
                      device: torch.device, free: int, files: dict[str, str | os.PathLike] | None = None) -> str | None:
    """The settings whose weights fit in ``free`` bytes of ``device``, in the CLI's words with their
    peaks; None if none does."""
    fits = [f"{flags} ({format_bytes(peak)} at the peak)"
            for flags, peak in setting_peaks(folder, skip, dtype, placement, device, files) if peak <= free]
    return f"use one of: {'; '.join(fits)} (or a GGUF or fp8 DiT file, kept quantised: --transformer FILE)" if fits else None


def load_pretrained(
    path_or_id: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    text_encoder_device: str | torch.device | None = None,
    dit_device: str | torch.device | None = None,
    vae_device: str | torch.device | None = None,
    offload: str = "none",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    transformer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    text_encoder_url: str | None = None,
    text_encoder_token: str | None = None,
    text_encoder_quant: str = "none",
) -> dict[str, Any]:
    """The pieces of a pipeline from a diffusers-layout folder or a Hub id (only the needed files
    are downloaded): a dict of the pipeline constructor's arguments.

    ``dtype`` applies to all three components (default: bf16 on GPU, fp32 on CPU); weights are
    cast tensor by tensor while loading. ``*_device`` place one component elsewhere than
    ``device``; ``offload`` (see :mod:`zimage_native.devices`) says where each lives between uses:
    "text_encoder" keeps the text encoder on the CPU except while it encodes; "model" keeps every
    component on the CPU except while it runs; "blocks" offloads the text encoder as "text_encoder"
    does and streams the DiT's blocks from (pinned) CPU memory one block ahead of their use
    (:mod:`zimage_native.offload`). ``text_encoder_quant`` "none" | "int8" | "int4": weight-only
    quantisation of the Qwen3 text encoder (:mod:`zimage_native.quantize`).
    ``transformer``, ``vae``, ``text_encoder`` (files in any supported format, see
    docs/formats.md) and ``tokenizer`` (a folder or Hub id) replace that component of the folder.
    ``text_encoder_url``: encode prompts on a remote ``zimage serve`` (its ``/api/encode``) instead
    of loading Qwen3 here (the distributed mode; docs/server.md).
    """
    from .config import TransformerConfig, VAEConfig
    from .devices import (HOST_MEMORY_DEVICES, check_host_memory, check_offload, check_weights_fit, load_device,
                          model_offload_gpu_short, resolve_device, resolve_dtype, warn_if_cpu_fallback)
    from .hub import load_tokenizer, resolve_model_folder
    from .model.transformer import ZImageTransformer
    from .model.vae import AutoencoderKL
    from .text_encoder import TextEncoder, check_vocabulary, load_qwen3_encoder

    check_component_paths("from_pretrained", {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
                                              "tokenizer": tokenizer})
    check_offload(offload)
    check_quant(text_encoder_quant, text_encoder_url)
    overridden = {"transformer": transformer, "vae": vae,
                  "text_encoder": text_encoder if text_encoder_url is None else text_encoder_url}
    # (the tokenizer too: given from elsewhere, or not read at all beside a remote text encoder)
    given = {**overridden, "tokenizer": tokenizer if text_encoder_url is None else text_encoder_url}
    folder = resolve_model_folder(path_or_id, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only,
                                  skip_weights=tuple(k for k, v in given.items() if v is not None))
    main = resolve_device(device)
    warn_if_cpu_fallback(device, main)
    dtype = resolve_dtype(dtype, main)
    placement = {
        "text_encoder": resolve_device(text_encoder_device) if text_encoder_device is not None else main,
        "transformer": resolve_device(dit_device) if dit_device is not None else main,
        "vae": resolve_device(vae_device) if vae_device is not None else main,
    }
    storage = {name: load_device(name, dev, offload) for name, dev in placement.items()}
    if offload != "none" and all(dev.type == "cpu" for dev in placement.values()):
        logger.warning('offload "%s" keeps weights in CPU memory until they run on the GPU; here every component '
                       'runs on the CPU, so it changes nothing (the same images, the same memory): it is meant for a '
                       'GPU', offload)
    skip = [k for k, v in overridden.items() if v is not None]
    pinned = ("transformer",) if offload == "blocks" and placement["transformer"].type == "cuda" else ()
    if any(dev.type in HOST_MEMORY_DEVICES for dev in storage.values()):
        # the pinned refusal names --offload model only where its largest component fits on the GPU
        model_gpu = model_offload_gpu_short(folder_weight_bytes(folder, skip, dtype, text_encoder_quant, "model"),
                                            placement) if pinned else None
        check_host_memory(folder_weight_bytes(folder, skip, dtype, text_encoder_quant), storage, pinned,
                          model_gpu=model_gpu)
    scfg = SchedulerConfig.from_json(folder / "scheduler" / "scheduler_config.json")
    dit_source = transformer if transformer is not None else folder / "transformer"
    te_source = text_encoder if text_encoder is not None else folder / "text_encoder"
    check_weight_files([dit_source, vae if vae is not None else folder / "vae",
                        *([te_source] if text_encoder_url is None else [])])
    files = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder if text_encoder_url is None else None}
    check_components(files)  # (before the files' headers are weighed)
    if transformer is not None and pinned:
        # a file's DiT, left out of the folder's RAM check: its pinned refusal names --offload model only
        # where the file's DiT fits on the GPU as it visits
        model = folder_weight_bytes(folder, skip, dtype, text_encoder_quant, "model", files)
        check_host_memory({"transformer": model["transformer"]}, storage, pinned,
                          model_gpu=model_offload_gpu_short(model, placement))
    if any(dev.type == "cuda" for dev in placement.values()):
        check_weights_fit(folder_weight_bytes(folder, skip, dtype, text_encoder_quant, offload, files), placement,
                          offload, advice=lambda device, free: settings_that_fit(folder, skip, dtype, placement, device,
                                                                                 free, files))
    dit_width = (header_width("transformer", transformer) if transformer is not None else
                 TransformerConfig.from_json(folder / "transformer" / "config.json").cap_feat_dim)
    if text_encoder_url is None:
        check_widths(dit_width, header_width("text_encoder", text_encoder) if text_encoder is not None else
                     qwen3_hidden_size(folder / "text_encoder" / "config.json"), dit_source, te_source)
    else:  # asked before any weight is read: an encoder that is down or of another width fails at once
        from .server.remote import RemoteTextEncoder

        te = RemoteTextEncoder(text_encoder_url, text_encoder_token, dtype=dtype)
        check_widths(dit_width, te.hidden_size, dit_source, text_encoder_url)
    if text_encoder_url is None:
        tok = load_tokenizer(tokenizer if tokenizer is not None else folder / "tokenizer")
        if text_encoder is not None:  # a file from elsewhere: is it the tokenizer's model?
            check_vocabulary(tok, header_width("text_encoder", text_encoder, axis=0), text_encoder)
    logger.info("loading %s in %s, placement %s, offload %s", folder, dtype, placement, offload)
    if transformer is not None:
        dit = load_component("transformer", transformer, dtype, storage["transformer"],
                             _own_config(folder, "transformer"), pinned=bool(pinned))
    else:
        tcfg = TransformerConfig.from_json(folder / "transformer" / "config.json")
        check_dit_blocks(read_header_keys(safetensors_files(folder / "transformer")), tcfg, folder / "transformer")
        dit = load_module(lambda: ZImageTransformer(tcfg), folder / "transformer", dtype,
                          storage["transformer"], "transformer", pinned=bool(pinned))
    if vae is not None:
        ae = load_component("vae", vae, dtype, storage["vae"], _own_config(folder, "vae"))
    else:
        vcfg = VAEConfig.from_json(folder / "vae" / "config.json")
        ae = load_module(lambda: AutoencoderKL(vcfg), folder / "vae", dtype, storage["vae"], "vae")
    if text_encoder_url is not None:
        hidden = te.hidden_size
    else:
        if text_encoder is not None:
            te = TextEncoder(load_component("text_encoder", text_encoder, dtype, storage["text_encoder"],
                                            _own_config(folder, "text_encoder"), quant=text_encoder_quant), tok)
        else:
            te = TextEncoder(load_qwen3_encoder(folder / "text_encoder", dtype, storage["text_encoder"],
                                                text_encoder_quant), tok)
        hidden = te.model.config.hidden_size
    if hidden != dit.config.cap_feat_dim:
        raise ValueError(
            f"text encoder hidden size {hidden} does not match the transformer's cap_feat_dim {dit.config.cap_feat_dim}"
        )
    return dict(transformer=dit, vae=ae, text_encoder=te, scheduler_config=scfg, vae_config=ae.config,
                source=str(path_or_id), model_folder=folder, placement=placement, offload=offload)
