"""Transport-free logic shared by :class:`Client` and :class:`AsyncClient`.

The two clients differ only in how they wait (``time.sleep`` / ``await asyncio.sleep``)
and call (sync / aio stubs); everything that decides something lives here: request
building, connection settings, the retry loop's decisions, page tokens, the watch
cursor that resumes without duplicates, dataset upload chunks, export files, and
the check of a finished job.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from edgeprune.v1 import dataset_pb2, job_pb2

from ._retry import Deadline, RetryPolicy
from ._spec import load_examples
from .errors import (
    EdgepruneError,
    FailedPrecondition,
    InsecureTransport,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
    job_error,
)

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "LB_POLICIES",
    "Attempt",
    "ClientSettings",
    "ExportFile",
    "Pager",
    "WatchCursor",
    "check_finished",
    "is_local_target",
    "is_terminal",
    "new_request_id",
    "upload_requests",
]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 30.0
#: Chunk size of dataset uploads (well below gRPC's 4 MiB default message limit).
UPLOAD_CHUNK_BYTES = 1 << 20
_MAX_MESSAGE_BYTES = 64 << 20

TERMINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
#: Codes after which a watch stream is reopened from its last sequence number: the server
#: went away or restarted (a restart cuts streams with UNAVAILABLE), not "the request is wrong".
_RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})

TlsOption = bool | str | os.PathLike[str] | grpc.ChannelCredentials | None


_TRUE = frozenset({"1", "true", "yes", "on"})
#: gRPC's client-side load-balancing policies: ``pick_first`` (gRPC's default) sends every call
#: over one connection; ``round_robin`` connects to every address the target resolves to (e.g.
#: ``dns:///edgeprune-api-headless:50051``, one A record per API pod) and spreads calls over them.
LB_POLICIES = ("pick_first", "round_robin")


def is_local_target(target: str) -> bool:
    """True when ``target`` (a gRPC target string) can only reach this host: a ``unix:``
    socket, ``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    rest = target
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme):]
            if rest.startswith("//"):  # dns://AUTHORITY/host:port
                rest = rest[2:].partition("/")[2]
            break
    if "," in rest:  # ipv4:a:1,b:2 lists several addresses: every one must be local
        return all(is_local_target(part) for part in rest.split(","))
    if rest.startswith("["):
        host = rest[1:].partition("]")[0]
    elif rest.count(":") == 1:
        host = rest.partition(":")[0]
    else:
        host = rest  # a bare host, or an unbracketed IPv6 address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_request_id() -> str:
    """A fresh idempotency key (AIP-155): a UUID4 string."""
    return str(uuid.uuid4())


def is_terminal(state: int) -> bool:
    """True for SUCCEEDED, FAILED and CANCELLED."""
    return state in TERMINAL_STATES


