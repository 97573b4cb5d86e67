"""Declarative key maps between checkpoint layouts, run in both directions.

Every component has one *canonical* layout: the parameter names of our modules, which are those
of the diffusers folders (``ZImageTransformer``, ``AutoencoderKL``, a bare transformers
``Qwen3Model``). A :class:`KeyMap` describes one foreign layout as a table of rules between a
foreign template and a canonical template, read top to bottom, first match wins:

- :class:`Rename`: a key renamed, tensor unchanged;
- :class:`Fuse`: one foreign tensor holds several canonical ones concatenated along ``dim``
  (the fused ``attention.qkv`` of the ComfyUI DiT); split on the way in, concatenated on the way out;
- :class:`Conv1x1`: a 1x1 conv weight (O, I, 1, 1) in the foreign layout is a Linear weight (O, I)
  in ours (the LDM VAE's mid-block attention).

Templates use ``{}`` for any run of characters and ``{~}`` for a block index that is mirrored
(``i <-> n - 1 - i``; the LDM decoder numbers its up blocks in reverse). Keys that match no rule
keep their name. Foreign prefixes are stripped on the way in (``prefixes``) and one is added on
the way out (``out_prefix``); keys listed in ``drop`` are discarded on the way in.

No tensor is touched here except by the three transforms above; the functions that stream
(key, tensor) pairs through a map are :func:`to_canonical` and :func:`from_canonical`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Union

import torch

# --------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rename:
    """``src`` (foreign) <-> ``dst`` (canonical), tensor unchanged."""

    src: str
    dst: str


@dataclass(frozen=True)
class Fuse:
    """One foreign tensor ``src`` = cat(canonical ``dst`` tensors, dim). Parts must have equal size along dim."""

    src: str
    dst: tuple[str, ...]
    dim: int = 0


@dataclass(frozen=True)
class Conv1x1:
    """A foreign 1x1 conv weight (O, I, 1, 1) <-> a canonical Linear weight (O, I)."""

    src: str
    dst: str


Rule = Union[Rename, Fuse, Conv1x1]


class _Template:
    """A key template compiled once: ``match`` gives the captured values, ``fill`` writes them back."""

    def __init__(self, text: str):
        self.text = text
        pieces = re.split(r"(\{~?\})", text)
        self.slots = [p for p in pieces if p in ("{}", "{~}")]
        regex = "".join(
            "(.+?)" if p == "{}" else r"(\d+)" if p == "{~}" else re.escape(p) for p in pieces
        )
        self.regex = re.compile(regex)
        self.literal = pieces

    def match(self, key: str) -> list[str] | None:
        m = self.regex.fullmatch(key)
        return list(m.groups()) if m else None

    def fill(self, values: list[str]) -> str:
        it = iter(values)
        return "".join(next(it) if p in ("{}", "{~}") else p for p in self.literal)


def _move(values: list[str], src: _Template, dst: _Template, mirror: int | None) -> list[str]:
    """Carry captured values from one template to the other, mirroring ``{~}`` slots."""
    if len(src.slots) != len(dst.slots):
        raise ValueError(f"templates {src.text!r} and {dst.text!r} have different placeholders")
    out = []
    for value, a, b in zip(values, src.slots, dst.slots):
        if (a == "{~}") != (b == "{~}"):
            raise ValueError(f"templates {src.text!r} and {dst.text!r} disagree on a mirrored slot")
        if a == "{~}":
            if mirror is None:
                raise ValueError("this key map has mirrored slots but no block count")
            value = str(mirror - 1 - int(value))
        out.append(value)
    return out


@dataclass(frozen=True)
class KeyMap:
    """A foreign layout of one component, described against the canonical layout."""

    name: str
    component: str
    rules: tuple[Rule, ...] = ()
    prefixes: tuple[str, ...] = ()
    out_prefix: str = ""
    drop: tuple[str, ...] = ()
    mirror: int | None = None  # the block count for ``{~}`` slots
    metadata: dict[str, str] = field(default_factory=dict)  # written into the safetensors header on output

    def __post_init__(self):
        compiled = []
        for rule in self.rules:
            if isinstance(rule, Fuse):
                dsts = tuple(_Template(d) for d in rule.dst)
                compiled.append((rule, _Template(rule.src), dsts))
            else:
                compiled.append((rule, _Template(rule.src), (_Template(rule.dst),)))
        object.__setattr__(self, "_compiled", tuple(compiled))

    # ------------------------------------------------------------------ key level
    def strip(self, key: str) -> str:
        """Remove the foreign prefixes, in order (``text_encoders.x.transformer.`` then ``model.``)."""
        for prefix in self.prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        return key

    def forward_key(self, key: str) -> tuple[Rule | None, list[str]]:
        """Foreign key (prefix already stripped) -> (rule, canonical keys). ``[]`` if the key is dropped."""
        if key in self.drop:
            return None, []
        for rule, src, dsts in self._compiled:
            values = src.match(key)
            if values is not None:
                return rule, [d.fill(_move(values, src, d, self.mirror)) for d in dsts]
        return None, [key]

    def inverse_key(self, key: str) -> tuple[Rule | None, str, int]:
        """Canonical key -> (rule, foreign key without prefix, index of this key among the rule's parts)."""
        for rule, src, dsts in self._compiled:
            for i, d in enumerate(dsts):
                values = d.match(key)
                if values is not None:
                    return rule, src.fill(_move(values, d, src, self.mirror)), i
        return None, key, 0

    def canonical_keys(self, key: str) -> list[str]:
        """The canonical key(s) a full foreign key becomes (prefix stripped, rules applied)."""
        return self.forward_key(self.strip(key))[1]

    def foreign_key(self, key: str) -> str:
        """The full foreign key a canonical key is stored under (rules applied, prefix added)."""
        return self.out_prefix + self.inverse_key(key)[1]


# --------------------------------------------------------------------------------------- streaming


def to_canonical(items: Iterable[tuple[str, torch.Tensor]], keymap: KeyMap) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream foreign (key, tensor) pairs into canonical ones: renames, splits and 1x1 squeezes."""
    for key, tensor in items:
        rule, keys = keymap.forward_key(keymap.strip(key))
        if isinstance(rule, Fuse):
            if tensor.shape[rule.dim] % len(keys):
                raise ValueError(
                    f"{key}: size {tensor.shape[rule.dim]} along dim {rule.dim} does not split into {len(keys)} parts"
                )
            for k, part in zip(keys, tensor.chunk(len(keys), dim=rule.dim)):
                yield k, part
                del part
        elif isinstance(rule, Conv1x1):
            if tensor.ndim == 4 and tuple(tensor.shape[2:]) != (1, 1):
                raise ValueError(f"{key}: expected a 1x1 conv weight, got shape {tuple(tensor.shape)}")
            yield keys[0], tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.ndim == 4 else tensor
        else:
            for k in keys:
                yield k, tensor
        del tensor  # not held while the next one is read (a stream holds one tensor at a time)


def _adjoining(parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The concatenation of ``parts`` along ``dim`` as a view of their memory, when they lie one
    after the other in one storage (a fused tensor that :func:`to_canonical` split into row blocks,
    joined again for a layout that fuses them the same way); ``None`` otherwise. A copy made by
    ``torch.cat`` held the fused weight twice at the peak of a conversion (a real-width q|k|v,
    11520 x 3840: 84 MiB more in bf16). The values are the parts' own, so those of the copy."""
    first = parts[0]
    if dim != 0 or first.is_meta or first.ndim == 0:
        return None
    offset, ptr = first.storage_offset(), first.untyped_storage().data_ptr()
    for part in parts:
        if (not part.is_contiguous() or part.dtype != first.dtype or part.device != first.device
                or part.shape[1:] != first.shape[1:] or part.untyped_storage().data_ptr() != ptr
                or part.storage_offset() != offset):
            return None
        offset += part.numel()
    shape = (sum(part.shape[0] for part in parts), *first.shape[1:])
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(first.untyped_storage(),
                                                                        first.storage_offset(), shape)


def from_canonical(items: Iterable[tuple[str, torch.Tensor]], keymap: KeyMap) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream canonical (key, tensor) pairs into the foreign layout; fused parts are buffered until complete."""
    for key, tensor, _ in from_canonical_blocks(items, keymap, join=True):
        yield key, tensor
        del tensor  # not held while the next one is made


def from_canonical_blocks(items: Iterable[tuple[str, torch.Tensor]], keymap: KeyMap,
                          join: bool | Callable[[str], bool] = False) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """As :func:`from_canonical`, with the row of the foreign tensor where each tensor yielded
    begins: ``None`` for a whole tensor. Unless ``join``, the parts of a tensor fused along dim 0
    (q|k|v, w1|w3) are not joined: each is passed on as it comes, as the block of rows it fills
    (part ``i`` of ``n`` equal ones at row ``i * rows``), for a writer that places it there
    (``streaming.SafetensorsWriter.write(..., row=)``). Joined, the parts of a diffusers DiT's
    q|k|v were held until the last came and copied into the fused tensor: the weight twice at the
    peak of a conversion (a real-width 11520 x 3840 bf16 q|k|v: 169 MiB above the start for an 84
    MiB weight). ``join`` may be a test of a part's canonical key: those it passes are joined."""
    pending: dict[str, dict[int, torch.Tensor | tuple[int, ...]]] = {}  # out -> index -> part (its shape when passed on)
    for key, tensor in items:
        rule, foreign, index = keymap.inverse_key(key)
        out = keymap.out_prefix + foreign
        if isinstance(rule, Fuse):
            parts = pending.setdefault(out, {})
            if index in parts:
                raise ValueError(f"{key}: given twice")
            if not (join(key) if callable(join) else join) and rule.dim == 0:
                shape = tuple(tensor.shape)
                if any(other != shape for other in parts.values()):
                    raise ValueError(f"{key}: shape {list(shape)} differs from the other parts of {out} "
                                     f"{[list(other) for other in parts.values()]}")
                parts[index] = shape
                if len(parts) == len(rule.dst):
                    del pending[out]
                yield out, tensor, index * shape[0]
            else:
                parts[index] = tensor
                if len(parts) == len(rule.dst):
                    del pending[out]
                    ordered = [parts[i] for i in range(len(rule.dst))]
                    del parts
                    tensor = _adjoining(ordered, rule.dim)
                    if tensor is None:
                        tensor = torch.cat(ordered, dim=rule.dim)
                    del ordered  # the parts are not held beside their join
                    yield out, tensor, None
        elif isinstance(rule, Conv1x1):
            yield out, tensor[:, :, None, None] if tensor.ndim == 2 else tensor, None
        else:
            yield out, tensor, None
        del tensor  # not held while the next one is made (a stream holds one tensor at a time)
    if pending:
        incomplete = {k: sorted(v) for k, v in pending.items()}
        shown = dict(list(incomplete.items())[:5])
        raise ValueError(f"cannot fuse: some parts are missing (key: part indices present) {shown}")


def convert_state_dict(state_dict: dict[str, torch.Tensor], src: KeyMap | None,
                       dst: KeyMap | None) -> dict[str, torch.Tensor]:
    """Foreign layout ``src`` -> foreign layout ``dst`` through the canonical one (``None`` = canonical)."""
    items: Iterable[tuple[str, torch.Tensor]] = state_dict.items()
    if src is not None:
        items = to_canonical(items, src)
    if dst is not None:
        items = from_canonical(items, dst)
    return dict(items)


# --------------------------------------------------------------------------------------- the tables

PATCH_KEY = "2-1"  # ModuleDict key of the patch embedder and final layer: "{patch}-{f_patch}"

#: ComfyUI / original Z-Image DiT (``z_image_turbo_bf16.safetensors``), as in Comfy's Lumina-2 NextDiT.
DIT_COMFYUI = KeyMap(
    name="comfyui",
    component="transformer",
    rules=(
        Fuse("{}.attention.qkv.weight", ("{}.attention.to_q.weight", "{}.attention.to_k.weight",
                                         "{}.attention.to_v.weight")),
        Rename("{}.attention.out.{}", "{}.attention.to_out.0.{}"),
        Rename("{}.attention.q_norm.{}", "{}.attention.norm_q.{}"),
        Rename("{}.attention.k_norm.{}", "{}.attention.norm_k.{}"),
        Rename("x_embedder.{}", f"all_x_embedder.{PATCH_KEY}.{{}}"),
        Rename("final_layer.{}", f"all_final_layer.{PATCH_KEY}.{{}}"),
    ),
    prefixes=("model.diffusion_model.", "diffusion_model."),
    drop=("norm_final.weight",),  # a Lumina-2 leftover; the final LayerNorm has no weight
)

#: Our pre-fused layout: diffusers names, but q/k/v and w1/w3 stored concatenated (fewer, larger reads).
DIT_NATIVE_FUSED = KeyMap(
    name="native-fused",
    component="transformer",
    rules=(
        Fuse("{}.attention.to_qkv.weight", ("{}.attention.to_q.weight", "{}.attention.to_k.weight",
                                            "{}.attention.to_v.weight")),
        Fuse("{}.feed_forward.w13.weight", ("{}.feed_forward.w1.weight", "{}.feed_forward.w3.weight")),
    ),
    metadata={"zimage_native.layout": "native-fused"},
)

#: The diffusers layout itself (identity); only prefixes some tools add are stripped.
DIT_DIFFUSERS = KeyMap(name="diffusers", component="transformer",
                       prefixes=("model.diffusion_model.", "diffusion_model."))


def vae_ldm_keymap(n_blocks: int = 4) -> KeyMap:
    """The BFL / LDM VAE layout (FLUX ``ae.safetensors``); ``n_blocks`` = len(block_out_channels)."""
    rules: list[Rule] = [
        Rename("encoder.down.{}.block.{}.nin_shortcut.{}", "encoder.down_blocks.{}.resnets.{}.conv_shortcut.{}"),
        Rename("encoder.down.{}.block.{}.{}", "encoder.down_blocks.{}.resnets.{}.{}"),
        Rename("encoder.down.{}.downsample.conv.{}", "encoder.down_blocks.{}.downsamplers.0.conv.{}"),
        Rename("decoder.up.{~}.block.{}.nin_shortcut.{}", "decoder.up_blocks.{~}.resnets.{}.conv_shortcut.{}"),
        Rename("decoder.up.{~}.block.{}.{}", "decoder.up_blocks.{~}.resnets.{}.{}"),
        Rename("decoder.up.{~}.upsample.conv.{}", "decoder.up_blocks.{~}.upsamplers.0.conv.{}"),
    ]
    for part in ("encoder", "decoder"):
        attn = f"{part}.mid_block.attentions.0"
        rules += [
            Rename(f"{part}.mid.block_1.{{}}", f"{part}.mid_block.resnets.0.{{}}"),
            Rename(f"{part}.mid.block_2.{{}}", f"{part}.mid_block.resnets.1.{{}}"),
            Rename(f"{part}.mid.attn_1.norm.{{}}", f"{attn}.group_norm.{{}}"),
            Rename(f"{part}.norm_out.{{}}", f"{part}.conv_norm_out.{{}}"),
        ]
        for ldm, ours in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            rules += [
                Conv1x1(f"{part}.mid.attn_1.{ldm}.weight", f"{attn}.{ours}.weight"),
                Rename(f"{part}.mid.attn_1.{ldm}.bias", f"{attn}.{ours}.bias"),
            ]
    return KeyMap(name="ldm", component="vae", rules=tuple(rules), prefixes=("first_stage_model.", "vae."),
                  mirror=n_blocks)


VAE_DIFFUSERS = KeyMap(name="diffusers", component="vae", prefixes=("first_stage_model.", "vae."))

_TE_PREFIXES = ("text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_4b.", "model.")

#: Qwen3 as the Hub and ComfyUI ship it (``qwen_3_4b.safetensors``): ``model.`` prefix, maybe a tied lm_head.
TE_TRANSFORMERS = KeyMap(name="transformers", component="text_encoder", prefixes=_TE_PREFIXES,
                         out_prefix="model.", drop=("lm_head.weight",))

#: Qwen3 as ``Qwen3Model.save_pretrained`` writes it (no prefix).
TE_BARE = KeyMap(name="bare", component="text_encoder", prefixes=_TE_PREFIXES, drop=("lm_head.weight",))

#: Layout names accepted by the loaders and ``zimage convert``, per component.
LAYOUTS: dict[str, dict[str, KeyMap]] = {
    "transformer": {"diffusers": DIT_DIFFUSERS, "comfyui": DIT_COMFYUI, "native-fused": DIT_NATIVE_FUSED},
    "vae": {"diffusers": VAE_DIFFUSERS, "ldm": vae_ldm_keymap()},
    "text_encoder": {"transformers": TE_TRANSFORMERS, "bare": TE_BARE},
}

ALIASES: dict[str, dict[str, str]] = {
    "transformer": {"original": "comfyui", "comfy": "comfyui", "fused": "native-fused", "native": "native-fused"},
    "vae": {"comfyui": "ldm", "comfy": "ldm", "bfl": "ldm", "original": "ldm"},
    "text_encoder": {"comfyui": "transformers", "comfy": "transformers", "diffusers": "transformers",
                     "original": "transformers", "hf": "transformers"},
}


def keymap_for(component: str, layout: str, n_blocks: int | None = None) -> KeyMap:
    """The key map of ``layout`` (or an alias such as 'original', 'bfl') for ``component``."""
    if component not in LAYOUTS:
        raise ValueError(f"unknown component {component!r}; choose one of {sorted(LAYOUTS)}")
    name = ALIASES[component].get(layout, layout)
    if name not in LAYOUTS[component]:
        choices = sorted(set(LAYOUTS[component]) | set(ALIASES[component]))
        raise ValueError(f"unknown {component} layout {layout!r}; choose one of {choices}")
    if component == "vae" and name == "ldm" and n_blocks is not None:
        return vae_ldm_keymap(n_blocks)
    return LAYOUTS[component][name]
