"""Shared fixtures: tiny random models built in code (no downloads)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch


def _import_installed_kernels() -> None:
    """Import the installed Hugging Face ``kernels`` package (a dependency of transformers) first.

    Run from the repository root, ``python -m pytest`` puts the root on sys.path, where this
    repository's ``kernels/`` folder (installed as ``zimage_native.kernels``) would shadow it and
    transformers' ``from kernels import ...`` would fail.
    """
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: nothing to shadow
        pass
    finally:
        sys.path[:] = saved


_import_installed_kernels()


# Deterministic, quiet CPU runs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Z-Image model in the diffusers layout (built once per test session)."""
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny-zimage"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from zimage_native import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    pipe.progress = False
    return pipe


@pytest.fixture(scope="session")
def reference_pipe(tiny_model_dir):
    pytest.importorskip("diffusers")
    from .fixtures import reference_pipeline

    return reference_pipeline(tiny_model_dir)
