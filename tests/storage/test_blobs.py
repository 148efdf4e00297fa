"""Blobs: content addressing, deduplication, and the hash check on every read."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from edgeprune.storage import (
    BlobStore,
    CircuitRepo,
    Database,
    IntegrityError,
    InvalidArgument,
    NewCircuit,
    NotFound,
)
from edgeprune.storage.models import Blob, utcnow

DATA = b"safetensors bytes" * 1000


def test_put_get_dedup(db: Database) -> None:
    blobs = BlobStore(db)
    sha = blobs.put(DATA)
    assert sha == hashlib.sha256(DATA).hexdigest()
    assert blobs.put(DATA) == sha
    assert blobs.get(sha) == DATA and blobs.size(sha) == len(DATA) and blobs.exists(sha)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 1


def test_altered_bytes_are_detected_on_read(db: Database) -> None:
    blobs = BlobStore(db)
    sha = blobs.put(DATA)
    with db.session() as session:
        tampered = DATA[:-1] + b"X"
        session.execute(update(Blob).where(Blob.sha256 == sha).values(data=tampered))
    with pytest.raises(IntegrityError, match=sha):
        blobs.get(sha)
    assert blobs.put(DATA) == sha  # storing the good bytes again repairs the copy
    assert blobs.get(sha) == DATA


def test_missing_and_malformed_keys(db: Database) -> None:
    blobs = BlobStore(db)
    with pytest.raises(NotFound):
        blobs.get("0" * 64)
    with pytest.raises(InvalidArgument):
        blobs.get("not-a-hash")
    with pytest.raises(InvalidArgument):
        blobs.put("text")  # type: ignore[arg-type]


def test_delete_unreferenced_keeps_referenced_blobs(db: Database) -> None:
    blobs = BlobStore(db)
    kept, dropped = blobs.put(b"mask"), blobs.put(b"orphan")
    CircuitRepo(db).create(NewCircuit(model="m", method="eap", edges=["a->b"], total_edge_count=2,
                                      mask_blob=kept))
    assert blobs.delete_unreferenced() == 0  # both still inside the grace period
    assert blobs.delete_unreferenced(min_age_s=0) == 1
    assert blobs.exists(kept) and not blobs.exists(dropped)


def test_a_blob_put_again_gets_a_new_grace_period(db: Database) -> None:
    """A worker puts a mask that an old, unreferenced blob already holds, then stores the
    circuit that refers to it: the cleanup in between must not take it."""
    blobs = BlobStore(db)
    old, other = blobs.put(b"shared mask"), blobs.put(b"forgotten")
    with db.session() as session:  # both stored two hours ago
        session.execute(update(Blob).values(created_at=utcnow() - timedelta(hours=2)))
    assert blobs.put(b"shared mask") == old
    assert blobs.delete_unreferenced(min_age_s=3600) == 1
    assert blobs.exists(old) and not blobs.exists(other)
