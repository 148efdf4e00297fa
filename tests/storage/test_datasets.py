"""Datasets: examples stored in order and read back in batches."""

from __future__ import annotations

import hashlib
import json

import pytest

from edgeprune.storage import (
    AlreadyExists,
    Database,
    DatasetRepo,
    InvalidArgument,
    NewDataset,
    NotFound,
)

N = 2500


def examples(n: int = N) -> list[dict]:
    return [{"clean": f"When Mary and John {i}", "corrupted": f"When Amy and Tom {i}",
             "target": " Mary", "distractor": " John"} for i in range(n)]


def test_create_and_read_in_batches(db: Database) -> None:
    repo = DatasetRepo(db)
    record = repo.create(NewDataset(id="ioi-train", owner="alice"), examples())
    assert record.example_count == N and repo.get("ioi-train") == record
    lines = b"".join(
        json.dumps(e, sort_keys=True, separators=(",", ":")).encode() + b"\n" for e in examples()
    )
    assert record.content_hash == hashlib.sha256(lines).hexdigest()
    assert repo.examples("ioi-train", offset=1000, limit=3) == examples()[1000:1003]
    batches = list(repo.iter_examples("ioi-train", batch_size=1000))
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert [e for b in batches for e in b] == examples()


def test_ids_are_unique_and_validated(db: Database) -> None:
    repo = DatasetRepo(db)
    repo.create(NewDataset(id="a"), examples(2))
    with pytest.raises(AlreadyExists):
        repo.create(NewDataset(id="a"), examples(2))
    with pytest.raises(InvalidArgument):
        repo.create(NewDataset(id="Bad Id"), examples(2))
    with pytest.raises(InvalidArgument, match=r"examples\[1\]"):
        repo.create(NewDataset(id="b"), [{"ok": 1}, "not an object"])  # type: ignore[list-item]
    with pytest.raises(NotFound):
        repo.get("b")  # the failed create left nothing behind
    generated = repo.create(NewDataset(), [])
    assert generated.example_count == 0 and repo.get(generated.id) == generated


def test_list_and_delete(db: Database) -> None:
    repo = DatasetRepo(db)
    for i in range(5):
        repo.create(NewDataset(id=f"d{i}", owner="a" if i % 2 else "b"), examples(1))
    first = repo.list(page_size=2)
    second = repo.list(page_size=2, page_token=first.next_page_token)
    assert [d.id for d in first.items + second.items] == ["d4", "d3", "d2", "d1"]
    assert [d.id for d in repo.list(owner="a").items] == ["d3", "d1"]
    repo.delete("d3")
    with pytest.raises(NotFound):
        repo.examples("d3")
    with pytest.raises(NotFound):
        repo.delete("d3")


def test_request_id_is_scoped_to_its_owner_and_bound_to_the_content(db: Database) -> None:
    repo = DatasetRepo(db)
    first = repo.create(NewDataset(owner="alice", request_id="r1"), examples(3))
    again = repo.create(NewDataset(owner="alice", request_id="r1"), iter(examples(3)))
    assert again == first and first.owner == "alice" and first.request_id == "r1"
    with pytest.raises(AlreadyExists, match="other content"):
        repo.create(NewDataset(owner="alice", request_id="r1"), examples(4))
    other = repo.create(NewDataset(owner="bob", request_id="r1"), examples(4))
    assert other.id != first.id and other.owner == "bob"
    assert repo.get(first.id).example_count == 3  # nothing of the refused upload stored
    # After a delete the key makes a new dataset under a new id: a job that named the old
    # one finds it gone instead of running on other data.
    repo.delete(first.id)
    renewed = repo.create(NewDataset(owner="alice", request_id="r1"), examples(5))
    assert renewed.id != first.id and renewed.example_count == 5


def test_list_by_owner(db: Database) -> None:
    repo = DatasetRepo(db)
    mine = {repo.create(NewDataset(owner="alice"), examples(1)).id for _ in range(3)}
    repo.create(NewDataset(owner="bob"), examples(1))
    page = repo.list(owner="alice", page_size=2)
    rest = repo.list(owner="alice", page_size=2, page_token=page.next_page_token)
    assert {d.id for d in page.items + rest.items} == mine and rest.next_page_token is None
    with pytest.raises(InvalidArgument):  # a token is bound to its filters
        repo.list(owner="bob", page_token=page.next_page_token)


def test_a_failed_create_leaves_nothing_and_readers_never_see_a_partial_dataset(
        db: Database) -> None:
    """Examples go in several transactions; until the last one commits the dataset is not
    there for readers, and a create that fails half-way deletes what it stored."""
    from edgeprune.storage import datasets as datasets_module

    repo = DatasetRepo(db)
    seen: list[int] = []

    def examples_then_fail():
        for i, example in enumerate(examples(3 * datasets_module.EXAMPLES_PER_TRANSACTION)):
            if i == 2 * datasets_module.EXAMPLES_PER_TRANSACTION + 5:
                # Two batches are committed: readers (another transaction) see no dataset.
                seen.append(repo.count())
                seen.append(len(repo.list().items))
                raise ValueError("the upload broke off")
            yield example

    with pytest.raises(ValueError, match="broke off"):
        repo.create(NewDataset(owner="alice", request_id="r"), examples_then_fail())
    assert seen == [1, 0]  # counted against the quota, listed nowhere
    assert repo.count() == 0 and repo.list().items == []
    with db.session() as session:
        from sqlalchemy import func, select

        from edgeprune.storage.models import DatasetExample
        assert session.scalar(select(func.count()).select_from(DatasetExample)) == 0
    # the request_id is free again
    assert repo.create(NewDataset(owner="alice", request_id="r"), examples(2)).example_count == 2


def test_an_upload_a_dead_process_left_is_deleted_by_the_cleanup(db: Database) -> None:
    from sqlalchemy import update

    from edgeprune.storage.models import Dataset

    repo = DatasetRepo(db)
    record = repo.create(NewDataset(owner="alice"), examples(3))
    with db.session() as session:  # as a process killed between its batches leaves it
        session.execute(update(Dataset).where(Dataset.id == record.id).values(ready=False))
    with pytest.raises(NotFound):
        repo.get(record.id)
    assert repo.delete_unfinished(older_than_s=3600) == 0  # it may still be uploading
    assert repo.delete_unfinished(older_than_s=0) == 1
    assert repo.count() == 0
