"""Truncated SVD of a weight and the choice of its rank: pure computation on tensors.

W [out, in] = U diag(S) V^T; keeping the r largest singular values gives the best rank-r approximation in the
Frobenius norm (Eckart-Young), W ~= B @ A with B = U_r sqrt(S_r) [out, r] and A = sqrt(S_r) V_r^T [r, in] (the
square root split evenly, so the two factors have the same scale, which trains better than U_r S_r and V_r^T).

The energy a rank keeps is sum(S[:r]^2) / sum(S^2): the fraction of ||W||_F^2 the approximation holds (the error
is the rest: ||W - B A||_F^2 = sum(S[r:]^2)).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch


def check_energy(energy, name: str = "energy") -> float:
    """`energy` as a float in (0, 1]; else a ValueError naming `name` (the CLI passes its flag)."""
    if isinstance(energy, bool) or not isinstance(energy, Real) or not 0 < energy <= 1:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of each weight's squared singular "
                         f"values kept), got {energy!r}")
    return float(energy)


def check_rank(rank, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {rank!r}")
    return int(rank)


def _tall(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The weight in float32 at least, transposed when it is wide (LAPACK is about twice as fast on the tall
    orientation), and whether it was."""
    w = weight.detach()
    w = w.float() if w.dtype not in (torch.float32, torch.float64) else w
    return (w.T, True) if w.shape[0] < w.shape[1] else (w, False)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """S [min(out, in)], descending: enough to choose a rank, at about half the cost of the whole SVD."""
    return torch.linalg.svdvals(_tall(weight)[0])


def singular_value_decomposition(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, k], S [k], Vh [k, in]), k = min(out, in), in float32 at least, S descending."""
    w, transposed = _tall(weight)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (vh.T, s, u.T) if transposed else (u, s, vh)


def energy_kept(singular_values: torch.Tensor, rank: int) -> float:
    """sum(S[:rank]^2) / sum(S^2) (1.0 for an all-zero matrix)."""
    squares = singular_values.double().pow(2)
    total = float(squares.sum())
    return float(squares[:rank].sum()) / total if total > 0 else 1.0


def energy_rank(singular_values: torch.Tensor, energy: float, multiple_of: int = 1) -> int:
    """The smallest r whose r largest singular values hold at least `energy` of sum(S^2), rounded up to a
    multiple of `multiple_of` (never past the full rank len(S))."""
    energy = check_energy(energy)
    multiple_of = check_rank(multiple_of, "multiple_of")
    full = len(singular_values)
    cumulative = singular_values.double().pow(2).cumsum(0)
    total = cumulative[-1]
    if total <= 0:  # an all-zero weight: rank 1 holds all there is
        rank = 1
    else:
        # cumulative[-1] / total is exactly 1, so energy 1 finds the full rank (or the last nonzero value's).
        rank = int(torch.searchsorted(cumulative / total, torch.tensor(energy, dtype=torch.float64))) + 1
    return min(math.ceil(min(rank, full) / multiple_of) * multiple_of, full)


def factored_parameters(out_features: int, in_features: int, rank: int) -> int:
    """Weights the two factors hold: B [out, rank] and A [rank, in] (a bias is the same either way)."""
    return rank * (out_features + in_features)


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """Whether factors of this rank hold fewer weights than the dense [out, in] matrix."""
    return factored_parameters(out_features, in_features, rank) < out_features * in_features


def low_rank_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, rank], A [rank, in]) with B @ A the rank-`rank` truncation of U diag(S) Vh."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]

