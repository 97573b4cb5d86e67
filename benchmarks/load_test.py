"""Load test of the generation server on loopback (httpx + asyncio).

Two phases against a server with the fake engine (or any running server, with --url):

1. burst: N clients submit at the same instant to an idle server. Exactly queue_size + 1 must be
   accepted (202), the rest rejected with 429 and a Retry-After header. "Exactly" holds only when
   no job finishes while the burst lasts; a round where the burst outlasted a job is reported as
   inconclusive (then raise --step-delay), and at least one round must be conclusive. Every
   accepted job's event stream is followed to its end and must be complete: ids 1..k without
   gaps, queued, started, one progress event per step in order, completed.
2. closed loop: queue_size + 1 clients each run jobs back to back (submit, follow events to the
   end, submit again); none may be rejected. Reports job latency (submit to completed event).

Latencies are reported as p50/p95 in milliseconds. Run:

    python benchmarks/load_test.py                       # spawns `zimage serve --fake` on a free port
    python benchmarks/load_test.py --clients 64 --queue-size 8 --rounds 5 --json out.json
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --queue-size 8 --token T

Only loopback addresses are used when the script spawns the server; with --url it talks to
whatever URL is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zimage_native.server.sse import TERMINAL, parse_lines  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p95_ms": round(percentile(ms, 95), 2),
            "max_ms": round(max(ms), 2) if ms else float("nan"),
            "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan")}


async def follow(client: httpx.AsyncClient, url: str, timeout: float = 120.0) -> list:
    events = []
    async with client.stream("GET", url, timeout=timeout) as response:
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status_code}")
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if line == "":
                for event in parse_lines(lines):
                    events.append((time.perf_counter(), event))
                lines = []
                if events and events[-1][1].type in TERMINAL:
                    break
    return events


def check_events(events: list, steps: int) -> list[str]:
    """Problems with one job's event stream (empty when it is complete and in order)."""
    problems = []
    ids = [e.id for _, e in events]
    if ids != list(range(1, len(ids) + 1)):
        problems.append(f"event ids not 1..k: {ids}")
    types = [e.type for _, e in events]
    want = ["queued", "started"] + ["progress"] * steps + ["completed"]
    if types != want:
        problems.append(f"event types {types} != {want}")
    progress = [(e.data["step"], e.data["total"]) for _, e in events if e.type == "progress"]
    if progress != [(i, steps) for i in range(1, steps + 1)]:
        problems.append(f"progress {progress}")
    return problems


