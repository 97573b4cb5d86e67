"""The load test (benchmarks/load_test.py) against a spawned `zimage serve --fake`: exactly
queue_size + 1 of a burst accepted, the rest 429 with Retry-After, no event lost."""

from __future__ import annotations

import asyncio
import socket

import pytest

from .utils import benchmark_script

pytest.importorskip("fastapi")
pytest.importorskip("httpx")



def load_script():
    return benchmark_script("load_test")


def test_burst_admission_and_event_streams(tmp_path):
    lt = load_script()
    queue_size, clients = 2, 20
    # Jobs of 4 x 0.2 s outlast a burst of 20 submits, so that "exactly queue_size + 1" is decidable
    # (a round where the burst took longer is reported inconclusive; one of the two must be conclusive).
    with lt.SpawnedServer(queue_size, step_delay=0.2, data_dir=str(tmp_path)) as server:
        report = asyncio.run(lt.run_load_test(server.url, clients=clients, queue_size=queue_size, steps=4, rounds=2,
                                              jobs_each=1))
    print(lt.format_report(report))
    assert report["failures"] == []
    for accepted, conclusive in zip(report["burst"]["accepted_per_round"], report["burst"]["conclusive_per_round"]):
        assert accepted == queue_size + 1 or not conclusive
    assert [a + r for a, r in zip(report["burst"]["accepted_per_round"], report["burst"]["rejected_per_round"])] \
        == [clients, clients]
    assert report["burst"]["retry_after_values"] and min(report["burst"]["retry_after_values"]) >= 1
    assert report["closed_loop"]["jobs"] == queue_size + 1
    assert report["events_checked"] == sum(report["burst"]["accepted_per_round"]) + queue_size + 1
    for part in (report["burst"]["submit"], report["burst"]["job"], report["closed_loop"]["job"]):
        assert part["p50_ms"] <= part["p95_ms"]


def test_percentile():
    lt = load_script()
    values = list(range(1, 101))
    assert lt.percentile(values, 50) == 50 and lt.percentile(values, 95) == 95 and lt.percentile([7], 95) == 7


@pytest.mark.parametrize("script", ["load_test", "soak"])
def test_the_spawned_servers_port_is_reserved_until_it_stops(tmp_path, script):
    """The load test's and the soak's server port was picked (bound to port 0, closed) and given to
    `zimage serve --port`: free until the server bound it seconds later, and, in the soak, again
    between the SIGKILL and the restart, when the other pytest worker's servers may be handed it.
    It stays bound (SO_REUSEADDR, not listening) until the server is stopped now."""
    module = benchmark_script(script)
    if script == "load_test":
        server = module.SpawnedServer(2, step_delay=0.0, data_dir=str(tmp_path))
        stop = lambda: server.__exit__(None, None, None)  # noqa: E731
    else:
        server = module.Server(str(tmp_path), 0.0, 2, str(tmp_path / "log"))
        stop = server.stop
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", server.port))  # before the server starts, as after a kill
    stop()
    with socket.socket() as other:
        other.bind(("127.0.0.1", server.port))  # and released once it stopped
