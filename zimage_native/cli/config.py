"""TOML configuration with profiles, below the command-line flags.

A config file holds a ``[default]`` table and any number of profile tables (``[h100]``,
``[low_vram]``, ...). Keys are the flag names with underscores (``guidance_scale`` for
``--guidance-scale``); sub-tables such as ``[default.generation]`` only group keys. The values of
``--profile NAME`` are applied on top of ``[default]``. Precedence: built-in defaults < config
(default, then profile) < values from ``--from-image`` < flags given on the command line.

An unknown key or a value of the wrong type raises an error that names the file, the table and
the key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ALIASES = {"model_path": "model", "attention_backend": "attention", "quantization": "text_encoder_quant"}  # the predecessor's names
VALUE_ALIASES = {"text_encoder_quant": {"8bit": "int8", "4bit": "int4"}}  # its quantization = "8bit" | "4bit"
NOT_CONFIGURABLE = {"config", "profile", "prompt", "from_image"}


def _flatten(table: dict[str, Any], where: str, out: dict[str, tuple[Any, str]]) -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, f"{where}.{key}", out)
        else:
            name = ALIASES.get(key, key)
            if isinstance(value, str):
                value = VALUE_ALIASES.get(name, {}).get(value, value)
            out[name] = (value, f"{where}.{key}")


def read_profile(path: Path, profile: str | None) -> dict[str, tuple[Any, str]]:
    """Key -> (value, where it came from) for [default] plus the profile (profile wins)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None
    values: dict[str, tuple[Any, str]] = {}
    _flatten(data.get("default", {}), f"{path}: [default]", values)
    if profile and profile != "default":
        if profile not in data:
            tables = sorted(k for k, v in data.items() if isinstance(v, dict))
            raise ValueError(f"{path}: no profile [{profile}]; the file has {tables}")
        _flatten(data[profile], f"{path}: [{profile}]", values)
    return values


def _matches(kind: click.ParamType, value: Any) -> bool:
    """TOML values must have the flag's type: no silent int(1.5) or str(3)."""
    if isinstance(value, bool):
        return isinstance(kind, click.types.BoolParamType)
    if isinstance(kind, click.types.IntParamType):
        return isinstance(value, int)
    if isinstance(kind, click.types.FloatParamType):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def convert(ctx: click.Context, values: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """Check each key against the command's parameters and convert it with the flag's own type."""
    params = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    out = {}
    for key, (value, where) in values.items():
        if key in NOT_CONFIGURABLE or key not in params:
            raise ValueError(f"{where}: unknown key '{key}' for `zimage {ctx.command.name}`")
        param = params[key]
        if param.is_flag and not isinstance(value, bool):
            raise ValueError(f"{where}: '{key}' must be true or false, got {value!r}")
        if param.multiple and not isinstance(value, list):
            value = [value]
        if isinstance(value, (dict,)):
            raise ValueError(f"{where}: '{key}' must be a single value")
        items = value if param.multiple else [value]
        if not param.is_flag and any(not _matches(param.type, v) for v in items):
            raise ValueError(f"{where}: '{key}' has the wrong type: got {value!r}, expected {param.type.name}")
        try:
            out[key] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise ValueError(f"{where}: '{key}' has the wrong type or value: {e.message}") from None
    return out


def apply_layers(ctx: click.Context, kwargs: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """Fill every parameter that was not given on the command line from the layers (later wins)."""
    merged = dict(kwargs)
    for layer in layers:
        for key, value in layer.items():
            if key in merged and ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
                merged[key] = value
    return merged
