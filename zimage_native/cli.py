"""The ``zimage`` command line: a thin layer over the library.

Each flag maps to one argument of ``ZImagePipeline.from_pretrained`` or ``ZImagePipeline.__call__``.
Bad input exits non-zero with a one-line message (no traceback); images are written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from .hub import DEFAULT_MODEL


class UserError(click.ClickException):
    """Printed as one line, exit status 1 (click's convention for usage errors is 2)."""


def _user_errors(fn):
    """Turn the library's input errors into one-line CLI errors."""
    import functools

    from .loading import StateDictMismatchError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, StateDictMismatchError) as e:
            raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


def save_image_atomic(image, path: Path) -> None:
    """Write a PNG next to its destination, then rename: no partial or empty file on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zimage-native")
@click.option("-v", "--verbose", is_flag=True, help="Log what the engine does.")
def main(verbose: bool) -> None:
    """zimage: fast, PyTorch-native Z-Image text-to-image."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("prompt")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model folder (diffusers layout) or Hub id.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("zimage.png"),
              show_default=True, help="PNG to write; with several images, NAME_0.png, NAME_1.png, ...")
@click.option("--width", type=int, default=1024, show_default=True, help="Multiple of 16.")
@click.option("--height", type=int, default=1024, show_default=True, help="Multiple of 16.")
@click.option("--steps", type=int, default=8, show_default=True, help="Number of DiT forwards.")
@click.option("--seed", type=int, default=None, help="Noise seed (random if not given; printed).")
@click.option("--guidance-scale", type=float, default=0.0, show_default=True, help="CFG scale; 0 turns CFG off.")
@click.option("--negative-prompt", default=None, help="Negative prompt (used when --guidance-scale > 0).")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images for the prompt.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar over steps.")
@_user_errors
def generate(prompt, model, output, width, height, steps, seed, guidance_scale, negative_prompt, num_images,
             device, dtype, progress):
    """Generate images from PROMPT."""
    from .pipeline import ZImagePipeline, check_request

    # Refuse bad input before spending minutes loading weights.
    check_request(prompt, width, height, steps, seed, None, guidance_scale, num_images)
    if output.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {output}")
    pipe = ZImagePipeline.from_pretrained(model, device=device, dtype=dtype)
    result = pipe(prompt, width=width, height=height, num_inference_steps=steps, seed=seed,
                  guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                  num_images_per_prompt=num_images, progress=progress)
    for image, path in zip(result.images, output_paths(output, len(result.images))):
        save_image_atomic(image, path)
        click.echo(f"wrote {path}")
    if seed is None and result.seeds:
        click.echo(f"seed {result.seeds[0]}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def info(path: Path, as_json: bool):
    """Show the components of a model folder: class, dtypes, tensors and parameters."""
    from .hub import check_model_folder
    from .loading import inspect_weights

    check_model_folder(path)
    report = {}
    for name in ("transformer", "vae", "text_encoder"):
        config = json.loads((path / name / "config.json").read_text())
        kind = config.get("_class_name") or ",".join(config.get("architectures", [])) or config.get("model_type", "?")
        report[name] = {"class": kind, **inspect_weights(path / name)}
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    report["scheduler"] = {"class": scheduler.get("_class_name", "?"), "shift": scheduler.get("shift")}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{path}")
    for name in ("transformer", "vae", "text_encoder"):
        r = report[name]
        dtypes = ", ".join(f"{k} {v:,}" for k, v in sorted(r["dtypes"].items()))
        click.echo(f"  {name:<13} {r['class']:<28} {r['parameters']:>15,} params  {r['tensors']:>5} tensors  "
                   f"{r['files']} file(s)  [{dtypes}]")
    click.echo(f"  {'scheduler':<13} {report['scheduler']['class']:<28} shift {report['scheduler']['shift']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
