"""Whether a result is what was asked for: warnings for circuits that did not fail but fall short.

A pruning run can end without error and still be useless: the masks never reached the requested
sparsity (the circuit cut at that size is then not the one that was trained), dead edges left
fewer live edges than requested, or the circuit does no better than keeping nothing. Each check
returns :class:`ResultWarning` values that the service stores with the job and streams to its
clients; nothing here raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The masks' expected density may exceed the target density by this factor (plus the absolute
# slack below) before the run counts as not having reached its target.
DENSITY_SLACK = 1.5
DENSITY_SLACK_ABS = 0.005
# A circuit with fewer than this share of the requested live edges did not reach its size.
SIZE_SLACK = 0.9
# Held-out faithfulness below this, or KL above this share of the empty circuit's, is no better
# than the empty circuit.
FAITHFULNESS_FLOOR = 0.1
EMPTY_KL_SHARE = 0.9

TARGET_NOT_REACHED = "TARGET_NOT_REACHED"
SIZE_NOT_REACHED = "SIZE_NOT_REACHED"
EMPTY_CIRCUIT = "EMPTY_CIRCUIT"
NO_BETTER_THAN_EMPTY = "NO_BETTER_THAN_EMPTY"


@dataclass(frozen=True)
class ResultWarning:
    """``reason``: one of the constants above; ``message``: the figures, for people."""

    reason: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


def training_warnings(reached_sparsity: float, target_sparsity: float) -> list[ResultWarning]:
    """TARGET_NOT_REACHED when the masks' final expected sparsity falls short of the target's."""
    target = min(target_sparsity, 1.0)
    reached_density, target_density = 1.0 - reached_sparsity, 1.0 - target
    if reached_density <= DENSITY_SLACK * target_density + DENSITY_SLACK_ABS:
        return []
    return [ResultWarning(
        TARGET_NOT_REACHED,
        f"the masks ended at an expected edge sparsity of {reached_sparsity:.2%}, short of the "
        f"target {target:.2%}: the circuit cut at the requested size is not the one that was "
        "trained (more steps, or a larger lambda learning rate, let the Lagrangian catch up)",
    )]


def size_warnings(n_edges: int, requested: int | None) -> list[ResultWarning]:
    """EMPTY_CIRCUIT, or SIZE_NOT_REACHED when dead edges left too few of the ``requested``."""
    if n_edges == 0:
        return [ResultWarning(EMPTY_CIRCUIT, "the circuit keeps no edge: nothing connects the "
                                             "embeddings to the logits")]
    out = []
    if requested is not None and n_edges < SIZE_SLACK * requested:
        out.append(ResultWarning(
            SIZE_NOT_REACHED,
            f"the circuit has {n_edges} live edges of the {requested} requested: the others lie "
            "on no path from an embedding to the logits",
        ))
    return out


def held_out_warnings(metrics: Mapping[str, Any]) -> list[ResultWarning]:
    """NO_BETTER_THAN_EMPTY from a circuit's held-out metrics (as ``evaluate`` returns them):
    faithfulness below the floor or, for tasks without one, KL close to the empty circuit's."""
    faithfulness = _number(metrics.get("faithfulness"))
    kl, empty_kl = _number(metrics.get("kl")), _number(metrics.get("empty_kl"))
    if faithfulness is not None:
        if faithfulness >= FAITHFULNESS_FLOOR:
            return []
        detail = f"held-out faithfulness {faithfulness:.3f} (the empty circuit's is 0)"
    elif kl is not None and empty_kl is not None and empty_kl > 0:
        if kl < EMPTY_KL_SHARE * empty_kl:
            return []
        detail = f"held-out KL {kl:.4f} against {empty_kl:.4f} for the empty circuit"
    else:
        return []
    return [ResultWarning(NO_BETTER_THAN_EMPTY,
                          f"the circuit is no better than the empty circuit: {detail}")]


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
