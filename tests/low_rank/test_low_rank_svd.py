"""danlu.low_rank.svd and LowRankLinear: the truncated SVD, the energy rule, the parameter guard, the layer."""
from __future__ import annotations

import pytest
import torch

from danlu.low_rank.linear import LowRankLinear
from danlu.low_rank.svd import (check_energy, energy_kept, energy_rank, low_rank_factors, saves_parameters,
                                singular_value_decomposition)

SINGULAR_VALUES = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
# squares 64, 16, 4, 1, 0.25, ... of a total 85.332: the first r keep 0.75001, 0.93751, 0.98439, 0.99611,
# 0.99904, 0.99977, 0.99995, 1


def orthonormal(rows: int, columns: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


def hand_made(out_features: int = 12, in_features: int = 8) -> torch.Tensor:
    """W = U diag(s) V^T with orthonormal U, V: its singular values are SINGULAR_VALUES."""
    u, v = orthonormal(out_features, 8, 1), orthonormal(in_features, 8, 2)
    return u @ torch.diag(SINGULAR_VALUES) @ v.T


def truncated_svd(weight, rank):
    """(B, A) at `rank`, as factorize computes them."""
    return low_rank_factors(*singular_value_decomposition(weight), rank)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_full_rank_reproduces_the_weight(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    b, a = truncated_svd(weight, min(shape))
    assert b.shape == (shape[0], min(shape)) and a.shape == (min(shape), shape[1])
    assert torch.allclose(b @ a, weight, atol=1e-5)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-4)  # sqrt(S) on each side: the same scale


def test_truncation_error_is_the_dropped_singular_values():
    weight = hand_made()
    for dtype in (torch.float64, torch.float32):
        _, s, _ = singular_value_decomposition(weight.to(dtype))
        assert torch.allclose(s.double(), SINGULAR_VALUES, atol=1e-5)
    b, a = truncated_svd(weight, 3)
    assert (weight - b @ a).norm() ** 2 == pytest.approx(float(SINGULAR_VALUES[3:].pow(2).sum()), rel=1e-9)


@pytest.mark.parametrize("energy, multiple_of, rank", [
    (0.5, 1, 1), (0.9, 1, 2), (0.95, 1, 3), (0.99, 1, 4), (0.999, 1, 5), (1.0, 1, 8),
    (0.9, 3, 3), (0.99, 3, 6), (0.999, 4, 8), (1.0, 3, 8),  # rounded up, never past the full rank
])
def test_energy_rule_picks_the_smallest_rank_that_keeps_the_energy(energy, multiple_of, rank):
    _, s, _ = singular_value_decomposition(hand_made())
    assert energy_rank(s, energy, multiple_of) == rank
    assert energy_kept(s, rank) >= energy
    if multiple_of == 1 and rank > 1:
        assert energy_kept(s, rank - 1) < energy
    assert energy_kept(s, 2) == pytest.approx(80 / float(SINGULAR_VALUES.pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("energy", [0, -0.1, 1.01, True, "0.9", None])
def test_energy_outside_the_unit_interval_is_refused(energy):
    with pytest.raises(ValueError, match=r"--energy must be a number in \(0, 1\]"):
        check_energy(energy, "--energy")


def test_parameter_saving_guard():
    # 64 x 64: rank 31 holds 31 * 128 = 3968 < 4096 weights, rank 32 exactly 4096: not smaller
    assert saves_parameters(64, 64, 31) and not saves_parameters(64, 64, 32)
    # 32 x 64: 21 * 96 = 2016 < 2048 <= 22 * 96
    assert saves_parameters(32, 64, 21) and not saves_parameters(32, 64, 22)
    assert not saves_parameters(1, 5, 1)  # a single row can never be smaller


def test_low_rank_linear_computes_x_times_the_product_plus_bias():
    generator = torch.Generator().manual_seed(3)
    b, a, bias = (torch.randn(24, 5, generator=generator), torch.randn(5, 16, generator=generator),
                  torch.randn(24, generator=generator))
    layer = LowRankLinear.from_factors(b, a, bias)
    assert (layer.in_features, layer.out_features, layer.rank) == (16, 24, 5)
    assert sorted(layer.state_dict()) == ["a.weight", "b.bias", "b.weight"]
    x = torch.randn(2, 3, 16, generator=generator)
    assert torch.allclose(layer(x), x @ (b @ a).T + bias, atol=1e-5)
    assert torch.allclose(layer.to_linear()(x), layer(x), atol=1e-5)
    no_bias = LowRankLinear.from_factors(b, a)
    assert no_bias.b.bias is None and torch.allclose(no_bias(x), x @ (b @ a).T, atol=1e-5)
    with pytest.raises(ValueError, match="do not multiply"):
        LowRankLinear.from_factors(b, a.T)
