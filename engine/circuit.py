"""Circuits: a set of kept edges of a model's graph, and how to cut one from per-edge scores.

Every method ends the same way: a score per edge (Edge Pruning's log_alphas, EAP's gradients, ...)
becomes a binary circuit of a requested size. Edges that lie on no path from an embedding to
``logits`` change nothing (a writer nothing reaches only reproduces its ablated value; a writer whose
output reaches nothing is never read), so they are dropped and do not count towards the size. The
size is hit by bisection on how many top-scored edges to take: adding an edge never removes a path,
so the number of live edges grows with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph


@dataclass
class Circuit:
    """A binary circuit: the kept edges with their scores, the nodes they touch, and provenance.

    ``target`` is the size that was asked for, in the API's names (``{"edge_count": k}``,
    ``{"edge_sparsity": s}``, ``{"acdc_threshold": t}`` or ``{"expected": True}``: a circuit
    exported by the library and by the service has one schema), ``settings`` the method's
    options, ``provenance`` the data it came from (dataset name, content hash, seed ...),
    ``metrics`` whatever evaluation was run on it.
    """

    model: str
    method: str
    edges: list[str]
    edge_scores: dict[str, float]
    nodes: list[str]
    total_edge_count: int
    target: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def edge_count(self) -> int:
        return len(self.edges)

    @property
    def edge_sparsity(self) -> float:
        """Fraction of the graph's edges left out."""
        return 1.0 - len(self.edges) / self.total_edge_count if self.total_edge_count else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        """Inverse of ``to_dict``; InvalidArgument names the first missing or malformed field."""
        if not isinstance(data, dict):
            raise InvalidArgument("a circuit must be a JSON object", field="circuit")
        names = {f.name for f in dataclasses.fields(cls)}
        if "n_edges_total" in data and "total_edge_count" not in data:  # earlier versions' name
            data = {**data, "total_edge_count": data["n_edges_total"]}
        for required in ("model", "method", "edges", "total_edge_count"):
            if required not in data:
                raise InvalidArgument(f"circuit has no {required!r}", field=f"circuit.{required}")
        if not isinstance(data["edges"], list) or not all(isinstance(e, str) for e in data["edges"]):
            raise InvalidArgument("circuit.edges must be a list of edge names", field="circuit.edges")
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("edge_scores", {})
        values.setdefault("nodes", nodes_of_edges(values["edges"]))
        return cls(**values)

    def edge_mask(self, graph: Graph) -> torch.Tensor:
        """1.0 for every edge in the circuit, in graph order: FloatTensor [E]."""
        _check_graph(self, graph)
        mask = torch.zeros(graph.n_edges)  # [E]
        index = [graph.edge_index(e) for e in self.edges]
        mask[torch.tensor(index, dtype=torch.long)] = 1.0
        return mask

    def node_mask(self, graph: Graph) -> torch.Tensor:
        """1.0 for every writer the circuit keeps, in graph order: FloatTensor [W]."""
        _check_graph(self, graph)
        kept = set(self.nodes)
        return torch.tensor([1.0 if w in kept else 0.0 for w in graph.writers])  # [W]


def _check_graph(circuit: Circuit, graph: Graph) -> None:
    if circuit.total_edge_count != graph.n_edges:
        raise InvalidArgument(
            f"circuit was found on a graph of {circuit.total_edge_count} edges, this model has "
            f"{graph.n_edges}",
            field="circuit",
        )


def nodes_of_edges(edges: list[str], graph: Graph | None = None) -> list[str]:
    """The nodes the edges touch: their writers and the nodes their readers feed.

    In graph order when ``graph`` is given (a KV reader then counts for every head of its group),
    otherwise in first-seen order with a KV reader counting for its own head index.
    """
    seen: dict[str, None] = {}
    for edge in edges:
        seen[edge.partition("->")[0]] = None
    for edge in edges:
        reader = edge.partition("->")[2]
        if graph is not None:
            seen.update(dict.fromkeys(graph.reader_heads(reader)))
        else:
            seen[reader[:-2] if reader.endswith((".q", ".k", ".v")) else reader] = None
    if graph is None:
        return list(seen)
    order = {name: i for i, name in enumerate(graph.writers + ("logits",))}
    return sorted(seen, key=lambda n: order.get(n, len(order)))


# ---- paths ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _topology(graph: Graph) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """(edge offsets [R+1], readers feeding each writer, first reader that sees each writer [W])."""
    offsets = np.asarray(graph.reader_offsets)
    feeds: list[list[int]] = [[] for _ in graph.writers]
    for r, reader in enumerate(graph.readers):
        if reader == "logits":
            continue
        for node in graph.reader_heads(reader):
            feeds[graph.writer_index(node)].append(r)
    n_up = np.asarray(graph.n_upstream)
    first_reader = np.searchsorted(n_up, np.arange(graph.n_writers), side="right")  # [W]
    return offsets, feeds, first_reader


