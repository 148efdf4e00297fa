"""Data-parallel pruning: 2 CPU processes under gloo compute what one process computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeprune.engine.distributed import ModelSpec, prune_data_parallel
from edgeprune.engine.errors import InvalidArgument, ModelNotFound
from edgeprune.engine.loading import load_model
from edgeprune.engine.prune import PhaseProgress, ProgressEvent, PruneConfig, prune
from edgeprune.engine.tasks import build_task

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir: Path) -> tuple[ModelSpec, object]:
    spec = ModelSpec(f"hf:{tiny_gpt2_dir}")
    model = load_model(spec.ref)
    dataset = build_task("ioi", model.tokenizer, n=16, seed=0)
    return spec, dataset


def test_two_gloo_ranks_equal_one_process(setup: tuple[ModelSpec, object]) -> None:
    spec, dataset = setup
    # every mask on: the training loop alone, whose data-parallel steps equal one process's to
    # the rounding (an EAP-IG warm start sums its scores in another order in each process)
    config = PruneConfig(steps=6, batch_size=8, seed=3, edge_count=40, warm_start=None)
    single = prune(load_model(spec.ref), dataset, config)

    events, checkpoints = [], []
    parallel = prune_data_parallel(
        spec,
        dataset,
        config,
        world_size=2,
        progress=events.append,
        checkpoint_every=3,
        on_checkpoint=checkpoints.append,
    )
    torch.testing.assert_close(parallel.edge_log_alpha, single.edge_log_alpha, rtol=0, atol=1e-6)
    torch.testing.assert_close(parallel.node_log_alpha, single.node_log_alpha, rtol=0, atol=1e-6)
    assert parallel.circuit.edges == single.circuit.edges
    steps = [e for e in events if isinstance(e, ProgressEvent)]  # after the preparation's
    assert all(isinstance(e, PhaseProgress) for e in events[: len(events) - len(steps)])
    losses = [h["task_loss"] for h in single.history]
    assert [e.task_loss for e in steps] == pytest.approx(losses, abs=1e-6)
    assert [e.step for e in steps] == list(range(1, 7))
    assert len(checkpoints) == 2 and all(isinstance(c, bytes) for c in checkpoints)
    assert not parallel.stopped and parallel.steps_done == 6


def test_stop_request_stops_every_rank_after_the_same_step(
    setup: tuple[ModelSpec, object],
) -> None:
    spec, dataset = setup
    config = PruneConfig(steps=50, batch_size=4, seed=0)
    events: list[object] = []
    checkpoints: list[bytes] = []
    result = prune_data_parallel(
        spec,
        dataset,
        config,
        world_size=2,
        progress=events.append,
        on_checkpoint=checkpoints.append,
        should_stop=lambda: sum(isinstance(e, ProgressEvent) for e in events) >= 2,
    )
    assert result.stopped and 2 <= result.steps_done < 50
    assert len(checkpoints) == 1, "a stopped run hands over its checkpoint"
    # the checkpoint resumes in one process exactly where the ranks stopped
    filled: list[PhaseProgress] = []  # stop at the first step, once the cache is filled
    resumed = prune(
        load_model(spec.ref), dataset, config, resume=checkpoints[0], progress=filled.append,
        should_stop=lambda: bool(filled) and filled[-1].step == filled[-1].total_steps,
    )
    assert resumed.steps_done == result.steps_done
    torch.testing.assert_close(resumed.edge_log_alpha, result.edge_log_alpha, rtol=0, atol=0)


def test_errors_of_the_ranks_reach_the_caller(setup: tuple[ModelSpec, object]) -> None:
    _, dataset = setup
    with pytest.raises(InvalidArgument) as info:
        prune_data_parallel(
            ModelSpec("hf:/nonexistent"), dataset, PruneConfig(batch_size=1), world_size=2
        )
    assert info.value.field == "batch_size"
    with pytest.raises(ModelNotFound):
        prune_data_parallel(
            ModelSpec("hf:/nonexistent/model"),
            dataset,
            PruneConfig(steps=1, batch_size=2),
            world_size=2,
        )
