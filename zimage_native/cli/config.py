"""TOML configuration with profiles, below the command-line flags.

A config file holds a ``[default]`` table and any number of profile tables (``[h100]``,
``[low_vram]``, ...). Keys are the flag names with underscores (``guidance_scale`` for
``--guidance-scale``); sub-tables such as ``[default.generation]`` only group keys. The values of
``--profile NAME`` are applied on top of ``[default]``. Precedence: built-in defaults < config
(default, then profile) < values from ``--from-image`` < flags given on the command line.

An unknown key (with the closest key name, for a typo) or a value of the wrong type raises an
error that names the file, the table and the key.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ._common import UserError, _is_user_error, read_user_text, user_message

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The predecessor's config.toml (docs/cli.md, "Coming from the predecessor"): its key names, its values
# for text_encoder_quant, and the keys of its sub-tables whose meaning depends on the sub-table:
# (sub-table, key) -> (key here, value here for its value; None sets nothing).
ALIASES = {"model_path": "model", "attention_backend": "attention", "quantization": "text_encoder_quant"}
VALUE_ALIASES = {"text_encoder_quant": {"8bit": "int8", "4bit": "int4"}}  # its quantization = "8bit" | "4bit"


def _switch(on: str, off: str | None = None):
    """A true/false key of the predecessor as a value here (other values pass through, to be checked)."""
    return lambda v: on if v is True else off if v is False else v


TABLE_KEYS = {
    ("encoder", "device"): ("text_encoder_device", lambda v: v),
    ("encoder", "torch_dtype"): ("dtype", lambda v: v),
    ("encoder", "cpu_offload"): ("offload", _switch("text_encoder")),
    ("optimization", "cpu_offload"): ("offload", _switch("model")),
    ("optimization", "flash_attn"): ("attention", _switch("flash_attn_2")),
    ("optimization", "compile"): ("compile", _switch("blocks", "off")),
    ("pytorch", "use_custom_scheduler"): ("use_custom_scheduler", lambda v: None),  # always: the engine's own
}
NOT_CONFIGURABLE = {"config", "config_path", "profile", "prompt", "from_image"}
#: Parameters whose values are secrets: a refusal's note names where they were set, never the value.
SECRET_NAMES = {"token", "encoder_token"}
#: The example config shipped with the package: ``--profile NAME`` without ``--config`` reads it.
EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "config.example.toml"


def config_source(config_path: Path | None, profile: str | None) -> Path | None:
    """The config file to read: the one given, or for ``--profile`` alone the shipped example."""
    return EXAMPLE_CONFIG if config_path is None and profile else config_path


def _flatten(table: dict[str, Any], where: str, out: dict[str, tuple[Any, str]], sub: str = "") -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, f"{where}.{key}", out, key)
            continue
        if sub == "lora" and key in ("paths", "scales"):
            continue  # below: the predecessor's [lora] paths and scales
        name, translate = TABLE_KEYS.get((sub, key), (ALIASES.get(key, key), None))
        if translate is not None:
            value = translate(value)
            if value is None:
                continue
        if isinstance(value, str):
            value = VALUE_ALIASES.get(name, {}).get(value, value)
        out[name] = (value, f"{where}.{key}")
    if sub == "lora" and table.get("paths"):
        paths, scales = table["paths"], table.get("scales") or []
        if not isinstance(paths, list) or not isinstance(scales, list) or (scales and len(scales) != len(paths)):
            raise ValueError(f"{where}: paths must be a list and scales a list of the same length, got {paths!r} "
                             f"and {scales!r}")
        out["lora"] = ([f"{p}:{s}" for p, s in zip(paths, scales)] if scales else list(paths), f"{where}.paths")


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """Config key -> option: the flag's name with underscores (``compile`` for ``--compile``), and the
    parameter's own name where it differs (``compile_mode``)."""
    keys: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            keys[param.name] = param
            for opt in param.opts:
                if opt.startswith("--"):
                    keys.setdefault(opt[2:].replace("-", "_"), param)
    return keys


#: Windows paths in TOML's "..." strings: each backslash starts an escape ("\\n" a newline, "\\t" a tab).
BACKSLASH_HINT = ("in a TOML \"...\" string a backslash starts an escape: write Windows paths with forward slashes "
                  "(\"C:/models/z.gguf\") or in single quotes ('C:\\models\\z.gguf')")

