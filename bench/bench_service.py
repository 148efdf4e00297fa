"""The service under load, on loopback with the embedded SQLite database and a tiny GPT-2.

Measures (one JSON line each):
* ``submit`` / ``get``: latency of SubmitJob and GetJob from 50 concurrent clients (API alone,
  so the numbers are the API's and the database's, not the worker's), on SQLite and PostgreSQL,
  two ways: ``closed`` (every client calls again as soon as its answer arrives: saturation, the
  latency is then queueing behind the database's commit rate) and ``open`` (every client calls
  at a steady RATE per second, as services calling us would); target p99 SubmitJob < 50 ms;
* ``first_event``: with the model already loaded in the worker, time from SubmitJob returning to
  the first pruning progress event reaching a watcher; target < 1 s;
* ``watchers``: 100 concurrent WatchJob streams on one job; every watcher must receive every
  event exactly once (missed = 0).
* ``upload_peak_rss``: the API's peak RSS rise while it receives two maximum uploads at once
  (``max_dataset_bytes`` each, or ``EDGEPRUNE_BENCH_UPLOAD_MIB``; the ratio to the bytes
  uploaded is reported), on SQLite and PostgreSQL; written to bench/results/uploads.jsonl.
* ``list_peak_rss``: the API's peak RSS rise for one ListJobs of LIST_JOBS jobs (page size 1000)
  in BASIC, and for listing them all in FULL (pages end at the reply size), each job carrying
  LIST_EXAMPLES inline examples; ``watch_get_latency``: GetJob p50/p99 from GET_CLIENTS clients
  at a steady GET_RATE each and the API's CPU share with 0 and with WATCHED_JOBS watchers on as many jobs (an event a
  job every few seconds; the server's default poll interval); target p99 < 50 ms. Both on
  SQLite and PostgreSQL, written to bench/results/list-watch.jsonl.

Run: ``python -m bench service`` (``make bench`` runs it with the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from edgeprune.service.config import Limits
from edgeprune.v1 import common_pb2, dataset_pb2, dataset_pb2_grpc, job_pb2, job_pb2_grpc
from tests.service.harness import MODEL, Server, edge_pruning_spec, short_examples_spec
from tests.tiny_models import tiny_gpt2

CLIENTS = 50
CALLS_PER_CLIENT = 20
RATE = 1.0  # calls per second per client in the open-loop run
WATCHERS = 100
UPLOADS = 2  # the default max_concurrent_uploads
UPLOAD_EXAMPLES = 40_000  # about this many examples an upload (under the default max_examples)
MiB = 1024 * 1024
UPLOAD_RESULTS = Path(__file__).parent / "results" / "uploads.jsonl"
LIST_WATCH_RESULTS = Path(__file__).parent / "results" / "list-watch.jsonl"
LIST_JOBS = 1000
LIST_EXAMPLES = 1000  # short examples: about 30 kB of protobuf a job, 10x that as Python objects
WATCHED_JOBS = 200
GET_CLIENTS = 10
GET_RATE = 10.0  # GetJob calls per second per client (open loop: latency, not saturation)
GET_SECONDS = 20.0


def emit(**values: object) -> None:
    print(json.dumps({"bench": "service", **values}), flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(name: str, seconds: list[float], **extra: object) -> None:
    ms = [s * 1000 for s in seconds]
    emit(metric=name, calls=len(ms), p50_ms=round(percentile(ms, 50), 2),
         p99_ms=round(percentile(ms, 99), 2), mean_ms=round(statistics.fmean(ms), 2), **extra)


async def _client(target: str, spec: job_pb2.JobSpec, submit: list[float], get: list[float],
                  index: int, rate: float | None) -> None:
    """CALLS_PER_CLIENT SubmitJob + GetJob pairs; with ``rate``, started at that steady rate."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        begin = time.perf_counter() + (index / CLIENTS / rate if rate else 0.0)
        for call in range(CALLS_PER_CLIENT):
            if rate:
                await asyncio.sleep(max(0.0, begin + call / rate - time.perf_counter()))
            start = time.perf_counter()
            job = await stub.SubmitJob(job_pb2.SubmitJobRequest(
                spec=spec, request_id=f"bench-{rate}-{index}-{call}"), timeout=30)
            submit.append(time.perf_counter() - start)
            start = time.perf_counter()
            await stub.GetJob(job_pb2.GetJobRequest(name=job.name), timeout=30)
            get.append(time.perf_counter() - start)


