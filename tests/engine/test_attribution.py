"""EAP, EAP-IG (over the inputs and over the edge masks) and ACDC in the masked graph of a tiny
model; EAP-IG against a slow reference that differentiates every reader's input explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeprune.engine import objective
from edgeprune.engine.attribution import (
    SCORED_METHODS,
    acdc,
    attribute,
    eap_ig_edge_scores,
    eap_ig_scores,
    ig_alphas,
    mean_gradient,
    scored_circuit,
)
from edgeprune.engine.cache import ActivationCache
from edgeprune.engine.errors import InvalidArgument, Stopped
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.metrics import evaluate
from edgeprune.engine.reference import reference_forward, reference_run
from edgeprune.engine.tasks import TaskDataset, build_task
from tests.engine.masked_models import float64


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


def test_eap_ig_edges_averages_gradients_along_the_mask_path(
    model: CircuitModel, ioi: TaskDataset
) -> None:
    cache = ActivationCache(model, ioi)
    one = eap_ig_edge_scores(cache, steps=1)
    mid = mean_gradient(cache, [0.5], "logit_diff").abs()
    assert torch.allclose(one, mid, atol=1e-6)
    two = eap_ig_edge_scores(cache, steps=2)
    pair = (mean_gradient(cache, [0.25], "logit_diff") + mean_gradient(cache, [0.75], "logit_diff")) / 2
    assert torch.allclose(two, pair.abs(), atol=1e-6)


# ---- EAP-IG over the inputs against a slow reference ---------------------------------------------


def reference_eap_ig(
    model: CircuitModel, data: TaskDataset, *, steps: int, ablation: str = "corrupted"
) -> torch.Tensor:
    """EAP-IG-inputs the slow way: |Delta_w . (1/m) sum_k dL/dx_r| for every edge w -> r: [E].

    The whole dataset in one batch; every writer's output and every reader's input by explicit
    loops over the HF module's weights (``reference_forward``), the input embeddings interpolated
    by hand, and dL/dx_r read off each reader input's ``.grad``.
    """
    cache = ActivationCache(model, data, ablation=ablation)
    batch = cache.batch(torch.arange(len(data)))  # for the metric: its clean logits and labels
    d = batch.data
    valid = d.attention_mask.bool()
    metric = objective.default_metric(data)
    _, clean = reference_run(model.module, d.clean_ids, valid)
    if ablation == "corrupted":
        _, start = reference_run(model.module, d.corrupted_ids, valid)
    elif ablation == "zero":
        start = {w: torch.zeros_like(y) for w, y in clean.items()}
    else:  # per-position mean of the clean outputs over the examples, pads left out
        weight = valid.float()[:, :, None]  # [B, T, 1]
        count = weight.sum(0).clamp(min=1)  # [T, 1]
        start = {w: ((y * weight).sum(0) / count).expand_as(y) for w, y in clean.items()}
    delta = {w: clean[w] - start[w] for w in clean}  # [B, T, D] each
    grads: dict[str, torch.Tensor] = {}  # reader -> sum over the points of dL/dx_r [B, T, D]
    for k in range(steps):
        embeddings = {
            w: (start[w] + (k / steps) * delta[w]).detach().requires_grad_()
            for w in model.graph.writers[: model.graph.n_embed]
        }
        inputs: dict[str, torch.Tensor] = {}
        logits, _ = reference_forward(model.module, d.clean_ids, valid, embeddings=embeddings,
                                      inputs=inputs)  # [B, T, V]
        at = torch.take_along_dim(logits, d.positions.long()[..., None], dim=1)  # [B, P, V]
        objective.metric(metric, batch, at).backward()
        for reader, x in inputs.items():
            grads[reader] = grads.get(reader, 0) + x.grad
    g = model.graph
    scores = []
    for r, reader in enumerate(g.readers):
        for writer in g.writers[: g.n_upstream[r]]:
            scores.append(float((delta[writer] * grads[reader]).sum()) / steps)
    return torch.tensor(scores).abs()  # [E]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> CircuitModel:
    return load_model(f"hf:{tiny_llama_dir}")


@pytest.mark.parametrize(
    ("family", "ablation", "dtype"),
    [("gpt2", "corrupted", torch.float32), ("llama", "corrupted", torch.float32),
     ("gpt2", "zero", torch.float32), ("gpt2", "mean", torch.float32),
     ("llama", "mean", torch.float32),
     ("gpt2", "corrupted", torch.float64), ("llama", "corrupted", torch.float64)],
)
def test_eap_ig_matches_the_reference(
    family: str, ablation: str, dtype: torch.dtype, model: CircuitModel, llama: CircuitModel
) -> None:
    """The fast EAP-IG (one masked forward and backward per point and batch) is the slow
    reference's, batched unevenly (3 + 3 + 2 examples, each batch trimmed to its longest row).
    In float64 the two differ by the float32 of the score sums and the metric alone."""
    m = model if family == "gpt2" else llama
    if dtype == torch.float64:
        m = CircuitModel(float64(m.module), m.tokenizer)
    data = build_task("ioi", m.tokenizer, n=8, seed=1)
    fast = eap_ig_scores(ActivationCache(m, data, ablation=ablation), steps=3, batch_size=3)
    slow = reference_eap_ig(m, data, steps=3, ablation=ablation)
    assert fast.shape == slow.shape == (m.graph.n_edges,)
    assert int((slow > 1e-3 * slow.max()).sum()) > m.graph.n_edges // 4  # not vacuous
    rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-5, 1e-7)
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=atol * float(slow.max()))


def test_eap_ig_points_are_mibs() -> None:
    """k / m for k = 0 .. m-1: the corrupted end of the path and not the clean one."""
    assert ig_alphas(1) == [0.0]
    assert ig_alphas(5) == [0.0, 0.2, 0.4, 0.6, 0.8]


@pytest.mark.parametrize("method", SCORED_METHODS)
def test_progress_and_should_stop(method: str, model: CircuitModel, ioi: TaskDataset) -> None:
    """progress(done, total) after every forward and backward pass (3 batches of 8 examples,
    times the points); should_stop polled before each, True raising Stopped."""
    passes = 3 if method == "eap" else 6
    calls: list[tuple[int, int]] = []
    attribute(model, ioi, method, ig_steps=2, batch_size=3,
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, passes) for i in range(1, passes + 1)]

    calls.clear()
    polls = []

    def should_stop() -> bool:
        polls.append(len(calls))
        return len(calls) == 2

    with pytest.raises(Stopped):
        attribute(model, ioi, method, ig_steps=2, batch_size=3, should_stop=should_stop,
                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, passes), (2, passes)] and polls == [0, 1, 2]


def test_scored_circuits_of_any_size(model: CircuitModel, ioi: TaskDataset) -> None:
    scores = attribute(model, ioi, "eap_ig", ig_steps=2)
    small = scored_circuit(model, ioi, scores, method="eap_ig", edge_count=10)
    large = scored_circuit(model, ioi, scores, method="eap_ig", edge_sparsity=0.5)
    assert 0 < small.edge_count <= 10 < large.edge_count <= round(0.5 * model.graph.n_edges)
    assert small.method == "eap_ig" and small.provenance["dataset_hash"] == ioi.content_hash
    full = scored_circuit(model, ioi, scores, method="eap_ig", edge_count=model.graph.n_edges)
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
        scored_circuit(model, ioi, torch.zeros(3), method="eap", edge_count=2)


def test_acdc_budget_runs_out_and_says_so(model: CircuitModel, ioi: TaskDataset) -> None:
    result = acdc(model, ioi, threshold=1e-4, max_forwards=6, batch_size=8)
    assert result.budget_exhausted
    assert result.forwards <= 6 and result.tested == result.forwards - 1
    assert result.circuit.metrics["budget_exhausted"] is True


def test_acdc_thresholds(model: CircuitModel, ioi: TaskDataset) -> None:
    everything_goes = acdc(model, ioi, threshold=1e9, max_forwards=10_000, batch_size=8)
    assert not everything_goes.budget_exhausted and everything_goes.circuit.edge_count == 0
    # Threshold 0 keeps any edge whose removal raises the KL; the result stays close to the model.
    careful = acdc(model, ioi, threshold=0.0, max_forwards=10_000, batch_size=8)
    assert not careful.budget_exhausted
    assert careful.circuit.edge_count > 0
    assert evaluate(model, careful.circuit, ioi)["kl"] <= careful.kl + 1e-5
