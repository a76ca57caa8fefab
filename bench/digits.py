"""The small problem the distributed-SGD benchmarks repeat over seeds: scikit-learn's bundled digits (1797 8x8
images, 10 classes; offline) and an MLP trained by plain SGD. Imported by its bare name, as machine.py."""
from __future__ import annotations

import numpy as np
import torch

CLASSES = 10


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> dict:
    """The bundled digits, a fixed stratified train/test split, standardised with the training part's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data.astype(np.float32), digits.target,
                                                        test_size=test_fraction, random_state=split_seed,
                                                        stratify=digits.target)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # the always-blank corner pixels
    return {"x_train": (x_train - mean) / std, "y_train": y_train.astype(np.int64),
            "x_test": (x_test - mean) / std, "y_test": y_test.astype(np.int64)}


def build_mlp(hidden: int, seed: int) -> torch.nn.Module:
    """64 -> hidden (ReLU) -> 10, initialised from `seed`."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))


def build_sgd(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Plain SGD: no momentum, no weight decay (the DC-ASGD formula and local SGD's analysis are for it)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