async def wait_idle(client: httpx.AsyncClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = (await client.get("/health")).json()["queue"]
        if queue["running"] == 0 and queue["queued"] == 0:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the server did not become idle")


def job_body(i: int, steps: int, size: int) -> dict[str, Any]:
    return {"prompt": f"load test {i}", "width": size, "height": size, "steps": steps, "seed": i}


async def burst(client: httpx.AsyncClient, clients: int, steps: int, size: int) -> dict[str, Any]:
    await wait_idle(client)
    start = asyncio.Event()

    async def one(i: int):
        await start.wait()
        t0 = time.perf_counter()
        r = await client.post("/api/v1/jobs", json=job_body(i, steps, size))
        return i, t0, time.perf_counter(), r

    tasks = [asyncio.create_task(one(i)) for i in range(clients)]
    await asyncio.sleep(0.05)  # every task waits at the start line
    start.set()
    results = await asyncio.gather(*tasks)
    window = max(t1 for _, _, t1, _ in results) - min(t0 for _, t0, _, _ in results)
    accepted = [(t0, r.json()) for _, t0, _, r in results if r.status_code == 202]
    rejected = [r for _, _, _, r in results if r.status_code == 429]
    other = [r.status_code for _, _, _, r in results if r.status_code not in (202, 429)]
    retry_after = [r.headers.get("Retry-After") for r in rejected]
    followed = await asyncio.gather(*[follow(client, job["events_url"]) for _, job in accepted])
    problems, latencies = [], []
    for (t0, job), events in zip(accepted, followed):
        for p in check_events(events, steps):
            problems.append(f"{job['id']}: {p}")
        if events:
            latencies.append(events[-1][0] - t0)
    run_s = [events[-1][1].data.get("seconds") for events in followed if events and events[-1][1].type == "completed"]
    shortest = min((v for v in run_s if v is not None), default=0.0)
    return {"accepted": len(accepted), "rejected_429": len(rejected), "other_status": other,
            "window_s": window, "shortest_job_s": shortest, "conclusive": window < shortest,
            "retry_after_ok": all(v is not None and v.isdigit() and int(v) >= 1 for v in retry_after),
            "retry_after_values": sorted({int(v) for v in retry_after if v and v.isdigit()}),
            "event_problems": problems, "submit_s": [t1 - t0 for _, t0, t1, _ in results],
            "submit_202_s": [t1 - t0 for _, t0, t1, r in results if r.status_code == 202],
            "submit_429_s": [t1 - t0 for _, t0, t1, r in results if r.status_code == 429],
            "job_s": latencies}


async def closed_loop(client: httpx.AsyncClient, clients: int, jobs_each: int, steps: int, size: int) -> dict:
    await wait_idle(client)
    submit_s, job_s, problems, rejected = [], [], [], 0

    async def worker(k: int):
        nonlocal rejected
        for j in range(jobs_each):
            t0 = time.perf_counter()
            r = await client.post("/api/v1/jobs", json=job_body(1000 * k + j, steps, size))
            submit_s.append(time.perf_counter() - t0)
            if r.status_code != 202:
                rejected += 1
                continue
            job = r.json()
            events = await follow(client, job["events_url"])
            problems.extend(f"{job['id']}: {p}" for p in check_events(events, steps))
            job_s.append(events[-1][0] - t0)

    t = time.perf_counter()
    await asyncio.gather(*[worker(k) for k in range(clients)])
    wall = time.perf_counter() - t
    return {"clients": clients, "jobs": len(job_s), "rejected": rejected, "event_problems": problems,
            "submit_s": submit_s, "job_s": job_s, "wall_s": wall, "jobs_per_s": len(job_s) / wall if wall else 0.0}


async def run_load_test(url: str, *, clients: int = 48, queue_size: int = 8, steps: int = 4, size: int = 64,
                        rounds: int = 3, jobs_each: int = 2, token: str | None = None) -> dict[str, Any]:
    """Both phases against ``url``; returns the figures and a list of failed checks (empty = pass)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=clients + 32, max_keepalive_connections=clients + 32)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as client:
        caps = (await client.get("/api/v1/capabilities")).json()
        if caps["queue"]["queue_size"] != queue_size:
            raise RuntimeError(f"the server's queue size is {caps['queue']['queue_size']}, not {queue_size}")
        bursts = [await burst(client, clients, steps, size) for _ in range(rounds)]
        loop = await closed_loop(client, queue_size + 1, jobs_each, steps, size)
    failures = []
    for i, b in enumerate(bursts):
        # "Exactly queue_size + 1" holds when no job can finish while the burst lasts; otherwise a
        # place frees up mid-burst and one more is (rightly) accepted, so the round is inconclusive.
        if b["conclusive"] and b["accepted"] != queue_size + 1:
            failures.append(f"burst {i}: {b['accepted']} accepted, expected {queue_size + 1}")
        if b["accepted"] < queue_size + 1:
            failures.append(f"burst {i}: only {b['accepted']} accepted, expected {queue_size + 1}")
        if b["accepted"] + b["rejected_429"] != clients or b["other_status"]:
            failures.append(f"burst {i}: {b['rejected_429']} answered 429, other statuses {b['other_status']}")
        if not b["retry_after_ok"]:
            failures.append(f"burst {i}: a 429 without a valid Retry-After")
        failures += [f"burst {i}: {p}" for p in b["event_problems"]]
    if not any(b["conclusive"] for b in bursts):
        failures.append("every burst lasted longer than a job: raise --step-delay (or --steps) so that jobs outlast "
                        f"the burst (burst {max(b['window_s'] for b in bursts):.3f} s, job "
                        f"{min(b['shortest_job_s'] for b in bursts):.3f} s)")
    if loop["rejected"]:
        failures.append(f"closed loop: {loop['rejected']} rejected")
    failures += [f"closed loop: {p}" for p in loop["event_problems"]]
    return {
        "config": {"clients": clients, "queue_size": queue_size, "steps": steps, "size": size, "rounds": rounds,
                   "jobs_each": jobs_each, "engine": caps.get("engine"), "model": caps.get("model")},
        "burst": {"accepted_per_round": [b["accepted"] for b in bursts],
                  "conclusive_per_round": [b["conclusive"] for b in bursts],
                  "window_ms_per_round": [round(b["window_s"] * 1000, 1) for b in bursts],
                  "rejected_per_round": [b["rejected_429"] for b in bursts],
                  "retry_after_values": sorted({v for b in bursts for v in b["retry_after_values"]}),
                  "submit": summary([v for b in bursts for v in b["submit_s"]]),
                  "submit_202": summary([v for b in bursts for v in b["submit_202_s"]]),
                  "submit_429": summary([v for b in bursts for v in b["submit_429_s"]]),
                  "job": summary([v for b in bursts for v in b["job_s"]])},
        "closed_loop": {"clients": loop["clients"], "jobs": loop["jobs"], "jobs_per_s": round(loop["jobs_per_s"], 2),
                        "submit": summary(loop["submit_s"]), "job": summary(loop["job_s"])},
        "events_checked": sum(b["accepted"] for b in bursts) + loop["jobs"],
        "failures": failures,
    }


def reserve_port() -> socket.socket:
    """A loopback port for a server this script starts: the socket returned stays bound to it
    (SO_REUSEADDR, not listening) until closed. The server's own bind (SO_REUSEADDR, as uvicorn and
    zimage serve's port check set it) succeeds, while no bind to port 0 elsewhere is handed the port
    during the server's start-up (or, in the soak, between its SIGKILL and restart); a port picked
    and closed could be (the tests run two pytest workers that start servers all the time)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class SpawnedServer:
    """``zimage serve --fake`` in a child process on a free loopback port, with a throwaway data folder."""

    def __init__(self, queue_size: int, step_delay: float, data_dir: str):
        self.reservation = reserve_port()  # closed in __exit__
        self.port = self.reservation.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "zimage_native.cli", "serve", "--fake", "--fake-step-delay",
                    str(step_delay), "--host", "127.0.0.1", "--port", str(self.port), "--queue-size",
                    str(queue_size), "--data-dir", data_dir, "--min-side", "32"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "SpawnedServer":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("the server did not start within 60 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.reservation.close()


def format_report(r: dict[str, Any]) -> str:
    c, b, loop = r["config"], r["burst"], r["closed_loop"]
    lines = [
        f"burst: {c['clients']} concurrent submits x {c['rounds']} rounds, queue size {c['queue_size']}, "
        f"{c['steps']} steps of the {c['engine']} engine",
        f"  burst window per round {b['window_ms_per_round']} ms (conclusive: {b['conclusive_per_round']})",
        f"  accepted per round {b['accepted_per_round']} (expected {c['queue_size'] + 1}), "
        f"429 per round {b['rejected_per_round']}, Retry-After values {b['retry_after_values']}",
        f"  submit latency p50 {b['submit']['p50_ms']} ms, p95 {b['submit']['p95_ms']} ms (n={b['submit']['n']}; "
        f"202: p50 {b['submit_202']['p50_ms']} / p95 {b['submit_202']['p95_ms']} ms, "
        f"429: p50 {b['submit_429']['p50_ms']} / p95 {b['submit_429']['p95_ms']} ms)",
        f"  accepted job latency (submit to completed event) p50 {b['job']['p50_ms']} ms, "
        f"p95 {b['job']['p95_ms']} ms",
        f"closed loop: {loop['clients']} clients, {loop['jobs']} jobs, {loop['jobs_per_s']} jobs/s",
        f"  submit latency p50 {loop['submit']['p50_ms']} ms, p95 {loop['submit']['p95_ms']} ms",
        f"  job latency p50 {loop['job']['p50_ms']} ms, p95 {loop['job']['p95_ms']} ms",
        f"event streams checked: {r['events_checked']}, failures: {len(r['failures'])}",
    ]
    lines += [f"  FAIL {f}" for f in r["failures"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="test a running server instead of spawning `zimage serve --fake`")
    parser.add_argument("--token", help="bearer token of the server (with --url)")
    parser.add_argument("--clients", type=int, default=48, help="concurrent submits per burst")
    parser.add_argument("--queue-size", type=int, default=8, help="the server's queue size")
    parser.add_argument("--steps", type=int, default=4, help="steps per job")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--rounds", type=int, default=3, help="burst rounds")
    parser.add_argument("--jobs-each", type=int, default=2, help="jobs per client in the closed loop")
    parser.add_argument("--step-delay", type=float, default=0.25, help="seconds per step of the spawned fake engine")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.clients <= args.queue_size + 1:
        parser.error("--clients must exceed --queue-size + 1 so that some submits are rejected")

    kwargs = dict(clients=args.clients, queue_size=args.queue_size, steps=args.steps, size=args.size,
                  rounds=args.rounds, jobs_each=args.jobs_each, token=args.token)
    if args.url:
        report = asyncio.run(run_load_test(args.url, **kwargs))
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as data, SpawnedServer(args.queue_size, args.step_delay, data) as server:
            report = asyncio.run(run_load_test(server.url, **kwargs))
        report["config"]["step_delay_s"] = args.step_delay
    report["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