async def latency(server: Server, backend: str) -> None:
    spec = edge_pruning_spec()
    target = f"127.0.0.1:{server.port}"
    await _client(target, spec, [], [], -1, None)  # warm-up
    for mode, rate in (("closed", None), ("open", RATE)):
        submit: list[float] = []
        get: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*(_client(target, spec, submit, get, i, rate)
                               for i in range(CLIENTS)))
        elapsed = time.perf_counter() - start
        load = {"backend": backend, "mode": mode, "clients": CLIENTS,
                "rate_per_client": rate, "calls_per_s": round(len(submit) / elapsed, 1)}
        report("submit", submit, target_p99_ms=50, **load)
        report("get", get, **load)


async def _watch(stub: job_pb2_grpc.JobServiceStub, name: str) -> list[int]:
    stream = stub.WatchJob(job_pb2.WatchJobRequest(name=name), timeout=600)
    return [event.sequence async for event in stream]


async def worker_figures(server: Server) -> None:
    target = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        start = time.perf_counter()
        warm = await stub.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(steps=2)))
        await _watch(stub, warm.name)  # the worker starts and loads the model
        emit(metric="cold_job", seconds=round(time.perf_counter() - start, 2),
             note="worker start + model load + 2 steps")

        firsts = []
        for _ in range(5):
            start = time.perf_counter()
            job = await stub.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(steps=3)))
            submitted = time.perf_counter()
            async for event in stub.WatchJob(job_pb2.WatchJobRequest(name=job.name)):
                if event.progress.phase == "prune":
                    firsts.append(time.perf_counter() - submitted)
                    break
            async for _ in stub.WatchJob(job_pb2.WatchJobRequest(
                    name=job.name, after_sequence=event.sequence)):
                pass
        report("first_event", firsts, target_ms=1000, note="model already loaded")

        job = await stub.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(steps=60)))
        start = time.perf_counter()
        results = await asyncio.gather(*(_watch(stub, job.name) for _ in range(WATCHERS)))
        final = await stub.GetJob(job_pb2.GetJobRequest(name=job.name))
        expected = list(range(1, final.last_event_sequence + 1))
        missed = sum(len(set(expected) - set(r)) for r in results)
        duplicated = sum(len(r) - len(set(r)) for r in results)
        emit(metric="watchers", watchers=WATCHERS, events=len(expected), missed=missed,
             duplicated=duplicated, seconds=round(time.perf_counter() - start, 2))


