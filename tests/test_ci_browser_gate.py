"""CI must not go green while the browser tests skip: under CI=true a missing chromium fails, both in
.ci/install-chromium (called by .ci/run) and in the browser tests themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_installer(tmp_path, ci: str | None):
    """.ci/install-chromium on a PATH without chromium, where apt-get fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("id", "mktemp", "grep", "tail", "tr", "rm", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for tool in ("apt-get", "sudo"):
        (bin_dir / tool).write_text("#!/bin/sh\necho 'E: Unable to locate package chromium' >&2\nexit 100\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([shutil.which("bash"), str(ROOT / ".ci" / "install-chromium")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_installer_fails_under_ci_with_the_reason(tmp_path):
    out = run_installer(tmp_path, "true")
    assert out.returncode == 1
    assert "chromium could not be installed" in out.stderr and "Unable to locate package chromium" in out.stderr


def test_installer_only_warns_outside_ci(tmp_path):
    out = run_installer(tmp_path, None)
    assert out.returncode == 0
    assert "the browser tests will be skipped" in out.stdout


def test_ci_run_calls_the_installer_before_the_tests():
    text = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/install-chromium" in text
    assert text.index("bash .ci/install-chromium") < text.index("python -m pytest")


def test_browser_tests_fail_rather_than_skip_under_ci(monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from . import test_server_browser as browser_tests

    monkeypatch.setattr(browser_tests, "chromium_path", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium is not installed.*CI=true"):
        browser_tests.chromium_or_unavailable()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        browser_tests.chromium_or_unavailable()
