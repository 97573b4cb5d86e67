"""zimage-native: a compiled, PyTorch-native inference engine for the Z-Image text-to-image models.

    import zimage_native as zn
    pipe = zn.ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", device="cuda")
    image = pipe("a red fox in the snow", seed=0).images[0]

The names below are imported on first use, so that importing the package (and the ``zimage`` CLI's
commands that run no model) does not import torch.
"""

__version__ = "0.5.2"

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
