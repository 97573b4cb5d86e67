"""``zimage generate``: text-to-image, img2img (``--image``) and inpainting (``--image`` + ``--mask``);
with ``--controlnet FILE --control-image POSE.png``, ControlNet (and ControlNet inpainting with
``--image`` + ``--mask``).

Every flag maps to one argument of ``ZImagePipeline.from_pretrained`` or of the call; the
``--config``/``--profile`` TOML layer and ``--from-image`` metadata sit below the flags.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import click

from ..hub import DEFAULT_MODEL
from . import PromptCommand
from .options import SIDE, UserPath, WholeNumber, config_file, loading, placement, speed, vae_tiling
from ._common import UsageLine, check_writable_folder, read_user_text, save_image_atomic, user_errors
from .config import apply_layers, config_origins, config_source, convert, naming_config_origins, read_profile

DEFAULT_PATTERN = "zimage-{index:03d}-{seed}.png"


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def output_paths(jobs: list[tuple[int, str, int]], output: Path | None, output_dir: Path | None,
                 pattern: str) -> list[Path]:
    """One path per (prompt_index, prompt, seed) job: ``-o`` for a single image, else names with index and seed."""
    if output is not None and len(jobs) == 1:
        return [output]
    if output is not None:
        return [output.with_name(f"{output.stem}_{i}_{seed}{output.suffix}") for i, (_, _, seed) in enumerate(jobs)]
    folder = output_dir or Path(".")
    try:
        names = [pattern.format(index=i, seed=seed, prompt_index=pi, slug=_slug(p))
                 for i, (pi, p, seed) in enumerate(jobs)]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"bad --name-pattern {pattern!r}: fields are index, seed, prompt_index, slug ({e})") from None
    if len(set(names)) != len(names):
        raise ValueError(f"--name-pattern {pattern!r} gives the same name to several images; include {{index}}")
    return [folder / (n if n.lower().endswith(".png") else n + ".png") for n in names]


def png_hint(output: Path) -> str:
    """What to give for an ``-o`` that is not a .png: the same name as a .png, and for a name without
    an extension (``-o out/`` reaches here as ``out``), ``--output-dir`` too, which is what a folder is."""
    if output.suffix:
        return f"-o {output.with_suffix('.png')}"
    return f"-o {output.with_name(output.name.rstrip('.') + '.png')}, or --output-dir {output} for a folder"


def resolve_seeds(seed: tuple[int, ...], seeds: int | None, num_images: int) -> tuple[list[int], bool]:
    """The seed of each image of a prompt, and whether they were drawn at random (then printed)."""
    if seeds is not None and seeds < 1:  # before the check below, where --seeds 0 read as not given
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if seed and seeds is not None:
        raise ValueError("give --seed or --seeds, not both")
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    if seeds is not None and num_images != 1:
        raise ValueError(f"--seeds {seeds} already gives {seeds} images per prompt (one per random seed); leave "
                         f"--num-images {num_images} out")
    if -1 in seed:  # a random seed, as in A1111 and stable-diffusion.cpp (else the same image every run)
        if len(seed) > 1:
            raise ValueError("--seed -1 (a random seed) goes alone; give it once, or --seeds N for N random seeds")
        seed = ()
    last = seed[0] + num_images - 1 if len(seed) == 1 else None  # one seed: consecutive seeds from it
    for s in (*seed, *([last] if last is not None else [])):  # what the library takes (sampling.check_seeds)
        if not 0 <= s < 2**64:
            raise ValueError(f"--seed must be between 0 and 2**64 - 1 (-1: a random seed), got {s}"
                             + (f" (--seed {seed[0]} with --num-images {num_images} runs to {last})" if s == last
                                and s != seed[0] else ""))
    if len(seed) > 1:
        if num_images not in (1, len(seed)):
            raise ValueError(f"got {len(seed)} seeds and --num-images {num_images}: several seeds give one image "
                             f"each; leave --num-images out, or give one --seed for {num_images} consecutive seeds")
        return list(seed), False
    if len(seed) == 1:
        return [seed[0] + i for i in range(num_images)], False
    count = seeds if seeds is not None else num_images
    return [random.randrange(2**31) for _ in range(count)], True


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    blank = prompt is not None and not prompt.strip()  # "" or spaces: most often an unset shell variable
    prompts = [prompt] if prompt and not blank else []
    if prompts_file is not None:
        lines = read_user_text(prompts_file, "--prompts-file").splitlines()
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"--prompts-file {prompts_file} has no prompts (only blank and # lines)")
    if blank and not prompts:  # "   " made an image of no prompt; "" said to give a PROMPT, as if none was typed
        raise ValueError(f"the PROMPT is empty ({prompt!r}; an unset shell variable, as in \"$PROMPT\"?): give the "
                         f"text in quotes, or --prompts-file or --from-image")
    if not prompts:  # a missing argument, as click says for `zimage format-prompt` alone: exit status 2
        raise UsageLine("give a PROMPT, --prompts-file or --from-image")
    return prompts


#: The loading options that choose the weights, recorded with each image (the pipeline records only
#: ``--model``): an image made with ``--transformer FILE`` is re-run with that file.
COMPONENT_KEYS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_quant")


def from_image_layer(path: Path | None) -> tuple[dict, str | None]:
    """Command parameters recorded in a PNG by an earlier run (see zimage_native.metadata)."""
    if path is None:
        return {}, None
    from ..metadata import read_metadata
    from ..sampling import CALLBACK_RECORD_KEYS

    record = read_metadata(path)
    keys = {"negative_prompt": "negative_prompt", "width": "width", "height": "height", "steps": "steps",
            "guidance_scale": "guidance_scale", "model": "model", "template": "template", "variant": "variant",
            "system_prompt": "system_prompt", "thinking_content": "thinking_content",
            "assistant_content": "assistant_content", "force_think_block": "force_think_block",
            "strip_quotes": "strip_quotes", "strength": "strength", "shift": "shift",
            "control_scale": "control_scale", "seed_variance": "seed_variance",
            "seed_variance_share": "seed_variance_share", "seed_variance_steps": "seed_variance_steps",
            "first_block_cache": "first_block_cache", "cfg_normalization": "cfg_normalization",
            "cfg_truncation": "cfg_truncation", "max_sequence_length": "max_sequence_length"}
    layer = {flag: record[key] for key, flag in keys.items() if record.get(key) is not None}
    seed, size, index = record.get("seed"), record.get("batch_size"), record.get("batch_index")
    if record.get("noise") == "latents":  # no flag gives these: generate() pops them
        layer["unremakeable"] = "it was made from given latents=, which are not stored"
    elif record.get("noise") == "generator" or seed is None:
        layer["unremakeable"] = "it was made with a generator= (a library call), whose seed is not recorded"
    elif any(record.get(key) for key in CALLBACK_RECORD_KEYS):
        done = {key: record[key] for key in CALLBACK_RECORD_KEYS if record.get(key)}
        layer["unremakeable"] = (f"a callback_on_step_end or pipe._interrupt (a library call) changed its run part-way "
                                 f"({done}), which no flag does")
    elif size and record.get("batch_prompts"):
        layer["unremakeable"] = (f"seed {seed} drew the noise of a batch of {size} images of "
                                 f"{record['batch_prompts']} prompts (it is image {index}), which a run of one "
                                 f"prompt does not draw again")
    if seed is not None and "unremakeable" not in layer:
        layer["seed"] = [int(seed)]
        if size:  # image `index` of the `size` images drawn from one seed: they run again
            layer["seed_batch"] = (int(index), int(size))
    for key in COMPONENT_KEYS:  # the model's own files replaced by single files (a GGUF DiT, a fine-tune)
        if record.get(key) is not None:
            layer[key] = record[key]
    if str(record.get("model", "")).startswith("single files:"):  # no folder: the files above are the model
        layer.pop("model", None)
    if record.get("loras"):  # --lora PATH:SCALE, as loaded then
        layer["loras"] = [f"{path}:{scale}" for path, scale in record["loras"]]
    if record.get("sigmas"):  # no flag sets them: run_jobs passes them on (the generate command's "sigmas")
        layer["sigmas"] = [float(s) for s in record["sigmas"]]
    return layer, record["prompt"]


@click.command(cls=PromptCommand)
@click.argument("prompt", required=False)
@click.option("--model", "--model-path", "model", default=None,
              help=f"Model folder (diffusers layout) or Hub id [default: {DEFAULT_MODEL}, or none with --transformer].")
@loading
@click.option("-o", "--output", type=UserPath(path_type=Path), metavar="FILE", default=None,
              help="PNG to write for a single image; with several, NAME_INDEX_SEED.png. Default: --name-pattern.")
@click.option("--output-dir", type=UserPath(file_okay=False, path_type=Path), default=None,
              help="Folder for the images (default: the current folder).")
@click.option("--name-pattern", default=DEFAULT_PATTERN, show_default=True,
              help="File names under --output-dir; fields {index} {seed} {prompt_index} {slug}.")
@click.option("--overwrite/--no-overwrite", default=False, show_default=True, help="Replace existing files.")
@click.option("--prompts-file", type=UserPath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="One prompt per line (lines starting with # are skipped).")
@click.option("--width", type=SIDE, default=None,
              help="Image width in pixels, a multiple of 16 [default: the template's size, else 1024].")
@click.option("--height", type=SIDE, default=None,
              help="Image height in pixels, a multiple of 16 [default: the template's size, else 1024].")
@click.option("--steps", type=WholeNumber("the number of denoising steps (for example 8)"), default=None,
              help="Denoising steps, each one pass of the DiT [default: 8 Turbo, 50 base].")
@click.option("--seed", type=WholeNumber("a seed is 0 to 2**64 - 1, or -1 for a random one"), multiple=True,
              help="Seed of the noise, a whole number (the same seed gives the same image): --seed 1 2 3 makes one "
                   "image per seed; -1 draws a random one (printed) [default: random].")
@click.option("--seeds", type=int, default=None, help="Draw N random seeds (printed), one image each.")
@click.option("--num-images", type=int, default=1, show_default=True,
              help="Images per prompt (consecutive seeds from --seed).")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Images sampled together (faster on a GPU, more memory; the same images up to rounding); no more "
                   "images: --num-images sets how many.")
@click.option("--guidance-scale", type=float, default=None,
              help="Classifier-free guidance (CFG) strength, 0 = off; above 0 each step runs the DiT twice "
                   "[default: 0 Turbo, 4 base].")
@click.option("--negative-prompt", default=None,
              help="What the image should not show (used only when --guidance-scale is above 0) [default: none].")
@click.option("--cfg-normalization", type=float, default=0.0, show_default=True,
              help="With CFG: limit the guided prediction's size to this multiple of the prompt's own prediction "
                   "(0 = off).")
@click.option("--cfg-truncation", type=float, default=1.0, show_default=True,
              help="With CFG: turn it off for the steps where the fraction of noise removed (1 - sigma) exceeds this, "
                   "0 to 1 (1 = never).")
@click.option("--shift", type=float, default=None,
              help="Scheduler shift (sigma -> s*sigma / (1 + (s-1)*sigma)) [default: the model's, Turbo 3, base 6].")
@click.option("--seed-variance", type=float, default=0.0, show_default=True,
              help="More varied images across seeds (Turbo changes little with the seed): seeded noise of this "
                   "amplitude on the prompt features of the first steps; 15-30 is a usual range, 0 = off.")
@click.option("--seed-variance-share", type=float, default=None,
              help="With --seed-variance: the fraction of the prompt feature values that get noise [default: 0.5].")
@click.option("--seed-variance-steps", type=float, default=None,
              help="With --seed-variance: the fraction of the steps, the first ones, that see the noise "
                   "[default: 0.2].")
@click.option("--first-block-cache", type=float, default=0.0, show_default=True,
              help="Skip the DiT's main layers on steps whose first layer changed by at most this fraction since "
                   "the last full step, reusing that step's work (lossy; 0.05-0.2 is a usual range, for many "
                   "steps; 0 = off). Not with --cuda-graphs or --compile full.")
@click.option("--image", "init_image", type=UserPath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="img2img: start from this image.")
@click.option("--mask", "mask", type=UserPath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Inpaint with --image: repaint where this mask is white, keep where it is black.")
@click.option("--strength", type=float, default=None,
              help="With --image: how much to change it, 0 to 1 (the share of the steps that run; 1 = from pure "
                   "noise) [default: 0.6 img2img, 1.0 inpaint].")
@click.option("--control-image", type=UserPath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="ControlNet: pose / depth / edge image [sets the size unless --width/--height; with --image "
                   "and --mask: ControlNet inpainting].")
@click.option("--control-scale", type=float, default=0.75, show_default=True,
              help="ControlNet conditioning scale (0 = no control).")
@click.option("--template", default=None, help="Prompt template name (see `zimage templates list`).")
@click.option("--templates-dir", type=UserPath(exists=True, file_okay=False), multiple=True,
              help="Extra folder of templates (repeatable) [default: the shipped templates only].")
@click.option("--system-prompt", default=None,
              help="System message of the chat format the text encoder reads [default: none, or the template's].")
@click.option("--thinking-content", default=None,
              help="Text inside <think>...</think> [default: none, or the template's].")
@click.option("--assistant-content", default=None,
              help="Assistant text after the think block [default: none, or the template's].")
@click.option("--force-think-block/--no-force-think-block", default=None,
              help="Add an empty think block when there is no thinking content [default: the template's, else no].")
@click.option("--strip-quotes/--no-strip-quotes", default=None,
              help="Remove the double quotes from the prompt (Z-Image writes quoted text into the image) "
                   "[default: the template's, else no].")
@click.option("--max-sequence-length", type=int, default=512, show_default=True,
              help="Token limit of the prompt (longer prompts are cut; at most 1504).")
@placement
@speed
@vae_tiling
@config_file
@click.option("--from-image", type=UserPath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Re-run the request recorded in a PNG written by zimage; flags override it.")
@click.option("--debug", is_flag=True, help="Print the formatted prompts, token ids and embedding statistics.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.pass_context
@user_errors
def generate(ctx, prompt, config_path, profile, from_image, **opts):
    """Generate images from PROMPT (or --prompts-file, or --from-image)."""
    config_path = config_source(config_path, profile)
    values = read_profile(config_path, profile) if config_path else {}
    config = convert(ctx, values)
    recorded, recorded_prompt = from_image_layer(from_image)
    sigmas = recorded.pop("sigmas", None)
    unremakeable, seed_batch = recorded.pop("unremakeable", None), recorded.pop("seed_batch", None)
    image_layer = convert(ctx, {k: (v, f"{from_image}: {k}") for k, v in recorded.items()})
    opts = apply_layers(ctx, opts, config, image_layer)
    origins = {k: v for k, v in config_origins(ctx, values).items() if k not in image_layer}
    with naming_config_origins(ctx, origins):  # a refusal caused by a config value names where it was set
        checked_generate(ctx, prompt, opts, from_image, recorded, recorded_prompt, sigmas, unremakeable, seed_batch)


def checked_generate(ctx, prompt, opts: dict, from_image, recorded: dict, recorded_prompt, sigmas, unremakeable,
                     seed_batch) -> None:
    """The request's checks across flags, then the run."""
    from click.core import ParameterSource

    typed = lambda key: ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE  # noqa: E731
    opts["sigmas"] = None if typed("steps") else sigmas  # --steps asks for the default schedule at that count
    if sigmas and typed("steps"):
        click.echo(f"note: --steps {opts['steps']} replaces the {len(sigmas)} custom sigmas recorded in {from_image} "
                   f"(the default schedule of {opts['steps']} steps runs)", err=True)
    new_seed = typed("seed") or typed("seeds")
    if unremakeable and not new_seed:  # a random seed would make another image, silently
        raise ValueError(f"{from_image} cannot be remade from its record: {unremakeable}; give --seed N (or "
                         f"--seed -1 for a random one) to run its settings with a new seed")
    opts["seed_batch"] = None if new_seed or typed("num_images") or opts["prompts_file"] else seed_batch
    if opts["seed_batch"]:
        index, size = seed_batch
        click.echo(f"note: {from_image} is image {index} of {size} drawn from seed {opts['seed'][0]}: the {size} "
                   f"images run again and image {index} is written", err=True)
    if typed("strength") and opts["init_image"] is None:
        raise ValueError("--strength needs --image (img2img or inpainting); text-to-image starts from pure noise")
    if typed("control_scale") and opts["controlnet"] is None:
        raise ValueError("--control-scale needs --controlnet and --control-image")
    if typed("output") and (typed("output_dir") or typed("name_pattern")):
        raise ValueError("-o/--output names the file itself; give it, or --output-dir and --name-pattern, not both")
    for flag in ("tile_size", "tile_overlap"):
        if typed(flag) and not opts["tiled_vae"]:
            raise ValueError(f"--{flag.replace('_', '-')} needs --tiled-vae (without it the VAE decodes in one piece)")
    # The input images are not stored in the PNG: a rerun needs them again, or it would silently become
    # text-to-image.
    if recorded.get("strength") is not None and opts["init_image"] is None:
        raise ValueError(f"{from_image} was made from an input image (strength {recorded['strength']}); give it "
                         f"again with --image IN.png (and --mask for inpainting)")
    if recorded.get("control_scale") is not None and opts["controlnet"] is None:
        raise ValueError(f"{from_image} was made with a ControlNet; give --controlnet FILE and --control-image again")
    from . import _lora_before

    lora = _lora_before(ctx, prompt) if isinstance(prompt, str) else None
    if lora is not None:  # `zimage generate --lora style.safetensors 0.8` made an image of the prompt "0.8"
        # (a command line misread, as the same mistake before a prompt is: exit status 2)
        raise UsageLine(f"--lora takes its scale in the same argument, after ':': --lora {lora}:{prompt} ('{prompt}' "
                         f"was read as the prompt)")
    # The library takes it (CFG then runs on no step, silently): refused unless the PNG rerun records it.
    if not opts["cfg_truncation"] >= 0 and (typed("cfg_truncation") or "cfg_truncation" not in recorded):
        raise ValueError(f"--cfg-truncation must be >= 0 (CFG stops on the steps where 1 - sigma exceeds it, 1: "
                         f"never; below 0 it runs on no step, which --guidance-scale 0 says), got "
                         f"{opts['cfg_truncation']}")
    typed_prompt = prompt if prompt and prompt.strip() else None  # a blank one is refused unless something replaces it
    prompts = read_prompts(typed_prompt or (recorded_prompt if not opts["prompts_file"] else None) or prompt,
                           opts["prompts_file"])
    size = opts["batch_size"]
    if typed("batch_size") and size > 1 and len(prompts) == 1 and opts["num_images"] == 1 and len(opts["seed"]) < 2 \
            and opts["seeds"] is None and not opts["seed_batch"]:
        # ComfyUI's batch_size is the number of images: here it made one, silently
        raise ValueError(f"--batch-size {size} samples up to {size} images at once, and this run makes one (one "
                         f"prompt, one seed); for {size} images give --num-images {size} (with --batch-size {size} "
                         f"to sample them together)")
    run_generate(prompts, opts)


