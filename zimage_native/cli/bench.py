"""``zimage bench``: the benchmark ladder (see zimage_native/bench.py and docs/performance.md)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ._common import check_writable_folder, user_errors
from .options import DtypeChoice, UserPath

RUNG_NAMES = ("eager", "kernels", "compile", "cuda_graphs", "vae", "fp8")  # = zimage_native.bench.RUNG_NAMES


def row_line(row) -> str:
    """A finished row for the terminal, rounded (the JSON line and the CSV rows keep the values)."""
    def seconds(v):
        return "-" if v is None else f"{v:.3f} s"

    psnr = row.psnr_db
    psnr = "-" if psnr is None else "inf" if math.isinf(psnr) else f"{psnr:.1f} dB"
    return (f"row done: {row.engine} {row.rung} {row.size}: denoise {seconds(row.denoise_s)}, "
            f"e2e {seconds(row.e2e_s)}{'' if row.png_s is None else f', PNG {seconds(row.png_s)}'}, "
            f"cold {seconds(row.cold_start_s)}, PSNR {psnr}")


def diffusers_beside(asked: bool, model) -> bool:
    """Whether diffusers is measured beside the engine, decided before any weight is built or read. It
    needs the diffusers package (a test-only dependency: a plain install lacks it) and the random
    weights: as the default, what cannot run is skipped with a note; asked for with --diffusers, it is
    a one-line error."""
    import importlib.util

    if not asked:
        return False
    why = ("--model is given (diffusers is measured on the random weights only)" if model is not None
           else None if importlib.util.find_spec("diffusers") is not None
           else "the diffusers package is not installed (pip install diffusers==0.42.1)")
    if why is None:
        return True
    if click.get_current_context().get_parameter_source("with_diffusers") != click.core.ParameterSource.DEFAULT:
        raise ValueError(f"--diffusers: {why}; use --no-diffusers")
    click.echo(f"diffusers is not measured: {why}; --no-diffusers says so without this line", err=True)
    return False


def check_numbers(sizes, steps: int, repeats: int, big_size, budget_s) -> None:
    """The numbers of the run, refused before the weights are built (a minute and more for the full-size
    random model), in the flags' names: the library's checks come only at the first rung, and name
    --width and --steps; --repeats 0 was Python's "no median for empty data"."""
    import math

    from ..images import check_side

    for flag, size in [*(("--sizes", s) for s in sizes), *([("--big-size", big_size)] if big_size is not None else [])]:
        check_side(flag, size, 16)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1 (denoising steps per image), got {steps}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1 (timed runs per measurement, their median is reported), "
                         f"got {repeats}")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s >= 0):  # 0: no optional step
        raise ValueError(f"--budget-s must be a number of seconds >= 0, got {budget_s}")


@click.command()
@click.option("--model", default=None,
              help="Model folder to time [default: random weights in the released models' shapes, nothing to "
                   "download].")
@click.option("--tiny", is_flag=True,
              help="Use a tiny random model instead: a quick CPU dry run of the code path, not a timing.")
@click.option("--device", default="auto", show_default=True,
              help="Where to run: cpu, cuda, cuda:N, or auto (a GPU if there is one, else the CPU).")
@click.option("--dtype", type=DtypeChoice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="auto: bfloat16 on GPU, float32 on CPU (bf16, fp32 too).")
@click.option("--sizes", type=int, multiple=True, default=(1024,), show_default=True,
              help="Image side in pixels, square (repeatable).")
@click.option("--steps", type=int, default=8, show_default=True, help="Denoising steps per image.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per measurement (median).")
@click.option("--rungs", multiple=True, type=click.Choice(RUNG_NAMES), default=RUNG_NAMES, show_default=True,
              help="Ladder rungs (repeatable); each adds its feature to the ones before, in the order above.")
@click.option("--diffusers/--no-diffusers", "with_diffusers", default=True, show_default=True,
              help="Measure diffusers 0.42.1 on the same weights in the same run.")
