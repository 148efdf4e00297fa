"""Circuits: get, list with filters, export, compare, delete, import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeprune.engine import contract
from edgeprune.service.config import Config
from edgeprune.service.errors import FailedPrecondition, InvalidArgument
from edgeprune.service.handlers import mib
from edgeprune.service.principals import Principal
from edgeprune.service.translate import METHODS, circuit_from_record
from edgeprune.service.validation import Violations, check_page, parse_circuit_name, parse_name
from edgeprune.storage import (
    BlobStore,
    CircuitFilter,
    CircuitRecord,
    CircuitRepo,
    Conflict,
    NotFound,
    Page,
)
from edgeprune.storage.limits import MAX_INTEGER
from edgeprune.v1 import circuit_pb2, common_pb2

if TYPE_CHECKING:
    from edgeprune.engine.drawing import DrawOptions

EXPORT_CHUNK_BYTES = 256 * 1024
# format -> (engine export format, file suffix, media type)
EXPORTS = {
    circuit_pb2.EXPORT_FORMAT_JSON: ("json", "json", "application/json"),
    circuit_pb2.EXPORT_FORMAT_DOT: ("dot", "dot", "text/vnd.graphviz"),
    circuit_pb2.EXPORT_FORMAT_SVG: ("svg", "svg", "image/svg+xml"),
    circuit_pb2.EXPORT_FORMAT_PNG: ("png", "png", "image/png"),
    circuit_pb2.EXPORT_FORMAT_MIB: ("mib", "mib.json", "application/json"),
}
DRAWINGS = (circuit_pb2.EXPORT_FORMAT_DOT, circuit_pb2.EXPORT_FORMAT_SVG,
            circuit_pb2.EXPORT_FORMAT_PNG)
VIEWS = {circuit_pb2.DRAWING_VIEW_UNSPECIFIED: "edges", circuit_pb2.DRAWING_VIEW_EDGES: "edges",
         circuit_pb2.DRAWING_VIEW_NODES: "nodes"}
PLOTS = {circuit_pb2.CIRCUIT_PLOT_UNSPECIFIED: "drawing", circuit_pb2.CIRCUIT_PLOT_DRAWING: "drawing",
         circuit_pb2.CIRCUIT_PLOT_PER_LAYER: "per_layer"}
LAYOUTS = {circuit_pb2.DRAWING_LAYOUT_UNSPECIFIED: "auto",
           circuit_pb2.DRAWING_LAYOUT_GRAPHVIZ: "graphviz",
           circuit_pb2.DRAWING_LAYOUT_BUILTIN: "builtin"}


def render(record: CircuitRecord, fmt: str, options: DrawOptions | None = None) -> bytes:
    """A stored circuit through the engine's exporter (the same files the library writes)."""
    from edgeprune.engine.export import export_circuit  # imports torch: only on first export

    circuit = circuit_from_record(record)
    circuit.provenance.update(circuit=record.id, job=record.job_id)
    data = export_circuit(circuit, fmt, options=options)
    return data.encode() if isinstance(data, str) else data


def draw_options(request: circuit_pb2.ExportCircuitRequest) -> DrawOptions | None:
    """The drawing options of an export request (None: none given); INVALID_ARGUMENT naming
    the field for a bad one, or for one the format does not take."""
    v = Violations()
    given = [name for name in ("top_k", "nodes", "view", "plot", "layout")
             if getattr(request, name)]
    if given and request.format not in DRAWINGS:
        v.bad(given[0], "applies to the DOT, SVG and PNG formats only")
    v.number("top_k", request.top_k, 0, contract.MAX_DRAWING_EDGES)
    if len(request.nodes) > contract.MAX_DRAWING_NODES:
        v.bad("nodes", f"at most {contract.MAX_DRAWING_NODES} names")
    for field, table in (("view", VIEWS), ("plot", PLOTS), ("layout", LAYOUTS)):
        if getattr(request, field) not in table:
            v.bad(field, f"unknown value {getattr(request, field)}")
    if request.format == circuit_pb2.EXPORT_FORMAT_DOT and (request.plot or request.layout):
        v.bad("plot" if request.plot else "layout", "applies to SVG and PNG only")
    v.raise_if_any()
    if not given:
        return None
    from edgeprune.engine.drawing import DrawOptions  # imports torch: only on first export

    return DrawOptions(top_k=request.top_k or None, nodes=tuple(request.nodes),
                       view=VIEWS[request.view], layout=LAYOUTS[request.layout],
                       plot=PLOTS[request.plot])