def run_generate(prompts: list[str], o: dict) -> None:
    from ..accel.block_cache import cache_problem, check_threshold
    from ..config import TransformerConfig
    from ..sampling import (check_caption_fits, check_request, check_seed_variance, check_seed_variance_given,
                            check_size_fits)
    from ..tiling import TileConfig

    seeds, drawn = resolve_seeds(tuple(o["seed"]), o["seeds"], o["num_images"])
    if o["batch_size"] < 1:
        raise ValueError(f"--batch-size must be >= 1, got {o['batch_size']}")
    if o["output"] is not None and o["output"].is_dir():
        raise ValueError(f"-o/--output names the image file, and {o['output']} is a folder: give a file in it "
                         f"(-o {o['output'] / 'image.png'}), or --output-dir {o['output']} for names made from the "
                         f"seed")
    jobs = [(pi, p, s) for pi, p in enumerate(prompts) for s in seeds]
    paths = output_paths(jobs, o["output"], o["output_dir"], o["name_pattern"])
    if any(p.suffix.lower() != ".png" for p in paths):  # (--name-pattern adds .png)
        raise ValueError(f"--output must be a .png file, got {o['output']} ({png_hint(o['output'])})")
    # Refuse bad input before spending minutes loading weights.
    given = lambda key, fallback: fallback if o[key] is None else o[key]  # noqa: E731
    check_request("x", given("width", 1024), given("height", 1024), given("steps", 1),
                  guidance_scale=given("guidance_scale", 0.0), max_len=o["max_sequence_length"],
                  cfg_normalization=o["cfg_normalization"])
    check_size_fits(given("width", 1024), given("height", 1024), TransformerConfig().axes_lens)  # the released DiTs
    check_caption_fits(o["max_sequence_length"], TransformerConfig().axes_lens, "--max-sequence-length")
    if o["strength"] is not None and not 0 <= o["strength"] <= 1:
        raise ValueError(f"--strength must be in [0, 1], got {o['strength']}")
    if o["strength"] == 0:  # the library refuses it too, but only once the weights are loaded
        raise ValueError("--strength 0 runs no step (the output would be the input image); give a strength above 0")
    if o["shift"] is not None and not o["shift"] > 0:
        raise ValueError(f"--shift must be > 0, got {o['shift']}")
    if o["tiled_vae"]:  # the library's check, which ran only once the weights were loaded
        TileConfig(o["tile_size"], o["tile_overlap"])
    check_seed_variance_given(o["seed_variance"], o["seed_variance_share"], o["seed_variance_steps"], flags=True)
    check_seed_variance(o["seed_variance"], o["seed_variance_share"], o["seed_variance_steps"])
    check_threshold(o["first_block_cache"])
    problem = cache_problem(o["cuda_graphs"], o["compile_mode"]) if o["first_block_cache"] else None
    if problem:
        raise ValueError(problem)
    if o["mask"] is not None and o["init_image"] is None:
        raise ValueError("--mask needs --image (the picture to inpaint)")
    check_control_options(o)
    check_speed_flags(o)
    if o["template"] is not None:
        from ..prompt.templates import default_registry

        if default_registry(o["templates_dir"]).get(o["template"]).category == "rewriter":
            raise ValueError(f"--template {o['template']} is a rewriter: its system prompt instructs the prompt "
                             f"rewriter, not the image; rewrite first (zimage rewrite PROMPT --rewriter "
                             f"{o['template']}) and generate from its output, or pick an image template "
                             f"(zimage templates list)")

    # The outputs, once the request is known to be valid: a folder that cannot be made fails now, not
    # after sampling; an existing file needs --overwrite.
    for folder in dict.fromkeys(p.parent for p in paths):
        check_writable_folder(folder, "--output" if o["output"] is not None else "--output-dir")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not o["overwrite"]:
        raise ValueError(f"{existing[0]} exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
                         f"use --overwrite to replace")

    init = read_image(o["init_image"], "--image", "RGB")
    mask = read_image(o["mask"], "--mask", "L")
    control = read_image(o["control_image"], "--control-image", "RGB")

    pipe = load_pipeline(o)
    pipe.templates_dirs = list(o["templates_dir"])
    if o["tiled_vae"]:
        pipe.enable_vae_tiling(o["tile_size"], o["tile_overlap"])
    fields = {k: o[k] for k in ("template", "system_prompt", "thinking_content", "assistant_content",
                                "force_think_block", "strip_quotes")}
    if o["debug"]:
        print_debug(pipe, prompts, o["max_sequence_length"], fields)
    if drawn:
        click.echo("seeds " + " ".join(str(s) for s in seeds))
    slow_start = [flag for flag, on in (("--compile", o["compile_mode"] != "off"), ("--cuda-graphs", o["cuda_graphs"]),
                                        ("--vae-compile", o.get("vae_compile"))) if on]
    if len(jobs) == 1 and slow_start:
        verb = "adds its" if len(slow_start) == 1 else "add their"
        click.echo(f"note: {', '.join(slow_start)} {verb} cold start (compiling, capturing) to this run of one image; "
                   f"it is paid once per process and image size, so these flags suit many images in one process "
                   f"(--num-images, --prompts-file, `zimage serve`)", err=True)

    run_jobs(pipe, jobs, paths, o, fields, init, mask, control)


