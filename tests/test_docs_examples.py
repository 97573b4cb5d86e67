"""The documentation's examples run as written, on a tiny model: every ```python block of README.md
and docs/*.md, statement by statement, in one namespace per file (a file's blocks build on each
other); every complete ``zimage`` command of their other blocks; every profile of the shipped
example config (``--profile NAME``). With:

- the Hub ids resolved from a local huggingface_hub cache that holds a tiny model (offline);
- "cuda" read as "cpu", and 1024-pixel sizes (written or defaulted) made 64;
- the files the examples name (in.png, style.safetensors, z_image_turbo-Q4_K_M.gguf, ...) written
  in the working directory, from the same tiny model;
- the names an example takes from its surrounding prose (``pipe``, ``prompt``) bound beforehand.

Statements with placeholders (``...``) and command synopses (``PROMPT``, ``[options]``) are not run,
nor are ``zimage serve`` and ``zimage bench`` (their own tests run them); the few statements that
need what a CPU test cannot have are listed in SKIP with the reason. A failing example names its
file and line.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "zimage_native" / "config.example.toml"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HUB_IDS = ("Tongyi-MAI/Z-Image-Turbo", "Tongyi-MAI/Z-Image")

#: statement text -> why it does not run here
SKIP = {
    'kernels="triton"': "Triton kernels need a CUDA GPU (tests/test_kernels_* run them under the interpreter)",
    "llm_url=": "needs an OpenAI-compatible LLM server (tests/test_rewriter_remote.py runs one)",
    "ChatRewriter(": "needs an OpenAI-compatible LLM server (tests/test_rewriter_remote.py runs one)",
    "OpenAI(": "needs a running zimage server and the openai package (tests/test_server_contract.py)",
    "client.images": "needs a running zimage server (tests/test_server_contract.py)",
    "RemoteTextEncoder(": "needs a running encoder server (tests/test_server_pipeline.py runs one)",
    "encoder.": "needs a running encoder server (tests/test_server_pipeline.py runs one)",
}

# A DiT with the released head geometry (so single files need no config), ControlNet-ready layers.
DOC_DIT = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256, n_layers=4,
               n_refiner_layers=2, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
               rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])


def code_blocks(path: Path, lang: str = "python") -> list[tuple[int, str]]:
    """(first line number, text) of each ```python (or ``lang``) block."""
    blocks, lines, start = [], path.read_text().splitlines(), None
    for i, line in enumerate(lines, 1):
        if start is None and line.strip() == "```" + lang:
            start, code = i + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code)))
            start = None
        elif start is not None:
            code.append(line)
    return blocks


def fenced_blocks(path: Path, lang: str) -> list[str]:
    return [text for _, text in code_blocks(path, lang)]


def shell_commands(path: Path, program: str = "zimage") -> list[tuple[int, str]]:
    """(line number, command) of each ``program`` command in the fenced blocks other than python,
    with backslash continuations joined and a leading "$ " dropped."""
    commands, fence, pending = [], None, None
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:]
            continue
        if fence is None or fence == "python":
            continue
        text = line.strip().removeprefix("$ ")
        if pending is not None:
            pending = (pending[0], pending[1] + " " + text)
        elif text.startswith(program + " "):
            pending = (i, text)
        if pending is not None and not pending[1].endswith("\\"):
            commands.append(pending)
            pending = None
        elif pending is not None:
            pending = (pending[0], pending[1][:-1].rstrip())
    return commands


def for_the_cpu(code: str) -> str:
    return re.sub(r"\b1024\b", "64", code.replace('"cuda"', '"cpu"'))


def has_placeholder(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and n.value is Ellipsis for n in ast.walk(node))


# ----------------------------------------------------------------------------------- the files


