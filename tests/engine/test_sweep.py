"""Sweeps over circuit sizes and the MIB areas CPR / CMD."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.prune import PruneConfig
from edgeprune.engine.sweep import MIB_SIZES, area, cmd, cpr, sweep
from edgeprune.engine.tasks import TaskDataset, build_task


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir: Path) -> CircuitModel:
    return load_model(f"hf:{tiny_gpt2_dir}")


@pytest.fixture(scope="module")
def data(model: CircuitModel) -> tuple[TaskDataset, TaskDataset]:
    return (build_task("ioi", model.tokenizer, n=8, seed=0, split="train"),
            build_task("ioi", model.tokenizer, n=8, seed=0, split="test"))


def test_areas() -> None:
    assert area([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert area([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1.0)  # points are sorted by x
    assert area([0.0, 0.5, 1.0], [1.0, math.nan, 1.0]) == pytest.approx(1.0)  # NaN skipped
    assert cpr([0.1, 1.0], [1.0, 1.0]) == pytest.approx(0.9)
    assert cmd([0.1, 1.0], [1.0, 1.0]) == 0.0
    assert cmd([0.0, 1.0], [0.0, 2.0]) == pytest.approx(1.0)
    assert MIB_SIZES[0] == 0.001 and MIB_SIZES[-1] == 1.0


def test_scored_sweep(model: CircuitModel, data: tuple[TaskDataset, TaskDataset]) -> None:
    train, test = data
    seen: list[float] = []
    result = sweep(model, train, test, method="eap", sizes=[0.1, 0.5, 1.0],
                   on_circuit=lambda size, c: seen.append(size))
    assert seen == [0.1, 0.5, 1.0] and len(result.circuits) == 3
    sizes = [c.edge_count for c in result.circuits]
    assert sizes == sorted(sizes) and sizes[-1] == model.graph.n_edges
    full = result.circuits[-1].metrics
    assert full["kl"] == pytest.approx(0.0, abs=1e-6)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert math.isfinite(result.cpr) and result.cmd >= 0
    rows = result.rows()
    assert [r["size"] for r in rows] == [0.1, 0.5, 1.0] and "faithfulness" in rows[0]


@pytest.mark.parametrize("each", [True, False])
def test_edge_pruning_sweep(model: CircuitModel, data: tuple[TaskDataset, TaskDataset], each: bool) -> None:
    train, test = data
    result = sweep(model, train, test, method="edge_pruning", sizes=[0.2, 0.6],
                   prune_config=PruneConfig(steps=3, batch_size=4), prune_each_size=each)
    assert [c.method for c in result.circuits] == ["edge_pruning"] * 2
    assert result.circuits[0].edge_count <= round(0.2 * model.graph.n_edges) < result.circuits[1].edge_count
    assert all("kl" in c.metrics for c in result.circuits)


def test_sweep_errors(model: CircuitModel, data: tuple[TaskDataset, TaskDataset]) -> None:
    train, test = data
    for kwargs in ({"sizes": []}, {"sizes": [0.0]}, {"sizes": [1.5]}, {"method": "acdc"}):
        with pytest.raises(InvalidArgument):
            sweep(model, train, test, **kwargs)