def read_image(path, flag: str, mode: str):
    """The image a flag names, converted to ``mode``; a 16-bit or float grey image (a depth map, a
    16-bit mask) is kept as it is, for the library to read by its range (the conversion clips it). A
    file PIL cannot read is a one-line error."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    from ..images import is_wide_grey

    try:
        with Image.open(path) as im:
            if is_wide_grey(im):
                im.load()
                return im.copy()
            return im.convert(mode)
    except UnidentifiedImageError:
        raise ValueError(f"{flag} {path}: not an image file (PNG, JPEG, WebP, ...)") from None
    except OSError as e:  # truncated or damaged
        raise ValueError(f"{flag} {path}: cannot read the image ({e})") from None


def check_control_options(o: dict) -> None:
    """ControlNet flags that cannot work together, refused before any weights load."""
    import math

    if o["control_image"] is not None and o["controlnet"] is None:
        raise ValueError("--control-image needs --controlnet FILE (a Fun-ControlNet-Union)")
    if o["controlnet"] is not None and o["control_image"] is None:
        raise ValueError("--controlnet needs --control-image (the pose / depth / edge image)")
    if o["controlnet_config"] is not None and o["controlnet"] is None:
        raise ValueError("--controlnet-config needs --controlnet")
    if o["control_image"] is not None and o["init_image"] is not None and o["mask"] is None:
        raise ValueError("--control-image with --image needs --mask (ControlNet inpainting); img2img with a "
                         "ControlNet is not supported")
    if o["control_image"] is not None and o["mask"] is not None and o["strength"] is not None:
        raise ValueError(f"--strength does not apply to ControlNet inpainting (it starts from noise), "
                         f"got {o['strength']}")
    if not math.isfinite(o["control_scale"]):
        raise ValueError(f"--control-scale must be a finite number, got {o['control_scale']}")


def check_speed_flags(o: dict) -> None:
    """The speed flags against the DiT's device and the dtype, and the LoRA files, before any weights
    are read or downloaded."""
    from ..accel import attention_from_env, check_before_loading

    check_before_loading(o["dit_device"] or o["device"], o["dtype"], o["offload"], kernels=o["kernels"],
                         compile=o["compile_mode"], fp8=o["fp8"], cuda_graphs=o["cuda_graphs"],
                         vae_compile=o.get("vae_compile", False), attention=o["attention"] or attention_from_env())
    from ..lora import parse_lora_arg

    for text in o.get("loras") or ():
        check_lora_arg(text, parse_lora_arg)


def check_lora_arg(text: str, parse) -> None:
    """A --lora PATH[:SCALE] that names a file or a LoRA save folder (the library picks its weights
    file), with a finite scale; a scale that is not a number is named as such, not as a path. The
    file's header is read too: a model checkpoint (a VAE, the DiT) is refused before loading."""
    import math

    from ..lora import lora_file

    name, scale = parse(text)
    path = Path(name).expanduser()
    if not path.exists():
        head, _, tail = text.rpartition(":")
        if head and Path(head).expanduser().exists():
            raise ValueError(f"--lora {text}: the scale after ':' must be a number, got {tail!r}")
        for sep in ("=", ",", "@", " "):  # other tools' separators: PATH=0.8, PATH,0.8
            head, _, tail = text.rpartition(sep)
            if head and Path(head).expanduser().exists() and _is_number(tail):
                raise ValueError(f"--lora {text}: the scale goes after ':' (--lora {head}:{tail.strip()})")
        raise FileNotFoundError(f"--lora: LoRA file not found: {path}")
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text}: the scale must be a finite number, got {scale}")
    lora_file(path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_pipeline(o: dict):
    """From a model folder or Hub id (with single-file overrides), or from single files alone."""
    from ..lora import parse_lora_arg
    from ..pipeline import ZImagePipeline

    from ..accel import attention_from_env

    placement = dict(device=o["device"], dtype=o["dtype"], variant=o["variant"])
    speed = dict(kernels=o["kernels"], attention=o["attention"] or attention_from_env(), compile=o["compile_mode"],
                 cuda_graphs=o["cuda_graphs"], fp8=o["fp8"], vae_compile=o.get("vae_compile", False),
                 graph_cache_size=o.get("graph_cache_size"))
    if o["model"] is None and o["transformer"] is not None:
        if o["dit_device"] or o["vae_device"] or o["text_encoder_device"] or o["offload"] != "none":
            raise ValueError("per-component devices and --offload need --model (a folder) for now")
        if o.get("encoder_url"):
            raise ValueError("--encoder-url needs --model (a folder with the DiT and VAE)")
        pipe = ZImagePipeline.from_single_files(transformer=o["transformer"], vae=o["vae"],
                                                text_encoder=o["text_encoder"], tokenizer=o["tokenizer"],
                                                text_encoder_quant=o["text_encoder_quant"], **placement)
    else:
        pipe = ZImagePipeline.from_pretrained(
            o["model"] or DEFAULT_MODEL, **placement, text_encoder_device=o["text_encoder_device"],
            dit_device=o["dit_device"], vae_device=o["vae_device"], offload=o["offload"],
            transformer=o["transformer"], vae=o["vae"], text_encoder=o["text_encoder"], tokenizer=o["tokenizer"],
            text_encoder_url=o.get("encoder_url"), text_encoder_token=o.get("encoder_token"),
            text_encoder_quant=o["text_encoder_quant"])
    if o["loras"]:  # fused before any fp8 conversion or capture
        pairs = [parse_lora_arg(text) for text in o["loras"]]
        # undo=False: a CLI run (generate, serve) never unloads them, so no host copy of every touched
        # weight (the whole bf16 DiT's 12 GB for a LoRA on every block linear)
        reports = pipe.load_lora([p for p, _ in pairs], scale=[s for _, s in pairs], undo=False)
        for report in reports if isinstance(reports, list) else [reports]:
            click.echo(str(report))
    if o.get("controlnet") is not None:  # before optimize: the branch gets the same transforms
        cn = pipe.load_controlnet(o["controlnet"], o.get("controlnet_config"))
        click.echo(f"ControlNet {o['controlnet'].name}: version {cn.config.version}, "
                   f"{len(cn.config.control_layers_places)} control layers", err=True)
    for line in pipe.optimize(**speed):
        click.echo(line, err=True)
    return pipe


def run_jobs(pipe, jobs, paths, o, fields, init, mask=None, control=None) -> None:
    """Run the jobs in batches under one progress bar over all steps, writing each image as it comes."""
    from tqdm.auto import tqdm

    from ..metadata import image_record, png_info
    from ..sampling import GenerationRequest

    batches = [list(range(i, min(i + o["batch_size"], len(jobs)))) for i in range(0, len(jobs), o["batch_size"])]
    index, size = o.get("seed_batch") or (None, 1)  # --from-image of image `index` of a one-seed batch
    components = {k: str(o[k]) for k in COMPONENT_KEYS if o.get(k) not in (None, "none")}
    bar = None  # made at the first step, when the total is known: nothing is drawn while prompts encode
    done = 0
    written: list[Path] = []
    interrupted = False
    try:
        for batch in batches:
            request = GenerationRequest(
                prompt=[jobs[i][1] for i in batch], seeds=[jobs[i][2] for i in batch], steps=o["steps"],
                width=o["width"], height=o["height"],
                control_image=control, control_scale=o.get("control_scale", 0.75) if control is not None else None,
                guidance_scale=o["guidance_scale"], negative_prompt=o["negative_prompt"],
                cfg_normalization=o["cfg_normalization"], cfg_truncation=o["cfg_truncation"],
                max_sequence_length=o["max_sequence_length"], template=fields["template"],
                fields={k: v for k, v in fields.items() if k != "template" and v is not None},
                image=init, mask_image=mask, strength=o["strength"] if init is not None else None,
                shift=o["shift"], num_images_per_prompt=size, seed_variance=o["seed_variance"],
                seed_variance_share=o["seed_variance_share"], seed_variance_steps=o["seed_variance_steps"],
                first_block_cache=o["first_block_cache"], sigmas=o.get("sigmas"))

            def step(i, n, _size=len(batch)):
                nonlocal bar
                if bar is None:
                    # disable=None: drawn on a terminal only, as the loading bars (a log file gets no redraws)
                    bar = tqdm(total=n * len(batches), unit="step", disable=None if o["progress"] else True,
                               desc="zimage")
                bar.set_postfix_str(f"images {done}/{len(jobs)}")
                bar.update(1)

            result = pipe.generate(request, progress=False, callback=step)
            counts = result.info.get("first_block_cache_forwards")
            if counts:  # what the threshold did, to tune it by
                tqdm.write(f"first-block cache: {counts['reused']} of {counts['full'] + counts['reused']} DiT "
                           f"forwards reused the main layers")
            images = result.images if index is None else result.images[index:index + 1]
            for k, (i, image) in enumerate(zip(batch, images)):
                record = {**image_record(result.info, k if index is None else index, k), **components}
                save_image_atomic(image, paths[i], pnginfo=png_info(record))
                written.append(paths[i])
                done += 1
                if bar is not None:
                    bar.set_postfix_str(f"images {done}/{len(jobs)}")
                tqdm.write(f"wrote {paths[i]}")
    except KeyboardInterrupt:  # Ctrl-C: say what is on disk, not click's bare "Aborted!"
        interrupted = True
    finally:  # closed on an error too, so that the error starts on its own line
        if bar is not None:
            bar.close()
    if interrupted:
        folders = list(dict.fromkeys(str(p.parent) for p in written))
        where = f" in {folders[0]}" if len(folders) == 1 else f" in {len(folders)} folders" if folders else ""
        click.echo(f"interrupted: wrote {done} of {len(jobs)} image{'s' if len(jobs) > 1 else ''}{where}", err=True)
        raise SystemExit(130)


def print_debug(pipe, prompts, max_len, fields) -> None:
    template = fields.get("template")
    other = {k: v for k, v in fields.items() if k != "template"}
    texts = pipe.format_prompts(prompts, template, **other)
    ids = pipe.text_encoder.tokenize(texts, max_len)
    features = pipe.encode_prompt(prompts, max_len, template, **other)
    for i, (text, row, f) in enumerate(zip(texts, ids, features)):
        f = f.float()
        click.echo(f"--- prompt {i}: {len(row)} tokens")
        click.echo(text)
        click.echo(f"token ids: {row}")
        click.echo(f"embedding: shape {tuple(f.shape)} mean {f.mean():.4f} std {f.std():.4f} "
                   f"min {f.min():.4f} max {f.max():.4f} norm {f.norm():.2f}")