def _upload_parts(size: int, index: int) -> Iterator[dataset_pb2.UploadDatasetRequest]:
    """An upload of ``size`` bytes in 1 MiB chunks (the client's), made as it is sent; its lines
    are long enough for the examples to stay within max_examples."""
    yield dataset_pb2.UploadDatasetRequest(
        metadata=dataset_pb2.DatasetMetadata(display_name=f"bench-{index}"))
    words = " ".join(["word"] * max(50, size // UPLOAD_EXAMPLES // 10))
    line = json.dumps({"clean": f"{words} Mary", "corrupted": f"{words} John",
                       "target": " Mary", "distractor": " John"}).encode() + b"\n"
    chunk = line * (MiB // len(line))
    for _ in range(size // len(chunk)):
        yield dataset_pb2.UploadDatasetRequest(chunk=chunk)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


async def upload_peak_rss(server: Server, backend: str, size: int) -> dict[str, object]:
    """Peak RSS rise of the API process while it receives UPLOADS uploads of ``size`` at once."""
    assert server.proc is not None
    pid = server.proc.pid
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = dataset_pb2_grpc.DatasetServiceStub(channel)
        await stub.UploadDataset(_upload_parts(MiB, -1))  # warm-up
        before = _status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on
        start = time.perf_counter()
        done = await asyncio.gather(*(stub.UploadDataset(_upload_parts(size, i), timeout=1800)
                                      for i in range(UPLOADS)))
        seconds = time.perf_counter() - start
    rise = (_status_kib(pid, "VmHWM") - before) * 1024
    return {"bench": "service", "metric": "upload_peak_rss", "backend": backend,
            "uploads": UPLOADS, "mib_each": round(size / MiB, 1),
            "examples_each": done[0].example_count, "rss_before_mib": round(before / 1024, 1),
            "peak_rise_mib": round(rise / MiB, 1),
            "rise_per_uploaded_byte": round(rise / (UPLOADS * size), 3),
            "seconds": round(seconds, 1)}


def uploads(root: Path, models: dict[str, str], pg_url: str) -> None:
    size = int(os.environ.get("EDGEPRUNE_BENCH_UPLOAD_MIB", "0")) * MiB or Limits().max_dataset_bytes
    lines = []
    for backend, url in (("sqlite", f"sqlite:///{root / 'uploads.db'}"), ("postgresql", pg_url)):
        api = Server(root / f"uploads-{backend}", url, models, workers=0,
                     max_dataset_bytes=size + MiB).start()
        try:
            line = asyncio.run(upload_peak_rss(api, backend, size))
        finally:
            api.stop()
        print(json.dumps(line), flush=True)
        lines.append(line)
    UPLOAD_RESULTS.parent.mkdir(exist_ok=True)
    UPLOAD_RESULTS.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _list_spec(i: int) -> job_pb2.JobSpec:
    return short_examples_spec(i, LIST_EXAMPLES)


async def _submit_all(target: str, specs: Iterator[job_pb2.JobSpec], prefix: str, *,
                      parallel: int = 4) -> list[str]:
    """Submit every spec, `parallel` at a time; the job names in order."""
    queue = list(enumerate(specs))
    names: dict[int, str] = {}
    async with grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 * MiB)]) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)

        async def worker() -> None:
            while queue:
                i, spec = queue.pop()
                request = job_pb2.SubmitJobRequest(spec=spec, request_id=f"{prefix}-{i}")
                for attempt in range(5):  # UNAVAILABLE (a busy SQLite writer) is retryable
                    try:
                        names[i] = (await stub.SubmitJob(request, timeout=120)).name
                        break
                    except grpc.aio.AioRpcError as err:
                        if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                            raise
                        await asyncio.sleep(0.5)

        await asyncio.gather(*(worker() for _ in range(parallel)))
    return [names[i] for i in sorted(names)]


async def _list_rise(server: Server, view: int) -> tuple[float, int, float]:
    """(peak RSS rise in MiB, pages, seconds) of listing every job in ``view``."""
    assert server.proc is not None
    pid = server.proc.pid
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=[
            ("grpc.max_receive_message_length", 64 * MiB)]) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        await stub.ListJobs(job_pb2.ListJobsRequest(page_size=1))  # first-call costs
        before = _status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on
        start, pages, token = time.perf_counter(), 0, ""
        while True:
            page = await stub.ListJobs(job_pb2.ListJobsRequest(
                page_size=1000, page_token=token, view=view), timeout=600)
            pages += 1
            if not (token := page.next_page_token):
                break
        seconds = time.perf_counter() - start
    return (_status_kib(pid, "VmHWM") - before) / 1024, pages, seconds


def list_peak_rss(server: Server, backend: str) -> list[dict[str, object]]:
    target = f"127.0.0.1:{server.port}"
    asyncio.run(_submit_all(target, (_list_spec(i) for i in range(LIST_JOBS)), "bench-list"))
    server.stop()  # a fresh process: the submits' freed heap would hide what a list costs
    server.start()
    lines = []
    for name, view in (("BASIC", common_pb2.VIEW_BASIC), ("FULL", common_pb2.VIEW_FULL)):
        rise, pages, seconds = asyncio.run(_list_rise(server, view))
        lines.append({"bench": "service", "metric": "list_peak_rss", "backend": backend,
                      "view": name, "jobs": LIST_JOBS, "inline_examples_each": LIST_EXAMPLES,
                      "pages": pages, "peak_rise_mib": round(rise, 1),
                      "seconds": round(seconds, 2)})
    return lines


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _drive_events(url: str, job_ids: list[str], stop: threading.Event) -> int:
    """Progress events round-robin over the jobs, 20 a second in all (as busy workers would
    write them), until ``stop``; returns how many."""
    from edgeprune.storage import Database, EventRepo

    db = Database(url)
    events, count = EventRepo(db), 0
    try:
        while not stop.is_set():
            events.append(job_ids[count % len(job_ids)], "progress",
                          {"phase": "prune", "step": count})
            count += 1
            stop.wait(0.05)
    finally:
        db.dispose()
    return count


