"""Datasets: store checked uploads (parsed as they stream in, see uploads.py), read, list,
delete."""

from __future__ import annotations

import threading

from edgeprune.service import tracing
from edgeprune.service.config import Config
from edgeprune.service.errors import ResourceExhausted
from edgeprune.service.principals import Principal
from edgeprune.service.uploads import StreamedUpload, UploadSlots
from edgeprune.service.validation import (
    MAX_DISPLAY_NAME,
    Violations,
    check_labels,
    check_page,
)
from edgeprune.storage import DatasetRecord, DatasetRepo, NewDataset, NotFound, Page
from edgeprune.v1 import dataset_pb2


class DatasetHandler:
    def __init__(self, datasets: DatasetRepo, config: Config) -> None:
        self.datasets = datasets
        self.config = config
        self.upload_slots = UploadSlots(config.limits.max_concurrent_uploads)
        # Uploads are received side by side but stored one at a time: each is one transaction,
        # and on SQLite a second large insert would outwait the busy timeout for the write lock.
        self._storing = threading.Lock()

    def begin_upload(self, metadata: dataset_pb2.DatasetMetadata,
                     who: Principal) -> StreamedUpload:
        """Check the metadata and the caller's quota and start parsing an upload (the caller
        holds an upload slot and closes it)."""
        self.check_metadata(metadata)
        self._check_quota(metadata, who)
        return StreamedUpload(max_bytes=self.config.limits.max_dataset_bytes,
                              max_examples=self.config.limits.max_examples)

    def check_metadata(self, metadata: dataset_pb2.DatasetMetadata) -> None:
        v = Violations()
        check_labels(v, "metadata.labels", metadata.labels, self.config)
        if len(metadata.request_id) > 128:
            v.bad("metadata.request_id", "must be at most 128 characters")
        if len(metadata.display_name) > MAX_DISPLAY_NAME:
            v.bad("metadata.display_name", f"must be at most {MAX_DISPLAY_NAME} characters")
        v.raise_if_any()

    def upload(self, metadata: dataset_pb2.DatasetMetadata, upload: StreamedUpload,
               who: Principal) -> DatasetRecord:
        """Store an uploaded dataset owned by the caller. A request_id is unique per owner:
        repeating an upload with the same content returns the first dataset, other content
        answers ALREADY_EXISTS."""
        upload.finish()
        new = NewDataset(owner=who.name, request_id=metadata.request_id or None,
                         display_name=metadata.display_name, source="upload", size_bytes=upload.size,
                         labels=dict(metadata.labels))
        with self._storing:  # counted again where uploads are stored one at a time
            self._check_quota(metadata, who)
            with tracing.span("storage.dataset.create", **{"dataset.bytes": upload.size}):
                return self.datasets.create(new, upload.examples())

    def _check_quota(self, metadata: dataset_pb2.DatasetMetadata, who: Principal) -> None:
        """RESOURCE_EXHAUSTED when a non-admin principal already keeps its share of datasets
        (a repeated upload of one it has is still answered)."""
        limit = self.config.limits.max_datasets_per_principal
        if who.admin or self.datasets.count(owner=who.name) < limit:
            return
        if metadata.request_id and self.datasets.find_request(who.name, metadata.request_id):
            return
        raise ResourceExhausted(f"{who.name} keeps {limit} datasets already; delete some first",
                                reason="DATASET_QUOTA")

    def get(self, dataset_id: str, who: Principal) -> DatasetRecord:
        """Another principal's dataset is NOT_FOUND exactly as a missing one is."""
        record = self.datasets.get(dataset_id)
        if not who.may_see(record.owner):
            raise NotFound("dataset", dataset_id)
        return record

    def list(self, request: dataset_pb2.ListDatasetsRequest, who: Principal) -> Page[DatasetRecord]:
        v = Violations()
        size = check_page(v, request.page_size, self.config)
        v.raise_if_any()
        return self.datasets.list(page_size=size, page_token=request.page_token or None,
                                  owner=who.owner_filter)

    def delete(self, dataset_id: str, who: Principal) -> None:
        self.get(dataset_id, who)
        self.datasets.delete(dataset_id)