#: Options that take paths (or Hub ids) as plain strings.
PATH_NAMES = ("model", "tokenizer", "loras")


def read_profile(path: Path, profile: str | None) -> dict[str, tuple[Any, str]]:
    """Key -> (value, where it came from) for [default] plus the profile (profile wins)."""
    try:
        data = tomllib.loads(read_user_text(Path(path), "config file"))
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        hint = f"; {BACKSLASH_HINT}" if str(e).startswith(("Unescaped '\\'", "Invalid hex value")) else ""
        raise ValueError(f"{path}: invalid TOML ({e}){hint}") from None
    loose = [key for key, value in data.items() if not isinstance(value, dict)]
    if loose:  # TOML puts keys above the first [table] at the top level, which no profile reads
        raise ValueError(f"{path}: '{loose[0]}' is not in a table; put it under [default] (always applied) or "
                         f"under a [profile] (applied with --profile)")
    values: dict[str, tuple[Any, str]] = {}
    _flatten(data.get("default", {}), f"{path}: [default]", values)
    # [default] is no profile (it always applies), though `--profile default` is accepted: [default] alone.
    if profile and profile != "default":
        if profile not in data:
            profiles = sorted(k for k, v in data.items() if isinstance(v, dict) and k != "default")
            which = f"its profiles are {', '.join(profiles)}" if profiles else "it has no profiles, only [default]"
            folded = {name.casefold(): name for name in profiles}  # both sides: [RTX4090] for rtx4090 too
            # rtx4900, 12GB, lowvram; not a100 for h100 (0.75); a swapped pair (fats, 0.75) by its own test
            close = (difflib.get_close_matches(profile.casefold(), folded, n=1, cutoff=0.8)
                     or [name for name in folded if _one_swap(profile.casefold(), name)][:1])
            hint = f"; did you mean '{folded[close[0]]}'?" if close else ""
            raise ValueError(f"{path}: no profile [{profile}]; {which}{hint}")
        _flatten(data[profile], f"{path}: [{profile}]", values)
    return values


def _one_swap(typed: str, name: str) -> bool:
    """Whether ``name`` is ``typed`` with one pair of neighbouring characters swapped (fats: fast)."""
    return len(typed) == len(name) and any(typed[:i] + typed[i + 1] + typed[i] + typed[i + 2:] == name
                                           for i in range(len(typed) - 1))


def _matches(kind: click.ParamType, value: Any) -> bool:
    """TOML values must have the flag's type: no silent int(1.5) or str(3)."""
    if isinstance(value, bool):
        return isinstance(kind, click.types.BoolParamType)
    if isinstance(kind, click.types.IntParamType):
        return isinstance(value, int)
    if isinstance(kind, click.types.FloatParamType):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def serve_keys() -> dict[str, click.Option]:
    """The config keys of `zimage serve` (for the hint when `zimage generate` meets one)."""
    from . import main

    return option_keys(main.commands["serve"])