@dataclass(frozen=True)
class ClientSettings:
    """Where and how to connect; both clients hold one.

    ``target`` defaults to ``$EDGEPRUNE_TARGET`` or ``localhost:50051``, ``token`` to
    ``$EDGEPRUNE_TOKEN``. ``tls``: None/False plaintext, True the system roots, a path
    to a PEM CA bundle, or ready ``grpc.ChannelCredentials``. ``timeout`` is the
    deadline of every unary call (retries included); streams get ``stream_timeout``.

    A token goes out only over TLS, or to this host (loopback addresses, ``localhost`` and
    ``unix:`` sockets, where nobody else can read the traffic), unless ``insecure`` (default
    ``$EDGEPRUNE_INSECURE``) says the network is trusted; otherwise `create` raises
    `InsecureTransport` before anything is sent.

    ``load_balancing`` (default ``$EDGEPRUNE_LOAD_BALANCING``): ``round_robin`` spreads calls
    over every address of the target, ``pick_first`` (gRPC's default) uses one.
    """

    target: str = ""
    token: str | None = None
    tls: TlsOption = None
    timeout: float | None = DEFAULT_TIMEOUT
    stream_timeout: float | None = 600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    user_agent: str = "edgeprune-python"
    insecure: bool = False
    load_balancing: str | None = None

    @classmethod
    def create(
        cls,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: TlsOption = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        stream_timeout: float | None = 600.0,
        retry: RetryPolicy | None = None,
        insecure: bool | None = None,
        load_balancing: str | None = None,
    ) -> ClientSettings:
        """Settings with environment defaults filled in and checked."""
        target = target or os.environ.get("EDGEPRUNE_TARGET") or DEFAULT_TARGET
        token = token if token is not None else os.environ.get("EDGEPRUNE_TOKEN") or None
        if insecure is None:
            insecure = os.environ.get("EDGEPRUNE_INSECURE", "").strip().lower() in _TRUE
        load_balancing = load_balancing or os.environ.get("EDGEPRUNE_LOAD_BALANCING") or None
        if load_balancing is not None and load_balancing not in LB_POLICIES:
            raise InvalidArgument(f"load_balancing must be one of {', '.join(LB_POLICIES)}, "
                                  f"got {load_balancing!r}", field="load_balancing")
        for name, value in (("timeout", timeout), ("stream_timeout", stream_timeout)):
            if value is not None and value <= 0:
                raise InvalidArgument(f"{name} must be positive or None", field=name)
        settings = cls(target, token, tls, timeout, stream_timeout, retry or RetryPolicy(),
                       insecure=insecure, load_balancing=load_balancing)
        if token and tls in (None, False) and not insecure and not is_local_target(target):
            raise InsecureTransport(
                f"refusing to send the bearer token in plaintext to {target}: use TLS "
                "(tls=True or a CA file; --tls / --ca-file), or, on a network you trust, "
                "insecure=True (--insecure, EDGEPRUNE_INSECURE=1)",
                field="tls",
            )
        return settings

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials for ``tls``, or None for a plaintext channel."""
        if self.tls is None or self.tls is False:
            return None
        if self.tls is True:
            return grpc.ssl_channel_credentials()
        if isinstance(self.tls, grpc.ChannelCredentials):
            return self.tls
        path = Path(self.tls)
        try:
            return grpc.ssl_channel_credentials(root_certificates=path.read_bytes())
        except OSError as error:
            raise InvalidArgument(f"cannot read CA bundle {path}: {error.strerror}", field="tls") from None

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel arguments: message sizes, user agent and the load-balancing policy (no
        keepalive pings: servers answer pings more often than every 5 minutes with GOAWAY
        too_many_pings)."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.primary_user_agent", self.user_agent),
        ]
        if self.load_balancing:
            options.append(("grpc.lb_policy_name", self.load_balancing))
        return options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token when one is set."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class Attempt:
    """The retry loop of one unary call, as decisions only.

    Usage (the async client awaits the call and the sleep instead)::

        attempt = Attempt(settings, timeout)
        while True:
            try:
                return stub(request, timeout=attempt.timeout(), metadata=md)
            except grpc.RpcError as error:
                time.sleep(attempt.failed(error))   # raises when not retryable
    """

    def __init__(self, settings: ClientSettings, timeout: float | None) -> None:
        self._policy = settings.retry
        self._deadline = Deadline(timeout)
        self._number = 0

    def timeout(self) -> float | None:
        """The deadline left for the next try."""
        return self._deadline.remaining()

    def failed(self, error: grpc.RpcError) -> float:
        """Seconds to wait before the next try; raises the typed error if there is none."""
        code = error.code()  # type: ignore[attr-defined]
        delay = self._policy.delay(code, self._number, self._deadline)
        if delay is None:
            raise from_rpc_error(error) from None
        self._number += 1
        return delay


class Pager:
    """Walks a List call's pages (AIP-158) until the server sends no next_page_token."""

    def __init__(self, request: Message, items_field: str) -> None:
        self._request = request
        self._field = items_field
        self.done = False

    def request(self) -> Message:
        """The request of the next page."""
        return self._request

    def items(self, response: Message) -> list[Any]:
        """The items of a page; moves to the next page or marks the walk done."""
        token = response.next_page_token  # type: ignore[attr-defined]
        if not token or token == self._request.page_token:  # type: ignore[attr-defined]
            self.done = True
        else:
            request = type(self._request)()
            request.CopyFrom(self._request)
            request.page_token = token  # type: ignore[attr-defined]
            self._request = request
        return list(getattr(response, self._field))


class WatchCursor:
    """Follows one job's events across reconnects, yielding each sequence number once.

    The stream is reopened with ``after_sequence`` = the last event seen whenever it
    breaks (UNAVAILABLE: a server restart, a network drop) or ends before the job's
    terminal event; events at or below that number (a replay overlap) are dropped.
    Reconnects back off like unary retries and go on for up to ``reconnect_timeout``
    seconds from the first failure in a row (any new event resets it).
    """

    def __init__(
        self, settings: ClientSettings, name: str, after_sequence: int = 0, *, reconnect_timeout: float = 60.0
    ) -> None:
        self._policy = settings.retry
        self.name = name
        self.last_sequence = after_sequence
        self.finished = False
        self._reconnect_timeout = reconnect_timeout
        self._failures = 0
        self._budget = Deadline(reconnect_timeout)

    def request(self) -> job_pb2.WatchJobRequest:
        """The request that resumes after the last event seen."""
        return job_pb2.WatchJobRequest(name=self.name, after_sequence=self.last_sequence)

    def accept(self, event: job_pb2.JobEvent) -> bool:
        """True when ``event`` is new (and records it); False for a duplicate."""
        if event.sequence <= self.last_sequence:
            return False
        self.last_sequence = event.sequence
        self._failures = 0
        if event.WhichOneof("event") == "state_change" and is_terminal(event.state_change.state):
            self.finished = True
        return True

    def _backoff(self, error: EdgepruneError) -> float:
        if self._failures == 0:  # the first failure in a row starts the reconnect budget
            self._budget = Deadline(self._reconnect_timeout)
        delay = self._policy.backoff(min(self._failures, 16))
        remaining = self._budget.remaining()
        if remaining is not None and delay >= remaining:
            raise error
        self._failures += 1
        return delay

    def failed(self, error: grpc.RpcError) -> float:
        """Seconds to wait before reconnecting; raises the typed error if the watch cannot go on."""
        typed = from_rpc_error(error)
        if error.code() not in _RESUMABLE_CODES:  # type: ignore[attr-defined]
            raise typed from None
        return self._backoff(typed)

    def ended(self, job: job_pb2.Job) -> float:
        """The stream closed cleanly before a terminal event was seen; ``job`` is a fresh GetJob.

        Returns 0 and marks the watch finished when the job is over and every event up to
        its last was seen (e.g. watching after the end); otherwise the wait before resuming.
        """
        if is_terminal(job.state) and job.last_event_sequence <= self.last_sequence:
            self.finished = True
            return 0.0
        return self._backoff(Unavailable(f"the watch of {self.name} kept ending early"))


