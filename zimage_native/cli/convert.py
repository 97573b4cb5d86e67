"""``zimage convert``: change a checkpoint's layout and dtype, shard it, bake LoRAs in."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import UserError, check_writable_folder, user_errors
from .options import DtypeChoice, UserPath

LAYOUT_HELP = ("Target layout. transformer: diffusers | comfyui (= original) | native-fused; "
               "vae: diffusers | ldm (= comfyui, bfl); text encoder: transformers (= comfyui, diffusers; "
               "'model.' prefix) | bare.")


class ShardSize(click.ParamType):
    """--shard-size: text that reads as no size (``abc``, ``5XB``) is a usage error (status 2), as
    ``--steps x`` is; a size that reads but is refused (``0``) is refused when the command runs (1)."""

    name = "size"

    def convert(self, value, param, ctx):
        from ..converters.convert import SIZE_TEXT, parse_size

        try:
            parse_size(value)
        except ValueError as e:
            if not SIZE_TEXT.fullmatch(str(value).upper()):
                self.fail(str(e), param, ctx)
        return value


#: Weight file extensions of other formats: a DST ending so would be a folder (any name but .safetensors is).
OTHER_WEIGHT_SUFFIXES = (".gguf", ".sft", ".ckpt", ".pt", ".pth", ".bin")


@click.command()
@click.argument("src", type=UserPath(exists=True, path_type=Path))
@click.argument("dst", type=UserPath(path_type=Path))
@click.option("--to", "layout", required=True, help=LAYOUT_HELP)
@click.option("--component", type=click.Choice(["auto", "transformer", "vae", "text-encoder"]), default="auto",
              show_default=True, help="Which component of SRC (needed for all-in-one files).")
@click.option("--dtype", type=DtypeChoice(["keep", "fp32", "bf16", "fp16", "fp8"]), default="keep",
              show_default=True, help="Output dtype (float32, bfloat16, float16 too); fp8 = float8_e4m3fn block "
                                      "weights with per-tensor scales.")
@click.option("--shard-size", type=ShardSize(), default=None, metavar="SIZE",
              help="Split into files of at most SIZE (e.g. 5GB) with an index json; DST must be a folder.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Bake a LoRA into the transformer (repeatable); fused in fp32 before any cast or fp8.")
@click.option("--config", "config", type=UserPath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A config.json with what the shapes cannot tell (e.g. axes_dims), for the output folder's config.")
@click.option("--dry-run", is_flag=True, help="Print the key map and sizes; write nothing.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@user_errors
def convert(src, dst, layout, component, dtype, shard_size, loras, config, dry_run, force):
    """Convert SRC (a file or component folder) to DST (a .safetensors file, or a folder)."""
    from ..converters.convert import convert_checkpoint
    from ..lora import parse_lora_arg

    from .generate import check_lora_arg

    for text in loras:
        check_lora_arg(text, parse_lora_arg)
    suffix = dst.suffix.lower()
    if suffix in OTHER_WEIGHT_SUFFIXES or (suffix == ".safetensors" and dst.suffix != ".safetensors"):
        # was a folder of that name holding .safetensors (out.SafeTensors too: only '.safetensors' is a file)
        why = {".gguf": " (GGUF files are read, not written)",
               ".sft": " files, named .safetensors (an .sft file is read, not written)",
               ".safetensors": " files, named .safetensors in lower case (any other name is a folder)"}.get(suffix, "")
        raise ValueError(f"DST {dst}: convert writes safetensors{why}: give a .safetensors file "
                         f"({dst.with_suffix('.safetensors')}) or a folder (a name without a file extension)")
    if not dry_run:  # refused now, not after reading and converting gigabytes
        check_writable_folder(dst.parent, "DST")
    try:
        plan = convert_checkpoint(src, dst, layout, component=None if component == "auto" else component,
                                  dtype=dtype, shard_size=shard_size, loras=[parse_lora_arg(t) for t in loras],
                                  config=config, force=force, dry_run=dry_run)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    if dry_run:
        click.echo("\n".join(plan.lines()))
        return
    from ..devices import format_bytes

    click.echo(f"wrote {dst} ({plan.component}, {plan.dst_layout}, {len(plan.tensors)} tensors, "
               f"{format_bytes(plan.total_bytes)} in {len(plan.shards)} file(s))")
