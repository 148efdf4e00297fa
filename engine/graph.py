"""The edge graph of a transformer's disentangled residual stream.

Writers (nodes that add to the residual stream), in this order::

    "tok", ["pos"], then per layer l: "a{l}.h0" .. "a{l}.h{H-1}", "m{l}"

Readers (inputs that read from it), in this order::

    per layer l: "a{l}.h{h}.q" for h < H, "a{l}.h{g}.k" for g < KV, "a{l}.h{g}.v" for g < KV, "m{l}"
    finally "logits"

Every reader's upstream writers are a prefix ``writers[:n_upstream[r]]``: the attention readers of
layer l see the embeddings and every head and MLP of layers < l, the MLP of layer l also sees the
heads of layer l, and ``logits`` sees every writer. In a model whose layers run attention and MLP
in parallel on the layer's input (``parallel_attn_mlp``: GPT-NeoX / Pythia), the MLP of layer l
sees what its layer's attention sees and not its heads: those edges do not exist. Edges are named
``"{writer}->{reader}"`` and are listed reader-major: ``for r in readers: for w in
writers[:n_upstream[r]]``. So the edges into one reader, and into all readers of a layer's
attention (which share one prefix), are contiguous.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from edgeprune.engine.errors import InvalidArgument

_READER = re.compile(r"^a(\d+)\.h(\d+)\.([qkv])$")


@dataclass(frozen=True)
class ReaderGroup:
    """Readers that share one upstream prefix, and so one mixing matmul.

    ``readers`` is the slice of ``Graph.readers``; ``edges`` the slice of ``Graph.edges`` (reader-major,
    ``len(readers) * n_upstream`` edges); ``n_upstream`` the length of the shared writer prefix.
    """

    readers: slice
    edges: slice
    n_upstream: int


@dataclass(frozen=True)
class Graph:
    """Writers, readers and edges of one model, in a stable documented order (see the module doc)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_pos: bool
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    n_upstream: tuple[int, ...]  # per reader: it reads writers[:n_upstream[r]]
    reader_offsets: tuple[int, ...]  # per reader: index of its first edge; len = n_readers + 1
    parallel_attn_mlp: bool = False  # MLP l reads the layer's input, not layer l's heads

    @classmethod
    def build(
        cls, n_layers: int, n_heads: int, n_kv_heads: int, has_pos: bool,
        parallel_attn_mlp: bool = False,
    ) -> Graph:
        """The graph of a model with ``n_layers`` layers of ``n_heads`` query / ``n_kv_heads`` KV heads
        (``parallel_attn_mlp``: every layer's MLP reads the layer's input, as its attention does)."""
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise InvalidArgument(
                f"bad graph shape: {n_layers} layers, {n_heads} heads, {n_kv_heads} KV heads",
                field="model",
            )
        writers = ["tok"] + (["pos"] if has_pos else [])
        readers: list[str] = []
        n_upstream: list[int] = []
        for layer in range(n_layers):
            attn = [f"a{layer}.h{h}.q" for h in range(n_heads)]
            attn += [f"a{layer}.h{g}.{kind}" for kind in "kv" for g in range(n_kv_heads)]
            readers += attn
            n_upstream += [len(writers)] * len(attn)
            layer_input = len(writers)
            writers += [f"a{layer}.h{h}" for h in range(n_heads)]
            readers.append(f"m{layer}")
            n_upstream.append(layer_input if parallel_attn_mlp else len(writers))
            writers.append(f"m{layer}")
        readers.append("logits")
        n_upstream.append(len(writers))
        offsets = [0]
        for n in n_upstream:
            offsets.append(offsets[-1] + n)
        return cls(
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            has_pos=has_pos,
            writers=tuple(writers),
            readers=tuple(readers),
            n_upstream=tuple(n_upstream),
            reader_offsets=tuple(offsets),
            parallel_attn_mlp=parallel_attn_mlp,
        )

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_nodes(self) -> int:
        """The nodes a circuit can keep: every writer, and ``logits``."""
        return len(self.writers) + 1

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    @property
    def n_edges(self) -> int:
        return self.reader_offsets[-1]

    @property
    def n_embed(self) -> int:
        """Number of embedding writers ("tok" and, where the model has one, "pos")."""
        return 2 if self.has_pos else 1

    # ---- names -------------------------------------------------------------------------------

    @functools.cached_property
    def edges(self) -> tuple[str, ...]:
        """Every edge name, reader-major (see the module doc)."""
        return tuple(
            f"{w}->{r}"
            for r, n in zip(self.readers, self.n_upstream, strict=True)
            for w in self.writers[:n]
        )

    @functools.cached_property
    def _writer_pos(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.writers)}

    @functools.cached_property
    def _reader_pos(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.readers)}

    def writer_index(self, name: str) -> int:
        """Position of writer ``name`` in ``writers``; InvalidArgument if there is none."""
        try:
            return self._writer_pos[name]
        except KeyError:
            raise InvalidArgument(f"unknown node {name!r}", field="node_mask") from None

    def reader_index(self, name: str) -> int:
        """Position of reader ``name`` in ``readers``; InvalidArgument if there is none."""
        try:
            return self._reader_pos[name]
        except KeyError:
            raise InvalidArgument(f"unknown reader {name!r}", field="edge_mask") from None

    def edge_index(self, name: str) -> int:
        """Position of edge ``"writer->reader"`` in ``edges``; InvalidArgument if there is none."""
        writer, sep, reader = name.partition("->")
        w = self._writer_pos.get(writer)
        r = self._reader_pos.get(reader)
        if not sep or w is None or r is None or w >= self.n_upstream[r]:
            raise InvalidArgument(f"unknown edge {name!r}", field="edge_mask")
        return self.reader_offsets[r] + w

    @functools.cached_property
    def edge_writer(self) -> torch.Tensor:
        """Writer index of every edge, LongTensor [E]."""
        return torch.cat([torch.arange(n) for n in self.n_upstream])  # [E]

    @functools.cached_property
    def edge_reader(self) -> torch.Tensor:
        """Reader index of every edge, LongTensor [E]."""
        counts = torch.tensor(self.n_upstream)  # [R]
        return torch.repeat_interleave(torch.arange(self.n_readers), counts)  # [E]

    def reader_node(self, reader: str) -> str:
        """The node a reader feeds: "a3.h1.q" -> "a3.h1"; "m2" -> "m2"; "logits" -> "logits".

        A KV reader "a3.h{g}.k" feeds KV group g, i.e. the query heads g*H/KV .. (g+1)*H/KV - 1; it
        is named after the first of them (with H == KV, simply head g).
        """
        self.reader_index(reader)
        match = _READER.match(reader)
        if match is None:
            return reader
        layer, head, kind = int(match[1]), int(match[2]), match[3]
        if kind != "q":
            head *= self.n_heads // self.n_kv_heads
        return f"a{layer}.h{head}"

    def reader_heads(self, reader: str) -> tuple[str, ...]:
        """Every head node a reader feeds (one for q and MLP readers, the KV group for k and v)."""
        match = _READER.match(reader)
        if match is None or match[3] == "q":
            return (self.reader_node(reader),)
        group = self.n_heads // self.n_kv_heads
        layer, g = int(match[1]), int(match[2])
        return tuple(f"a{layer}.h{h}" for h in range(g * group, (g + 1) * group))

    # ---- layout for the masked forward -------------------------------------------------------

    def layer_start(self, layer: int) -> int:
        """Index in ``writers`` of head 0 of ``layer`` (== n_upstream of that layer's attention readers)."""
        return self.n_embed + layer * (self.n_heads + 1)

    def attn_group(self, layer: int) -> ReaderGroup:
        """The q, k and v readers of ``layer``: H + 2 KV readers over one prefix."""
        first = layer * (self.n_heads + 2 * self.n_kv_heads + 1)
        return self._group(first, self.n_heads + 2 * self.n_kv_heads)

    def mlp_group(self, layer: int) -> ReaderGroup:
        """The MLP reader of ``layer`` (over the layer's heads too, unless ``parallel_attn_mlp``)."""
        return self._group((layer + 1) * (self.n_heads + 2 * self.n_kv_heads + 1) - 1, 1)

    def logits_group(self) -> ReaderGroup:
        """The final reader before the unembedding."""
        return self._group(self.n_readers - 1, 1)

    def _group(self, first: int, count: int) -> ReaderGroup:
        return ReaderGroup(
            readers=slice(first, first + count),
            edges=slice(self.reader_offsets[first], self.reader_offsets[first + count]),
            n_upstream=self.n_upstream[first],
        )
