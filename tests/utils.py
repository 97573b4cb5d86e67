"""Small helpers shared by the tests."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; b is the reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "output") -> float:
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} (max abs {(a.double() - b.double()).abs().max():.3e})"
    return err
