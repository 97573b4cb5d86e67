"""Triton kernels of zimage-native, each registered as a torch op in the ``zimage`` namespace.

Installed as ``zimage_native.kernels`` (never as a top-level ``kernels``: that name belongs to the
Hugging Face kernel hub, which diffusers and transformers probe for). Importing this package never
fails: without Triton it registers nothing and ``is_available()`` is False. The engine imports it
only when ``kernels="triton"`` is asked for (see ``zimage_native.accel``).

    zimage::rms_norm                 RMSNorm, optionally * (1 + scale)          rms_norm.py
    zimage::qk_norm_rope             per-head q/k RMSNorm + 3-axis RoPE         qk_norm_rope.py
    zimage::gated_rms_norm_residual  x + tanh(gate) * RMSNorm(y)                gated_residual.py
    zimage::silu_mul                 SiLU(a) * b (SwiGLU gate)                  silu_mul.py
    zimage::quantize_fp8_rows        per-token fp8 e4m3 activation quantisation  quantize_fp8.py
    zimage::dequantize_ggml          GGML block rows (GGUF weights) -> float    dequant_ggml.py
    zimage::dequantize_fp8           fp8 rows x row scales (fp8 files) -> float dequant_fp8.py

The ops are ``torch.library.custom_op``s with fake implementations: opaque to Inductor, so they
work under ``torch.compile(fullgraph=True)``, in CUDA graphs, and with Triton's CPU interpreter
(``TRITON_INTERPRET=1`` when this package is first imported), which the tests use.
"""

import importlib.util

__all__ = ["is_available"]


def is_available() -> bool:
    """True when the ops below are registered (this package is imported as zimage_native.kernels and
    Triton imports)."""
    return "OPS" in globals()


# Imported under any other name, e.g. as a top-level `kernels` because the repository root is on
# sys.path and transformers probed for the Hugging Face `kernels` package by importing it: register
# nothing and do not import Triton (the probe then sees a package without a version and moves on).
if __name__ == "zimage_native.kernels" and importlib.util.find_spec("triton") is not None:
    from ._launch import is_interpreted, launch_counts, reset_launch_counts
    from .dequant_ggml import KERNEL_TYPES as DEQUANT_TYPES
    from .dequant_fp8 import dequantize_fp8
    from .dequant_ggml import dequantize_ggml
    from .gated_residual import gated_rms_norm_residual
    from .qk_norm_rope import qk_norm_rope
    from .quantize_fp8 import quantize_fp8_rows
    from .rms_norm import _rms_norm_fwd_kernel, rms_norm
    from .silu_mul import silu_mul

    # True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
    INTERPRETED = is_interpreted(_rms_norm_fwd_kernel)

    OPS = ("rms_norm", "qk_norm_rope", "gated_rms_norm_residual", "silu_mul", "quantize_fp8_rows", "dequantize_ggml",
           "dequantize_fp8")

    __all__ += ["rms_norm", "qk_norm_rope", "gated_rms_norm_residual", "silu_mul", "quantize_fp8_rows", "dequantize_ggml",
                "dequantize_fp8",
                "DEQUANT_TYPES", "OPS", "INTERPRETED",
                "launch_counts", "reset_launch_counts"]
