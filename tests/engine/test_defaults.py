"""A run that names only its size: the default recipe reaches that size with a circuit far better
than the empty one, on a small real task (compiled Tracr programs, whose behaviour is known)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeprune.engine.loading import load_model
from edgeprune.engine.metrics import evaluate_many
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.tasks import build_task

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tracr"


@pytest.mark.parametrize(("program", "n_edges", "n_test"), [("reverse", 12, 32), ("sort", 16, 12)])
def test_default_settings_reach_their_size_with_a_faithful_circuit(program: str, n_edges: int,
                                                                   n_test: int) -> None:
    model = load_model(f"tracr:{FIXTURES / program}")
    train = build_task(f"tracr_{program}", model.tokenizer, n=40, seed=0, split="train")
    test = build_task(f"tracr_{program}", model.tokenizer, n=n_test, seed=0, split="test")
    result = prune(model, train, PruneConfig(edge_count=n_edges))  # nothing else set
    circuit = result.circuit
    # the size asked for, less the few edges that lie on no path to the logits
    assert 0.9 * n_edges <= circuit.edge_count <= n_edges and result.warnings == []
    nothing = (torch.zeros(model.graph.n_edges), None)
    metrics, empty = evaluate_many(model, [circuit, nothing], test)
    assert metrics["kl"] < 0.2 * metrics["empty_kl"]  # far better than keeping nothing
    assert metrics["exact_match"] > 0.9 and metrics["exact_match"] > empty["exact_match"] + 0.2
    # the masks reached the requested size: the circuit cut at it is the one that was trained
    assert result.reached_sparsity >= 1 - 1.5 * n_edges / model.graph.n_edges - 0.005
