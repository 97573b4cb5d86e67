"""``zimage generate``: text-to-image from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from ..hub import DEFAULT_MODEL
from ._common import save_image_atomic, user_errors


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


@click.command()
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
@user_errors
def generate(prompt, model, output, width, height, steps, seed, guidance_scale, negative_prompt, num_images,
             device, dtype, progress):
    """Generate images from PROMPT."""
    from ..pipeline import ZImagePipeline, check_request

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


