"""Crash consistency: a real server process (fake engine) is killed with SIGKILL in the middle of a
batch of jobs, then restarted on the same data folder; the history must be consistent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def start(data_dir, log) -> tuple[subprocess.Popen, str]:
    """The server on a port the system picks (--port 0), its URL read from its "ready on" line: a port
    picked here and closed before the server bound it could be taken meanwhile (under -n 2, by the
    other worker's servers), and the server then exited, or the test talked to another server."""
    offset = os.fstat(log.fileno()).st_size
    cmd = [sys.executable, "-m", "zimage_native.cli", "serve", "--fake", "--fake-step-delay", "0.04",
           "--port", "0", "--data-dir", str(data_dir), "--queue-size", "8", "--min-side", "32"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = re.search(rb" ready on (http://127\.0\.0\.1:[1-9][0-9]*)/ ", Path(log.name).read_bytes()[offset:])
        if ready:
            url = ready.group(1).decode()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            return proc, url
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start within 60 s")


def test_sigkill_mid_batch_then_restart_keeps_history_consistent(tmp_path):
    data = tmp_path / "data"
    log = open(tmp_path / "server.log", "wb")
    proc, url = start(data, log)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            ids = []
            for i in range(6):  # two short jobs, then long ones: the kill comes while the third generates
                r = c.post("/api/v1/jobs", json={"prompt": f"job {i}", "width": 64, "height": 64,
                                                 "steps": 2 if i < 2 else 50, "n": 3, "seed": 100 * i})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            completed_before: dict[str, list[str]] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # kill once two jobs are done and a third is mid-way
                states = {j: c.get(f"/api/v1/jobs/{j}").json() for j in ids}
                for j, s in states.items():
                    if s["status"] == "completed":
                        completed_before[j] = [i["id"] for i in s["images"]]
                running = [s for s in states.values() if s["status"] == "running" and s["progress"]
                           and s["progress"]["step"] >= 2]
                # one job in flight: none has its images being stored (the writer thread stores a job's
                # images while the next one generates; a kill then interrupts both), and the running
                # one has 2 s of steps left
                if len(completed_before) >= 2 and running and c.get("/health").json()["queue"]["saving"] == 0:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("the jobs did not progress")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()

    proc, url = start(data, log)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            history = c.get("/api/history", params={"limit": 1000}).json()
            listed = {item["id"]: item for item in history["items"]}
            # 1. Every image the history lists exists, is a whole PNG and is served.
            for item in listed.values():
                r = c.get(item["url"])
                assert r.status_code == 200
                with Image.open(next((data / "images").rglob(f"{item['id']}.png"))) as im:
                    im.load()
                    assert im.size == (64, 64)
            # 2. Nothing finished was lost: every job completed before the kill is complete, with its images.
            for job_id, image_ids in completed_before.items():
                job = c.get(f"/api/v1/jobs/{job_id}").json()
                assert job["status"] == "completed"
                assert [i["id"] for i in job["images"]] == image_ids
                assert set(image_ids) <= set(listed)
            # 3. Every image file on disk is listed (no orphan), and no temporary file is left.
            on_disk = {p.stem for p in (data / "images").rglob("*.png")}
            assert on_disk == set(listed)
            assert not list(data.rglob("*.tmp"))
            # 4. No job is left queued or running: the interrupted one failed, the waiting ones were cancelled.
            states = {j: c.get(f"/api/v1/jobs/{j}").json() for j in ids}
            statuses = [s["status"] for s in states.values()]
            assert statuses.count("failed") == 1 and "running" not in statuses and "queued" not in statuses
            assert statuses.count("completed") >= 2 and statuses.count("cancelled") >= 1
            failed = next(s for s in states.values() if s["status"] == "failed")
            assert "interrupted" in failed["error"]
            # Images of the interrupted job that were written before the kill stay listed (at most its n).
            assert len(failed["images"]) <= 3 and {i["id"] for i in failed["images"]} <= set(listed)
            # 5. The restarted server works.
            r = c.post("/api/v1/jobs", json={"prompt": "after", "width": 64, "height": 64, "steps": 1})
            job = r.json()
            deadline = time.monotonic() + 30
            while c.get(f"/api/v1/jobs/{job['id']}").json()["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
