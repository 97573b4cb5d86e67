"""Convert one checkpoint component between layouts and dtypes, shard it, bake LoRAs in; write atomically.

The path of every tensor: read (fp8, comfy_quant and GGUF dequantised: to fp32 for LoRAs, by blocks
of rows where they are quantised for fp8 output (``formats.tensors.ValueRows``), else to the output
dtype) -> canonical names (``keymap.to_canonical``) -> LoRA deltas added
in fp32 -> destination layout (``keymap.from_canonical_blocks``: the parts of a fused q|k|v or w1|w3
passed on as they come, written at their rows of it, not joined first; for fp8 output, whose scale
is the whole weight's, with the amax of a first pass over them) -> dtype cast or fp8 quantisation
(written by blocks of rows as they are made) -> file.
The same path runs first on meta tensors built from the header alone, which gives the plan (keys,
shapes, dtypes, sizes, shard assignment) that ``--dry-run`` prints and the writer follows: each
file's header is written from the plan first, then every tensor is converted, written at its offset
and dropped (``streaming.SafetensorsWriter``), so about one tensor is held in memory at a time,
whatever the size of a file.

Layout changes with ``dtype='keep'`` are lossless: a round trip returns the same bytes.
fp8 output is ComfyUI's "scaled fp8": block Linear weights in float8_e4m3fn with one fp32
``scale_weight`` each (amax / 448), a ``scaled_fp8`` marker, every other tensor in bf16.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..formats.fp8 import CHUNK_ELEMENTS
from .keymap import Fuse, KeyMap, from_canonical_blocks, keymap_for
from .streaming import ST_DTYPES, SafetensorsWriter

logger = logging.getLogger(__name__)

DTYPES = {"keep": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "fp8": torch.float8_e4m3fn,
          "float8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_ST_NAMES = ST_DTYPES  # torch dtype -> the safetensors spec's name (F32, BF16, F8_E4M3, ...)

#: Canonical weights that the fp8 output quantises: the Linear layers of the repeated blocks.
_FP8_TARGETS = {
    "transformer": re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)"
                              r"|feed_forward\.w[123]|adaLN_modulation\.0)\.weight$"),
    "text_encoder": re.compile(r"^layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"),
}
_WEIGHT_NAMES = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_CLASS_NAMES = {"transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL"}


#: A size as text, upper-cased: a number and a unit (parse_size)
SIZE_TEXT = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]?I?B?)\s*")


def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MB', '2GiB', '123' -> bytes (decimal units as in huggingface_hub; GiB/MiB binary)."""
    if text is None or isinstance(text, int):
        return text
    m = SIZE_TEXT.fullmatch(str(text).upper())
    if not m:
        raise ValueError(f"cannot read size {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    value, unit = float(m.group(1)), m.group(2).rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
            "TI": 2**40}[unit]
    size = int(value * mult)
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {text!r}")
    return size


@dataclass
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    sources: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What a conversion will write; ``lines()`` is the ``--dry-run`` listing."""

    src: str
    dst: str
    component: str
    src_layout: str
    dst_layout: str
    dtype: str
    quantization: str | None
    tensors: list[PlannedTensor]
    shards: list[list[str]]
    shard_files: list[str]
    folder: bool
    config: dict
    dropped: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # tensors of no component of the file (_left_out)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def lines(self) -> list[str]:
        quant = f", {self.quantization}" if self.quantization else ""
        out = [f"{self.src} ({self.component}, {self.src_layout}{quant}) -> {self.dst} ({self.dst_layout}, "
               f"dtype {self.dtype})"]
        for lora in self.loras:
            out.append(f"  bake LoRA {lora}")
        for t in self.tensors:
            src = ", ".join(t.sources) if t.sources else "(new)"
            arrow = "=" if t.sources == [t.key] else "<-"
            out.append(f"  {t.key} {arrow} {src}  {list(t.shape)} {t.dtype} {_human(t.nbytes)}")
        for key in self.dropped:
            out.append(f"  (dropped) {key}")
        for key in self.left_out:
            out.append(f"  (left out: no Z-Image component) {key}")
        by_key = {t.key: t for t in self.tensors}
        for name, keys in zip(self.shard_files, self.shards):
            out.append(f"  file {name}: {len(keys)} tensors, {_human(sum(by_key[k].nbytes for k in keys))}")
        out.append(f"  total: {len(self.tensors)} tensors, {_human(self.total_bytes)} in {len(self.shards)} file(s)")
        return out


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def _row_blocks(w: torch.Tensor) -> tuple[range, int]:
    """The starts and the size of blocks of rows of :data:`~zimage_native.formats.fp8.CHUNK_ELEMENTS`
    values of a 1-d or wider ``w`` (none for a tensor without values: an empty block has no max)."""
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(w.shape[1:])))
    return range(0, w.shape[0] if w.numel() else 0, step), step


def fp8_amax(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 max of ``|weight|`` (0 for a weight without values), by blocks of rows: the max of
    the blocks' maxima, a NaN stays NaN, as in the whole max."""
    w = weight.reshape(1) if weight.ndim == 0 else weight
    starts, step = _row_blocks(w)
    amax = torch.zeros((), dtype=torch.float32, device=w.device)
    for i in starts:
        amax = torch.maximum(amax, w[i:i + step].float().abs().max())
    return amax