def convert(ctx: click.Context, values: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """Check each key against the command's parameters and convert it with the flag's own type. A key
    whose flag is given on the command line is only checked to exist: the flag replaces its value
    (a profile's GGUF path that is not there, with --transformer given, is no error)."""
    params = option_keys(ctx.command)
    keys = sorted(k for k, p in params.items() if k not in NOT_CONFIGURABLE and p.name not in NOT_CONFIGURABLE)
    out = {}
    for key, (value, where) in values.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            if ctx.command.name == "generate" and key in serve_keys():
                hint = ("; it is a `zimage serve` key: put it in a profile that only `zimage serve` reads "
                        "(zimage serve --profile NAME)")
            raise ValueError(f"{where}: unknown key '{key}' for `zimage {ctx.command.name}`{hint}")
        param = params[key]
        if ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            continue
        if param.is_flag and not isinstance(value, bool):
            raise ValueError(f"{where}: '{key}' must be true or false, got {value!r}")
        if param.multiple and not isinstance(value, list):
            value = [value]
        if isinstance(value, (dict,)):
            raise ValueError(f"{where}: '{key}' must be a single value")
        items = value if param.multiple else [value]
        is_path = isinstance(param.type, click.Path) or param.name in PATH_NAMES
        if is_path and any(isinstance(v, str) and set(v) & set("\t\n\r\b\f") for v in items):
            raise ValueError(f"{where}: '{key}' holds a control character ({value!r}): {BACKSLASH_HINT}")
        if not param.is_flag and any(not _matches(param.type, v) for v in items):
            raise ValueError(f"{where}: '{key}' has the wrong type: got {value!r}, expected {param.type.name}")
        try:
            out[param.name] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            message = e.message.rstrip(".")
            if "does not exist" not in message:
                raise ValueError(f"{where}: '{key}' has the wrong type or value: {message}") from None
            hint = ""
            if param.name == "transformer" and str(value).lower().endswith(".gguf"):
                hint = "; download a GGUF DiT there, for example from jayn7/Z-Image-Turbo-GGUF on the Hugging Face Hub"
            elif param.name == "text_encoder" and str(value).lower().endswith(".gguf"):
                hint = ("; download a GGUF of Qwen3-4B there (a llama.cpp file, architecture qwen3), for example from "
                        "Qwen/Qwen3-4B-GGUF on the Hugging Face Hub")
            raise ValueError(f"{where}: {message} (relative paths are read from the current folder, {Path.cwd()}; "
                             f"--{param.name.replace('_', '-')} on the command line replaces it){hint}") from None
    return out


def apply_layers(ctx: click.Context, kwargs: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """Fill every parameter that was not given on the command line from the layers (later wins)."""
    merged = dict(kwargs)
    for layer in layers:
        for key, value in layer.items():
            if key in merged and ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
                merged[key] = value
    return merged


def config_origins(ctx: click.Context, values: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """Parameter name -> (config value, where it came from) for the config keys in effect: those whose
    flag was not given on the command line (the layers above the config, --from-image, are the
    caller's to drop)."""
    params = option_keys(ctx.command)
    out = {}
    for key, (value, where) in values.items():
        param = params.get(key)  # in effect where apply_layers used it: not a flag typed, nor an environment variable
        if param is not None and ctx.get_parameter_source(param.name) in (ParameterSource.DEFAULT,
                                                                          ParameterSource.DEFAULT_MAP):
            out[param.name] = (value, where)
    return out


def _override_hint(param: click.Option, value: Any) -> str:
    """How to replace a config value on the command line: the flag with its built-in default (the
    off form of a switch), or another value."""
    flag = next(o for o in param.opts if o.startswith("--"))
    if param.is_flag:
        off = [o for o in param.secondary_opts if o.startswith("--")]
        return off[0] if value is True and off else f"{flag}" if value is False else ""
    if param.default is not None and not param.multiple:
        return f"{flag} {param.default}"
    return f"another {flag}"


def origin_note(ctx: click.Context, origins: dict[str, tuple[Any, str]], message: str) -> str:
    """For each flag that ``message`` names whose value came from the config file: where it was set
    (the file, the table, the key) and what to do instead; empty when there is none."""
    params = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    notes = []
    for name, (value, where) in origins.items():
        param = params.get(name)
        if param is None:
            continue
        flags = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
        if not any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", message) for f in flags):
            continue
        path, _, table = where.rpartition(": [")
        table_name = table.split("]", 1)[0]
        hint = _override_hint(param, value)
        shown = f"{flags[0]}=(a secret, not shown)" if param.name in SECRET_NAMES else f"{flags[0]}={value!r}"
        if table_name == "default":
            edit = ("pass a copy of it without that key with --config" if Path(path) == EXAMPLE_CONFIG else
                    f"edit {path}")
            fix = f"give {hint} on the command line to override it, or {edit}" if hint else edit
            notes.append(f"{shown} comes from the config's [default] table ([{table} in {path}, "
                         f"applied to every run): {fix}")
        else:
            fix = f"give {hint} on the command line to override it, or pick" if hint else "pick"
            notes.append(f"{shown} comes from profile {table_name} ([{table} in {path}): {fix} "
                         f"another profile")
    return "; ".join(notes)


@contextlib.contextmanager
def naming_config_origins(ctx: click.Context, origins: dict[str, tuple[Any, str]]):
    """Input errors raised inside that name a flag set by the config file (a profile or [default])
    say where it was set and how to override it: `--profile 8gb --fp8` is refused because of the
    profile's offload = "blocks", which the user did not type."""
    try:
        yield
    except Exception as e:
        if isinstance(e, UserError) or not _is_user_error(e) or not origins:
            raise
        message = user_message(e)
        note = origin_note(ctx, origins, message)
        if not note:
            raise
        raise UserError(f"{message} ({note})") from None
