"""The masked forward on Tracr models (random weights and the compiled fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.reference import reference_run
from edgeprune.engine.tracr_model import TracrConfig, TracrModel, load_tracr

FIXTURES = Path(__file__).parent.parent / "fixtures" / "tracr"


def _random_tracr(causal: bool) -> TracrModel:
    config = TracrConfig(
        num_layers=2,
        num_heads=3,
        key_size=4,
        mlp_hidden_size=10,
        d_model=12,
        activation="relu",
        causal=causal,
        input_vocab=("BOS", "pad", "a", "b", "c"),
        output_vocab=("a", "b", "c", "d"),
        bos="BOS",
        max_seq_len=6,
        pad="pad",
    )
    model = TracrModel(config)
    gen = torch.Generator().manual_seed(int(causal))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(params=[False, True], ids=["noncausal", "causal"], scope="module")
def model(request) -> CircuitModel:
    return CircuitModel(_random_tracr(request.param))


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 5, (3, 6), generator=gen)
    corrupted = torch.randint(2, 5, (3, 6), generator=gen)
    ids[:, 0] = corrupted[:, 0] = 0  # BOS
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return ids, corrupted, mask


def _close(got: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor) -> None:
    """Equal at real tokens up to float32 rounding of logits of this size."""
    assert (got - expected)[valid].abs().max() <= 1e-6 * (1 + expected[valid].abs().max()) * 10


def test_all_ones_and_all_zeros(model):
    ids, corrupted, mask = _batch()
    valid = mask.bool()
    out = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)
    _close(out, model.module(ids, attention_mask=mask), valid)
    zeros = torch.zeros(model.graph.n_edges)
    out = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted, edge_mask=zeros)
    _close(out, model.module(corrupted, attention_mask=mask), valid)


@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_random_masks_match_reference(model, ablation):
    ids, corrupted, mask = _batch()
    valid = mask.bool()
    g = model.graph
    gen = torch.Generator().manual_seed(2)
    edge, node = torch.rand(g.n_edges, generator=gen), torch.rand(g.n_writers, generator=gen)
    edge_d = {tuple(e.split("->")): float(edge[i]) for i, e in enumerate(g.edges)}
    node_d = {w: float(node[i]) for i, w in enumerate(g.writers)}
    ablated = None
    if ablation != "zero":
        _, outs = reference_run(model.module, corrupted, valid)
        ablated = outs
        if ablation == "mean":
            weight = valid[:, :, None].float()
            ablated = {
                w: (y * weight).sum(0, keepdim=True) / weight.sum(0) for w, y in outs.items()
            }
    expected, _ = reference_run(model.module, ids, valid, edge_d, node_d, ablated)
    got = model.logits(
        ids,
        attention_mask=mask,
        corrupted_ids=corrupted,
        edge_mask=edge,
        node_mask=node,
        ablation=ablation,
    )
    _close(got, expected, valid)


def test_graph_shape(model):
    g = model.graph
    assert model.arch == "tracr" and g.has_pos and g.n_kv_heads == g.n_heads == 3
    assert g.n_writers == 2 + 2 * 4
    assert model.vocab_size == 4


@pytest.mark.parametrize(
    "name", sorted(p.name for p in FIXTURES.iterdir()) if FIXTURES.is_dir() else []
)
def test_compiled_fixtures_all_ones(name):
    tracr, tokenizer = load_tracr(FIXTURES / name)
    model = CircuitModel(tracr, tokenizer)
    n = tracr.config.max_seq_len
    ids = torch.tensor([[tokenizer.bos_token_id] + [tokenizer.bos_token_id + 1] * (n - 1)])
    gen = torch.Generator().manual_seed(0)
    body = [
        i for i, t in enumerate(tokenizer.vocab) if t not in (tracr.config.bos, tracr.config.pad)
    ]
    ids[0, 1:] = torch.tensor(body)[torch.randint(len(body), (n - 1,), generator=gen)]
    expected = tracr(ids)
    got = model.logits(ids, ablation="zero")
    torch.testing.assert_close(
        got, expected, atol=1e-3 * (1 + expected.abs().max().item()), rtol=1e-4
    )
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
