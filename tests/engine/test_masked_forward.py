"""The masked forward against Hugging Face and against a slow loop-by-loop reference."""

from __future__ import annotations

import pytest
import torch

from edgeprune.engine.masked import CircuitModel, masked_forward
from edgeprune.engine.reference import reference_run
from tests.engine.masked_models import (
    batch,
    check_all_masks_one_equal_hf,
    check_all_masks_zero_equal_corrupted,
    check_random_masks_match_reference,
    random_masks,
    tiny_models,
)

MODELS = tiny_models()


@pytest.fixture(params=sorted(MODELS), scope="module")
def model(request) -> CircuitModel:
    return CircuitModel(MODELS[request.param])


def test_rope_scaling_configs_are_really_scaled():
    assert MODELS["llama-rope-llama3-bias-untied"].model.rotary_emb.rope_type == "llama3"
    assert MODELS["llama-rope-linear"].model.rotary_emb.rope_type == "linear"
    assert MODELS["llama-rope-llama3-bias-untied"].lm_head.weight is not (
        MODELS["llama-rope-llama3-bias-untied"].model.embed_tokens.weight
    )


def test_all_masks_one_equals_hf(model):
    check_all_masks_one_equal_hf(model)


def test_all_masks_zero_equals_hf_on_corrupted_ids(model):
    check_all_masks_zero_equal_corrupted(model)


def test_positions_unembed_only_there(model):
    ids, corrupted, mask = batch(2)
    last = mask.sum(1) - 1  # [B]
    full = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)  # [B, T, V]
    at_last = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted, positions=last)
    assert at_last.shape == (3, model.vocab_size)
    torch.testing.assert_close(at_last, full[torch.arange(3), last])
    two = torch.stack([last, torch.zeros_like(last)], 1)  # [B, 2]
    at_two = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted, positions=two)
    assert at_two.shape == (3, 2, model.vocab_size)
    torch.testing.assert_close(at_two[:, 0], at_last)
    # the plain model unembeds at the positions only, with the same logits there
    reference = model.reference_logits(ids, attention_mask=mask)  # [B, T, V]
    at_two = model.reference_logits(ids, attention_mask=mask, positions=two)  # [B, 2, V]
    torch.testing.assert_close(at_two[:, 1], reference[:, 0])
    torch.testing.assert_close(at_two[:, 0], reference[torch.arange(3), last])
    torch.testing.assert_close(
        model.reference_logits(ids, attention_mask=mask, positions=last), at_two[:, 0]
    )



@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_answer_positions_give_the_full_forward_at_those_rows(model, ablation):
    """With positions, the last layer's queries, heads and MLP run at those rows alone (the rest
    of the batch never reaches the logits): logits and mask gradients equal the full forward's."""
    ids, corrupted, mask = batch(4)
    last = mask.sum(1) - 1  # [B]
    # a row twice, a first token (which attends to itself alone) and rows of unequal lengths
    positions = torch.stack([last, torch.zeros_like(last), last, last.clamp(max=2)], 1)  # [B, 4]
    gen = torch.Generator().manual_seed(4)
    g = model.graph
    edge = torch.rand(g.n_edges, generator=gen).requires_grad_()
    node = torch.rand(g.n_writers, generator=gen).requires_grad_()
    proj = torch.randn(3, 4, model.vocab_size, generator=gen)
    results = []
    for where in (None, positions):
        out = model.logits(
            ids, attention_mask=mask, corrupted_ids=corrupted, edge_mask=edge, node_mask=node,
            ablation=ablation, positions=where,
        )  # [B, T, V] | [B, 4, V]
        if where is None:
            out = out[torch.arange(3)[:, None], positions]  # [B, 4, V]
        grads = torch.autograd.grad((out * proj).sum(), (edge, node))
        results.append((out, *grads))
    (full, full_edge, full_node), (at, at_edge, at_node) = results
    torch.testing.assert_close(at, full, rtol=1e-5, atol=1e-5)
    # The two paths sum the same products in another order; fp32 rounding scales with the
    # largest gradient, so the absolute tolerance does too.
    for got, want in ((at_edge, full_edge), (at_node, full_node)):
        scale = float(want.abs().max().clamp(min=1))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    last_layer = g.layer_start(g.n_layers - 1)  # the last layer's writers got gradient too
    assert full_node[last_layer:].abs().min() > 0

