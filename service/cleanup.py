"""Storage upkeep in the API process: expired jobs, abandoned uploads, unreferenced blobs.

Every ``cleanup_interval_s`` the API deletes finished jobs that ended more than
``job_retention_days`` ago (when set), datasets whose upload a dead process left unfinished
(after UNFINISHED_UPLOAD_S), and then the blobs nothing refers to any more (masks of deleted
circuits, checkpoints of deleted jobs) once they are ``blob_grace_s`` old. Several API replicas
may run it at once: each step is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from edgeprune.service.config import Config
from edgeprune.storage import BlobStore, Database, DatasetRepo, JobRepo, StorageError
from edgeprune.storage.models import utcnow

log = logging.getLogger(__name__)

JOBS_PER_TRANSACTION = 500  # keeps each delete's lock short on a large backlog
# An upload still unfinished after this long lost its process: a live one (at most
# max_dataset_bytes, stored in short transactions) takes minutes at worst.
UNFINISHED_UPLOAD_S = 6 * 3600.0


@dataclass(frozen=True)
class Swept:
    jobs: int
    blobs: int
    uploads: int


def sweep(config: Config, jobs: JobRepo, blobs: BlobStore, datasets: DatasetRepo) -> Swept:
    """One pass: expired jobs first, so their checkpoints are freed in the same pass."""
    deleted = 0
    if config.job_retention_days > 0:
        cutoff = utcnow() - timedelta(days=config.job_retention_days)
        while True:
            count = jobs.delete_finished_before(cutoff, limit=JOBS_PER_TRANSACTION)
            deleted += count
            if count < JOBS_PER_TRANSACTION:
                break
    abandoned = datasets.delete_unfinished(older_than_s=UNFINISHED_UPLOAD_S)
    freed = blobs.delete_unreferenced(min_age_s=config.blob_grace_s)
    if deleted or freed or abandoned:
        log.info("cleanup: deleted %d expired jobs, %d abandoned uploads and %d unreferenced "
                 "blobs", deleted, abandoned, freed)
    return Swept(deleted, freed, abandoned)


async def run_forever(config: Config, db: Database) -> None:
    """`sweep` now and every ``cleanup_interval_s`` until cancelled; a failed pass (the
    database away) is logged and the next one tries again."""
    jobs, blobs, datasets = JobRepo(db), BlobStore(db), DatasetRepo(db)
    while True:
        try:
            await asyncio.to_thread(sweep, config, jobs, blobs, datasets)
        except StorageError as err:
            log.warning("cleanup failed: %s", err)
        await asyncio.sleep(config.cleanup_interval_s)
