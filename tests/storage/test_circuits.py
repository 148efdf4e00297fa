"""Circuits: stored with edges, scores and nodes; filtered and keyset-paginated lists."""

from __future__ import annotations

import pytest

from edgeprune.storage import (
    AlreadyExists,
    CircuitFilter,
    CircuitRepo,
    Database,
    DatasetRepo,
    InvalidArgument,
    NewCircuit,
    NewDataset,
    NotFound,
)

EDGES = ["tok->a0.h0.q", "tok->m0", "a0.h0->m0", "m0->logits", "a0.h0->logits"]


def make(model: str = "gpt2", edges: list[str] = EDGES[:3], **kwargs) -> NewCircuit:
    nodes = sorted({e.split("->")[0] for e in edges})
    return NewCircuit(model=model, method=kwargs.pop("method", "edge_pruning"), edges=edges,
                      total_edge_count=10, nodes=nodes, total_node_count=4, **kwargs)


def test_create_and_get_full(db: Database) -> None:
    repo = CircuitRepo(db)
    DatasetRepo(db).create(NewDataset(id="ioi"), [])
    created = repo.create(make(edge_scores={"tok->m0": 0.25, "elsewhere": 1.0}, task="ioi",
                               dataset_id="ioi", metrics={"kl": 0.1}, target={"edges": 3}))
    got = repo.get(created.id)
    assert got == created
    assert got.edges == EDGES[:3] and got.nodes == ["a0.h0", "tok"]
    assert got.edge_scores == {"tok->m0": 0.25}  # scores of kept edges only
    assert (got.edge_count, got.edge_sparsity, got.metrics) == (3, pytest.approx(0.7), {"kl": 0.1})
    brief = repo.get(created.id, full=False)
    assert brief.edges is None and brief.edge_count == 3


