"""Gradients of the masked forward w.r.t. edge and node masks, against finite differences (float64;
see ``masked_models.check_mask_gradients``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeprune.engine.masked import CircuitModel
from tests.engine.masked_models import batch, check_mask_gradients, float64, tiny_models

MODELS = tiny_models()


@pytest.fixture(
    params=["gpt2", "gpt2-deep", "llama-gqa", "qwen2", "mistral-window"], scope="module"
)
def model(request) -> CircuitModel:
    return CircuitModel(float64(MODELS[request.param]))


@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_mask_gradients_match_finite_differences(model, ablation):
    check_mask_gradients(model, ablation)


def test_kl_gradient_and_repeated_backward(model):
    """A KL loss as pruning uses it; backpropagating one graph twice gives the same gradient."""
    ids, corrupted, mask = batch(2, B=2, T=5)
    last = mask.sum(1) - 1
    target = model.reference_logits(ids, attention_mask=mask, positions=last).log_softmax(-1)
    ablated = model.ablation_outputs(corrupted, attention_mask=mask)
    gen = torch.Generator().manual_seed(3)
    edge = torch.rand(model.graph.n_edges, generator=gen, dtype=torch.float64).requires_grad_()

    def loss(e: torch.Tensor) -> torch.Tensor:
        out = model.logits(ids, attention_mask=mask, ablated=ablated, edge_mask=e, positions=last)
        return nn.functional.kl_div(
            out.log_softmax(-1), target, log_target=True, reduction="batchmean"
        )

    value = loss(edge)
    (grad1,) = torch.autograd.grad(value, edge, retain_graph=True)
    (grad2,) = torch.autograd.grad(value, edge)
    torch.testing.assert_close(grad1, grad2)
    direction = torch.randn(edge.shape, generator=gen, dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        numeric = (loss(edge + eps * direction) - loss(edge - eps * direction)) / (2 * eps)
    torch.testing.assert_close(grad1 @ direction, numeric, atol=1e-8, rtol=1e-6)
    # at all-ones the KL is zero and so is its gradient: the circuit is the full model
    ones = torch.ones_like(edge).requires_grad_()
    value = loss(ones)
    assert value.abs() < 1e-10



@pytest.mark.parametrize("at_positions", [False, True])
def test_embeddings_and_grad_deltas(model, at_positions):
    """``embeddings`` replace the ones of ``input_ids``; ``grad_deltas`` X give, at masks 1, the
    mask gradient that ablation values y - X would: g_r . X_w for every edge w -> r (the forward
    at masks 1 is the plain model whatever the ablation values)."""
    ids, corrupted, mask = batch(4, B=2, T=5)
    positions = mask.sum(1) - 1 if at_positions else None
    g = model.graph
    gen = torch.Generator().manual_seed(5)
    proj = torch.randn(model.vocab_size, generator=gen, dtype=torch.float64)
    y = model.ablation_outputs(corrupted, attention_mask=mask)  # [W, B, T, D]
    x = torch.randn(y.shape, generator=gen, dtype=torch.float64)  # [W, B, T, D]

    def run(input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(g.n_edges, dtype=torch.float64, requires_grad=True)  # [E]
        out = model.logits(input_ids, attention_mask=mask, edge_mask=ones, positions=positions,
                           **kwargs)
        return out.detach(), torch.autograd.grad((out * proj).sum(), ones)[0]

    # the run on ids with the corrupted embeddings is the run on the corrupted ids
    expected_logits, expected = run(corrupted, ablated=y - x)
    logits, got = run(ids, embeddings=y[: g.n_embed], grad_deltas=x, ablation="zero")
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)
    assert got.abs().max() > 1e-3  # not vacuous
