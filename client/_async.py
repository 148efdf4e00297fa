"""The asyncio client: :class:`~edgeprune.client.Client`'s surface, awaited.

Requests, retry decisions, paging, watch resumption, upload chunks and export files
all come from the shared ``_core`` / ``_spec`` logic; this module only awaits the
calls and ``asyncio.sleep``s. See :class:`~edgeprune.client.Client` for the docs of
each method.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from edgeprune.v1 import (
    circuit_pb2,
    circuit_pb2_grpc,
    dataset_pb2,
    dataset_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)

from . import _spec
from ._core import (
    DEFAULT_TIMEOUT,
    Attempt,
    ClientSettings,
    ExportFile,
    Pager,
    TlsOption,
    WatchCursor,
    check_finished,
    new_request_id,
    upload_requests,
)
from ._retry import RetryPolicy
from .errors import from_rpc_error

if TYPE_CHECKING:  # typing.Self needs Python 3.11
    from typing_extensions import Self

__all__ = ["AsyncClient"]

_UNSET: Any = object()


class AsyncClient:
    """An asyncio edgeprune client; same methods as :class:`~edgeprune.client.Client`,
    awaited (``list_*`` and ``watch`` are async iterators).

    >>> async with AsyncClient("localhost:50051") as client:          # doctest: +SKIP
    ...     job = await client.submit(model="smollm2-135m", task="ioi", sparsity=0.98)
    ...     async for event in client.watch(job.name):
    ...         ...
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: TlsOption = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        stream_timeout: float | None = 600.0,
        retry: RetryPolicy | None = None,
        insecure: bool | None = None,
        load_balancing: str | None = None,
    ) -> None:
        self.settings = ClientSettings.create(
            target, token=token, tls=tls, timeout=timeout, stream_timeout=stream_timeout, retry=retry,
            insecure=insecure, load_balancing=load_balancing,
        )
        credentials = self.settings.credentials()
        options = self.settings.channel_options()
        self.channel: grpc.aio.Channel = (
            grpc.aio.secure_channel(self.settings.target, credentials, options)
            if credentials is not None
            else grpc.aio.insecure_channel(self.settings.target, options)
        )
        self._md = self.settings.metadata()
        self._jobs = job_pb2_grpc.JobServiceStub(self.channel)
        self._datasets = dataset_pb2_grpc.DatasetServiceStub(self.channel)
        self._circuits = circuit_pb2_grpc.CircuitServiceStub(self.channel)
        self._server = server_pb2_grpc.ServerServiceStub(self.channel)

    # -- plumbing -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(self, method: Callable[..., Any], request: Message, timeout: Any) -> Any:
        attempt = Attempt(self.settings, self.settings.timeout if timeout is _UNSET else timeout)
        while True:
            try:
                return await method(request, timeout=attempt.timeout(), metadata=self._md)
            except grpc.RpcError as error:
                await asyncio.sleep(attempt.failed(error))

    async def _pages(self, method: Callable[..., Any], request: Message, field: str) -> AsyncIterator[Any]:
        pager = Pager(request, field)
        while not pager.done:
            for item in pager.items(await self._unary(method, pager.request(), _UNSET)):
                yield item

    # -- jobs -----------------------------------------------------------------------------

    async def submit(
        self,
        spec: job_pb2.JobSpec | None = None,
        *,
        priority: int = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> job_pb2.Job:
        """See :meth:`Client.submit`."""
        request = _spec.submit_request(
            spec, priority=priority, labels=labels, request_id=request_id or new_request_id(), **options
        )
        return await self._unary(self._jobs.SubmitJob, request, timeout)

    async def get_job(
        self, name: str, *, full: bool = False, timeout: float | None = _UNSET
    ) -> job_pb2.Job:
        """See :meth:`Client.get_job`."""
        request = _spec.get_job_request(name, full=full)
        return await self._unary(self._jobs.GetJob, request, timeout)

    def list_jobs(
        self,
        *,
        states: Iterable[str | int] | None = None,
        model: str | None = None,
        labels: Mapping[str, str] | None = None,
        full: bool = False,
        page_size: int = 0,
    ) -> AsyncIterator[job_pb2.Job]:
        """See :meth:`Client.list_jobs`."""
        request = _spec.list_jobs_request(
            states=states, model=model, labels=labels, full=full, page_size=page_size
        )
        return self._pages(self._jobs.ListJobs, request, "jobs")

    async def cancel(self, name: str, *, timeout: float | None = _UNSET) -> job_pb2.Job:
        """See :meth:`Client.cancel`."""
        request = _spec.cancel_job_request(name)
        return await self._unary(self._jobs.CancelJob, request, timeout)

    async def delete_job(self, name: str, *, timeout: float | None = _UNSET) -> None:
        """See :meth:`Client.delete_job`."""
        request = _spec.delete_job_request(name)
        await self._unary(self._jobs.DeleteJob, request, timeout)

    async def watch(
        self, name: str, *, after_sequence: int = 0, reconnect_timeout: float = 60.0
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """See :meth:`Client.watch`."""
        cursor = WatchCursor(
            self.settings, _spec.resource_name("jobs", name), after_sequence,
            reconnect_timeout=reconnect_timeout,
        )
        while not cursor.finished:
            call = self._jobs.WatchJob(cursor.request(), metadata=self._md)
            try:
                async for event in call:
                    if cursor.accept(event):
                        yield event
                delay = 0.0
                if not cursor.finished:  # ended early: is the job over, or the server draining?
                    request = _spec.get_job_request(cursor.name)
                    delay = cursor.ended(
                        await self._jobs.GetJob(request, timeout=self.settings.timeout, metadata=self._md)
                    )
            except grpc.RpcError as error:
                delay = cursor.failed(error)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def wait(
        self, name: str, *, on_event: Callable[[job_pb2.JobEvent], None] | None = None
    ) -> job_pb2.Job:
        """See :meth:`Client.wait`."""
        async for event in self.watch(name):
            if on_event is not None:
                on_event(event)
        return check_finished(await self.get_job(name))

    # -- datasets -------------------------------------------------------------------------

    async def upload_dataset(
        self,
        source: str | os.PathLike[str] | Iterable[Any],
        *,
        display_name: str | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
    ) -> dataset_pb2.Dataset:
        """See :meth:`Client.upload_dataset`."""
        requests = upload_requests(
            source, display_name=display_name, labels=labels, request_id=request_id or new_request_id()
        )
        try:
            return await self._datasets.UploadDataset(
                requests,
                timeout=self.settings.stream_timeout if timeout is _UNSET else timeout,
                metadata=self._md,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def get_dataset(self, name: str, *, timeout: float | None = _UNSET) -> dataset_pb2.Dataset:
        """See :meth:`Client.get_dataset`."""
        request = _spec.get_dataset_request(name)
        return await self._unary(self._datasets.GetDataset, request, timeout)

    def list_datasets(self, *, page_size: int = 0) -> AsyncIterator[dataset_pb2.Dataset]:
        """See :meth:`Client.list_datasets`."""
        request = _spec.list_datasets_request(page_size=page_size)
        return self._pages(self._datasets.ListDatasets, request, "datasets")

    async def delete_dataset(self, name: str, *, timeout: float | None = _UNSET) -> None:
        """See :meth:`Client.delete_dataset`."""
        request = _spec.delete_dataset_request(name)
        await self._unary(self._datasets.DeleteDataset, request, timeout)

    # -- circuits -------------------------------------------------------------------------

    async def get_circuit(
        self, name: str, *, full: bool = False, timeout: float | None = _UNSET
    ) -> circuit_pb2.Circuit:
        """See :meth:`Client.get_circuit`."""
        request = _spec.get_circuit_request(name, full=full)
        return await self._unary(self._circuits.GetCircuit, request, timeout)

    def list_circuits(self, **filters: Any) -> AsyncIterator[circuit_pb2.Circuit]:
        """See :meth:`Client.list_circuits`."""
        request = _spec.list_circuits_request(**filters)
        return self._pages(self._circuits.ListCircuits, request, "circuits")

    async def export_circuit(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        format: str | int = "json",
        timeout: float | None = _UNSET,
        **drawing: Any,
    ) -> Path:
        """See :meth:`Client.export_circuit`."""
        request = _spec.export_request(name, format, **drawing)
        return await self._export(self._circuits.ExportCircuit, request, path, timeout)

    async def export_job_plot(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        plot: str | int | None = None,
        format: str | int = "svg",
        timeout: float | None = _UNSET,
    ) -> Path:
        """See :meth:`Client.export_job_plot`."""
        request = _spec.job_plot_request(name, plot, format)
        return await self._export(self._jobs.ExportJobPlot, request, path, timeout)

    async def _export(self, method: Any, request: Any, path: str | os.PathLike[str],
                      timeout: float | None) -> Path:
        """See :meth:`Client._export`."""
        sink = ExportFile(path)
        stream = method(
            request,
            timeout=self.settings.stream_timeout if timeout is _UNSET else timeout,
            metadata=self._md,
        )
        try:
            async for chunk in stream:
                sink.write(chunk)
            return sink.finish()
        except grpc.RpcError as error:
            sink.abort()
            raise from_rpc_error(error) from None
        except BaseException:
            sink.abort()
            stream.cancel()
            raise

    async def evaluate_circuit(
        self,
        circuit: str,
        *,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> job_pb2.Job:
        """See :meth:`Client.evaluate_circuit`."""
        request = _spec.evaluate_request(circuit, request_id=request_id or new_request_id(), **options)
        return await self._unary(self._circuits.EvaluateCircuit, request, timeout)

    async def compare_circuits(
        self, first: str, second: str, *, timeout: float | None = _UNSET
    ) -> circuit_pb2.CompareCircuitsResponse:
        """See :meth:`Client.compare_circuits`."""
        request = _spec.compare_request(first, second)
        return await self._unary(self._circuits.CompareCircuits, request, timeout)

    async def import_circuit(
        self,
        source: str | os.PathLike[str] | bytes | Mapping[str, Any],
        *,
        model: str,
        method: str | int | None = None,
        task: str = "",
        request_id: str | None = None,
        timeout: float | None = _UNSET,
    ) -> circuit_pb2.Circuit:
        """See :meth:`Client.import_circuit`."""
        request = _spec.import_request(source, model=model, method=method, task=task,
                                       request_id=request_id or new_request_id())
        return await self._unary(self._circuits.ImportCircuit, request, timeout)

    async def delete_circuit(self, name: str, *, timeout: float | None = _UNSET) -> None:
        """See :meth:`Client.delete_circuit`."""
        request = _spec.delete_circuit_request(name)
        await self._unary(self._circuits.DeleteCircuit, request, timeout)

    # -- server ---------------------------------------------------------------------------

    async def server_info(self, *, timeout: float | None = _UNSET) -> server_pb2.GetServerInfoResponse:
        """See :meth:`Client.server_info`."""
        return await self._unary(self._server.GetServerInfo, server_pb2.GetServerInfoRequest(), timeout)

