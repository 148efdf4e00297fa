"""Datasets and their examples.

Examples are stored one row each, keyed by (dataset, index), so a 100k-example dataset is
read in batches by index range without loading the rest.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import exc, func, select, tuple_
from sqlalchemy.orm import Session

from edgeprune.storage.db import Database
from edgeprune.storage.errors import AlreadyExists, InvalidArgument, NotFound
from edgeprune.storage.models import Dataset, DatasetExample, utcnow
from edgeprune.storage.paging import decode_token, encode_token, page_size_or_default
from edgeprune.storage.records import DatasetRecord, NewDataset, Page
from edgeprune.storage.sqlutil import bulk_insert

_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62})$")
MAX_BATCH = 10_000


class DatasetRepo:
    """Create, read, list and delete datasets; each method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, new: NewDataset, examples: Iterable[Mapping[str, Any]]) -> DatasetRecord:
        """Store a dataset and its examples (JSON objects, kept in order), in one transaction.

        `new.id` must be 1-63 lowercase letters, digits or hyphens (None: generated).
        Raises AlreadyExists if the id is taken; InvalidArgument for a bad id or examples
        that are not JSON objects.
        """
        dataset_id = new.id if new.id is not None else uuid.uuid4().hex
        if not _ID.match(dataset_id):
            raise InvalidArgument("dataset_id", "use 1-63 lowercase letters, digits or hyphens")
        digest = hashlib.sha256()
        count = 0

        def rows() -> Iterator[tuple[str, int, Any]]:
            nonlocal count
            for example in examples:
                line = _json_line(example, count)
                digest.update(line.encode() + b"\n")
                yield dataset_id, count, line  # JSON text, as bulk_insert wants it
                count += 1

        try:
            with self.db.session() as session:
                if session.get(Dataset, dataset_id) is not None:
                    raise AlreadyExists("dataset", dataset_id)
                row = Dataset(
                    id=dataset_id,
                    owner=new.owner,
                    request_id=new.request_id,
                    display_name=new.display_name,
                    source=new.source,
                    task=new.task,
                    model=new.model,
                    tokenizer=new.tokenizer,
                    description=new.description,
                    labels=dict(new.labels),
                    example_count=0,
                    content_hash="",
                    created_at=utcnow(),
                )
                session.add(row)
                session.flush()
                bulk_insert(session, DatasetExample, ["dataset_id", "idx", "data"], rows())
                row.example_count = count
                row.content_hash = digest.hexdigest()
                session.flush()
                return dataset_record(row)
        except exc.IntegrityError as err:
            # The id, or this owner's request_id, is taken (perhaps by a concurrent create).
            earlier = (self.find_request(new.owner, new.request_id)
                       if new.request_id is not None else None)
            if earlier is None:
                raise AlreadyExists("dataset", dataset_id) from err
            for example in examples:  # the rest of the content, to compare with the first
                digest.update(_json_line(example, count).encode() + b"\n")
                count += 1
            if digest.hexdigest() != earlier.content_hash:
                raise AlreadyExists(
                    "dataset", new.request_id,
                    f"request_id {new.request_id!r} was already used for a dataset with other "
                    f"content ({earlier.id})") from err
            return earlier


    def get(self, dataset_id: str) -> DatasetRecord:
        """Raises NotFound."""
        with self.db.session(write=False) as session:
            return dataset_record(_get(session, dataset_id))

    def list(
        self, *, page_size: int = 50, page_token: str | None = None, task: str | None = None,
        owner: str | None = None,
    ) -> Page[DatasetRecord]:
        """Newest first; keyset pagination (the token is opaque and bound to the filters)."""
        size = page_size_or_default(page_size)
        filters = {"task": task, "owner": owner}
        after = decode_token(page_token, filters)
        query = select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(size + 1)
        if task is not None:
            query = query.where(Dataset.task == task)
        if owner is not None:
            query = query.where(Dataset.owner == owner)
        if after is not None:
            try:
                created, last_id = datetime.fromisoformat(after[0]), str(after[1])
            except (IndexError, TypeError, ValueError) as err:
                raise InvalidArgument("page_token", "malformed page token") from err
            query = query.where(tuple_(Dataset.created_at, Dataset.id) < tuple_(created, last_id))
        with self.db.session(write=False) as session:
            rows = list(session.scalars(query))
        items = [dataset_record(r) for r in rows[:size]]
        token = None
        if len(rows) > size:
            token = encode_token([items[-1].created_at.isoformat(), items[-1].id], filters)
        return Page(items, token)

    def count(self, *, owner: str | None = None) -> int:
        """How many datasets there are (of `owner`)."""
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
            raise InvalidArgument("offset", "must not be negative")
        if not 0 < limit <= MAX_BATCH:
            raise InvalidArgument("limit", f"must be between 1 and {MAX_BATCH}")
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
        display_name=row.display_name,
        source=row.source,
        task=row.task,
        model=row.model,
        tokenizer=row.tokenizer,
        description=row.description,
        labels=dict(row.labels),
        example_count=row.example_count,
        content_hash=row.content_hash,
        created_at=row.created_at,
    )


def _json_line(example: Any, index: int) -> str:
    """An example as canonical JSON text (what is stored and hashed)."""
    if not isinstance(example, Mapping):
        raise InvalidArgument(f"examples[{index}]", "must be a JSON object")
    try:
        return json.dumps(dict(example), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"examples[{index}]", f"not JSON: {err}") from err


def _get(session: Session, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound("dataset", dataset_id)
    return row
