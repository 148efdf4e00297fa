"""Edge Pruning: hard-concrete masks, schedules, the Lagrangian and the training loop on tiny models."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from edgeprune.engine import defaults, masks
from edgeprune.engine.attribution import eap_ig_scores
from edgeprune.engine.cache import ActivationCache
from edgeprune.engine.errors import InvalidArgument, Stopped
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.prune import (
    PhaseProgress,
    ProgressEvent,
    PruneConfig,
    batch_rows,
    lr_scale,
    prune,
    target_at,
)
from edgeprune.engine.tasks import Example, TaskDataset, build_task, from_examples

SHORT = PruneConfig(steps=6, batch_size=4, seed=3, warm_start=None)  # the training loop alone


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir: Path) -> CircuitModel:
    return load_model(f"hf:{tiny_gpt2_dir}")


@pytest.fixture(scope="module")
def ioi(model: CircuitModel) -> TaskDataset:
    return build_task("ioi", model.tokenizer, n=8, seed=0)


# ---- hard-concrete masks -------------------------------------------------------------------------


def test_hard_concrete_sample_statistics() -> None:
    log_alpha = torch.tensor([-3.0, 0.0, 2.0]).repeat_interleave(20_000)  # [60000]
    z = masks.sample(log_alpha, torch.Generator().manual_seed(0)).view(3, -1)  # [3, 20000]
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    nonzero = (z > 0).float().mean(1)  # [3]
    expected = masks.keep_probability(torch.tensor([-3.0, 0.0, 2.0]))  # [3]
    assert torch.allclose(nonzero, expected, atol=0.01)
    assert bool((z == 1).any(1).all())  # mass exactly at 1 as well as at 0
    assert bool((z.mean(1).diff() > 0).all())  # higher log_alpha, larger masks


def test_hard_concrete_gradient_and_deterministic_mask() -> None:
    log_alpha = torch.zeros(100, requires_grad=True)  # [100]
    masks.sample(log_alpha, torch.Generator().manual_seed(1)).sum().backward()
    assert log_alpha.grad is not None and float(log_alpha.grad.abs().sum()) > 0
    det = masks.deterministic(torch.tensor([-10.0, 0.0, 10.0]))
    assert det.tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_warm_log_alpha_follows_log_scores() -> None:
    scores = torch.tensor([0.1, 5.0, 3.0, 0.0, 2.0, 1e6])
    la = masks.warm_log_alpha(scores, 3, high=3.0, floor=8.0)
    assert (la > 0).tolist() == [False, True, True, False, False, True]
    assert float(la[5]) == 3.0 and float(la[3]) == -8.0  # clamped
    assert float(la[1] - la[2]) == pytest.approx(math.log(5 / 3), rel=1e-5)
    order = torch.argsort(-scores)
    assert bool((la[order].diff() <= 0).all())


def test_init_log_alpha() -> None:
    la = masks.init_log_alpha(50_000, generator=torch.Generator().manual_seed(0))
    assert float(la.mean()) == pytest.approx(10.0, abs=1e-3)
    assert float(la.std()) == pytest.approx(0.01, rel=0.05)
    assert float(masks.keep_probability(la).min()) > 0.9999


# ---- schedules and data order --------------------------------------------------------------------


def test_target_rises_linearly_then_holds() -> None:
    assert target_at(0, 0.1, 1.02, 100) == pytest.approx(0.1)
    assert target_at(50, 0.1, 1.02, 100) == pytest.approx(0.56)
    assert target_at(100, 0.1, 1.02, 100) == target_at(500, 0.1, 1.02, 100) == pytest.approx(1.02)
    assert target_at(0, 0.0, 0.9, 0) == 0.9


def test_lr_warmup() -> None:
    assert [lr_scale(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_scale(0, 0) == 1.0


def test_batches_walk_seeded_permutations() -> None:
    first_epoch = torch.cat([batch_rows(10, 5, 0, s) for s in range(2)])  # [10]
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(batch_rows(10, 5, 0, 3), batch_rows(10, 5, 0, 3))
    assert not torch.equal(batch_rows(10, 5, 0, 0), batch_rows(10, 5, 1, 0))
    assert batch_rows(3, 5, 0, 0).shape == (5,)  # batches larger than the dataset wrap around


def test_default_recipe_and_scaling() -> None:
    recipe = PruneConfig()
    assert (recipe.warm_start, recipe.edge_lr, recipe.lambda_lr, recipe.node_masks,
            recipe.node_loss) == ("eap_ig", 0.05, defaults.LAMBDA_LEARNING_RATE, True, False)
    assert recipe.steps == defaults.STEPS and recipe.warm_start_floor == defaults.WARM_START_FLOOR
    assert recipe.lagrangian_factor(10_000) == 100.0  # sqrt of the number of masks
    assert PruneConfig(lagrangian_scale=1.0).lagrangian_factor(10_000) == 1.0  # the paper's
    paper = PruneConfig(steps=defaults.PAPER_STEPS, warm_start=None,
                        target_warmup_steps=defaults.PAPER_STEPS * 5 // 6)
    assert paper.target_warmup == 2500 and paper.lr_warmup == 200  # warm-ups scale with steps
    assert PruneConfig(steps=300).target_warmup == 200  # the last third holds the target


# ---- the training loop ---------------------------------------------------------------------------


def test_prune_runs_and_reports_progress(model: CircuitModel, ioi: TaskDataset) -> None:
    seen: list[ProgressEvent | PhaseProgress] = []
    config = dataclasses.replace(SHORT, edge_count=20, warm_start="eap_ig")
    result = prune(model, ioi, config, progress=seen.append)
    phases = [e for e in seen if isinstance(e, PhaseProgress)]
    events = [e for e in seen if isinstance(e, ProgressEvent)]
    assert seen[: len(phases)] == phases  # the preparation comes first, then the steps
    assert [e.phase for e in phases] == ["cache"] * 2 + ["warm_start"] * phases[-1].total_steps
    assert [e.step for e in phases if e.phase == "warm_start"] == list(
        range(1, phases[-1].total_steps + 1))
    assert [e.step for e in events] == list(range(1, 7))
    assert {e.loss_name for e in events} == {"kl"}
    last = events[-1]
    assert last.total_steps == 6 and last.steps_per_s > 0
    assert math.isfinite(last.loss) and last.task_loss >= -1e-6
    assert last.loss == pytest.approx(last.task_loss + last.sparsity_loss, rel=1e-5, abs=1e-6)
    assert set(last.lambdas) == {"edge_l1", "edge_l2"}
    assert 0 < result.circuit.edge_count <= 20
    assert result.circuit.method == "edge_pruning" and result.steps_done == 6
    assert result.circuit.provenance["dataset_hash"] == ioi.content_hash
    assert result.edge_log_alpha.shape == (model.graph.n_edges,)
    assert result.node_log_alpha is not None and result.node_log_alpha.shape == (model.graph.n_writers,)


def test_lambdas_follow_gradient_ascent(model: CircuitModel, ioi: TaskDataset) -> None:
    # The target rises above the (initially ~0) sparsity, so (t - s) > 0 and ascent raises lambda1.
    config = dataclasses.replace(SHORT, steps=5, target_warmup_steps=2, lr_warmup_steps=0, lambda_lr=0.1)
    history = prune(model, ioi, config).history
    assert history[-1]["target"] > history[-1]["expected_sparsity"]
    assert history[-1]["lambdas"]["edge_l1"] > 0.2
    assert history[-1]["lambdas"]["edge_l2"] > 0.2


def test_node_lagrangian(model: CircuitModel, ioi: TaskDataset) -> None:
    config = dataclasses.replace(SHORT, steps=3, node_loss=True, node_target=0.5, target_warmup_steps=1)
    last = prune(model, ioi, config).history[-1]
    assert set(last["lambdas"]) == {"edge_l1", "edge_l2", "node_l1", "node_l2"}
    assert last["lambdas"]["node_l1"] > 0


def test_prune_is_deterministic(model: CircuitModel, ioi: TaskDataset) -> None:
    a = prune(model, ioi, SHORT)
    b = prune(model, ioi, SHORT)
    assert torch.equal(a.edge_log_alpha, b.edge_log_alpha)
    assert a.history == b.history
    c = prune(model, ioi, dataclasses.replace(SHORT, seed=4))
    assert not torch.equal(a.edge_log_alpha, c.edge_log_alpha)


def test_cached_and_recomputed_activations_agree(model: CircuitModel, ioi: TaskDataset) -> None:
    cached = prune(model, ioi, dataclasses.replace(SHORT, steps=2))
    recomputed = prune(model, ioi, dataclasses.replace(SHORT, steps=2, cache_bytes=0))
    assert torch.allclose(cached.edge_log_alpha, recomputed.edge_log_alpha, atol=1e-5)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_other_ablations_and_logit_diff_loss(model: CircuitModel, ioi: TaskDataset, ablation: str) -> None:
    config = dataclasses.replace(SHORT, steps=2, ablation=ablation, loss="logit_diff", node_masks=False)
    result = prune(model, ioi, config)
    assert result.node_log_alpha is None
    assert math.isfinite(result.history[-1]["task_loss"])


def test_should_stop_checkpoints_and_stops(model: CircuitModel, ioi: TaskDataset) -> None:
    steps: list[ProgressEvent] = []
    saved: list[bytes] = []

    def count(event: ProgressEvent | PhaseProgress) -> None:
        if isinstance(event, ProgressEvent):
            steps.append(event)

    result = prune(model, ioi, SHORT, should_stop=lambda: len(steps) >= 2, progress=count,
                   on_checkpoint=saved.append)
    assert result.stopped and result.steps_done == 2 and len(result.history) == 2
    assert len(saved) == 1 and result.warnings == []  # a stopped run is not judged


@pytest.mark.parametrize("phase", ["cache", "warm_start"])
def test_should_stop_during_the_preparation_raises_stopped(
    model: CircuitModel, ioi: TaskDataset, phase: str
) -> None:
    """The cache build and the warm start poll should_stop too: nothing is checkpointed (there is
    no training state yet) and Stopped says so."""
    seen: list[str] = []
    saved: list[bytes] = []

    def note(event: ProgressEvent | PhaseProgress) -> None:
        if isinstance(event, PhaseProgress):
            seen.append(event.phase)

    config = dataclasses.replace(SHORT, warm_start="eap_ig", warm_start_ig_steps=3)
    with pytest.raises(Stopped):
        prune(model, ioi, config, progress=note, should_stop=lambda: phase in seen,
              on_checkpoint=saved.append)
    assert seen.count(phase) == 1 and saved == []
    assert phase == "warm_start" or "warm_start" not in seen


def test_warm_start_from_eap_ig(model: CircuitModel, ioi: TaskDataset) -> None:
    config = dataclasses.replace(SHORT, steps=1, edge_count=10, warm_start="eap_ig", warm_start_ig_steps=2,
                                 lr_warmup_steps=10**6)  # lr 0 for the first step: masks stay put
    result = prune(model, ioi, config)
    la = result.edge_log_alpha  # [E]
    positive = int((la > 0).sum())
    assert positive == 10  # the top 10 by EAP-IG start on, the rest off
    assert float(la.max()) <= 3.0 + 1e-3
    # below the cut the edges keep their EAP-IG order wherever the floor leaves room
    scores = eap_ig_scores(ActivationCache(model, ioi), steps=2, batch_size=4)
    free = scores > 0  # [E]: zero scores tie at the bottom
    order = torch.argsort(scores[free], descending=True)
    assert bool((la[free][order].diff() <= 1e-6).all())
    start = masks.warm_log_alpha(scores, 10, high=3.0, floor=config.warm_start_floor)  # [E]
    torch.testing.assert_close(la, start, rtol=0, atol=1e-5)
    floored = masks.warm_log_alpha(scores, 10, high=3.0, floor=1.0)
    assert float(floored.min()) == -1.0 and float(la.min()) < -1.0


def test_bad_configs_raise_invalid_argument(model: CircuitModel, ioi: TaskDataset) -> None:
    numbers = from_examples([Example(clean=[1, 2, 3], corrupted=[1, 2, 4])], model.tokenizer)
    cases = [
        ({"steps": 0}, ioi, "steps"),
        ({"batch_size": -1}, ioi, "batch_size"),
        ({"edge_lr": float("nan")}, ioi, "edge_lr"),
        ({"loss": "mse2"}, ioi, "loss"),
        ({"loss": "logit_diff"}, numbers, "loss"),
        ({"ablation": "random"}, ioi, "ablation"),
        ({"node_masks": False, "node_loss": True}, ioi, "node_loss"),
        ({"edge_count": 10**9}, ioi, "edge_count"),
        ({"grad_clip": 0}, ioi, "grad_clip"),
        ({"warm_start": "eap"}, ioi, "warm_start"),
    ]
    for change, data, field in cases:
        with pytest.raises(InvalidArgument) as err:
            prune(model, data, dataclasses.replace(SHORT, **change))
        assert err.value.field == field, change


def test_grad_clip_and_weight_decay_run(model: CircuitModel, ioi: TaskDataset) -> None:
    result = prune(model, ioi, dataclasses.replace(SHORT, steps=2, grad_clip=0.5, weight_decay=0.01))
    assert torch.isfinite(result.edge_log_alpha).all()


def test_activation_cache_within_and_over_budget(model: CircuitModel, ioi: TaskDataset) -> None:
    kept = ActivationCache(model, ioi)
    fresh = ActivationCache(model, ioi, budget_bytes=0)
    assert kept.cached and not fresh.cached
    index = torch.tensor([5, 0, 3])
    a, b = kept.batch(index), fresh.batch(index)
    assert a.ablated is not None and b.ablated is not None
    assert a.ablated.shape == b.ablated.shape == (model.graph.n_writers, 3, a.data.clean_ids.shape[1],
                                                  model.d_model)
    assert torch.allclose(a.ablated, b.ablated, atol=1e-5)
    assert torch.allclose(a.clean_logits, b.clean_logits, atol=1e-4)
    with pytest.raises(InvalidArgument):
        ActivationCache(model, ioi, ablation="noise")


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["cached", "recomputed"])
def test_scratch_batches_reuse_one_buffer_and_match_fresh_ones(
    model: CircuitModel, ioi: TaskDataset, budget: int
) -> None:
    cache = ActivationCache(model, ioi, budget_bytes=budget)
    assert cache.cached == (budget > 0)
    first = cache.batch(torch.tensor([5, 0, 3]), scratch=True)
    assert first.ablated is not None
    assert torch.equal(first.ablated, cache.batch(torch.tensor([5, 0, 3])).ablated)
    memory = first.ablated.data_ptr()
    for index in (torch.tensor([2, 7, 1]), torch.tensor([4]), torch.arange(len(ioi))):
        batch = cache.batch(index, scratch=True)  # overwrites the previous scratch batch
        expected = cache.batch(index).ablated  # [W, B, T, D], freshly gathered or computed
        assert batch.ablated is not None and expected is not None
        assert batch.ablated.shape == expected.shape and torch.equal(batch.ablated, expected)
        if len(index) <= 3:
            assert batch.ablated.data_ptr() == memory  # no new allocation while it fits
