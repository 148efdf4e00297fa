"""Datasets: parse and check uploaded JSONL, store, read, list, delete."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edgeprune.service.config import Config
from edgeprune.service.errors import InvalidArgument, ResourceExhausted
from edgeprune.service.validation import MAX_TEXT, Violations, check_labels, check_page
from edgeprune.storage import AlreadyExists, DatasetRecord, DatasetRepo, NewDataset, Page
from edgeprune.v1 import dataset_pb2

EXAMPLE_KEYS = {"clean", "corrupted", "target", "distractor"}


def parse_jsonl(content: bytes, *, max_examples: int) -> list[dict[str, Any]]:
    """Examples from JSONL bytes; INVALID_ARGUMENT names the line (field ``chunk``)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument("chunk", f"content is not UTF-8 (byte {err.start})") from err
    examples: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(examples) == max_examples:
            raise ResourceExhausted(f"chunk: more than {max_examples} examples",
                                    reason="LIMIT_EXCEEDED", violations=[("chunk", "too many examples")])
        examples.append(_example(line, f"chunk line {number}"))
    if not examples:
        raise InvalidArgument("chunk", "the dataset has no examples")
    return examples


def _example(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise InvalidArgument("chunk", f"{where}: not JSON ({err.msg})") from err
    if not isinstance(obj, dict):
        raise InvalidArgument("chunk", f"{where}: expected a JSON object")
    unknown = set(obj) - EXAMPLE_KEYS
    if unknown:
        raise InvalidArgument("chunk", f"{where}: unknown keys {sorted(unknown)}")
    for key in ("clean", "corrupted"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise InvalidArgument("chunk", f"{where}: `{key}` must be a non-empty string")
    for key in EXAMPLE_KEYS:
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
            raise InvalidArgument("chunk", f"{where}: `{key}` must be a string of at most "
                                           f"{MAX_TEXT} characters")
    return {k: obj[k] for k in ("clean", "corrupted", "target", "distractor") if obj.get(k)}


class DatasetHandler:
    def __init__(self, datasets: DatasetRepo, config: Config) -> None:
        self.datasets = datasets
        self.config = config

    def check_metadata(self, metadata: dataset_pb2.DatasetMetadata) -> None:
        v = Violations()
        check_labels(v, "metadata.labels", metadata.labels, self.config)
        if len(metadata.request_id) > 128:
            v.bad("metadata.request_id", "must be at most 128 characters")
        if len(metadata.display_name) > 256:
            v.bad("metadata.display_name", "must be at most 256 characters")
        v.raise_if_any()

    def upload(self, metadata: dataset_pb2.DatasetMetadata, content: bytes,
               *, caller: str = "") -> DatasetRecord:
        """Store an uploaded dataset. With a request_id the dataset id is derived from
        (caller, request_id), so a repeated upload returns the first dataset."""
        self.check_metadata(metadata)
        examples = parse_jsonl(content, max_examples=self.config.limits.max_examples)
        dataset_id = None
        if metadata.request_id:
            key = f"{caller}\0{metadata.request_id}".encode()
            dataset_id = "d" + hashlib.sha256(key).hexdigest()[:31]
        new = NewDataset(display_name=metadata.display_name, source=f"upload:{len(content)}",
                         labels=dict(metadata.labels), id=dataset_id)
        try:
            return self.datasets.create(new, examples)
        except AlreadyExists:
            if dataset_id is None:
                raise
            return self.datasets.get(dataset_id)

    def get(self, dataset_id: str) -> DatasetRecord:
        return self.datasets.get(dataset_id)

    def list(self, request: dataset_pb2.ListDatasetsRequest) -> Page[DatasetRecord]:
        v = Violations()
        size = check_page(v, request.page_size, self.config)
        v.raise_if_any()
        return self.datasets.list(page_size=size, page_token=request.page_token or None)

    def delete(self, dataset_id: str) -> None:
        self.datasets.delete(dataset_id)
