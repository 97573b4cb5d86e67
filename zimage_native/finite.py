"""No silent black images: a run whose text features, latents or decoded pixels hold NaN or infinite
values stops with :class:`NonFiniteError`, which names the stage that made them and what in this
pipeline can cause it, instead of returning a black or broken image.

The usual cause is float16: the Z-Image DiT's activations exceed its range (65504), as users of other
engines report, and the NaN that follows turns the whole image black. Others: a LoRA fused at too high a scale, fp8, or damaged weights.

The checks are reductions on the device (``torch.isfinite(...).all()`` per image), queued as the run
goes and read once at its end, when the output is fetched anyway: no host sync inside the loop.
"""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """A run made NaN or infinite values; its images would be black or broken."""


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """(B,) bool on ``t``'s device: whether each item of the batch is finite everywhere (no sync)."""
    return torch.isfinite(t).flatten(1).all(1)


def finite_all(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(1,) bool on the tensors' device: whether every tensor is finite everywhere (no sync)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all().reshape(1)


def refuse_nonfinite_input(x: torch.Tensor, what: str) -> None:
    """Refuse an input batch ``x`` (one image per item) that holds NaN or inf, naming ``what`` and the
    items, where it is read: left in, it makes NaN latents that the run's check blames on the DiT.
    One device-to-host copy (an input is read once, before any model runs)."""
    ok = finite_rows(x).tolist()
    bad = [str(i + 1) for i, good in enumerate(ok) if not good]
    if bad:
        raise ValueError(f"NaN or infinite values in {what} (item {', '.join(bad)} of {len(ok)}) would make NaN "
                         f"latents and black images: give finite values")


def _suspects(pipe, stage: str, given_embeds: bool) -> list[str]:
    """What in this pipeline can make NaN or inf at ``stage``, most likely first."""
    out = []
    if stage == "text":
        if given_embeds:
            return ["the prompt_embeds (or negative_prompt_embeds) given hold them"]
        dtype = getattr(pipe.text_encoder, "dtype", None)
        if dtype == torch.float16:
            out.append("the text encoder runs in float16, whose range Qwen3's activations can exceed (use "
                       "bfloat16 or float32: --dtype)")
    elif stage == "dit":
        if pipe.dtype == torch.float16:
            out.append("the DiT runs in float16, whose range (65504) its activations can exceed (use bfloat16, or "
                       "float32 on the CPU: --dtype)")
        if pipe._accel.get("fp8"):
            out.append("fp8 linears (try without --fp8)")
        for report in pipe.loras:
            out.append(f"the LoRA {report.path} at scale {report.scale:g} (try a lower scale, or without it)")
        if pipe.controlnet is not None:
            out.append("the ControlNet (try a lower --control-scale)")
    else:
        dtype = next(pipe.vae.parameters()).dtype
        if dtype == torch.float16:
            out.append("the VAE runs in float16, whose range its activations can exceed (use bfloat16 or "
                       "float32)")
    folder = getattr(pipe, "model_folder", None)
    out.append(f"damaged weights (`zimage info --check {folder or 'PATH'}` finds tensors holding NaN or inf)")
    return out


def check_finite(pipe, text_ok: torch.Tensor | None, latents_ok: torch.Tensor,
                 images_ok: torch.Tensor | None = None, seeds: list[int] | None = None,
                 given_embeds: bool = False) -> None:
    """Raise :class:`NonFiniteError` if a stage made NaN or inf. The flags are device tensors:
    ``text_ok`` from :func:`finite_all` (None: not checked), ``latents_ok`` and ``images_ok`` from
    :func:`finite_rows` (``images_ok`` None: not decoded). Reading them is one device-to-host copy."""
    if latents_ok.device.type == "meta":  # shapes without values (the test suite's stand-in device)
        return
    flags = [f for f in (text_ok, latents_ok, images_ok) if f is not None]
    values = torch.cat([f.to(latents_ok.device) for f in flags]).tolist()
    text = values.pop(0) if text_ok is not None else True
    n = latents_ok.numel()
    latents, images = values[:n], values[n:] or [True] * n
    if text and all(latents) and all(images):
        return
    if not text:
        stage, what, bad = "text", "the text features hold NaN or infinite values", []
    elif not all(latents):
        stage, what = "dit", "the DiT made NaN or infinite latents"
        bad = [i for i, ok in enumerate(latents) if not ok]
    else:
        stage, what = "vae", "the VAE decode made NaN or infinite pixels from finite latents"
        bad = [i for i, ok in enumerate(images) if not ok]
    if bad:
        what += f" for image {', '.join(str(i + 1) for i in bad)} of {n}"
        if seeds is not None and len(seeds) == n:
            what += f" (seed {', '.join(str(seeds[i]) for i in bad)})"
    raise NonFiniteError(f"{what}, so the images would be black or broken; possible causes: "
                         f"{'; '.join(_suspects(pipe, stage, given_embeds))}")
