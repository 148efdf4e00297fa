"""Circuits, their edges and nodes.

Edge and node names are interned per model (`edge_names`, `node_names`: small tables of
integer ids), and `circuit_edges(edge_id, circuit_id)` carries a composite index, so
"circuits of model M that contain edge E" is one index range scan, newest first.
Circuit ids are the decimal strings of increasing integers (newest = largest), never
reused. A full record lists edges and nodes in the model's interning order: the order in
which the names were first stored (graph order when circuits list them in graph order).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Select, exc, exists, func, insert, select
from sqlalchemy.orm import Session, aliased

from edgeprune.storage import lifecycle
from edgeprune.storage.db import Database
from edgeprune.storage.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from edgeprune.storage.limits import MAX_INTEGER, MAX_NAME_LENGTH, MIN_INTEGER, text_problem
from edgeprune.storage.models import (
    Blob,
    Circuit,
    CircuitEdge,
    CircuitNode,
    Dataset,
    EdgeName,
    Job,
    NodeName,
    utcnow,
)
from edgeprune.storage.names import intern_names, name_ids
from edgeprune.storage.paging import decode_token, encode_token, page_size_or_default
from edgeprune.storage.records import CircuitFilter, CircuitRecord, NewCircuit, Page
from edgeprune.storage.sqlutil import bulk_insert


class CircuitRepo:
    """Store, get, list (filtered, keyset-paginated) and delete circuits."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, new: NewCircuit) -> CircuitRecord:
        """Store one circuit with its edges, scores and nodes (returned in full).

        Only scores of kept edges are stored (keep full score vectors in a blob).
        Raises InvalidArgument for malformed fields, NotFound for a missing
        job / dataset / blob reference, AlreadyExists when the owner's request_id names a
        circuit of another model or provenance (the same ones return that circuit).
        """
        if new.request_id is not None:
            earlier = self._find_request(new)
            if earlier is not None:
                return earlier
        try:
            return self.create_many([new])[0]
        except exc.IntegrityError:
            # A concurrent duplicate (same owner and request_id) committed first.
            earlier = self._find_request(new) if new.request_id is not None else None
            if earlier is None:
                raise
            return earlier

    def _find_request(self, new: NewCircuit) -> CircuitRecord | None:
        """The circuit an earlier identical request stored, if any; AlreadyExists if it differs."""
        with self.db.session(write=False) as session:
            row = session.scalars(select(Circuit).where(
                Circuit.owner == new.owner, Circuit.request_id == new.request_id)).one_or_none()
            if row is None:
                return None
            if row.model != new.model or row.provenance != json.loads(json.dumps(new.provenance)):
                raise AlreadyExists(
                    "circuit", str(new.request_id),
                    f"request_id {new.request_id!r} was already used for another circuit "
                    f"({row.id})")
            return _load_full(session, row)

    def create_many(self, news: Sequence[NewCircuit]) -> list[CircuitRecord]:
        """Store several circuits in one transaction (bulk insert of their edges)."""
        with self.db.session() as session:
            return insert_circuits(session, news)

    def get(self, circuit_id: str, *, full: bool = True,
            max_bytes: int | None = None) -> CircuitRecord:
        """full=True loads edges, edge scores and nodes, unless they would take more than
        `max_bytes` (then the summary comes, edges None). Raises NotFound."""
        with self.db.session(write=False) as session:
            row = session.get(Circuit, _parse_id(circuit_id))
            if row is None:
                raise NotFound("circuit", circuit_id)
            return _load_page(session, [row], max_bytes)[0] if full else circuit_record(row)

    def list(
        self,
        filter: CircuitFilter | None = None,
        *,
        page_size: int = 50,
        page_token: str | None = None,
        full: bool = False,
        max_bytes: int | None = None,
    ) -> Page[CircuitRecord]:
        """Circuits matching every filter field, newest first, keyset-paginated (the token
        is opaque and only valid with the same filter). Raises InvalidArgument.

        full=True loads edges and nodes; with `max_bytes` the page then ends early (with a
        token) before the circuit that would take the page's `full_size` total past it, and
        a first circuit larger than that alone comes without edges and nodes (as in a
        summary), so every page makes progress. Sizes are summed in the database before
        anything is loaded."""
        filter = filter or CircuitFilter()
        _check_filter(filter)
        size = page_size_or_default(page_size)
        fingerprint = _filter_key(filter)
        after = decode_token(page_token, fingerprint)
        with self.db.session(write=False) as session:
            query = _list_query(session, filter)
            if query is None:  # an edge or node name no circuit of the model has
                return Page([], None)
            id_column = query.selected_columns[0]
            if after is not None:
                query = query.where(id_column < _parse_key(after))
            ids = list(session.scalars(query.order_by(id_column.desc()).limit(size + 1)))
            rows = {c.id: c for c in session.scalars(select(Circuit).where(Circuit.id.in_(ids[:size])))}
            items = [circuit_record(rows[i]) for i in ids[:size]]
            if full:
                items = _load_page(session, [rows[i] for i in ids[:size]], max_bytes)
        token = encode_token([int(items[-1].id)], fingerprint) if len(ids) > len(items) else None
        return Page(items, token)

    def delete(self, circuit_id: str) -> None:
        """Delete a circuit with its edges and nodes (blobs stay until
        `BlobStore.delete_unreferenced`). Raises NotFound, or Conflict while a pending or
        running job is to read it."""
        with self.db.session() as session:
            row = session.get(Circuit, _parse_id(circuit_id))
            if row is None:
                raise NotFound("circuit", circuit_id)
            reader = lifecycle.job_reading_circuit(session, row.id)
            if reader is not None:
                raise Conflict(f"job {reader} is to evaluate circuit {circuit_id}: cancel it "
                               "or let it finish first")
            session.delete(row)


