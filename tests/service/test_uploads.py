"""Dataset uploads over a real loopback server: streamed in bounded memory, every bad line
reported, the engine's whole example format accepted, a limit on uploads at once, one example
limit with the engine, and datasets checked against the model's tokenizer at SubmitJob."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgeprune.engine.examples import MAX_EXAMPLES
from edgeprune.service.uploads import MAX_DESCRIPTION, MAX_LINE_BYTES, MAX_REPORTED
from edgeprune.v1 import dataset_pb2, job_pb2, server_pb2
from tests.service.conftest import database_url, running
from tests.service.errors import details, fails
from tests.service.harness import MODEL, Server, edge_pruning_spec

MiB = 1024 * 1024
EXAMPLE = {"clean": "When Mary and John went to the store, John gave a drink to",
           "corrupted": "When Mary and John went to the store, Tom gave a drink to",
           "target": " Mary", "distractor": " John"}


def parts(content: bytes, *, chunk: int = MiB,
          name: str = "ds") -> Iterator[dataset_pb2.UploadDatasetRequest]:
    yield dataset_pb2.UploadDatasetRequest(metadata=dataset_pb2.DatasetMetadata(display_name=name))
    for i in range(0, len(content), chunk):
        yield dataset_pb2.UploadDatasetRequest(chunk=content[i:i + chunk])


def jsonl(lines: list[object]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(server: Server, content: bytes, **kwargs: object) -> dataset_pb2.Dataset:
    return server.datasets.UploadDataset(parts(content, **kwargs), timeout=120)


def violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [(v.field, v.description) for v in bad.field_violations]
    return []


def failure(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded")


@pytest.fixture(scope="module")
def big_server(backend: str, tmp_path_factory: pytest.TempPathFactory,
               tiny_gpt2_dir: Path) -> Iterator[Server]:
    """The API alone with room for large uploads."""
    folder = tmp_path_factory.mktemp(f"uploads-{backend}")
    with database_url(backend, folder) as url, running(
        folder, url, tiny_gpt2_dir, workers=0, max_dataset_bytes=128 * MiB,
    ) as server:
        yield server


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


# ------------------------------------------------------------------------------ memory


def test_a_large_upload_streams_in_bounded_memory(big_server: Server) -> None:
    """A 96 MiB upload raises the API's peak RSS by less than its size (the whole content held
    in memory, or all its examples, raised it by about 5x). On SQLite the rise includes the
    connection's page cache, which the insert fills up to its fixed size (storage/db.py)."""
    assert big_server.proc is not None
    pid = big_server.proc.pid
    upload(big_server, jsonl([EXAMPLE] * 10))  # warm: the first call's imports and buffers
    words = " ".join(["word"] * 200)
    line = json.dumps({"clean": f"{words} Mary", "corrupted": f"{words} John",
                       "target": " Mary", "distractor": " John"}) + "\n"
    n = 96 * MiB // len(line)
    content = (line * n).encode()
    before = _status_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.monotonic()
    dataset = upload(big_server, content)
    seconds = time.monotonic() - start
    peak_rise = (_status_kb(pid, "VmHWM") - before) * 1024
    assert dataset.example_count == n
    print(f"upload of {len(content) / MiB:.0f} MiB: {seconds:.1f} s, "
          f"API peak RSS +{peak_rise / MiB:.1f} MiB")
    assert peak_rise < len(content), f"peak RSS rose {peak_rise / MiB:.0f} MiB"


# ------------------------------------------------------------------------------ checks


def test_every_bad_line_is_reported(big_server: Server) -> None:
    bad = ["not json", "[1, 2]", json.dumps({"clean": "a"}), json.dumps({**EXAMPLE, "x": 1}),
           json.dumps({**EXAMPLE, "clean": 7}), json.dumps({**EXAMPLE, "good": []}),
           json.dumps({**EXAMPLE, "clean": [1, 2], "corrupted": [1]})]
    lines: list[object] = []
    for i in range(30):
        lines += [EXAMPLE, bad[i % len(bad)]]
    err = failure(upload, big_server, jsonl(lines) + b"\n")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err)
    assert len(found) == MAX_REPORTED + 1
    assert [f for f, _ in found[:4]] == ["chunk line 2", "chunk line 4", "chunk line 6",
                                         "chunk line 8"]
    assert found[0][1].startswith("line 2: not valid JSON")
    assert found[3][1] == ("line 8: unknown field(s) ['x']; allowed: "
                           "['clean', 'corrupted', 'target', 'distractor', 'good', 'bad', "
                           "'multi_token']")
    assert "clean must be text or a list of token ids" in found[4][1]
    assert "good must be a non-empty list" in found[5][1]
    assert "clean and corrupted must have the same number of tokens, got 2 and 1" in found[6][1]
    assert found[-1] == ("chunk", "10 more bad lines not listed")
    assert "(and 29 more bad lines)" in err.details()