def write_example_files(model: Path, where: Path) -> None:
    """Every file the examples name, made from the tiny model in ``model``."""
    from safetensors.torch import save_file

    from zimage_native.config import TransformerConfig
    from zimage_native.converters.keymap import from_canonical
    from zimage_native.formats.gguf import TE_LLAMA_CPP
    from zimage_native.model.controlnet import ControlNetConfig, ZImageControlNet
    from zimage_native.testing import randomize_

    from .gguf_files import gguf_state, write_gguf
    from .test_formats import comfy_dit, ldm_vae, prefixed_te, te_state, write

    rng = np.random.default_rng(0)
    for name, seed in [("in.png", 1), ("house.png", 2), ("photo.png", 3), ("pose.png", 4)]:
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(where / name)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    for name in ("mask.png", "door-mask.png"):
        Image.fromarray(mask).save(where / name)

    dit = comfy_dit(model, prefix="")
    write(where / "z_image_turbo_bf16.safetensors", dit)
    write(where / "model.safetensors", dit)
    write(where / "ae.safetensors", ldm_vae(model))
    write(where / "qwen_3_4b.safetensors", prefixed_te(model))
    (where / "models").mkdir()
    for name, qtype in [("z_image_turbo-Q4_K_M.gguf", "Q4_K"), ("z_image_turbo-Q8_0.gguf", "Q8_0"),
                        ("z_image_turbo-Q6_K.gguf", "Q6_K")]:
        write_gguf(where / name, gguf_state(dit, qtype, rng)[0], "lumina2")
        shutil.copy(where / name, where / "models" / name)  # the example config's paths
    llama = dict(from_canonical(te_state(model).items(), TE_LLAMA_CPP))
    meta = {"qwen3.rope.freq_base": 1e6, "qwen3.attention.layer_norm_rms_epsilon": 1e-6,
            "qwen3.context_length": 2048, "qwen3.block_count": 3}
    for name, qtype in [("Qwen3-4B-Q5_K_M.gguf", "Q5_K"), ("Qwen3-4B-Q6_K.gguf", "Q6_K")]:
        write_gguf(where / name, gguf_state(llama, qtype, rng, fallback="F16")[0], "qwen3", meta)
    shutil.copy(where / "Qwen3-4B-Q5_K_M.gguf", where / "models" / "Qwen3-4B-Q4_K_M.gguf")

    g = torch.Generator().manual_seed(5)
    for name in ("style.safetensors", "a.safetensors", "b.safetensors"):
        save_file({"transformer.layers.1.attention.to_q.lora_A.weight": torch.randn(4, 256, generator=g) * 0.1,
                   "transformer.layers.1.attention.to_q.lora_B.weight": torch.randn(256, 4, generator=g) * 0.1},
                  str(where / name))

    config = TransformerConfig.from_dict(DOC_DIT)
    layout = dict(dim=256, n_heads=2, n_kv_heads=2, n_refiner_layers=2, norm_eps=1e-5, qk_norm=True,
                  all_patch_size=(2,), all_f_patch_size=(1,), control_layers_places=[0, 2],
                  control_refiner_layers_places=[0, 1], control_in_dim=33,
                  add_control_noise_refiner="control_noise_refiner")
    branch = randomize_(ZImageControlNet(ControlNetConfig.from_dict(layout), config), 6)
    save_file({k: v.contiguous() for k, v in branch.state_dict().items() if k.startswith("control_")},
              str(where / "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"))


@pytest.fixture(scope="module")
def doc_model(tmp_path_factory):
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("doc-model"), dit_kwargs=DOC_DIT,
                              vae_kwargs={"norm_num_groups": 32})


@pytest.fixture(scope="module")
def example_files(doc_model, tmp_path_factory):
    where = tmp_path_factory.mktemp("doc-files")
    write_example_files(doc_model, where)
    return where


