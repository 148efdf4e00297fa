"""Edge Pruning recovers minimal, exact circuits of compiled Tracr programs.

The recipe (``RECIPE``, as docs/engine.md gives it): zero ablation, masks warm-started from EAP-IG,
a short run, and no size asked but ``kl_tolerance``: the smallest top-ranked circuit within the
tolerance, which the minimal-circuit pass (engine/refine.py) then strips of every edge the loss
does not need. The programs: ``reverse`` (length and a reversal head), ``xproportion``
(numerical), ``pattern`` (two heads in one layer), and three whose saturating components defeat
the ranking alone: ``hist`` (a counting SelectorWidth), ``sort`` (a lookup MLP, a count of smaller
keys and a moving head) and ``lookup`` (two chained lookup MLPs, a two-head layer, a combining MLP).

On every input of the program's task (every sequence "BOS x1 .. xn" over its vocabulary, answer
positions as ``tracr_<program>`` has them) the circuit must (a) reproduce the full model (argmax at
every answer position; numerical outputs within 1e-4), (b) hold no edge whose writer and reader
share no residual dimension (from the Tracr weights: a writer's nonzero output columns, a
reader's nonzero input rows), (c) keep every necessary edge (one whose removal alone from the full
model breaks (a)), and (d) be minimal: removing any one of its edges raises the loss above the
tolerance.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from edgeprune.engine.cache import ActivationCache
from edgeprune.engine.circuit import live_edges, top_edges
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.prune import PruneConfig, prune, smallest_faithful
from edgeprune.engine.refine import MAX_FORWARDS, minimal_circuit
from edgeprune.engine.tasks import Example, TaskDataset, from_examples
from edgeprune.engine.tasks.registry import TRACR_TASK

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tracr"
PROGRAMS = ("reverse", "xproportion", "pattern", "hist", "sort", "lookup")
TOLERANCE = 1e-5
# Every setting spelled out, so that changes to the library defaults do not change the recipe.
RECIPE = {"steps": 100, "batch_size": 32, "edge_lr": 0.05, "node_lr": 0.05, "lambda_lr": 0.05,
          "warm_start": "eap_ig", "init_mean": 10.0, "node_masks": True, "seed": 0,
          "ablation": "zero", "kl_tolerance": TOLERANCE}


def load(program: str) -> CircuitModel:
    return load_model(f"tracr:{FIXTURES / program}")


def loss_name(model: CircuitModel) -> str:
    return "mse" if model.module.config.output_encoding == "numerical" else "kl"


def every_input(model: CircuitModel) -> TaskDataset:
    """Every sequence "BOS x1 .. xn" of the program's input vocabulary, n = 1 .. max length, with
    the answer positions of a ``tracr_<program>`` task (every position after BOS)."""
    config = model.module.config
    vocab = [v for v in config.input_vocab if v not in (config.bos, config.pad)]
    texts = [" ".join([config.bos, *seq]) for n in range(1, config.max_seq_len)
             for seq in itertools.product(vocab, repeat=n)]
    examples = [Example(clean=t, corrupted=t) for t in texts]
    return from_examples(examples, model.tokenizer, name=f"tracr_{config.name}",
                         metric=TRACR_TASK.metric, all_positions=TRACR_TASK.all_positions,
                         skip_first=TRACR_TASK.skip_first)


def residual_spaces(model: CircuitModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(writer -> residual dims it writes [D] bool, reader -> residual dims it reads [D] bool)."""
    t = model.module
    K = t.config.key_size

    def used(w: torch.Tensor, dim: int) -> torch.Tensor:
        return (w != 0).any(dim)

    writes = {"tok": used(t.tok_embed.weight, 0), "pos": used(t.pos_embed.weight, 0)}
    reads = {"logits": used(t.unembed.weight, 0)}  # unembed.weight [V, D]
    for layer, block in enumerate(t.layers):
        for h in range(t.config.num_heads):
            cols = slice(h * K, (h + 1) * K)
            writes[f"a{layer}.h{h}"] = used(block.attn.o.weight[:, cols], 1)  # o.weight [D, H*K]
            for kind in "qkv":
                reads[f"a{layer}.h{h}.{kind}"] = used(getattr(block.attn, kind).weight[cols], 0)
        writes[f"m{layer}"] = used(block.mlp.fc_out.weight, 1)  # fc_out.weight [D, hidden]
        reads[f"m{layer}"] = used(block.mlp.fc_in.weight, 0)  # fc_in.weight [hidden, D]
    return writes, reads


def carries_nothing(model: CircuitModel, edges: list[str]) -> list[str]:
    """The edges whose writer writes no residual dimension their reader reads."""
    writes, reads = residual_spaces(model)
    out = []
    for edge in edges:
        writer, reader = edge.split("->")
        if not bool((writes[writer] & reads[reader]).any()):
            out.append(edge)
    return out


