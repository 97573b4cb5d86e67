"""benchmarks/lowvram_check.py (issue 14's GPU measurements) as a CPU dry run on tiny models: the
JSON it writes, streamed blocks equal to resident ones, the byte count of the copies, the budget's
skip path, and a check that fails when streamed results differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zimage_native import footprint as fp

from .utils import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lowvram_check.py"


def load_script():
    return benchmark_script("lowvram_check")


def test_dry_run_writes_the_json_and_streamed_equals_resident(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--repeats", "1", "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((out / "lowvram.json").read_text())
    script = load_script()
    assert [s["name"] for s in data["steps"]] == list(script.ORDER)
    assert all(s["status"] == "done" for s in data["steps"]), data["steps"]
    assert data["settings"]["tiny"] and data["settings"]["size"] == 64 and data["h2d_gb_s"] is None

    # Streamed blocks: bit-equal to resident on the CPU, with the copies counted by the transfer hook.
    from zimage_native import bench
    from zimage_native.offload import RESIDENT, _streamed_tensors, dit_blocks
    from zimage_native.testing import build_tokenizer

    tcfg, vcfg, qcfg = bench.model_configs(len(build_tokenizer(tmp_path / "tok")), tiny=True)

    assert [r["dit"] for r in data["offload"]] == ["bf16", "gguf:Q4_K"]
    for row in data["offload"]:
        assert row["bit_equal"] and row["finite"] and row["rel_l2"] == 0.0 and row["max_abs"] == 0.0, row
        assert row["resident_s"] > 0 and row["streamed_s"] > 0 and row["resident_runs"] >= 1
        assert row["peak_resident_bytes"] is None and row["peak_streamed_bytes"] is None  # n/a on the CPU
        dit = bench.random_dit(tcfg, "cpu", torch.bfloat16, row["dit"])
        sizes = [sum(t.numel() * t.element_size() for t in _streamed_tensors(b, RESIDENT)) for b in dit_blocks(dit)]
        n_context = len(dit.context_refiner)
        # Every block that runs is copied once per use (the context refiner once per request, the
        # rest every step), plus prefetches that guess wrong: the learned successor of the last
        # block alternates between the next request's first block and the next step's (one wasted
        # copy per request today; two is the bound this allows).
        needed = sum(sizes[:n_context]) + row["steps"] * sum(sizes[n_context:])
        assert needed <= row["bytes_per_request"] <= needed + 2 * max(sizes), (row["bytes_per_request"], needed)
        assert row["bytes_per_step"] == row["bytes_per_request"] / row["steps"]
    assert sum(line.startswith("PASS offload=blocks equals resident") for line in data["checks"]) == 2

    # Profiles: one request each, per phase, with the bytes footprint.py computes for the same models.
    by_name = {p.name: p for p in fp.PROFILES}
    assert [r["profile"] for r in data["profiles"]] == ["8gb", "12gb", "16gb", "rtx4090"]
    for row in data["profiles"]:
        p = by_name[row["profile"]]
        assert (row["dit"], row["text_encoder"], row["offload"], row["tiled_vae"]) == (
            p.dit, p.text_encoder, p.offload, p.tiled_vae)
        assert row["computed_bytes"] == fp.profile_bytes(p, tcfg, qcfg.to_dict(), vcfg)
        assert set(row["phases"]) == {"encode", "denoise", "decode"}
        assert all(ph["seconds"] > 0 and "peak_allocated_bytes" not in ph for ph in row["phases"].values())
        assert row["image_finite"] and row["fits"] is None
    assert "| 8gb | gguf:Q4_K / int8 / blocks |" in result.stdout and "bit-equal" in result.stdout


def test_budget_spent_skips_every_step_and_still_writes_the_json(tmp_path, capsys):
    script = load_script()
    assert script.main(["--tiny", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lowvram.json").read_text())
    assert [s["status"] for s in data["steps"]] == ["skipped"] * len(script.ORDER)
    assert data["offload"] == [] and data["profiles"] == [] and data["checks"] == []
    printed = capsys.readouterr().out
    for name in script.ORDER:
        assert f"== {name}: skipped (budget left 0 s < estimated {script.ESTIMATE_S[name]} s)" in printed


def test_a_streamed_result_that_differs_fails_the_check(tmp_path, monkeypatch, capsys):
    """The equality check can fail: a transfer that changes the weights it copies makes it FAIL (exit 1)."""
    from zimage_native import offload

    script = load_script()
    monkeypatch.setattr(script, "ORDER", ("offload bf16",))
    real = offload.stream_blocks

    def corrupting(transformer, device, depth=1, transfer=None, **kw):
        return real(transformer, device, depth, lambda t: t * 1.5 if t.is_floating_point() else t, **kw)

    monkeypatch.setattr(offload, "stream_blocks", corrupting)
    assert script.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--repeats", "1"]) == 1
    data = json.loads((tmp_path / "lowvram.json").read_text())
    row = data["offload"][0]
    assert not row["bit_equal"] and row["rel_l2"] > script.OFFLOAD_MAX_REL
    assert data["checks"][0].startswith("FAIL offload=blocks equals resident (bf16 DiT")


def test_the_gpu_bookkeeping_with_stand_in_cuda_counters(tmp_path, monkeypatch, capsys):
    """The CUDA-only branches (peaks, pinned host bytes, copy rate, fits, the table's numbers) on the
    CPU: torch.cuda's counters replaced by stand-ins, the models still on the CPU."""
    script = load_script()
    monkeypatch.setattr(script, "ORDER", ("offload bf16", "profile 8gb", "profile 16gb"))
    gib = 2**30
    peaks = iter(range(1, 1000))
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: gib // 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks) * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: int(7.75 * gib))
    monkeypatch.setattr(torch.cuda, "host_memory_stats",  # torch 2.6 has none: set it there too
                        lambda: {"allocated_bytes.current": 3 * gib, "active_bytes.current": 2 * gib}, raising=False)
    monkeypatch.setattr(script, "h2d_rate", lambda run: 25.0)

    class CudaRun(script.Run):
        def __init__(self, args):
            super().__init__(args)
            self.cuda = True

    monkeypatch.setattr(script, "Run", CudaRun)
    assert script.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--repeats", "1"]) == 0
    data = json.loads((tmp_path / "lowvram.json").read_text())
    row = data["offload"][0]
    assert row["pinned_host_bytes"] == {"held": 3 * gib, "active": 2 * gib} and data["h2d_gb_s"] == 25.0
    assert row["copy_s_per_step_at_h2d"] == pytest.approx(row["bytes_per_step"] / 25e9)
    assert row["peak_resident_bytes"] % gib == 0 and row["peak_streamed_bytes"] > row["peak_resident_bytes"]
    small, big = data["profiles"]
    for p in (small, big):
        assert p["peak_reserved_bytes"] == int(7.75 * gib)
        assert all(ph["allocated_before_bytes"] == gib // 2 and ph["peak_allocated_bytes"] % gib == 0
                   for ph in p["phases"].values())
    # 7.75 GiB reserved + 0.5 GiB context: fits 16 GiB, not 8
    assert (small["fits"], small["headroom_gib"]) == (False, pytest.approx(8 - 0.5 - 7.75))
    assert (big["fits"], big["headroom_gib"]) == (True, pytest.approx(16 - 0.5 - 7.75))
    out = capsys.readouterr().out
    assert "copy alone: 25.0 GB/s" in out and "| NO (-0.25 GiB of 8) |" in out and "| yes (+7.75 GiB of 16) |" in out
    assert "| 2.00 | bit-equal |" in out  # pinned host bytes in use
