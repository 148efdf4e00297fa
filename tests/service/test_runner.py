"""The worker's job runner on a real tiny model: an evaluation's result, its memory check on the
tokenised data, and the cached model left without step buffers whatever the outcome."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from edgeprune.engine.errors import ResourceExhausted
from edgeprune.service import runner, translate
from edgeprune.service.model_cache import ModelCache
from edgeprune.storage import CircuitRecord
from edgeprune.v1 import job_pb2
from tests.service.harness import MODEL, inline_examples


def _record(total_edge_count: int) -> CircuitRecord:
    return CircuitRecord(
        id="c1", owner="", model=MODEL, method="eap", task="custom", dataset_id=None, job_id=None,
        edge_count=1, total_edge_count=total_edge_count, node_count=1, total_node_count=1,
        edge_sparsity=0.0, target={}, settings={"ablation": "corrupted"}, provenance={}, metrics={},
        mask_blob=None, created_at=datetime.datetime.now(datetime.UTC),
        edges=["tok->logits"], edge_scores={}, nodes=["tok"])


def _hooks(phases: list[str]) -> runner.Hooks:
    return runner.Hooks(progress=lambda p: phases.append(p.phase),
                        checkpoint=lambda _: None, should_stop=lambda: False)


@pytest.mark.parametrize("budget", [None, 1 << 40, 1 << 10])
def test_an_evaluation_releases_the_models_buffers(tiny_gpt2_dir: Path,
                                                   budget: int | None) -> None:
    models = ModelCache()
    ref = f"hf:{tiny_gpt2_dir}"
    model = models.get(ref, "cpu", translate.dtype_name(0, "cpu"))
    spec = job_pb2.EvaluationSpec(circuit="circuits/c1", data=inline_examples(6), batch_size=4)
    phases: list[str] = []
    record = _record(model.graph.n_edges)
    if budget is not None and budget < 1 << 30:  # 1 KiB: the tokenised data cannot fit
        with pytest.raises(ResourceExhausted, match="job needs about"):
            runner.run_evaluation(spec, record, ref, models, None, "cpu",  # type: ignore[arg-type]
                                  _hooks(phases), memory_budget=budget)
        assert phases == ["load_model", "prepare_data"]  # nothing evaluated
    else:
        outcome = runner.run_evaluation(spec, record, ref, models, None,  # type: ignore[arg-type]
                                        "cpu", _hooks(phases), memory_budget=budget)
        assert outcome.model is model and outcome.metrics["examples"] == 6
        assert outcome.metrics["edges"] == 1 and phases[-1] == "evaluate"
    assert model.workspace.idle == 0  # the cached model keeps no step buffers between jobs
