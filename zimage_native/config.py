"""Model configurations, parsed from the config.json files that ship with a checkpoint.

One frozen dataclass per component. Field names are those of the diffusers config files, so
``TransformerConfig.from_dict(json.load(...))`` reads a real ``transformer/config.json``
unchanged. Keys that start with ``_`` (``_class_name``, ``_diffusers_version``) are ignored;
other unknown keys are reported with a warning, because a new key may change the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def _from_dict(cls, data: dict[str, Any], ignore: tuple[str, ...] = ()):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in data.items():
        if key.startswith("_") or key in ignore:
            continue
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        else:
            unknown.append(key)
    if unknown:
        logger.warning("%s: ignoring unknown config keys %s", cls.__name__, sorted(unknown))
    return cls(**kwargs)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file of a model folder (a config, an index); a cut or damaged one (a download or copy
    that stopped part way, a hand edit) is a one-line ValueError naming the file, not the parser's
    bare "Expecting value: line 2 column 1"."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else e.reason
        raise ValueError(f"{path} is not valid JSON ({where}): the file is incomplete or damaged (a partial "
                         f"download or copy, or an edit); download or copy it again") from None


class _ConfigMixin:
    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data, getattr(cls, "_ignored_keys", ()))

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class TransformerConfig(_ConfigMixin):
    """The Z-Image DiT. Defaults are the released Z-Image-Turbo values (not the diffusers class defaults)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # present in the config, unused by the model (k and v get n_heads heads)
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    def __post_init__(self):
        if len(self.all_patch_size) != 1 or len(self.all_f_patch_size) != 1:
            raise ValueError(
                f"only one patch size is supported, got all_patch_size={self.all_patch_size}, "
                f"all_f_patch_size={self.all_f_patch_size}"
            )
        if self.all_f_patch_size[0] != 1:
            raise ValueError(f"only f_patch_size 1 (images) is supported, got {self.all_f_patch_size[0]}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim != sum(self.axes_dims):
            raise ValueError(
                f"head_dim {self.head_dim} (dim {self.dim} / n_heads {self.n_heads}) must equal "
                f"sum(axes_dims) = {sum(self.axes_dims)} (axes_dims {list(self.axes_dims)})"
            )
        if len(self.axes_dims) != len(self.axes_lens) or len(self.axes_dims) != 3:
            raise ValueError(f"need 3 RoPE axes, got axes_dims {self.axes_dims}, axes_lens {self.axes_lens}")
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"every RoPE axis dim must be even, got {self.axes_dims}")
        if not self.qk_norm:
            raise ValueError("qk_norm=False is not a released Z-Image configuration and is not supported")
        if self.siglip_feat_dim is not None:
            raise ValueError("this is a Z-Image-Omni transformer (its config sets siglip_feat_dim): the Omni image "
                             "conditioning path is not implemented; zimage-native runs Z-Image-Turbo and "
                             "Z-Image (base)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def patch_dim(self) -> int:
        """Width of one patchified token: p * p * C."""
        return self.patch_size * self.patch_size * self.all_f_patch_size[0] * self.in_channels

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, 256)


@dataclass(frozen=True)
class VAEConfig(_ConfigMixin):
    """The FLUX-family 16-channel AutoencoderKL that Z-Image ships. Defaults are the released values."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    sample_size: int = 1024
    force_upcast: bool = True

    _ignored_keys = ("latents_mean", "latents_std")

    def __post_init__(self):
        if self.act_fn != "silu":
            raise ValueError(f"only act_fn 'silu' is supported, got {self.act_fn!r}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry {self.block_out_channels} must be divisible by "
                f"norm_num_groups {self.norm_num_groups}"
            )
        for kind in self.down_block_types:
            if kind != "DownEncoderBlock2D":
                raise ValueError(f"unsupported down block type {kind!r}")
        for kind in self.up_block_types:
            if kind != "UpDecoderBlock2D":
                raise ValueError(f"unsupported up block type {kind!r}")

    @property
    def scale_factor(self) -> int:
        """Spatial downscale of the encoder: 2 ** (number of blocks - 1), as diffusers reads it (8 for
        the released VAE; every block but the last halves the size)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SchedulerConfig(_ConfigMixin):
    """FlowMatch Euler, as configured by ``scheduler/scheduler_config.json``."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self):
        unsupported = [
            name
            for name in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                         "stochastic_sampling")
            if getattr(self, name)
        ]
        if self.shift_terminal:
            unsupported.append("shift_terminal")
        if unsupported:
            raise ValueError(f"unsupported scheduler options for Z-Image: {unsupported}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")


CONTROL_REFINER_VARIANTS = (None, "control_layers", "control_noise_refiner")


@dataclass(frozen=True)
class ControlNetConfig(_ConfigMixin):
    """Z-Image Fun-ControlNet-Union (diffusers ``ZImageControlNetModel``). Defaults are version 2.1's.

    ``add_control_noise_refiner`` names the version: None is 1.0 (the control context goes through
    its own plain refiner blocks), "control_layers" is 2.0 (the control layers also run over the
    image tokens and hint the DiT's noise refiner), "control_noise_refiner" is 2.1 (dedicated control
    refiner blocks hint the DiT's noise refiner). See ``model/controlnet.py``.
    """

    control_layers_places: tuple[int, ...] = tuple(range(0, 30, 2))
    control_refiner_layers_places: tuple[int, ...] | None = (0, 1)
    control_in_dim: int = 33
    add_control_noise_refiner: str | None = "control_noise_refiner"
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # present in the config, unused (as in the DiT)
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self):
        places = self.control_layers_places
        if not places or 0 not in places or len(set(places)) != len(places) or min(places) < 0:
            raise ValueError(f"control_layers_places must be distinct layer indices including 0, got {places}")
        if self.add_control_noise_refiner not in CONTROL_REFINER_VARIANTS:
            raise ValueError(f"add_control_noise_refiner must be one of {CONTROL_REFINER_VARIANTS}, "
                             f"got {self.add_control_noise_refiner!r}")
        refiner = self.control_refiner_layers_places
        if self.add_control_noise_refiner is not None:
            if not refiner or len(set(refiner)) != len(refiner) or min(refiner) < 0:
                raise ValueError(f"control_refiner_layers_places must be distinct refiner indices, got {refiner}")
            hinting = len(places) if self.add_control_noise_refiner == "control_layers" else self.n_refiner_layers
            if len(refiner) > hinting:
                raise ValueError(f"control_refiner_layers_places {refiner} names {len(refiner)} refiner hints "
                                 f"but the {self.add_control_noise_refiner} stage makes only {hinting}")
        if len(self.all_patch_size) != 1 or len(self.all_f_patch_size) != 1 or self.all_f_patch_size[0] != 1:
            raise ValueError(f"only one patch size with f_patch_size 1 is supported, got all_patch_size="
                             f"{self.all_patch_size}, all_f_patch_size={self.all_f_patch_size}")
        if self.control_in_dim < 1 or self.dim % self.n_heads:
            raise ValueError(f"bad control_in_dim {self.control_in_dim} or dim {self.dim} / n_heads {self.n_heads}")
        if not self.qk_norm:
            raise ValueError("qk_norm=False is not a released Z-Image configuration and is not supported")

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def version(self) -> str:
        """The published version whose layout this is: "1.0", "2.0" or "2.1"."""
        return {None: "1.0", "control_layers": "2.0", "control_noise_refiner": "2.1"}[self.add_control_noise_refiner]
