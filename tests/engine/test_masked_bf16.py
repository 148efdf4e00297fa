"""bf16 models: the masked forward in bf16 with fp32 masks, gradients and loss; pruning in bf16.
On $EDGEPRUNE_TEST_DEVICE (`make gpu-check`: cuda), as the other ``device``-marked tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from edgeprune.engine import metrics
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.tasks import build_task
from tests.devices import TEST_DEVICE, on_device
from tests.engine.masked_models import batch, tiny_models

pytestmark = pytest.mark.device
MODELS = tiny_models()
NAMES = ["gpt2", "gpt2-deep", "llama-gqa", "qwen2", "mistral-window"]


def _model(name: str, dtype: torch.dtype = torch.bfloat16) -> CircuitModel:
    return CircuitModel(copy.deepcopy(MODELS[name]).to(TEST_DEVICE, dtype))


# The masked forward sums the same terms in another order, each rounded to the dtype: in bf16
# (8 bits) about 10 steps of the largest logit, in fp32 far less.
TOLERANCE = {torch.bfloat16: 0.04, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_all_masks_one_match_the_model_in_its_dtype(name: str, dtype: torch.dtype) -> None:
    model = _model(name, dtype)
    ids, corrupted, mask = on_device(*batch(0, B=3, T=7))
    valid = mask.bool()  # [B, T]
    reference = model.reference_logits(ids, attention_mask=mask).float()[valid]  # [n, V]
    out = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)  # [B, T, V]
    assert out.dtype == dtype
    scale = reference.abs().max()
    assert (out.float()[valid] - reference).abs().max() <= TOLERANCE[dtype] * scale


def _kl_and_grads(model: CircuitModel, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(full fp32 model || masked model) at the last real token under random fp32 masks, and
    its gradient w.r.t. the edge and node masks together [E + W]."""
    ids, corrupted, mask = on_device(*batch(0, B=3, T=7))
    last = mask.sum(1) - 1  # [B]
    gen = torch.Generator().manual_seed(1)
    edge, node = on_device(torch.rand(model.graph.n_edges, generator=gen),  # [E]
                           torch.rand(model.graph.n_writers, generator=gen))  # [W]
    edge.requires_grad_()
    node.requires_grad_()
    out = model.logits(
        ids,
        attention_mask=mask,
        corrupted_ids=corrupted,
        edge_mask=edge,
        node_mask=node,
        positions=last,
    )  # [B, V]
    kl = metrics.kl_divergence(clean, out)
    assert kl.dtype == torch.float32
    kl.backward()
    assert edge.grad is not None and node.grad is not None
    assert edge.grad.dtype == node.grad.dtype == torch.float32  # the masks' own dtype
    return kl.detach(), torch.cat([edge.grad, node.grad])  # [E + W]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_mask_gradients_follow_the_fp32_model(name: str) -> None:
    fp32 = _model(name, torch.float32)
    ids, _, mask = on_device(*batch(0, B=3, T=7))
    clean = fp32.reference_logits(ids, attention_mask=mask, positions=mask.sum(1) - 1)  # [B, V]
    kl32, g32 = _kl_and_grads(fp32, clean)
    kl16, g16 = _kl_and_grads(_model(name), clean)
    assert torch.isfinite(g16).all()
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert kl16 == pytest.approx(float(kl32), rel=0.05, abs=1e-3)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_prune_steps_in_bf16_follow_fp32(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    # masks start half open (init_mean 0), so the KL and its gradients are far from zero
    config = PruneConfig(steps=4, batch_size=4, seed=3, init_mean=0.0, edge_lr=0.1, node_lr=0.1)
    frozen = PruneConfig(steps=1, batch_size=4, seed=3, init_mean=0.0, edge_lr=0.0, node_lr=0.0)
    final, losses, circuits = [], [], []
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(f"hf:{folder}", device=TEST_DEVICE, dtype=dtype)
        ioi = build_task("ioi", model.tokenizer, n=8, seed=0)
        result = prune(model, ioi, config)
        assert result.edge_log_alpha.dtype == torch.float32
        start = prune(model, ioi, frozen).edge_log_alpha  # the initial log_alphas (warm start)
        assert not torch.equal(result.edge_log_alpha, start)  # the steps moved the masks
        final.append(result.edge_log_alpha)  # [E]
        losses.append([h["task_loss"] for h in result.history])
        circuits.append(set(result.circuit.edges))
    assert all(torch.isfinite(torch.tensor(losses[1])))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    # Adam moves every log_alpha by about +-lr whatever its gradient's size, so the moves of edges
    # whose gradient is below bf16's resolution are sign noise in either dtype; the step-0
    # gradients are compared above. What the steps must preserve is where they lead: the same
    # log_alphas and the same circuit.
    assert torch.nn.functional.cosine_similarity(final[1], final[0], dim=0) > 0.999
    shared = len(circuits[0] & circuits[1]) / len(circuits[0] | circuits[1])
    assert circuits[0] and shared >= 0.9
