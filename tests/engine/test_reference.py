"""The specification (engine/reference.py) against the models themselves: with every mask 1 it is
the plain model, with every mask 0 and corrupted ablation the model on the corrupted input."""

from __future__ import annotations

import pytest
import torch

from edgeprune.engine.graph import Graph
from edgeprune.engine.reference import reference_run
from tests.engine.masked_models import batch, tiny_models
from tests.engine.test_masked_tracr import _random_tracr

MODELS = {**tiny_models(), "tracr-noncausal": _random_tracr(False), "tracr-causal": _random_tracr(True)}


def _logits(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if type(module).__name__ == "TracrModel":
        return module(ids, attention_mask=mask)
    return module(input_ids=ids, attention_mask=mask).logits


def _batch(name: str):
    if not name.startswith("tracr"):
        return batch(3)
    ids, corrupted, mask = batch(3, T=6)
    ids, corrupted = ids % 3 + 2, corrupted % 3 + 2  # tokens "a".."c"
    ids[:, 0] = corrupted[:, 0] = 0  # BOS
    return ids, corrupted, mask


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_ones_is_the_model_all_zeros_the_corrupted_run(name):
    module = MODELS[name]
    ids, corrupted, mask = _batch(name)
    valid = mask.bool()
    ones, _ = reference_run(module, ids, valid)
    assert (ones - _logits(module, ids, mask))[valid].abs().max() <= 1e-4
    _, ablated = reference_run(module, corrupted, valid)
    c = module.config
    if name.startswith("tracr"):
        graph = Graph.build(c.num_layers, c.num_heads, c.num_heads, True)
    elif name.startswith("gpt2"):
        graph = Graph.build(c.n_layer, c.n_head, c.n_head, True)
    else:
        graph = Graph.build(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, False)
    edge = {tuple(e.split("->")): 0.0 for e in graph.edges}
    out, _ = reference_run(module, ids, valid, edge, None, ablated)
    assert (out - _logits(module, corrupted, mask))[valid].abs().max() <= 1e-4
