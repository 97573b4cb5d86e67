"""tests/fresh_process.py, the process the peak-memory measurements are forked from: a measurement
that is given up on (its timeout, pytest-timeout, Ctrl-C) must not go on running, and must not
leave the next measurement reading its answer."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from . import fresh_process
from .fresh_process import run_fresh

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the measurement process forks (POSIX)")

_SLOW = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie left to a container's init that reaps none does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(path: Path, seconds: float = 60) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"the measurement never started ({path})")


def gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)


class GivenUp(Exception):
    pass


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_measurement_given_up_on_stops_and_the_next_one_gets_its_own_answer(tmp_path):
    """A measurement that timed out went on running as an orphan (its server was killed, the forked
    child was not: a 120 s sleep still ran 3 s later with parent 1); one interrupted by an exception
    while waiting (pytest-timeout's signal method, Ctrl-C) left the server waiting for it, so every
    later call read the answer meant for the one before (FileNotFoundError for its output files, each
    time). Both end the server and the measurement now, and the next call starts a fresh server."""
    assert run_fresh("print('warm')") == "warm\n"  # the server is up: the timeouts below are the scripts'
    pid_file = tmp_path / "timed_out"
    with pytest.raises(TimeoutError):
        run_fresh(_SLOW, pid_file, timeout=3)
    assert gone(wait_for(pid_file)), "the measurement that timed out is still running"
    assert run_fresh("print('after a timeout')") == "after a timeout\n"

    pid_file = tmp_path / "interrupted"

    def interrupt(signum, frame):
        if pid_file.exists() and pid_file.read_text():
            raise GivenUp()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    try:
        with pytest.raises(GivenUp):
            run_fresh(_SLOW, pid_file, timeout=120)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert gone(int(pid_file.read_text())), "the interrupted measurement is still running"
    assert run_fresh("print('after an interruption')") == "after an interruption\n"
    assert run_fresh("import sys; print(sys.argv[1:])", "a", 1) == "['a', '1']\n"
    assert fresh_process._server is not None and fresh_process._server.poll() is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident size (Linux)")
def test_a_measurement_counts_what_it_holds_not_what_its_warm_up_freed():
    """A script measures from ``reset_peak()``, after its warm-up: what the warm-up freed is handed
    back to the system first, so blocks allocated afterwards count in full, whatever the warm-up
    did (with glibc's default threshold, the text encoder peak measurement read 27 to 155 MiB
    above the start, run after run, for the same load)."""
    script = """
import torch
warm = [torch.ones(1 << 20) for _ in range(40)]  # 160 MiB written, then freed
del warm
start = reset_peak()
held = [torch.ones(1 << 20) for _ in range(20)]  # 80 MiB held at once
print(status("VmHWM") - start, status("VmRSS") - start)
"""
    for _ in range(2):
        peak, rss = map(int, run_fresh(script).split())
        assert 80 << 20 <= peak < 88 << 20 and 80 << 20 <= rss <= peak, (peak >> 20, rss >> 20)
