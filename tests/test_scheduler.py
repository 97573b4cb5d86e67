"""Scheduler parity against diffusers 0.42.1 FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import pytest
import torch

from zimage_native.config import SchedulerConfig
from zimage_native.scheduler import euler_step, make_schedule

diffusers = pytest.importorskip("diffusers")


def reference(shift, n=None, sigmas=None):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    if sigmas is None:
        sigmas = torch.linspace(1.0, 1 / n, n).tolist()  # the pipeline's default schedule
    sched.set_timesteps(sigmas=sigmas, mu=1.15)
    return sched


@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_sigmas_and_timesteps_match_for_1_to_50_steps(shift):
    config = SchedulerConfig(shift=shift)
    for n in range(1, 51):
        ref = reference(shift, n)
        ours = make_schedule(config, n)
        assert torch.equal(ours.sigmas, ref.sigmas), f"sigmas differ at N={n}"
        assert torch.equal(ours.timesteps, ref.timesteps), f"timesteps differ at N={n}"


def test_turbo_eight_steps_known_values():
    s = make_schedule(SchedulerConfig(shift=3.0), 8).sigmas
    expected = [1, 0.95454544, 0.9, 0.8333333, 0.75, 0.6428571, 0.5, 0.3, 0]
    assert torch.allclose(s, torch.tensor(expected), atol=1e-7)


def test_custom_sigmas_are_shifted_like_the_reference():
    custom = [1.0, 0.7, 0.4, 0.1]
    ref = reference(3.0, sigmas=custom)
    ours = make_schedule(SchedulerConfig(shift=3.0), sigmas=custom)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)


def test_euler_step_matches_reference():
    ref = reference(3.0, 8)
    ref.set_begin_index(0)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    expected = ref.step(v, ref.timesteps[0], x, return_dict=False)[0]
    s = make_schedule(SchedulerConfig(shift=3.0), 8).sigmas
    assert torch.equal(euler_step(x, v, s[0], s[1]), expected)


@pytest.mark.parametrize("kind", ["exponential", "linear"])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_dynamic_shifting_matches_reference_bit_for_bit(kind, seq_len):
    from zimage_native.scheduler import calculate_mu, default_sigmas

    config = SchedulerConfig(use_dynamic_shifting=True, time_shift_type=kind)
    for steps, sigmas in ((8, None), (None, torch.linspace(1.0, 1 / 6, 6).tolist())):
        sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
        # the Z-Image pipelines pass their default sigmas, linspace(1, 1/N, N)
        given = sigmas if sigmas is not None else default_sigmas(steps).numpy()
        sched.set_timesteps(sigmas=given, mu=calculate_mu(seq_len, config))
        ours = make_schedule(config, steps, sigmas=sigmas, image_seq_len=seq_len)
        assert torch.equal(ours.sigmas, sched.sigmas), (steps, ours.sigmas - sched.sigmas)
        assert ours.sigmas[0] == 1.0


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_step_counts_raise(bad):
    with pytest.raises(ValueError, match=">= 1"):
        make_schedule(SchedulerConfig(), bad)


def test_bad_sigmas_raise():
    with pytest.raises(ValueError, match="\\(0, 1\\]"):
        make_schedule(SchedulerConfig(), sigmas=[1.0, 1.5])
    with pytest.raises(ValueError, match="\\(0, 1\\].*leave out the terminal 0"):
        make_schedule(SchedulerConfig(), sigmas=[1.0, 0.5, 0.0])


def test_shift_1_runs_custom_sigmas_as_they_are():
    """docs/tasks.md: custom sigmas are shifted like the default ones; shift=1 takes them as given
    (an already shifted list, e.g. ComfyUI's without its terminal 0), with the dynamic shift off too."""
    given = [1.0, 0.9, 0.75, 0.5, 0.2]
    for config in (SchedulerConfig(shift=3.0), SchedulerConfig(use_dynamic_shifting=True)):
        ours = make_schedule(config, sigmas=given, shift=1.0, image_seq_len=4096)
        assert torch.equal(ours.sigmas, torch.tensor(given + [0.0]))


@pytest.mark.parametrize("config", [SchedulerConfig(shift=3.0), SchedulerConfig(use_dynamic_shifting=True)],
                         ids=["static", "dynamic"])
def test_a_request_shift_replaces_the_configured_one(config):
    """``shift=`` (CLI --shift, TOML shift, the server's shift) is applied in make_schedule, once:
    the schedule of a scheduler configured with that static shift, as diffusers computes it."""
    for shift in (1.0, 4.5, 6.0):
        ours = make_schedule(config, 7, shift=shift, image_seq_len=1024)
        ref = reference(shift, 7)
        assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps), shift
    with pytest.raises(ValueError, match=r"^shift must be a finite number > 0, got 0\.0$"):
        make_schedule(config, 7, shift=0.0)


@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dynamic", [False, True])
def test_sigmas_on_another_device_are_read_on_the_host(device, dynamic):
    """sigmas= as a tensor on a GPU (a script's torch.linspace(..., device="cuda")): the schedule, built on
    the host, joined them to a CPU zero (torch.cat: a device mismatch). They are read onto the host now,
    the schedule the list's; a tensor on "meta" (the CPU-only stand-in for another device) holds no
    values and is refused by name (it failed with "Tensor.item() cannot be called on meta tensors")."""
    config = SchedulerConfig(shift=3.0, use_dynamic_shifting=dynamic)
    given = [1.0, 0.75, 0.5, 0.25]
    sigmas = torch.tensor(given, dtype=torch.float64, device=device)
    if device == "meta":
        with pytest.raises(ValueError, match=r"^sigmas must be a list of numbers in \(0, 1\], got tensor\(.*'meta'"):
            make_schedule(config, sigmas=sigmas, image_seq_len=256)
        return
    got, want = (make_schedule(config, sigmas=s, image_seq_len=256) for s in (sigmas, given))
    assert got.sigmas.device.type == "cpu" and torch.equal(got.sigmas, want.sigmas)
    assert torch.equal(got.timesteps, want.timesteps)