async def _get_latency(server: Server, names: list[str], watchers: int) -> dict[str, object]:
    """GetJob latency from GET_CLIENTS clients at GET_RATE for GET_SECONDS, with ``watchers``
    WatchJob streams open (one per job) and events arriving."""
    assert server.proc is not None
    target = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        streams = [stub.WatchJob(job_pb2.WatchJobRequest(name=name)) for name in names[:watchers]]
        received = [0]

        async def follow(stream: grpc.aio.UnaryStreamCall) -> None:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                async for _ in stream:
                    received[0] += 1

        followers = [asyncio.create_task(follow(s)) for s in streams]
        await asyncio.sleep(2.0)  # every stream registered and caught up
        stop = threading.Event()
        driver = asyncio.create_task(asyncio.to_thread(
            _drive_events, server.database_url, [n.removeprefix("jobs/") for n in names], stop))
        seconds: list[float] = []
        cpu_start, wall_start = _cpu_seconds(server.proc.pid), time.perf_counter()

        async def client(index: int) -> None:
            begin = time.perf_counter() + index / GET_CLIENTS / GET_RATE
            i = index
            for call in range(int(GET_SECONDS * GET_RATE)):
                await asyncio.sleep(max(0.0, begin + call / GET_RATE - time.perf_counter()))
                start = time.perf_counter()
                await stub.GetJob(job_pb2.GetJobRequest(name=names[i % len(names)]), timeout=30)
                seconds.append(time.perf_counter() - start)
                i += GET_CLIENTS

        await asyncio.gather(*(client(i) for i in range(GET_CLIENTS)))
        cpu = (_cpu_seconds(server.proc.pid) - cpu_start) / (time.perf_counter() - wall_start)
        stop.set()
        events = await driver
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*followers)
    ms = [s * 1000 for s in seconds]
    return {"watchers": watchers, "jobs": len(names), "get_calls": len(ms),
            "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "api_cpu_percent": round(100 * cpu, 1), "events_written": events,
            "events_streamed": received[0], "target_p99_ms": 50}


def watch_get_latency(server: Server, backend: str) -> list[dict[str, object]]:
    target = f"127.0.0.1:{server.port}"
    names = asyncio.run(_submit_all(target, (edge_pruning_spec() for _ in range(WATCHED_JOBS)),
                                    "bench-watch"))
    return [{"bench": "service", "metric": "watch_get_latency", "backend": backend,
             **asyncio.run(_get_latency(server, names, watchers))}
            for watchers in (0, WATCHED_JOBS)]


def list_and_watch(root: Path, models: dict[str, str]) -> None:
    from tests.storage.databases import fresh_postgres_database

    lines = []
    with fresh_postgres_database() as pg_url:  # only this case's jobs
        for backend, url in (("sqlite", f"sqlite:///{root / 'list-watch.db'}"),
                             ("postgresql", pg_url)):
            lines += _list_and_watch(root, models, backend, url)
    LIST_WATCH_RESULTS.parent.mkdir(exist_ok=True)
    LIST_WATCH_RESULTS.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _list_and_watch(root: Path, models: dict[str, str], backend: str,
                    url: str) -> list[dict[str, object]]:
    # The server's default poll interval (the tests' harness polls faster).
    api = Server(root / f"list-watch-{backend}", url, models, workers=0,
                 max_inline_examples=LIST_EXAMPLES, max_pending_jobs=100_000,
                 max_watches_per_client=WATCHED_JOBS, poll_s=0.2).start()
    try:
        lines = [*list_peak_rss(api, backend), *watch_get_latency(api, backend)]
    finally:
        api.stop()
    for line in lines:
        print(json.dumps(line), flush=True)
    return lines


def main() -> None:
    from tests.storage.databases import fresh_postgres_database

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        root = Path(tmp)
        model = tiny_gpt2(root / "model")
        models = {MODEL: f"hf:{model}"}
        with fresh_postgres_database() as pg_url:
            for backend, url in (("sqlite", f"sqlite:///{root / 'api.db'}"),
                                 ("postgresql", pg_url)):
                api = Server(root / f"api-{backend}", url, models, workers=0,
                             max_pending_jobs=100_000).start()
                try:
                    asyncio.run(latency(api, backend))
                finally:
                    api.stop()
            uploads(root, models, pg_url)
        list_and_watch(root, models)
        url = f"sqlite:///{root / 'worker.db'}"
        server = Server(root / "worker", url, models, progress_interval_s=0.05).start()
        try:
            asyncio.run(worker_figures(server))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