def out_edges(graph: Graph, writer: int) -> np.ndarray:
    """Indices of every edge leaving writer ``writer`` (into the readers that see it): [n]."""
    offsets, _, first_reader = _topology(graph)
    return offsets[first_reader[writer] : graph.n_readers] + writer


def live_edges(
    graph: Graph, keep: torch.Tensor, node_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The kept edges that lie on a path embedding -> ... -> logits of kept edges and nodes.

    keep: BoolTensor [E]; node_keep: BoolTensor [W] or None (every node kept). Returns BoolTensor [E].
    """
    offsets, feeds, first_reader = _topology(graph)
    kept = keep.detach().cpu().numpy().astype(bool)  # [E]
    nodes = (
        np.ones(graph.n_writers, dtype=bool)
        if node_keep is None
        else node_keep.detach().cpu().numpy().astype(bool)
    )  # [W]
    n_up = graph.n_upstream

    # Forward: a writer is reached when a kept edge from a reached writer enters one of its readers.
    reached = np.zeros(graph.n_writers, dtype=bool)  # [W]
    reached[: graph.n_embed] = nodes[: graph.n_embed]
    for w in range(graph.n_embed, graph.n_writers):
        reached[w] = nodes[w] and any(
            (kept[offsets[r] : offsets[r] + n_up[r]] & reached[: n_up[r]]).any() for r in feeds[w]
        )

    # Backward: a reader is useful when it feeds a useful node; a writer is useful when a kept
    # edge leaves it into a useful reader. Readers feed only writers downstream of their inputs.
    useful_reader = np.zeros(graph.n_readers, dtype=bool)  # [R]
    useful_reader[-1] = True  # logits
    for w in range(graph.n_writers - 1, -1, -1):
        readers = slice(first_reader[w], graph.n_readers)
        useful = nodes[w] and bool((kept[out_edges(graph, w)] & useful_reader[readers]).any())
        if useful:
            useful_reader[feeds[w]] = True
        if not useful:
            nodes[w] = False  # a useless writer's out-edges are dead too

    edge_writer = graph.edge_writer.numpy()
    edge_reader = graph.edge_reader.numpy()
    live = kept & reached[edge_writer] & nodes[edge_writer] & useful_reader[edge_reader]
    return torch.from_numpy(live)


def effective_sparsity(
    graph: Graph, keep: torch.Tensor, node_keep: torch.Tensor | None = None
) -> float:
    """Sparsity counting only live edges (dead writers' edges count as removed)."""
    return 1.0 - float(live_edges(graph, keep, node_keep).sum()) / graph.n_edges


# ---- sizes and thresholds ------------------------------------------------------------------------


def size_target(edge_count: int | None, edge_sparsity: float | None) -> dict[str, Any]:
    """A requested size as a circuit's ``target``, in the API's names."""
    return {"edge_count": edge_count} if edge_count is not None else {"edge_sparsity": edge_sparsity}


def requested_edges(
    graph: Graph, *, edge_count: int | None = None, edge_sparsity: float | None = None
) -> int | None:
    """The edge count asked for by ``edge_count`` or ``edge_sparsity`` (at most one), or None."""
    if edge_count is not None and edge_sparsity is not None:
        raise InvalidArgument("give edge_count or edge_sparsity, not both", field="edge_count")
    if edge_count is not None:
        if isinstance(edge_count, bool) or not isinstance(edge_count, int) or edge_count < 0:
            raise InvalidArgument(f"edge_count must be an integer >= 0, got {edge_count!r}",
                                  field="edge_count")
        if edge_count > graph.n_edges:
            raise InvalidArgument(
                f"edge_count {edge_count} exceeds the graph's {graph.n_edges} edges",
                field="edge_count",
            )
        return edge_count
    if edge_sparsity is not None:
        s = edge_sparsity
        if not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0 or math.isnan(s):
            raise InvalidArgument(f"edge_sparsity must be in [0, 1], got {s!r}", field="edge_sparsity")
        return round((1.0 - s) * graph.n_edges)
    return None


def top_edges(graph: Graph, scores: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` top-scored edges (ties broken by graph order): BoolTensor [E]."""
    order = torch.argsort(-scores.detach().float().cpu(), stable=True)  # [E]
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)  # [E]
    keep[order[:m]] = True
    return keep


def select_top(
    graph: Graph, scores: torch.Tensor, edge_count: int, *, prune_dead: bool = True
) -> torch.Tensor:
    """The largest top-scored edge set with at most ``edge_count`` live edges: BoolTensor [E].

    scores: [E], higher is more important (ties broken by graph order). With ``prune_dead`` the dead
    edges are dropped and the cut is found by bisection on the number of top edges taken, then
    topped up to exactly ``edge_count`` where the graph allows (see ``_fill``).
    """
    if scores.shape != (graph.n_edges,):
        raise InvalidArgument(
            f"scores must have shape [{graph.n_edges}], got {list(scores.shape)}", field="scores"
        )
    def top(m: int) -> torch.Tensor:
        return top_edges(graph, scores, m)

    if not prune_dead:
        return top(edge_count)
    lo, hi = 0, graph.n_edges  # live(top(lo)) <= edge_count always holds for lo = 0
    if int(live_edges(graph, top(hi)).sum()) <= edge_count:
        return live_edges(graph, top(hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if int(live_edges(graph, top(mid)).sum()) <= edge_count:
            lo = mid
        else:
            hi = mid
    return _fill(graph, scores, live_edges(graph, top(lo)), edge_count)


def _fill(graph: Graph, scores: torch.Tensor, live: torch.Tensor, edge_count: int) -> torch.Tensor:
    """``live`` [E] plus the best-scored edges that each add exactly one live edge, up to
    ``edge_count`` in all: BoolTensor [E].

    The next edge of the ranking can bring a whole dead branch to life at once and overshoot, so
    the bisection's cut often stops short of the size (by a few edges, sometimes by many). An edge from a live writer into a reader whose nodes are all live (or ``logits``)
    changes no node's status, so it adds exactly itself; taking such edges in score order reaches
    the size exactly without leaving the ranking for more than the last few edges.
    """
    missing = edge_count - int(live.sum())
    if missing <= 0 or not bool(live.any()):
        return live
    _, feeds, _ = _topology(graph)
    live_np = live.numpy()
    edge_writer, edge_reader = graph.edge_writer.numpy(), graph.edge_reader.numpy()
    live_writer = np.zeros(graph.n_writers, dtype=bool)  # [W]
    live_writer[edge_writer[live_np]] = True
    settled_reader = np.ones(graph.n_readers, dtype=bool)  # [R]; logits is always settled
    for w, readers in enumerate(feeds):
        if not live_writer[w]:
            settled_reader[readers] = False  # a KV reader needs every head of its group live
    candidate = ~live_np & live_writer[edge_writer] & settled_reader[edge_reader]  # [E]
    order = torch.argsort(-scores.detach().float().cpu(), stable=True).numpy()  # [E]
    chosen = order[candidate[order]][:missing]
    filled = live.clone()
    filled[torch.from_numpy(chosen)] = True
    return filled


def build_circuit(
    graph: Graph,
    scores: torch.Tensor,
    *,
    edge_count: int,
    model: str,
    method: str,
    target: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    prune_dead: bool = True,
) -> Circuit:
    """The circuit of the top ``edge_count`` live edges by ``scores`` [E] (see ``select_top``)."""
    keep = select_top(graph, scores, edge_count, prune_dead=prune_dead)  # [E]
    return circuit_from_keep(graph, keep, scores, model=model, method=method,
                             target=target or {"edge_count": edge_count}, settings=settings,
                             provenance=provenance)


def circuit_from_keep(
    graph: Graph,
    keep: torch.Tensor,
    scores: torch.Tensor,
    *,
    model: str,
    method: str,
    target: dict[str, Any],
    settings: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Circuit:
    """The circuit of the edges in ``keep`` [E] (bool), recording their ``scores`` [E]."""
    index = torch.nonzero(keep).flatten().tolist()
    values = scores.detach().float().cpu()
    edges = [graph.edges[i] for i in index]
    return Circuit(
        model=model,
        method=method,
        edges=edges,
        edge_scores={graph.edges[i]: float(values[i]) for i in index},
        nodes=nodes_of_edges(edges, graph),
        total_edge_count=graph.n_edges,
        target=dict(target),
        settings=dict(settings or {}),
        # the graph's shape lets exports place GQA key/value readers without the model at hand
        provenance={"graph": graph_shape(graph), **(provenance or {})},
    )


def graph_shape(graph: Graph) -> dict[str, Any]:
    """The numbers that rebuild ``graph`` with :meth:`Graph.build`."""
    return {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_kv_heads": graph.n_kv_heads,
            "has_pos": graph.has_pos, "parallel_attn_mlp": graph.parallel_attn_mlp}
