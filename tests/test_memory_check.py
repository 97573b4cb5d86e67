"""GPU memory at load time: weights that cannot fit on the card are refused before anything is read,
in one line that names each part and what to change; a CUDA out-of-memory error later is one line too.
Without a GPU, the card's free memory (devices.free_memory) and CUDA's presence are faked. The same for
the weights kept in CPU memory (devices.host_memory faked), and the warning when "auto" finds no GPU."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from click.testing import CliRunner

from zimage_native import devices
from zimage_native.devices import InsufficientMemoryError, check_weights_fit
from zimage_native.loading import folder_weight_bytes
from zimage_native.quantize import weight_bytes

from .utils import WeightsRead, patch_weight_reads, refuse_weight_reads

CUDA = torch.device("cuda", 0)
GB = 10**9


@pytest.mark.parametrize("dtype,quant", [(torch.bfloat16, "none"), (torch.float32, "none"), (torch.bfloat16, "int8")])
def test_folder_weight_bytes_equal_the_loaded_components(tiny_model_dir, dtype, quant):
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=dtype, text_encoder_quant=quant)
    loaded = {"transformer": weight_bytes(pipe.transformer), "text_encoder": weight_bytes(pipe.text_encoder.model),
              "vae": weight_bytes(pipe.vae)}
    assert folder_weight_bytes(tiny_model_dir, [], dtype, quant) == loaded
    assert folder_weight_bytes(tiny_model_dir, ["transformer", "text_encoder"], dtype, quant) == {"vae": loaded["vae"]}


def card(monkeypatch, free: int, total: int = 16 * GB):
    """Pretend a CUDA card is present with ``free`` bytes free; returns the list of devices asked about."""
    asked = []
    monkeypatch.setattr(devices, "free_memory", lambda device: asked.append(device) or (free, total))
    return asked


def test_the_peak_counts_what_stays_and_the_largest_visitor(monkeypatch):
    """Components stored on the card count always; offloaded ones visit it one at a time while they
    run, so the largest of them counts on top (the text encoder encodes beside the resident DiT)."""
    asked = card(monkeypatch, free=10 * GB)
    needs = {"transformer": 6 * GB, "text_encoder": 8 * GB, "vae": GB // 5}
    cpu = torch.device("cpu")
    on_card = {"transformer": CUDA, "text_encoder": CUDA, "vae": CUDA}
    check_weights_fit(needs, {**on_card, "text_encoder": cpu})  # the encoder runs on the CPU: 6.2 GB here
    check_weights_fit(needs, on_card, "model")  # one component at a time: 8 GB at the peak
    check_weights_fit(needs, dict.fromkeys(on_card, cpu))  # nothing on a GPU: the card is not even asked
    assert asked == [CUDA, CUDA]
    with pytest.raises(InsufficientMemoryError) as e:
        check_weights_fit(needs, on_card)
    message = str(e.value)
    assert message.startswith("the weights do not fit on cuda:0: transformer 6.00 GB, text encoder 8.00 GB, "
                              "vae 0.20 GB, 14.20 GB at the peak, and the GPU has 10.00 GB free of 16.00 GB")
    assert "--text-encoder-quant int8" in message and "--offload blocks" in message and "\n" not in message
    with pytest.raises(InsufficientMemoryError, match="transformer 6.00 GB, vae 0.20 GB stay there and the text "
                       "encoder \\(8.00 GB\\) joins them while it runs, 14.20 GB at the peak"):
        check_weights_fit(needs, on_card, "text_encoder")  # offloading the encoder does not lower the peak
    card(monkeypatch, free=7 * GB)
    with pytest.raises(InsufficientMemoryError, match="each component runs there alone and the text encoder "
                       "needs 8.00 GB, 8.00 GB at the peak"):
        check_weights_fit(needs, on_card, "model")


def test_each_card_is_checked_on_its_own(monkeypatch):
    free = {0: 9 * GB, 1: 2 * GB}
    monkeypatch.setattr(devices, "free_memory", lambda device: (free[device.index], 24 * GB))
    second = torch.device("cuda", 1)
    check_weights_fit({"transformer": 8 * GB, "vae": GB}, {"transformer": CUDA, "vae": second})
    with pytest.raises(InsufficientMemoryError, match="on cuda:1: vae 3.00 GB"):
        check_weights_fit({"transformer": 8 * GB, "vae": 3 * GB}, {"transformer": CUDA, "vae": second})


def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_loading_is_refused_before_any_weight_is_read(tiny_model_dir, monkeypatch):
    """A card too small for the tiny model's bf16 weights: the load stops before reading a tensor. The
    text encoder placed on the CPU leaves room; offloaded, it still joins the DiT while it encodes;
    with every component offloaded, the largest alone must fit; streamed blocks count as such."""
    import zimage_native.loading as loading
    from zimage_native import footprint
    from zimage_native.config import TransformerConfig

    fake_cuda(monkeypatch)
    refuse_weight_reads(monkeypatch)
    need = folder_weight_bytes(tiny_model_dir, [], torch.bfloat16)
    card(monkeypatch, free=sum(need.values()) - 1)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    with pytest.raises(InsufficientMemoryError, match="transformer .* MB, text encoder .* KB, vae .* KB, .* MB at "
                       "the peak, and the GPU has .* free of 16.00 GB") as e:
        loading.load_pretrained(tiny_model_dir, **kw)
    # the settings that fit this folder on this card, each with its peak (int4 cannot: widths of 48)
    fits = e.value.cli_message.split("To fit, use one of: ")[1]  # (the library's adds its arguments' names)
    assert fits.startswith("--text-encoder-quant int8 (") and "--offload model (1.2 MB at the peak)" in fits
    assert "int4" not in fits and "--offload blocks (" in fits
    assert fits.endswith("(or a GGUF or fp8 DiT file, kept quantised: --transformer FILE)")
    with pytest.raises(InsufficientMemoryError, match="joins them while it runs"):
        loading.load_pretrained(tiny_model_dir, offload="text_encoder", **kw)
    with pytest.raises(WeightsRead):  # it fits without the text encoder: loading starts
        loading.load_pretrained(tiny_model_dir, text_encoder_device="cpu", **kw)
    card(monkeypatch, free=max(need.values()))
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)
    card(monkeypatch, free=max(need.values()) - 1)
    with pytest.raises(InsufficientMemoryError, match="runs there alone and the transformer needs"):
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)
    blocks = folder_weight_bytes(tiny_model_dir, [], torch.bfloat16, offload="blocks")
    cfg = TransformerConfig.from_json(tiny_model_dir / "transformer" / "config.json")
    assert blocks["transformer"] == footprint.dit_bytes(cfg, "bf16", "blocks") < need["transformer"]
    card(monkeypatch, free=blocks["transformer"] + need["vae"] + need["text_encoder"])
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)


def test_the_cli_says_it_in_one_line(tiny_model_dir, monkeypatch, tmp_path):
    from zimage_native.cli import main

    fake_cuda(monkeypatch)
    card(monkeypatch, free=1000, total=8 * GB)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cuda",
                                       "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: the weights do not fit on cuda: transformer 1.2 MB")
    assert "GPU has 1.0 KB free of 8.00 GB" in line
    assert "from_pretrained" not in line  # the Python spelling is for library callers


def test_a_library_caller_is_told_the_arguments_not_only_the_flags(tiny_model_dir, monkeypatch):
    """diffusers' habit, from_pretrained(...) then pipe.enable_model_cpu_offload(), fails here at the
    load on a card too small for the resident weights (the weights go to the GPU as they load); the
    error named only CLI flags (--offload model). It names from_pretrained's arguments too, and the
    way to keep diffusers' order."""
    from zimage_native import ZImagePipeline

    fake_cuda(monkeypatch)
    patch_weight_reads(monkeypatch, lambda *a, **k: pytest.fail("weights read"))
    card(monkeypatch, free=sum(folder_weight_bytes(tiny_model_dir, [], torch.bfloat16).values()) - 1)
    with pytest.raises(InsufficientMemoryError) as e:
        ZImagePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    message = str(e.value)
    assert "--offload model (1.2 MB at the peak)" in message and "\n" not in message
    assert message.endswith('; in Python these are from_pretrained\'s arguments: text_encoder_quant="int8", '
                            'transformer="FILE.gguf", offload="blocks", offload="model" (diffusers\' '
                            'enable_model_cpu_offload(): from_pretrained places the weights on the GPU as it loads, '
                            'so choose it there, or load with device="cpu" and then call '
                            'pipe.enable_model_cpu_offload())')
    assert e.value.cli_message == message.split("; in Python")[0]
    card(monkeypatch, free=1000)  # a component file, checked as it is read
    with pytest.raises(InsufficientMemoryError, match=r'does not fit on cuda:0.*; in Python these are from_pretrained'):
        devices.check_component_fits("transformer", torch.nn.Linear(64, 64), torch.bfloat16, CUDA)


