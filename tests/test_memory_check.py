"""GPU memory at load time: weights that cannot fit on the card are refused before anything is read,
in one line that names each part and what to change; a CUDA out-of-memory error later is one line too.
Without a GPU, the card's free memory (devices.free_memory) and CUDA's presence are faked."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from zimage_native import devices
from zimage_native.devices import InsufficientMemoryError, check_weights_fit
from zimage_native.loading import folder_weight_bytes
from zimage_native.quantize import weight_bytes

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


def test_weights_that_fit_pass_and_only_gpu_components_count(monkeypatch):
    asked = card(monkeypatch, free=10 * GB)
    needs = {"transformer": 6 * GB, "text_encoder": 8 * GB, "vae": GB // 5}
    cpu = torch.device("cpu")
    check_weights_fit(needs, {"transformer": CUDA, "text_encoder": cpu, "vae": CUDA})  # 6.2 GB on the card
    check_weights_fit(needs, {"transformer": cpu, "text_encoder": cpu, "vae": cpu})  # nothing on a GPU
    assert asked == [CUDA]
    with pytest.raises(InsufficientMemoryError) as e:
        check_weights_fit(needs, {"transformer": CUDA, "text_encoder": CUDA, "vae": CUDA})
    message = str(e.value)
    assert message.startswith("the weights do not fit on cuda:0: transformer 6.00 GB, text encoder 8.00 GB, "
                              "vae 0.20 GB need 14.20 GB, and the GPU has 10.00 GB free of 16.00 GB")
    assert "--text-encoder-quant int8" in message and "--offload blocks" in message and "\n" not in message


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
    """A card too small for the tiny model's bf16 weights: the load stops before reading a tensor; with
    the text encoder kept in CPU memory (offload) or replaced by a remote one, its bytes do not count."""
    import zimage_native.loading as loading

    fake_cuda(monkeypatch)
    need = folder_weight_bytes(tiny_model_dir, [], torch.bfloat16)
    card(monkeypatch, free=need["transformer"] + need["vae"] + need["text_encoder"] - 1)
    class WeightsRead(Exception):
        pass

    def read(*args, **kwargs):
        raise WeightsRead

    monkeypatch.setattr(loading, "iter_tensors", read)
    with pytest.raises(InsufficientMemoryError, match="transformer .* MB, text encoder .* MB, vae .* MB free of 16.00 GB"):
        loading.load_pretrained(tiny_model_dir, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(WeightsRead):  # it fits without the text encoder: loading starts
        loading.load_pretrained(tiny_model_dir, device="cuda", dtype=torch.bfloat16, offload="text_encoder")
    card(monkeypatch, free=0)
    with pytest.raises(WeightsRead):  # "model" offload loads everything in CPU memory
        loading.load_pretrained(tiny_model_dir, device="cuda", dtype=torch.bfloat16, offload="model")


def test_the_cli_says_it_in_one_line(tiny_model_dir, monkeypatch, tmp_path):
    from zimage_native.cli import main

    fake_cuda(monkeypatch)
    card(monkeypatch, free=1000, total=8 * GB)
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cuda",
                                       "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: the weights do not fit on cuda: transformer 1.2 MB") and "GPU has 0.0 MB free of 8.00 GB" in line


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
                                       "--width", "32", "--height", "32", "--steps", "1", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "--width/--height" in line and "--batch-size" in line and "--text-encoder-quant int8" in line
