"""Server and worker configuration: command-line flags > environment (``EDGEPRUNE_*``) > a
YAML/JSON file (``--config``) > defaults.

Every setting has one name used everywhere: ``--max-steps`` on the command line,
``EDGEPRUNE_MAX_STEPS`` in the environment, ``max_steps`` in the file (limits may also sit under a
``limits:`` mapping there). The model allow-list maps the short names clients use onto engine
references: ``--model gpt2=hf:/models/gpt2`` (repeatable), ``EDGEPRUNE_MODELS="a=hf:/x,b=tracr:/y"``
or a ``models:`` mapping in the file. Clients can only name models on this list. In the file an
entry may also be a mapping ``{ref: hf:/x, config: {model_type: llama, hidden_size: ...}}``: the
sizes of the model's config.json, from which SubmitJob estimates a job's memory where the API
cannot read the model's own files (`Config.model_configs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from edgeprune.engine import contract, defaults
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.examples import MAX_EXAMPLES
from edgeprune.engine.memory import SHAPE_READERS
from edgeprune.service.principals import Principals

ENV_PREFIX = "EDGEPRUNE_"
DEFAULT_MODELS = {"smollm2-135m": "smollm2-135m"}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConfigError(ValueError):
    """A setting is malformed; the message names it and where it came from."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond them a call fails with INVALID_ARGUMENT or
    RESOURCE_EXHAUSTED (and never reaches a worker)."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_dataset_bytes: int = 256 * 1024 * 1024
    max_examples: int = MAX_EXAMPLES  # the engine's limit; a larger one is refused
    max_inline_examples: int = 10_000
    max_concurrent_uploads: int = 2  # UploadDataset calls in progress at once (each streams)
    max_steps: int = 100_000
    max_sizes: int = 64
    max_batch_size: int = 1024
    max_page_size: int = 1000
    max_pending_jobs: int = 10_000
    max_pending_jobs_per_principal: int = 1_000  # a non-admin principal's share of the queue
    max_datasets_per_principal: int = 1_000  # datasets a non-admin principal may keep
    max_watches_per_client: int = 100  # WatchJob streams one principal (or host) holds at once
    max_labels: int = 64
    max_data_parallel: int = 1  # processes of one data-parallel Edge Pruning job (GPUs of a worker)

    @property
    def reply_bytes(self) -> int:
        """What the records of one reply may add up to: FULL pages end before this, with room
        left for the page token and framing."""
        return self.max_message_bytes - min(64 * 1024, self.max_message_bytes // 16)


@dataclass(frozen=True)
class Config:
    """Everything `edgeprune serve` and `edgeprune worker` read. Durations are in seconds."""

    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9464  # 0: any free port; -1: no metrics endpoint
    # /metrics has no auth: only this host sees it unless the operator opens it (Kubernetes).
    metrics_host: str = "127.0.0.1"
    data_dir: str = "data"
    database_url: str = ""  # "": sqlite:///<data_dir>/edgeprune.db
    models: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    # name -> the config.json sizes an allow-list entry of the file records (see the docstring);
    # set with `models`, never on its own
    model_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    show_model_refs: bool = True  # GetServerInfo lists what each short name resolves to
    workers: int = 1  # worker processes `serve` starts next to the API (0: API only)
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1" ...
    # what jobs that name no dtype run in, and SubmitJob's memory estimate assumes ("": the
    # device's default, bfloat16 on cuda, else float32); the API, whose own device is the CPU,
    # learns the GPU workers' dtype from this
    worker_dtype: str = ""
    threads: int = 0  # torch CPU threads per worker (0: torch's default, one per core)
    worker_memory_bytes: int = 0  # one job's memory on a worker (0: auto, see memory_check.py)
    tls_cert: str = ""  # PEM files; both set -> the API only accepts TLS
    tls_key: str = ""
    auth_tokens: Sequence[str] = ()  # non-empty -> calls need "authorization: Bearer <token>"
    # ("TOKEN" or "NAME[:ROLE[:MAX_PRIORITY]]=TOKEN", see principals.py)
    user_max_priority: int = 0  # the highest priority a non-admin principal may submit at
    auth_token_file: str = ""  # more tokens, one a line (kept out of argv, where `ps` shows them)
    insecure: bool = False  # accept bearer tokens without TLS (a trusted network or a mesh)
    limits: Limits = field(default_factory=Limits)
    # Job defaults for fields a request leaves at zero.
    default_steps: int = defaults.STEPS  # Edge Pruning steps (the engine's default recipe)
    default_batch_size: int = defaults.JOB_BATCH_SIZE
    default_examples: int = defaults.JOB_EXAMPLES
    default_edge_sparsity: float = defaults.JOB_EDGE_SPARSITY
    default_page_size: int = 50
    # Worker behaviour.
    lease_s: float = 30.0
    heartbeat_s: float = 2.0
    checkpoint_every: int = 50  # steps between checkpoints
    progress_interval_s: float = 0.2  # at most one progress event per interval (and the last step)
    poll_s: float = 0.2  # idle workers look for jobs, watchers for events, this often
    max_attempts: int = 3
    # /livez fails when a worker's job loop has not beaten for this long (see probes.py): above
    # the slowest model load and evaluation pass, and the database's longest wait.
    liveness_timeout_s: float = 600.0
    warm_models: Sequence[str] = ()  # allow-listed names a worker loads before it is ready
    drain_grace_s: float = 20.0  # SIGTERM: in-flight calls and running jobs get this long
    # Storage upkeep, run by the API process every cleanup_interval_s (0: never).
    cleanup_interval_s: float = 3600.0
    job_retention_days: float = 0.0  # finished jobs older than this are deleted (0: kept forever)
    blob_grace_s: float = 3600.0  # an unreferenced blob younger than this is kept (a worker may
    # have stored it for the circuit it is about to store)
    log_level: str = "INFO"
    log_format: str = "text"  # "json": one JSON object a line, for log collectors
    # OpenTelemetry traces go to this OTLP/gRPC collector ("": OTEL_EXPORTER_OTLP_ENDPOINT, and
    # without that too, tracing is off; see tracing.py)
    otlp_endpoint: str = ""

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        from edgeprune.storage import default_database_url

        return default_database_url(self.data_dir)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Inverse of `to_json` (how `serve` hands its resolved config to its workers)."""
        data = json.loads(text)
        limits = Limits(**data.pop("limits"))
        data["auth_tokens"] = tuple(data["auth_tokens"])
        data["warm_models"] = tuple(data.get("warm_models", ()))
        config = cls(limits=limits, **data)
        validate(config)
        return config


LOG_FORMATS = ("text", "json")


def _fields(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


CONFIG_FIELDS = {k: v for k, v in _fields(Config).items() if k not in ("limits", "model_configs")}
LIMIT_FIELDS = _fields(Limits)


def _parse(name: str, kind: Any, raw: Any, source: str) -> Any:
    """Convert a flag/env string (or a file value) to the setting's type."""
    origin = get_origin(kind)
    try:
        if origin in (Union, types.UnionType):
            kind = next(a for a in get_args(kind) if a is not type(None))
            origin = get_origin(kind)
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind in (int, float, str):
            if kind is int and isinstance(raw, float):
                raise ValueError(f"not an integer: {raw!r}")
            return kind(raw)
        if origin is Mapping or kind is Mapping:
            return _parse_mapping(raw)
        if origin is Sequence:
            if isinstance(raw, str):
                return tuple(item.strip() for item in raw.split(",") if item.strip())
            return tuple(str(item) for item in raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} (from {source}): {err}") from err
    raise ConfigError(f"{name}: unsupported setting type {kind}")


def _parse_mapping(raw: Any) -> dict[str, str]:
    """``{"a": "hf:x"}``, ``"a=hf:x,b=tracr:y"`` or ``["a=hf:x", ...]`` -> dict."""
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


MODEL_ENTRY_KEYS = ("ref", "config")


def _split_models(raw: Any, source: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The allow-list as (name -> reference, name -> recorded config): a file's ``models``
    mapping may give an entry as ``{ref: ..., config: {...}}`` instead of the bare reference."""
    if not isinstance(raw, Mapping):
        return _parse("models", Mapping[str, str], raw, source), {}
    refs: dict[str, str] = {}
    configs: dict[str, Any] = {}
    for name, entry in raw.items():
        if not isinstance(entry, Mapping):
            refs[str(name)] = str(entry)
            continue
        unknown = sorted(set(map(str, entry)) - set(MODEL_ENTRY_KEYS))
        if unknown or "ref" not in entry:
            raise ConfigError(f"models.{name} (from {source}): expected a reference or a mapping "
                              f"of {' and '.join(MODEL_ENTRY_KEYS)}"
                              + (f", got {', '.join(unknown)}" if unknown else ", got no ref"))
        refs[str(name)] = str(entry["ref"])
        if entry.get("config") is not None:
            configs[str(name)] = entry["config"]
    return refs, configs


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"config file {path}: {err}") from err
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    limits = data.pop("limits", None) or {}
    if not isinstance(limits, dict):
        raise ConfigError(f"config file {path}: `limits` must be a mapping")
    data.update(limits)
    unknown = sorted(set(data) - set(CONFIG_FIELDS) - set(LIMIT_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {', '.join(unknown)}")
    return data


HELP = {
    "host": "address the API listens on",
    "port": "API port (0: any free port)",
    "metrics_port": "Prometheus /metrics port (0: any free port; -1: none)",
    "data_dir": "folder of the embedded SQLite database",
    "database_url": "sqlite:///path or postgresql+psycopg://... (default: SQLite in data_dir)",
    "show_model_refs": "GetServerInfo shows what each allow-listed name resolves to",
    "workers": "worker processes `serve` starts (0: API only)",
    "device": "auto, cpu, cuda or cuda:N",
    "worker_dtype": "dtype of jobs that name none, and of SubmitJob's memory estimate: float32, "
                    "bfloat16 or float16 (default: bfloat16 for cuda workers, else float32)",
    "threads": "torch CPU threads per worker (0: one per core)",
    "worker_memory_bytes": "memory one job may use on a worker device; SubmitJob rejects jobs "
                           "estimated above it (0: half the RAM for CPU workers, unchecked for GPUs)",
    "max_examples": f"examples in one dataset or task (at most the engine's {MAX_EXAMPLES})",
    "max_concurrent_uploads": "UploadDataset calls the API serves at once (more: RESOURCE_EXHAUSTED)",
    "max_data_parallel": "most processes (devices) one data-parallel Edge Pruning job may use",
    "max_watches_per_client": "WatchJob streams one principal (or, without tokens, one host) may "
                              "hold at once (more: RESOURCE_EXHAUSTED)",
    "user_max_priority": "highest job priority a non-admin principal may ask for",
    "tls_cert": "PEM certificate chain (with --tls-key: TLS only)",
    "tls_key": "PEM private key",
    "metrics_host": "address /metrics listens on (unauthenticated: 0.0.0.0 only where "
                    "the network is trusted, e.g. a Kubernetes pod)",
    "auth_token_file": "file of accepted bearer tokens, one a line (# comments)",
    "insecure": "allow bearer tokens without TLS (tokens then cross the network in plaintext)",
    "lease_s": "a job's lease; a worker silent this long loses it",
    "heartbeat_s": "how often a worker extends its lease",
    "checkpoint_every": "pruning steps between checkpoints",
    "progress_interval_s": "at most one progress event per interval",
    "poll_s": "how often idle workers and watchers poll the database",
    "max_attempts": "attempts before a job whose workers keep dying fails",
    "drain_grace_s": "SIGTERM: time for calls and jobs to wind down",
    "liveness_timeout_s": "a worker whose job loop shows no progress this long fails /livez "
                          "(above the slowest model load or evaluation pass)",
    "warm_models": "allow-listed models a worker loads at start, before /readyz succeeds "
                   "(comma-separated; default none: models load on their first job)",
    "otlp_endpoint": "OpenTelemetry OTLP/gRPC collector for traces, e.g. http://otel:4317 "
                     "(default: OTEL_EXPORTER_OTLP_ENDPOINT; neither: no tracing)",
    "cleanup_interval_s": "how often the API deletes expired jobs and unreferenced blobs (0: never)",
    "job_retention_days": "delete finished jobs (with their events) this many days after they "
                          "ended (0: keep them forever); their circuits stay",
    "blob_grace_s": "the cleanup keeps an unreferenced blob until it is this old",
    "log_format": "text (human-readable lines) or json (one JSON object a line)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting (default None: "not given")."""
    parser.add_argument("--config", help="YAML or JSON config file")
    for name in [*CONFIG_FIELDS, *LIMIT_FIELDS]:
        flag = "--" + name.replace("_", "-")
        if name == "models":
            parser.add_argument("--model", dest="models", action="append", metavar="NAME=REF",
                                help="allow-list entry (repeatable; replaces the default list)")
        elif name == "auth_tokens":
            parser.add_argument("--auth-token", dest="auth_tokens", action="append",
                                metavar="[NAME[:ROLE[:MAX_PRIORITY]]=]TOKEN",
                                help="accepted bearer token and its principal (repeatable)")
        elif CONFIG_FIELDS.get(name) is bool:  # a bare `--insecure` means true
            parser.add_argument(flag, dest=name, default=None, nargs="?", const="true",
                                metavar="BOOL", help=HELP.get(name, name.replace("_", " ")))
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper(),
                                help=HELP.get(name, name.replace("_", " ")))


def load_config(
    args: argparse.Namespace | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Merge defaults < file < environment < flags into a validated `Config`."""
    environ = os.environ if environ is None else environ
    values: dict[str, tuple[Any, str]] = {}
    config_file = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        values.update({k: (v, config_file) for k, v in _read_file(config_file).items()})
    for name in [*CONFIG_FIELDS, *LIMIT_FIELDS]:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = (environ[env_name], env_name)
        flag = getattr(args, name, None) if args is not None else None
        if flag is not None:
            values[name] = (flag, "--" + name.replace("_", "-"))
    kinds = {**CONFIG_FIELDS, **LIMIT_FIELDS}
    models = values.pop("models", None)
    parsed = {name: _parse(name, kinds[name], raw, src) for name, (raw, src) in values.items()}
    if models is not None:  # recorded configs come and go with the allow-list they belong to
        parsed["models"], parsed["model_configs"] = _split_models(*models)
    if parsed.get("auth_token_file"):
        parsed["auth_tokens"] = (*parsed.get("auth_tokens", ()),
                                 *read_token_file(parsed["auth_token_file"]))
    limits = Limits(**{k: v for k, v in parsed.items() if k in LIMIT_FIELDS})
    config = Config(limits=limits, **{k: v for k, v in parsed.items()
                                      if k in CONFIG_FIELDS or k == "model_configs"})
    validate(config)
    return config


def read_token_file(path: str) -> tuple[str, ...]:
    """The tokens of an ``auth_token_file``: one a line; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"auth_token_file {path}: {err.strerror or err}") from err
    tokens = tuple(line.strip() for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ConfigError(f"auth_token_file {path}: no tokens in the file")
    return tokens


def check_transport(config: Config) -> None:
    """Bearer tokens sent in plaintext can be read off the network and replayed: a server that
    checks tokens speaks TLS, unless the operator says ``insecure`` (a trusted network). Only
    the API checks this (`serve`, `build`): workers and migrations serve no calls."""
    if config.auth_tokens and not config.tls and not config.insecure:
        raise ConfigError(
            "auth_tokens: bearer tokens need TLS (set tls_cert and tls_key), or insecure: true "
            "(--insecure, EDGEPRUNE_INSECURE=1) to accept them in plaintext on a trusted network")


def check_model_config(where: str, recorded: Any) -> None:
    """A recorded model config gives a memory estimate: a known ``model_type`` and positive
    integer sizes under their config.json names; ConfigError naming the key otherwise."""
    if not isinstance(recorded, Mapping):
        raise ConfigError(f"{where}: expected a mapping of config.json keys, got {recorded!r}")
    model_type = recorded.get("model_type")
    if model_type not in SHAPE_READERS:
        raise ConfigError(f"{where}.model_type: {model_type!r} is not one of "
                          f"{', '.join(sorted(SHAPE_READERS))}")
    read: dict[str, bool] = {}  # key the reader asked for -> whether it has a fallback

    def get(key: str, *default: Any) -> Any:
        read[key] = read.get(key, True) and bool(default)
        return recorded.get(key, *default)

    try:
        SHAPE_READERS[model_type](get, "")
        error = None
    except (InvalidArgument, TypeError) as err:
        error = err
    for key in read:  # only what the estimate reads: a whole config.json may be pasted in
        value = recorded.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"{where}.{key}: must be a positive integer, got {value!r}")
    if error is not None:
        missing = sorted(key for key, fallback in read.items()
                         if not fallback and key not in recorded)
        raise ConfigError(f"{where}: {error}"
                          + (f" (not given: {', '.join(missing)})" if missing else "")) from error


def validate(config: Config) -> None:
    """Reject settings that cannot work, naming them."""
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port: {config.port} is not a TCP port")
    if not -1 <= config.metrics_port <= 65535:
        raise ConfigError(f"metrics_port: {config.metrics_port} is not a TCP port (-1: off)")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert and tls_key must be given together")
    try:
        Principals(config.auth_tokens)
    except ValueError as err:
        raise ConfigError(f"auth_tokens: {err}") from err
    for path in (config.tls_cert, config.tls_key):
        if path and not Path(path).is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    if not config.models:
        raise ConfigError("models: the allow-list is empty")
    for name, ref in config.models.items():
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(f"models: bad short name {name!r} (letters, digits, . _ -)")
        if not ref:
            raise ConfigError(f"models: {name!r} has no reference")
    for name, recorded in config.model_configs.items():
        if name not in config.models:
            raise ConfigError(f"models.{name}.config: {name!r} is not on the allow-list")
        check_model_config(f"models.{name}.config", recorded)
    if config.worker_dtype and config.worker_dtype not in contract.DTYPES:
        raise ConfigError(f"worker_dtype: {config.worker_dtype!r} is not one of "
                          f"{', '.join(contract.DTYPES)} (or empty: the device's default)")
    zero_allowed = ("workers", "threads", "worker_memory_bytes")
    for name in (*zero_allowed, "checkpoint_every", "max_attempts", "default_steps",
                 "default_batch_size", "default_examples", "default_page_size"):
        value = getattr(config, name)
        if value < 0 or (value == 0 and name not in zero_allowed):
            raise ConfigError(f"{name}: must be positive, got {value}")
    for name in ("lease_s", "heartbeat_s", "poll_s", "drain_grace_s", "liveness_timeout_s"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name}: must be positive, got {getattr(config, name)}")
    for name in ("cleanup_interval_s", "job_retention_days", "blob_grace_s"):
        value = getattr(config, name)
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"{name}: must be a finite number >= 0, got {value}")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format: {config.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    if config.heartbeat_s >= config.lease_s:
        raise ConfigError("heartbeat_s must be shorter than lease_s")
    if config.liveness_timeout_s <= config.poll_s:
        raise ConfigError("liveness_timeout_s must be longer than poll_s (an idle worker beats "
                          "once a poll)")
    unknown = [name for name in config.warm_models if name not in config.models]
    if unknown:
        raise ConfigError(f"warm_models: {', '.join(map(repr, unknown))} not on the allow-list")
    for name, value in dataclasses.asdict(config.limits).items():
        if value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")
    for name, engine_limit in contract.LIMITS.items():
        value = getattr(config.limits, name, None)
        if value is not None and value > engine_limit:
            # Workers could not run such a job: it would pass SubmitJob and fail there.
            raise ConfigError(f"{name}: at most the engine's limit of {engine_limit}, got {value}")
    if not 0 < config.default_edge_sparsity <= contract.MAX_EDGE_SPARSITY:
        raise ConfigError(f"default_edge_sparsity must be in (0, {contract.MAX_EDGE_SPARSITY}]")