def test_out_of_memory_while_generating_is_one_line_with_advice(tiny_model_dir, monkeypatch, tmp_path):
    """An out-of-memory error past the load (activations: a large size or batch) keeps torch's first
    sentence and adds what lowers memory, instead of a traceback."""
    from zimage_native import sampling
    from zimage_native.cli import main

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "15.57 GiB of which 1.02 GiB is free.\nOf the allocated memory ...")

    monkeypatch.setattr(sampling, "denoise", oom)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu",
                                       "--width", "32", "--height", "32", "--steps", "1",
                                       "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "--width/--height" in line and "--batch-size" in line and "--text-encoder-quant int8" in line
    assert "--tiled-vae (the VAE decode is the peak at 2K and larger)" in line


def test_a_component_file_is_checked_when_it_is_read(tiny_model_dir, tmp_path, monkeypatch):
    """Component files (a single-file DiT, a GGUF DiT kept packed) are weighed from their headers with
    the folder's components before loading, and each is checked again just before its tensors are read,
    against what the card has free then."""
    import zimage_native.loading as loading
    from zimage_native.quantize import weight_bytes

    from .test_gguf import AXES, write_dit

    fake_cuda(monkeypatch)
    single = next((tiny_model_dir / "transformer").glob("*.safetensors"))
    need = folder_weight_bytes(tiny_model_dir, [], torch.bfloat16)
    assert need["text_encoder"] + need["vae"] < need["transformer"]
    card(monkeypatch, free=need["transformer"] - 1)  # room for the folder's text encoder and VAE only
    with pytest.raises(InsufficientMemoryError, match=r"^the weights do not fit on cuda: transformer 1.2 MB, text "
                       r"encoder .* KB, vae .* KB, 2.1 MB at the peak, and the GPU has 1.2 MB free of 16.00 GB"):
        loading.load_pretrained(tiny_model_dir, device="cuda", dtype=torch.bfloat16, transformer=single)

    path, _ = write_dit(tmp_path / "q4k.gguf", "Q4_K")
    packed = weight_bytes(loading.load_component("transformer", path, torch.bfloat16, "cpu", config=AXES))
    card(monkeypatch, free=packed - 1)
    with pytest.raises(InsufficientMemoryError, match="the transformer .* does not fit on cuda:0"):
        loading.load_component("transformer", path, torch.bfloat16, CUDA, config=AXES)
    card(monkeypatch, free=packed)  # exactly the packed bytes (refused at one byte less): reading starts,
    with pytest.raises((RuntimeError, AssertionError), match="CUDA|NVIDIA driver"):  # no GPU here (CPU or CUDA build)
        loading.load_component("transformer", path, torch.bfloat16, CUDA, config=AXES)


