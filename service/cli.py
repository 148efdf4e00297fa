"""Entry points of `edgeprune serve` and `edgeprune worker` (the client's CLI calls these lazily).

    serve_main(argv)    API server + `--workers` worker processes (default 1) on one database
    worker_main(argv)   one worker against the same database (Kubernetes worker Deployment)
    migrate_main(argv)  migrate the configured database to the newest schema and exit
                        (idempotent; the Kubernetes migration Job)
    provision_main(argv)  check the allow-listed models on the model volume, convert the
                        default model's GGUF file there once, exit 1 if any is missing
                        (idempotent; the GPU workers' init container)

Both read flags > EDGEPRUNE_* environment > --config file (see `config.py`) and exit with 2 on a
bad setting or a missing server extra, 1 when the database cannot be reached, with a one-line
message, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import shutil
import sys

from edgeprune.service.config import (
    Config,
    ConfigError,
    add_arguments,
    check_transport,
    load_config,
)
from edgeprune.service.multiproc import MULTIPROC_ENV, prepare_metrics_dir


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return parser


def _setup_logging(level: str, log_format: str) -> None:
    from edgeprune.service import logs

    logs.setup(level, log_format)


def _config(prog: str, args: argparse.Namespace, *, api: bool = False) -> Config | None:
    if getattr(args, "auth_tokens", None):
        print(f"{prog}: warning: --auth-token puts the token on the command line, where other "
              "local users can read it (ps); use --auth-token-file or EDGEPRUNE_AUTH_TOKENS",
              file=sys.stderr)
    try:
        config = load_config(args)
        if api:
            check_transport(config)
        return config
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None


# What running the service imports beyond the thin client (the `server` extra).
SERVER_MODULES = ("torch", "transformers", "sqlalchemy", "alembic", "prometheus_client",
                  "grpc_health", "grpc_reflection", "grpc_status")


def missing_server_extra() -> str | None:
    """The first module of the server extra that cannot be imported, or None."""
    for name in SERVER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return name
    return None


def _check_server_extra(prog: str) -> bool:
    """On the thin (client-only) install say which extra to install, instead of a traceback."""
    missing = missing_server_extra()
    if missing is None:
        return True
    print(f"{prog}: needs the server extra (no module {missing!r}): "
          "pip install 'edgeprune[server]'", file=sys.stderr)
    return False


def _start(prog: str, args: argparse.Namespace, *, api: bool = False) -> Config | None:
    """The server extra checked, the config loaded and logging set up; None, with the reason
    on stderr, when the command cannot start."""
    if not _check_server_extra(prog):
        return None
    config = _config(prog, args, api=api)
    if config is not None:
        _setup_logging(config.log_level, config.log_format)
    return config


def serve_main(argv: list[str] | None = None) -> int:
    """`edgeprune serve`: the API, its metrics endpoint and worker processes."""
    prog = "edgeprune serve"
    args = _parser(prog, "Run the edgeprune gRPC API and its workers.").parse_args(argv)
    config = _start(prog, args, api=True)
    if config is None:
        return 2
    own_metrics_dir = not os.environ.get(MULTIPROC_ENV)  # else the operator's: leave it
    metrics_dir = prepare_metrics_dir(fresh=True)
    from edgeprune.service.server import serve
    from edgeprune.storage import StorageError

    try:
        asyncio.run(serve(config))
    except StorageError as err:
        print(f"{prog}: database: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    finally:
        if own_metrics_dir:  # every worker has exited: nothing writes samples any more
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """`edgeprune worker`: one worker process (with its own metrics endpoint)."""
    prog = "edgeprune worker"
    parser = _parser(prog, "Run an edgeprune worker against the job database.")
    # `serve` writes its resolved config to a child's stdin (never to a file: it holds secrets).
    parser.add_argument("--config-stdin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not _check_server_extra(prog):
        return 2
    child = args.config_stdin
    if child:
        config = Config.from_json(sys.stdin.read())
    else:
        config = _config(prog, args)
        if config is None:
            return 2
    _setup_logging(config.log_level, config.log_format)
    prepare_metrics_dir(fresh=not child)
    from edgeprune.service import metrics, probes

    if not child and config.metrics_port >= 0:  # `serve` answers for the workers it starts
        # up before torch is imported: probes answer (not ready) while the worker starts
        _, port = metrics.serve(config.metrics_port, config.metrics_host,
                                probes=probes.routes(1, config.liveness_timeout_s))
        print(f'{{"metrics_port": {port}}}', flush=True)
    from edgeprune.service.worker import run_worker
    from edgeprune.storage import StorageError

    try:
        code = run_worker(config)
    except StorageError as err:
        print(f"{prog}: database: {err}", file=sys.stderr)
        code = 1
    # Everything is stored; skip the seconds of interpreter teardown torch costs on exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def migrate_main(argv: list[str] | None = None) -> int:
    """`python -m edgeprune.service migrate`: upgrade the database schema, print its revision."""
    prog = "edgeprune migrate"
    args = _parser(prog, "Apply the database migrations of edgeprune and exit.").parse_args(argv)
    config = _start(prog, args)
    if config is None:
        return 2
    from sqlalchemy.exc import SQLAlchemyError

    from edgeprune.storage import Database, StorageError

    try:
        db = Database(config.effective_database_url)
        try:
            db.migrate()
            revision = db.current_revision()
        finally:
            db.dispose()
    except (StorageError, SQLAlchemyError) as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        print(f"{prog}: database: {reason}", file=sys.stderr)
        return 1
    print(json.dumps({"revision": revision}), flush=True)
    return 0


def provision_main(argv: list[str] | None = None) -> int:
    """`python -m edgeprune.service provision-models`: one line per allow-listed model; exit 1
    when any is missing, disagrees with its recorded config or could not be converted."""
    prog = "edgeprune provision-models"
    args = _parser(prog, "Check the allow-listed models on the model volume (the cache folder, "
                         "$EDGEPRUNE_CACHE_DIR) and convert the default model there once; "
                         "nothing is downloaded.").parse_args(argv)
    config = _start(prog, args)
    if config is None:
        return 2
    from edgeprune.service.provision import provision

    try:
        states = provision(config)
    except OSError as err:  # the cache folder itself cannot be created or locked
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    for state in states:
        print(state, flush=True)
    return 0 if all(state.ok for state in states) else 1
