"""Content-addressed blobs (safetensors masks, checkpoints).

A blob's key is the SHA-256 of its bytes: storing the same bytes twice keeps one copy, and
every read recomputes the hash; a mismatch raises IntegrityError, never returns the bytes.
Blob bytes live in their own table and are only read by `get`.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, union, update
from sqlalchemy.orm import Session

from edgeprune.storage.db import Database
from edgeprune.storage.errors import IntegrityError, InvalidArgument, NotFound
from edgeprune.storage.models import Blob, Circuit, Job, utcnow
from edgeprune.storage.sqlutil import insert_ignore

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MEDIA_TYPE = "application/octet-stream"


class BlobStore:
    """put / get / exists / size / delete_unreferenced; each call is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, data: bytes, *, media_type: str = DEFAULT_MEDIA_TYPE) -> str:
        """Store bytes (deduplicated) and return their SHA-256 hex digest."""
        with self.db.session() as session:
            return put_blob(session, data, media_type)

    def get(self, sha256: str) -> bytes:
        """The bytes stored under this digest. Raises NotFound, or IntegrityError when the
        stored bytes no longer hash to `sha256`."""
        _check_key(sha256)
        with self.db.session(write=False) as session:
            row = session.execute(select(Blob.data, Blob.size).where(Blob.sha256 == sha256)).first()
        if row is None:
            raise NotFound("blob", sha256)
        data, size = bytes(row.data), row.size
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256 or len(data) != size:
            raise IntegrityError(
                f"blob {sha256} is corrupt: its {len(data)} stored bytes hash to {actual}"
            )
        return data

    def exists(self, sha256: str) -> bool:
        _check_key(sha256)
        with self.db.session(write=False) as session:
            return session.get(Blob, sha256) is not None

    def size(self, sha256: str) -> int:
        """Stored size in bytes. Raises NotFound."""
        _check_key(sha256)
        with self.db.session(write=False) as session:
            blob = session.get(Blob, sha256)
            if blob is None:
                raise NotFound("blob", sha256)
            return blob.size

    def delete_unreferenced(self, *, min_age_s: float = 3600.0) -> int:
        """Delete blobs older than `min_age_s` that no job or circuit refers to (the grace
        period covers a blob stored just before the circuit that will reference it).
        Returns how many were removed."""
        cutoff = utcnow() - timedelta(seconds=min_age_s)
        with self.db.session() as session:
            return _delete_unreferenced(session, Blob.created_at < cutoff)


def put_blob(session: Session, data: bytes, media_type: str = DEFAULT_MEDIA_TYPE) -> str:
    """`BlobStore.put` inside the caller's transaction.

    If a copy exists but fails its hash (corrupted in place), the good bytes replace it. A
    copy that exists is stamped as stored now: `delete_unreferenced` spares blobs younger
    than its grace period, and one put again is about to be referenced again.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"blob data must be bytes, got {type(data).__name__}", field="data")
    data = bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    stored = session.execute(select(Blob.data).where(Blob.sha256 == sha256)).scalar_one_or_none()
    updated = 0
    if stored is not None:
        values: dict[str, Any] = {"created_at": utcnow()}
        if hashlib.sha256(bytes(stored)).hexdigest() != sha256:
            values.update(data=data, size=len(data))
        updated = session.execute(
            update(Blob).where(Blob.sha256 == sha256).values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
    if not updated:  # new, or deleted by the cleanup since it was read
        row = {"sha256": sha256, "size": len(data), "media_type": media_type, "data": data,
               "created_at": utcnow()}
        insert_ignore(session, Blob, [row], ["sha256"])  # a concurrent put may win the race
    return sha256


def drop_if_unreferenced(session: Session, sha256: str) -> bool:
    """Delete one blob inside the caller's transaction unless a job or circuit refers to
    it. Returns whether it was deleted."""
    return _delete_unreferenced(session, Blob.sha256 == sha256) > 0


def _delete_unreferenced(session: Session, condition: Any) -> int:
    referenced = union(
        select(Job.checkpoint_blob).where(Job.checkpoint_blob.is_not(None)),
        select(Circuit.mask_blob).where(Circuit.mask_blob.is_not(None)),
    )
    result = session.execute(
        delete(Blob)
        .where(condition, Blob.sha256.not_in(referenced.scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def _check_key(sha256: str) -> None:
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise InvalidArgument(f"not a SHA-256 hex digest: {sha256!r}", field="sha256")
