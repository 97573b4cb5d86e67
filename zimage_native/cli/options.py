"""Options shared by ``zimage generate`` and ``zimage serve`` (each maps to one library argument)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click


def stack(*decorators):
    """Apply several click decorators as one (in the order written)."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


class UserPath(click.Path):
    """A path, with a leading ``~`` as the home folder, as the shell expands it: a path from a config
    file (``output_dir = "~/images"``) or typed in quotes reached the command as ``~/images``, and the
    images went to a new folder named ``~`` in the current one."""

    def convert(self, value, param, ctx):
        return super().convert(os.path.expanduser(value) if isinstance(value, str) else value, param, ctx)


class DtypeChoice(click.Choice):
    """A dtype flag's choices, taking the other spelling too: the short names (bf16, fp32, fp16: the
    docs' spelling) where the choices are the long ones, and the long names (bfloat16, float32,
    float16: torch's) where they are the short ones (`zimage convert --dtype`)."""

    ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            key = value.lower()
            other = self.ALIASES.get(key) or next((s for s, long in self.ALIASES.items() if long == key), None)
            if value not in self.choices and other in self.choices:
                value = other
        return super().convert(value, param, ctx)


class WholeNumber(click.types.IntParamType):
    """An integer flag whose refusal says what the flag takes (``what``) rather than only "not a valid
    integer"; a size typed as one value (--width 1024x768) names the two flags it is."""

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx):
        size = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", value) if isinstance(value, str) else None
        if size and param is not None and param.name in ("width", "height"):
            self.fail(f"{value!r} is a width and a height: give them as --width {size[1]} --height {size[2]}",
                      param, ctx)
        numbers = re.split(r"\s*[,;]\s*|\s+", value.strip()) if isinstance(value, str) else []
        if len(numbers) > 1 and all(re.fullmatch(r"-?\d+", n) for n in numbers) and param is not None and param.multiple:
            # `--seed 1,2,3` (a list as other tools take it): the flag takes its values as separate words
            self.fail(f"{value!r} is {len(numbers)} values: give them as separate words, {param.opts[-1]} "
                      f"{' '.join(numbers)}", param, ctx)
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not a whole number: {self.what}", param, ctx)


SIDE = WholeNumber("the side in pixels, a multiple of 16 (for example 1024)")


# Where the weights come from: single files, LoRA, a ControlNet, the variant, a remote text encoder.
loading = stack(
    click.option("--transformer", type=UserPath(exists=True, path_type=Path), default=None,
                 help="DiT file in any supported format (ComfyUI, all-in-one, fp8, GGUF); see docs/formats.md."),
    click.option("--vae", type=UserPath(exists=True, path_type=Path), default=None,
                 help="VAE file (e.g. ae.safetensors)."),
    click.option("--text-encoder", type=UserPath(exists=True, path_type=Path), default=None,
                 help="Qwen3 text encoder file (e.g. qwen_3_4b.safetensors, or a llama.cpp GGUF)."),
    click.option("--tokenizer", default=None,
                 help="Tokenizer folder or Hub id (default: the model's, or Z-Image-Turbo's)."),
    click.option("--lora", "loras", multiple=True,
                 help="LoRA to apply: PATH, or PATH:SCALE with SCALE a number (default 1); repeatable; fused into "
                      "the weights."),
    click.option("--controlnet", type=UserPath(exists=True, path_type=Path), default=None,
                 help="Fun-ControlNet-Union file or diffusers folder (1.0, 2.0, 2.1; docs/tasks.md), for "
                      "requests with a control image."),
    click.option("--controlnet-config", type=UserPath(exists=True, path_type=Path), default=None,
                 help="config.json overriding what is inferred from the ControlNet file."),
    click.option("--variant", type=click.Choice(["turbo", "base"]), default=None,
                 help="Step and guidance defaults (Turbo 8/0, base 50/4); detected from the model if not given."),
    click.option("--encoder-url", default=None,
                 help="Encode prompts on a remote `zimage serve` (distributed mode) instead of loading Qwen3 here."),
    click.option("--encoder-token", default=None, envvar="ZIMAGE_ENCODER_TOKEN",
                 help="Bearer token of the remote encoder [env ZIMAGE_ENCODER_TOKEN]."),
)


