"""Set up prometheus-client's multiprocess mode (kept apart from metrics.py, which imports
prometheus_client: this must run before that import)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(*, fresh: bool) -> str:
    """Point this process (and the workers it spawns) at the metrics folder and return it.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` when set (an operator's or a parent process's choice), else
    a new temporary folder. ``fresh`` (the top process of a tree) deletes samples that dead
    processes of an earlier run left there.
    """
    folder = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="edgeprune-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    if fresh:
        for stale in folder.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return str(folder)