def insert_circuits(
    session: Session, news: Sequence[NewCircuit], *, job_id: str | None = None
) -> list[CircuitRecord]:
    """Insert circuits inside the caller's transaction; `job_id` overrides theirs."""
    if job_id is not None:
        news = [dataclasses.replace(n, job_id=job_id) for n in news]
    for new in news:
        _validate(new)
    _check_references(session, news)
    if not news:
        return []
    now = utcnow()
    ids = list(
        session.scalars(
            insert(Circuit).returning(Circuit.id, sort_by_parameter_order=True),
            [_circuit_row(new, now) for new in news],
        )
    )
    edge_ids = intern_names(session, EdgeName, [(n.model, n.edges) for n in news])
    node_ids = intern_names(session, NodeName, [(n.model, n.nodes) for n in news])

    def edge_rows() -> Iterator[tuple[int, int, float | None]]:
        for circuit_id, new in zip(ids, news, strict=True):
            names, scores = edge_ids[new.model], new.edge_scores
            for edge_id, edge in sorted((names[e], e) for e in new.edges):  # primary-key order
                score = scores.get(edge)
                yield circuit_id, edge_id, None if score is None else float(score)

    def node_rows() -> Iterator[tuple[int, int]]:
        for circuit_id, new in zip(ids, news, strict=True):
            names = node_ids[new.model]
            for node_id in sorted(names[n] for n in new.nodes):
                yield circuit_id, node_id

    bulk_insert(session, CircuitEdge, ["circuit_id", "edge_id", "score"], edge_rows())
    bulk_insert(session, CircuitNode, ["circuit_id", "node_id"], node_rows())
    records = []
    for circuit_id, new in zip(ids, news, strict=True):
        row = Circuit(id=circuit_id, **_circuit_row(new, now))
        edges = sorted(new.edges, key=edge_ids[new.model].__getitem__)  # as `get` returns them
        nodes = sorted(new.nodes, key=node_ids[new.model].__getitem__)
        scores = {e: float(new.edge_scores[e]) for e in edges if e in new.edge_scores}
        records.append(circuit_record(row, edges, scores, nodes))
    return records


def circuit_record(
    row: Circuit,
    edges: list[str] | None = None,
    edge_scores: dict[str, float] | None = None,
    nodes: list[str] | None = None,
) -> CircuitRecord:
    return CircuitRecord(
        id=str(row.id),
        owner=row.owner,
        model=row.model,
        method=row.method,
        task=row.task,
        dataset_id=row.dataset_id,
        job_id=row.job_id,
        edge_count=row.edge_count,
        total_edge_count=row.total_edge_count,
        node_count=row.node_count,
        total_node_count=row.total_node_count,
        edge_sparsity=row.edge_sparsity,
        target=dict(row.target),
        settings=dict(row.settings),
        provenance=dict(row.provenance),
        metrics=dict(row.metrics),
        mask_blob=row.mask_blob,
        created_at=row.created_at,
        edges=edges,
        edge_scores=edge_scores,
        nodes=nodes,
    )


