"""CI runs the suite on both cores with pytest-xdist (.ci/run): the tests that must not overlap, or
whose module fixtures are a process or a cluster, carry an xdist_group that --dist loadgroup keeps
on one worker."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module, group", [("test_ray_serve", "ray"), ("test_ray_serve_cli", "ray"),
                                           ("test_server_browser", "browser")])
def test_modules_that_must_not_overlap_share_a_group(module, group):
    """The two Ray modules each start a Ray instance (never two at once: one group); the browser
    module's chromium and server are module fixtures (once, on one worker)."""
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    if module.startswith("test_ray"):
        pytest.importorskip("ray")
    marks = importlib.import_module(f"tests.{module}").pytestmark
    marks = marks if isinstance(marks, list) else [marks]
    assert [m.args for m in marks if m.name == "xdist_group"] == [(group,)]
