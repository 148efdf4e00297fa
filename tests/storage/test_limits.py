"""Values no column can hold or be compared with are InvalidArgument (or, for an id, NotFound)
on both backends alike, never a driver error: filters, ids and forged page tokens."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from edgeprune.storage import (
    CircuitFilter,
    CircuitRepo,
    Database,
    DatasetRepo,
    InvalidArgument,
    JobRepo,
    NewCircuit,
    NewDataset,
    NewJob,
    NotFound,
)
from edgeprune.storage.limits import MAX_INTEGER

EDGES = ["input->a0.h0", "a0.h0->logits"]


def forge(token: str, key: list[Any]) -> str:
    """``token`` with another sort key and the same filters' fingerprint."""
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    data["k"] = key
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_circuit_filters_beyond_the_columns(db: Database) -> None:
    repo = CircuitRepo(db)
    repo.create(NewCircuit(model="m", method="eap", edges=EDGES, total_edge_count=4))
    for bad, field in [
        (CircuitFilter(min_edge_count=MAX_INTEGER + 1), "min_edge_count"),
        (CircuitFilter(max_edge_count=-(2**63)), "max_edge_count"),
        (CircuitFilter(model="m\x00"), "model"),
        (CircuitFilter(job_id="\ud800"), "job_id"),
        (CircuitFilter(model="m", contains_edges=[EDGES[0], "a\x00"]), "contains_edges"),
        (CircuitFilter(contains_nodes=["\udfff"]), "contains_nodes"),
        (CircuitFilter(min_edge_sparsity=float("nan")), "min_edge_sparsity"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            repo.list(bad)
        assert info.value.field == field
    assert len(repo.list(CircuitFilter(max_edge_count=MAX_INTEGER)).items) == 1


def test_circuit_ids_beyond_the_column_name_nothing(db: Database) -> None:
    repo = CircuitRepo(db)
    for circuit_id in (str(MAX_INTEGER + 1), str(2**63), "9" * 30):
        with pytest.raises(NotFound):
            repo.get(circuit_id)
        with pytest.raises(NotFound):
            repo.delete(circuit_id)


def test_forged_page_tokens(db: Database) -> None:
    circuits, jobs, datasets = CircuitRepo(db), JobRepo(db), DatasetRepo(db)
    for _ in range(2):
        circuits.create(NewCircuit(model="m", method="eap", edges=EDGES, total_edge_count=4))
        jobs.create(NewJob(spec=b"", spec_json={}))
        datasets.create(NewDataset(display_name="d", source="test"),
                        [{"clean": "a", "corrupted": "b"}])
    lists = [
        (circuits.list, [[MAX_INTEGER + 1], [2**64], [-(2**63) - 1], ["1\x00"], [1.5], [None]]),
        (jobs.list, [["2020-01-01T00:00:00+00:00", v] for v in ("j\x00", "j\ud800", 2**64)]),
        (datasets.list, [["2020-01-01T00:00:00+00:00", v] for v in ("d\x00", "\udc80", [1])]),
    ]
    for list_page, keys in lists:
        token = list_page(page_size=1).next_page_token
        assert token
        for key in keys:
            with pytest.raises(InvalidArgument) as info:
                list_page(page_size=1, page_token=forge(token, key))
            assert info.value.field == "page_token", key
        deep = base64.urlsafe_b64encode(b"[" * 100_000).decode()
        with pytest.raises(InvalidArgument):
            list_page(page_token=deep)
