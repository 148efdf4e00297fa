"""SubmitJob's memory check over a real server with a small worker memory budget, and the token
bounds the check rests on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from edgeprune.engine.contract import TASK_MIN_TOKENS
from edgeprune.engine.loading import load_model
from edgeprune.engine.memory import estimate_evaluation_memory, estimate_job_memory
from edgeprune.engine.tasks import Example, build_task, from_examples
from edgeprune.service import memory_check
from edgeprune.service.memory_check import min_tokens
from edgeprune.storage import CircuitRepo, Database, NewCircuit
from edgeprune.v1 import circuit_pb2, common_pb2, dataset_pb2, job_pb2, server_pb2
from tests.service.conftest import running
from tests.service.errors import fails
from tests.service.harness import MODEL, Server, edge_pruning_spec, inline_examples
from tests.tiny_models import tiny_gpt2

BUDGET = 32 * 2**20  # a tiny GPT-2 job of batch 4 needs ~2 MiB, one of batch 1024 ~260 MiB


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("memory")
    url = f"sqlite:///{folder / 'edgeprune.db'}"
    with running(folder, url, tiny_gpt2_dir, workers=0, worker_memory_bytes=BUDGET,
                 max_data_parallel=2) as server:
        server.stored_circuit = _store_circuit(url)  # type: ignore[attr-defined]
        yield server


def _store_circuit(url: str) -> str:
    """A circuit of the tiny model in the server's database (no worker runs here to find one)."""
    db = Database(url)
    try:
        record = CircuitRepo(db).create(NewCircuit(model=MODEL, method="eap",
                                                   edges=["tok->logits"], total_edge_count=100))
    finally:
        db.dispose()
    return f"circuits/{record.id}"


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    return info


def ioi_spec(example_count: int, batch_size: int) -> job_pb2.JobSpec:
    spec = edge_pruning_spec(job_pb2.DataSpec())
    spec.data.task.name = "ioi"
    spec.data.task.example_count = example_count
    spec.batch_size = batch_size
    return spec


def test_a_job_too_large_for_the_budget_is_rejected_with_its_estimate(
        small_server: Server) -> None:
    spec = ioi_spec(4096, 1024)
    with pytest.raises(grpc.RpcError) as caught:
        small_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)
    err = caught.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "job needs about" in err.details() and "GiB" in err.details()
    info = error_info(err)
    assert info.reason == "INSUFFICIENT_DEVICE_MEMORY"
    estimate = int(info.metadata["estimate_bytes"])
    assert estimate > BUDGET * 0.9 and int(info.metadata["budget_bytes"]) == BUDGET
    assert info.metadata["batch_size"] == "1024" and info.metadata["dtype"] == "float32"
    # one process per batch share does not help on the CPU: the ranks share its memory
    spec.data_parallel_workers = 2
    assert fails(small_server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=spec))[:2] == (
        "RESOURCE_EXHAUSTED", "INSUFFICIENT_DEVICE_MEMORY")


def test_a_normal_job_fits(small_server: Server) -> None:
    job = small_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec()),
                                      timeout=30)
    assert job.state == job_pb2.JOB_STATE_PENDING
    task = ioi_spec(256, 16)
    assert small_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=task), timeout=30).name
    few = ioi_spec(8, 1024)  # a batch is never larger than the data
    assert small_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=few), timeout=30).name


def test_an_evaluation_too_large_for_the_budget_is_rejected(small_server: Server) -> None:
    """An evaluation of 4096 IOI prompts in batches of 1024 is over the budget, and nothing is
    queued; one of 16 prompts in batches of 8 fits."""
    circuit = small_server.stored_circuit  # type: ignore[attr-defined]
    spec = job_pb2.EvaluationSpec(circuit=circuit, batch_size=1024)
    spec.data.task.name = "ioi"
    spec.data.task.example_count = 4096
    before = small_server.jobs.ListJobs(job_pb2.ListJobsRequest(page_size=1000)).jobs
    request = circuit_pb2.EvaluateCircuitRequest(evaluation=spec)
    with pytest.raises(grpc.RpcError) as caught:
        small_server.circuits.EvaluateCircuit(request, timeout=30)
    err = caught.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "job needs about" in err.details() and "checkpointing" not in err.details()
    info = error_info(err)
    assert info.reason == "INSUFFICIENT_DEVICE_MEMORY"
    assert int(info.metadata["estimate_bytes"]) > BUDGET * 0.9
    assert info.metadata["batch_size"] == "1024"
    after = small_server.jobs.ListJobs(job_pb2.ListJobsRequest(page_size=1000)).jobs
    assert [j.name for j in after] == [j.name for j in before]
    spec.batch_size, spec.data.task.example_count = 8, 16
    job = small_server.circuits.EvaluateCircuit(
        circuit_pb2.EvaluateCircuitRequest(evaluation=spec), timeout=30)
    assert job.type == job_pb2.JOB_TYPE_EVALUATION and job.state == job_pb2.JOB_STATE_PENDING