def test_padding_does_not_leak(model):
    """A row's logits do not depend on what sits in its padding or on the other rows."""
    ids, corrupted, mask = batch(3)
    out = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted, ablation="corrupted")
    ids2 = ids.clone()
    ids2[mask == 0] = 0
    out2 = model.logits(ids2, attention_mask=mask, corrupted_ids=corrupted)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], out2[valid])
    alone = model.logits(ids[2:, :3], corrupted_ids=corrupted[2:, :3])
    torch.testing.assert_close(out[2, :3], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_random_masks_match_slow_reference(model, ablation):
    check_random_masks_match_reference(model, ablation)


def test_ablation_outputs_are_writer_outputs(model):
    ids, _, mask = batch(6)
    valid = mask.bool()
    _, outs = reference_run(model.module, ids, valid)
    got = model.ablation_outputs(ids, attention_mask=mask)  # [W, B, T, D]
    assert got.shape == (model.graph.n_writers, 3, 7, model.d_model)
    for i, w in enumerate(model.graph.writers):
        assert (got[i] - outs[w])[valid].abs().max() <= 1e-4, w
    # the masked forward with every edge kept writes the same outputs (zero ablation: d = y)
    ones = torch.ones(model.graph.n_edges)
    _, buf = masked_forward(model.adapter, model.graph, ids, valid, ones, None, logits=False)
    assert (buf.d - got)[:, valid].abs().max() <= 1e-5
    mean = model.mean_ablation(ids, attention_mask=mask)  # [W, 1, T, D]
    assert mean.shape == (model.graph.n_writers, 1, 7, model.d_model)
    torch.testing.assert_close(mean[:, 0, -1], got[:, 0, -1])  # only row 0 is unpadded at T-1
    torch.testing.assert_close(mean[:, 0, 0], got[:, :, 0].mean(1))


def test_precomputed_ablated_equals_corrupted_ids(model):
    ids, corrupted, mask = batch(7)
    edge, node, _, _ = random_masks(model, 8)
    ablated = model.ablation_outputs(corrupted, attention_mask=mask)
    a = model.logits(
        ids, attention_mask=mask, corrupted_ids=corrupted, edge_mask=edge, node_mask=node
    )
    b = model.logits(ids, attention_mask=mask, ablated=ablated, edge_mask=edge, node_mask=node)
    torch.testing.assert_close(a, b)
    mean = model.mean_ablation(corrupted, attention_mask=mask)
    c = model.logits(ids, attention_mask=mask, ablated=mean, edge_mask=edge, ablation="mean")
    d = model.logits(
        ids, attention_mask=mask, corrupted_ids=corrupted, edge_mask=edge, ablation="mean"
    )
    torch.testing.assert_close(c, d)


def test_dict_masks_by_name(model):
    ids, corrupted, mask = batch(9)
    g = model.graph
    names = [g.edges[0], g.edges[g.n_edges // 2], g.edges[-1]]
    dense = torch.ones(g.n_edges)
    node_dense = torch.ones(g.n_writers)
    for i, name in enumerate(names):
        dense[g.edge_index(name)] = 0.25 * i
    node_dense[g.writer_index("m0")] = 0.5
    by_name = model.logits(
        ids,
        attention_mask=mask,
        corrupted_ids=corrupted,
        edge_mask={n: 0.25 * i for i, n in enumerate(names)},
        node_mask={"m0": torch.tensor(0.5)},
    )
    dense_out = model.logits(
        ids, attention_mask=mask, corrupted_ids=corrupted, edge_mask=dense, node_mask=node_dense
    )
    torch.testing.assert_close(by_name, dense_out)
    assert not torch.allclose(
        by_name, model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)
    )


def test_frozen_weights_used_in_place(model):
    assert all(not p.requires_grad for p in model.module.parameters())
    assert not model.module.training
    assert list(model.parameters()) == list(model.module.parameters())


def test_deep_model_exercises_mixing_blocks():
    from edgeprune.engine.masked import block_layers

    assert block_layers(MODELS["gpt2-deep"].config.n_layer) == 2
    assert block_layers(2) == 1 and block_layers(30) == 5