class CircuitHandler:
    def __init__(self, circuits: CircuitRepo, blobs: BlobStore, config: Config) -> None:
        self.circuits = circuits
        self.blobs = blobs
        self.config = config

    def get(self, circuit_id: str, who: Principal, *, full: bool) -> CircuitRecord:
        """GetCircuit: a FULL circuit too large for one reply comes without its edges and
        nodes (Circuit.edges_omitted; ExportCircuit streams any size)."""
        return self._owned(circuit_id, who, full=full,
                           max_bytes=self.config.limits.reply_bytes if full else None)

    def _owned(self, circuit_id: str, who: Principal, *, full: bool,
               max_bytes: int | None = None) -> CircuitRecord:
        """Another principal's circuit is NOT_FOUND exactly as a missing one is."""
        record = self.circuits.get(circuit_id, full=full, max_bytes=max_bytes)
        if not who.may_see(record.owner):
            raise NotFound("circuit", circuit_id)
        return record

    def delete(self, circuit_id: str, who: Principal) -> None:
        """Delete a circuit with its edges and nodes; FAILED_PRECONDITION while a job is to
        evaluate it. Its mask blob goes with the scheduled cleanup (blobs are shared)."""
        self._owned(circuit_id, who, full=False)
        try:
            self.circuits.delete(circuit_id)
        except Conflict as err:
            raise FailedPrecondition(str(err), reason="CIRCUIT_IN_USE") from err

    def list(self, request: circuit_pb2.ListCircuitsRequest, who: Principal) -> Page[CircuitRecord]:
        v = Violations()
        size = check_page(v, request.page_size, self.config)
        if request.method not in common_pb2.Method.values():
            v.bad("method", f"unknown value {request.method}")
        # Edge counts are stored in an INTEGER column: a bound beyond it cannot be compared.
        v.number("min_edge_count", request.min_edge_count, 0, MAX_INTEGER)
        v.number("max_edge_count", request.max_edge_count, 0, MAX_INTEGER)
        if request.max_edge_count and request.max_edge_count < request.min_edge_count:
            v.bad("max_edge_count", "must not be below min_edge_count")
        dataset_id = job_id = None
        for field, collection in (("dataset", "datasets"), ("job", "jobs")):
            value = getattr(request, field)
            if value:
                try:
                    parsed = parse_name(value, collection, field=field)
                except InvalidArgument as err:
                    v.bad(field, err.violations[0][1])
                    continue
                dataset_id, job_id = (parsed, job_id) if field == "dataset" else (dataset_id, parsed)
        v.raise_if_any()
        filter = CircuitFilter(
            owner=who.owner_filter,
            model=request.model or None,
            task=request.task or None,
            dataset_id=dataset_id,
            method=METHODS.get(request.method),
            job_id=job_id,
            min_edge_count=request.min_edge_count or None,
            max_edge_count=request.max_edge_count or None,
            contains_edges=[request.contains_edge] if request.contains_edge else [],
            contains_nodes=[request.contains_node] if request.contains_node else [],
        )
        # A FULL page ends early where the next circuit would overflow the reply; a circuit
        # too large for any reply is listed without its edges (Circuit.edges_omitted).
        full = request.view == common_pb2.VIEW_FULL
        return self.circuits.list(filter, page_size=size, page_token=request.page_token or None,
                                  full=full, max_bytes=self.config.limits.reply_bytes if full else None)

    def export(self, circuit_id: str, request: circuit_pb2.ExportCircuitRequest,
               who: Principal) -> tuple[str, str, bytes]:
        """(content type, file name, bytes) of a circuit in an export format."""
        fmt = request.format
        if fmt == circuit_pb2.EXPORT_FORMAT_UNSPECIFIED or fmt not in circuit_pb2.ExportFormat.values():
            raise InvalidArgument("one of JSON, DOT, SVG, PNG, SAFETENSORS or MIB is required",
                                  field="format")
        options = draw_options(request)
        record = self._owned(circuit_id, who, full=True)
        stem = f"circuit-{record.id}"
        if fmt == circuit_pb2.EXPORT_FORMAT_SAFETENSORS:
            if record.mask_blob is None:
                raise FailedPrecondition("this circuit was stored without masks",
                                         reason="NO_MASKS")
            return "application/octet-stream", f"{stem}.safetensors", self.blobs.get(record.mask_blob)
        kind, suffix, content_type = EXPORTS[fmt]
        if fmt == circuit_pb2.EXPORT_FORMAT_MIB:  # on the model's graph, with its width
            return content_type, f"{stem}.{suffix}", mib.export_mib(record, self.config)
        if options is not None and options.plot == "per_layer":
            stem += "-per-layer"
        return content_type, f"{stem}.{suffix}", render(record, kind, options)

    def import_circuit(self, request: circuit_pb2.ImportCircuitRequest,
                       who: Principal) -> CircuitRecord:
        """ImportCircuit: a MIB circuit file, checked against the model's graph (see `mib`)."""
        return mib.import_circuit(self.circuits, self.config, request, who)

    def compare(self, request: circuit_pb2.CompareCircuitsRequest,
                who: Principal) -> circuit_pb2.CompareCircuitsResponse:
        first = self._owned(parse_circuit_name(request.first, field="first"), who, full=True)
        second = self._owned(parse_circuit_name(request.second, field="second"), who, full=True)
        if first.model != second.model:
            raise FailedPrecondition(f"the circuits belong to different models ({first.model!r}, "
                                     f"{second.model!r})", reason="MODEL_MISMATCH")
        e1, e2 = set(first.edges or ()), set(second.edges or ())
        n1, n2 = set(first.nodes or ()), set(second.nodes or ())
        return circuit_pb2.CompareCircuitsResponse(
            shared_edges=sorted(e1 & e2), first_only_edges=sorted(e1 - e2),
            second_only_edges=sorted(e2 - e1), shared_nodes=sorted(n1 & n2),
            first_only_nodes=sorted(n1 - n2), second_only_nodes=sorted(n2 - n1),
            edge_jaccard=_jaccard(e1, e2), node_jaccard=_jaccard(n1, n2),
        )


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0