@pytest.fixture
def offline_hub(doc_model, tmp_path, monkeypatch):
    """A huggingface_hub cache with the tiny model under each Hub id the examples name."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo_id in HUB_IDS:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(doc_model, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def small_by_default(monkeypatch):
    """Requests that leave the size unset get 64x64 instead of 1024x1024."""
    from zimage_native import sampling

    real = sampling.resolve

    def resolve(pipe, r):
        if r.width is None and r.height is None:
            r = dataclasses.replace(r, width=64, height=64)
        return real(pipe, r)

    monkeypatch.setattr(sampling, "resolve", resolve)


# ----------------------------------------------------------------------------------- the test


def context(doc_model) -> dict:
    """The names an example takes from its prose: a loaded pipeline and a prompt."""
    from zimage_native import ZImagePipeline

    return {"pipe": ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", device="cpu"), "prompt": "a cat"}


@pytest.mark.parametrize("doc", [p.relative_to(ROOT).as_posix() for p in DOC_FILES
                                 if code_blocks(p)])
def test_documented_python_examples_run(doc, doc_model, example_dir, offline_hub, small_by_default):
    namespace = {"__name__": "__doc_example__", **context(doc_model)}
    ran = skipped = 0
    for line, code in code_blocks(ROOT / doc):
        for node in ast.parse(code).body:
            text = ast.get_source_segment(code, node)
            if has_placeholder(node) or any(key in text for key in SKIP):
                skipped += 1
                continue
            where = f"{doc}:{line + node.lineno - 1}: {text.splitlines()[0]}"
            try:
                exec(compile(for_the_cpu(text), where, "exec"), namespace)
            except Exception as e:
                pytest.fail(f"{where}\n  raised {type(e).__name__}: {e}")
            ran += 1
    assert ran > 0, f"{doc}: nothing ran ({skipped} statements skipped)"


#: subcommands whose examples run here; the others serve or benchmark (their own tests run them)
RUNNABLE = ("generate", "info", "convert", "templates", "format-prompt", "rewrite", "env")


def runnable(command: str) -> list[str] | None:
    """The arguments after ``zimage``, or None for a synopsis (PROMPT, [options], a|b, ...), a
    command of another kind, or one that needs a server (--llm-url)."""
    args = shlex.split(command, comments=True)[1:]
    if not args or args[0] not in RUNNABLE or "--llm-url" in args:
        return None
    if any(re.search(r"\[|\.\.\.|\||\$|^[A-Z_]{3,}$", a) for a in args):
        return None
    return args


@pytest.fixture
def example_dir(example_files, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(example_files, work)
    (work / "my-templates").mkdir()  # "~/my-templates": the templates docs/prompting.md writes
    for text in fenced_blocks(ROOT / "docs" / "prompting.md", "markdown"):
        name = re.search(r"^name: *([\w-]+)", text, re.M)
        if text.startswith("---") and name:
            (work / "my-templates" / f"{name.group(1)}.md").write_text(text + "\n")
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.chdir(work)
    # the shipped example config (--profile NAME), with its 1024-pixel sizes made 64
    from zimage_native.cli import config

    (work / "example.toml").write_text(for_the_cpu(EXAMPLE_CONFIG.read_text()))
    monkeypatch.setattr(config, "EXAMPLE_CONFIG", work / "example.toml")
    return work


@pytest.mark.parametrize("doc", [p.relative_to(ROOT).as_posix() for p in DOC_FILES
                                 if any(runnable(c) for _, c in shell_commands(p))])
def test_documented_cli_examples_run(doc, example_dir, offline_hub, small_by_default):
    from click.testing import CliRunner

    from zimage_native.cli import main

    for line, command in shell_commands(ROOT / doc):
        args = runnable(command)
        if args is None:
            continue
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"{doc}:{line}: {command}\n{result.output}{result.exception or ''}"


def example_profiles() -> list[str]:
    from zimage_native.cli.config import tomllib

    return [name for name in tomllib.loads(EXAMPLE_CONFIG.read_text()) if name != "default"]


@pytest.mark.parametrize("profile", example_profiles())
def test_every_profile_of_the_example_config_generates(profile, example_dir, offline_hub, small_by_default):
    """Each card's profile of the shipped example config (``--profile NAME`` alone), with the GGUF files
    it names at its paths, loads and writes an image (the CPU standing for the card; the sizes made 64).
    No profile sets a size: one would override a --template's suggested size on every run."""
    from click.testing import CliRunner

    from zimage_native.cli import main
    from zimage_native.cli.config import read_profile

    assert not {"width", "height"} & set(read_profile(EXAMPLE_CONFIG, profile))

    args = ["generate", "a red fox in fresh snow", "--profile", profile,
            "-o", f"{profile}.png", "--seed", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"--profile {profile}\n{result.output}{result.exception or ''}"
    written = sorted(example_dir.glob(f"{profile}*.png"))
    assert written and Image.open(written[0]).size == (64, 64)


def test_the_example_runner_can_fail(tmp_path):
    """A documented call that no longer exists would fail: the runner reads blocks and line numbers
    as written, and a statement that raises is reported with its place."""
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```python\nx = 1\ny = x.no_such_method()\n```\n")
    assert code_blocks(doc) == [(4, "x = 1\ny = x.no_such_method()")]
    assert for_the_cpu('f(device="cuda", width=1024, n=10240)') == 'f(device="cpu", width=64, n=10240)'
    assert has_placeholder(ast.parse("f(...)").body[0]) and not has_placeholder(ast.parse("f(1)").body[0])


def call_defaults() -> dict:
    import inspect

    from zimage_native import ZImagePipeline

    return {name: p.default for name, p in inspect.signature(ZImagePipeline.__call__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_documented_call_defaults_are_the_signature_s():
    """The README's ``pipe(prompt, *, ...)`` signature and every "`name` (default X)" of the docs'
    prose, for an argument of ``pipe(...)``, give the default the call has (docs/tasks.md said
    ``controlnet_conditioning_scale`` defaulted to 0.75 after it became None)."""
    defaults = call_defaults()
    readme = (ROOT / "README.md").read_text()
    signature = re.search(r"`pipe\(prompt, \*, (.*?), \.\.\.\)`", readme, re.S).group(1)
    documented = ast.parse(f"f({' '.join(signature.split())})").body[0].value.keywords
    assert len(documented) >= 30
    for keyword in documented:
        value = ast.literal_eval(keyword.value)
        actual = defaults[keyword.arg]
        assert value == (list(actual) if isinstance(actual, tuple) else actual), f"README: {keyword.arg}={value!r}"
    checked = 0
    for doc in DOC_FILES:
        for name, value in re.findall(r"`(\w+)` \((?:[^()]*?, )?default ([-\w.]+)", doc.read_text()):
            if name in defaults:
                checked += 1
                assert ast.literal_eval(value) == defaults[name], f"{doc.name}: {name} (default {value})"
    assert checked >= 3


#: flags the docs name for other programs: flag -> the program
OTHER_PROGRAMS_FLAGS = {
    "--index-url": "pip", "--no-deps": "pip", "--no-build-isolation": "pip", "--torch-backend": "uv pip",
    "--head": "ray start", "--address": "ray start", "--num-gpus": "ray start",
    "--exclude-checks": "schemathesis", "--max-examples": "schemathesis", "--workers": "schemathesis",
    "--benchmark-only": "pytest-benchmark", "--dist": "pytest-xdist", "--fmad": "ptxas", "--force-download": "hf download",
}


def known_flags() -> set[str]:
    """Every option of every ``zimage`` command (both spellings of a boolean switch), the predecessor's
    and other tools' flags that stop with what they are here, and the flags of the repository's scripts."""
    import click

    from zimage_native.cli import OTHER_TOOLS_FLAGS, PREDECESSOR_FLAGS, main

    # --help: click adds it to each
    flags = {"--help"} | set(PREDECESSOR_FLAGS) | set(OTHER_TOOLS_FLAGS) | set(OTHER_PROGRAMS_FLAGS)
    commands = [main]
    while commands:
        command = commands.pop()
        flags |= {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        if isinstance(command, click.Group):
            commands.extend(command.commands.values())
    for script in (ROOT / "benchmarks").glob("*.py"):
        flags |= set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))
    return flags


def unknown_flags(text: str, known: set[str]) -> set[str]:
    """The ``--flags`` of ``text`` that are not ``known``; one written with '_' (``--text_encoder_quant``,
    ``--num_inference_steps``: a mistake the CLI answers naming the flag) is known when the CLI answers
    it: its dashed spelling is known, or its name is the library's argument name of a flag."""
    from zimage_native.cli import LIBRARY_FLAGS

    return {flag for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text)
            if flag not in known and not ("_" in flag and (flag.replace("_", "-") in known or flag[2:] in LIBRARY_FLAGS))}


def test_every_flag_the_docs_name_exists():
    """Every ``--flag`` in README.md, docs/*.md and docs/deploy/ (tables and prose too, not only the
    commands the tests above run) is an option of a ``zimage`` command, a predecessor's flag the CLI
    answers, a flag of a script in benchmarks/, or one of another program listed above."""
    known = known_flags()
    assert unknown_flags("`--steps` and `--no-such-flag`, `--no-overwrite`", known) == {"--no-such-flag"}
    assert unknown_flags("`--text_encoder_quant`, `--num_inference_steps`, `--no_such_flag`", known) == {"--no_such_flag"}
    docs = [*DOC_FILES, *sorted((ROOT / "docs" / "deploy").glob("*"))]
    unknown = {f"{doc.relative_to(ROOT)}: {flag}" for doc in docs for flag in unknown_flags(doc.read_text(), known)}
    assert not unknown, (f"flags that nothing takes: {sorted(unknown)} (another program's flag, pip's or pytest's "
                         f"say, is listed in OTHER_PROGRAMS_FLAGS with the program)")


def test_every_zimage_environment_variable_the_docs_name_is_read():
    """Each ``ZIMAGE_*`` variable of the docs is read somewhere: by the engine, a script or the tests."""
    folders = ("zimage_native", "converters", "kernels", "benchmarks", "tests")
    sources = "\n".join(p.read_text() for folder in folders for p in (ROOT / folder).rglob("*")
                        if p.suffix in (".py", ".sh") and p.name != Path(__file__).name)
    named = {v for doc in DOC_FILES for v in re.findall(r"\bZIMAGE_[A-Z0-9_]+", doc.read_text())}
    assert {"ZIMAGE_TOKEN", "ZIMAGE_ATTENTION"} <= named
    unread = {v for v in named if not re.search(rf"\b{v}\b", sources)}
    assert not unread, f"environment variables the docs name and nothing reads: {sorted(unread)}"
