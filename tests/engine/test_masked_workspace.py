"""The workspace that keeps the masked forward's big buffers between steps (engine/workspace.py).

Reusing memory must never change a result: a step on reused (and deliberately poisoned) buffers
equals a step on fresh ones, a graph kept alive across later forwards still backpropagates
correctly, and changing batch shapes neither breaks results nor lets idle memory pile up.
"""

from __future__ import annotations

import pytest
import torch

from edgeprune.engine._kernels import mask_gradient, widened
from edgeprune.engine.masked import CircuitModel, masked_forward
from edgeprune.engine.workspace import Loan, Workspace, row_stride
from tests.engine.masked_models import batch, tiny_models

MODELS = tiny_models()


def _masks(model: CircuitModel, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    edge = torch.rand(model.graph.n_edges, generator=gen, dtype=torch.float64).float()
    node = torch.rand(model.graph.n_writers, generator=gen, dtype=torch.float64).float()
    return edge.requires_grad_(), node.requires_grad_()


def _loss(model: CircuitModel, seed: int, T: int = 7, edge=None, node=None) -> torch.Tensor:
    ids, corrupted, mask = batch(seed, T=T)
    last = mask.sum(1) - 1
    return model.logits(
        ids, attention_mask=mask, corrupted_ids=corrupted, edge_mask=edge, node_mask=node,
        positions=last,
    ).log_softmax(-1).square().sum()


def _step(model: CircuitModel, seed: int, T: int = 7) -> tuple[float, torch.Tensor, torch.Tensor]:
    edge, node = _masks(model, seed)
    loss = _loss(model, seed, T, edge, node)
    loss.backward()
    return float(loss.detach()), edge.grad, node.grad


@pytest.fixture(params=["gpt2", "llama-gqa"])
def name(request) -> str:
    return request.param


def test_later_steps_reuse_every_buffer_and_agree_with_fresh_ones(name: str) -> None:
    model = CircuitModel(MODELS[name])
    first = _step(model, 1)
    allocated = model.workspace.allocations
    assert allocated > 0 and model.workspace.idle > 0
    for tensor in model.workspace._free:  # garbage in every idle buffer must not matter
        tensor.fill_(float("nan"))
    again = _step(model, 1)
    assert model.workspace.allocations == allocated  # nothing new: all reused
    assert again[0] == first[0]
    torch.testing.assert_close(again[1], first[1], rtol=0, atol=0)
    torch.testing.assert_close(again[2], first[2], rtol=0, atol=0)

    fresh = CircuitModel(MODELS[name])  # its own, empty workspace
    other = _step(fresh, 1)
    torch.testing.assert_close(other[1], first[1], rtol=0, atol=0)


def test_a_graph_kept_alive_is_not_overwritten_by_later_forwards(name: str) -> None:
    model = CircuitModel(MODELS[name])
    expected = [_step(CircuitModel(MODELS[name]), seed) for seed in (2, 3)]
    masks = [_masks(model, seed) for seed in (2, 3)]
    # two forwards before either backward: the second must not take the first one's buffers
    losses = [_loss(model, seed, 7, *m) for seed, m in zip((2, 3), masks, strict=True)]
    for loss in reversed(losses):
        loss.backward()
    for (edge, node), (_, e_edge, e_node) in zip(masks, expected, strict=True):
        torch.testing.assert_close(edge.grad, e_edge, rtol=0, atol=0)
        torch.testing.assert_close(node.grad, e_node, rtol=0, atol=0)


def test_changing_batch_shapes_stays_correct_and_bounded(name: str) -> None:
    model = CircuitModel(MODELS[name])
    for T in (5, 9, 6, 12, 7):
        got = _step(model, T, T=T)
        want = _step(CircuitModel(MODELS[name]), T, T=T)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    # idle tensors too small for a longer batch were dropped rather than kept alongside
    assert model.workspace.idle <= 16
    model.release_workspace()
    assert model.workspace.idle == 0
    _step(model, 1)  # and it fills again
    assert model.workspace.idle > 0


def test_no_grad_forwards_give_their_buffers_back_at_once(name: str) -> None:
    model = CircuitModel(MODELS[name])
    ids, corrupted, mask = batch(4)
    with torch.no_grad():
        a = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)
        allocated = model.workspace.allocations
        b = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)
    assert model.workspace.allocations == allocated
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lent_rows_are_padded_to_an_odd_number_of_cache_lines() -> None:
    workspace, owner = Workspace(), Loan()
    # SmolLM2 at 16 x 24 tokens: rows of 221,184 floats, 216 pages each
    t = workspace.lend(owner, (5, 16, 24, 576), torch.empty(()))
    assert t.shape == (5, 16, 24, 576) and t[1].is_contiguous()
    assert t.stride(0) >= 16 * 24 * 576 and (t.stride(0) * 4) % 128 == 64
    assert t[1:4].view(3, -1).stride() == (t.stride(0), 1)  # a matrix of padded rows
    for row, size in ((1, 4), (16, 4), (17, 4), (100, 2), (221_184, 4)):
        stride = row_stride(row, size)
        assert stride >= row and (stride * size) % 64 == 0 and (stride * size // 64) % 2 == 1


def test_padded_rows_give_the_results_of_unpadded_ones(name: str) -> None:
    # the workspace pads every lent buffer's rows, a forward without one does not
    model = CircuitModel(MODELS[name])
    ids, corrupted, mask = batch(5)
    ablated = model.ablation_outputs(corrupted, attention_mask=mask)
    edge, node = _masks(model, 5)
    index = (mask.sum(1) - 1) + torch.arange(ids.shape[0]) * ids.shape[1]
    results = []
    for workspace in (None, Workspace()):
        weights = model._edge_weights(edge, node)  # [E]
        logits, buf = masked_forward(
            model.adapter, model.graph, ids, mask.bool(), weights, ablated, index,
            workspace=workspace,
        )
        (grad,) = torch.autograd.grad(logits.log_softmax(-1).square().sum(), edge)
        assert buf.d.is_contiguous() == (workspace is None)
        results.append((logits, grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_mask_gradient_widens_gradient_rows_only_within_their_memory() -> None:
    # MKL is faster on a multiple of 8 rows: a run of rows whose memory goes on is read on to one,
    # and the extra rows' products are dropped whatever they hold
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(5, 40, generator=gen)  # [n, X]
    rows = torch.randn(16, 40, generator=gen)
    rows[11:] = float("nan")  # what follows the 11 rows read
    g = rows[:11]
    wide = widened(g, 16)
    assert wide.shape == (16, 40) and wide.data_ptr() == g.data_ptr()
    torch.testing.assert_close(mask_gradient(d, g), g @ d.T, rtol=1e-6, atol=1e-6)
    # no memory past the rows (the end of the storage) or rows not contiguous: unchanged
    tail = rows[5:11].clone()
    assert widened(tail, 8) is tail
    cols = rows.T[:9]  # [9, 16], rows strided by 1
    assert widened(cols, 16) is cols
