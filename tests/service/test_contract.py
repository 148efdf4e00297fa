"""The service and the engine hold one contract: the same names, limits and defaults.

What `normalize_job_spec` stores is what the worker runs: every default is filled in, and the
settings `translate` builds from a normalised spec are the engine's own defaults. Circuits and
progress cross between the engine, protobuf and storage through one function each way.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from edgeprune.engine import attribution, contract, defaults
from edgeprune.engine.circuit import Circuit
from edgeprune.engine.loading import DTYPES as ENGINE_DTYPES
from edgeprune.engine.prune import PhaseProgress, ProgressEvent, PruneConfig
from edgeprune.engine.tasks import TASKS
from edgeprune.service import translate
from edgeprune.service.config import Config, ConfigError, Limits, load_config
from edgeprune.service.validation import Violations, normalize_job_spec
from edgeprune.storage import CircuitRepo, Database, JobRecord, JobState
from edgeprune.v1 import common_pb2, job_pb2
from tests.service.conftest import database_url

MODEL = "m"
CONFIG = Config(models={MODEL: "hf:x"})
N_EDGES = 1000


def normalized(method: int, **fields: object) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(model=MODEL, method=method, **fields)
    spec.data.task.name = "ioi"
    v = Violations()
    normalize_job_spec(spec, CONFIG, v)
    v.raise_if_any()
    return spec


EMPTY_RECORD = {
    "id": "j", "kind": translate.KIND_DISCOVERY, "spec": b"",
    "spec_json": {}, "state": JobState.PENDING, "priority": 0, "labels": {}, "owner": "",
    "request_id": None, "attempt": 0, "cancel_requested": False, "lease_owner": None,
    "lease_expires_at": None, "heartbeat_at": None, "created_at": None, "updated_at": None,
    "started_at": None, "finished_at": None, "progress": {}, "checkpoint_blob": None,
    "result": {}, "error": None, "error_reason": None, "last_event_sequence": 0,
}


# ---- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "enum", "names"), [
    (translate.METHODS, common_pb2.Method, contract.METHODS),
    (translate.ABLATIONS, common_pb2.Ablation, contract.ABLATIONS),
    (translate.LOSSES, common_pb2.Loss, contract.LOSSES),
    (translate.DTYPES, common_pb2.Dtype, contract.DTYPES),
    (translate.WARM_STARTS, job_pb2.WarmStart, contract.WARM_STARTS),
], ids=["method", "ablation", "loss", "dtype", "warm_start"])
def test_every_proto_value_has_one_engine_name(table: dict[int, str], enum: object,
                                               names: tuple[str, ...]) -> None:
    values = set(enum.values()) - {0}  # type: ignore[attr-defined]  # 0: UNSPECIFIED
    if enum is job_pb2.WarmStart:
        values.discard(job_pb2.WARM_START_NONE)  # no warm start is None to the engine
    assert set(table) == values
    assert sorted(table.values()) == sorted(names)


def test_the_contracts_names_are_the_engines() -> None:
    assert set(contract.DTYPES) <= set(ENGINE_DTYPES)
    assert set(contract.BUILTIN_TASKS) == {n for n in TASKS
                                           if not n.startswith(contract.TRACR_TASK_PREFIX)}
    assert set(contract.ABLATIONS) == {"corrupted", "zero", "mean"}
    assert set(contract.IG_METHODS) < set(contract.METHODS)


# ---- limits ------------------------------------------------------------------------------------


def test_no_service_limit_exceeds_the_engines() -> None:
    limits = dataclasses.asdict(Limits())
    shared = set(limits) & set(contract.LIMITS)
    assert shared, "the service names none of the engine's limits"
    for name in shared:
        assert limits[name] <= contract.LIMITS[name], name


@pytest.mark.parametrize("name", sorted(set(dataclasses.asdict(Limits())) & set(contract.LIMITS)))
def test_a_service_limit_above_the_engines_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: at most the engine's limit"):
        load_config(environ={f"EDGEPRUNE_{name.upper()}": str(contract.LIMITS[name] + 1)})


def test_the_engine_enforces_the_seed_limit() -> None:
    """The service takes seeds up to the contract's limit; PruneConfig takes the same."""
    spec = normalized(common_pb2.METHOD_EDGE_PRUNING, seed=contract.MAX_SEED)
    assert translate.prune_config(spec, {}, N_EDGES).seed == contract.MAX_SEED
    with pytest.raises(Exception, match="spec.seed"):
        normalized(common_pb2.METHOD_EDGE_PRUNING, seed=contract.MAX_SEED + 1)


