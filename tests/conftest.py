"""Shared fixtures: tiny random models built in code (no downloads)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

# Run from the repository root, ``python -m pytest`` puts the root on sys.path, where its kernels/
# folder would shadow the Hugging Face ``kernels`` package that transformers imports: importing
# zimage_native imports the installed one first (zimage_native._import_hub_kernels_first).
import zimage_native  # noqa: F401,E402

pytest_plugins = ("pytester",)  # tests/test_frozen_graphs.py runs two tests in order in a session of their own


# Deterministic, quiet CPU runs. Under pytest-xdist (CI: ``-n 2`` on 2 cores) each worker is a process
# of its own and gets one thread, and so do the processes the tests start (OMP_NUM_THREADS): two
# workers of two threads each on two cores spent 4.2x the CPU time (spinning threads) on the same
# tests. A test that needs another count sets it (tests/test_generation.py: 1 and 2 threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _forget_dynamo_skips_after_stand_in_captures():
    """After a test that captured with the FrozenGraphs stand-in, reset dynamo: it marked the compiled
    blocks' code skipped under the stand-in's dispatch mode, and every later test in this process
    (an xdist worker) would run its compiled blocks eagerly (tests/graph_standins.py)."""
    yield
    from .graph_standins import forget_dynamo_skips

    forget_dynamo_skips()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def refused_url():
    """``http://127.0.0.1:PORT`` where nothing listens, for the "cannot reach" tests. A socket stays bound
    there, not listening (a connection is refused), for the whole test: a port bound, read and closed
    (the earlier helpers) is free again, and under ``-n 2`` the other worker's next server may be given
    it, which then answers instead of refusing."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture
def umask_027():
    """Run the test under umask 027 (new files 0640, folders 0750), then restore the umask."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Z-Image model in the diffusers layout (built once per test session)."""
    from .fixtures import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny-zimage"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from .fixtures import our_pipeline

    return our_pipeline(tiny_model_dir)


@pytest.fixture
def fresh_pipe(tiny_model_dir):
    """A pipeline of its own for a test that changes it (transforms, caches, encoders)."""
    from .fixtures import our_pipeline

    return our_pipeline(tiny_model_dir)


@pytest.fixture(scope="session")
def reference_pipe(tiny_model_dir):
    pytest.importorskip("diffusers")
    from .fixtures import reference_pipeline

    return reference_pipeline(tiny_model_dir)
