"""Soak test of the generation server with faults, on loopback (httpx + asyncio).

Spawns ``zimage serve --fake`` (a throwaway data folder, a free 127.0.0.1 port) and runs
concurrent clients against it for a bounded time and number of requests. The clients mix:

- valid job submissions (some asking the fake engine to fail, some with an img2img or inpainting
  input), synchronous ``/api/generate`` and OpenAI-route calls;
- malformed requests: broken JSON, wrong types, out-of-range values, unknown fields, bad ids,
  bad query parameters, bad headers, oversized bodies, unsupported methods;
- Server-Sent Event listeners that disconnect in the middle of a stream;
- cancels of accepted jobs; history listing, image and thumbnail fetches, deletes.

In the middle of the run the server is killed with SIGKILL and started again on the same port and
data folder (clients that hit the gap count connection errors and carry on). At the end the
script checks, against the restarted server and the data folder:

- the number of requests and of 5xx answers (must be 0);
- every accepted job (202) ended completed, failed or cancelled (none lost, none stuck);
- every image the history lists can be fetched, and every image file stored is listed;
- p50/p99 latency of the submit route (``POST /api/v1/jobs``).

Exit status 0 when all of that holds. Run:

    python benchmarks/soak.py                                  # 180 s, 16 clients
    python benchmarks/soak.py --duration 600 --clients 32 --json soak.json
    python benchmarks/soak.py --duration 10 --clients 6        # what the CI test runs

Only loopback is used: the script refuses any other host.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import percentile, reserve_port  # noqa: E402  (the load test's helpers)

TERMINAL = ("completed", "failed", "cancelled")
TOKEN = "soak-token"
SUBMIT = "POST /api/v1/jobs"


def png_b64(size=(64, 48), color=(120, 40, 200), mode="RGB") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    """``zimage serve --fake`` in a child process; :meth:`kill` is a SIGKILL, :meth:`start` again
    reuses the port and the data folder."""

    def __init__(self, data_dir: str, step_delay: float, queue_size: int, log_path: str, port: int | None = None):
        self.reservation = None if port else reserve_port()  # held until stop(): the restart reuses the port
        self.port = port or self.reservation.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "zimage_native.cli", "serve", "--fake", "--fake-step-delay", str(step_delay),
                    "--host", "127.0.0.1", "--port", str(self.port), "--queue-size", str(queue_size),
                    "--data-dir", data_dir, "--token", TOKEN, "--min-side", "32", "--max-side", "256",
                    "--max-pixels", str(256 * 256), "--max-steps", "20"]
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = log_path  # the server's stderr, appended by each start (a pipe could fill and block it)

    def start(self, timeout: float = 90) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log()[-800:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"the server did not start within {timeout} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> str:
        """Terminate; returns its whole stderr, every start (where a logged 500 would show)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.reservation is not None:
            self.reservation.close()
        return self.log()


