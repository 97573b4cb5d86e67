"""Run a measurement script in a process of its own, forked from one that has imported torch,
transformers' Qwen3 and the engine once.

The peak-memory tests each ran ``python -c SCRIPT`` in a new interpreter: every one paid the
imports again (7 s of CPU on the shared CI machine, more than most measurements). A server process
imports once, then forks a child per script: the child starts with the imports done and nothing
else (the server runs no torch op and holds no tensor), so each measurement is as isolated as in a
new interpreter (its own allocator, its own peak). Linux only, like the measurements
(/proc/self/clear_refs).

A script finds two functions beside it: ``status(key)``, a /proc/self/status entry in bytes, and
``reset_peak()``, called after its warm-up load: it collects the warm-up's garbage, hands glibc's
free blocks back to the system (malloc_trim), resets VmHWM and returns VmRSS, the start of the
measurement. Every block of 1 MiB or more is mapped on its own and unmapped when freed
(M_MMAP_THRESHOLD fixed at 1 MiB), so a peak counts the bytes the engine held at once, not what
glibc kept: with its default, dynamic threshold, the warm-up's freed model was reused by the
measured load, or not, by chance, and one measurement varied from 27 to 155 MiB above the start
between runs (111 to 123 MiB with the fixed threshold).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_SERVER = r"""
import ctypes, gc, json, os, sys, traceback
import torch  # noqa: F401
import zimage_native.loading, zimage_native.text_encoder  # noqa: F401 (first: the hub's kernels package)
import transformers.models.qwen3.modeling_qwen3  # noqa: F401
libc = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3


def status(key):  # a /proc/self/status entry (VmRSS, VmHWM, RssFile, RssAnon) in bytes
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def reset_peak():  # frees what the warm-up left, resets VmHWM to the resident size, returns VmRSS
    gc.collect()
    libc.malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")
    return status("VmRSS")


print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, job["out"]), (2, job["err"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            sys.argv = ["-c", *job["args"]]
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
            exec(compile(job["script"], "<measurement>", "exec"),
                 {"__name__": "__main__", "status": status, "reset_peak": reset_peak})
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, ended = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(ended), flush=True)
"""

_server: subprocess.Popen | None = None


def _kill() -> None:
    """Ends the server and the measurement it runs (one process group) and reaps the server: after a
    timeout or an exception while waiting (pytest-timeout, Ctrl-C), a measurement left running went
    on as an orphan, and a server left running answered the next call with the previous one's status."""
    global _server
    if _server is None:
        return
    try:
        os.killpg(_server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _server.wait()
    _server.stdin.close()
    _server.stdout.close()
    _server = None


def _stop() -> None:
    if _server is not None and _server.poll() is None:
        _server.stdin.close()
        try:
            _server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    _kill()


def _readline(timeout: float) -> str:
    ready, _, _ = select.select([_server.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no answer from the measurement process in {timeout:.0f} s")
    return _server.stdout.readline()


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        # A process group of its own (the server and the children it forks), so that _kill ends them all.
        _server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, start_new_session=True)
        try:
            if _readline(600).strip() != "ready":
                raise RuntimeError("the measurement process did not start")
        except BaseException:
            _kill()
            raise
        atexit.register(_stop)
    return _server


def run_fresh(script: str, *args: str, timeout: float = 600) -> str:
    """``python -c script *args`` in a fresh process (forked after the imports); its stdout.
    Raises ``subprocess.CalledProcessError`` (with its stderr) when the script fails."""
    server = _start()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        try:
            server.stdin.write(json.dumps({"script": script, "args": [str(a) for a in args], "out": str(out),
                                           "err": str(err)}) + "\n")
            server.stdin.flush()
            answer = _readline(timeout)
        except BaseException:  # a timeout, pytest-timeout, Ctrl-C: no measurement goes on, nor waits to answer
            _kill()
            raise
        if not answer:
            _kill()
            raise RuntimeError("the measurement process ended")
        code = int(answer)
        stdout, stderr = out.read_text(), err.read_text()
    if code:
        raise subprocess.CalledProcessError(code, ["python", "-c", script, *args], stdout, stderr)
    return stdout


