"""The device of the engine tests marked ``device``: ``$EDGEPRUNE_TEST_DEVICE``, the CPU unless
set (`make gpu-check` runs them on ``cuda``: bf16 and fp32 masked forwards, mask gradients,
activation checkpointing and pruning steps)."""

from __future__ import annotations

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("EDGEPRUNE_TEST_DEVICE", "cpu"))


def on_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on TEST_DEVICE."""
    return tuple(t.to(TEST_DEVICE) for t in tensors)
