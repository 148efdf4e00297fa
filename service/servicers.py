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
from edgeprune.service.errors import InvalidArgument, streaming, unary
from edgeprune.service.handlers import CircuitHandler, DatasetHandler, JobHandler, ServerHandler
from edgeprune.service.handlers.circuits import EXPORT_CHUNK_BYTES
from edgeprune.service.handlers.plots import PlotHandler
from edgeprune.service.principals import Principal, Principals
from edgeprune.service.validation import parse_circuit_name, parse_name
from edgeprune.service.watch import EventHub
from edgeprune.storage import JobState
from edgeprune.storage.limits import MAX_INTEGER
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


class _Servicer:
    """Resolves the caller of a call (the auth interceptor already refused unknown tokens)."""

    def __init__(self, principals: Principals) -> None:
        self.principals = principals

    def who(self, context: Context) -> Principal:
        principal = self.principals.of_metadata(context.invocation_metadata())
        assert principal is not None, "the auth interceptor admits only known tokens"
        return principal


def _peer_host(context: Context) -> str:
    """The caller's address without its port (``ipv4:10.0.0.5``): a client's channels share it."""
    return context.peer().rsplit(":", 1)[0]


def _chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, bytes) of every chunk of an export; an empty export is one empty chunk."""
    return [(offset, data[offset:offset + EXPORT_CHUNK_BYTES])
            for offset in range(0, max(len(data), 1), EXPORT_CHUNK_BYTES)]


def _full(view: int) -> bool:
    if view not in common_pb2.View.values():
        raise InvalidArgument(f"unknown value {view}", field="view")
    return view == common_pb2.VIEW_FULL


class DatasetServicer(_Servicer, dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self, handler: DatasetHandler, principals: Principals) -> None:
        super().__init__(principals)
        self.handler = handler

    @unary
    async def UploadDataset(self, request_iterator: AsyncIterator[dataset_pb2.UploadDatasetRequest],
                            context: Context) -> dataset_pb2.Dataset:
        parts = aiter(request_iterator)
        first = await anext(parts, None)
        if first is None:
            raise InvalidArgument("the upload is empty", field="metadata")
        if first.WhichOneof("part") != "metadata":
            raise InvalidArgument("the first message must carry the metadata", field="metadata")
        with self.handler.upload_slots.hold():
            upload = await asyncio.to_thread(self.handler.begin_upload, first.metadata,
                                             self.who(context))
            try:
                async for part in parts:
                    if part.WhichOneof("part") != "chunk":
                        raise InvalidArgument("only the first message may carry metadata",
                                              field="metadata")
                    # Parsed as it arrives (in a thread: parsing a chunk takes milliseconds).
                    await asyncio.to_thread(upload.feed, part.chunk)
                record = await asyncio.to_thread(self.handler.upload, first.metadata, upload,
                                                 self.who(context))
            finally:
                upload.close()
        return converters.dataset_to_proto(record)

    @unary
    async def GetDataset(self, request: dataset_pb2.GetDatasetRequest,
                         context: Context) -> dataset_pb2.Dataset:
        record = await asyncio.to_thread(self.handler.get, parse_name(request.name, "datasets"),
                                         self.who(context))
        return converters.dataset_to_proto(record)

    @unary
    async def ListDatasets(self, request: dataset_pb2.ListDatasetsRequest,
                           context: Context) -> dataset_pb2.ListDatasetsResponse:
        page = await asyncio.to_thread(self.handler.list, request, self.who(context))
        return dataset_pb2.ListDatasetsResponse(
            datasets=[converters.dataset_to_proto(d) for d in page.items],
            next_page_token=page.next_page_token or "")

    @unary
    async def DeleteDataset(self, request: dataset_pb2.DeleteDatasetRequest,
                            context: Context) -> empty_pb2.Empty:
        await asyncio.to_thread(self.handler.delete, parse_name(request.name, "datasets"),
                                self.who(context))
        return empty_pb2.Empty()


class JobServicer(_Servicer, job_pb2_grpc.JobServiceServicer):
    def __init__(self, handler: JobHandler, hub: EventHub, principals: Principals,
                 plots: PlotHandler) -> None:
        super().__init__(principals)
        self.handler = handler
        self.hub = hub
        self.plots = plots

    @unary
    async def SubmitJob(self, request: job_pb2.SubmitJobRequest, context: Context) -> job_pb2.Job:
        record = await asyncio.to_thread(self.handler.submit, request, self.who(context))
        metrics.JOBS_SUBMITTED.labels(converters.KIND_DISCOVERY).inc()
        return converters.job_to_proto(record)

    @unary
    async def GetJob(self, request: job_pb2.GetJobRequest, context: Context) -> job_pb2.Job:
        full = _full(request.view)
        record = await asyncio.to_thread(self.handler.get, parse_name(request.name, "jobs"),
                                         self.who(context), full=full)
        return converters.job_to_proto(record, full=full)

    @unary
    async def ListJobs(self, request: job_pb2.ListJobsRequest,
                       context: Context) -> job_pb2.ListJobsResponse:
        full = _full(request.view)
        page = await asyncio.to_thread(self.handler.list, request, self.who(context))
        return job_pb2.ListJobsResponse(
            jobs=[converters.job_to_proto(j, full=full) for j in page.items],
            next_page_token=page.next_page_token or "")

    @unary
    async def CancelJob(self, request: job_pb2.CancelJobRequest, context: Context) -> job_pb2.Job:
        job_id = parse_name(request.name, "jobs")
        who = self.who(context)
        before = await asyncio.to_thread(self.handler.get, job_id, who)
        record = await asyncio.to_thread(self.handler.cancel, job_id, who)
        if not before.state.final and record.state == JobState.CANCELLED:
            metrics.JOBS_FINISHED.labels(record.kind, record.state.value).inc()
        return converters.job_to_proto(record)

    @unary
    async def DeleteJob(self, request: job_pb2.DeleteJobRequest,
                        context: Context) -> empty_pb2.Empty:
        await asyncio.to_thread(self.handler.delete, parse_name(request.name, "jobs"),
                                self.who(context))
        return empty_pb2.Empty()

    @streaming
    async def WatchJob(self, request: job_pb2.WatchJobRequest,
                       context: Context) -> AsyncIterator[job_pb2.JobEvent]:
        job_id = parse_name(request.name, "jobs")
        if not 0 <= request.after_sequence <= MAX_INTEGER:  # sequence numbers are INTEGERs
            raise InvalidArgument(f"must be in [0, {MAX_INTEGER}]", field="after_sequence")
        who = self.who(context)
        job = await asyncio.to_thread(self.handler.get, job_id, who)  # NOT_FOUND before streaming
        async for event, final in self.hub.watch(job, request.after_sequence,
                                                 client=who.name or _peer_host(context)):
            yield converters.event_to_proto(event, final)

    @streaming
    async def ExportJobPlot(self, request: job_pb2.ExportJobPlotRequest,
                            context: Context) -> AsyncIterator[job_pb2.ExportJobPlotResponse]:
        content_type, filename, data = await asyncio.to_thread(
            self.plots.job_plot, parse_name(request.name, "jobs"), request.plot, request.format,
            self.who(context))
        for offset, chunk in _chunks(data):
            if offset == 0:
                yield job_pb2.ExportJobPlotResponse(content_type=content_type, filename=filename,
                                                    data=chunk)
            else:
                yield job_pb2.ExportJobPlotResponse(data=chunk)


class CircuitServicer(_Servicer, circuit_pb2_grpc.CircuitServiceServicer):
    def __init__(self, handler: CircuitHandler, jobs: JobHandler, principals: Principals) -> None:
        super().__init__(principals)
        self.handler = handler
        self.jobs = jobs

    @unary
    async def GetCircuit(self, request: circuit_pb2.GetCircuitRequest,
                         context: Context) -> circuit_pb2.Circuit:
        full = _full(request.view)
        record = await asyncio.to_thread(self.handler.get, parse_circuit_name(request.name),
                                         self.who(context), full=full)
        return converters.circuit_to_proto(record, full=full)

    @unary
    async def ListCircuits(self, request: circuit_pb2.ListCircuitsRequest,
                           context: Context) -> circuit_pb2.ListCircuitsResponse:
        full = _full(request.view)
        page = await asyncio.to_thread(self.handler.list, request, self.who(context))
        return circuit_pb2.ListCircuitsResponse(
            circuits=[converters.circuit_to_proto(c, full=full) for c in page.items],
            next_page_token=page.next_page_token or "")

    @streaming
    async def ExportCircuit(self, request: circuit_pb2.ExportCircuitRequest,
                            context: Context) -> AsyncIterator[circuit_pb2.ExportCircuitResponse]:
        circuit_id = parse_circuit_name(request.name)
        content_type, filename, data = await asyncio.to_thread(self.handler.export, circuit_id,
                                                               request, self.who(context))
        for offset, chunk in _chunks(data):
            if offset == 0:
                yield circuit_pb2.ExportCircuitResponse(content_type=content_type,
                                                        filename=filename, data=chunk)
            else:
                yield circuit_pb2.ExportCircuitResponse(data=chunk)

    @unary
    async def EvaluateCircuit(self, request: circuit_pb2.EvaluateCircuitRequest,
                              context: Context) -> job_pb2.Job:
        record = await asyncio.to_thread(self.jobs.evaluate, request, self.who(context))
        metrics.JOBS_SUBMITTED.labels(converters.KIND_EVALUATION).inc()
        return converters.job_to_proto(record)

    @unary
    async def CompareCircuits(self, request: circuit_pb2.CompareCircuitsRequest,
                              context: Context) -> circuit_pb2.CompareCircuitsResponse:
        return await asyncio.to_thread(self.handler.compare, request, self.who(context))

    @unary
    async def ImportCircuit(self, request: circuit_pb2.ImportCircuitRequest,
                            context: Context) -> circuit_pb2.Circuit:
        record = await asyncio.to_thread(self.handler.import_circuit, request, self.who(context))
        return converters.circuit_to_proto(record)

    @unary
    async def DeleteCircuit(self, request: circuit_pb2.DeleteCircuitRequest,
                            context: Context) -> empty_pb2.Empty:
        await asyncio.to_thread(self.handler.delete, parse_circuit_name(request.name),
                                self.who(context))
        return empty_pb2.Empty()


class ServerServicer(server_pb2_grpc.ServerServiceServicer):
    def __init__(self, handler: ServerHandler) -> None:
        self.handler = handler

    @unary
    async def GetServerInfo(self, request: server_pb2.GetServerInfoRequest,
                            context: Context) -> server_pb2.GetServerInfoResponse:
        return await asyncio.to_thread(self.handler.info)
