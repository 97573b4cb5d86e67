"""The server under an independent API fuzzer: schemathesis, driven by the server's own
/openapi.json, with every check but positive_data_acceptance and all its phases (examples,
coverage, fuzzing, and the stateful phase that follows the schema's links: job created -> job ->
events -> cancel; image listed -> image -> delete). A fixed seed and a bounded number of examples
keep it reproducible and short; docs/server.md gives the command for longer runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from zimage_native.server import FakeEngine, Limits, ServerSettings, create_app  # noqa: E402
from zimage_native.server.testing import LiveServer  # noqa: E402

TOKEN = "fuzz-token"
SEED = 1
EXAMPLES = 10  # per operation and phase; docs/server.md runs 100
# One worker: with several, hypothesis (6.155) can fail inside schemathesis on its own thread-unsafe
# lambda-source cache ("AST constructor recursion depth mismatch"), an error of the tool, not the server.


def fuzz_settings(path) -> ServerSettings:
    # Small images keep each generated job cheap; the limits still exercise every constraint.
    limits = Limits(min_side=16, max_side=128, max_pixels=128 * 128, max_steps=8, max_images=2,
                    max_prompt_chars=300, max_upload_bytes=64_000, max_body_bytes=200_000)
    return ServerSettings(data_dir=path, limits=limits, token=TOKEN, queue_size=16, sync_timeout=60)


def run_schemathesis(url: str, cwd, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()", "run",
               f"{url}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
               "--exclude-checks", "positive_data_acceptance", "--generation-database", "none",
               "--no-color", "--request-timeout", "30", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path):
    # fail_marker=None: a prompt the fuzzer makes up must not turn into a deliberately failed job.
    engine = FakeEngine(step_delay=0.001, fail_marker=None)
    with LiveServer(create_app(engine, fuzz_settings(tmp_path / "data"))) as live:
        done = run_schemathesis(live.url, tmp_path, "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1")
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in done.stdout, report
    assert "unique failure" not in done.stdout, report