# Devices, dtype and CPU offload.
placement = stack(
    click.option("--device", default="auto", show_default=True,
                 help="Where the model runs: cpu, cuda, cuda:N, mps, or auto (a GPU if there is one, else the CPU)."),
    click.option("--dtype", type=DtypeChoice(["auto", "bfloat16", "float32", "float16"]), default="auto",
                 show_default=True, help="auto: bfloat16 on GPU, float32 on CPU (bf16, fp32, fp16 too)."),
    click.option("--text-encoder-device", default=None, help="Device of the text encoder (default: --device)."),
    click.option("--dit-device", default=None, help="Device of the DiT (default: --device)."),
    click.option("--vae-device", default=None, help="Device of the VAE (default: --device)."),
    click.option("--offload", type=click.Choice(["none", "text_encoder", "model", "blocks"]), default="none",
                 show_default=True,
                 help="Keep the text encoder (or every component) on the CPU except while it runs; blocks: "
                      "also stream the DiT's blocks from CPU memory. text_encoder frees the GPU between prompts "
                      "but not at the peak (it encodes beside the DiT); `zimage info MODEL` shows each "
                      "setting's peak (docs/performance.md)."),
    click.option("--text-encoder-quant", type=click.Choice(["none", "int8", "int4"]), default="none",
                 show_default=True,
                 help="Store the text encoder's weights in 8 or 4 bits (int8 per row, int4 in groups of 128): less "
                      "memory, a small error in the prompt features; none keeps them in --dtype. (Also accepted in "
                      "a config file: quantization = \"8bit\" | \"4bit\".)"),
)


# Accelerations (docs/performance.md).
speed = stack(
    click.option("--kernels", type=click.Choice(["none", "triton"]), default="none", show_default=True,
                 help="Fused Triton kernels for the DiT (a CUDA GPU with Triton installed)."),
    click.option("--attention", default=None,
                 help="Attention backend: sdpa, flash_attn_2, flash_attn_3, sage, xformers or auto "
                      "[default: $ZIMAGE_ATTENTION, else sdpa]."),
    click.option("--compile", "compile_mode", type=click.Choice(["off", "blocks", "full"]), default="off",
                 is_flag=False, flag_value="blocks", show_default=True,
                 help="Compile the DiT with torch.compile: blocks (each transformer block) or full (the whole DiT "
                      "forward as one graph); --compile alone means blocks. The first image is slower (compiling), "
                      "the ones after it faster."),
    click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
                 help="Capture the sampling loop as CUDA graphs, one per step kind and shape, replayed per step "
                      "(GPU)."),
    click.option("--graph-cache-size", type=click.IntRange(min=1), default=32, show_default=True,
                 help="At most this many CUDA graphs are kept (least recently used out); they share one memory "
                      "pool."),
    click.option("--fp8/--no-fp8", default=False, show_default=True,
                 help="Run the DiT's linear layers in 8-bit floats (float8 e4m3): less memory, lossy; on a GPU it "
                      "needs compute capability 8.9 or newer (Ada, Hopper, Blackwell)."),
    click.option("--vae-compile/--no-vae-compile", default=False, show_default=True,
                 help="Compile the VAE decode with torch.compile (its weights in channels_last); the first image is "
                      "slower (compiling)."),
)


# Tiled VAE decode and encode.
vae_tiling = stack(
    click.option("--tiled-vae/--no-tiled-vae", default=False, show_default=True,
                 help="Decode and encode images in overlapping tiles: less memory for large images (2048 pixels "
                      "a side and up)."),
    click.option("--tile-size", type=int, default=512, show_default=True,
                 help="With --tiled-vae: tile side in pixels."),
    click.option("--tile-overlap", type=int, default=64, show_default=True,
                 help="With --tiled-vae: overlap of neighbouring tiles in pixels."),
)


# The TOML config layer.
config_file = stack(
    click.option("--config", "config_path", type=UserPath(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="TOML config file ([default] plus profiles)."),
    click.option("--profile", default=None,
                 help="Profile of the config file to apply on top of [default]; without --config, of the shipped "
                      "example (h100, rtx4090, 16gb, 12gb, 8gb, low_vram; `zimage env` suggests one)."),
)
