"""Hard-concrete masks (Louizos, Welling & Kingma 2018), as Edge Pruning uses them.

Each mask is a learnable ``log_alpha``. A training sample draws ``u ~ U(eps, 1 - eps)``, takes
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, stretches it to ``[LEFT, RIGHT]`` and clamps
it to ``[0, 1]``, so masks sit exactly at 0 or 1 with positive probability while ``log_alpha`` still
gets a gradient. At evaluation the mask is deterministic: ``clamp(sigmoid(log_alpha) * (RIGHT - LEFT)
+ LEFT, 0, 1)``. ``keep_probability`` is ``P(z > 0)``, the differentiable expected density that the
sparsity Lagrangian works on.
"""

from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0
LEFT = -0.1
RIGHT = 1.1
EPS = 1e-6
INIT_MEAN = 10.0  # every mask starts on (sigmoid(10) ~ 1)
INIT_STD = 0.01

# log_alpha at which P(z > 0) == 1/2: log(-LEFT / RIGHT) * BETA shifts the logistic.
_SHIFT = BETA * math.log(-LEFT / RIGHT)


def init_log_alpha(
    n: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    mean: float = INIT_MEAN,
    std: float = INIT_STD,
) -> torch.Tensor:
    """Fresh ``log_alpha`` [n] drawn from N(mean, std) with ``generator`` (on CPU, then moved)."""
    values = torch.randn(n, generator=generator, dtype=torch.float32)  # [n]
    return (values * std + mean).to(device)


def sample(log_alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One hard-concrete sample per mask, differentiable w.r.t. ``log_alpha`` [n] -> [n].

    The uniform noise is drawn on ``log_alpha``'s device with ``generator``, which must live there.
    """
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device)  # [n]
    u = u.clamp(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """The evaluation-time mask in [0, 1] (no noise) [n] -> [n]."""
    return (torch.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z > 0)`` of each mask [n] -> [n]; its mean is the expected density (1 - sparsity)."""
    return torch.sigmoid(log_alpha - _SHIFT)


def warm_log_alpha(scores: torch.Tensor, n_keep: int, *, high: float = 3.0,
                   floor: float | None = None) -> torch.Tensor:
    """Initial ``log_alpha`` [E] from attribution scores [E]: ``log(score / cut)``, clamped to
    ``[-floor, high]`` (no lower bound without ``floor``).

    ``cut`` lies between the ``n_keep``-th and the next score, so the top ``n_keep`` edges start on
    (log_alpha > 0) and the rest off. On the log scale an edge's start reflects how far its score is
    from the cut: the edges just below it are still sampled on now and then, so the task loss can
    swap them with the weakest of the top, while edges far below are never sampled on. Without a
    floor every edge keeps its score's order, so circuits cut at many times the trained size are
    the attribution's instead of a draw among edges tied at the floor.
    """
    E = scores.numel()
    n_keep = min(max(n_keep, 1), E)
    values = scores.detach().float().cpu().clamp(min=0)  # [E]
    ordered = torch.sort(values, descending=True).values  # [E]
    above = ordered[n_keep - 1]
    below = ordered[n_keep] if n_keep < E else above / 2
    tiny = torch.finfo(torch.float32).tiny
    cut = torch.sqrt(above.clamp(min=tiny) * below.clamp(min=tiny))
    low = None if floor is None else -floor
    return torch.log(values.clamp(min=tiny) / cut).clamp(low, high)  # [E]