# ---- defaults ----------------------------------------------------------------------------------


def test_service_config_defaults_are_the_contracts() -> None:
    config = Config()
    assert config.default_steps == defaults.STEPS
    assert config.default_batch_size == defaults.JOB_BATCH_SIZE
    assert config.default_examples == defaults.JOB_EXAMPLES
    assert config.default_edge_sparsity == defaults.JOB_EDGE_SPARSITY


def test_engine_signatures_default_to_the_contract() -> None:
    library = PruneConfig()
    assert (library.loss, library.ablation) == (defaults.LOSS, defaults.ABLATION)
    assert (library.node_masks, library.node_target) == (defaults.NODE_MASKS, defaults.NODE_TARGET)
    assert library.warm_start == defaults.WARM_START
    attribute = inspect.signature(attribution.attribute).parameters
    acdc = inspect.signature(attribution.acdc).parameters
    assert attribute["ig_steps"].default == defaults.IG_STEPS
    assert attribute["ablation"].default == acdc["ablation"].default == defaults.ABLATION
    assert acdc["threshold"].default == defaults.ACDC_THRESHOLD


@pytest.mark.parametrize("sparsity", [0.5, 0.95, 1.1])
def test_an_unset_edge_pruning_job_runs_the_library_defaults(sparsity: float) -> None:
    """Every PruneConfig field the worker builds from a bare normalised spec is the library's
    default, but for the size and the service's batch (its own `default_batch_size`)."""
    spec = normalized(common_pb2.METHOD_EDGE_PRUNING)
    size = {"edge_sparsity": sparsity}
    built = translate.prune_config(spec, size, N_EDGES)
    library = PruneConfig(batch_size=CONFIG.default_batch_size,
                          target_warmup_steps=defaults.target_warmup_steps(defaults.STEPS),
                          **translate.size_kwargs(size, N_EDGES))
    assert dataclasses.asdict(built) == dataclasses.asdict(library)
    assert spec.data.eval_fraction == pytest.approx(defaults.EVAL_FRACTION)
    assert spec.data.task.example_count == CONFIG.default_examples
    assert [translate.size_to_dict(s) for s in spec.sizes] == [
        {"edge_sparsity": pytest.approx(CONFIG.default_edge_sparsity)}]


@pytest.mark.parametrize("method", [m for m in translate.METHODS
                                    if m != common_pb2.METHOD_EDGE_PRUNING])
def test_an_unset_attribution_job_runs_the_library_defaults(method: int) -> None:
    spec = normalized(method)
    name = translate.METHODS[method]
    engine = attribution.acdc if name == "acdc" else attribution.attribute
    params = inspect.signature(engine).parameters
    kwargs = translate.attribution_kwargs(spec)
    for key, value in kwargs.items():
        if key != "batch_size":  # the service's own default_batch_size
            assert value == params[key].default, key
    assert ("ig_steps" in kwargs) == (name in contract.IG_METHODS)
    assert ("threshold" in kwargs) == (name == "acdc")


