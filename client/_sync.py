"""The blocking client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

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

__all__ = ["Client"]

_R = TypeVar("_R")
_UNSET: Any = object()


class Client:
    """A blocking edgeprune client.

    >>> with Client("localhost:50051") as client:                     # doctest: +SKIP
    ...     job = client.submit(model="smollm2-135m", task="ioi", sparsity=0.98, steps=200)
    ...     for event in client.watch(job.name):
    ...         print(event.progress.step, event.progress.kl)
    ...     circuit = client.get_circuit(client.wait(job.name).result.circuits[0], full=True)

    Every unary call has a deadline (``timeout``, default 30 s, per call overridable
    with ``timeout=``) and is retried on UNAVAILABLE with backoff; errors are
    :class:`~edgeprune.client.errors.EdgepruneError` subclasses. Resource names may be
    given in full (``jobs/abc``) or as the bare id (``abc``). Results are the
    ``edgeprune.v1`` protobuf messages.

    A ``token`` (or ``$EDGEPRUNE_TOKEN``) is only sent over TLS or to this host, unless
    ``insecure=True`` (or ``$EDGEPRUNE_INSECURE=1``): else the constructor raises
    :class:`~edgeprune.client.errors.InsecureTransport`.
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
        self.channel: grpc.Channel = (
            grpc.secure_channel(self.settings.target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(self.settings.target, options)
        )
        self._md = self.settings.metadata()
        self._jobs = job_pb2_grpc.JobServiceStub(self.channel)
        self._datasets = dataset_pb2_grpc.DatasetServiceStub(self.channel)
        self._circuits = circuit_pb2_grpc.CircuitServiceStub(self.channel)
        self._server = server_pb2_grpc.ServerServiceStub(self.channel)

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Callable[..., _R], request: Message, timeout: Any) -> _R:
        attempt = Attempt(self.settings, self.settings.timeout if timeout is _UNSET else timeout)
        while True:
            try:
                return method(request, timeout=attempt.timeout(), metadata=self._md)
            except grpc.RpcError as error:
                time.sleep(attempt.failed(error))

    def _pages(self, method: Callable[..., Any], request: Message, field: str) -> Iterator[Any]:
        pager = Pager(request, field)
        while not pager.done:
            yield from pager.items(self._unary(method, pager.request(), _UNSET))

    # -- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        spec: job_pb2.JobSpec | None = None,
        *,
        priority: int = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> job_pb2.Job:
        """Queue a job from a JobSpec or from :func:`~edgeprune.client.job_spec` keywords.

        A request_id (a fresh UUID unless given) makes retries of this call safe: the
        server returns the first job for a repeated id.
        """
        request = _spec.submit_request(
            spec, priority=priority, labels=labels, request_id=request_id or new_request_id(), **options
        )
        return self._unary(self._jobs.SubmitJob, request, timeout)

    def get_job(self, name: str, *, full: bool = False, timeout: float | None = _UNSET) -> job_pb2.Job:
        """A job by name; ``full`` includes inline examples of its spec."""
        request = _spec.get_job_request(name, full=full)
        return self._unary(self._jobs.GetJob, request, timeout)

    def list_jobs(
        self,
        *,
        states: Iterable[str | int] | None = None,
        model: str | None = None,
        labels: Mapping[str, str] | None = None,
        full: bool = False,
        page_size: int = 0,
    ) -> Iterator[job_pb2.Job]:
        """Jobs, newest first, fetched page by page as the iterator advances."""
        request = _spec.list_jobs_request(
            states=states, model=model, labels=labels, full=full, page_size=page_size
        )
        return self._pages(self._jobs.ListJobs, request, "jobs")

    def cancel(self, name: str, *, timeout: float | None = _UNSET) -> job_pb2.Job:
        """Ask a job to stop (best effort); returns the job, whose state shows the outcome."""
        request = _spec.cancel_job_request(name)
        return self._unary(self._jobs.CancelJob, request, timeout)

    def delete_job(self, name: str, *, timeout: float | None = _UNSET) -> None:
        """Delete a finished job with its events (its circuits stay). A pending or running
        job raises FailedPrecondition: cancel it and wait for it first."""
        request = _spec.delete_job_request(name)
        self._unary(self._jobs.DeleteJob, request, timeout)

    def watch(
        self, name: str, *, after_sequence: int = 0, reconnect_timeout: float = 60.0
    ) -> Iterator[job_pb2.JobEvent]:
        """A job's events after ``after_sequence``, until its terminal event.

        On a dropped stream (server restart, network) it reconnects with backoff and
        resumes after the last event it yielded: no event is lost or repeated. It gives up
        (raising Unavailable) after ``reconnect_timeout`` seconds without a connection.
        """
        cursor = WatchCursor(
            self.settings, _spec.resource_name("jobs", name), after_sequence,
            reconnect_timeout=reconnect_timeout,
        )
        while not cursor.finished:
            call = self._jobs.WatchJob(cursor.request(), metadata=self._md)
            try:
                for event in call:
                    if cursor.accept(event):
                        yield event
                delay = 0.0
                if not cursor.finished:  # ended early: is the job over, or the server draining?
                    request = _spec.get_job_request(cursor.name)
                    delay = cursor.ended(
                        self._jobs.GetJob(request, timeout=self.settings.timeout, metadata=self._md)
                    )
            except grpc.RpcError as error:
                delay = cursor.failed(error)
            finally:
                call.cancel()
            time.sleep(delay)

    def wait(
        self, name: str, *, on_event: Callable[[job_pb2.JobEvent], None] | None = None
    ) -> job_pb2.Job:
        """Block until the job ends; returns it if SUCCEEDED, else raises JobFailed / JobCancelled.

        ``on_event`` sees every event on the way (e.g. to draw a progress bar).
        """
        for event in self.watch(name):
            if on_event is not None:
                on_event(event)
        return check_finished(self.get_job(name))

    # -- datasets -------------------------------------------------------------------------

    def upload_dataset(
        self,
        source: str | os.PathLike[str] | Iterable[Any],
        *,
        display_name: str | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
    ) -> dataset_pb2.Dataset:
        """Upload a JSONL file (streamed in chunks) or an iterable of examples."""
        requests = upload_requests(
            source, display_name=display_name, labels=labels, request_id=request_id or new_request_id()
        )
        try:
            return self._datasets.UploadDataset(
                requests,
                timeout=self.settings.stream_timeout if timeout is _UNSET else timeout,
                metadata=self._md,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def get_dataset(self, name: str, *, timeout: float | None = _UNSET) -> dataset_pb2.Dataset:
        """A dataset by name."""
        request = _spec.get_dataset_request(name)
        return self._unary(self._datasets.GetDataset, request, timeout)

    def list_datasets(self, *, page_size: int = 0) -> Iterator[dataset_pb2.Dataset]:
        """Datasets, newest first, page by page."""
        request = _spec.list_datasets_request(page_size=page_size)
        return self._pages(self._datasets.ListDatasets, request, "datasets")

    def delete_dataset(self, name: str, *, timeout: float | None = _UNSET) -> None:
        """Delete a dataset (jobs that read it keep their results)."""
        request = _spec.delete_dataset_request(name)
        self._unary(self._datasets.DeleteDataset, request, timeout)

    # -- circuits -------------------------------------------------------------------------

    def get_circuit(
        self, name: str, *, full: bool = False, timeout: float | None = _UNSET
    ) -> circuit_pb2.Circuit:
        """A circuit by name; ``full`` includes its edges, nodes, settings and provenance."""
        request = _spec.get_circuit_request(name, full=full)
        return self._unary(self._circuits.GetCircuit, request, timeout)

    def list_circuits(self, **filters: Any) -> Iterator[circuit_pb2.Circuit]:
        """Circuits, newest first, page by page; filters as in
        :func:`~edgeprune.client._spec.list_circuits_request` (model, task, dataset, method,
        min_edges, max_edges, contains_edge, contains_node, job, full, page_size)."""
        request = _spec.list_circuits_request(**filters)
        return self._pages(self._circuits.ListCircuits, request, "circuits")

    def export_circuit(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        format: str | int = "json",
        timeout: float | None = _UNSET,
        **drawing: Any,
    ) -> Path:
        """Write a circuit as JSON, DOT, SVG, PNG, safetensors masks or MIB's file to ``path``
        (a file, or a directory for the server's file name); returns the file written.
        ``drawing``: top_k, nodes, view, plot and layout of a drawing (see
        :func:`~edgeprune.client._spec.export_request`)."""
        request = _spec.export_request(name, format, **drawing)
        return self._export(self._circuits.ExportCircuit, request, path, timeout)

    def export_job_plot(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        plot: str | int | None = None,
        format: str | int = "svg",
        timeout: float | None = _UNSET,
    ) -> Path:
        """Write a plot of a job to ``path`` (a file, or a directory for the server's file
        name): ``plot`` training (an Edge Pruning job's curves; the default for those) or
        faithfulness (its circuits against their size), ``format`` svg or png."""
        request = _spec.job_plot_request(name, plot, format)
        return self._export(self._jobs.ExportJobPlot, request, path, timeout)

    def _export(self, method: Any, request: Any, path: str | os.PathLike[str],
                timeout: float | None) -> Path:
        """Stream an export into a file beside ``path``, moved into place once whole."""
        sink = ExportFile(path)
        stream = method(
            request,
            timeout=self.settings.stream_timeout if timeout is _UNSET else timeout,
            metadata=self._md,
        )
        try:
            for chunk in stream:
                sink.write(chunk)
            return sink.finish()
        except grpc.RpcError as error:
            sink.abort()
            raise from_rpc_error(error) from None
        except BaseException:
            sink.abort()
            stream.cancel()
            raise

    def evaluate_circuit(
        self,
        circuit: str,
        *,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> job_pb2.Job:
        """Queue a job that evaluates a stored circuit on ``task`` / ``dataset`` / ``examples``
        (plus ablation, batch_size, dtype, priority, labels)."""
        request = _spec.evaluate_request(circuit, request_id=request_id or new_request_id(), **options)
        return self._unary(self._circuits.EvaluateCircuit, request, timeout)

    def compare_circuits(
        self, first: str, second: str, *, timeout: float | None = _UNSET
    ) -> circuit_pb2.CompareCircuitsResponse:
        """Shared and distinct edges and nodes of two circuits of one model, with Jaccard indices."""
        request = _spec.compare_request(first, second)
        return self._unary(self._circuits.CompareCircuits, request, timeout)

    def import_circuit(
        self,
        source: str | os.PathLike[str] | bytes | Mapping[str, Any],
        *,
        model: str,
        method: str | int | None = None,
        task: str = "",
        request_id: str | None = None,
        timeout: float | None = _UNSET,
    ) -> circuit_pb2.Circuit:
        """Store a circuit found elsewhere from a MIB / EAP-IG circuit file (a path, its bytes
        or the parsed JSON object) as a circuit of allow-listed ``model``, owned by the caller;
        ``method`` and ``task`` label where it came from. Retries reuse one request id."""
        request = _spec.import_request(source, model=model, method=method, task=task,
                                       request_id=request_id or new_request_id())
        return self._unary(self._circuits.ImportCircuit, request, timeout)

    def delete_circuit(self, name: str, *, timeout: float | None = _UNSET) -> None:
        """Delete a circuit with its edges and nodes. FailedPrecondition while a pending or
        running job is to evaluate it."""
        request = _spec.delete_circuit_request(name)
        self._unary(self._circuits.DeleteCircuit, request, timeout)

    # -- server ---------------------------------------------------------------------------

    def server_info(self, *, timeout: float | None = _UNSET) -> server_pb2.GetServerInfoResponse:
        """The server's version, allow-listed models, devices, limits, tasks and methods."""
        return self._unary(self._server.GetServerInfo, server_pb2.GetServerInfoRequest(), timeout)

