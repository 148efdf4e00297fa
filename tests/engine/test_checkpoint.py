"""Training state <-> bytes, and a resumed pruning run equals the uninterrupted one exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from edgeprune.engine.checkpoint import TrainingState, from_bytes, to_bytes
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.tasks import TaskDataset, build_task

CONFIG = PruneConfig(steps=8, batch_size=4, seed=1, lr_warmup_steps=2, target_warmup_steps=6)


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> CircuitModel:
    return load_model(f"hf:{tiny_llama_dir}")


@pytest.fixture(scope="module")
def ioi(model: CircuitModel) -> TaskDataset:
    return build_task("ioi", model.tokenizer, n=6, seed=0)


def test_round_trip_keeps_tensors_optimizer_and_extra() -> None:
    param = torch.randn(5, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    optimizer.step()
    state = TrainingState(step=3, params={"p": param}, optimizer=optimizer.state_dict(),
                          extra={"history": [{"loss": 0.5}], "note": "x"})
    data = to_bytes(state)
    assert isinstance(data, bytes)
    back = from_bytes(data)
    assert back.step == 3 and back.extra == state.extra
    assert torch.equal(back.params["p"], param.detach())
    saved = optimizer.state_dict()["state"][0]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(back.optimizer["state"][0][key], saved[key])
    fresh = torch.optim.AdamW([torch.zeros(5, requires_grad=True)], lr=0.1)
    fresh.load_state_dict(back.optimizer)  # loads into a real optimizer


@pytest.mark.parametrize("garbage", [b"", b"12345678", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"])
def test_garbage_is_invalid_argument(garbage: bytes) -> None:
    with pytest.raises(InvalidArgument) as err:
        from_bytes(garbage)
    assert err.value.field == "resume"


def test_resumed_run_equals_uninterrupted_run(model: CircuitModel, ioi: TaskDataset) -> None:
    snapshots: list[bytes] = []
    full = prune(model, ioi, CONFIG, checkpoint_every=4, on_checkpoint=snapshots.append)
    assert len(snapshots) == 2  # after steps 4 and 8
    assert from_bytes(snapshots[0]).step == 4

    resumed = prune(model, ioi, CONFIG, resume=snapshots[0])
    assert resumed.steps_done == 8
    assert torch.equal(resumed.edge_log_alpha, full.edge_log_alpha)
    assert resumed.node_log_alpha is not None and full.node_log_alpha is not None
    assert torch.equal(resumed.node_log_alpha, full.node_log_alpha)
    assert resumed.history == full.history
    assert resumed.circuit.edges == full.circuit.edges


def test_resume_refuses_other_settings_or_data(model: CircuitModel, ioi: TaskDataset) -> None:
    snapshots: list[bytes] = []
    prune(model, ioi, dataclasses.replace(CONFIG, steps=2), checkpoint_every=2,
          on_checkpoint=snapshots.append)
    with pytest.raises(InvalidArgument, match="edge_lr"):
        prune(model, ioi, dataclasses.replace(CONFIG, steps=2, edge_lr=0.1), resume=snapshots[0])
    other = build_task("ioi", model.tokenizer, n=6, seed=1)
    with pytest.raises(InvalidArgument, match="dataset"):
        prune(model, other, dataclasses.replace(CONFIG, steps=2), resume=snapshots[0])