def test_invalid_circuits_are_rejected(db: Database) -> None:
    repo = CircuitRepo(db)
    for bad, field in [
        (make(model=""), "model"),
        (make(edges=["a->b", "a->b"]), "edges"),
        (NewCircuit(model="m", method="eap", edges=EDGES, total_edge_count=2), "total_edge_count"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            repo.create(bad)
        assert info.value.field == field
    for bad in (make(job_id="nope"), make(dataset_id="nope"), make(mask_blob="f" * 64)):
        with pytest.raises(NotFound):
            repo.create(bad)
    for missing in ("42", "x", "-1", "01"):
        with pytest.raises(NotFound):
            repo.get(missing)


def test_filters(db: Database) -> None:
    repo = CircuitRepo(db)
    a = repo.create(make("gpt2", EDGES[:2], task="ioi"))
    b = repo.create(make("gpt2", EDGES[1:4], task="ioi", method="eap"))
    c = repo.create(make("gpt2", EDGES, task="gp"))
    d = repo.create(make("llama", EDGES[:2], task="ioi"))

    def ids(**kwargs) -> list[str]:
        return [x.id for x in repo.list(CircuitFilter(**kwargs)).items]

    assert ids() == [d.id, c.id, b.id, a.id]
    assert ids(model="gpt2", contains_edges=["tok->m0"]) == [c.id, b.id, a.id]
    assert ids(contains_edges=["tok->m0"]) == [d.id, c.id, b.id, a.id]  # every model
    assert ids(model="gpt2", contains_edges=["tok->m0", "m0->logits"]) == [c.id, b.id]
    assert ids(contains_edges=["m0->logits"], method="eap") == [b.id]
    assert ids(contains_nodes=["m0"]) == [c.id, b.id]
    assert ids(model="llama", contains_nodes=["a0.h0"]) == []
    assert ids(contains_edges=["never->stored"]) == []
    assert ids(task="ioi", min_edge_count=3) == [b.id]
    assert ids(max_edge_count=2) == [d.id, a.id]
    assert ids(min_edge_sparsity=0.6, max_edge_sparsity=0.75) == [b.id]
    assert ids(model="gpt2", task="gp", method="edge_pruning") == [c.id]


def test_keyset_pagination(db: Database) -> None:
    repo = CircuitRepo(db)
    created = repo.create_many([make(edges=EDGES[: 1 + i % 5]) for i in range(23)])
    newest_first = [c.id for c in reversed(created)]
    for filt, expected in [
        (None, newest_first),
        (CircuitFilter(contains_edges=["m0->logits"]),
         [c.id for c in reversed(created) if "m0->logits" in c.edges]),
    ]:
        seen, token, pages = [], None, 0
        while True:
            page = repo.list(filt, page_size=5, page_token=token, full=True)
            seen += [c.id for c in page.items]
            pages += 1
            if not (token := page.next_page_token):
                break
        assert seen == expected
        assert pages == -(-len(expected) // 5)
    token = repo.list(page_size=5).next_page_token
    with pytest.raises(InvalidArgument):
        repo.list(CircuitFilter(model="gpt2"), page_token=token)
    with pytest.raises(InvalidArgument):
        repo.list(page_token="garbage!")
    with pytest.raises(InvalidArgument):
        repo.list(page_size=-1)


def test_delete(db: Database) -> None:
    repo = CircuitRepo(db)
    kept, gone = repo.create(make()), repo.create(make())
    repo.delete(gone.id)
    with pytest.raises(NotFound):
        repo.get(gone.id)
    with pytest.raises(NotFound):
        repo.delete(gone.id)
    assert [c.id for c in repo.list(CircuitFilter(contains_edges=[EDGES[0]])).items] == [kept.id]
    new = repo.create(make())
    assert int(new.id) > int(gone.id)  # ids are never reused


def test_owner_is_stored_and_filters(db: Database) -> None:
    repo = CircuitRepo(db)
    alice = repo.create(make(owner="alice"))
    repo.create(make(owner="bob"))
    assert repo.get(alice.id).owner == "alice"
    assert [c.id for c in repo.list(CircuitFilter(owner="alice")).items] == [alice.id]
    assert len(repo.list().items) == 2


def test_full_pages_end_before_the_byte_budget(db: Database) -> None:
    repo = CircuitRepo(db)
    edges = [f"writer{i}->reader{i}" for i in range(100)]  # about 3.4 kB of names and framing
    created = [repo.create(NewCircuit(model="gpt2", method="eap", edges=edges, total_edge_count=1000))
               for _ in range(5)]
    size = full_size_of(db, created[0].id)
    assert 100 * (len("writer0->reader0") + 16) <= size < 100 * 40 + 3000
    seen, token, pages = [], None, 0
    while True:
        page = repo.list(full=True, max_bytes=2 * size + size // 2, page_token=token)
        assert len(page.items) <= 2 and all(c.edges == edges for c in page.items)
        seen += [c.id for c in page.items]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert seen == [c.id for c in reversed(created)] and pages == 3
    alone = repo.list(full=True, max_bytes=size - 1)  # no circuit fits: its summary
    assert [c.edges for c in alone.items] == [None] and alone.next_page_token


def full_size_of(db: Database, circuit_id: str) -> int:
    from edgeprune.storage.circuits import full_size
    from edgeprune.storage.models import Circuit

    with db.session(write=False) as session:
        return full_size(session, session.get(Circuit, int(circuit_id)))


def test_a_request_id_makes_a_create_idempotent_per_owner(db: Database) -> None:
    repo = CircuitRepo(db)
    first = repo.create(make(owner="alice", request_id="r1", provenance={"sha256": "aa"}))
    again = repo.create(make(owner="alice", request_id="r1", provenance={"sha256": "aa"}))
    assert again == first and repo.list().items == [repo.get(first.id, full=False)]
    with pytest.raises(AlreadyExists, match="already used for another circuit"):
        repo.create(make(owner="alice", request_id="r1", provenance={"sha256": "bb"}))
    bob = repo.create(make(owner="bob", request_id="r1", provenance={"sha256": "bb"}))
    assert bob.id != first.id  # request ids are scoped to their owner
    with pytest.raises(InvalidArgument, match="request_id"):
        repo.create(make(request_id="x" * 300))
