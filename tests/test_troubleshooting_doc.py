"""docs/troubleshooting.md does not go stale: every engine message it quotes is one the engine prints.

The page quotes a message as a ``> `` block quote (consecutive ``> `` lines are one quote; `` ... ``
in a quote stands for a part that varies: a path, a size, a count). Each ``###`` section of the page
has its checks below: most trigger the real message on the tiny model or tiny files, on the CPU, and
the quote must be a substring of it (its pieces in order); the few that need a GPU (a compute
capability, a CUDA graph cache) or an interrupted run are looked up in the source of the module that
raises them instead, where each piece must appear as written. A section that quotes a message and has
no checks, or checks for a section the page no longer has, fails too.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "troubleshooting.md"
GB = 10**9


def doc_quotes(text: str) -> dict[str, list[str]]:
    """{### section heading: [quoted messages]}: consecutive ``> `` lines joined by a space."""
    sections: dict[str, list[str]] = {}
    heading, current = None, None
    for line in text.splitlines():
        if line.startswith("### "):
            heading, current = line[4:].strip(), None
        elif line.startswith("> ") and heading is not None:
            if current is None:
                current = []
                sections.setdefault(heading, []).append(current)
            current.append(line[2:].strip())
        else:
            current = None
    return {h: [" ".join(q) for q in qs] for h, qs in sections.items()}


def matches(quote: str, text: str) -> bool:
    """Whether the pieces of ``quote`` (split at `` ... ``) appear in ``text`` in order."""
    at = 0
    for piece in quote.split(" ... "):
        found = text.find(piece.strip(), at)
        if found < 0:
            return False
        at = found + len(piece.strip())
    return True


def source(relative: str) -> str:
    return (ROOT / relative).read_text()


def raised(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return str(e)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised nothing")


def logged(caplog, fn, *args, **kwargs) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zimage_native"):
        fn(*args, **kwargs)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text, f"{getattr(fn, '__name__', fn)} logged nothing"
    return text


def cli(*args: str, ok: bool = False) -> str:
    from click.testing import CliRunner

    from zimage_native.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    return result.output


# ----------------------------------------------------------------------------------- the triggers


def gpu_memory(request) -> list[str]:
    """The weight check before loading, with the CUDA free-memory query answering 8 GB free of a 24 GB
    card (no GPU here), and the same check near the card's size."""
    from zimage_native import devices

    monkeypatch, caplog = request.getfixturevalue("monkeypatch"), request.getfixturevalue("caplog")
    monkeypatch.setattr(devices, "free_memory", lambda device: (8 * GB, 24 * GB))
    cuda = torch.device("cuda", 0)
    needs = {"transformer": 12 * GB, "vae": GB // 6, "text_encoder": 8 * GB}
    too_big = raised(devices.check_weights_fit, needs, dict.fromkeys(needs, cuda))
    monkeypatch.setattr(devices, "free_memory", lambda device: (23 * GB, 24 * GB))
    tight = logged(caplog, devices.check_weights_fit, {"transformer": 20 * GB}, {"transformer": cuda})
    return [too_big, tight]


def run_out_of_memory(request) -> list[str]:
    """torch's out-of-memory error while a command runs, as the CLI prints it."""
    from zimage_native.cli._common import user_errors

    def sample():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    return [raised(user_errors(sample))]


def cpu_memory(request) -> list[str]:
    """The RAM checks (weights kept in CPU memory, the VAE decode on the CPU), with the machine's memory
    answering 16 GB available of 32 GB and no swap."""
    from zimage_native import devices

    monkeypatch, caplog = request.getfixturevalue("monkeypatch"), request.getfixturevalue("caplog")
    monkeypatch.setattr(devices, "host_memory", lambda *a: (16 * GB, 0, 32 * GB))
    cpu = torch.device("cpu")
    weights = raised(devices.check_host_memory, {"transformer": 12 * GB, "text_encoder": 8 * GB},
                     {"transformer": cpu, "text_encoder": cpu})
    decode = raised(devices.check_decode_fits, cpu, torch.float32, 128, 4096, 4096, 1)
    monkeypatch.setattr(devices, "host_memory", lambda *a: (4 * GB, 32 * GB, 32 * GB))
    devices._swap_warned.clear()
    swap = logged(caplog, devices.check_decode_fits, cpu, torch.float32, 128, 2048, 2048, 1)
    return [weights, decode, swap]


def no_gpu(request) -> list[str]:
    """Asking for a GPU that torch does not see, and "auto" falling back to the CPU."""
    from zimage_native.devices import resolve_device, warn_if_cpu_fallback

    caplog = request.getfixturevalue("caplog")
    assert not torch.cuda.is_available()
    return [raised(resolve_device, "cuda"), logged(caplog, warn_if_cpu_fallback, "auto", torch.device("cpu"))]


def shape_classes(request) -> list[str]:
    """A compiled code object meeting new shape classes: each one compiles; past the limit, eager."""
    from zimage_native.accel.compile import ShapeClasses

    caplog = request.getfixturevalue("caplog")
    classes = ShapeClasses("the DiT's blocks", limit=1)
    first = logged(caplog, classes.note, (1, 64), lambda: "batch 1, 64 tokens")
    second = logged(caplog, classes.note, (2, 64), lambda: "batch 2, 64 tokens")
    return [first, second]


def triton_missing(request) -> list[str]:
    """--kernels triton where the triton package is not installed (its import spec hidden)."""
    from zimage_native.accel import _kernels

    with request.getfixturevalue("monkeypatch").context() as patched:  # importlib.util: everyone's
        patched.setattr(_kernels.importlib.util, "find_spec", lambda name, *a: None)
        patched.delitem(sys.modules, _kernels.NAME, raising=False)
        return [raised(_kernels.load_kernels)]


def triton_on_the_cpu(request) -> list[str]:
    """--kernels triton for a DiT on the CPU, with the kernels built for a GPU (as a user's are; a test
    process may have built them under Triton's interpreter, which runs them on the CPU)."""
    from zimage_native.accel._kernels import load_kernels
    from zimage_native.accel.fused_ops import check_kernels_can_run

    request.getfixturevalue("monkeypatch").setattr(load_kernels(), "INTERPRETED", False)
    return [raised(check_kernels_can_run, torch.nn.Linear(4, 4))]


def older_gpus(request) -> list[str]:
    """What fp8 and torch.compile say about a GPU's compute capability and the model's dtype."""
    from zimage_native.accel.compile import gpu_compile_problem
    from zimage_native.accel.fp8 import gpu_fp8_problem

    return [gpu_fp8_problem((8, 6), "NVIDIA GeForce RTX 3090", {torch.bfloat16}),
            gpu_fp8_problem((9, 0), "NVIDIA H100", {torch.float16}),
            gpu_compile_problem((7, 5), "Tesla T4", {torch.bfloat16})]


def gguf_files(request) -> list[str]:
    """A GGUF DiT with a tensor type the engine does not dequantise, and one read without the gguf package."""
    from zimage_native.loading import load_component

    from .test_gguf import retyped, write_dit

    tmp_path, monkeypatch = request.getfixturevalue("tmp_path"), request.getfixturevalue("monkeypatch")
    dit, _ = write_dit(tmp_path / "dit.gguf", "Q4_K")
    ternary = retyped(dit, tmp_path / "dit-tq1.gguf", "TQ1_0", lambda k: ".feed_forward." in k)
    unknown_type = raised(load_component, "transformer", ternary, None, "cpu")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
        no_package = raised(load_component, "transformer", dit, None, "cpu")
    return [unknown_type, no_package]


def safetensors_files(request) -> list[str]:
    """A comfy_quant layer of an unknown format, a pickled checkpoint, a file cut short, a LoRA given
    as the DiT, a file of no known model, and another model's file given as the only one."""
    from zimage_native.loading import load_component

    from .test_comfy_quant import PREFIX, comfy_quant_tensor, to_comfy_quant
    from .test_formats import TINY_AXES, comfy_dit, write

    tmp_path = request.getfixturevalue("tmp_path")
    sd, _, _ = to_comfy_quant(comfy_dit(request.getfixturevalue("tiny_model_dir"), PREFIX))
    sd[f"{PREFIX}layers.0.attention.qkv.comfy_quant"] = comfy_quant_tensor({"format": "int4_magic"})
    comfy = write(tmp_path / "mixed.safetensors", sd)
    pickled = tmp_path / "model.ckpt"
    torch.save({"x": torch.ones(1)}, pickled)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(comfy.read_bytes()[: comfy.stat().st_size // 2])
    lora = write(tmp_path / "lora.safetensors", {"layers.0.attention.to_q.lora_A.weight": torch.ones(4, 64),
                                                 "layers.0.attention.to_q.lora_B.weight": torch.ones(64, 4)})
    flux = write(tmp_path / "flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.ones(24, 8),
                                                      "img_in.weight": torch.ones(8, 64)})
    unknown = write(tmp_path / "unknown.safetensors", {"some.weight": torch.ones(2, 2)})
    return [*(raised(load_component, "transformer", path, None, "cpu", config=TINY_AXES)
              for path in (comfy, pickled, cut, lora, unknown)),
            cli("generate", "a cat", "--transformer", flux, "--device", "cpu", "-o", tmp_path / "cat.png")]


def lora_keys(request) -> list[str]:
    """A FLUX LoRA, a LoRA of no known module, and one with a key that matches nothing beside one that does."""
    from safetensors.torch import save_file

    from zimage_native.lora import linear_shapes, parse_lora

    pipe, tmp_path = request.getfixturevalue("fresh_pipe"), request.getfixturevalue("tmp_path")
    caplog = request.getfixturevalue("caplog")
    shapes = linear_shapes(pipe.transformer)
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(4, 64),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(192, 4)}
    nothing = {"some.module.lora_A.weight": torch.ones(4, 64), "some.module.lora_B.weight": torch.ones(64, 4)}
    q_in, q_out = shapes["layers.0.attention.to_q"][1], shapes["layers.0.attention.to_q"][0]
    partial = {"layers.0.attention.to_q.lora_A.weight": torch.zeros(4, q_in),
               "layers.0.attention.to_q.lora_B.weight": torch.zeros(q_out, 4),
               "layers.0.attention.no_such.lora_A.weight": torch.zeros(4, q_in),
               "layers.0.attention.no_such.lora_B.weight": torch.zeros(q_out, 4)}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    return [raised(parse_lora, flux, shapes, "flux.safetensors"),
            raised(parse_lora, nothing, shapes, "other.safetensors"),
            logged(caplog, pipe.load_lora, tmp_path / "partial.safetensors")]


def non_finite(request) -> list[str]:
    """NaN in the DiT's weights and inf in the VAE's, each stopping a one-step run; float16 asked for."""
    from zimage_native.devices import resolve_dtype

    pipe, caplog = request.getfixturevalue("fresh_pipe"), request.getfixturevalue("caplog")
    run = dict(width=64, height=64, num_inference_steps=1, seed=0)
    with torch.no_grad():
        dit = next(p for p in pipe.transformer.parameters() if p.ndim == 2)
        saved = dit.clone()
        dit.fill_(float("nan"))
        in_dit = raised(pipe, "a cat", **run)
        dit.copy_(saved)
        conv = pipe.vae.decoder.conv_out.weight
        conv.fill_(float("inf"))
        in_vae = raised(pipe, "a cat", **run)
    return [in_dit, in_vae, logged(caplog, resolve_dtype, "float16", torch.device("cpu"))]


def port_in_use(request) -> list[str]:
    """``zimage serve`` on a port another program listens on."""
    from zimage_native.cli.serve import check_port_free

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        return [raised(check_port_free, "127.0.0.1", busy.getsockname()[1])]


def servers_not_running(request) -> list[str]:
    """A remote text encoder and a chat server (the rewriter's) where nothing listens."""
    from zimage_native.prompt.remote import ChatRewriter
    from zimage_native.server.remote import RemoteTextEncoder

    url = request.getfixturevalue("refused_url")
    return [raised(RemoteTextEncoder(url).encode, ["a cat"]),
            raised(ChatRewriter(url, timeout=5).rewrite, "a cat")]


def hub_offline(request) -> list[str]:
    """A Hub id with HF_HUB_OFFLINE set and an empty cache; a folder that is not a model folder."""
    import huggingface_hub.constants as constants

    from zimage_native.hub import resolve_model_folder

    tmp_path, monkeypatch = request.getfixturevalue("tmp_path"), request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "downloads").mkdir()
    return [raised(resolve_model_folder, "someone/some-model"),
            raised(resolve_model_folder, tmp_path / "downloads")]


def profile_file_missing(request) -> list[str]:
    """A GGUF profile of the shipped example config run in a folder without its DiT file."""
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    return [cli("generate", "a cat", "--profile", "16gb", "--device", "cpu")]

def in_source(*modules: str):
    """A check that reads the source of the modules that produce the message (GPU-only or interrupt paths)."""
    def check(request) -> list[str]:
        return [source(m) for m in modules]
    check.__name__ = f"source of {', '.join(modules)}"
    return check


#: section heading of docs/troubleshooting.md -> the checks whose texts its quotes must match
CHECKS = {
    "The weights do not fit on the GPU": [gpu_memory],
    "Out of memory while generating": [run_out_of_memory, cpu_memory],
    "The weights do not fit in CPU memory": [cpu_memory],
    "No GPU found, or the CPU is used": [no_gpu],
    "The first image is slow": [in_source("zimage_native/cli/generate.py")],
    "A later request is slow": [shape_classes, in_source("zimage_native/accel/cuda_graphs.py")],
    "Triton is missing, or the kernels refuse the CPU": [triton_missing, triton_on_the_cpu],
    "fp8 or compile refused on an older GPU": [older_gpus, in_source("zimage_native/devices.py")],
    "A profile's GGUF file is missing": [profile_file_missing],
    "A GGUF file is refused": [gguf_files],
    "A safetensors file is refused": [safetensors_files],
    "LoRA keys not matched": [lora_keys],
    "Black images, or a NaN error": [non_finite, in_source("zimage_native/finite.py")],
    "The server does not start, or cannot be reached": [port_in_use],
    "The remote text encoder or the rewriter's server fails": [servers_not_running,
                                                              in_source("zimage_native/server/remote.py")],
    "The model download fails, or there is no network": [hub_offline, in_source("zimage_native/hub.py")],
    "Ctrl-C": [in_source("zimage_native/cli/generate.py", "zimage_native/cli/__init__.py")],
}


# ----------------------------------------------------------------------------------- the tests


def test_every_section_that_quotes_a_message_has_checks():
    quotes = doc_quotes(DOC.read_text())
    assert sum(len(q) for q in quotes.values()) >= 30, quotes
    assert not set(quotes) - set(CHECKS), f"sections with quotes and no checks: {sorted(set(quotes) - set(CHECKS))}"
    assert not set(CHECKS) - set(quotes), f"checks for sections the page lacks: {sorted(set(CHECKS) - set(quotes))}"


@pytest.mark.parametrize("section", list(CHECKS))
def test_the_quoted_messages_are_the_engines(section, request):
    quotes = doc_quotes(DOC.read_text()).get(section)
    assert quotes, f"docs/troubleshooting.md has no quotes under '### {section}'"
    texts = [text for check in CHECKS[section] for text in check(request)]
    for quote in quotes:
        assert any(matches(quote, text) for text in texts), (
            f"'### {section}' quotes a message the engine does not print:\n  > {quote}\nwhat it prints:\n"
            + "\n".join(f"  {t[:600]}" for t in texts if len(t) < 5000))


def test_the_matcher_reads_the_page_as_written_and_can_fail():
    page = "### A\n\n> first ... part\n> of it\n\ntext\n\n> second\n### B\n> third\n"
    assert doc_quotes(page) == {"A": ["first ... part of it", "second"], "B": ["third"]}
    assert matches("first ... part of it", "first, then a part of it.")
    assert not matches("first ... part of it", "a part of it, first")
    assert not matches("frist", "first")
