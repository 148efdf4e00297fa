"""Datasets and their examples.

Examples are stored one row each, keyed by (dataset, index), so a 100k-example dataset is
read in batches by index range without loading the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exc, func, select, tuple_
from sqlalchemy.orm import Session

from edgeprune.storage.db import Database
from edgeprune.storage.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    StorageError,
)
from edgeprune.storage.models import Dataset, DatasetExample, utcnow
from edgeprune.storage.paging import decode_token, encode_token, page_size_or_default
from edgeprune.storage.records import DatasetRecord, NewDataset, Page
from edgeprune.storage.sqlutil import bulk_insert

log = logging.getLogger(__name__)

_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62})$")
MAX_BATCH = 10_000
EXAMPLES_PER_TRANSACTION = 2_000  # short write transactions: other writers get the lock between


class DatasetRepo:
    """Create, read, list and delete datasets; each method but `create` is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, new: NewDataset, examples: Iterable[Mapping[str, Any]]) -> DatasetRecord:
        """Store a dataset and its examples (JSON objects, kept in order).

        The examples go in transactions of EXAMPLES_PER_TRANSACTION, so a large upload never
        holds the write lock for long; readers see the dataset once the last one commits, and a
        failed create deletes what it stored (one an interrupted process left is deleted by
        `delete_unfinished`).

        `new.id` must be 1-63 lowercase letters, digits or hyphens (None: generated).
        Raises AlreadyExists if the id is taken, or the owner's request_id names a dataset of
        other content; InvalidArgument for a bad id or examples that are not JSON objects;
        Conflict while an upload with the same request_id is still being stored.
        """
        dataset_id = new.id if new.id is not None else uuid.uuid4().hex
        if not _ID.match(dataset_id):
            raise InvalidArgument("use 1-63 lowercase letters, digits or hyphens",
                                  field="dataset_id")
        digest = hashlib.sha256()
        lines = _Lines(examples, digest)
        try:
            with self.db.session() as session:
                if session.get(Dataset, dataset_id) is not None:
                    raise AlreadyExists("dataset", dataset_id)
                session.add(Dataset(
                    id=dataset_id, owner=new.owner, request_id=new.request_id,
                    display_name=new.display_name, source=new.source,
                    labels=dict(new.labels), example_count=0, content_hash="",
                    size_bytes=new.size_bytes, ready=False, created_at=utcnow()))
        except exc.IntegrityError as err:
            # The id, or this owner's request_id, is taken (perhaps by a concurrent create).
            earlier = (self.find_request(new.owner, new.request_id)
                       if new.request_id is not None else None)
            if earlier is None:
                raise AlreadyExists("dataset", dataset_id) from err
            if not earlier.ready:
                raise Conflict(f"request_id {new.request_id!r}: that upload is still being "
                               "stored; retry") from err
            for _ in lines:  # the content, to compare with the first upload's
                pass
            if digest.hexdigest() != earlier.content_hash:
                raise AlreadyExists(
                    "dataset", new.request_id,
                    f"request_id {new.request_id!r} was already used for a dataset with other "
                    f"content ({earlier.id})") from err
            return earlier
        try:
            for batch in _batches(lines, EXAMPLES_PER_TRANSACTION):
                with self.db.session() as session:
                    bulk_insert(session, DatasetExample, ["dataset_id", "idx", "data"],
                                ((dataset_id, i, line) for i, line in batch))
            with self.db.session() as session:
                row = _get(session, dataset_id, ready=False)
                row.example_count = lines.count
                row.content_hash = digest.hexdigest()
                row.ready = True
                session.flush()
                return dataset_record(row)
        except BaseException:
            self._delete_quietly(dataset_id)
            raise

    def _delete_quietly(self, dataset_id: str) -> None:
        """Undo a failed create (best effort: `delete_unfinished` catches what this misses)."""
        try:
            with self.db.session() as session:
                row = session.get(Dataset, dataset_id)
                if row is not None and not row.ready:
                    session.delete(row)
        except StorageError as err:
            log.warning("dataset %s: cannot delete a failed upload now: %s", dataset_id, err)

    def delete_unfinished(self, *, older_than_s: float) -> int:
        """Delete datasets whose upload never finished (its process died) once they are
        `older_than_s` old; returns how many."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self.db.session() as session:
            rows = list(session.scalars(select(Dataset).where(
                Dataset.ready.is_(False), Dataset.created_at < cutoff)))
            for row in rows:
                session.delete(row)
            return len(rows)

    def get(self, dataset_id: str) -> DatasetRecord:
        """Raises NotFound (also while its upload is being stored)."""
        with self.db.session(write=False) as session:
            return dataset_record(_get(session, dataset_id))

    def list(
        self, *, page_size: int = 50, page_token: str | None = None, owner: str | None = None,
    ) -> Page[DatasetRecord]:
        """Newest first; keyset pagination (the token is opaque and bound to the filters)."""
        size = page_size_or_default(page_size)
        filters = {"owner": owner}
        after = decode_token(page_token, filters)
        query = (select(Dataset).where(Dataset.ready.is_(True))
                 .order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(size + 1))
        if owner is not None:
            query = query.where(Dataset.owner == owner)
        if after is not None:
            try:
                created, last_id = datetime.fromisoformat(after[0]), str(after[1])
            except (IndexError, TypeError, ValueError) as err:
                raise InvalidArgument("malformed page token", field="page_token") from err
            query = query.where(tuple_(Dataset.created_at, Dataset.id) < tuple_(created, last_id))
        with self.db.session(write=False) as session:
            rows = list(session.scalars(query))
        items = [dataset_record(r) for r in rows[:size]]
        token = None
        if len(rows) > size:
            token = encode_token([items[-1].created_at.isoformat(), items[-1].id], filters)
        return Page(items, token)

    def count(self, *, owner: str | None = None) -> int:
        """How many datasets there are (of `owner`), uploads being stored included."""
        query = select(func.count()).select_from(Dataset)
        if owner is not None:
            query = query.where(Dataset.owner == owner)
        with self.db.session(write=False) as session:
            return session.scalar(query) or 0

    def find_request(self, owner: str, request_id: str) -> DatasetRecord | None:
        """The dataset `owner` uploaded with `request_id`, if any."""
        with self.db.session(write=False) as session:
            row = session.scalars(select(Dataset).where(
                Dataset.owner == owner, Dataset.request_id == request_id)).one_or_none()
            return dataset_record(row) if row is not None else None

    def examples(self, dataset_id: str, *, offset: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Examples [offset, offset + limit) in order (limit <= 10,000). Raises NotFound."""
        if offset < 0:
            raise InvalidArgument("must not be negative", field="offset")
        if not 0 < limit <= MAX_BATCH:
            raise InvalidArgument(f"must be between 1 and {MAX_BATCH}", field="limit")
        with self.db.session(write=False) as session:
            _get(session, dataset_id)
            rows = session.scalars(
                select(DatasetExample.data)
                .where(
                    DatasetExample.dataset_id == dataset_id,
                    DatasetExample.idx >= offset,
                    DatasetExample.idx < offset + limit,
                )
                .order_by(DatasetExample.idx)
            )
            return [dict(r) for r in rows]

    def iter_examples(self, dataset_id: str, *, batch_size: int = 1000) -> Iterator[list[dict[str, Any]]]:
        """All examples in order, `batch_size` at a time (one short transaction per batch).
        Raises NotFound."""
        offset = 0
        while True:
            batch = self.examples(dataset_id, offset=offset, limit=batch_size)
            if not batch:
                return
            yield batch
            offset += len(batch)

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset and its examples (circuits keep a null dataset). Raises NotFound."""
        with self.db.session() as session:
            session.delete(_get(session, dataset_id))


def dataset_record(row: Dataset) -> DatasetRecord:
    return DatasetRecord(
        id=row.id,
        owner=row.owner,
        request_id=row.request_id,
        size_bytes=row.size_bytes,
        ready=row.ready,
        display_name=row.display_name,
        source=row.source,
        labels=dict(row.labels),
        example_count=row.example_count,
        content_hash=row.content_hash,
        created_at=row.created_at,
    )


def _json_line(example: Any, index: int) -> str:
    """An example as canonical JSON text (what is stored and hashed)."""
    if not isinstance(example, Mapping):
        raise InvalidArgument("must be a JSON object", field=f"examples[{index}]")
    try:
        return json.dumps(dict(example), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"not JSON: {err}", field=f"examples[{index}]") from err


def _get(session: Session, dataset_id: str, *, ready: bool = True) -> Dataset:
    """The dataset's row; NotFound if missing (or, with `ready`, still being uploaded)."""
    row = session.get(Dataset, dataset_id)
    if row is None or (ready and not row.ready):
        raise NotFound("dataset", dataset_id)
    return row


class _Lines:
    """Examples as (index, canonical JSON text), hashed as they pass."""

    def __init__(self, examples: Iterable[Mapping[str, Any]], digest: Any) -> None:
        self.examples = examples
        self.digest = digest
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for example in self.examples:
            line = _json_line(example, self.count)
            self.digest.update(line.encode() + b"\n")
            yield self.count, line
            self.count += 1


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