@pytest.mark.parametrize(("line", "what"), [
    (b'{"clean": ' + b"[" * 100_000 + b"]" * 100_000 + b', "corrupted": "x"}', "nested too deeply"),
    (b'{"clean": "a\\ud800b", "corrupted": "x"}', "lone UTF-16 surrogate"),
    (b'{"clean": "x", "corrupted": "x", "good": ["\\udfff"], "bad": ["y"]}', "lone UTF-16 surrogate"),
    (b'{"clean": [' + b"9" * 5000 + b'], "corrupted": [1]}', "not valid JSON"),
    (b'{"clean": "x\xff", "corrupted": "x"}', "not UTF-8"),
    (b'{"clean": "a\\u0000b", "corrupted": "x"}', "NUL character"),
    (b'{"clean": "x", "corrupted": "x", "target": " \\u0000"}', "NUL character"),
], ids=["nested", "surrogate", "surrogate-in-set", "huge-int", "not-utf8", "nul", "nul-target"])
def test_malformed_lines_name_the_line(big_server: Server, line: bytes, what: str) -> None:
    err = failure(upload, big_server, jsonl([EXAMPLE]) + line + b"\n" + jsonl([EXAMPLE]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(err)
    assert field == "chunk line 2" and what in description, description


def test_long_values_are_quoted_briefly(big_server: Server) -> None:
    """Errors quote the value at fault, cut short: the details of all of them fit the trailer
    a client accepts."""
    lines = [{"clean": ["x" * 50_000], "corrupted": [1]}] * 30
    err = failure(upload, big_server, jsonl(lines))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err)
    assert len(found) == MAX_REPORTED + 1
    assert all(len(d) <= MAX_DESCRIPTION for _, d in found)
    assert found[0][1].startswith("line 1: clean: token ids must be integers, got 'xxx")


def test_a_line_over_the_line_limit_is_rejected(big_server: Server) -> None:
    long_line = json.dumps({"clean": "x" * MAX_LINE_BYTES, "corrupted": "y"})
    err = failure(upload, big_server, jsonl([EXAMPLE, long_line, EXAMPLE]), chunk=100_000)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err) == [("chunk line 2", (f"line 2: longer than the limit of "
                                                f"{MAX_LINE_BYTES} bytes"))]


def test_answer_sets_all_or_none(api_server: Server) -> None:
    mixed = jsonl([EXAMPLE, {**EXAMPLE, "good": [" Mary"], "bad": [" John"]}])
    code, _, fields = fails(upload, api_server, mixed)
    assert (code, fields) == ("INVALID_ARGUMENT", ["chunk"])


# --------------------------------------------------------------------------- limits


def test_concurrent_uploads_are_limited(api_server: Server) -> None:
    """Two uploads in progress (the default max_concurrent_uploads); a third is refused at
    once, and once they finish uploads are accepted again."""
    release = threading.Event()

    def slow(i: int) -> Iterator[dataset_pb2.UploadDatasetRequest]:
        yield dataset_pb2.UploadDatasetRequest(metadata=dataset_pb2.DatasetMetadata(
            display_name=f"slow-{i}"))
        yield dataset_pb2.UploadDatasetRequest(chunk=jsonl([EXAMPLE]))
        release.wait(60)

    held = [api_server.datasets.UploadDataset.future(slow(i), timeout=60) for i in range(2)]
    try:
        time.sleep(1.0)  # both have sent their metadata and hold a slot
        code, reason, _ = fails(upload, api_server, jsonl([EXAMPLE]))
        assert (code, reason) == ("RESOURCE_EXHAUSTED", "TOO_MANY_UPLOADS")
    finally:
        release.set()
    assert [f.result().example_count for f in held] == [1, 1]
    assert upload(api_server, jsonl([EXAMPLE])).example_count == 1


