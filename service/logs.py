"""Logging of `edgeprune serve`, `edgeprune worker` and `edgeprune migrate`.

``text`` writes the usual human-readable lines; ``json`` writes one JSON object a line (time,
level, logger, message, pid, and ``job_id`` / ``attempt`` when a record carries them), so a log
collector (Loki, Elasticsearch, Cloud Logging) indexes the fields without parsing the message.

A record carries a job when its call passes ``extra={"job_id": ..., "attempt": ...}``, or when it
is logged inside `job_context` (a context variable: the worker's job thread and everything it
calls, engine included). Nothing parses messages.

Progress bars (transformers, huggingface_hub, tqdm) are turned off in every process: they are
carriage-return animations for a terminal, and in a pod's log they are noise that also breaks the
one-object-a-line contract of ``json``. The variables are inherited by the workers `serve` spawns.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
#: Record attributes copied into a JSON line when present (``extra=`` or `job_context`).
JOB_FIELDS = ("job_id", "attempt")
#: Environment that silences progress bars and transformers' chatter; an operator's own value
#: of any of them wins.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}

_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("edgeprune_job",
                                                                            default=None)


@contextlib.contextmanager
def job_context(job_id: str, attempt: int) -> Iterator[None]:
    """Tag every record logged in this context (this thread or task) with the job and attempt."""
    token = _job.set({"job_id": job_id, "attempt": attempt})
    try:
        yield
    finally:
        _job.reset(token)


class JobFilter(logging.Filter):
    """Sets ``job_id`` / ``attempt`` on a record from `job_context`, unless the call gave them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_job.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, RFC 3339), level, logger, message, pid, and the job
    fields and the formatted exception when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a non-JSON value passed through extra= must not lose the line
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str, log_format: str = "text") -> None:
    """Configure the root logger on stderr (replacing any handler) and quiet the libraries."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if importlib.util.find_spec("transformers") is not None:
        # transformers writes to stderr through a handler of its own (and, once imported, no
        # longer reads the variables): send its records through ours, in our format
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.ERROR)
        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # warnings.warn(...) from torch / transformers goes through logging, so it is formatted too
    logging.captureWarnings(True)
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