class Soak:
    def __init__(self, url: str, rng: random.Random, deadline: float, max_requests: int):
        self.url = url
        self.rng = rng
        self.deadline = deadline
        self.max_requests = max_requests
        self.requests = 0
        self.statuses: Counter = Counter()
        self.server_errors: list[str] = []
        self.connection_errors = 0
        self.submit_latency: list[float] = []
        self.accepted: set[str] = set()
        self.sse_disconnects = 0
        self.cancels = 0
        self.image_ids: list[str] = []
        self.image = png_b64()
        self.mask = png_b64(mode="L")

    @property
    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.requests < self.max_requests

    async def call(self, client: httpx.AsyncClient, method: str, path: str, label: str | None = None,
                   **kw) -> httpx.Response | None:
        self.requests += 1
        t = time.perf_counter()
        try:
            r = await client.request(method, path, **kw)
        except httpx.HTTPError:
            self.connection_errors += 1  # the server is down (the kill) or the connection was cut
            await asyncio.sleep(0.05)
            return None
        if (label or f"{method} {path}") == SUBMIT:
            self.submit_latency.append(time.perf_counter() - t)
            if r.status_code == 202:  # malformed-looking bodies can be valid: every 202 is tracked
                self.accepted.add(r.json()["id"])
        self.statuses[r.status_code] += 1
        if r.status_code >= 500:
            self.server_errors.append(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
        return r

    # -- the actions
    def job_body(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"prompt": rng.choice(["a fox", "a lighthouse at dusk", "a cat [fail]", "a robot"]),
                                "steps": rng.randint(1, 6), "width": rng.choice([32, 64, 96]),
                                "height": rng.choice([32, 64]), "seed": rng.randrange(2**32)}
        task = rng.random()
        if task < 0.1:
            body.update(image=self.image, strength=0.5)
        elif task < 0.2:
            body.update(image=self.image, mask=self.mask)
        elif task < 0.25:
            body.update(control_image=self.image)
        return body

    async def submit(self, client) -> None:
        await self.call(client, "POST", "/api/v1/jobs", json=self.job_body())

    async def malformed(self, client) -> None:
        rng = self.rng
        bad_id = rng.choice(["nope", "j123", "..%2Fx", "j" + "0" * 20 + "-9999", "%00"])
        choice = rng.randrange(12)
        if choice == 0:
            await self.call(client, "POST", "/api/v1/jobs", label=SUBMIT, content=b'{"prompt": "a",',
                            headers={"content-type": "application/json"})
        elif choice == 1:
            await self.call(client, "POST", "/api/v1/jobs", label=SUBMIT,
                            json={"prompt": "a", "steps": rng.choice(["8", -1, 10**30, 1.5, None, [1]])})
        elif choice == 2:
            await self.call(client, "POST", "/api/v1/jobs", label=SUBMIT,
                            json={"prompt": "a", "width": rng.choice([33, 10**9, -16, 0])})
        elif choice == 3:
            await self.call(client, "POST", "/api/v1/jobs", label=SUBMIT, json={"prompt": "a", "colour": "red"})
        elif choice == 4:
            await self.call(client, "POST", "/api/v1/jobs", label=SUBMIT,
                            json={"prompt": "a", "image": rng.choice(["!!", "aGVsbG8=", "data:text/plain,x"])})
        elif choice == 5:
            await self.call(client, "POST", "/api/v1/jobs", label=SUBMIT, content=b"x" * (2 * 2**20),
                            headers={"content-type": "application/json"})
        elif choice == 6:
            await self.call(client, "GET", f"/api/v1/images?limit={rng.choice([-5, 0, 10**25])}"
                                           f"&offset={rng.choice([-1, 10**30, 'x'])}", label="GET /api/v1/images")
        elif choice == 7:
            await self.call(client, "GET", f"/api/v1/jobs/{bad_id}", label="GET /api/v1/jobs/{id}")
        elif choice == 8:
            await self.call(client, "GET", f"/api/v1/images/{bad_id}", label="GET /api/v1/images/{id}")
        elif choice == 9:
            await self.call(client, "GET", "/api/v1/jobs/j" + "0" * 20 + "/events", label="events",
                            headers={"Last-Event-ID": rng.choice(["x", "-1", "9" * 40])})
        elif choice == 10:
            await self.call(client, rng.choice(["PUT", "PATCH", "OPTIONS"]), "/api/v1/jobs", label="method")
        else:
            await self.call(client, "POST", "/v1/images/generations", label="openai",
                            json={"prompt": "", "n": rng.choice([0, 99]), "size": "1x"})

    async def listen_and_drop(self, client) -> None:
        """Follow a job's events and hang up after a few lines (before the end, usually)."""
        if not self.accepted:
            return
        job_id = self.rng.choice(sorted(self.accepted))
        self.requests += 1
        try:
            async with client.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=10) as r:
                self.statuses[r.status_code] += 1
                if r.status_code >= 500:
                    self.server_errors.append(f"events {job_id} -> {r.status_code}")
                    return
                lines = self.rng.randint(1, 6)
                async for _ in r.aiter_lines():
                    lines -= 1
                    if lines <= 0:
                        break
            self.sse_disconnects += 1
        except httpx.HTTPError:
            self.connection_errors += 1

    async def cancel(self, client) -> None:
        if self.accepted:
            job_id = self.rng.choice(sorted(self.accepted))
            r = await self.call(client, "POST", f"/api/v1/jobs/{job_id}/cancel", label="cancel")
            if r is not None and r.status_code == 200:
                self.cancels += 1

    async def browse(self, client) -> None:
        r = await self.call(client, "GET", f"/api/v1/images?limit={self.rng.randint(1, 50)}", label="list")
        if r is None or r.status_code != 200:
            return
        items = r.json()["items"]
        if not items:
            return
        item = self.rng.choice(items)
        action = self.rng.random()
        if action < 0.5:
            await self.call(client, "GET", item["url"], label="image")
        elif action < 0.7:
            await self.call(client, "GET", item["url"] + "/thumbnail", label="thumbnail")
        elif action < 0.8:
            await self.call(client, "GET", item["url"] + "?format=jpeg", label="image")
        else:
            await self.call(client, "DELETE", item["url"], label="delete")

    async def sync_generate(self, client) -> None:
        if self.rng.random() < 0.5:
            body = {"prompt": "a bridge", "steps": 2, "width": 32, "height": 32}
            await self.call(client, "POST", "/api/generate", label="generate", json=body)
        else:
            body = {"prompt": "a bridge", "size": "32x32", "num_inference_steps": 2}
            await self.call(client, "POST", "/v1/images/generations", label="openai", json=body)

    async def client_loop(self, client) -> None:
        actions = [(self.submit, 30), (self.malformed, 30), (self.listen_and_drop, 10), (self.cancel, 6),
                   (self.browse, 20), (self.sync_generate, 4)]
        funcs, weights = zip(*actions)
        while self.running:
            await self.rng.choices(funcs, weights)[0](client)