def test_activation_checkpointing_lets_a_job_fit(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a budget between the job's two estimates, SubmitJob rejects it without activation
    checkpointing and accepts it with; the rejection's metadata says which was estimated. (Eight
    layers: on two, keeping every layer's checkpoint inputs saves nothing.)"""
    model_dir = tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-8"), n_layer=8)
    spec = ioi_spec(512, 256)
    spec.data.eval_fraction = 0.25  # as given: the server's normalisation keeps it
    # every mask on: an EAP-IG warm start's passes hold two more [W, B, T, D] tensors, which on
    # a model this small outweigh what checkpointing saves
    spec.edge_pruning.warm_start = job_pb2.WARM_START_NONE
    shape = memory_check.model_shape(f"hf:{model_dir}")
    assert shape is not None
    seq_len, n_examples = memory_check.data_shape(spec.data, lambda _: (0, 0))

    def needs(checkpointing: bool) -> int:
        spec.edge_pruning.activation_checkpointing = checkpointing
        return memory_check.estimate(spec, shape, seq_len=seq_len, n_examples=n_examples,
                                     answer_positions=1, dtype="float32", on_gpu=False).total

    plain, checkpointed = needs(False), needs(True)
    assert checkpointed < plain
    budget = int((plain + checkpointed) / 2 / 0.9)  # check_fits keeps 10 % headroom
    folder = tmp_path_factory.mktemp("memory-checkpointing")
    with running(folder, f"sqlite:///{folder / 'edgeprune.db'}", model_dir, workers=0,
                 worker_memory_bytes=budget) as server:
        spec.edge_pruning.activation_checkpointing = False
        with pytest.raises(grpc.RpcError) as caught:
            server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "try activation checkpointing" in caught.value.details()
        info = error_info(caught.value)
        assert info.metadata["estimate_bytes"] == str(plain)
        assert info.metadata["activation_checkpointing"] == "false"
        spec.edge_pruning.activation_checkpointing = True
        job = server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)
    assert job.state == job_pb2.JOB_STATE_PENDING
    assert job.spec.edge_pruning.activation_checkpointing


def test_server_info_shows_the_budget_and_the_data_parallel_limit(small_server: Server) -> None:
    info = small_server.info.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=10)
    assert info.limits.worker_memory_bytes == BUDGET
    assert info.limits.max_data_parallel == 2


@pytest.mark.parametrize(("workers", "method_ep", "batch"), [(3, True, 4), (-1, True, 4),
                                                             (2, False, 4), (2, True, 1)])
def test_bad_data_parallel_workers_name_the_field(small_server: Server, workers: int,
                                                  method_ep: bool, batch: int) -> None:
    spec = edge_pruning_spec()
    spec.data_parallel_workers = workers
    spec.batch_size = batch
    if not method_ep:
        spec.method = common_pb2.METHOD_EAP
        spec.ClearField("edge_pruning")
    code, _, fields = fails(small_server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=spec))
    assert (code, fields) == ("INVALID_ARGUMENT", ["spec.data_parallel_workers"])


def test_token_lower_bounds_hold_for_real_tokenizers(tiny_gpt2_dir: Path,
                                                     tiny_llama_dir: Path) -> None:
    """The check only rejects what cannot fit: its sequence lengths never exceed the real ones."""
    for folder in (tiny_gpt2_dir, tiny_llama_dir):
        tokenizer = load_model(f"hf:{folder}").tokenizer
        for name, bound in TASK_MIN_TOKENS.items():
            task = build_task(name, tokenizer, n=16, seed=0)
            assert task.clean_ids.shape[1] >= bound, name
        examples = inline_examples().examples.examples
        data = from_examples([Example(clean=e.clean, corrupted=e.corrupted, target=e.target,
                                      distractor=e.distractor) for e in examples], tokenizer)
        assert min_tokens(e.clean for e in examples) <= data.clean_ids.shape[1]