def test_set_values_are_kept() -> None:
    spec = normalized(common_pb2.METHOD_ACDC, ablation=common_pb2.ABLATION_MEAN, batch_size=3)
    spec.attribution.acdc_threshold = 0.5
    assert translate.attribution_kwargs(spec) == {"ablation": "mean", "batch_size": 3,
                                                  "threshold": 0.5}
    ig = normalized(common_pb2.METHOD_EAP_IG, attribution=job_pb2.AttributionOptions(ig_steps=9))
    assert translate.attribution_kwargs(ig)["ig_steps"] == 9


@pytest.mark.parametrize("method", [common_pb2.METHOD_EDGE_PRUNING, common_pb2.METHOD_ACDC,
                                    common_pb2.METHOD_EAP_IG, common_pb2.METHOD_EAP])
def test_a_spec_an_older_api_stored_runs_as_a_new_one(method: int) -> None:
    """Specs stored before validation filled every default (those fields at 0) read back with
    the defaults the new API would have stored, so queued jobs survive an upgrade."""
    new = normalized(method)
    old = job_pb2.JobSpec()
    old.CopyFrom(new)
    old.ClearField("ablation")
    old.ClearField("loss")
    if old.HasField("edge_pruning"):
        old.edge_pruning.warm_start_ig_steps = 0
    if old.HasField("attribution"):
        old.attribution.acdc_threshold = 0
        old.attribution.ig_steps = 0
    record = JobRecord(**{**EMPTY_RECORD, "spec": old.SerializeToString()})
    assert translate.parse_spec(record) == new


@pytest.mark.parametrize(("dtype", "device", "name"), [
    (common_pb2.DTYPE_UNSPECIFIED, "cpu", "float32"),
    (common_pb2.DTYPE_UNSPECIFIED, "cuda:1", "bfloat16"),
    (common_pb2.DTYPE_FLOAT16, "cpu", "float16"),
    (common_pb2.DTYPE_FLOAT32, "cuda", "float32"),
])
def test_dtype_names(dtype: int, device: str, name: str) -> None:
    assert translate.dtype_name(dtype, device) == name


# ---- circuits and progress ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql",
                                                            marks=pytest.mark.postgres)])
def test_a_circuit_round_trips_through_storage(backend: str, tmp_path: Path) -> None:
    spec = normalized(common_pb2.METHOD_EAP)
    circuit = Circuit(model=MODEL, method="eap", edges=["tok->a0.0", "a0.0->logits"],
                      edge_scores={"tok->a0.0": 2.5, "a0.0->logits": -1.0},
                      nodes=["tok", "a0.0"], total_edge_count=40,
                      target={"edge_count": 2}, settings={"ablation": "corrupted"},
                      provenance={"seed": 0}, metrics={"kl": 0.25})
    with database_url(backend, tmp_path) as url:
        db = Database(url)
        try:
            db.migrate()
            repo = CircuitRepo(db)
            stored = repo.create(translate.new_circuit(
                circuit, spec=spec, owner="alice", job_id=None, task="ioi",
                target={"edge_count": 2}, total_node_count=3, mask_blob=None))
            back = translate.circuit_from_record(repo.get(stored.id, full=True))
        finally:
            db.dispose()
    assert back.to_dict() == circuit.to_dict()
    assert (stored.owner, stored.task, stored.method) == ("alice", "ioi", "eap")


def test_progress_is_typed_and_round_trips() -> None:
    event = ProgressEvent(step=3, total_steps=10, loss=1.5, task_loss=0.5, loss_name="kl",
                          sparsity_loss=1.0, expected_sparsity=0.4, node_sparsity=None,
                          target=0.9, lambdas={"lambda1": 0.1, "lambda2": -0.2}, steps_per_s=2.0)
    progress = translate.progress(event)
    assert progress.kl == progress.task_loss == 0.5 and progress.eta_seconds == 3.5
    for value in (progress, translate.progress(PhaseProgress("warm_start", 2, 5)),
                  translate.phase("load_model")):
        assert translate.progress_from_payload(translate.progress_payload(value)) == value
