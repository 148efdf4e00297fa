"""gRPC servicers: convert the request, call a handler in a thread, convert the answer back.

Nothing here decides anything; errors of every layer become statuses in `errors.unary` /
`errors.streaming`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from edgeprune.service import converters, metrics
from edgeprune.service.errors import InvalidArgument, ResourceExhausted, streaming, unary
from edgeprune.service.handlers import CircuitHandler, DatasetHandler, JobHandler, ServerHandler
from edgeprune.service.handlers.circuits import EXPORT_CHUNK_BYTES
from edgeprune.service.interceptors import bearer_token, caller_of
from edgeprune.service.validation import parse_name
from edgeprune.service.watch import EventHub
from edgeprune.storage import JobState
from edgeprune.v1 import (
    circuit_pb2,
    circuit_pb2_grpc,
    common_pb2,
    dataset_pb2,
    dataset_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)

Context = grpc.aio.ServicerContext


def _caller(context: Context) -> str:
    return caller_of(bearer_token(context.invocation_metadata()))


def _full(view: int) -> bool:
    if view not in common_pb2.View.values():
        raise InvalidArgument("view", f"unknown value {view}")
    return view == common_pb2.VIEW_FULL


class DatasetServicer(dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self, handler: DatasetHandler) -> None:
        self.handler = handler

    @unary
    async def UploadDataset(self, request_iterator: AsyncIterator[dataset_pb2.UploadDatasetRequest],
                            context: Context) -> dataset_pb2.Dataset:
        limit = self.handler.config.limits.max_dataset_bytes
        metadata: dataset_pb2.DatasetMetadata | None = None
        chunks: list[bytes] = []
        size = 0
        async for part in request_iterator:
            kind = part.WhichOneof("part")
            if metadata is None:
                if kind != "metadata":
                    raise InvalidArgument("metadata", "the first message must carry the metadata")
                metadata = part.metadata
                self.handler.check_metadata(metadata)
            elif kind != "chunk":
                raise InvalidArgument("metadata", "only the first message may carry metadata")
            else:
                size += len(part.chunk)
                if size > limit:
                    raise ResourceExhausted(f"chunk: the dataset is larger than {limit} bytes",
                                            reason="LIMIT_EXCEEDED",
                                            violations=[("chunk", f"over {limit} bytes")])
                chunks.append(part.chunk)
        if metadata is None:
            raise InvalidArgument("metadata", "the upload is empty")
        record = await asyncio.to_thread(self.handler.upload, metadata, b"".join(chunks),
                                         caller=_caller(context))
        return converters.dataset_to_proto(record)

    @unary
    async def GetDataset(self, request: dataset_pb2.GetDatasetRequest,
                         context: Context) -> dataset_pb2.Dataset:
        record = await asyncio.to_thread(self.handler.get, parse_name(request.name, "datasets"))
        return converters.dataset_to_proto(record)

    @unary
    async def ListDatasets(self, request: dataset_pb2.ListDatasetsRequest,
                           context: Context) -> dataset_pb2.ListDatasetsResponse:
        page = await asyncio.to_thread(self.handler.list, request)
        return dataset_pb2.ListDatasetsResponse(
            datasets=[converters.dataset_to_proto(d) for d in page.items],
            next_page_token=page.next_page_token or "")

    @unary
    async def DeleteDataset(self, request: dataset_pb2.DeleteDatasetRequest,
                            context: Context) -> empty_pb2.Empty:
        await asyncio.to_thread(self.handler.delete, parse_name(request.name, "datasets"))
        return empty_pb2.Empty()


class JobServicer(job_pb2_grpc.JobServiceServicer):
    def __init__(self, handler: JobHandler, hub: EventHub) -> None:
        self.handler = handler
        self.hub = hub

    @unary
    async def SubmitJob(self, request: job_pb2.SubmitJobRequest, context: Context) -> job_pb2.Job:
        record = await asyncio.to_thread(self.handler.submit, request, caller=_caller(context))
        metrics.JOBS_SUBMITTED.labels(converters.KIND_DISCOVERY).inc()
        return converters.job_to_proto(record)

    @unary
    async def GetJob(self, request: job_pb2.GetJobRequest, context: Context) -> job_pb2.Job:
        full = _full(request.view)
        record = await asyncio.to_thread(self.handler.get, parse_name(request.name, "jobs"))
        return converters.job_to_proto(record, full=full)

    @unary
    async def ListJobs(self, request: job_pb2.ListJobsRequest,
                       context: Context) -> job_pb2.ListJobsResponse:
        full = _full(request.view)
        page = await asyncio.to_thread(self.handler.list, request)
        return job_pb2.ListJobsResponse(
            jobs=[converters.job_to_proto(j, full=full) for j in page.items],
            next_page_token=page.next_page_token or "")

    @unary
    async def CancelJob(self, request: job_pb2.CancelJobRequest, context: Context) -> job_pb2.Job:
        job_id = parse_name(request.name, "jobs")
        before = await asyncio.to_thread(self.handler.get, job_id)
        record = await asyncio.to_thread(self.handler.cancel, job_id)
        if not before.state.final and record.state == JobState.CANCELLED:
            metrics.JOBS_FINISHED.labels(record.kind, record.state.value).inc()
        return converters.job_to_proto(record)

    @streaming
    async def WatchJob(self, request: job_pb2.WatchJobRequest,
                       context: Context) -> AsyncIterator[job_pb2.JobEvent]:
        job_id = parse_name(request.name, "jobs")
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        await asyncio.to_thread(self.handler.get, job_id)  # NOT_FOUND before streaming
        async for event, job in self.hub.watch(job_id, request.after_sequence):
            yield converters.event_to_proto(event, job)


class CircuitServicer(circuit_pb2_grpc.CircuitServiceServicer):
    def __init__(self, handler: CircuitHandler, jobs: JobHandler) -> None:
        self.handler = handler
        self.jobs = jobs

    @unary
    async def GetCircuit(self, request: circuit_pb2.GetCircuitRequest,
                         context: Context) -> circuit_pb2.Circuit:
        full = _full(request.view)
        record = await asyncio.to_thread(self.handler.get, parse_name(request.name, "circuits"),
                                         full=full)
        return converters.circuit_to_proto(record, full=full)

    @unary
    async def ListCircuits(self, request: circuit_pb2.ListCircuitsRequest,
                           context: Context) -> circuit_pb2.ListCircuitsResponse:
        full = _full(request.view)
        page = await asyncio.to_thread(self.handler.list, request)
        return circuit_pb2.ListCircuitsResponse(
            circuits=[converters.circuit_to_proto(c, full=full) for c in page.items],
            next_page_token=page.next_page_token or "")

    @streaming
    async def ExportCircuit(self, request: circuit_pb2.ExportCircuitRequest,
                            context: Context) -> AsyncIterator[circuit_pb2.ExportCircuitResponse]:
        circuit_id = parse_name(request.name, "circuits")
        content_type, filename, data = await asyncio.to_thread(self.handler.export, circuit_id,
                                                               request.format)
        for offset in range(0, max(len(data), 1), EXPORT_CHUNK_BYTES):
            chunk = data[offset:offset + EXPORT_CHUNK_BYTES]
            if offset == 0:
                yield circuit_pb2.ExportCircuitResponse(content_type=content_type,
                                                        filename=filename, data=chunk)
            else:
                yield circuit_pb2.ExportCircuitResponse(data=chunk)

    @unary
    async def EvaluateCircuit(self, request: circuit_pb2.EvaluateCircuitRequest,
                              context: Context) -> job_pb2.Job:
        record = await asyncio.to_thread(self.jobs.evaluate, request, caller=_caller(context))
        metrics.JOBS_SUBMITTED.labels(converters.KIND_EVALUATION).inc()
        return converters.job_to_proto(record)

    @unary
    async def CompareCircuits(self, request: circuit_pb2.CompareCircuitsRequest,
                              context: Context) -> circuit_pb2.CompareCircuitsResponse:
        return await asyncio.to_thread(self.handler.compare, request)


class ServerServicer(server_pb2_grpc.ServerServiceServicer):
    def __init__(self, handler: ServerHandler) -> None:
        self.handler = handler

    @unary
    async def GetServerInfo(self, request: server_pb2.GetServerInfoRequest,
                            context: Context) -> server_pb2.GetServerInfoResponse:
        return await asyncio.to_thread(self.handler.info)