def test_long_words_are_counted_in_tokens_at_submit(tmp_path_factory: pytest.TempPathFactory,
                                                    tiny_gpt2_dir: Path) -> None:
    """One long 'word' tokenises into many tokens: the API counts them with the model's
    tokenizer and rejects the job and an evaluation of the same data at submit, inline or
    uploaded. Without a tokenizer, the byte bound still counts a long word as several tokens and
    never more than the tokenizer does."""
    junk = "".join("qzxjvkw"[(i * i + 3 * i) % 7] for i in range(300))
    spec = edge_pruning_spec(job_pb2.DataSpec())
    spec.batch_size = 8
    examples = [Example(clean=f"{junk} Mary", corrupted=f"{junk} John", target=" John",
                        distractor=" Mary") for _ in range(40)]
    for ex in examples:
        spec.data.examples.examples.add(clean=ex.clean, corrupted=ex.corrupted, target=ex.target,
                                        distractor=ex.distractor)
    model = load_model(f"hf:{tiny_gpt2_dir}")
    n_tokens = from_examples(examples, model.tokenizer).clean_ids.shape[1]
    words = max(len(e.clean.split()) for e in examples)
    assert n_tokens > 50 * words
    assert words < min_tokens(e.clean for e in examples) <= n_tokens
    assert n_tokens - 1 <= min_tokens((e.clean for e in examples), model.tokenizer) <= n_tokens

    def needs(seq_len: int) -> int:  # a pruning job's, or an evaluation's of the same data
        return max(estimate_job_memory(model, batch_size=8, seq_len=seq_len, n_examples=32).total,
                   estimate_evaluation_memory(model, batch_size=8, seq_len=seq_len,
                                              n_examples=40).total)

    def least(seq_len: int) -> int:
        return min(estimate_job_memory(model, batch_size=8, seq_len=seq_len, n_examples=32).total,
                   estimate_evaluation_memory(model, batch_size=8, seq_len=seq_len,
                                              n_examples=40).total)

    assert needs(words + 1) < least(n_tokens - 1)
    budget = int((needs(words + 1) + least(n_tokens - 1)) / 2 / 0.9)
    folder = tmp_path_factory.mktemp("memory-tokens")
    url = f"sqlite:///{folder / 'edgeprune.db'}"
    with running(folder, url, tiny_gpt2_dir, worker_memory_bytes=budget, workers=0) as server:
        content = "\n".join(json.dumps({"clean": e.clean, "corrupted": e.corrupted,
                                        "target": e.target, "distractor": e.distractor})
                            for e in examples).encode()
        dataset = server.datasets.UploadDataset(iter([
            dataset_pb2.UploadDatasetRequest(metadata=dataset_pb2.DatasetMetadata()),
            dataset_pb2.UploadDatasetRequest(chunk=content)]), timeout=60)
        uploaded = job_pb2.DataSpec(dataset=dataset.name)
        for data in (spec.data, uploaded):
            job = job_pb2.JobSpec()
            job.CopyFrom(spec)
            job.data.CopyFrom(data)
            code, reason, _ = fails(server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=job),
                                    timeout=60)
            assert (code, reason) == ("RESOURCE_EXHAUSTED", "INSUFFICIENT_DEVICE_MEMORY")
            code, reason, _ = fails(
                server.circuits.EvaluateCircuit, circuit_pb2.EvaluateCircuitRequest(
                    evaluation=job_pb2.EvaluationSpec(circuit=_store_circuit(url), data=data,
                                                      batch_size=8)), timeout=60)
            assert (code, reason) == ("RESOURCE_EXHAUSTED", "INSUFFICIENT_DEVICE_MEMORY")


def test_the_estimate_loads_no_torch() -> None:
    """The API estimates with engine/memory.py's arithmetic; torch stays out of its process."""
    code = ("import sys, edgeprune.service.memory_check as m; "
            "m.estimate(m.job_pb2.JobSpec(batch_size=8), m.PRESETS['smollm2-135m'], seq_len=64, "
            "n_examples=100, answer_positions=1, dtype='bfloat16', on_gpu=True); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_concurrent_submits_share_the_tokenizer_safely(small_server: Server) -> None:
    """The API counts tokens on its request threads with one tokenizer per model; fast
    tokenizers refuse concurrent use ("Already borrowed"), so 48 submits at once must each be
    answered, never INTERNAL."""
    from concurrent.futures import ThreadPoolExecutor

    def submit(i: int) -> str:
        spec = edge_pruning_spec(inline_examples(200))
        spec.seed = i + 1
        try:
            small_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=120)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    with ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(submit, range(48)))
    assert set(codes) == {"OK"}, codes
