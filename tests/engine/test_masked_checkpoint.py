"""Activation checkpointing of the masked forward: same loss and mask gradients (on
$EDGEPRUNE_TEST_DEVICE, see tests/devices.py), less memory."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from bench.bench_memory import measure_in_subprocess
from edgeprune.engine import metrics
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.tasks import build_task
from tests.devices import TEST_DEVICE, on_device
from tests.engine.masked_models import batch, tiny_models

MODELS = tiny_models()


def _model(name: str, dtype: torch.dtype = torch.float32) -> CircuitModel:
    return CircuitModel(copy.deepcopy(MODELS[name]).to(TEST_DEVICE, dtype))


def _loss_and_grads(
    model: CircuitModel, ablation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL at the last real token under random masks, and its gradients w.r.t. both masks."""
    ids, corrupted, mask = on_device(*batch(0, B=3, T=7))
    last = mask.sum(1) - 1  # [B]
    gen = torch.Generator().manual_seed(1)
    edge, node = on_device(torch.rand(model.graph.n_edges, generator=gen),  # [E]
                           torch.rand(model.graph.n_writers, generator=gen))  # [W]
    edge.requires_grad_()
    node.requires_grad_()
    clean = model.reference_logits(ids, attention_mask=mask, positions=last)  # [B, V]
    out = model.logits(
        ids,
        attention_mask=mask,
        corrupted_ids=corrupted,
        edge_mask=edge,
        node_mask=node,
        ablation=ablation,
        positions=last,
    )  # [B, V]
    loss = metrics.kl_divergence(clean, out)
    g_edge, g_node = torch.autograd.grad(loss, (edge, node))
    return loss.detach(), g_edge, g_node


@pytest.mark.device
@pytest.mark.parametrize("name", ["gpt2", "gpt2-deep", "llama-gqa", "mistral-window"])
@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
def test_checkpointing_keeps_loss_and_mask_gradients(name: str, ablation: str) -> None:
    model = _model(name)
    plain = _loss_and_grads(model, ablation)
    model.checkpoint_layers = True
    checkpointed = _loss_and_grads(model, ablation)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert plain[1].abs().max() > 0  # the gradients compared are not all zero


@pytest.mark.device
def test_checkpointing_in_bf16_keeps_mask_gradients() -> None:
    model = _model("llama-gqa", torch.bfloat16)
    plain = _loss_and_grads(model, "corrupted")
    with model.checkpointing():
        checkpointed = _loss_and_grads(model, "corrupted")
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same bf16 ops, recomputed


def test_checkpointing_context_restores_the_setting() -> None:
    model = CircuitModel(MODELS["gpt2"])
    with model.checkpointing():
        assert model.checkpoint_layers
    assert not model.checkpoint_layers
    with model.checkpointing(False):  # a False request does not switch an enabled model off
        assert not model.checkpoint_layers
    model.checkpoint_layers = True
    with model.checkpointing(False):
        assert model.checkpoint_layers
    assert model.checkpoint_layers


@pytest.mark.device
def test_prune_with_activation_checkpointing_learns_the_same_masks(tiny_gpt2_dir: Path) -> None:
    model = load_model(f"hf:{tiny_gpt2_dir}", device=TEST_DEVICE)
    ioi = build_task("ioi", model.tokenizer, n=8, seed=0)
    config = PruneConfig(steps=3, batch_size=4, seed=3)
    on = dataclasses.replace(config, activation_checkpointing=True)
    saved: list[bytes] = []
    plain = prune(model, ioi, config, checkpoint_every=2, on_checkpoint=saved.append)
    checkpointed = prune(model, ioi, on)
    assert not model.checkpoint_layers  # prune leaves the model as it found it
    torch.testing.assert_close(checkpointed.edge_log_alpha, plain.edge_log_alpha, rtol=0, atol=1e-6)
    assert [h["task_loss"] for h in checkpointed.history] == pytest.approx(
        [h["task_loss"] for h in plain.history], rel=1e-6, abs=1e-7
    )
    # the setting changes how a run computes, not what: a run may resume with it switched on
    resumed = prune(model, ioi, on, resume=saved[0])
    torch.testing.assert_close(resumed.edge_log_alpha, plain.edge_log_alpha, rtol=0, atol=1e-6)
    with pytest.raises(InvalidArgument) as info:
        prune(model, ioi, dataclasses.replace(config, activation_checkpointing="yes"))  # type: ignore[arg-type]
    assert info.value.field == "activation_checkpointing"


def test_activation_checkpointing_lowers_measured_peak_memory() -> None:
    # A moderately sized random GPT-2-shaped model: 6 layers, d=256, batch 8 x 64 tokens; the peak
    # resident set of two pruning steps, each setting in a fresh process (bench/bench_memory.py).
    shape = {
        "n_layers": 6,
        "n_heads": 4,
        "n_kv_heads": 4,
        "d_model": 256,
        "d_ff": 1024,
        "vocab_size": 512,
        "has_pos": True,
        "n_positions": 64,
        "gated_mlp": False,
    }
    case = {"shape": shape, "batch": 8, "seq": 64}
    plain = measure_in_subprocess({**case, "activation_checkpointing": False}, timeout=300)
    checkpointed = measure_in_subprocess({**case, "activation_checkpointing": True}, timeout=300)
    assert checkpointed["activation_checkpointing"] and not plain["activation_checkpointing"]
    assert checkpointed["measured_bytes"] < plain["measured_bytes"]
