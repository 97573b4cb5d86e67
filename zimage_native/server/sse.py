"""A small Server-Sent Events reader over httpx (tests, the load test, scripts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class SSEvent:
    id: int | None
    type: str
    data: Any


def parse_lines(lines: Iterable[str]) -> Iterator[SSEvent]:
    """Events from the lines of an event stream (comments and ``retry:`` skipped)."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields or "event" in fields:
                raw = fields.get("data", "")
                try:
                    data = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    data = raw
                yield SSEvent(int(fields["id"]) if fields.get("id", "").isdigit() else None,
                              fields.get("event", "message"), data)
            fields = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data" and "data" in fields:
            fields["data"] += "\n" + value
        else:
            fields[key] = value


def follow(client, url: str, on_event: Callable[[SSEvent], None] | None = None, timeout: float = 30.0,
           headers: dict | None = None) -> list[SSEvent]:
    """Read a job's event stream until its terminal event; ``on_event`` sees each event first."""
    events: list[SSEvent] = []
    with client.stream("GET", url, timeout=timeout, headers=headers) as response:
        if response.status_code != 200:
            raise AssertionError(f"GET {url}: HTTP {response.status_code}: {response.read()[:200]!r}")
        for event in parse_lines(response.iter_lines()):
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event.type in TERMINAL:
                break
    return events
