"""zimage-native: a compiled, PyTorch-native inference engine for the Z-Image text-to-image models.

    import zimage_native as zn
    pipe = zn.ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", device="cuda")
    image = pipe("a red fox in the snow", seed=0).images[0]

The names below are imported on first use, so that importing the package (and the ``zimage`` CLI's
commands that run no model) does not import torch.
"""

__version__ = "0.24.0"


def _import_hub_kernels_first() -> None:
    """In a checkout run from its root (``python -m zimage_native.cli``, ``python -c``, a script
    there), the repository's ``kernels/`` folder would be found as the top-level ``kernels``: the
    name of the Hugging Face kernel hub, which transformers imports when it is installed, so loading
    the text encoder would fail ("cannot import name ... from 'kernels'"). When that folder is what
    ``import kernels`` would find, import the installed package (if any) with the checkout's root off
    the path first; everywhere else this only looks up one name."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if "kernels" in sys.modules or not (root / "kernels" / "__init__.py").is_file():
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != root / "kernels":
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers then does not import it either
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_import_hub_kernels_first()

_LAZY = {
    "ZImagePipeline": "zimage_native.pipeline",
    "ZImageOutput": "zimage_native.pipeline",
    "GenerationRequest": "zimage_native.sampling",
    "format_prompt": "zimage_native.prompt.format",
}

__all__ = ["ZImagePipeline", "ZImageOutput", "GenerationRequest", "format_prompt", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zimage_native' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
