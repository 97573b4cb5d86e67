"""``zimage bench`` as a new user runs it, from any folder: where its results go and what it says about
them (the ladder itself: test_compiled.py)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from zimage_native.cli import main

DRY = ["bench", "--tiny", "--device", "cpu", "--dtype", "float32", "--sizes", "32", "--steps", "1", "--repeats", "1",
       "--rungs", "eager", "--no-diffusers"]


def test_bench_results_go_under_the_current_folder_and_the_last_line_names_them_in_full(tmp_path, monkeypatch):
    """The default --out, benchmarks/results, is relative: run from elsewhere, the files went under that
    folder while the last line said only 'appended 1 row(s) to benchmarks/results/e2e.csv', which names
    no folder a user can find them in. The line names the absolute paths now."""
    here = tmp_path / "somewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    result = CliRunner().invoke(main, DRY)
    assert result.exit_code == 0, result.output
    results = here.resolve() / "benchmarks" / "results"
    assert (results / "e2e.csv").is_file() and (results / "e2e.json").is_file()
    assert result.output.splitlines()[-1] == (f"appended 1 row(s) to {results / 'e2e.csv'}; this run's rows and "
                                              f"checks: {results / 'e2e.json'}"), result.output


@pytest.fixture
def builds(monkeypatch):
    """The pipelines ``zimage bench`` built (none, for a refused run). These tests timed the refusal
    (under 5 s) instead, and the time counted the first import of zimage_native.bench and the
    pipeline (0.5 to 2.3 s measured on 2 loaded cores, load 7): a bound on the import, not on
    building."""
    from zimage_native import bench

    built = []

    def build(*args, **kwargs):
        built.append(args)
        raise RuntimeError("zimage bench built a pipeline")

    monkeypatch.setattr(bench, "build_random_pipeline", build)
    return built


def test_bench_out_that_cannot_be_written_fails_before_building(tmp_path, builds):
    """--out under a file (or in a folder without write permission) failed only when the first row was
    written, after the model was built and timed; it fails at once now, naming --out."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, [*DRY, "--out", str(blocker / "results")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --out: cannot write in the folder {blocker / 'results'}")
    assert "row done" not in result.output and builds == []


def test_the_recorded_git_sha_is_the_engines_not_the_current_folders(tmp_path, monkeypatch):
    """environment()'s git_sha was `git rev-parse HEAD` in the current folder: run from outside the
    checkout it was None, and from inside another repository that repository's commit, recorded with
    the timings as the engine's."""
    import subprocess
    from pathlib import Path

    from zimage_native import bench

    engine = Path(bench.__file__).resolve().parent
    expected = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=engine).stdout.strip() or None
    other = tmp_path / "other-repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=other, check=True)
    monkeypatch.chdir(other)
    assert bench._git_sha() == expected


@pytest.mark.parametrize("args, line", [
    # was "--width must be a positive multiple of 16, got 100 ..." after the weights were built
    (["--sizes", "100"], "Error: --sizes must be a positive multiple of 16, got 100 (nearest: 96 or 112)"),
    (["--sizes", "64", "--big-size", "2050"], "Error: --big-size must be a positive multiple of 16, got 2050 "
                                              "(nearest: 2048 or 2064)"),
    (["--steps", "0"], "Error: --steps must be >= 1 (denoising steps per image), got 0"),
    # was Python's "no median for empty data", after building and running the first rung
    (["--repeats", "0"], "Error: --repeats must be >= 1 (timed runs per measurement, their median is reported), "
                         "got 0"),
    (["--budget-s", "-5"], "Error: --budget-s must be a number of seconds >= 0, got -5.0"),  # was run as 0 s
])
def test_bench_numbers_are_refused_before_building_in_the_flags_names(tmp_path, builds, args, line):
    result = CliRunner().invoke(main, ["bench", "--tiny", "--device", "cpu", "--no-diffusers", "--rungs", "eager",
                                       "--out", str(tmp_path), *args])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [line], result.output
    assert builds == [] and not list(tmp_path.iterdir())  # nothing built, nothing written


def test_an_installed_engine_inside_another_repository_records_no_git_sha(tmp_path, monkeypatch):
    """An installed package in a virtual environment inside the user's own repository (ignored there):
    git, asked in the package's folder, answered with the user's repository's commit, recorded as the
    engine's. Only a checkout that tracks the engine's files gives a commit."""
    import subprocess

    from zimage_native import bench

    project = tmp_path / "project"
    package = project / ".venv" / "lib" / "site-packages" / "zimage_native"
    package.mkdir(parents=True)
    (project / ".gitignore").write_text(".venv/\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", ".gitignore"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"], cwd=project,
                   check=True)
    (package / "bench.py").write_text("")
    monkeypatch.setattr(bench, "__file__", str(package / "bench.py"))
    assert bench._git_sha() is None


@pytest.mark.parametrize("args", [["--device", "gpu"], ["--repeats", "0"]])
def test_a_refused_bench_run_makes_no_out_folder(tmp_path, args):
    """--out was made (check_writable_folder) before --device was read: `zimage bench --device gpu`
    left an empty benchmarks/results behind its one-line error."""
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["bench", "--tiny", "--out", str(out), *args])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert not out.exists()
