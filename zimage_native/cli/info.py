"""``zimage info``: what a model folder, component folder or single file holds, read from headers only
(but the one tensor of a ControlNet 2.x file that tells 2.0 from 2.1)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import user_errors
from .options import DtypeChoice, UserPath

COMPONENTS = ("transformer", "vae", "text_encoder")


def _folder_report(path: Path, dtype: str) -> dict:
    from ..config import read_json
    from ..formats import detect_format
    from ..hub import check_model_folder
    from ..loading import inspect_weights

    check_model_folder(path)
    report = {}
    for name in COMPONENTS:
        config = read_json(path / name / "config.json")
        kind = config.get("_class_name") or ",".join(config.get("architectures", [])) or config.get("model_type", "?")
        report[name] = {"class": kind, **inspect_weights(path / name)}
        fmt = detect_format(path / name)
        found = [c for c in fmt.components if c.component == name]
        report[name]["layout"] = found[0].layout if found else None
        report[name]["quantization"] = found[0].quantization if found else None
        if fmt.problem:
            report[name]["problem"] = fmt.problem
    scheduler = read_json(path / "scheduler" / "scheduler_config.json")
    report["scheduler"] = {"class": scheduler.get("_class_name", "?"), "shift": scheduler.get("shift")}
    report[f"gpu_weights_{dtype}"] = dict(_peaks(path, dtype))
    return report


def _peaks(path: Path, dtype: str) -> list[tuple[str, int]]:
    """Peak bytes of weights in ``dtype`` on one GPU, per offload / text encoder setting (from the configs)."""
    import torch

    from ..loading import setting_peaks

    gpu = torch.device("cuda")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return setting_peaks(path, [], torch_dtype, dict.fromkeys(COMPONENTS, gpu), gpu)


IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")  # PNG, JPEG, WebP


def _image_info(path: Path, as_json: bool) -> None:
    """An image: the request recorded in a PNG written by zimage (read_metadata says what is missing)."""
    from ..metadata import parameters_text, read_metadata

    record = read_metadata(path)
    if as_json:
        click.echo(json.dumps(record, indent=2, ensure_ascii=False))
        return
    click.echo(f"{path}  (image written by zimage-native {record.get('version', '?')})")
    for line in parameters_text(record).splitlines():
        click.echo(f"  {line}")
    click.echo(f"  re-run it: zimage generate --from-image {path}")


def _missing_tensors(path: Path) -> list[str]:
    """Why the DiT or text encoder of ``path`` cannot load from its header's keys (tensors of the
    model missing, others there): what load_component refuses before reading a weight."""
    from ..formats import describe

    model = path.is_dir() and (path / "model_index.json").is_file()
    reports = [describe(path / name) for name in COMPONENTS] if model else [describe(path)]
    return [c["cannot_load"] for r in reports for c in r.get("components", {}).values() if "cannot_load" in c]


def _check(path: Path, as_json: bool) -> None:
    """``--check``: every tensor's values read; exit status 1 if any holds NaN or inf, or if the DiT or
    text encoder lacks tensors (or holds others)."""
    import sys

    from ..formats.scan import scan_nonfinite

    report = scan_nonfinite(path, progress=not as_json and sys.stderr.isatty())
    cannot_load = _missing_tensors(path)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "cannot_load": cannot_load}, indent=2))
    else:
        click.echo(f"{path}: read {report.tensors} floating-point tensors ({report.values:,} values)")
        if report.unread:
            types: dict[str, int] = {}
            for qtype in report.unread.values():
                types[qtype] = types.get(qtype, 0) + 1
            click.echo(f"  not read: {len(report.unread)} tensor(s) of GGML types this engine does not dequantise "
                       f"({', '.join(f'{q} {n}' for q, n in sorted(types.items()))}), e.g. {next(iter(report.unread))}")
        for b in report.bad:
            click.echo(f"  {b.name}: {b.nan:,} NaN, {b.inf:,} infinite of {b.numel:,} values")
        click.echo(f"  {len(report.bad)} tensor(s) hold NaN or infinite values: the file is damaged, or the model "
                   "it holds diverged" if report.bad else f"  all values {'read ' if report.unread else ''}are finite")
        for message in cannot_load:
            click.echo(f"  cannot load: {message}")
    if report.bad or cannot_load:
        sys.exit(1)


def _dtypes(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items()))


def _dit_weight_lines(w: dict, dtype: str) -> list[str]:
    """The DiT's weights on the GPU in ``dtype``, layer by layer from the header (footprint.dit_file_summary)."""
    from ..devices import format_bytes

    def sizes(entry: dict) -> str:
        return (f"{format_bytes(entry['resident'])} all resident, {format_bytes(entry['offload_blocks'])} "
                f"with --offload blocks")

    formats = ", ".join(f"{fmt} {e['tensors']} {'tensor' if fmt == dtype else 'linear'}{'s' * (e['tensors'] != 1)} "
                        f"{format_bytes(e['bytes'])}" for fmt, e in w["formats"].items())
    head = f"GPU weights in {dtype}, each layer in the format it is kept in (activations come on top)"
    if "dequantised" not in w:
        return [f"{head}: {sizes(w)}", f"  {formats}"]
    return [f"{head}:", f"  quantised layers kept (on the CPU, with --offload blocks, or on a GPU where the "
                        f"dequantised DiT would not fit): {sizes(w)}", f"    {formats}",
            f"  dequantised while loading (keep_fp8=False, or on a GPU where it fits): {sizes(w['dequantised'])}"]