def test_one_example_limit_with_the_engine(big_server: Server, tmp_path: Path,
                                           tiny_gpt2_dir: Path) -> None:
    info = big_server.info.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=30)
    assert info.limits.max_examples == MAX_EXAMPLES
    spec = edge_pruning_spec()
    spec.data.Clear()
    spec.data.task.name = "ioi"
    spec.data.task.example_count = MAX_EXAMPLES + 1
    code, _, fields = fails(big_server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=spec))
    assert (code, fields) == ("RESOURCE_EXHAUSTED", ["spec.data.task.example_count"])
    tiny = jsonl([{"clean": [1], "corrupted": [2]}] * (MAX_EXAMPLES + 1))
    code, _, fields = fails(upload, big_server, tiny)
    assert (code, fields) == ("RESOURCE_EXHAUSTED", ["chunk"])
    # A server cannot be configured above the engine's limit.
    server = Server(tmp_path, f"sqlite:///{tmp_path / 'db'}", {MODEL: f"hf:{tiny_gpt2_dir}"},
                    workers=0, max_examples=MAX_EXAMPLES + 1)
    with pytest.raises(RuntimeError, match="max_examples: at most the engine's limit"):
        server.start()
    server.stop()


# ---------------------------------------------------------------- the engine's format


def test_engine_format_is_accepted_and_used_by_a_job(live_server: Server) -> None:
    """Token-id prompts and good/bad answer sets (the probability difference), as the engine
    reads them, upload and train."""
    lines = [{"clean": [5, 17, 33, 40 + i], "corrupted": [5, 17, 34, 40 + i],
              "good": [60, 61], "bad": [62]} for i in range(8)]
    text = {"clean": EXAMPLE["clean"], "corrupted": EXAMPLE["corrupted"]}
    lines += [{**text, "good": [" Mary"], "bad": [" John", " Tom"]}] * 4
    dataset = upload(live_server, jsonl(lines))
    assert dataset.example_count == 12
    job = live_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(
        spec=edge_pruning_spec(job_pb2.DataSpec(dataset=dataset.name), steps=4)), timeout=60)
    done = live_server.wait_done(job.name, timeout=300)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error.message


# ---------------------------------------------------------------- against the model


def test_submit_checks_the_dataset_against_the_tokenizer(api_server: Server) -> None:
    """What only the tokenizer can judge is checked at SubmitJob, every bad example listed with
    the message the worker's engine gives."""
    good = {"clean": [5, 17, 33], "corrupted": [5, 17, 34], "target": 40, "distractor": 41}
    lines = [good,
             {**EXAMPLE, "target": " Mary Mary"},  # two tokens
             {**EXAMPLE, "corrupted": "When Mary and John went to the store, Tom gave a drink"},
             {**good, "target": 10**6},  # outside the vocabulary
             good]
    dataset = upload(api_server, jsonl(lines))
    request = job_pb2.SubmitJobRequest(spec=edge_pruning_spec(job_pb2.DataSpec(dataset=dataset.name)))
    err = failure(api_server.jobs.SubmitJob, request, timeout=60)
    code, reason, _ = details(err)
    assert (code, reason) == ("INVALID_ARGUMENT", "DATASET_DOES_NOT_FIT_MODEL")
    found = violations(err)
    assert [f for f, _ in found] == ["spec.data.dataset"] * 3
    assert found[0][1].startswith("examples[1].target ' Mary Mary' must be exactly one token")
    assert found[1][1].startswith("examples[2]: clean and corrupted must have the same number")
    assert found[2][1] == "examples[3].target: token id 1000000 is outside the vocabulary [0, 700)"
    # The engine gives the first one the same message.
    from edgeprune.engine.examples import Example
    from edgeprune.engine.loading import load_tokenizer
    from edgeprune.engine.tasks import from_examples

    info = api_server.info.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=30)
    tokenizer = load_tokenizer(info.models[0].ref)
    with pytest.raises(ValueError) as engine_err:
        from_examples([Example(**x) for x in lines], tokenizer)
    assert str(engine_err.value) == found[0][1]