@click.option("--out", type=UserPath(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True,
              help="Folder for the results: rows appended to e2e.csv, this run's rows and checks in e2e.json; "
                   "a relative path is from the current folder (the line at the end names the files in full).")
@click.option("--big-size", type=int, default=None,
              help="One more row at this side in pixels (e.g. 2048) for the last bf16 rung [default: none].")
@click.option("--check", is_flag=True,
              help="Judge the run (bf16 parity, graph replay, a new request and CFG under graphs, fp8 quality): "
                   "one line per check as it is measured, exit status 1 when any fails or was not measured.")
@click.option("--budget-s", type=float, default=None,
              help="Seconds the ladder may take: the optional steps (the --big-size row, graph-mode timing, "
                   "diffusers compiled) are skipped when less than 150 s would be left for the rest.")
@user_errors
def bench(model, tiny, device, dtype, sizes, steps, repeats, rungs, with_diffusers, out, big_size, check, budget_s):
    """Time the ladder eager -> +kernels -> +compile -> +CUDA graphs -> +VAE compile -> +fp8 (and diffusers
    beside it)."""
    from .. import bench as b
    from ..devices import resolve_device, resolve_dtype
    from ..pipeline import ZImagePipeline

    # Absolute, so the last line names the files wherever the command ran; checked before minutes of
    # building and timing.
    out = out.expanduser().resolve()
    check_numbers(sizes, steps, repeats, big_size, budget_s)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_writable_folder(out, "--out")  # (makes the folder: after the other checks, so a refused run makes none)
    with_diffusers = diffusers_beside(with_diffusers, model)
    full_qwen = None
    if model is not None:
        pipe = ZImagePipeline.from_pretrained(model, device=dev, dtype=dt)
    else:
        pipe, full_qwen = b.build_random_pipeline(dev, dt, tiny=tiny)
    pipe.progress = False
    ladder, problems = [], {}
    for rung in b.make_ladder(rungs):
        problem = b.rung_problem(pipe, rung)
        if problem is None:
            ladder.append(rung)
        else:
            problems[rung.name] = problem
    if problems:  # checked before minutes of timing: named rungs are an error, the default ladder skips them
        lines = [f"rung {name} cannot run here: {why}" for name, why in problems.items()]
        if click.get_current_context().get_parameter_source("rungs") != click.core.ParameterSource.DEFAULT:
            raise ValueError(f"{lines[0]}" + (f" (and {len(lines) - 1} more rung(s))" if len(lines) > 1 else "")
                             + "; leave it out of --rungs")
        for line in lines:
            click.echo(f"{line}: skipped", err=True)
    env, rows, checks, said = b.environment(dev), [], {}, set()
    gpu = dev.type == "cuda"

    def on_row(row) -> None:  # each row on the terminal and in the files as it is done
        rows.append(row)
        click.echo(row_line(row))
        b.append_csv(row, env, out)
        b.write_json(rows, env, checks, out)

    def on_check(name: str) -> None:  # each verdict as soon as its check is measured
        b.write_json(rows, env, checks, out)
        if check and (gpu or name not in b.GPU_ONLY):
            for line in b.judge(name, checks):
                click.echo(line, err=True)
                said.add(line)

    failed = None
    try:
        b.ladder(pipe, full_qwen, sizes=sizes, steps=steps, repeats=repeats, rungs=ladder,
                 with_diffusers=with_diffusers, big_size=big_size, on_row=on_row, checks=checks,
                 on_check=on_check, budget=b.Budget(budget_s))
        interrupted = False
    except KeyboardInterrupt:  # `timeout -s INT` (the GPU check) or Ctrl-C: report what was measured
        interrupted = True
        click.echo("interrupted: the report and the verdicts below hold what was measured before", err=True)
    except Exception as e:  # a step failed (a capture, out of memory): with --check, report what was measured
        if not check:
            raise
        import traceback

        traceback.print_exc()
        interrupted, failed = True, f"{type(e).__name__}: {e}"
        checks["ladder_error"] = failed  # in e2e.json too (what the GPU check brings back)
        click.echo(f"failed: {failed}; the report and the verdicts below hold what was measured before", err=True)
    click.echo(b.report(rows, env, checks))
    click.echo(f"appended {len(rows)} row(s) to {out / 'e2e.csv'}; this run's rows and checks: "
               f"{b.write_json(rows, env, checks, out)}")
    if check:
        failures, passes = b.verdicts(checks, gpu=gpu)
        for line in passes + failures:
            if line not in said:  # the checks never measured (and any not said yet)
                click.echo(line, err=True)
        if failed:
            click.echo(f"FAIL the ladder stopped: {failed}", err=True)
        if failures or interrupted:
            raise SystemExit(1)
    elif interrupted:
        raise SystemExit(130)