def check_finished(job: job_pb2.Job) -> job_pb2.Job:
    """``job`` if it SUCCEEDED; raises JobFailed / JobCancelled (with its error) otherwise."""
    if job.state == job_pb2.JOB_STATE_SUCCEEDED:
        return job
    if is_terminal(job.state):
        raise job_error(job)
    state = job_pb2.JobState.Name(job.state)
    raise FailedPrecondition(f"{job.name} has not finished (state {state})")


def upload_requests(
    source: str | os.PathLike[str] | Iterable[Any],
    *,
    display_name: str | None,
    labels: Mapping[str, str] | None,
    request_id: str,
    chunk_bytes: int = UPLOAD_CHUNK_BYTES,
) -> Iterator[dataset_pb2.UploadDatasetRequest]:
    """The UploadDataset stream: metadata, then the JSONL content in chunks.

    The source is checked now (a missing file or an invalid example raises at once);
    the file itself is read lazily as the stream is sent.

    A path is streamed from disk as is (the server validates it); an iterable of
    examples (mappings or Example messages) is checked here and written as JSONL.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidArgument(f"no such dataset file: {path}", field="source")
        name = display_name or path.stem

        def content() -> Iterator[bytes]:
            with path.open("rb") as handle:
                while chunk := handle.read(chunk_bytes):
                    yield chunk
    else:
        examples = load_examples(source)
        if not examples:
            raise InvalidArgument("the dataset has no examples", field="source")
        name = display_name or "dataset"
        body = "".join(
            json_format.MessageToJson(e, indent=None, preserving_proto_field_name=True) + "\n"
            for e in examples
        ).encode()

        def content() -> Iterator[bytes]:
            for start in range(0, len(body), chunk_bytes):
                yield body[start : start + chunk_bytes]

    metadata = dataset_pb2.DatasetMetadata(
        display_name=name, labels=dict(labels or {}), request_id=request_id
    )
    return _upload_stream(metadata, content())


def _upload_stream(
    metadata: dataset_pb2.DatasetMetadata, chunks: Iterator[bytes]
) -> Iterator[dataset_pb2.UploadDatasetRequest]:
    yield dataset_pb2.UploadDatasetRequest(metadata=metadata)
    for chunk in chunks:
        yield dataset_pb2.UploadDatasetRequest(chunk=chunk)


class ExportFile:
    """Writes ExportCircuit chunks to a file atomically (a temporary file renamed at the end).

    ``path`` may be a directory: the server's suggested file name is used inside it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._target = Path(path)
        self._handle: Any = None
        self._tmp: Path | None = None
        self.path: Path | None = None
        self.content_type = ""
        self.size = 0

    def write(self, chunk: Any) -> None:
        """Append one ExportCircuitResponse."""
        if self._handle is None:
            self.content_type = chunk.content_type
            target = self._target
            if target.is_dir():
                target = target / (chunk.filename or "circuit.export")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _create_beside(target)
            self._handle, self._tmp, self.path = os.fdopen(fd, "wb"), tmp, target
        self._handle.write(chunk.data)
        self.size += len(chunk.data)

    def finish(self) -> Path:
        """Close and move the file into place; returns its path."""
        if self._handle is None:
            raise InvalidArgument("the server sent an empty export", field="format")
        self._handle.close()
        assert self._tmp is not None and self.path is not None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the partial file after a failure."""
        if self._handle is not None:
            self._handle.close()
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)


def _create_beside(target: Path) -> tuple[int, Path]:
    """A new hidden file next to ``target``, opened for writing. Its mode is 0666 less the
    umask, as for any file the user writes (tempfile's 0600 would survive the rename and hide
    an export from the user's group)."""
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.part"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