def _load_full(session: Session, row: Circuit) -> CircuitRecord:
    """The record with edges (in interning order), their scores and nodes."""
    edge_rows = session.execute(
        select(EdgeName.name, CircuitEdge.score)
        .join(EdgeName, EdgeName.id == CircuitEdge.edge_id)
        .where(CircuitEdge.circuit_id == row.id)
        .order_by(CircuitEdge.edge_id)
    ).all()
    nodes = session.scalars(
        select(NodeName.name)
        .join(CircuitNode, NodeName.id == CircuitNode.node_id)
        .where(CircuitNode.circuit_id == row.id)
        .order_by(CircuitNode.node_id)
    ).all()
    scores = {name: score for name, score in edge_rows if score is not None}
    return circuit_record(row, [name for name, _ in edge_rows], scores, list(nodes))


# A full record's bytes beyond its names: an edge's score and framing, a node's framing, and
# the fixed fields; settings and provenance are counted at twice their JSON text.
EDGE_OVERHEAD_BYTES = 16
NODE_OVERHEAD_BYTES = 4
CIRCUIT_OVERHEAD_BYTES = 1024


def full_size(session: Session, row: Circuit) -> int:
    """An upper estimate of a circuit's full record in a reply, summed by the database."""
    sizes = []
    for link, names, column in ((CircuitEdge, EdgeName, CircuitEdge.edge_id),
                                (CircuitNode, NodeName, CircuitNode.node_id)):
        count, text = session.execute(
            select(func.count(), func.coalesce(func.sum(func.length(names.name)), 0))
            .select_from(link).join(names, names.id == column)
            .where(link.circuit_id == row.id)).one()
        sizes.append((count, text))
    (edges, edge_text), (nodes, node_text) = sizes
    json_text = len(json.dumps(row.settings)) + len(json.dumps(row.provenance))
    return (edge_text + edges * EDGE_OVERHEAD_BYTES + node_text + nodes * NODE_OVERHEAD_BYTES
            + 2 * json_text + len(json.dumps(row.metrics)) + CIRCUIT_OVERHEAD_BYTES)


def _load_page(session: Session, rows: list[Circuit], max_bytes: int | None) -> list[CircuitRecord]:
    """Full records of the leading rows that fit `max_bytes` together (all without it); a
    first row too large alone comes as its summary."""
    if max_bytes is None:
        return [_load_full(session, row) for row in rows]
    out: list[CircuitRecord] = []
    total = 0
    for row in rows:
        total += full_size(session, row)
        if total > max_bytes:
            if not out:
                out.append(circuit_record(row))
            break
        out.append(_load_full(session, row))
    return out


def _list_query(session: Session, f: CircuitFilter) -> Select[Any] | None:
    """SELECT of matching circuit ids; None when an edge/node filter cannot match.

    With an edge filter the first edge drives the query through ix_circuit_edges_edge
    (edge_id, circuit_id): the ids come out of the index already in order.
    """
    edge_sets = [name_ids(session, EdgeName, f.model, e) for e in f.contains_edges]
    node_sets = [name_ids(session, NodeName, f.model, n) for n in f.contains_nodes]
    if any(not ids for ids in edge_sets + node_sets):
        return None
    if edge_sets:
        query = select(CircuitEdge.circuit_id).where(CircuitEdge.edge_id.in_(edge_sets[0]))
        circuit_id = CircuitEdge.circuit_id
        edge_sets = edge_sets[1:]
    else:
        query = select(Circuit.id)
        circuit_id = Circuit.id
    for ids in edge_sets:  # an alias: the driving table may be circuit_edges itself
        other = aliased(CircuitEdge)
        query = query.where(exists().where(other.circuit_id == circuit_id, other.edge_id.in_(ids)))
    for ids in node_sets:
        query = query.where(exists().where(CircuitNode.circuit_id == circuit_id,
                                           CircuitNode.node_id.in_(ids)))
    conditions = _column_conditions(f)
    if conditions:
        if circuit_id is not Circuit.id:
            query = query.join(Circuit, Circuit.id == circuit_id)
        query = query.where(*conditions)
    return query


def _column_conditions(f: CircuitFilter) -> list[Any]:
    equal = {
        Circuit.owner: f.owner,
        Circuit.model: f.model,
        Circuit.task: f.task,
        Circuit.dataset_id: f.dataset_id,
        Circuit.method: f.method,
        Circuit.job_id: f.job_id,
    }
    conditions = [column == value for column, value in equal.items() if value is not None]
    bounds = [
        (Circuit.edge_count, f.min_edge_count, f.max_edge_count),
        (Circuit.edge_sparsity, f.min_edge_sparsity, f.max_edge_sparsity),
    ]
    for column, low, high in bounds:
        if low is not None:
            conditions.append(column >= low)
        if high is not None:
            conditions.append(column <= high)
    return conditions


