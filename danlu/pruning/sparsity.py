"""The one check of a pruning fraction, shared by the library and `danlu prune`."""
from __future__ import annotations

import math
from numbers import Real


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """`sparsity` as a float in [0, 1); else a ValueError naming `name` (the CLI passes its flag)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0 <= sparsity < 1:
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction removed), got {sparsity!r}")
    return float(sparsity)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)
