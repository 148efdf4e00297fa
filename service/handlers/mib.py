"""Circuits in MIB's format (EAP-IG's circuit files): ImportCircuit and the MIB export.

Both need the model's edge graph, which follows from its shape alone (layers, heads, KV heads,
positions), so the API process builds it from the model's config without loading weights: the
same shapes the memory check reads (`memory_check.allow_listed_shape`). A model whose config
the API cannot read is refused with FAILED_PRECONDITION rather than imported unchecked.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from edgeprune.engine import errors as engine_errors
from edgeprune.engine.memory import ModelShape
from edgeprune.service.config import Config
from edgeprune.service.errors import FailedPrecondition, InvalidArgument
from edgeprune.service.memory_check import allow_listed_shape
from edgeprune.service.principals import Principal
from edgeprune.service.translate import METHODS, circuit_from_record
from edgeprune.service.validation import Violations
from edgeprune.storage import CircuitRecord, CircuitRepo, NewCircuit
from edgeprune.storage.limits import MAX_NAME_LENGTH
from edgeprune.v1 import circuit_pb2, common_pb2

if TYPE_CHECKING:
    from edgeprune.engine.graph import Graph

MAX_TASK_LENGTH = 64  # circuits.task is a String(64)


def model_graph(config: Config, model: str) -> tuple[Graph, ModelShape]:
    """The edge graph and shape of allow-listed ``model`` (a short name), from its config."""
    ref = config.models.get(model)
    if ref is None:
        raise InvalidArgument(f"{model!r} is not on the server's allow-list "
                              f"({', '.join(sorted(config.models))})", field="model")
    shape = allow_listed_shape(config, ref)
    if shape is None:
        raise FailedPrecondition(f"the server cannot read the config of model {model!r}, so it "
                                 "cannot check a circuit against its graph",
                                 reason="MODEL_SHAPE_UNKNOWN")
    from edgeprune.engine.graph import Graph  # imports torch: only on first import or export

    graph = Graph.build(shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.has_pos,
                        parallel_attn_mlp=shape.parallel_attn_mlp)
    return graph, shape


def import_circuit(circuits: CircuitRepo, config: Config,
                   request: circuit_pb2.ImportCircuitRequest, who: Principal) -> CircuitRecord:
    """Check a MIB circuit file against the model's graph and store its circuit, owned by
    ``who``; a repeated request_id returns the first import of the same file."""
    v = Violations()
    if not request.model:
        v.bad("model", "is required")
    if not request.mib_json:
        v.bad("mib_json", "is required")
    v.enum("method", request.method, common_pb2.Method)
    if len(request.task) > MAX_TASK_LENGTH:
        v.bad("task", f"at most {MAX_TASK_LENGTH} characters")
    if len(request.request_id) > MAX_NAME_LENGTH:
        v.bad("request_id", f"at most {MAX_NAME_LENGTH} characters")
    v.raise_if_any()
    graph, shape = model_graph(config, request.model)
    from edgeprune.engine.mib import IMPORTED, parse_mib

    try:
        circuit = parse_mib(request.mib_json, graph, max_bytes=config.limits.reply_bytes,
                            model=request.model, method=METHODS.get(request.method, IMPORTED))
    except engine_errors.InvalidArgument as err:
        raise InvalidArgument(str(err), field="mib_json") from None
    provenance = {**circuit.provenance, "d_model": shape.d_model,
                  "source_sha256": hashlib.sha256(request.mib_json).hexdigest()}
    return circuits.create(NewCircuit(
        owner=who.name, model=request.model, method=circuit.method, edges=circuit.edges,
        total_edge_count=circuit.total_edge_count, nodes=circuit.nodes,
        total_node_count=graph.n_nodes, edge_scores=circuit.edge_scores, task=request.task,
        target=circuit.target, provenance=provenance, request_id=request.request_id or None))


def export_mib(record: CircuitRecord, config: Config) -> bytes:
    """A stored circuit as a MIB circuit file: on its model's graph (with ``d_model``) where the
    API can read the model's config, else on the graph its provenance records."""
    from edgeprune.engine.mib import export_mib as engine_export

    circuit = circuit_from_record(record)
    graph, d_model = None, None
    try:
        graph, shape = model_graph(config, record.model)
        d_model = shape.d_model
    except (InvalidArgument, FailedPrecondition):  # e.g. a model since dropped from the list
        pass
    try:
        return engine_export(circuit, graph, d_model=d_model).encode()
    except engine_errors.InvalidArgument as err:
        raise FailedPrecondition(f"cannot write this circuit in MIB's format: {err}",
                                 reason="GRAPH_UNKNOWN") from None
