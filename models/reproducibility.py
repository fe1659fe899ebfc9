"""Seeding and deterministic CPU kernels for every training routine (pure torch, no model imports,
so that importing them does not pull in torch_geometric)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def deterministic_cpu(device):
    """Use torch's deterministic kernels while training on CPU (some parallel scatter/index
    kernels otherwise sum in a thread-dependent order); the previous setting is restored after."""
    enable = torch.device(device).type == "cpu"
    previous = torch.are_deterministic_algorithms_enabled()
    if enable:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if enable:
            torch.use_deterministic_algorithms(previous)


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
