"""Host memory of ``zimage convert``: the peak of one conversion, in a fresh process
(``tests/fresh_process.py``: VmHWM above the start, after a warm-up conversion of the same file),
against a bound derived from the sizes of the tensors it converts. A safetensors file is read
tensor by tensor into memory of its own (``Checkpoint(copies=True)``), a GGUF file too
(``GGUFCheckpoint(copies=True)``); their pages read through the map were part of the peak when the
first two tests were written: their bounds include the file. Pages that ``read()`` brings into the page cache are
not the process's: VmHWM, what a user sees, counts neither them nor the written file's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from .fresh_process import run_fresh
from .gguf_files import random_blocks, write_gguf

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="measures the peak resident size (Linux)")

_CONVERT_PEAK_SCRIPT = """
import sys
from pathlib import Path
from zimage_native.converters.convert import convert_checkpoint

src, dtype, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
convert_checkpoint(src, out / "warm.safetensors", "comfyui", dtype=dtype)  # imports, first allocations
start = reset_peak()
convert_checkpoint(src, out / "out.safetensors", "comfyui", dtype=dtype)
print(status("VmHWM") - start)
"""


def _peak(src: Path, dtype: str, out: Path) -> int:
    out.mkdir()
    return int(run_fresh(_CONVERT_PEAK_SCRIPT, src, dtype, out))


def test_fp8_output_is_quantised_by_blocks_of_rows(tmp_path):
    """fp8 output quantised each weight whole: its fp32 upcast, the quotient by the scale and its
    clamp were held at once, three fp32 copies of the weight (a real-width 10240 x 3840 bf16
    weight: 450 MiB at the peak for a 37 MiB result; a real-width bf16 DiT of 1050 MiB converted
    at 1499 MiB). ``quantize_fp8`` computes the amax and the codes by blocks of rows now: the peak
    stays under the file, the fp8 result and half the weight in fp32 (here a 4096 x 4096 bf16
    weight, the feed-forward weight of a DiT file that holds nothing else but its pad token)."""
    rows = cols = 4096
    weight = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    src = tmp_path / "w1.safetensors"
    save_file({"x_pad_token": torch.zeros(1, cols, dtype=torch.bfloat16), "layers.0.feed_forward.w1.weight": weight},
              str(src))
    peak = _peak(src, "fp8", tmp_path / "out")
    bound = src.stat().st_size + rows * cols + rows * cols * 4 // 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB"


def test_a_fused_gguf_weight_is_split_and_joined_in_the_output_dtype(tmp_path):
    """A GGUF converted to bf16 was dequantised to fp32, split into canonical q, k, v, joined again
    in fp32 for the ComfyUI layout's fused q|k|v and only then cast: the fp32 values, their join
    and the bf16 result at once (a real-width Q8_0 DiT's 11520 x 3840 q|k|v: 422 MiB above the
    start for an 84 MiB result). Without a LoRA or fp8 output in between, the values are
    dequantised straight to the output dtype now (computed in fp32 and rounded once, as the cast
    rounded them): the peak stays under the file and three results (the values, their join and
    room for a dequantised block's fp32 intermediates). Here a 6144 x 2048 Q8_0 q|k|v, in a DiT
    file that holds nothing else but its pad token."""
    dim = 2048
    src = write_gguf(tmp_path / "qkv.gguf", {
        "x_pad_token": (np.zeros((1, dim), np.float32), "F32"),
        "layers.0.attention.qkv.weight": (random_blocks("Q8_0", 3 * dim, dim, np.random.default_rng(0)), "Q8_0"),
    }, "lumina2")
    peak = _peak(src, "bf16", tmp_path / "out")
    result = 3 * dim * dim * 2
    bound = src.stat().st_size + 3 * result
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({result / 2**20:.0f} MiB of bf16 q|k|v)"


def test_a_conversion_holds_one_tensor_of_the_file_at_a_time(tmp_path):
    """A bf16 file converted without a change of dtype was read through its memory map: every page
    read stayed resident until the map closed at the end, so the whole file was held (a real-width
    bf16 DiT of 1050 MiB: 1050 MiB at the peak, 1094 to fp8). Each tensor is read into memory of
    its own now, and no stream holds the tensor it passed on while the next one is read (it held
    two at once): the peak stays under one and a half tensors. Here four 3072 x 4096 bf16 weights
    in a DiT file that holds nothing else but its pad token, converted as they are."""
    rows, cols = 3072, 4096
    g = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.feed_forward.w{j}.weight": torch.randn(rows, cols, generator=g).bfloat16()
               for i in range(2) for j in (1, 3)}
    src = tmp_path / "ffn.safetensors"
    save_file({"x_pad_token": torch.zeros(1, cols, dtype=torch.bfloat16), **weights}, str(src))
    del weights
    peak = _peak(src, "keep", tmp_path / "out")
    tensor = rows * cols * 2
    bound = tensor * 3 // 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({tensor / 2**20:.0f} MiB a weight, {src.stat().st_size / 2**20:.0f} MiB the file)"


def test_a_gguf_conversion_holds_one_packed_weight_of_the_file_at_a_time(tmp_path):
    """A GGUF file was read through its memory map: every page read stayed resident until the map
    closed at the end, so the whole file was held beside the weight being written. Its packed
    bytes are read tensor by tensor into memory of their own now (``GGUFCheckpoint(copies=True)``):
    the peak stays under the bf16 result of one weight and half the file (the packed bytes of one
    weight read, and room for the dequantisation's blocks). Here four 4096 x 4096 Q8_0 weights in
    a DiT file that holds nothing else but its pad token, converted to bf16."""
    rows = cols = 4096
    rng = np.random.default_rng(0)
    src = write_gguf(tmp_path / "ffn.gguf", {
        "x_pad_token": (np.zeros((1, cols), np.float32), "F32"),
        **{f"layers.{i}.feed_forward.w{j}.weight": (random_blocks("Q8_0", rows, cols, rng), "Q8_0")
           for i in range(2) for j in (1, 3)},
    }, "lumina2")
    peak = _peak(src, "bf16", tmp_path / "out")
    result = rows * cols * 2
    bound = result + src.stat().st_size // 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({result / 2**20:.0f} MiB a bf16 weight, {src.stat().st_size / 2**20:.0f} MiB the file)"


def test_a_fused_weight_is_written_without_a_second_copy(tmp_path):
    """A fused q|k|v converted to a layout that fuses it the same way (ComfyUI to ComfyUI) was split
    into its canonical parts and joined again by a copy: the weight twice at the peak (a real-width
    11520 x 3840 bf16 q|k|v: 169 MiB above the start for an 84 MiB weight). The parts, row blocks
    of the tensor read, are fused again as a view of its memory now: the peak stays under one and a
    half weights. Here that q|k|v in a DiT file that holds nothing else but its pad token, kept as
    it is."""
    dim = 3840
    weight = (torch.randn(3 * dim, dim, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    src = tmp_path / "qkv.safetensors"
    save_file({"x_pad_token": torch.zeros(1, dim, dtype=torch.bfloat16), "layers.0.attention.qkv.weight": weight},
              str(src))
    del weight
    peak = _peak(src, "keep", tmp_path / "out")
    tensor = 3 * dim * dim * 2
    bound = tensor * 3 // 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({tensor / 2**20:.0f} MiB the q|k|v)"


def test_the_parts_of_a_fused_weight_are_written_where_they_go(tmp_path):
    """A diffusers DiT converted to the ComfyUI layout: its separate to_q, to_k and to_v were held
    until the last came and joined by a copy into the fused q|k|v, which was then written: the
    weight twice at the peak (a real-width 3 x 3840 x 3840 bf16 q|k|v: 169 MiB above the start for
    an 84 MiB weight, 345 MiB to fp32). Each part is written at its rows of the q|k|v as it comes now
    (``SafetensorsWriter.write(..., row=)``), held no longer: the peak stays under one and a half
    parts, and the file holds the join's values bit for bit. Here those three parts and the
    attention's output projection (read between to_k and to_q) in a DiT file that holds nothing
    else but its pad token, kept as they are."""
    from safetensors.torch import load_file

    dim = 3840
    g = torch.Generator().manual_seed(0)
    parts = {name: (torch.randn(dim, dim, generator=g) * 0.02).bfloat16() for name in ("to_q", "to_k", "to_v")}
    src = tmp_path / "qkv.safetensors"
    save_file({"x_pad_token": torch.zeros(1, dim, dtype=torch.bfloat16),
               "layers.0.attention.to_out.0.weight": torch.zeros(dim, dim, dtype=torch.bfloat16),
               **{f"layers.0.attention.{name}.weight": t for name, t in parts.items()}}, str(src))
    peak = _peak(src, "keep", tmp_path / "out")
    part = dim * dim * 2
    bound = part * 3 // 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({part / 2**20:.0f} MiB a part, {3 * part / 2**20:.0f} MiB the q|k|v)"
    written = load_file(tmp_path / "out" / "out.safetensors")["layers.0.attention.qkv.weight"]
    assert torch.equal(written.view(torch.int16), torch.cat(list(parts.values())).view(torch.int16))


def test_fp8_parts_of_a_fused_weight_are_quantised_where_they_go(tmp_path):
    """fp8 output of a diffusers DiT to the ComfyUI layout joined its separate to_q, to_k and to_v
    (one scale for the fused q|k|v, the amax of all three): held until the last came, copied into
    the join, quantised (a real-width 3 x 3840 x 3840 bf16 q|k|v: 169 MiB above the start for a 42
    MiB result). A first pass computes the amax over the parts, read one at a time; then each part
    is quantised with the fused weight's scale and written at its rows as it comes: the peak stays
    under two parts (one part read, its blocks' fp32 intermediates and what the reads leave resident:
    37 to 42 MiB in separate runs of this test; a held join is three parts and more), and the file
    holds the join's codes and scale bit for bit. The parts' ranges differ, so a scale of one part
    alone would show."""
    from safetensors.torch import load_file

    from zimage_native.converters.convert import quantize_fp8

    dim = 3840
    g = torch.Generator().manual_seed(0)
    parts = {name: (torch.randn(dim, dim, generator=g) * 0.02 * (i + 1)).bfloat16()
             for i, name in enumerate(("to_q", "to_k", "to_v"))}
    src = tmp_path / "qkv.safetensors"
    save_file({"x_pad_token": torch.zeros(1, dim, dtype=torch.bfloat16),
               **{f"layers.0.attention.{name}.weight": t for name, t in parts.items()}}, str(src))
    peak = _peak(src, "fp8", tmp_path / "out")
    part = dim * dim * 2
    bound = part * 2
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({part / 2**20:.0f} MiB a part, {3 * part / 2**20:.0f} MiB the q|k|v)"
    written = load_file(tmp_path / "out" / "out.safetensors")
    want, scale = quantize_fp8(torch.cat(list(parts.values())))
    assert torch.equal(written["layers.0.attention.qkv.weight"].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(written["layers.0.attention.qkv.scale_weight"], scale)


def test_fp8_output_is_written_by_blocks_of_rows(tmp_path):
    """fp8 output was quantised into a whole fp8 tensor, then written: the weight read and its fp8
    result at once (a ComfyUI file's real-width 11520 x 3840 bf16 q|k|v to ComfyUI fp8: 84 + 42 MiB;
    a real-width bf16 DiT of 1050 MiB converted at 136 MiB). Each block of rows is written as it is
    quantised now: the peak stays under the weight and a quarter of it, and the file holds the
    whole-tensor codes bit for bit."""
    from safetensors.torch import load_file

    from zimage_native.converters.convert import quantize_fp8

    dim = 3840
    weight = (torch.randn(3 * dim, dim, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    src = tmp_path / "qkv.safetensors"
    save_file({"x_pad_token": torch.zeros(1, dim, dtype=torch.bfloat16), "layers.0.attention.qkv.weight": weight},
              str(src))
    peak = _peak(src, "fp8", tmp_path / "out")
    tensor = 3 * dim * dim * 2
    bound = tensor * 5 // 4
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({tensor / 2**20:.0f} MiB the q|k|v)"
    written = load_file(tmp_path / "out" / "out.safetensors")
    want, scale = quantize_fp8(weight)
    assert torch.equal(written["layers.0.attention.qkv.weight"].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(written["layers.0.attention.qkv.scale_weight"], scale)


def _quantised_qkv(kind: str, folder: Path) -> tuple[Path, torch.Tensor]:
    """A real-width 11520 x 3840 q|k|v, quantised (``kind``), in a DiT file that holds nothing else
    but its pad token; and its dequantised fp32 values."""
    from zimage_native.formats.fp8 import dequantize
    from zimage_native.formats.gguf import GGUFCheckpoint

    from .test_comfy_quant import comfy_quant_tensor

    dim, key = 3840, "layers.0.attention.qkv.weight"
    if kind == "Q8_0 GGUF":
        src = write_gguf(folder / "qkv.gguf", {
            "x_pad_token": (np.zeros((1, dim), np.float32), "F32"),
            key: (random_blocks("Q8_0", 3 * dim, dim, np.random.default_rng(0)), "Q8_0")}, "lumina2")
        with GGUFCheckpoint(src) as ckpt:
            return src, ckpt.values(key)
    weight = torch.randn(3 * dim, dim, generator=torch.Generator().manual_seed(0)) * 0.02
    if kind == "scaled fp8":
        scale = (weight.abs().max() / 448).reshape(())
        codes = (weight / scale).to(torch.float8_e4m3fn)
        extra = {"layers.0.attention.qkv.scale_weight": scale, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    else:  # comfy_quant int8, a scale per row
        scale = (weight.abs().amax(1, keepdim=True) / 127).float()  # (out, 1)
        codes = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
        extra = {"layers.0.attention.qkv.weight_scale": scale,
                 "layers.0.attention.qkv.comfy_quant": comfy_quant_tensor({"format": "int8_tensorwise"})}
    src = folder / "qkv.safetensors"
    save_file({"x_pad_token": torch.zeros(1, dim, dtype=torch.bfloat16), key: codes, **extra}, str(src))
    return src, dequantize(codes, scale)


@pytest.mark.parametrize("kind", ["Q8_0 GGUF", "scaled fp8", "comfy_quant int8"])
def test_fp8_from_a_quantised_source_dequantises_by_blocks_of_rows(tmp_path, kind):
    """fp8 output from a quantised source dequantised each weight whole to fp32 before quantising
    it by rows: a real-width 11520 x 3840 q|k|v 169 MiB of fp32 at once (a Q8_0 GGUF to fp8: 217
    MiB above the start, 135 to bf16; a scaled-fp8 or int8 file: 177 against 91). Its rows are
    dequantised where they are quantised now (``formats.tensors.ValueRows``), by blocks, the amax
    pass too: the peak stays under the file and a quarter of the fp32 values, and the file holds
    the codes and scale of the whole dequantised weight bit for bit."""
    from safetensors.torch import load_file

    from zimage_native.converters.convert import quantize_fp8

    src, values = _quantised_qkv(kind, tmp_path)
    want, scale = quantize_fp8(values)
    fp32 = values.numel() * 4
    del values
    peak = _peak(src, "fp8", tmp_path / "out")
    bound = src.stat().st_size + fp32 // 4
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB above the start, bound {bound / 2**20:.0f} MiB " \
                         f"({fp32 / 2**20:.0f} MiB of fp32 q|k|v, {src.stat().st_size / 2**20:.0f} MiB the file)"
    written = load_file(tmp_path / "out" / "out.safetensors")
    assert torch.equal(written["layers.0.attention.qkv.weight"].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(written["layers.0.attention.qkv.scale_weight"], scale)