def _text_encoder_weight_lines(w: dict, dtype: str) -> list[str]:
    """The text encoder's weights in ``dtype``, layer by layer from the header (footprint.text_encoder_file_summary)."""
    from ..devices import format_bytes

    formats = ", ".join(f"{fmt} {e['tensors']} {'tensor' if fmt == dtype else 'weight'}{'s' * (e['tensors'] != 1)} "
                        f"{format_bytes(e['bytes'])}" for fmt, e in w["formats"].items())
    quant = ", ".join(f"{format_bytes(b)} with --text-encoder-quant {q}" for q, b in w["text_encoder_quant"].items())
    return [f"GPU weights in {dtype} (the layers loaded; each in the format it is kept in; activations come on top): "
            f"{format_bytes(w['resident'])}" + (f"; {quant}" if quant else ""),
            f"  {formats}, RoPE table (fp32) {format_bytes(w['rope_table'])}"]


def _vae_weight_lines(w: dict, dtype: str) -> list[str]:
    from ..devices import format_bytes

    return [f"GPU weights in {dtype} (activations come on top): {format_bytes(w['resident'])}"]


def _config_line(component: str, cfg: dict) -> str:
    keys = {"transformer": ("dim", "n_layers", "n_refiner_layers", "n_heads", "cap_feat_dim", "in_channels"),
            "vae": ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"),
            "text_encoder": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                             "head_dim", "vocab_size")}[component]
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def check_weights_folder(path: Path) -> None:
    """A folder that is neither a model folder nor a component folder (no config.json, no weight file
    of a known name, no LoRA save) is refused with the weight files it holds; the library would take
    its one .safetensors file, whatever it is (``zimage info /tmp`` named a stray broken file)."""
    from ..formats.checkpoint import WEIGHT_FILE_NAMES, WEIGHT_INDEX_NAMES

    known = ("config.json", "pytorch_lora_weights.safetensors", *WEIGHT_FILE_NAMES, *WEIGHT_INDEX_NAMES)
    if any((path / name).is_file() for name in known):
        return
    files = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".gguf") and p.is_file())
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    hint = f"; to read one file, give it: zimage info {path / files[0]} (here: {shown})" if files else ""
    raise ValueError(f"{path} is not a model folder (no model_index.json) nor a component folder (no config.json "
                     f"or weights file); give a model folder, a component folder such as MODEL/transformer, or a "
                     f"file{hint}")


