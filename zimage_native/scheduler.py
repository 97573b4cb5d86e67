"""FlowMatch Euler sampling schedule, with diffusers 0.42.1 semantics, as plain functions.

N steps are N model forwards. The default raw schedule is linspace(1, 1/N, N) in fp32; the static
shift s of ``scheduler_config.json`` maps sigma -> s*sigma / (1 + (s - 1)*sigma) (custom sigmas are
shifted too, as the reference does); a terminal sigma 0 is appended. Timesteps are sigma * 1000.

With ``use_dynamic_shifting`` (off in both released configs) the resolution-dependent shift
exp(mu) / (exp(mu) + (1/sigma - 1)) replaces the static one, mu interpolated from the image
sequence length. One Euler step is x <- x + (sigma_next - sigma) * velocity, in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from .config import SchedulerConfig


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor  # (N + 1,) fp32, ends with 0
    timesteps: torch.Tensor  # (N,) fp32, sigma * num_train_timesteps

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def model_times(self) -> torch.Tensor:
        """(N,) the DiT's time input (1000 - t) / 1000: 0 at pure noise, as the pipeline computes it."""
        return (1000 - self.timesteps) / 1000


def default_sigmas(num_steps: int) -> torch.Tensor:
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float32)


def calculate_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def sigma_values(sigmas) -> torch.Tensor:
    """Custom sigmas as a flat fp32 tensor on the CPU, where the schedule is built (a tensor on a GPU
    was joined to a CPU zero: a device mismatch), refused (ValueError) unless they are numbers in
    (0, 1]: a string failed inside torch ("new(): invalid data type 'str'"), and a NaN passed the range
    check and ran into NaN latents blamed on the weights."""
    try:
        raw = torch.as_tensor(sigmas, dtype=torch.float32, device="cpu")  # (a tensor on "meta" has no values)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"sigmas must be a list of numbers in (0, 1], got {sigmas!r:.80}") from None
    if raw.dim() > 1:  # (else flattened into a schedule of all its rows: [[1, 0.7], [0.4, 0.2]] ran 4 steps)
        raise ValueError(f"sigmas must be a flat list of numbers in (0, 1], got an array of shape {tuple(raw.shape)}")
    raw = raw.flatten()
    if raw.numel() < 1:
        raise ValueError("sigmas must not be empty")
    if not bool(((raw > 0) & (raw <= 1)).all()):  # (NaN fails both)
        zero = " (leave out the terminal 0: it is appended)" if bool((raw == 0).any()) else ""
        raise ValueError(f"sigmas must lie in (0, 1], got {raw.tolist()}{zero}")
    return raw


def make_schedule(
    config: SchedulerConfig,
    num_steps: int | None = None,
    sigmas: list[float] | torch.Tensor | None = None,
    image_seq_len: int | None = None,
    shift: float | None = None,
) -> Schedule:
    """Sigmas and timesteps for ``num_steps`` (default linspace(1, 1/N, N)) or explicit ``sigmas``.

    ``shift`` replaces the configured static shift (and turns dynamic shifting off): the one place
    where a request's ``shift`` (``zimage generate --shift``, TOML ``shift``, the server's ``shift``)
    enters the schedule.
    """
    if shift is not None:
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < shift < math.inf:
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        config = dataclasses.replace(config, shift=float(shift), use_dynamic_shifting=False)
    if sigmas is None:
        if num_steps is None:
            raise ValueError("give num_steps or sigmas")
        raw = default_sigmas(num_steps)
    else:
        raw = sigma_values(sigmas)
        if num_steps is not None and raw.numel() != num_steps:
            raise ValueError(f"got {raw.numel()} sigmas for num_inference_steps={num_steps}")
    if config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("use_dynamic_shifting needs the image sequence length")
        mu = calculate_mu(image_seq_len, config)
        a = math.exp(mu) if config.time_shift_type == "exponential" else mu
        # a true division, as the reference's numpy one (a scalar over a tensor is a reciprocal times
        # the scalar in torch: the first sigma came out 1 ulp below 1)
        shifted = torch.div(torch.full_like(raw, a), a + (1 / raw - 1))
        shifted = shifted.to(torch.float32)
    else:
        s = config.shift
        shifted = s * raw / (1 + (s - 1) * raw)  # fp32, in the reference's operation order
    timesteps = shifted * config.num_train_timesteps
    return Schedule(sigmas=torch.cat([shifted, torch.zeros(1)]), timesteps=timesteps)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """x_next = x + (sigma_next - sigma) * velocity, in fp32."""
    return latents.float() + (sigma_next - sigma) * velocity.float()