class Judge:
    """The full model's answers on a dataset, and the checks a circuit (a bool mask [E]) must pass."""

    def __init__(self, model: CircuitModel, data: TaskDataset) -> None:
        self.model, self.data = model, data
        self.numerical = model.module.config.output_encoding == "numerical"
        self.kwargs = {"attention_mask": data.attention_mask, "positions": data.positions}
        self.real = data.answer_mask  # [N, P]
        with torch.no_grad():
            self.full = model.reference_logits(data.clean_ids, **self.kwargs)  # [N, P, V]

    def logits(self, keep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.logits(self.data.clean_ids, **self.kwargs, edge_mask=keep.float(),
                                     ablation="zero")  # [N, P, V]

    def exact(self, keep: torch.Tensor) -> bool:
        found, real = self.logits(keep), self.real
        if self.numerical:
            return bool(torch.allclose(found[real], self.full[real], atol=1e-4))
        return bool(torch.equal(found.argmax(-1)[real], self.full.argmax(-1)[real]))

    def loss(self, keep: torch.Tensor) -> float:
        """The training loss over every answer position of the dataset."""
        found, real = self.logits(keep), self.real
        if self.numerical:
            return float((found - self.full).pow(2).mean(-1)[real].mean())
        log_p = torch.log_softmax(self.full, -1)  # [N, P, V]
        kl = (log_p.exp() * (log_p - torch.log_softmax(found, -1))).sum(-1)  # [N, P]
        return float(kl[real].mean())

    def necessary(self) -> list[int]:
        """Edges whose removal alone from the full model breaks exactness."""
        E = self.model.graph.n_edges
        out = []
        for e in range(E):
            keep = torch.ones(E, dtype=torch.bool)  # [E]
            keep[e] = False
            if not self.exact(keep):
                out.append(e)
        return out


@pytest.mark.parametrize("program", PROGRAMS)
def test_edge_pruning_recovers_a_minimal_exact_circuit(program: str) -> None:
    model = load(program)
    graph = model.graph
    data = every_input(model)
    judge = Judge(model, data)
    circuit = prune(model, data, PruneConfig(**RECIPE, loss=loss_name(model))).circuit
    keep = circuit.edge_mask(graph).bool()  # [E]

    assert judge.exact(keep)  # (a)
    assert carries_nothing(model, circuit.edges) == []  # (b)
    necessary = judge.necessary()
    assert necessary, "every program has edges it cannot do without"
    assert [graph.edges[e] for e in necessary if not keep[e]] == []  # (c)
    for e in torch.nonzero(keep).flatten().tolist():  # (d)
        without = keep.clone()
        without[e] = False
        assert judge.loss(without) > TOLERANCE, graph.edges[e]
    assert bool(torch.equal(live_edges(graph, keep), keep))  # no dead edges


# ---- the minimal-circuit pass on its own -----------------------------------------------------


@pytest.fixture(scope="module")
def lookup() -> tuple[CircuitModel, TaskDataset, ActivationCache]:
    model = load("lookup")
    data = every_input(model)
    return model, data, ActivationCache(model, data, ablation="zero")


def test_the_cut_alone_keeps_edges_that_carry_nothing(lookup) -> None:
    """What the pass is for: with a flat ranking (masks that fell together) the smallest faithful
    cut must take every edge, most of which carry nothing."""
    model, _, cache = lookup
    flat = torch.zeros(model.graph.n_edges)  # [E]
    cut = smallest_faithful(cache, flat, "kl", TOLERANCE)  # [E]
    edges = [model.graph.edges[e] for e in torch.nonzero(cut).flatten().tolist()]
    assert len(carries_nothing(model, edges)) > len(edges) // 2


def test_minimal_circuit_from_a_flat_ranking(lookup) -> None:
    model, data, cache = lookup
    graph, judge = model.graph, Judge(model, data)
    everything = torch.ones(graph.n_edges, dtype=torch.bool)  # [E]
    result = minimal_circuit(cache, everything, torch.zeros(graph.n_edges), "kl", TOLERANCE)
    edges = [graph.edges[e] for e in torch.nonzero(result.keep).flatten().tolist()]

    assert not result.budget_exhausted and not result.stopped
    assert 0 < result.forwards <= MAX_FORWARDS
    assert result.passes >= 2  # the last pass tried every kept edge alone and removed none
    assert result.removed == graph.n_edges - len(edges)
    assert result.loss <= TOLERANCE and judge.exact(result.keep)
    assert carries_nothing(model, edges) == []
    assert [graph.edges[e] for e in judge.necessary() if not result.keep[e]] == []


def test_minimal_circuit_stays_within_its_budget_and_stops(lookup) -> None:
    model, data, cache = lookup
    graph, judge = model.graph, Judge(model, data)
    n_batches = -(-len(data) // 32)
    everything = torch.ones(graph.n_edges, dtype=torch.bool)  # [E]
    flat = torch.zeros(graph.n_edges)  # [E]

    short = minimal_circuit(cache, everything, flat, "kl", TOLERANCE, max_forwards=4 * n_batches)
    assert short.budget_exhausted and short.forwards <= 4 * n_batches
    assert 0 < short.removed < graph.n_edges and judge.exact(short.keep)

    polls = []
    stopped = minimal_circuit(cache, everything, flat, "kl", TOLERANCE,
                              should_stop=lambda: polls.append(1) or len(polls) > 2)
    assert stopped.stopped and stopped.trials == 2 and judge.exact(stopped.keep)


def test_a_circuit_above_the_tolerance_is_returned_as_it_is(lookup) -> None:
    model, _, cache = lookup
    graph = model.graph
    one = top_edges(graph, torch.arange(graph.n_edges, dtype=torch.float32), 1)  # [E]: logits' last
    result = minimal_circuit(cache, one, torch.zeros(graph.n_edges), "kl", TOLERANCE)
    assert result.loss > TOLERANCE and result.trials == 0
    assert bool(torch.equal(result.keep, live_edges(graph, one)))