@click.command()
@click.argument("path", type=UserPath(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--check", is_flag=True,
              help="Instead: read every tensor and list those holding NaN or infinite values (exit status 1 if any).")
@click.option("--dtype", type=DtypeChoice(["bf16", "fp16", "fp32"]), default=None,
              help="The dtype the weight figures assume for the layers not kept packed (fp32: generate's default "
                   "on the CPU; bfloat16, float16, float32 too) [default: bf16, a GPU's].")
@user_errors
def info(path: Path, as_json: bool, check: bool, dtype: str | None):
    """Show what PATH holds (a model folder, a component folder or a single file): detected format,
    components, layout, quantisation, dtypes, tensors and parameters. Reads headers only (and, of a
    ControlNet 2.x file, the one tensor that tells 2.0 from 2.1). For an image written by zimage: the
    request it records."""
    is_image = False
    if path.is_file():
        with path.open("rb") as f:
            is_image = f.read(8).startswith(IMAGE_MAGIC)
    if path.is_dir() and not (path / "model_index.json").is_file():
        check_weights_folder(path)
    if dtype is not None and (check or is_image):
        raise ValueError(f"--dtype sets the dtype of the weight figures, which {'--check' if check else 'an image'} "
                         f"does not show; leave it out")
    dtype_given, dtype = dtype is not None, dtype or "bf16"
    if check:
        if is_image:
            raise ValueError(f"--check reads model weights; {path} is an image")
        return _check(path, as_json)
    if is_image:
        return _image_info(path, as_json)
    if path.is_dir() and (path / "model_index.json").is_file():
        report = _folder_report(path, dtype)
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        click.echo(f"{path}  (diffusers model folder)")
        for name in COMPONENTS:
            r = report[name]
            quant = f" {r['quantization']}" if r.get("quantization") else ""
            click.echo(f"  {name:<13} {r['class']:<28} {r['parameters']:>15,} params  {r['tensors']:>5} tensors  "
                       f"{r['files']} file(s)  {r.get('layout')}{quant}  [{_dtypes(r['dtypes'])}]")
        click.echo(f"  {'scheduler':<13} {report['scheduler']['class']:<28} shift {report['scheduler']['shift']}")
        from ..devices import format_bytes

        click.echo(f"  GPU weights at the peak in {dtype} (activations come on top; docs/performance.md, Low VRAM):")
        for flags, peak in report[f"gpu_weights_{dtype}"].items():
            click.echo(f"    {flags:<45} {format_bytes(peak):>10}")
        return
    from ..formats import describe

    report = describe(path)
    for c in report.get("components", {}).values():  # the config a file needs, said in the command line's words
        if "config_error_cli" in c:
            c["config_error"] = c.pop("config_error_cli")
    figured = [name for name in ("transformer", "text_encoder", "vae") if name in report.get("components", {})]
    if dtype_given and not figured:  # a LoRA, a ControlNet
        what = "a LoRA" if "lora" in report else "a ControlNet" if "controlnet" in report else "this file"
        raise ValueError(f"--dtype sets the dtype of the weight figures, which {what} does not show (a model "
                         f"folder, a DiT, a text encoder or a VAE does); leave it out")
    from ..footprint import dit_file_summary, text_encoder_file_summary, vae_file_bytes

    # the VAE's weights in dtype (every tensor is cast to it): the figure the load's GPU check counts for it
    vae_summary = lambda path, dtype: {"resident": vae_file_bytes(path, dtype)}  # noqa: E731
    for name, summary in (("transformer", dit_file_summary), ("text_encoder", text_encoder_file_summary),
                          ("vae", vae_summary)):
        c = report.get("components", {}).get(name)
        if c and "config" in c and "cannot_load" not in c and "problem" not in report:
            c[f"gpu_weights_{dtype}"] = summary(path, dtype)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"{path}  ({report['container']}, {report['kind']})")
    if "lora" in report:
        lora = report["lora"]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(lora["kinds"].items()))
        click.echo(f"  LoRA: {lora['modules']} modules ({kinds}); family: {lora['family']}")
        if lora["foreign"]:
            click.echo(f"  not for Z-Image: {lora['foreign']}")
        if lora["text_encoder_keys"]:
            click.echo(f"  {lora['text_encoder_keys']} keys for the Qwen3 text encoder: not applied (LoRAs are "
                       f"applied to the DiT only)")
        click.echo(f"  {report['tensors']} tensors, {report['parameters']:,} params")
        return
    if "controlnet" in report:
        cn = report["controlnet"]
        if "error" in cn:
            click.echo(f"  ControlNet: {cn['error']}")
        else:
            from ..devices import format_bytes

            click.echo(f"  ControlNet-Union {cn['version']}: {len(cn['control_layers_places'])} control layers at DiT "
                       f"layers {cn['control_layers_places']}, control input {cn['control_in_dim']} channels; "
                       f"{cn['tensors']} tensors, {cn['parameters']:,} params, {format_bytes(cn['bytes'])}")
            kept = cn["kept"]
            if kept["tensors"] != cn["tensors"]:  # 2.0 with its untrained refiner blocks (before_proj all zeros)
                click.echo(f"  loads {kept['tensors']} tensors, {kept['parameters']:,} params, "
                           f"{format_bytes(kept['bytes'])} as stored: its {cn['tensors'] - kept['tensors']} "
                           f"control_noise_refiner tensors are untrained (before_proj all zeros) and dropped")
            click.echo("  use it with pipe.load_controlnet(PATH) or zimage generate --controlnet PATH")
        return
    for name, c in report.get("components", {}).items():
        prefix = f" prefix '{c['prefix']}'" if c["prefix"] else ""
        quant = c["quantization"] or "not quantised"
        click.echo(f"  {name:<13} {c['layout']:<13} {quant:<14} {c['parameters']:>15,} params  {c['tensors']:>5} "
                   f"tensors{prefix}  [{_dtypes(c['dtypes'])}]")
        if "comfy_quant" in c:
            formats = ", ".join(f"{fmt} {n} layers" for fmt, n in c["comfy_quant"].items())
            click.echo(f"  {'':<13} comfy_quant formats: {formats} (the other linears unquantised)")
        if "gguf_types" in c:
            types = ", ".join(f"{q} {e['tensors']} tensors {e['bytes']:,} bytes"
                              for q, e in sorted(c["gguf_types"].items(), key=lambda kv: -kv[1]["bytes"]))
            click.echo(f"  {'':<13} GGUF types: {types}; {c['bytes']:,} bytes in all")
        if "config" in c:
            click.echo(f"  {'':<13} {_config_line(name, c['config'])}")
        else:
            click.echo(f"  {'':<13} config: {c['config_error']}")
        if f"gpu_weights_{dtype}" in c:
            lines = {"transformer": _dit_weight_lines, "text_encoder": _text_encoder_weight_lines,
                     "vae": _vae_weight_lines}[name]
            for line in lines(c[f"gpu_weights_{dtype}"], dtype):
                click.echo(f"  {'':<13} {line}")
    if report.get("foreign"):
        click.echo(f"  not for Z-Image: {report['foreign']}")
    if report.get("problem"):
        click.echo(f"  cannot load: {report['problem']}")
