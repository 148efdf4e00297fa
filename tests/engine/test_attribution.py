"""EAP, EAP-IG and ACDC in the masked graph of a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgeprune.engine import objective
from edgeprune.engine.attribution import (
    acdc,
    attribute,
    eap_ig_scores,
    mean_gradient,
    scored_circuit,
    warm_start_log_alpha,
)
from edgeprune.engine.cache import ActivationCache
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.metrics import evaluate
from edgeprune.engine.tasks import TaskDataset, build_task


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir: Path) -> CircuitModel:
    return load_model(f"hf:{tiny_gpt2_dir}")


@pytest.fixture(scope="module")
def ioi(model: CircuitModel) -> TaskDataset:
    return build_task("ioi", model.tokenizer, n=8, seed=0)


def test_eap_is_the_linear_effect_of_each_edge(model: CircuitModel, ioi: TaskDataset) -> None:
    """EAP's gradient predicts the metric change of a small step on one edge's mask."""
    cache = ActivationCache(model, ioi)
    grad = mean_gradient(cache, [1.0], "logit_diff", batch_size=3)  # [E]
    batch = cache.batch(torch.arange(len(ioi)))
    base = float(objective.metric("logit_diff", batch, cache.logits(batch, None, None)))
    for e in torch.argsort(-grad.abs())[:3].tolist():
        z = torch.ones(model.graph.n_edges)  # [E]
        z[e] = 1.0 - 1e-3
        moved = float(objective.metric("logit_diff", batch, cache.logits(batch, z, None)))
        assert (moved - base) / -1e-3 == pytest.approx(float(grad[e]), rel=0.05, abs=1e-4)


def test_scores_do_not_depend_on_batch_size(model: CircuitModel, ioi: TaskDataset) -> None:
    a = attribute(model, ioi, "eap", batch_size=8)
    b = attribute(model, ioi, "eap", batch_size=3)
    assert torch.allclose(a, b, atol=1e-5)
    assert bool((a >= 0).all())


def test_eap_ig_averages_gradients_along_the_mask_path(model: CircuitModel, ioi: TaskDataset) -> None:
    cache = ActivationCache(model, ioi)
    one = eap_ig_scores(cache, steps=1)
    mid = mean_gradient(cache, [0.5], "logit_diff").abs()
    assert torch.allclose(one, mid, atol=1e-6)
    two = eap_ig_scores(cache, steps=2)
    pair = (mean_gradient(cache, [0.25], "logit_diff") + mean_gradient(cache, [0.75], "logit_diff")) / 2
    assert torch.allclose(two, pair.abs(), atol=1e-6)


def test_scored_circuits_of_any_size(model: CircuitModel, ioi: TaskDataset) -> None:
    scores = attribute(model, ioi, "eap_ig", ig_steps=2)
    small = scored_circuit(model, ioi, scores, method="eap_ig", n_edges=10)
    large = scored_circuit(model, ioi, scores, method="eap_ig", sparsity=0.5)
    assert 0 < small.n_edges <= 10 < large.n_edges <= round(0.5 * model.graph.n_edges)
    assert small.method == "eap_ig" and small.provenance["dataset_hash"] == ioi.content_hash
    full = scored_circuit(model, ioi, scores, method="eap_ig", n_edges=model.graph.n_edges)
    assert evaluate(model, full, ioi)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_attribution_errors(model: CircuitModel, ioi: TaskDataset) -> None:
    with pytest.raises(InvalidArgument) as err:
        attribute(model, ioi, "acdc")
    assert err.value.field == "method"
    with pytest.raises(InvalidArgument) as err:
        attribute(model, ioi, "eap", metric="prob_diff")
    assert err.value.field == "metric"
    with pytest.raises(InvalidArgument):
        attribute(model, ioi, "eap_ig", ig_steps=0)
    with pytest.raises(InvalidArgument):
        scored_circuit(model, ioi, torch.zeros(3), method="eap", n_edges=2)


def test_warm_start_log_alpha_follows_log_scores() -> None:
    scores = torch.tensor([0.1, 5.0, 3.0, 0.0, 2.0, 1e6])
    la = warm_start_log_alpha(scores, 3, scale=3.0)
    assert (la > 0).tolist() == [False, True, True, False, False, True]
    assert float(la[5]) == 3.0 and float(la[3]) == -3.0  # clamped
    assert float(la[1] - la[2]) == pytest.approx(math.log(5 / 3), rel=1e-5)
    order = torch.argsort(-scores)
    assert bool((la[order].diff() <= 0).all())


def test_acdc_budget_runs_out_and_says_so(model: CircuitModel, ioi: TaskDataset) -> None:
    result = acdc(model, ioi, threshold=1e-4, max_forwards=6, batch_size=8)
    assert result.budget_exhausted
    assert result.forwards <= 6 and result.tested == result.forwards - 1
    assert result.circuit.metrics["budget_exhausted"] is True


def test_acdc_thresholds(model: CircuitModel, ioi: TaskDataset) -> None:
    everything_goes = acdc(model, ioi, threshold=1e9, max_forwards=10_000, batch_size=8)
    assert not everything_goes.budget_exhausted and everything_goes.circuit.n_edges == 0
    # Threshold 0 keeps any edge whose removal raises the KL; the result stays close to the model.
    careful = acdc(model, ioi, threshold=0.0, max_forwards=10_000, batch_size=8)
    assert not careful.budget_exhausted
    assert careful.circuit.n_edges > 0
    assert evaluate(model, careful.circuit, ioi)["kl"] <= careful.kl + 1e-5
