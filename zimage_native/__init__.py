"""zimage-native: a compiled, PyTorch-native inference engine for the Z-Image text-to-image models.

    import zimage_native as zn
    pipe = zn.ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", device="cuda")
    image = pipe("a red fox in the snow", seed=0).images[0]
"""

__version__ = "0.3.0"

from .pipeline import ZImageOutput, ZImagePipeline
from .prompt import format_prompt

__all__ = ["ZImagePipeline", "ZImageOutput", "format_prompt", "__version__"]
