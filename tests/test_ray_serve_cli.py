"""`zimage serve --ray` as a user runs it: a subprocess that starts its own Ray instance. In a module
of its own so that it never overlaps the local cluster of tests/test_ray_serve.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'zimage-native[ray]')")
httpx = pytest.importorskip("httpx")

from .utils import reserved_port  # noqa: E402

# One xdist group for both Ray modules: under `pytest -n 2 --dist loadgroup` they run on one worker,
# one after the other, never two Ray instances at once.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600), pytest.mark.xdist_group("ray")]


@pytest.mark.slow
def test_zimage_serve_ray_command(tmp_path):
    """Starts Ray, deploys, answers HTTP, runs a job, stops on Ctrl-C."""
    with reserved_port() as port:  # Ray's proxy binds it tens of seconds later: see reserved_port
        serve_ray_and_run_a_job(tmp_path, port)


def serve_ray_and_run_a_job(tmp_path, port):
    cmd = [sys.executable, "-m", "zimage_native.cli", "serve", "--ray", "--fake", "--replicas", "1",
           "--gpus-per-replica", "0", "--port", str(port), "--data-dir", str(tmp_path), "--min-side", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except (httpx.HTTPError, ValueError):  # not listening yet, or not our app yet
                time.sleep(1)
        assert health is not None, f"no answer; output: {proc.stdout.read() if proc.poll() is not None else ''}"
        assert health["status"] == "ok" and health["queue"]["workers"] == 1
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job = client.post("/api/v1/jobs", json={"prompt": "a cat", "width": 32, "height": 32, "steps": 2}).json()
            deadline = time.time() + 60
            while time.time() < deadline:
                status = client.get(f"/api/v1/jobs/{job['id']}").json()["status"]
                if status in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            assert status == "completed"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
