"""Loading Z-Image Fun-ControlNet-Union checkpoints (alibaba-pai, versions 1.0, 2.0 and 2.1).

    from zimage_native.formats.controlnet import load_controlnet
    cn = load_controlnet("Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors", dtype=torch.bfloat16)

``path`` is a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a
published single file. Files carry no config, so it is inferred from the tensor names and shapes:

- ``control_all_x_embedder.P-F.weight`` (D, P*P*F*Cc): model width D, patch P, control input width
  Cc (16 for 1.0, 33 for 2.x: control latents, mask, masked-image latents);
- ``control_layers.N``: N control layers, placed evenly from DiT layer 0 with step = (DiT layers // N),
  which gives the published layouts (VideoX-Fun's config/z_image/*.yaml): [0, 5, ..., 25] (1.0:
  6 layers), [0, 2, ..., 28] (2.0 and 2.1: 15) and [0, 10, 20] (2.1 lite: 3);
- the control noise refiner, told apart as diffusers 0.42.1 does: plain DiT blocks (no
  ``after_proj``) are 1.0; control blocks whose ``control_noise_refiner.0.before_proj.weight`` is
  absent or all zeros are 2.0 (those blocks were never trained and are dropped, as diffusers drops
  them); otherwise 2.1. No refiner tensors at all is 2.0.

``config=`` (a dict, a config.json or a folder holding one) overrides what is inferred, for files the
rules cannot decide; values that the tensor shapes fix must agree with them. A diffusers folder's
own config.json is used the same way. Loading is strict (missing and unexpected keys are named).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ControlNetConfig, TransformerConfig
from ..devices import HOST_MEMORY_DEVICES, check_component_fits
from ..loading import assign_state_dict, build_on_meta, iter_tensors, safetensors_files, take_stored_dtypes
from ..model.controlnet import ZImageControlNet
from .checkpoint import TensorInfo, UnsupportedFormatError, read_header
from .infer import _count, _merge_checked, _need, folder_config, read_overrides

logger = logging.getLogger(__name__)

# The published files (with a 30-layer DiT): number of control layers -> version(s).
PUBLISHED_LAYER_COUNTS = {6: "1.0", 15: "2.0 / 2.1", 3: "2.1 lite"}
#: The tensor whose values tell 2.0 from 2.1 where a file holds control refiner blocks (all zeros:
#: 2.0, whose refiner is dropped): read before the branch is weighed, the only one (``zimage info``
#: reads it too, and nothing else).
DECIDING = "control_noise_refiner.0.before_proj.weight"
#: The control refiner blocks' prefix (the 2.0 layout drops them).
REFINER = "control_noise_refiner."
# Values that the tensor shapes fix; a config may restate them but not change them.
SHAPE_KEYS = ("dim", "n_heads", "control_in_dim", "all_patch_size", "all_f_patch_size")


def _infos(files: list[Path]) -> dict[str, TensorInfo]:
    infos = {}
    for file in files:
        infos.update(read_header(file)[0])
    return infos


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in _infos(files).items()}


def _dropped(shapes: dict[str, tuple], variant: str | None) -> list[str]:
    """The tensors the loader drops: the control refiner blocks of the 2.0 layout (never trained)."""
    return [k for k in shapes if k.startswith(REFINER)] if variant == "control_layers" else []


def _all_zero(files: list[Path], key: str) -> bool:
    """Whether tensor ``key`` of the files is all zeros (read as the weights are: ``iter_tensors``)."""
    for _, tensor in iter_tensors(files, keep=lambda k: k == key):
        return not bool(tensor.any())
    raise KeyError(key)


def _what_it_is(shapes: dict[str, tuple]) -> str:
    """A short description of a checkpoint that is not a ControlNet, for the error message."""
    keys = sorted(shapes)
    prefixes = sorted({k.split(".")[0] for k in keys})
    guess = ""
    if any("lora" in k for k in keys):
        guess = " (it looks like a LoRA)"
    elif any(k.startswith(("layers.", "model.diffusion_model.")) for k in keys):
        guess = " (it looks like a DiT checkpoint)"
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
        guess = " (it looks like a VAE)"
    return f"{len(keys)} tensors with top-level names {prefixes[:8]}{guess}"


def infer_controlnet_config(
    shapes: dict[str, tuple],
    transformer_config: TransformerConfig,
    refiner_untrained: bool | None = None,
) -> dict[str, Any]:
    """ControlNetConfig fields from tensor names and shapes (see the module docstring).

    ``refiner_untrained``: whether ``control_noise_refiner.0.before_proj.weight`` is all zeros
    (None when the file has no such tensor). Raises UnsupportedFormatError naming what was found
    when the tensors match no Fun-ControlNet-Union layout.
    """
    embedders = [k for k in shapes if re.match(r"^control_all_x_embedder\.\d+-\d+\.weight$", k)]
    n = _count(shapes, r"^control_layers\.(\d+)\.", "ControlNet")
    if len(embedders) != 1 or not n or "control_layers.0.before_proj.weight" not in shapes:
        raise UnsupportedFormatError(
            "not a Z-Image Fun-ControlNet-Union checkpoint: it needs one control_all_x_embedder.P-F.weight and "
            f"control_layers.0..N with control_layers.0.before_proj; found {_what_it_is(shapes)}")
    p, f = (int(v) for v in embedders[0].split(".")[1].split("-"))
    dim, width = shapes[embedders[0]]
    if width % (p * p * f):
        raise UnsupportedFormatError(f"{embedders[0]} has {width} inputs, not a multiple of the patch volume {p * p * f}")
    head_dim = _need(shapes, "control_layers.0.attention.norm_q.weight", "ControlNet")[0]

    n_refiner = _count(shapes, r"^control_noise_refiner\.(\d+)\.", "ControlNet")
    if not n_refiner:
        variant = "control_layers"
    elif not any(k.startswith("control_noise_refiner.") and ".after_proj." in k for k in shapes):
        variant = None  # plain DiT blocks: 1.0
    elif refiner_untrained is None or refiner_untrained:
        variant = "control_layers"  # 2.0: its refiner tensors are absent or zero and are not used
    else:
        variant = "control_noise_refiner"

    n_layers = transformer_config.n_layers
    step = n_layers // n
    if step < 1:
        raise UnsupportedFormatError(f"the checkpoint has {n} control layers, more than the DiT's {n_layers} layers")
    uses_refiner = variant in (None, "control_noise_refiner")
    return {
        "control_layers_places": [k * step for k in range(n)],
        "control_refiner_layers_places": None if variant is None else list(
            range(n_refiner if uses_refiner else transformer_config.n_refiner_layers)),
        "control_in_dim": width // (p * p * f),
        "add_control_noise_refiner": variant,
        "all_patch_size": [p],
        "all_f_patch_size": [f],
        "dim": dim,
        "n_refiner_layers": n_refiner if uses_refiner else transformer_config.n_refiner_layers,
        "n_heads": dim // head_dim,
        "n_kv_heads": dim // head_dim,
        "norm_eps": transformer_config.norm_eps,
    }


def describe_controlnet(path: str | os.PathLike) -> dict[str, Any]:
    """What ``zimage info`` says about a ControlNet (for the released DiT): the version, the control
    layer places, the control input width, from the headers; where the file holds control refiner
    blocks, :data:`DECIDING` is read too (alone, as the loader reads it first), whose values tell 2.0
    (all zeros) from 2.1. ``tensors`` / ``parameters`` / ``bytes``: the file's (bytes as stored);
    ``kept``: the same of what the loader keeps (2.0's untrained refiner blocks dropped)."""
    files = safetensors_files(Path(path))
    infos = _infos(files)
    shapes = {k: v.shape for k, v in infos.items()}
    try:
        untrained = _all_zero(files, DECIDING) if DECIDING in shapes else None
        cfg = infer_controlnet_config(shapes, TransformerConfig(), untrained)
    except (UnsupportedFormatError, ValueError) as e:
        return {"error": str(e)}
    version = {None: "1.0", "control_layers": "2.0"}.get(cfg["add_control_noise_refiner"], "2.1")
    if len(cfg["control_layers_places"]) == 3:
        version += " lite"

    def count(names) -> dict[str, int]:
        return {"tensors": len(names), "parameters": sum(infos[k].numel for k in names),
                "bytes": sum(infos[k].offsets[1] - infos[k].offsets[0] for k in names)}

    dropped = set(_dropped(shapes, cfg["add_control_noise_refiner"]))
    return {"version": version, "control_layers_places": cfg["control_layers_places"],
            "control_refiner_layers_places": cfg["control_refiner_layers_places"],
            "control_in_dim": cfg["control_in_dim"], **count(list(infos)),
            "kept": count([k for k in infos if k not in dropped])}


#: A smaller branch, in the words of the advice when one does not fit.
SMALLER = "load a smaller ControlNet (2.1 lite: 3 control layers, against 15 for 2.0 and 2.1)"


def memory_advice(device: torch.device, pinned: bool, dtype: torch.dtype | None,
                  streamed: bool = False) -> tuple[str, str]:
    """What to change when a ControlNet read onto ``device`` (``pinned``: into CPU memory to be
    page-locked, for ``offload="blocks"`` on a GPU; ``streamed``: the part that stays on the GPU
    then) in ``dtype`` does not fit, in the CLI's words and the library's
    (``devices.check_component_fits``): the branch takes the pipeline's dtype and placement, so
    these are the pipeline's settings (bfloat16 only where the pipeline is wider)."""
    python = "in Python these are from_pretrained's arguments: "
    if streamed:  # blocks streamed already: only a smaller branch or narrower weights lower that part
        if dtype is not None and dtype.itemsize > 2:
            return (f"{SMALLER} or load the pipeline in bfloat16 (--dtype bfloat16)", f"{python}dtype=torch.bfloat16")
        return SMALLER, None
    if pinned:  # devices.pinned_advice gives it the size that fits and adds the routes that fit (--offload model)
        return SMALLER, None
    if device.type in HOST_MEMORY_DEVICES:
        if dtype is not None and dtype.itemsize > 2:
            return (f"{SMALLER}, load the pipeline in bfloat16 (--dtype bfloat16) or, with a GPU, offload less "
                    f"(--offload none)", f'{python}dtype=torch.bfloat16, offload="none"')
        return f"{SMALLER} or, with a GPU, offload less (--offload none)", f'{python}offload="none"'
    return (f"stream its blocks with the DiT's (--offload blocks), keep it in CPU memory except while it runs "
            f"(--offload model) or {SMALLER}", f'{python}offload="blocks", offload="model"')


def _merge(what: str, inferred: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """Inferred values < an explicit config; the values the shapes fix, and the layer count, must agree."""
    places = explicit.get("control_layers_places")
    if places is not None and len(places) != len(inferred["control_layers_places"]):
        raise ValueError(f"{what}: config control_layers_places {list(places)} names {len(places)} layers but "
                         f"the checkpoint has {len(inferred['control_layers_places'])} control layers")
    return _merge_checked(what, inferred, {k: inferred[k] for k in SHAPE_KEYS}, explicit)


def _branch(path: Path, files: list[Path], shapes: dict[str, tuple], tcfg: TransformerConfig, explicit: dict,
            dtype: torch.dtype | None, refiner_untrained: bool | None) -> tuple[ControlNetConfig, ZImageControlNet]:
    """The config and the module built on meta (in the file's dtypes when ``dtype`` is None)."""
    inferred = infer_controlnet_config(shapes, tcfg, refiner_untrained)
    cfg = ControlNetConfig.from_dict(_merge(f"ControlNet {path.name}", inferred, explicit))
    try:
        module = build_on_meta(lambda: ZImageControlNet(cfg, tcfg))
    except ValueError as e:
        raise ValueError(f"{path}: {e} (pass the DiT's transformer_config, or config= to override)") from e
    if dtype is None:  # kept as stored
        take_stored_dtypes(module, files)
    return cfg, module


def load_controlnet(
    path: str | os.PathLike,
    config: dict | str | os.PathLike | ControlNetConfig | None = None,
    *,
    transformer_config: TransformerConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    pinned: bool = False,
    stream_to: torch.device | None = None,
    model_gpu: Callable[[int], str | None] | None = None,
    visits: Callable[[ZImageControlNet], None] | None = None,
) -> ZImageControlNet:
    """Load a Fun-ControlNet-Union folder or single file for a DiT of ``transformer_config``
    (default: the released Z-Image DiT). ``config`` overrides the inferred config (see the module
    docstring). Weights are cast to ``dtype`` while reading, placed on ``device``. ``pinned``: the
    branch is read into CPU memory to be packed into pinned slabs (``offload="blocks"`` on a GPU), so
    its tensors are read into memory of their own, not views of the file's map, as the DiT's are
    (``loading.load_component``'s ``pinned``). Before any weight is read (but :data:`DECIDING`, whose
    values decide the layout), the branch's bytes as it loads must fit where they go
    (``devices.check_component_fits``: the GPU's free memory, or the available RAM, of which the
    components loaded before it have taken their share; pinned, the RAM alone).
    ``stream_to``: the GPU its blocks will be streamed to (``offload="blocks"``), where its other
    tensors stay and two of its blocks are in flight at a time (``control.branch_on_gpu``): they must
    fit in its free memory too. ``model_gpu(bytes)``: why the pipeline under ``offload="model"``, with
    the branch's bytes visiting the GPU with the DiT, would not fit there (the pinned refusal names
    ``--offload model`` only where it would: ``devices.check_component_fits``). ``visits(branch)``: with
    the branch built on meta, before any weight is read, where it visits a GPU with the DiT while a step
    runs (``offload="model"``: ``control.check_branch_visit`` weighs them together there)."""
    path = Path(path)
    tcfg = transformer_config or TransformerConfig()
    files = safetensors_files(path)
    shapes = _shapes(files)
    explicit = {**(folder_config(path) or {}), **read_overrides(config)}
    device = torch.device(device)
    advice = memory_advice(device, pinned, dtype)
    # 2.0 and 2.1 files with control refiner blocks are told apart by before_proj's values (2.0's are
    # zeros and its refiner is dropped): that one tensor (3840 x 3840 at real width) is read first, the
    # only one read before the branch is weighed, so that the branch is weighed as it loads.
    untrained = _all_zero(files, DECIDING) if DECIDING in shapes else None
    cfg, module = _branch(path, files, shapes, tcfg, explicit, dtype, untrained)
    check_component_fits("ControlNet", module, dtype, device, pinned, *advice, model_gpu=model_gpu)
    if stream_to is not None and stream_to.type == "cuda":
        from ..control import branch_on_gpu

        check_component_fits("ControlNet's part on the GPU while its blocks are streamed (its embedder, "
                             "modulations and projections, and 2 blocks in flight)", module, dtype, stream_to, False,
                             *memory_advice(stream_to, False, dtype, streamed=True), tensors=branch_on_gpu(module))
    if visits is not None:
        visits(module)

    n = len(cfg.control_layers_places)
    if not explicit and tcfg.n_layers == 30 and n not in PUBLISHED_LAYER_COUNTS:
        logger.warning("ControlNet %s: %d control layers is not a published layout (%s); placed at DiT layers %s by "
                       "the even-spacing rule: pass config= if its publisher says otherwise", path.name, n,
                       PUBLISHED_LAYER_COUNTS, list(cfg.control_layers_places))
    dropped = set(_dropped(shapes, cfg.add_control_noise_refiner))
    if dropped:
        logger.info("ControlNet %s: version 2.0 layout, dropping its %d unused control_noise_refiner tensors",
                    path.name, len(dropped))
    keep = (lambda k: k not in dropped) if dropped else None
    state_dict = dict(iter_tensors(files, dtype, device, keep, copies=pinned))
    assign_state_dict(module, state_dict, f"ControlNet {path.name}")
    logger.info("ControlNet %s: version %s layout, %d control layers at DiT layers %s, control input %d channels",
                path.name, cfg.version, n, list(cfg.control_layers_places), cfg.control_in_dim)
    return module.eval().requires_grad_(False)
