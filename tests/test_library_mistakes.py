"""A new user's typical slips with the Python library (diffusers habits included), each refused in one
line that names the problem and what to give instead, before any model runs: not a TypeError from
deep inside the run, a shape error in the DiT, or a request silently run otherwise."""

from __future__ import annotations

import pytest


def test_loaded_components_given_to_from_pretrained_are_refused_saying_what_to_give(tiny_model_dir, tiny_pipe):
    """diffusers' from_pretrained(..., vae=vae) passes a built module; here the component options are
    paths, and a module failed inside pathlib: "expected str, bytes or os.PathLike object, not
    AutoencoderKL". An engine VAE can be assigned after loading (pipe.vae = vae)."""
    from zimage_native import ZImagePipeline

    with pytest.raises(TypeError, match=r"^from_pretrained\(vae=AutoencoderKL\(\.\.\.\)\): vae= takes the path of a "
                                        r"file or folder here, not a loaded object; load without it and assign it, "
                                        r"pipe\.vae = vae"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", vae=tiny_pipe.vae)
    with pytest.raises(TypeError, match=r"^from_pretrained\(tokenizer=\w+\(\.\.\.\)\): .*give the "
                                        r"path of its files"):
        ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", tokenizer=tiny_pipe.tokenizer)
    with pytest.raises(TypeError, match=r"^from_single_files\(transformer=ZImageTransformer\(\.\.\.\)\): "):
        ZImagePipeline.from_single_files(transformer=tiny_pipe.transformer, vae=tiny_model_dir / "vae")
