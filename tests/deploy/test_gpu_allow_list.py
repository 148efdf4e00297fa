"""The GPU overlay's API pod checks jobs' memory without reading the models: a real server started
with the rendered overlay's config.yaml and its API container's environment, where none of the
allow-listed hf: folders exists (as on the API pod, which does not mount the model volume)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgeprune.engine.memory import PRESETS, estimate_job_memory
from edgeprune.v1 import common_pb2, job_pb2, server_pb2
from tests.deploy.test_manifests import DEPLOY, container_env, generated, one, render
from tests.service.errors import details
from tests.service.harness import Server, edge_pruning_spec

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

MODEL = "llama-3.2-1b"  # the overlay's 1B-class model


@pytest.fixture(scope="module")
def gpu_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    docs = render(DEPLOY / "overlays" / "gpu")
    folder = tmp_path_factory.mktemp("gpu-api")
    config_file = folder / "config.yaml"
    config_file.write_text(generated(docs, "edgeprune-config")["data"]["config.yaml"])
    api = one(docs, "Deployment", "edgeprune-api")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(docs, api)
    # the API container's own settings (workers 0, device cpu, ...) as flags; what cannot run
    # here (the config file's path, the database, the data folder, ports) is the harness's
    settings = {name.removeprefix("EDGEPRUNE_").lower(): value for name, value in env.items()
                if name.startswith("EDGEPRUNE_") and name not in ("EDGEPRUNE_CONFIG",
                                                                    "EDGEPRUNE_CACHE_DIR")}
    assert settings["workers"] == "0" and settings["device"] == "cpu"
    server = Server(folder, f"sqlite:///{folder / 'edgeprune.db'}", {}, config=config_file,
                    metrics_host="127.0.0.1", **settings).start()
    try:
        yield server
    finally:
        server.stop()


def submit(server: Server, spec: job_pb2.JobSpec) -> job_pb2.Job:
    return server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)


def ioi_job(batch_size: int, dtype: int = common_pb2.DTYPE_UNSPECIFIED) -> job_pb2.JobSpec:
    spec = edge_pruning_spec(job_pb2.DataSpec())
    spec.model, spec.batch_size, spec.dtype = MODEL, batch_size, dtype
    spec.data.task.name, spec.data.task.example_count = "ioi", 4096
    return spec


def test_the_api_estimates_every_model_in_the_workers_bfloat16(gpu_api: Server) -> None:
    info = gpu_api.info.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=30)
    assert info.default_dtype == common_pb2.DTYPE_BFLOAT16
    assert info.limits.worker_memory_bytes == 80_000_000_000
    assert MODEL in {m.name for m in info.models}
    assert all(m.memory_checked for m in info.models), info.models
    assert not Path(next(m.ref for m in info.models if m.name == MODEL)[3:]).exists()


def test_an_oversized_job_on_the_1b_model_is_rejected_at_submit(gpu_api: Server) -> None:
    spec = ioi_job(256)
    spec.positions = common_pb2.POSITION_MODE_ALL  # logits at every position: 128k words each
    with pytest.raises(grpc.RpcError) as caught:
        submit(gpu_api, spec)
    code, reason, _ = details(caught.value)
    assert (code, reason) == ("RESOURCE_EXHAUSTED", "INSUFFICIENT_DEVICE_MEMORY")
    assert "job needs about" in caught.value.details()


def test_a_small_job_on_the_1b_model_is_accepted(gpu_api: Server) -> None:
    assert submit(gpu_api, ioi_job(8)).state == job_pb2.JOB_STATE_PENDING


def test_a_job_that_fits_only_in_bfloat16_is_accepted_unless_it_asks_for_float32(
        gpu_api: Server) -> None:
    # IOI at batch 160 on the 1B model: about 46 GB in bf16, 77 GB in fp32 (budget 72 GB)
    assert submit(gpu_api, ioi_job(160)).state == job_pb2.JOB_STATE_PENDING
    with pytest.raises(grpc.RpcError) as caught:
        submit(gpu_api, ioi_job(160, common_pb2.DTYPE_FLOAT32))
    assert details(caught.value)[:2] == ("RESOURCE_EXHAUSTED", "INSUFFICIENT_DEVICE_MEMORY")


def test_bfloat16_halves_the_activation_estimate() -> None:
    """GPT-2's LayerNorms save their inputs in the model's dtype, so every activation term is
    in bf16 (LLaMA's RMSNorm upcasts its input: there the norm inputs stay fp32)."""
    kwargs = {"batch_size": 32, "seq_len": 64, "n_examples": 512}
    fp32 = estimate_job_memory(PRESETS["gpt2-small"], dtype="float32", **kwargs)
    bf16 = estimate_job_memory(PRESETS["gpt2-small"], dtype="bfloat16", **kwargs)
    for term in ("weights", "ablated", "deltas", "delta_grads", "activations"):
        assert getattr(bf16, term) * 2 == getattr(fp32, term), term
    assert bf16.masks == fp32.masks  # the masks and their optimiser state stay fp32