async def settle(url: str, accepted: set[str], timeout: float) -> dict[str, Any]:
    """Wait for every accepted job to end; returns their statuses and the ones lost or stuck."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    final: dict[str, str] = {}
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        pending = set(accepted)
        while pending and time.monotonic() < deadline:
            for job_id in sorted(pending):
                r = await client.get(f"/api/v1/jobs/{job_id}")
                if r.status_code == 404:
                    final[job_id] = "lost"
                    pending.discard(job_id)
                elif r.json()["status"] in TERMINAL:
                    final[job_id] = r.json()["status"]
                    pending.discard(job_id)
                else:
                    last[job_id] = {k: r.json().get(k) for k in ("status", "created", "started", "queue_position",
                                                                  "progress", "cancel_requested", "params")}
            if pending:
                await asyncio.sleep(0.2)
        for job_id in pending:
            final[job_id] = "stuck"
    counts = Counter(final.values())
    return {"accepted": len(accepted), "final": dict(counts),
            "lost": sorted(j for j, s in final.items() if s == "lost"),
            "stuck": sorted(j for j, s in final.items() if s == "stuck"),
            "stuck_examples": [last.get(j) for j, s in sorted(final.items()) if s == "stuck"][:3]}


async def audit_images(url: str, data_dir: Path) -> dict[str, Any]:
    """Every listed image fetchable; every stored image file listed."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    listed: list[dict] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        offset = 0
        while True:
            page = (await client.get("/api/v1/images", params={"limit": 1000, "offset": offset})).json()
            listed += page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                break
        unfetchable = []
        for item in listed:
            r = await client.get(item["url"])
            if r.status_code != 200 or not r.content.startswith(b"\x89PNG"):
                unfetchable.append(item["id"])
    stored = {p.stem for p in (data_dir / "images").rglob("*.png")}
    ids = {item["id"] for item in listed}
    return {"listed": len(listed), "stored": len(stored), "unfetchable": unfetchable,
            "stored_not_listed": sorted(stored - ids), "listed_not_stored": sorted(ids - stored)}


