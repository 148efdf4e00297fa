"""Edge Pruning's default settings (the paper's GPT-2 run), importable without torch.

Both the engine's ``PruneConfig`` and the API server's request validation (which must not load
torch) fill in unset fields from here, so a job submitted without them runs exactly as a library
call without them would.
"""

from __future__ import annotations

PAPER_STEPS = 3000
PAPER_LEARNING_RATE = 0.8  # log-alphas, node log-alphas and the Lagrangian's lambdas
PAPER_TARGET_WARMUP = 2500 / 3000  # fraction of the steps over which the sparsity target rises
PAPER_LR_WARMUP = 200 / 3000  # fraction of the steps over which learning rates rise


def target_warmup_steps(steps: int) -> int:
    """Steps over which the sparsity target rises when a run does not say."""
    return round(steps * PAPER_TARGET_WARMUP)


def lr_warmup_steps(steps: int) -> int:
    """Steps over which the learning rates rise when a run does not say."""
    return round(steps * PAPER_LR_WARMUP)