def _check_filter(f: CircuitFilter) -> None:
    """InvalidArgument naming the filter field whose value no column can be compared with."""
    for field in dataclasses.fields(f):
        value = getattr(f, field.name)
        if value is None:
            continue
        if isinstance(value, str):
            problem = text_problem(value)
        elif field.name in ("contains_edges", "contains_nodes"):
            problem = next((p for p in map(text_problem, value) if p), None)
        elif field.name in ("min_edge_count", "max_edge_count"):
            problem = (None if MIN_INTEGER <= value <= MAX_INTEGER
                       else f"must be in [{MIN_INTEGER}, {MAX_INTEGER}], got {value}")
        else:  # min_edge_sparsity / max_edge_sparsity
            problem = None if math.isfinite(value) else f"must be finite, got {value}"
        if problem is not None:
            raise InvalidArgument(problem, field=field.name)


def _circuit_row(new: NewCircuit, now: Any) -> dict[str, Any]:
    return {
        "owner": new.owner,
        "model": new.model,
        "method": new.method,
        "task": new.task,
        "dataset_id": new.dataset_id,
        "job_id": new.job_id,
        "edge_count": len(new.edges),
        "total_edge_count": new.total_edge_count,
        "node_count": len(new.nodes),
        "total_node_count": new.total_node_count,
        "edge_sparsity": 1.0 - len(new.edges) / new.total_edge_count,
        "target": dict(new.target),
        "settings": dict(new.settings),
        "provenance": dict(new.provenance),
        "metrics": dict(new.metrics),
        "mask_blob": new.mask_blob,
        "created_at": now,
        "request_id": new.request_id,
    }


def _validate(new: NewCircuit) -> None:
    for field_name in ("model", "method"):
        value = getattr(new, field_name)
        if not value or len(value) > MAX_NAME_LENGTH:
            raise InvalidArgument(f"must be 1-{MAX_NAME_LENGTH} characters", field=field_name)
    for field_name in ("edges", "nodes"):
        names = getattr(new, field_name)
        if isinstance(names, str):
            raise InvalidArgument("must be a sequence of names, not one string", field=field_name)
        if len(set(names)) != len(names):
            raise InvalidArgument("names must be unique", field=field_name)
        bad = next((n for n in names if not isinstance(n, str) or not 0 < len(n) <= MAX_NAME_LENGTH), None)
        if bad is not None:
            raise InvalidArgument(f"invalid name {bad!r}", field=field_name)
    if new.total_edge_count <= 0 or new.total_edge_count < len(new.edges):
        raise InvalidArgument(f"must be >= the {len(new.edges)} kept edges and positive",
                              field="total_edge_count")
    if new.request_id is not None and not 0 < len(new.request_id) <= MAX_NAME_LENGTH:
        raise InvalidArgument(f"must be 1-{MAX_NAME_LENGTH} characters", field="request_id")
    if new.total_node_count and new.total_node_count < len(new.nodes):
        raise InvalidArgument(f"must be >= the {len(new.nodes)} kept nodes",
                              field="total_node_count")


def _check_references(session: Session, news: Sequence[NewCircuit]) -> None:
    """NotFound (rather than a foreign-key error) for a missing job, dataset or blob."""
    wanted = {
        ("job", Job, Job.id): {n.job_id for n in news},
        ("dataset", Dataset, Dataset.id): {n.dataset_id for n in news},
        ("blob", Blob, Blob.sha256): {n.mask_blob for n in news},
    }
    for (kind, _model, column), keys in wanted.items():
        keys.discard(None)
        if not keys:
            continue
        found = set(session.scalars(select(column).where(column.in_(keys))))
        missing = sorted(keys - found)
        if missing:
            raise NotFound(kind, missing[0])


def _filter_key(f: CircuitFilter) -> dict[str, Any]:
    key = dataclasses.asdict(f)
    key["contains_edges"] = list(f.contains_edges)
    key["contains_nodes"] = list(f.contains_nodes)
    return key


def _parse_id(circuit_id: str) -> int:
    try:
        value = int(circuit_id)
    except (TypeError, ValueError):
        raise NotFound("circuit", str(circuit_id)) from None
    # Ids come from an INTEGER column: a larger one names nothing (and would not bind).
    if not 0 < value <= MAX_INTEGER or str(value) != str(circuit_id):
        raise NotFound("circuit", str(circuit_id))
    return value


def _parse_key(key: list[Any]) -> int:
    if len(key) != 1 or not isinstance(key[0], int) or not MIN_INTEGER <= key[0] <= MAX_INTEGER:
        raise InvalidArgument("malformed page token", field="page_token")
    return key[0]
