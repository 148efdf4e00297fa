"""Circuit metrics: per-batch formulas on hand-made logits, and evaluate() on real tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from edgeprune.engine.cache import ActivationCache
from edgeprune.engine.circuit import Circuit
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.metrics import (
    evaluate,
    evaluate_many,
    faithfulness,
    kl_divergence,
    logit_diff,
    prob_diff,
)
from edgeprune.engine.tasks import Example, TaskDataset, build_task, from_examples
from edgeprune.engine.tracr_model import load_tracr

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tracr"


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request: pytest.FixtureRequest) -> CircuitModel:
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    return CircuitModel(
        AutoModelForCausalLM.from_pretrained(str(folder)),
        AutoTokenizer.from_pretrained(str(folder)),
    )


def _toy(tok: PreTrainedTokenizerFast, **answers) -> TaskDataset:
    """Two one-position examples over token ids (vocabulary of the tiny tokenizer)."""
    return from_examples(
        [
            Example([1, 2], [1, 3], **{k: v[0] for k, v in answers.items()}),
            Example([4, 5], [4, 6], **{k: v[1] for k, v in answers.items()}),
        ],
        tok,
    )


# ---- per-batch formulas --------------------------------------------------------------------------


def test_kl_is_batchmean_over_valid_positions() -> None:
    torch.manual_seed(0)
    p, q = torch.randn(1, 1, 11), torch.randn(1, 1, 11)  # [B=1, P=1, V]
    expected = float((p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum())
    assert math.isclose(float(kl_divergence(p, q)), expected, rel_tol=1e-5)
    # the same row eight times has the same KL: the batch is averaged once, never twice
    assert math.isclose(
        float(kl_divergence(p.expand(8, 1, 11), q.expand(8, 1, 11))), expected, rel_tol=1e-5
    )
    # masked-out positions do not count, whatever they hold
    full = torch.cat([p, p], dim=1)  # [1, 2, V]
    circuit = torch.cat([q, torch.randn(1, 1, 11) * 9], dim=1)
    mask = torch.tensor([[True, False]])
    assert math.isclose(float(kl_divergence(full, circuit, mask)), expected, rel_tol=1e-5)
    assert float(kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
    q.requires_grad_(True)
    kl_divergence(p, q).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    # a token the full model rules out (-inf logit) adds nothing, instead of NaN
    masked = p.clone()
    masked[..., 3] = -math.inf
    assert math.isfinite(float(kl_divergence(masked, q.detach())))


def test_logit_and_prob_difference(tok: PreTrainedTokenizerFast) -> None:
    ds = _toy(tok, target=[7, 8], distractor=[9, 10])
    logits = torch.zeros(2, 1, len(tok))  # [B, P, V]
    logits[0, 0, 7], logits[0, 0, 9] = 3.0, 1.0
    logits[1, 0, 8], logits[1, 0, 10] = -1.0, 2.0
    assert logit_diff(logits, ds).tolist() == [2.0, -3.0]
    probs = logits.softmax(-1)
    assert torch.allclose(
        prob_diff(logits, ds),
        torch.stack([probs[0, 0, 7] - probs[0, 0, 9], probs[1, 0, 8] - probs[1, 0, 10]]),
    )
    assert logit_diff(logits[:, 0], ds).tolist() == [2.0, -3.0]  # [B, V] works too


def test_answer_sets_use_sums_of_probabilities(tok: PreTrainedTokenizerFast) -> None:
    ds = _toy(tok, good=[[7, 8], [9]], bad=[[10], [11, 12, 13]])
    assert ds.metric == "prob_diff"
    logits = torch.randn(2, 1, len(tok))
    probs = logits.softmax(-1)[:, 0]  # [B, V]
    expected = [probs[0, 7] + probs[0, 8] - probs[0, 10], probs[1, 9] - probs[1, 11:14].sum()]
    assert torch.allclose(prob_diff(logits, ds), torch.stack(expected), atol=1e-6)
    means = [
        (logits[0, 0, 7] + logits[0, 0, 8]) / 2 - logits[0, 0, 10],
        logits[1, 0, 9] - logits[1, 0, 11:14].mean(),
    ]
    assert torch.allclose(logit_diff(logits, ds), torch.stack(means), atol=1e-6)


def test_metrics_need_answers(tok: PreTrainedTokenizerFast) -> None:
    ds = _toy(tok)
    with pytest.raises(InvalidArgument):
        logit_diff(torch.zeros(2, 1, len(tok)), ds)
    assert math.isnan(faithfulness(1.0, 2.0, 2.0))
    assert faithfulness(1.5, 2.0, 1.0) == 0.5


# ---- evaluate ------------------------------------------------------------------------------------


def test_full_and_empty_circuits_bound_faithfulness(model: CircuitModel) -> None:
    ds = build_task("ioi", model.tokenizer, n=12, seed=0, split="test")
    E = model.graph.n_edges
    full, empty, whole = evaluate_many(
        model,
        [None, (torch.zeros(E), None), (torch.ones(E), torch.ones(model.graph.n_writers))],
        ds,
        batch_size=5,
    )
    assert full["kl"] == pytest.approx(0.0, abs=1e-6)
    assert full["faithfulness"] == pytest.approx(1.0)
    assert full["exact_match"] == 1.0 and full["edges"] == E and full["edge_fraction"] == 1.0
    assert full["accuracy"] == full["full_accuracy"]
    assert whole["kl"] == pytest.approx(0.0, abs=1e-6) and whole["edges"] == E
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-6)
    assert empty["edges"] == 0 and empty["nodes"] == 0 and empty["kl"] > 0
    # the empty circuit with corrupted ablation is exactly the model run on the corrupted prompts
    corrupted = model.reference_logits(
        ds.corrupted_ids, attention_mask=ds.attention_mask, positions=ds.positions
    )  # [N, 1, V]
    assert empty["logit_diff"] == pytest.approx(float(logit_diff(corrupted, ds).mean()), abs=1e-4)
    clean = model.reference_logits(
        ds.clean_ids, attention_mask=ds.attention_mask, positions=ds.positions
    )
    assert full["logit_diff"] == pytest.approx(float(logit_diff(clean, ds).mean()), abs=1e-4)
    assert full["examples"] == 12 and set(full) >= {
        "kl",
        "logit_diff",
        "faithfulness",
        "accuracy",
        "exact_match",
        "edges",
        "nodes",
    }


def test_batches_give_the_metrics_of_one_batch(model: CircuitModel) -> None:
    """Batches reuse one buffer for their ablation values (gathered from the cache, or recomputed
    when the cache keeps nothing): metrics do not depend on the batching or the cache."""
    ds = build_task("ioi", model.tokenizer, n=11, seed=1, split="test")
    g = torch.Generator().manual_seed(0)
    circuits = [((torch.rand(model.graph.n_edges, generator=g) < 0.5).float(), None)]
    whole = evaluate_many(model, circuits, ds, batch_size=len(ds))
    for budget in (1 << 30, 0):  # cached; recomputed for every batch
        cache = ActivationCache(model, ds, budget_bytes=budget)
        assert cache.cached == bool(budget)
        batched = evaluate_many(model, circuits, ds, batch_size=4, cache=cache)
        # faithfulness divides differences of means, so its fp32 rounding is that of the logit
        # differences (order 1-10), not of its own size
        faith = [m.pop("faithfulness") for m in batched]
        assert faith == [pytest.approx(w["faithfulness"], rel=1e-5, abs=1e-5) for w in whole]
        assert batched == [pytest.approx({k: v for k, v in w.items() if k != "faithfulness"},
                                         rel=1e-5, abs=1e-6) for w in whole]


def test_a_circuit_matches_its_masks(model: CircuitModel) -> None:
    g = model.graph
    edges = [e for e in g.edges if e.endswith("->logits") or ".h0." in e]
    circuit = Circuit(
        model="tiny",
        method="manual",
        edges=edges,
        edge_scores={},
        total_edge_count=g.n_edges,
        nodes=list(g.writers),
    )
    ds = build_task("gendered_pronoun", model.tokenizer, n=8, seed=0, split="validation")
    by_circuit = evaluate(model, circuit, ds)
    by_masks = evaluate(model, (circuit.edge_mask(g), None), ds)
    assert by_circuit == pytest.approx(by_masks)
    assert by_circuit["edges"] == len(edges)
    assert 0 < by_circuit["nodes"] <= g.n_writers + 1
    # a node mask switches off every edge out of that writer
    node_mask = torch.ones(g.n_writers)
    node_mask[g.writer_index("tok")] = 0
    no_tok = evaluate(model, (circuit.edge_mask(g), node_mask), ds)
    assert no_tok["edges"] == len([e for e in edges if not e.startswith("tok->")])


def test_other_ablations_and_prob_diff_tasks(model: CircuitModel) -> None:
    ds = build_task("greater_than", model.tokenizer, n=6, seed=0, split="test")
    half = (torch.arange(model.graph.n_edges) % 2).float()  # [E]
    for ablation in ("corrupted", "zero", "mean"):
        full, circuit = evaluate_many(
            model, [None, (half, None)], ds, ablation=ablation, batch_size=4
        )
        assert full["faithfulness"] == pytest.approx(1.0)
        assert set(circuit) >= {"prob_diff", "full_prob_diff", "empty_prob_diff", "accuracy"}
        m = ds.metric
        expected = faithfulness(circuit[m], circuit[f"full_{m}"], circuit[f"empty_{m}"])
        assert circuit["faithfulness"] == pytest.approx(expected, nan_ok=True)
        assert circuit["edges"] == model.graph.n_edges // 2


def test_bad_circuits_are_rejected(model: CircuitModel) -> None:
    ds = build_task("ioi", model.tokenizer, n=2, seed=0)
    with pytest.raises(InvalidArgument) as err:
        evaluate(model, (torch.ones(3), None), ds)
    assert err.value.field == "edge_mask"
    with pytest.raises(InvalidArgument) as err:
        evaluate(model, "a0.h0->logits", ds)  # type: ignore[arg-type]
    assert err.value.field == "circuit"
    other = Circuit(model="x", method="m", edges=[], edge_scores={}, nodes=[], total_edge_count=7)
    with pytest.raises(InvalidArgument):
        evaluate(model, other, ds)
    with pytest.raises(InvalidArgument) as err:
        evaluate(model, None, ds, batch_size=0)
    assert err.value.field == "batch_size"


def test_all_position_tasks_count_only_real_positions() -> None:
    module, tracr_tok = load_tracr(FIXTURES / "reverse")
    model = CircuitModel(module, tracr_tok)
    ds = build_task("tracr_reverse", tracr_tok, n=16, seed=0)
    full, empty = evaluate_many(
        model, [None, (torch.zeros(model.graph.n_edges), None)], ds, ablation="zero", batch_size=6
    )
    assert full["kl"] == 0.0 and full["exact_match"] == 1.0
    assert "logit_diff" not in full and "accuracy" not in full  # tracr tasks carry no targets
    assert empty["kl"] > 0 and empty["exact_match"] < 1.0
    # KL over the real positions only: recompute it by hand, position by position
    E = model.graph.n_edges
    total, count = 0.0, 0
    for b in ds.batches(6):
        ref = model.reference_logits(
            b.clean_ids, attention_mask=b.attention_mask, positions=b.positions
        )
        out = model.logits(
            b.clean_ids,
            attention_mask=b.attention_mask,
            positions=b.positions,
            edge_mask=torch.zeros(E),
            ablation="zero",
        )
        for i, p in b.answer_mask.nonzero().tolist():
            total += float(kl_divergence(ref[i, p], out[i, p]))
            count += 1
    assert count == int(ds.answer_mask.sum())
    assert empty["kl"] == pytest.approx(total / count, rel=1e-4)


def test_pairwise_accuracy_and_the_empty_circuits_kl(model: CircuitModel) -> None:
    """pairwise_accuracy is the share of examples whose target logit beats the distractor's, for
    the circuit, the full model and the empty circuit; empty_kl is the KL of the empty circuit."""
    ds = build_task("ioi", model.tokenizer, n=12, seed=2, split="test")
    g = torch.Generator().manual_seed(3)
    half = ((torch.rand(model.graph.n_edges, generator=g) < 0.5).float(), None)
    empty = (torch.zeros(model.graph.n_edges), None)
    got, nothing, full = evaluate_many(model, [half, empty, None], ds, batch_size=5)
    cache = ActivationCache(model, ds)
    batch = cache.batch(torch.arange(len(ds)))
    for circuit, key in ((half, ""), (empty, "empty_"), (None, "full_")):
        logits = batch.clean_logits if circuit is None else cache.logits(batch, *circuit)
        wins = (logit_diff(logits, ds) > 0).float().mean()
        assert got[f"{key}pairwise_accuracy"] == pytest.approx(float(wins), abs=1e-6)
    assert full["pairwise_accuracy"] == pytest.approx(got["full_pairwise_accuracy"])
    assert 0 <= got["pairwise_accuracy"] <= 1
    assert got["empty_kl"] == pytest.approx(nothing["kl"], rel=1e-5)
    assert got["empty_kl"] > 0 and full["kl"] == pytest.approx(0, abs=1e-6)
