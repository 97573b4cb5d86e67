"""The soak with faults (benchmarks/soak.py), short: concurrent valid and malformed requests, SSE
listeners that hang up, cancels, and a SIGKILL + restart of the server in the middle. No 5xx, no
accepted job lost or stuck, every listed image fetchable and every stored image listed."""

from __future__ import annotations

import asyncio

import pytest

from .utils import benchmark_script

pytest.importorskip("fastapi")
pytest.importorskip("httpx")



def load_script():
    return benchmark_script("soak")


@pytest.mark.slow
def test_short_soak_with_a_kill(tmp_path):
    soak = load_script()
    report = asyncio.run(soak.run_soak(duration=6, clients=6, max_requests=3000, seed=1, step_delay=0.01,
                                       queue_size=4, data_dir=str(tmp_path)))
    print(soak.format_report(report))
    assert report["server_errors"] == 0, report["server_error_examples"]
    assert report["kill"] and report["server_starts"] == 2
    jobs, images = report["jobs"], report["images"]
    assert jobs["accepted"] > 0 and jobs["lost"] == [] and jobs["stuck"] == []
    assert sum(jobs["final"].values()) == jobs["accepted"]
    assert images["unfetchable"] == [] and images["stored_not_listed"] == [] and images["listed_not_stored"] == []
    assert report["statuses"].get("422", 0) > 0 and report["sse_disconnects"] > 0
    assert not report["logged_500"] and report["ok"]
    assert report["submit_latency"]["p50_ms"] <= report["submit_latency"]["p99_ms"]


def test_percentile():
    soak = load_script()
    assert soak.percentile(list(range(1, 101)), 99) == 99 and soak.percentile([3], 50) == 3
