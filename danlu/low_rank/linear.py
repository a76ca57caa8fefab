"""`LowRankLinear`: a linear layer whose weight is the product of two thin factors, y = B (A x) + bias.

Two plain nn.Linear hold the factors, `a` (in -> rank, no bias) and `b` (rank -> out, with the original layer's
bias), so the state is `<name>.a.weight`, `<name>.b.weight` (and `<name>.b.bias`) and every optimizer, dtype
cast and device move treats them like any other linear. It reads as a linear from outside: `in_features`,
`out_features`, and `dense_weight()` for B @ A.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.a = nn.Linear(in_features, rank, bias=False, **factory)
        self.b = nn.Linear(rank, out_features, bias=bias, **factory)

    @classmethod
    def from_factors(cls, b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     requires_grad: bool = True) -> "LowRankLinear":
        """The layer computing x @ (b @ a)^T + bias, holding the given tensors (b [out, rank], a [rank, in])."""
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"factors of shapes {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
        layer = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None, device="meta")  # no init work
        layer.a.weight = nn.Parameter(a, requires_grad=requires_grad)
        layer.b.weight = nn.Parameter(b, requires_grad=requires_grad)
        if bias is not None:
            layer.b.bias = nn.Parameter(bias, requires_grad=requires_grad)
        return layer

    @property
    def in_features(self) -> int:
        return self.a.in_features

    @property
    def out_features(self) -> int:
        return self.b.out_features

    @property
    def rank(self) -> int:
        return self.a.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def dense_weight(self) -> torch.Tensor:
        """B @ A [out, in]: the weight of the plain linear that computes the same."""
        return self.b.weight @ self.a.weight

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear computing the same (its weight B @ A, the same bias)."""
        weight = self.dense_weight()
        bias = self.b.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=self.b.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias.clone(), requires_grad=bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorized_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """The model's LowRankLinear layers by module name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}