async def run_soak(duration: float, clients: int, max_requests: int, seed: int, step_delay: float = 0.01,
                   queue_size: int = 8, data_dir: str | None = None, kill_at: float = 0.5) -> dict[str, Any]:
    """The whole soak; ``kill_at``: the fraction of ``duration`` at which the server is SIGKILLed
    and restarted (None: no kill)."""
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="zimage-soak-")
        data_dir = tmp.name
    log_path = os.path.join(tempfile.gettempdir(), f"zimage-soak-{os.getpid()}-{seed}.log")
    server = Server(data_dir, step_delay, queue_size, log_path)
    started = time.monotonic()
    server.start()
    rng = random.Random(seed)
    soak = Soak(server.url, rng, time.monotonic() + duration, max_requests)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=clients * 2)
    kill_report: dict[str, Any] = {}

    async def killer():
        if kill_at is None:
            return
        await asyncio.sleep(duration * kill_at)
        t = time.monotonic()
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        downtime = time.monotonic() - t
        soak.deadline += downtime  # the traffic after the restart lasts as long as planned
        kill_report.update(at_s=round(t - started, 1), downtime_s=round(downtime, 2))

    logs = ""
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30, limits=limits) as client:
            await asyncio.gather(killer(), *(soak.client_loop(client) for _ in range(clients)))
        jobs = await settle(server.url, soak.accepted, timeout=max(30.0, duration))
        images = await audit_images(server.url, Path(data_dir))
    finally:
        logs = server.stop()
        Path(log_path).unlink(missing_ok=True)
        if tmp is not None:
            tmp.cleanup()
    ms = [v * 1000 for v in soak.submit_latency]
    report = {
        "config": {"duration_s": duration, "clients": clients, "max_requests": max_requests, "seed": seed,
                   "step_delay_s": step_delay, "queue_size": queue_size},
        "wall_s": round(time.monotonic() - started, 1),
        "requests": soak.requests,
        "statuses": {str(k): v for k, v in sorted(soak.statuses.items())},
        "server_errors": len(soak.server_errors),
        "server_error_examples": soak.server_errors[:5],
        "connection_errors": soak.connection_errors,
        "sse_disconnects": soak.sse_disconnects,
        "cancels": soak.cancels,
        "kill": kill_report,
        "server_starts": server.starts,
        "jobs": jobs,
        "images": images,
        "submit_latency": {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2),
                           "p99_ms": round(percentile(ms, 99), 2)},
        "logged_500": bool(re.search(r"request [0-9a-f]{16} \(", logs)) or "Traceback" in logs,
        "server_log_tail": logs[-1500:] if ("Traceback" in logs) else "",
    }
    report["ok"] = (report["server_errors"] == 0 and not jobs["lost"] and not jobs["stuck"]
                    and not images["unfetchable"] and not images["stored_not_listed"]
                    and not images["listed_not_stored"] and not report["logged_500"]
                    and (kill_at is None or bool(kill_report)))
    return report


def format_report(r: dict[str, Any]) -> str:
    c, j, i, s = r["config"], r["jobs"], r["images"], r["submit_latency"]
    lines = [
        f"soak: {c['clients']} clients, {r['wall_s']} s wall ({c['duration_s']} s of traffic), seed {c['seed']}",
        f"  requests {r['requests']}, statuses {r['statuses']}",
        f"  5xx: {r['server_errors']}; connection errors (server down) {r['connection_errors']}; "
        f"SSE listeners dropped mid-stream {r['sse_disconnects']}; cancels {r['cancels']}",
        f"  SIGKILL + restart: {r['kill'] or 'not done'} (server starts {r['server_starts']})",
        f"  jobs accepted {j['accepted']}: {j['final']}; lost {len(j['lost'])}, stuck {len(j['stuck'])}",
        f"  images listed {i['listed']}, stored {i['stored']}; unfetchable {len(i['unfetchable'])}, "
        f"stored but not listed {len(i['stored_not_listed'])}, listed but not stored {len(i['listed_not_stored'])}",
        f"  submit latency p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms (n={s['n']})",
        f"  {'OK' if r['ok'] else 'FAILED'}",
    ]
    lines += [f"  5xx: {e}" for e in r["server_error_examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of traffic (default 180)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-delay", type=float, default=0.01, help="seconds per step of the fake engine")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--no-kill", action="store_true", help="do not SIGKILL and restart the server mid-run")
    parser.add_argument("--data-dir", help="keep the server's data here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    a = parser.parse_args(argv)
    report = asyncio.run(run_soak(a.duration, a.clients, a.max_requests, a.seed, a.step_delay, a.queue_size,
                                  a.data_dir, None if a.no_kill else 0.5))
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
