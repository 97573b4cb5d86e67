"""CI runs the suite on both cores with pytest-xdist (.ci/run): the tests that must not overlap, or
whose module fixtures are a process or a cluster, carry an xdist_group that --dist loadgroup keeps
on one worker."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ci_pytest_command() -> str:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pytest")]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_on_both_cores_keeping_the_groups():
    command = ci_pytest_command()
    assert re.search(r" -n 2( |$)", command) and "--dist loadgroup" in command, command
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(r.startswith("pytest-xdist") for r in extra), extra


@pytest.mark.parametrize("module, group", [("test_ray_serve", "ray"), ("test_ray_serve_cli", "ray"),
                                           ("test_server_browser", "browser"), ("test_kernels_gpu_build", "gpu-build")])
def test_modules_that_must_not_overlap_share_a_group(module, group):
    """The two Ray modules each start a Ray instance (never two at once: one group); the browser
    module's chromium and server, and the GPU-build module's probe (~3 min), are module fixtures
    (once, on one worker)."""
    if module == "test_kernels_gpu_build":
        pytest.importorskip("triton")
    else:
        pytest.importorskip("httpx")
        pytest.importorskip("fastapi")
    if module.startswith("test_ray"):
        pytest.importorskip("ray")
    marks = importlib.import_module(f"tests.{module}").pytestmark
    marks = marks if isinstance(marks, list) else [marks]
    assert [m.args for m in marks if m.name == "xdist_group"] == [(group,)]


def test_the_refused_url_refuses_and_holds_its_port(refused_url):
    """The "cannot reach" tests' port: connections are refused, and while the test runs no other
    process (the other xdist worker's next server) can be given it. A port bound, read and closed
    was free again at once: another process bound it (measured: random odd ports of 32768-60999,
    about 1 in 14,000 for each bind to port 0 on the other worker while the test ran)."""
    import socket

    port = int(refused_url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as other, pytest.raises(OSError):
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        other.bind(("127.0.0.1", port))


def test_a_reserved_port_is_kept_from_others_and_left_to_the_server():
    """tests/utils.reserved_port: the port of a server another process binds later (Ray Serve's proxy).
    A bind without SO_REUSEADDR (and any bind to port 0: measured 0 of 150,000, against 22 of 150,000
    for a port picked and closed) cannot take it; the server's bind with SO_REUSEADDR, as uvicorn and
    Ray Serve set it, succeeds and it answers."""
    import socket

    from .utils import reserved_port

    with reserved_port() as port:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