def fp8_blocks(weight: torch.Tensor, amax: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Iterator[tuple[int, torch.Tensor]]]:
    """Per-tensor scaled fp8 of a 2-d ``weight`` by blocks of rows: (fp32 scale, the (first row,
    fp8 rows) blocks, made as they are taken), scale = amax / 448, where ``amax`` is the weight's
    (:func:`fp8_amax`) unless given: that of a larger tensor whose rows ``weight`` is (the max over
    its parts), whose scale it gets. Each code depends on its value and the scale alone, so the
    blocks are the whole-tensor result's rows, bit for bit."""
    amax = fp8_amax(weight) if amax is None else amax
    scale = (amax / FP8_MAX) if amax > 0 else torch.ones((), dtype=torch.float32, device=weight.device)
    starts, step = _row_blocks(weight)
    blocks = ((i, (weight[i:i + step].float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
              for i in starts)
    return scale.reshape(()).to(torch.float32), blocks


def quantize_fp8(weight: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8: (fp8 weight, fp32 scale) with weight ~= fp8 * scale, scale = amax / 448.

    Computed in fp32 by blocks of rows of :data:`~zimage_native.formats.fp8.CHUNK_ELEMENTS` values
    (the amax, then the codes, written into the result: :func:`fp8_blocks`). Whole, the weight's
    fp32 upcast, its quotient by the scale and the clamp of that were held at once: three fp32
    copies (a 10240 x 3840 bf16 weight: 450 MiB at the peak for a 37 MiB result). A weight without
    values (no rows or no columns) gives an empty result with scale 1, as an all-zero one does."""
    if weight.is_meta:
        return torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device="meta"), torch.empty((), device="meta")
    w = weight.reshape(1) if weight.ndim == 0 else weight
    scale, blocks = fp8_blocks(w, amax)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    for i, block in blocks:
        q[i:i + block.shape[0]] = block
    return q.reshape(weight.shape), scale


class _LoraBaker:
    """Adds LoRA deltas to canonical tensors as they stream past (fuse before any cast or quantisation)."""

    def __init__(self, loras: Sequence[tuple[str, float]], shapes: dict[str, tuple]):
        from ..lora import parse_lora, read_lora

        linear = {k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
        self.parts: dict[str, list] = {}
        self.reports = []
        for path, scale in loras:
            name, sd, metadata = read_lora(path, with_metadata=True)
            modules, report = parse_lora(sd, linear, name, metadata=metadata)
            report.scale = scale
            self.reports.append(report)
            for module in modules:
                rows = [linear[m][0] for m in module.target.modules]
                for i, m in enumerate(module.target.modules):
                    self.parts.setdefault(m + ".weight", []).append((module, i, rows, scale))
        self._cache: tuple[int, torch.Tensor] | None = None

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        contribs = self.parts.get(key)
        if not contribs or tensor.is_meta:
            return tensor
        out = tensor.float()
        for module, index, rows, scale in contribs:
            if self._cache is None or self._cache[0] != id(module):
                self._cache = (id(module), module.delta())
            out = out + scale * self._cache[1].split(rows, dim=0)[index]
        return out


def _stream(ckpt, info, dst: KeyMap, component: str, out_dtype: torch.dtype | None, baker, meta: bool,
            join: bool = False) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """The converted (key, tensor, row) triples: ``row`` None for a whole tensor, else the row where a
    part of a fused one begins (``keymap.from_canonical_blocks``), for ``SafetensorsWriter.write``
    to place; ``join``: every tensor whole (the plan's shapes)."""
    from ..formats import canonical_items
    from ..formats.gguf import GGUFCheckpoint
    from ..formats.gguf import canonical_items as gguf_items
    from ..formats.gguf import keymap_of

    # Quantised tensors (fp8, comfy_quant, GGUF) are dequantised to fp32 for a LoRA's deltas or the
    # fp8 quantisation (by rows, below, where no LoRA needs them whole); otherwise straight to the
    # output dtype (computed in fp32 and rounded once, as the cast of their fp32 values rounded
    # them), so a fused weight is split and joined in the output dtype, not in fp32 (a real-width
    # GGUF's q|k|v: its fp32 values, their join and its cast, 422 MiB at the peak for an 84 MiB
    # bf16 result).
    direct = baker is None and out_dtype not in (None, torch.float8_e4m3fn)
    read_dtype = out_dtype if direct else None
    if isinstance(ckpt, GGUFCheckpoint):
        canonical_items = gguf_items  # noqa: F811
        read_dtype = read_dtype or torch.float32

    fp8 = out_dtype == torch.float8_e4m3fn
    pattern = _FP8_TARGETS.get(component)
    quantised = (lambda key: pattern.match(key) is not None) if fp8 and pattern is not None else (lambda key: False)
    # fp8 without a LoRA: a quantised weight that is quantised again comes as rows dequantised where
    # they are quantised (formats.tensors.ValueRows), its fp32 values never whole (a real-width
    # q|k|v: 169 MiB at once for a 42 MiB result).
    by_rows = quantised if fp8 and baker is None and not meta else None

    def canonical(keep=None):
        for key, tensor in canonical_items(ckpt, info, meta=meta, dtype=read_dtype, keep=keep, by_rows=by_rows):
            original = tensor.dtype
            if baker is not None:
                tensor = baker(key, tensor)
            if out_dtype is None and tensor.dtype != original:  # 'keep': a LoRA-modified tensor is rounded back
                tensor = tensor.to(original)
            yield key, tensor
            del tensor  # not held while the next one is read

    if fp8:
        yield "scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn, device="meta" if meta else "cpu"), None
    # fp8: one scale for a fused weight (q|k|v, w1|w3), its parts' amax. Parts the source stores apart
    # are quantised and written at their rows as they come, with the amax of a first pass over them,
    # one part read at a time; joined, they were held and copied: the weight twice at the peak (a
    # real-width bf16 q|k|v: 169 MiB). Parts of one source tensor are joined as a view of it, unless
    # they come by rows (a quantised source): then they are written apart too.
    apart = _fused_apart(dst, keymap_of(info), quantised, stored_apart=by_rows is None or not info.quantization)
    amax: dict[str, torch.Tensor] = {}
    if fp8 and not meta and not join:
        for key, tensor in canonical(keep=apart):
            out = dst.foreign_key(key)
            amax[out] = torch.maximum(amax[out], fp8_amax(tensor)) if out in amax else fp8_amax(tensor)
            del tensor
    scaled = set()
    for key, tensor, row in from_canonical_blocks(canonical(), dst, join=join or (fp8 and (lambda k: not apart(k)))):
        if tensor.ndim == 2 and any(quantised(c) for c in dst.canonical_keys(key)):
            if tensor.is_meta or not tensor.numel():
                q, scale = quantize_fp8(tensor)
                yield key, q, row
            else:  # by blocks of rows, each written as it is made: the fp8 weight is never held whole
                scale, blocks = fp8_blocks(tensor, amax.get(key))
                for i, block in blocks:
                    yield key, block, (row or 0) + i
                    del block
            if key not in scaled:
                scaled.add(key)
                yield key[: -len("weight")] + "scale_weight", scale, None
            del scale
        elif fp8 and tensor.is_floating_point():
            yield key, tensor.to(torch.bfloat16), row
        elif out_dtype is not None and tensor.is_floating_point():
            yield key, tensor.to(out_dtype), row
        else:
            yield key, tensor, row
        del tensor  # not held while the next one is made


def _fused_apart(dst: KeyMap, src: KeyMap, quantised: Callable[[str], bool],
                 stored_apart: bool = True) -> Callable[[str], bool]:
    """Whether a canonical key is a part of a weight that ``dst`` fuses along dim 0 and fp8 output
    quantises (``quantised``), stored apart in the source (``src`` does not fuse the same parts) or,
    without ``stored_apart``, whatever the source stores (a quantised source's parts come by rows,
    :class:`~zimage_native.formats.tensors.ValueRows`: there is no tensor read to join them as a view of)."""
    def apart(key: str) -> bool:
        rule = dst.inverse_key(key)[0]
        if not (isinstance(rule, Fuse) and rule.dim == 0 and quantised(key)):
            return False
        if not stored_apart:
            return True
        stored = src.inverse_key(key)[0]
        return not (isinstance(stored, Fuse) and stored.dst == rule.dst)
    return apart


def _sources(info, dst: KeyMap) -> tuple[dict[str, list[str]], list[str]]:
    from ..formats import is_aux
    from ..formats.gguf import keymap_of

    src_km = keymap_of(info)  # info.keymap(), and the llama.cpp names of a GGUF text encoder

    parts: dict[str, dict[int, str]] = {}
    dropped = []
    for key in info.keys:
        if is_aux(key):
            continue
        canon = src_km.canonical_keys(key)
        if not canon:
            dropped.append(key)
        for c in canon:
            _, foreign, index = dst.inverse_key(c)
            parts.setdefault(dst.out_prefix + foreign, {}).setdefault(index, key)
    sources = {out: list(dict.fromkeys(p[i] for i in sorted(p))) for out, p in parts.items()}
    return sources, dropped


def _left_out(ckpt, fmt) -> list[str]:
    """The tensors of the file that no component of it holds and no other model family names: they are
    not converted, whatever ``--component`` (a component not chosen, or another family's tensors,
    named with ``--component``, are left out knowingly). Quantisation markers are not tensors of a model."""
    from ..formats import is_aux
    from ..formats.families import foreign_family

    taken = {k for c in fmt.components for k in c.keys}
    return [k for k in ckpt.keys() if k not in taken and not is_aux(k) and foreign_family([k]) is None]


def plan_conversion(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, component: str | None = None,
                    dtype: str = "keep", shard_size: str | int | None = None,
                    loras: Sequence[tuple[str, float]] = (), config: dict | str | None = None) -> Plan:
    """The plan of a conversion, from headers (and LoRA files) alone."""
    plan, (ckpt, *_) = _prepare(src, dst, to, component, dtype, shard_size, loras, config)
    ckpt.close()
    return plan


def _prepare(src, dst, to, component, dtype, shard_size, loras, config=None):
    from ..formats import Checkpoint, canonical_shapes, folder_config, infer_config, inspect_checkpoint, normalize_kind

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    out_dtype = DTYPES[dtype]
    limit = parse_size(shard_size)
    from ..formats.checkpoint import sniff

    # copies: each weight is read from the file into memory of its own (Checkpoint.read_rows,
    # GGUFCheckpoint.get), not taken as a view of the file's memory map, whose pages stayed resident
    # until the map closed at the end: a real-width bf16 DiT of 1050 MiB was held whole while it was
    # written, a GGUF file's packed bytes too.
    if src.is_file() and sniff(src) == "gguf":
        from ..formats import gguf

        ckpt, inspect, canonical_shapes = (gguf.GGUFCheckpoint(src, copies=True), gguf.inspect_gguf,
                                           gguf.canonical_shapes)
    else:
        ckpt, inspect = Checkpoint(src, copies=True), inspect_checkpoint
    try:
        fmt = inspect(ckpt)
        if component is None:
            if fmt.problem:
                raise ValueError(fmt.problem)
            if fmt.foreign:  # an SDXL all-in-one: its VAE alone was written, the UNet and CLIP left out unsaid
                taken = sum(len(c.keys) for c in fmt.components)
                raise ValueError(f"{src}: this checkpoint is {fmt.foreign_text()}: only its "
                                 f"{', '.join(c.component for c in fmt.components)} ({taken} of {len(ckpt.keys())} "
                                 f"tensors) would be converted; to take that part out alone, name it with --component")
            if len(fmt.components) != 1:
                found = [c.component for c in fmt.components]
                raise ValueError(f"{src} holds several components {found}: choose one with --component")
            info = fmt.components[0]
        else:
            info = fmt.component(normalize_kind(component))
        kind = info.component
        left_out = _left_out(ckpt, fmt)
        if left_out:  # (they were left out without a word)
            logger.warning("%s: %d tensor%s of no Z-Image component %s not converted: %s%s", src, len(left_out),
                           "s" if len(left_out) > 1 else "", "are" if len(left_out) > 1 else "is",
                           ", ".join(left_out[:5]), ", ..." if len(left_out) > 5 else "")
        dst_km = keymap_for(kind, to)
        if info.quantization and out_dtype is None:
            raise ValueError(f"{src} is {info.quantization}: choose an output --dtype (fp32, bf16, fp16 or fp8); "
                             f"'keep' would need the quantised values re-encoded")
        if out_dtype == torch.float8_e4m3fn and kind not in _FP8_TARGETS:
            raise ValueError(f"fp8 output is for the transformer and the text encoder, not the {kind}")
        if loras and kind != "transformer":
            raise ValueError("LoRAs can be baked into the transformer only")
        shapes = canonical_shapes(ckpt, info)
        folder = dst.suffix != ".safetensors"
        try:
            config = infer_config(kind, shapes, config, folder_config(src))
            config = config if isinstance(config, dict) else config.to_dict()
        except ValueError:
            if folder:  # the folder's config.json needs it; a single file carries no config
                raise
            config = {}
        baker = _LoraBaker(loras, shapes) if loras else None
        sources, dropped = _sources(info, dst_km)
        planned = []
        for key, t, _ in _stream(ckpt, info, dst_km, kind, out_dtype, None, meta=True, join=True):
            planned.append(PlannedTensor(key, tuple(t.shape), _ST_NAMES[t.dtype], t.numel() * t.element_size(),
                                         sources.get(key, [])))
        shards: list[list[str]] = [[]]
        size = 0
        for t in planned:
            if limit is not None and shards[-1] and size + t.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(t.key)
            size += t.nbytes
        if len(shards) > 1 and not folder:
            raise ValueError(f"{len(shards)} shards need a folder as the destination, not the file {dst}")
        base = _WEIGHT_NAMES[kind]
        if not folder:
            names = [dst.name]
        elif len(shards) == 1:
            names = [f"{base}.safetensors"]
        else:
            names = [f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        plan = Plan(str(src), str(dst), kind, info.layout, dst_km.name, dtype,
                    info.quantization, planned, shards, names, folder, config, dropped,
                    [f"{p} (scale {s:g})" for p, s in loras], left_out)
        return plan, (ckpt, info, dst_km, out_dtype, baker)
    except BaseException:
        ckpt.close()
        raise


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, component: str | None = None,
                       dtype: str = "keep", shard_size: str | int | None = None,
                       loras: Sequence[tuple[str, float]] = (), config: dict | str | os.PathLike | None = None,
                       force: bool = False, dry_run: bool = False) -> Plan:
    """Convert ``src`` (a file or component folder) to layout ``to`` at ``dst`` and return the plan.

    ``dst`` ending in ``.safetensors`` is one file; anything else is a component folder (weights,
    an index json when sharded, and a config.json: ``config`` overrides what the shapes cannot tell,
    as in ``loading.load_component``). An existing ``dst`` is refused unless ``force``;
    the output appears only when complete (written next to it, then renamed).
    """
    src_p, dst_p = Path(src).expanduser(), Path(dst).expanduser()
    if src_p.resolve() == dst_p.resolve():
        raise ValueError("the output must not be the input")
    if dst_p.exists() and not dry_run:
        if not force:
            raise FileExistsError(f"{dst_p} exists; pass --force to replace it")
        if dst_p.is_dir() and dst_p.suffix == ".safetensors":
            raise FileExistsError(f"{dst_p} is a folder; the output file cannot replace it")
    plan, (ckpt, info, dst_km, out_dtype, baker) = _prepare(src, dst, to, component, dtype, shard_size, loras, config)
    try:
        if dry_run:
            return plan
        metadata = {"format": "pt", "zimage_native.layout": dst_km.name, "zimage_native.component": plan.component,
                    **dst_km.metadata}
        dst_p.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile's mkdtemp / mkstemp, which make private entries (0700 / 0600): what is renamed
        # into place has the permissions the umask gives (_write sets its files' mode).
        tmp = dst_p.parent / f".{dst_p.name}.tmp-{uuid.uuid4().hex[:8]}"
        if plan.folder:
            tmp.mkdir()
            try:
                _write(plan, tmp, ckpt, info, dst_km, out_dtype, baker, metadata)
                _write_folder_extras(plan, tmp)
                _swap_in(tmp, dst_p)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:
            tmp = tmp.with_name(tmp.name + ".safetensors")
            try:
                plan.shard_files = [tmp.name]
                _write(plan, tmp.parent, ckpt, info, dst_km, out_dtype, baker, metadata)
                os.replace(tmp, dst_p)
                plan.shard_files = [dst_p.name]
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return plan
    finally:
        ckpt.close()


def _umask() -> int:
    """The process's umask: reading it means setting it, so set 0 and put it back at once."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(plan: Plan, folder: Path, ckpt, info, dst_km, out_dtype, baker, metadata) -> None:
    """Stream the converted tensors into the planned shards, under a progress bar in bytes (on a
    terminal, for components of ``loading.PROGRESS_MIN_BYTES`` or more). A shard's header is
    written from the plan when its first tensor comes, and each tensor is written as it comes and
    dropped: the memory held is about one tensor (and what the conversion of one tensor needs),
    not a shard. The bytes are those ``safetensors.torch.save_file`` writes for the same tensors
    (``streaming``). The shards get the mode a new file gets under the umask."""
    from tqdm.auto import tqdm

    from ..loading import PROGRESS_MIN_BYTES

    shard_of = {k: i for i, keys in enumerate(plan.shards) for k in keys}
    remaining = [len(keys) for keys in plan.shards]
    writers: dict[int, SafetensorsWriter] = {}  # the shards begun and not yet complete
    expected = {t.key: t for t in plan.tensors}
    written: set[str] = set()
    total = plan.total_bytes
    file_mode = 0o666 & ~_umask()
    bar = tqdm(total=total, desc=f"converting {plan.component}", unit="B", unit_scale=True, leave=False,
               disable=True if total < PROGRESS_MIN_BYTES else None)
    try:
        with bar:
            for key, tensor, row in _stream(ckpt, info, dst_km, plan.component, out_dtype, baker, meta=False):
                want = expected.get(key)
                part = row is not None  # a part of a fused tensor: rows of it, placed by the writer
                if (want is None or key in written or tuple(tensor.shape[part:]) != want.shape[part:]
                        or _ST_NAMES.get(tensor.dtype) != want.dtype):
                    raise RuntimeError(f"conversion produced {key} {tuple(tensor.shape)} {tensor.dtype}, which "
                                       f"the plan does not have")
                i = shard_of[key]
                if i not in writers:
                    tensors = [(k, expected[k].dtype, expected[k].shape) for k in plan.shards[i]]
                    writers[i] = SafetensorsWriter(folder / plan.shard_files[i], tensors, metadata)
                complete = writers[i].write(key, tensor, row)
                bar.update(tensor.numel() * tensor.element_size())
                del tensor  # not held while the next one is made
                if not complete:
                    continue
                written.add(key)
                remaining[i] -= 1
                if remaining[i] == 0:
                    writers.pop(i).close()
                    os.chmod(folder / plan.shard_files[i], file_mode)
    finally:
        for w in writers.values():  # after an error: the caller removes the partial files
            w.abort()
    if any(remaining):
        raise RuntimeError("conversion ended before every planned tensor was written")


def _write_folder_extras(plan: Plan, folder: Path) -> None:
    if len(plan.shards) > 1:
        base = _WEIGHT_NAMES[plan.component]
        index = {"metadata": {"total_size": plan.total_bytes},
                 "weight_map": {k: name for name, keys in zip(plan.shard_files, plan.shards) for k in keys}}
        (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(plan.config)
    if plan.component in _CLASS_NAMES:
        config = {"_class_name": _CLASS_NAMES[plan.component], **config}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _swap_in(tmp: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing ``dst`` is replaced only after the new one is complete."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