def test_free_memory_counts_the_allocators_cache(monkeypatch):
    """Memory PyTorch holds in its cache but does not use (an earlier model's freed tensors) is free
    for the next load, though the driver counts it as taken."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * GB, 16 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 9 * GB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * GB)
    assert devices.free_memory(CUDA) == (7 * GB, 16 * GB)


def test_an_encoder_only_server_checks_its_text_encoder(tiny_model_dir, monkeypatch):
    from zimage_native.server.engine import EncoderOnlyEngine

    fake_cuda(monkeypatch)
    need = folder_weight_bytes(tiny_model_dir, ["transformer", "vae"], torch.bfloat16, "int8")["text_encoder"]
    card(monkeypatch, free=need - 1)
    with pytest.raises(InsufficientMemoryError, match=r"^the weights do not fit on cuda: text encoder \d+\.\d KB, "):
        EncoderOnlyEngine.from_pretrained(tiny_model_dir, device="cuda", dtype=torch.bfloat16, quant="int8")


def test_a_text_encoder_file_is_checked_when_it_is_read(tiny_model_dir, monkeypatch):
    """The truncated Qwen3 (N-1 layers, no head) built on meta must fit before it is read onto the card."""
    import zimage_native.loading as loading

    fake_cuda(monkeypatch)
    folder = tiny_model_dir / "text_encoder"
    need = folder_weight_bytes(tiny_model_dir, ["transformer", "vae"], torch.bfloat16)["text_encoder"]
    card(monkeypatch, free=need - 1000)  # (the check counts the RoPE buffers in bf16, the loaded model in fp32)
    with pytest.raises(InsufficientMemoryError, match=r"^the text encoder \(\d+\.\d KB of weights\) does not fit"):
        loading.load_component("text_encoder", folder, torch.bfloat16, CUDA)
    card(monkeypatch, free=need)
    with pytest.raises((RuntimeError, AssertionError), match="CUDA|NVIDIA driver"):  # it fits: reading starts
        loading.load_component("text_encoder", folder, torch.bfloat16, CUDA)


# ----------------------------------------------------------------------------------- CPU memory


def host(monkeypatch, available: int, swap: int = 0, total: int = 32 * GB):
    """Pretend the machine reports ``available`` bytes of RAM and ``swap`` of free swap."""
    monkeypatch.setattr(devices, "host_memory", lambda: (available, swap, total))


def test_weights_kept_in_cpu_memory_are_checked_before_reading(tiny_model_dir, monkeypatch, caplog):
    """On the CPU (and for what an offload keeps in CPU memory) the weights are weighed against the
    RAM: beyond RAM and swap together the load stops before reading, beyond the RAM it warns."""
    import zimage_native.loading as loading

    refuse_weight_reads(monkeypatch)
    need = folder_weight_bytes(tiny_model_dir, [], torch.float32)
    host(monkeypatch, available=sum(need.values()) - 1)
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    mb = {k: devices.format_bytes(v) for k, v in need.items()}
    total = devices.format_bytes(sum(need.values()))
    assert str(e.value).startswith(
        f"the weights do not fit in CPU memory: transformer {mb['transformer']}, text encoder {mb['text_encoder']}, "
        f"vae {mb['vae']}, {total} in all, and this machine has {total} of RAM available of 32.00 GB and 0 bytes of "
        f"free swap. To fit, load in bfloat16 (--dtype bfloat16)")
    with pytest.raises(WeightsRead):  # half the bytes in bf16: it fits, reading starts
        loading.load_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    host(monkeypatch, available=sum(need.values()) - 1, swap=GB)
    caplog.clear()
    with pytest.raises(WeightsRead):  # with swap it fits, slowly: a warning, and reading starts
        loading.load_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    assert f"exceed the available RAM ({total} of 32.00 GB): the system will swap" in caplog.text

    # on a GPU, only what an offload keeps in CPU memory counts: the text encoder between its uses
    fake_cuda(monkeypatch)
    card(monkeypatch, free=16 * GB)
    host(monkeypatch, available=need["text_encoder"] - 1)
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, device="cuda", dtype=torch.float32)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: text encoder "
                       rf"{mb['text_encoder']}, and this machine has .* of RAM available"):
        loading.load_pretrained(tiny_model_dir, device="cuda", dtype=torch.float32, offload="text_encoder")


def test_streamed_blocks_are_pinned_and_swap_cannot_hold_them(tiny_model_dir, monkeypatch):
    """With --offload blocks on a GPU the DiT stays in page-locked CPU memory: it must fit in the RAM
    itself; swap only counts for the rest."""
    import zimage_native.loading as loading

    refuse_weight_reads(monkeypatch)
    fake_cuda(monkeypatch)
    card(monkeypatch, free=16 * GB)
    need = folder_weight_bytes(tiny_model_dir, [], torch.float32)
    host(monkeypatch, available=need["transformer"] - 1, swap=GB)
    kw = dict(device="cuda", dtype=torch.float32)
    with pytest.raises(InsufficientMemoryError, match=r"of which the transformer \(.* MB\) is pinned for "
                       r"streaming, which swap cannot hold"):
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    with pytest.raises(WeightsRead):  # model offload keeps it pageable: swap may hold it
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)
    host(monkeypatch, available=need["transformer"], swap=GB)
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)


def test_the_pinned_refusal_names_only_routes_that_fit(tiny_model_dir, monkeypatch):
    """The refusal of a DiT too large for the RAM under --offload blocks named --offload model, "which
    swap can hold", where RAM and swap together cannot hold every component either: followed, that
    load was refused too. --offload model is named only where it fits, a smaller DiT with the largest
    size that fits, and the RAM to free; each one followed, reading starts."""
    import zimage_native.loading as loading

    refuse_weight_reads(monkeypatch)
    fake_cuda(monkeypatch)
    card(monkeypatch, free=16 * GB)
    need = folder_weight_bytes(tiny_model_dir, [], torch.float32)
    dit, encoder, everything = need["transformer"], need["text_encoder"], sum(need.values())
    kw = dict(device="cuda", dtype=torch.float32)
    fmt = devices.format_bytes
    available, swap = dit - 1, encoder  # the pinned DiT lacks a byte; --offload model lacks the VAE's bytes
    host(monkeypatch, available, swap)
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    short = dit - available  # the rest (the text encoder) fits in the swap
    assert str(e.value).endswith(
        f"To fit, use a smaller DiT (a GGUF file, --transformer FILE.gguf) whose weights take at most "
        f"{fmt(dit - short)} or free {fmt(short)} of RAM (--offload model does not fit either: it keeps {fmt(everything)} "
        f"of weights in pageable CPU memory, more than the RAM and free swap hold together, {fmt(available + swap)}); "
        f'in Python these are from_pretrained\'s arguments: transformer="FILE.gguf"')
    with pytest.raises(InsufficientMemoryError, match="^the weights do not fit in CPU memory"):
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)  # the route it no longer names
    host(monkeypatch, available + short, swap)  # the RAM it said to free, freed
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)

    host(monkeypatch, available, swap=everything - available)  # RAM and swap hold every component
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    assert str(e.value).endswith(
        f"To fit, keep it in pageable CPU memory, which swap can hold (--offload model), use a smaller DiT (a GGUF "
        f"file, --transformer FILE.gguf) whose weights take at most {fmt(available)} or free 1 byte of RAM; in Python "
        f'these are from_pretrained\'s arguments: offload="model", transformer="FILE.gguf"')
    with pytest.raises(WeightsRead):  # the route it names fits: reading starts
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)

    host(monkeypatch, encoder // 2, swap=0)  # not even the text encoder fits: only freeing RAM is left
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    short = dit + encoder - encoder // 2
    assert f"To fit, free {fmt(short)} of RAM (--offload model does not fit either" in str(e.value)
    assert "smaller DiT" not in str(e.value) and "in Python" not in str(e.value)
    host(monkeypatch, encoder // 2 + short, swap=0)
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)



def test_the_pinned_refusal_names_offload_model_only_where_its_largest_component_fits_on_the_gpu(
        tiny_model_dir, monkeypatch):
    """--offload blocks refused for a DiT the RAM cannot pin named --offload model wherever RAM and
    swap hold every component, without asking the GPU: under model offload each component visits
    the GPU whole, so a DiT larger than its free memory was refused there too (the GPU check,
    followed). The sizes are the headers' (folder_weight_bytes, before any read): --offload model is
    named only when the largest visitor fits in the free memory, and the refusal says why not."""
    import zimage_native.loading as loading

    refuse_weight_reads(monkeypatch)
    fake_cuda(monkeypatch)
    need = folder_weight_bytes(tiny_model_dir, [], torch.float32, "none", "model")
    largest = max(need.values())
    everything = sum(folder_weight_bytes(tiny_model_dir, [], torch.float32).values())
    kw = dict(device="cuda", dtype=torch.float32)
    available = folder_weight_bytes(tiny_model_dir, [], torch.float32)["transformer"] - 1  # the pinned DiT lacks a byte
    host(monkeypatch, available, swap=everything - available)  # RAM and swap hold every component
    card(monkeypatch, free=largest - 1)  # the largest visitor lacks a byte on the card
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    assert "(--offload model)" not in str(e.value) and 'offload="model"' not in str(e.value)
    assert "(--offload model does not fit either: the transformer visits cuda whole" in str(e.value)
    with pytest.raises(InsufficientMemoryError, match="^the weights do not fit on cuda"):
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)  # the route it no longer names
    card(monkeypatch, free=largest)  # it fits: named, and followed, reading starts
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    assert "(--offload model)" in str(e.value) and 'offload="model"' in str(e.value)
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)


@pytest.mark.parametrize("form", ["safetensors", "fp8", "gguf"])
def test_a_dit_file_streamed_from_pinned_memory_must_fit_in_the_ram(tiny_model_dir, tmp_path, monkeypatch, form):
    """--offload blocks with --transformer FILE (the 8gb profile's GGUF DiT, an fp8 or a bf16 file):
    the file's DiT was left out of the pinned check made for a folder's DiT (its bytes come from the
    file, not the folder's config) and was read with RAM and swap counted, to be page-locked after;
    now its load is refused when the RAM alone cannot hold it, and --offload model (pageable) reads it."""
    import zimage_native.gguf_loading as gguf_loading
    import zimage_native.loading as loading

    from .test_formats import comfy_dit, to_fp8, write

    comfy = comfy_dit(tiny_model_dir, prefix="")
    if form == "gguf":
        pytest.importorskip("gguf")
        import numpy as np

        from .gguf_files import gguf_state, write_gguf

        path = write_gguf(tmp_path / "dit-Q8_0.gguf", gguf_state(comfy, "Q8_0", np.random.default_rng(0))[0], "lumina2")
    else:
        path = write(tmp_path / "dit.safetensors", to_fp8(comfy, True)[0] if form == "fp8" else comfy)

    def read(*args, **kwargs):
        raise WeightsRead

    monkeypatch.setattr(loading, "read_weights", read)
    monkeypatch.setattr(gguf_loading, "read_weights", read)
    fake_cuda(monkeypatch)
    card(monkeypatch, free=16 * GB)
    text_encoder = folder_weight_bytes(tiny_model_dir, ["transformer"], torch.float32)["text_encoder"]
    host(monkeypatch, available=2 * text_encoder, swap=GB)  # the text encoder fits; the DiT only with swap
    kw = dict(device="cuda", dtype=torch.float32, transformer=path)
    with pytest.raises(InsufficientMemoryError, match=r"^the weights do not fit in CPU memory: transformer .*, of "
                       r"which the transformer \(.*\) is pinned for streaming, which swap cannot hold"):
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    with pytest.raises(WeightsRead):  # model offload keeps it pageable: swap may hold it
        loading.load_pretrained(tiny_model_dir, offload="model", **kw)
    host(monkeypatch, available=GB, swap=0)
    with pytest.raises(WeightsRead):
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)


def test_a_component_read_into_cpu_memory_is_checked_too(tiny_model_dir, monkeypatch):
    import zimage_native.loading as loading

    single = next((tiny_model_dir / "transformer").glob("*.safetensors"))
    need = folder_weight_bytes(tiny_model_dir, [], torch.float32)["transformer"]
    host(monkeypatch, available=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: transformer "
                       rf"{devices.format_bytes(need)}, and this machine has"):
        loading.load_component("transformer", single, torch.float32, "cpu", tiny_model_dir / "transformer")
    host(monkeypatch, available=need)
    loading.load_component("transformer", single, torch.float32, "cpu", tiny_model_dir / "transformer")


def test_a_cpu_decode_that_cannot_fit_is_refused_before_any_model_runs(tiny_pipe, monkeypatch, caplog):
    """An untiled VAE decode on the CPU that the RAM and swap cannot hold got the process killed at the
    end of sampling (a library user, a server with every queued job): the library refuses it before the
    text encoder runs, for every task (the img2img encode peaks lower), and warns once about one that
    needs swap. Latents out and a GPU's VAE are not checked; tiles are (next test)."""
    from PIL import Image

    monkeypatch.setattr(tiny_pipe, "vae_tiling", None)
    monkeypatch.setattr(devices, "_swap_warned", set())
    need = devices.decode_bytes(64, 48, 2, tiny_pipe.vae_config.block_out_channels[0], torch.float32)
    assert need == 32 * 32 * 64 * 48 * 2  # the tiny VAE: 32 channels at full resolution
    call = dict(width=64, height=48, num_inference_steps=1, seed=[1, 2])
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    real = tiny_pipe.encode_texts
    host(monkeypatch, need // 2, need // 4, 8 * need)
    monkeypatch.setattr(tiny_pipe, "encode_texts", lambda *a, **k: pytest.fail("the text encoder ran"))
    for extra in ({}, {"image": image, "strength": 0.5}, {"image": image, "mask_image": Image.new("L", (64, 48), 255)}):
        with pytest.raises(InsufficientMemoryError, match=r"^the VAE decode of 2 images at 64x48 in one piece "
                           r"needs about 6\.3 MB of CPU memory, and this machine has 3\.1 MB of RAM available "
                           r"\(of 50\.3 MB\) and 1\.6 MB of free swap: .* use --tiled-vae"):
            tiny_pipe(["a cat", "a dog"], **call, **extra)
    monkeypatch.setattr(tiny_pipe, "encode_texts", real)
    assert tiny_pipe(["a cat", "a dog"], **call, output_type="latent").images.shape[0] == 2  # no decode
    placement = dict(tiny_pipe.placement, vae=torch.device("meta"))  # a VAE on another device: its own errors
    monkeypatch.setattr(tiny_pipe, "placement", placement)
    monkeypatch.setattr(tiny_pipe, "decode", lambda latents: torch.zeros(2, 3, 48, 64))
    assert len(tiny_pipe(["a cat", "a dog"], **call).images) == 2
    monkeypatch.setattr(tiny_pipe, "placement", dict(placement, vae=torch.device("cpu")))
    host(monkeypatch, need // 2, need, 8 * need)  # fits with swap: one warning for the size
    with caplog.at_level("WARNING", logger="zimage_native.devices"):
        for _ in range(2):
            tiny_pipe(["a cat", "a dog"], **call)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "the VAE decode of 2 images at 64x48 in one piece needs about 6.3 MB of CPU memory, more than the 3.1 MB of "
        "RAM available"]


def test_a_tiled_decode_is_checked_for_the_tile_it_decodes(tiny_pipe, monkeypatch, caplog):
    """--tiled-vae with a tile as large as the image (--tile-size 4096 at 1024x1024) decodes the image
    in one piece (measured with the released VAE at 1024x1024 in fp32: 3841 MiB above the weights,
    untiled 3841 MiB), but the CPU decode check was skipped for any tiled decode: now a tiled decode
    is weighed for the tile it decodes (at most the image) plus its fp32 blend buffers, refused with
    advice about the tile size, and one in smaller tiles runs where the one-tile decode could not."""
    monkeypatch.setattr(devices, "_swap_warned", set())
    channels = tiny_pipe.vae_config.block_out_channels[0]
    call = dict(width=128, height=96, num_inference_steps=1, seed=[1, 2])
    whole = devices.decode_bytes(128, 96, 2, channels, torch.float32) + devices.blend_bytes(2) * 128 * 96
    tiles = devices.decode_bytes(64, 64, 2, channels, torch.float32) + devices.blend_bytes(2) * 128 * 96
    assert devices.blend_bytes(2) == 52 and tiles < whole // 2
    host(monkeypatch, tiles, 0, 8 * whole)  # room for 64x64 tiles, not for the whole image
    real = tiny_pipe.encode_texts
    monkeypatch.setattr(tiny_pipe, "encode_texts", lambda *a, **k: pytest.fail("the text encoder ran"))
    try:
        for size in (4096, 128):  # not smaller than the image: one tile
            tiny_pipe.enable_vae_tiling(size, 16)
            with pytest.raises(InsufficientMemoryError, match=r"^the VAE decode of 2 images at 128x96 in one tile "
                               r"\(the tile size is not smaller than the image\) needs about "
                               rf"{re.escape(devices.format_bytes(whole))} of CPU memory, .*"
                               r"use a smaller --tile-size"):
                tiny_pipe(["a cat", "a dog"], **call)
        tiny_pipe.enable_vae_tiling(64, 16)
        monkeypatch.setattr(tiny_pipe, "encode_texts", real)
        decoded = []
        monkeypatch.setattr(tiny_pipe.vae, "decode", lambda z, real=tiny_pipe.vae.decode, **kw: decoded.append(z.shape)
                            or real(z, **kw))
        assert len(tiny_pipe(["a cat", "a dog"], **call).images) == 2
        assert decoded and all(tuple(shape[2:]) == (8, 8) for shape in decoded), decoded  # 64x64 pixel tiles
        host(monkeypatch, tiles // 2, tiles, 8 * whole)  # the tiles fit with swap: one warning, naming them
        with caplog.at_level("WARNING", logger="zimage_native.devices"):
            tiny_pipe(["a cat", "a dog"], **call)
        assert [r.getMessage().split(":")[0] for r in caplog.records] == [
            f"the VAE decode of 2 images at 128x96 in tiles of 64x64 needs about {devices.format_bytes(tiles)} of "
            f"CPU memory, more than the {devices.format_bytes(tiles // 2)} of RAM available"]
    finally:
        tiny_pipe.disable_vae_tiling()


def test_the_decode_estimate_covers_the_measured_peaks():
    """Peak RSS above the weights of an untiled decode with the released VAE config (random weights,
    CPU, torch 2.13.0), per output pixel: 3841 B in fp32 and 2185 B in bf16, not half (the old estimate,
    8 activations in the VAE's dtype, gave 2048 B in bf16); the img2img encode: 3072 and 1536 B per
    input pixel, below the decode's."""
    released = 128  # block_out_channels[0]
    measured = {torch.float32: (3841, 3072), torch.bfloat16: (2185, 1536)}
    for dtype, (decode, encode) in measured.items():
        estimate = devices.decode_bytes(1024, 1024, 1, released, dtype) / 1024**2
        assert decode <= estimate <= 1.1 * decode and encode < decode, (dtype, estimate)
    assert devices.decode_bytes(2048, 2048, 1, released, torch.float32) == 17_179_869_184  # 16.1 GB measured


def test_host_memory_reads_meminfo_and_a_containers_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"
                       "SwapTotal:       4000000 kB\nSwapFree:        3000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert devices.host_memory(meminfo, cgroup) == (20_480_000_000, 3_072_000_000, 32_768_000_000)
    (cgroup / "memory.max").write_text("max\n")
    assert devices.host_memory(meminfo, cgroup) == (20_480_000_000, 3_072_000_000, 32_768_000_000)
    # a container limited to 8 GB that uses 6 GB, 2 GB of it reclaimable page cache, and no swap
    (cgroup / "memory.max").write_text(f"{8 * GB}\n")
    (cgroup / "memory.current").write_text(f"{6 * GB}\n")
    (cgroup / "memory.stat").write_text(f"anon {4 * GB}\nfile {2 * GB}\ninactive_file {2 * GB}\n")
    (cgroup / "memory.swap.max").write_text("0\n")
    (cgroup / "memory.swap.current").write_text("0\n")
    assert devices.host_memory(meminfo, cgroup) == (4 * GB, 0, 8 * GB)
    # no /proc/meminfo and no psutil (macOS or Windows without it): not known, no check
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "psutil", None)
        assert devices.host_memory(tmp_path / "missing", cgroup) is None


@pytest.mark.parametrize("cuda_build,nvidia,expected", [
    (None, True, "this machine has an NVIDIA GPU but torch .* is a CPU-only build: install a CUDA build of torch"),
    ("12.8", True, "is built for CUDA 12.8 but cannot use this machine's NVIDIA GPU: check the driver with nvidia-smi"),
    (None, False, r"^the model runs on the CPU, which takes minutes per image at 1024x1024 \(pass --device cpu, or "
                  r"device=\"cpu\" in Python, to silence this warning\): no CUDA GPU is visible to torch$"),
])
def test_falling_back_to_the_cpu_says_why(monkeypatch, caplog, cuda_build, nvidia, expected):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: nvidia)
    caplog.clear()
    devices.warn_if_cpu_fallback("auto", torch.device("cpu"))
    assert len(caplog.records) == 1
    assert re.search(expected, caplog.records[0].getMessage())
    caplog.clear()
    for asked, got in [("cpu", "cpu"), (None, "cuda"), ("auto", "mps")]:
        devices.warn_if_cpu_fallback(asked, torch.device(got))
    assert caplog.records == []


def test_generate_with_the_default_device_warns_on_a_machine_without_a_gpu(tiny_model_dir, tmp_path, monkeypatch,
                                                                            caplog):
    from zimage_native.cli import main

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--width", "32",
                                       "--height", "32", "--steps", "1", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    assert "is a CPU-only build: install a CUDA build of torch" in caplog.text


def test_weights_that_fit_but_leave_little_room_warn(monkeypatch, caplog):
    """The example profiles leave a quarter of the card for activations: weights that fit but take
    more than three quarters load with a warning naming what to do if generating runs out."""
    needs = {"transformer": 12 * GB, "text_encoder": 8 * GB, "vae": GB // 5}
    on_card = {"transformer": CUDA, "text_encoder": CUDA, "vae": CUDA}
    card(monkeypatch, free=23 * GB, total=24 * GB)  # a 24 GB card and the resident bf16 model
    caplog.clear()
    check_weights_fit(needs, on_card)
    assert "the weights take 20.20 GB of cuda:0's 24.00 GB at the peak, more than 75%; activations come on top" \
        in caplog.text and "`zimage env` names it) or --tiled-vae" in caplog.text
    caplog.clear()
    check_weights_fit({**needs, "text_encoder": 4 * GB}, on_card)  # 16.2 GB of 24: room left, quiet
    assert caplog.text == ""


def test_host_memory_without_proc_asks_psutil(tmp_path, monkeypatch):
    """macOS and Windows have no /proc/meminfo: psutil answers where it is installed, else nothing."""
    from types import SimpleNamespace

    fake = SimpleNamespace(virtual_memory=lambda: SimpleNamespace(available=5 * GB, total=16 * GB),
                           swap_memory=lambda: SimpleNamespace(free=2 * GB))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert devices.host_memory(tmp_path / "no-meminfo") == (5 * GB, 2 * GB, 16 * GB)
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: import fails
    assert devices.host_memory(tmp_path / "no-meminfo") is None


def test_apple_silicon_weights_take_the_ram(monkeypatch):
    """On a Mac the GPU ("mps") shares the RAM: its weights count against the RAM like the CPU's."""
    mps, cpu = torch.device("mps"), torch.device("cpu")
    needs = {"transformer": 12 * GB, "text_encoder": 8 * GB, "vae": GB // 5}
    host(monkeypatch, available=16 * GB, swap=GB)
    with pytest.raises(InsufficientMemoryError, match=r"^the weights do not fit in memory \(Apple silicon's GPU shares "
                       r"the RAM\): transformer 12.00 GB, text encoder 8.00 GB, vae 0.20 GB, 20.20 GB in all"):
        devices.check_host_memory(needs, dict.fromkeys(needs, mps))
    devices.check_host_memory({**needs, "text_encoder": 2 * GB}, {**dict.fromkeys(needs, mps), "text_encoder": cpu})
    devices.check_host_memory(needs, dict.fromkeys(needs, CUDA))  # a discrete GPU's weights do not count


def test_a_torch_newer_than_the_driver_says_so(monkeypatch):
    """The second usual cause of no GPU: torch built for a newer CUDA than the driver supports."""
    import subprocess

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    smi = "| NVIDIA-SMI 535.183.01   Driver Version: 535.183.01   CUDA Version: 12.2     |\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, smi, ""))
    assert devices.driver_cuda_version() == "12.2"
    assert "is built for CUDA 12.8, newer than the 12.2 this machine's NVIDIA driver supports: update the " \
           "driver, or install a torch built for CUDA 12.2 or older" in devices.gpu_missing_reason()
    monkeypatch.setattr(devices, "driver_cuda_version", lambda: "13.0")  # new enough: something else
    assert "check the driver with nvidia-smi" in devices.gpu_missing_reason()


def test_an_fp8_dit_file_keeps_its_float8_weights_where_the_upcast_ones_would_not_fit(monkeypatch):
    """``load_component(keep_fp8=None)``: kept in CPU memory; on a GPU only where the upcast weights
    would leave less than a quarter of the card free (upcast weights need no per-forward dequantisation);
    never on Apple's Metal, which has no float8."""
    cuda = torch.device("cuda", 0)
    card(monkeypatch, free=15 * GB, total=16 * GB)  # 16 GB card, nothing loaded yet
    upcast = 12_309_817_472  # the bf16 DiT
    assert devices.keeps_fp8_here(upcast, cuda)  # 12.3 GB of 16 would leave 3.7 GB: under a quarter
    card(monkeypatch, free=23 * GB, total=24 * GB)
    assert not devices.keeps_fp8_here(upcast, cuda)  # a 24 GB card: upcast
    card(monkeypatch, free=14 * GB, total=24 * GB)  # the same card with a text encoder loaded first
    assert devices.keeps_fp8_here(upcast, cuda)
    assert devices.keeps_fp8_here(upcast, torch.device("cpu"))
    assert not devices.keeps_fp8_here(upcast, torch.device("mps"))


def test_a_module_kept_as_stored_is_weighed_in_the_files_dtypes(tmp_path, monkeypatch):
    """load_module(dtype=None) keeps each tensor as the file stores it: a bf16 DiT (one fp32 tensor
    beside) is weighed in those dtypes, not in the fp32 of the module built on meta, which refused
    one that fits at about twice its bytes."""
    from safetensors.torch import save_file

    from zimage_native.config import TransformerConfig
    from zimage_native.loading import load_module
    from zimage_native.model.transformer import ZImageTransformer

    from .dit_configs import TINY_DIT

    config = TransformerConfig.from_dict(TINY_DIT)
    state = {k: v if k == "x_pad_token" else v.to(torch.bfloat16) for k, v in ZImageTransformer(config).state_dict().items()}
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    need = sum(t.numel() * t.element_size() for t in state.values())
    host(monkeypatch, available=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: transformer "
                                                      rf"{devices.format_bytes(need)}, "):
        load_module(lambda: ZImageTransformer(config), tmp_path, None, "cpu", "transformer")
    host(monkeypatch, available=need)  # exactly its bytes: it loads, as stored
    model = load_module(lambda: ZImageTransformer(config), tmp_path, None, "cpu", "transformer")
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in state.items()}
    assert weight_bytes(model) == need


#: load_component(dtype=None) sources: (name, kind, convert_checkpoint's output layout and dtype, load_component
#: keywords). The DiT in the ComfyUI layout (a fused q|k|v under other names than the module's), in scaled fp8
#: with its float8 linears kept (the other tensors bf16 as stored) or dequantised (to fp32), the VAE in the LDM
#: layout and the text encoder, all in bf16 otherwise.
KEPT_AS_STORED = [
    ("dit-bf16", "transformer", ("comfyui", "bf16"), {}),
    ("dit-fp8-kept", "transformer", ("comfyui", "fp8"), {"keep_fp8": True}),
    ("dit-fp8-dequantised", "transformer", ("comfyui", "fp8"), {"keep_fp8": False}),
    ("vae-bf16", "vae", ("ldm", "bf16"), {}),
    ("text-encoder-bf16", "text_encoder", ("transformers", "bf16"), {}),
    ("text-encoder-bf16-int8", "text_encoder", ("transformers", "bf16"), {"quant": "int8"}),
]


@pytest.mark.parametrize("name, kind, converted, kwargs", KEPT_AS_STORED, ids=[c[0] for c in KEPT_AS_STORED])
def test_a_component_file_kept_as_stored_is_weighed_in_the_dtypes_it_is_read_in(tiny_model_dir, tmp_path, monkeypatch,
                                                                                name, kind, converted, kwargs):
    """load_component(dtype=None, its default) keeps each tensor as the file stores it (dequantised
    ones in fp32): the component is weighed in those dtypes, as load_module and load_controlnet weigh
    theirs, not in the fp32 of the module built on meta, which refused a bf16 one that fits at twice
    its bytes (the tiny DiT in bf16, 1.2 MB, as 2.4 MB)."""
    from zimage_native.converters.convert import convert_checkpoint
    from zimage_native.loading import load_component

    folder = {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder"}[kind]
    src = tmp_path / f"{name}.safetensors"
    convert_checkpoint(tiny_model_dir / folder, src, converted[0], dtype=converted[1])
    config = str(tiny_model_dir / "transformer" / "config.json") if kind == "transformer" else None
    model = load_component(kind, src, None, "cpu", config, **kwargs)
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    what = kind.replace("_", " ")
    host(monkeypatch, available=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit in CPU memory: {what} "
                                                      rf"{devices.format_bytes(need)}, "):
        load_component(kind, src, None, "cpu", config, **kwargs)
    host(monkeypatch, available=need)  # exactly its bytes: it loads, as stored
    loaded = load_component(kind, src, None, "cpu", config, **kwargs)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()}


def test_the_pinned_refusal_of_a_dit_file_names_offload_model_only_where_the_file_fits_on_the_gpu(
        tiny_model_dir, tmp_path, monkeypatch):
    """--transformer FILE --offload blocks, the file's DiT too large for the RAM to pin: the refusal
    (the file's own check, its DiT left out of the folder's) named --offload model without asking the
    GPU, where the DiT visits whole, and followed, offload="model" read the file with no GPU check of
    the DiT. The DiT's bytes are the file header's (footprint.dit_file_bytes), as loaded on the GPU."""
    import zimage_native.loading as loading
    from zimage_native import footprint

    from .test_formats import comfy_dit, write

    path = write(tmp_path / "dit.safetensors", comfy_dit(tiny_model_dir, prefix=""))
    refuse_weight_reads(monkeypatch)
    fake_cuda(monkeypatch)
    dit = footprint.dit_file_bytes(path, "fp32", config=tiny_model_dir / "transformer" / "config.json")
    others = folder_weight_bytes(tiny_model_dir, ["transformer"], torch.float32, "none", "model")
    assert dit > max(others.values())  # the DiT is the largest visitor
    host(monkeypatch, available=dit - 1, swap=10 * dit)  # the pinned DiT lacks a byte; swap holds it pageable
    kw = dict(device="cuda", dtype=torch.float32, transformer=path)
    card(monkeypatch, free=dit - 1)  # the DiT lacks a byte on the card
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    assert "(--offload model)" not in str(e.value) and 'offload="model"' not in str(e.value)
    assert "(--offload model does not fit either: the transformer visits cuda whole" in str(e.value)
    card(monkeypatch, free=dit)  # it fits: named
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, offload="blocks", **kw)
    assert "(--offload model)" in str(e.value) and 'offload="model"' in str(e.value)


@pytest.mark.parametrize("offload", ["none", "model"])
@pytest.mark.parametrize("form", ["fp32", "fp8"])
def test_a_dit_file_is_weighed_against_the_gpu_with_the_folders_components(tiny_model_dir, tmp_path, monkeypatch,
                                                                            form, offload):
    """--transformer FILE was left out of the check before loading (skip): a DiT file too large for the
    card was read whole (offload "none": refused by its own check only when the DiT alone did not fit,
    after nothing was weighed with it; "model": read into CPU memory, out of memory when it ran). It is
    weighed from its header (an fp8 file's float8 layers kept, the least the loader keeps) with the
    folder's components, refused at one byte short in the folder's words and advice, read at an exact fit."""
    import zimage_native.gguf_loading as gguf_loading
    import zimage_native.loading as loading
    from zimage_native import footprint
    from zimage_native.devices import format_bytes, weight_peak

    from .test_formats import comfy_dit, to_fp8, write

    comfy = comfy_dit(tiny_model_dir, prefix="")
    path = write(tmp_path / "dit.safetensors", to_fp8(comfy, True)[0] if form == "fp8" else comfy)
    refuse_weight_reads(monkeypatch)

    def read(*args, **kwargs):
        raise WeightsRead

    monkeypatch.setattr(loading, "read_weights", read)
    monkeypatch.setattr(gguf_loading, "read_weights", read)
    fake_cuda(monkeypatch)
    dit = footprint.dit_file_bytes(path, "fp32", config=tiny_model_dir / "transformer" / "config.json")
    folder_dit = folder_weight_bytes(tiny_model_dir, [], torch.float32)["transformer"]
    assert (dit < folder_dit) if form == "fp8" else (dit == folder_dit)  # the file's own bytes
    needs = {**folder_weight_bytes(tiny_model_dir, ["transformer", "vae"], torch.float32, "none", offload),
             "transformer": dit}  # (the VAE on the CPU: the DiT is the largest on the card)
    peak = weight_peak(needs, dict.fromkeys(needs, CUDA), offload, CUDA)[0]
    assert peak == (dit if offload == "model" else sum(needs.values()))  # the file's DiT counts in the peak
    kw = dict(device="cuda", dtype=torch.float32, transformer=path, offload=offload, vae_device="cpu")
    card(monkeypatch, free=peak - 1)
    with pytest.raises(InsufficientMemoryError) as e:
        loading.load_pretrained(tiny_model_dir, **kw)
    message = e.value.cli_message
    alone = "each component runs there alone and the " if offload == "model" else ""
    assert message.startswith(f"the weights do not fit on cuda: {alone}transformer")
    assert f"{format_bytes(peak)} at the peak, and the GPU has {format_bytes(peak - 1)} free" in message
    if offload == "none":  # the advice weighs the file too: each component visits alone under --offload model
        assert f"--offload model ({format_bytes(dit)} at the peak)" in message
    card(monkeypatch, free=peak)  # an exact fit: reading starts (an fp8 file's scales onto the card: no GPU here)
    with pytest.raises((WeightsRead, RuntimeError, AssertionError)) as e:
        loading.load_pretrained(tiny_model_dir, **kw)
    assert e.type is WeightsRead or re.search("CUDA|NVIDIA driver", str(e.value))


def _refused_short_read_at_a_fit(monkeypatch, folder, what: str, need: int, kw: dict) -> None:
    """load_pretrained(folder, **kw) with ``what`` (``need`` bytes) alone on the fake card: refused one
    byte short in the folder's words, before anything is read; at an exact fit reading starts."""
    import zimage_native.loading as loading
    from zimage_native.devices import format_bytes

    card(monkeypatch, free=need - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"^the weights do not fit on cuda: .*{what} "
                       rf"(needs )?{format_bytes(need)}, {format_bytes(need)} at the peak, and the GPU has "
                       rf"{format_bytes(need - 1)} free"):
        loading.load_pretrained(folder, **kw)
    card(monkeypatch, free=need)  # an exact fit: reading starts
    with pytest.raises(WeightsRead):
        loading.load_pretrained(folder, **kw)


@pytest.mark.parametrize("offload", ["none", "model"])
def test_a_text_encoder_file_is_weighed_against_the_gpu_before_loading(tiny_model_dir, tmp_path, monkeypatch, offload):
    """--text-encoder FILE, the one component on the card: weighed from its header
    (footprint.text_encoder_file_bytes, with --text-encoder-quant) before anything is read."""
    from zimage_native import footprint

    from .test_formats import prefixed_te, write

    path = write(tmp_path / "te.safetensors", prefixed_te(tiny_model_dir))
    refuse_weight_reads(monkeypatch)
    fake_cuda(monkeypatch)
    te = footprint.text_encoder_file_bytes(path, "fp32", "int8", tiny_model_dir / "text_encoder" / "config.json")
    assert te < folder_weight_bytes(tiny_model_dir, [], torch.float32)["text_encoder"]  # int8: the quant counts
    kw = dict(device="cuda", dtype=torch.float32, text_encoder=path, text_encoder_quant="int8", offload=offload,
              dit_device="cpu", vae_device="cpu")
    _refused_short_read_at_a_fit(monkeypatch, tiny_model_dir, "text encoder", te, kw)


@pytest.mark.parametrize("offload", ["none", "model"])
def test_a_vae_file_is_weighed_against_the_gpu_before_loading(tiny_model_dir, tmp_path, monkeypatch, offload):
    """--vae FILE, the one component on the card: weighed from its header (footprint.vae_file_bytes,
    the config the loader infers from the file) before anything is read; it was left out of the check
    and the DiT was read before the VAE's own check at its load."""
    from zimage_native import footprint

    from .test_formats import ldm_vae, write

    path = write(tmp_path / "ae.safetensors", ldm_vae(tiny_model_dir))
    refuse_weight_reads(monkeypatch)
    fake_cuda(monkeypatch)
    vae = footprint.vae_file_bytes(path, "fp32", tiny_model_dir / "vae" / "config.json")
    assert vae == folder_weight_bytes(tiny_model_dir, [], torch.float32)["vae"]  # the same VAE, another layout
    kw = dict(device="cuda", dtype=torch.float32, vae=path, offload=offload, dit_device="cpu",
              text_encoder_device="cpu")
    _refused_short_read_at_a_fit(monkeypatch, tiny_model_dir, "vae", vae, kw)
