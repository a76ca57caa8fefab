"""How the parameter server turns a worker's gradient into an update (MSRA, seed 003; Zheng et al., ICML 2017).

- ssgd: synchronous SGD: the server waits for a gradient from every worker, averages them and steps once.
- asgd: asynchronous SGD: each gradient is applied as it arrives, to weights that other workers may have moved
  since this worker pulled (a delayed gradient, g(w_t) applied at w_{t+tau}).
- dcasgd-c / dcasgd-a: delay-compensated ASGD. The first-order Taylor term of g(w_{t+tau}) around w_t, with the
  Hessian approximated by the diagonal of the gradient's outer product (lambda g (.) g), corrects the delay:

      g~ = g + lambda g (.) g (.) (w - w_bak(m))        w_bak(m): the weights worker m pulled

  with a constant lambda (dcasgd-c) or an adaptive one (dcasgd-a), lambda_t = lambda_0 / sqrt(MS_t),
  MS_t = m MS_{t-1} + (1 - m) g (.) g, element-wise.

The compensated gradient is handed to the server's optimizer: with plain SGD (no momentum, no weight decay) the
update is the paper's w <- w - eta g~; another optimizer steps on g~ as it would on any gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

UPDATE_RULES = ("ssgd", "asgd", "dcasgd-c", "dcasgd-a")
DELAY_COMPENSATED = ("dcasgd-c", "dcasgd-a")
MEAN_SQUARE_EPS = 1e-7  # keeps lambda_t finite where a coordinate's gradients have all been zero


def compensated_gradient(grad: torch.Tensor, weight: torch.Tensor, backup: torch.Tensor,
                         strength: torch.Tensor | float) -> torch.Tensor:
    """g + lambda g (.) g (.) (w - w_bak): the delayed gradient corrected to the weights it is applied to."""
    return grad + strength * grad * grad * (weight - backup)


class DelayCompensation:
    """The per-parameter state of DC-ASGD: lambda, and for the adaptive rule the mean square of the gradients."""

    def __init__(self, rule: str, dc_lambda: float = 0.04, dc_momentum: float = 0.95):
        if rule not in DELAY_COMPENSATED:
            raise ValueError(f"ps_update: {rule!r} does not compensate delays; expected one of "
                             f"{', '.join(DELAY_COMPENSATED)}")
        if dc_lambda < 0:
            raise ValueError(f"dc_lambda must be >= 0, got {dc_lambda}")
        if not 0 <= dc_momentum < 1:
            raise ValueError(f"dc_momentum must be in [0, 1), got {dc_momentum}")
        self.adaptive = rule == "dcasgd-a"
        self.dc_lambda, self.dc_momentum = dc_lambda, dc_momentum
        self.mean_square: list[Optional[torch.Tensor]] = []

    def strength(self, index: int, grad: torch.Tensor) -> torch.Tensor | float:
        """lambda for parameter `index` given its new gradient (lambda_0 / sqrt(MS_t) for the adaptive rule)."""
        if not self.adaptive:
            return self.dc_lambda
        while len(self.mean_square) <= index:
            self.mean_square.append(None)
        square = grad * grad
        previous = self.mean_square[index]
        # MS_0 = 0, so MS_1 = (1 - m) g^2 as the recursion gives
        current = (1 - self.dc_momentum) * square if previous is None else (
            self.dc_momentum * previous.to(square.device) + (1 - self.dc_momentum) * square)
        self.mean_square[index] = current
        return self.dc_lambda / (current.sqrt() + MEAN_SQUARE_EPS)

    def __call__(self, index: int, grad: torch.Tensor, weight: torch.Tensor, backup: torch.Tensor) -> torch.Tensor:
        return compensated_gradient(grad, weight, backup, self.strength(index, grad))

    def state_dict(self) -> dict:
        return {f"mean_square.{i}": t for i, t in enumerate(self.mean_square) if t is not None}

    def load_state_dict(self, state: dict) -> None:
        for key, tensor in state.items():
            index = int(key.rsplit(".", 1)[1])
            while len(self.mean_square) <= index:
                self.mean_square.append(None)
            self.mean_square[index] = tensor
