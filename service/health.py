"""The API's gRPC health (grpc.health.v1): SERVING only while it runs and its database answers.

A load balancer or probe that sees SERVING sends calls; while the database is down every call
would fail, so health follows the database. `Health.watch_database` probes it in the
background (a fresh connection and one query every ``interval_s``, at most ``timeout_s``, on a
thread of its own so busy storage threads cannot delay it) and turns the server and every
service NOT_SERVING while the probe fails, SERVING again when it succeeds. Draining wins over
the probe: once `set_serving(False)` is called nothing turns health back on.

One more name, `liveness`, follows the process only (SERVING until it drains): a liveness probe
that restarted the API during a database outage would only add a restart to the outage.

`List` (the protocol's snapshot of every service's status) is implemented here: the asyncio
servicer of grpcio-health-checking leaves it UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from edgeprune.storage import Database

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 2.0
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(HealthServicer):
    """Health of the server ("") and of each of ``services``, from two inputs: whether the
    server wants to serve (started, not draining) and whether its database answers."""

    def __init__(self, services: Sequence[str]) -> None:
        super().__init__()
        self.services = ("", *services)
        self.wanted = False
        self.database_ok = True

    async def List(self, request: health_pb2.HealthListRequest,
                   context: Any) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        })

    async def set_serving(self, serving: bool) -> None:
        """Started (True) or draining (False)."""
        self.wanted = serving
        await self._publish()

    async def watch_database(self, db: Database, *, interval_s: float = PROBE_INTERVAL_S,
                             timeout_s: float = PROBE_TIMEOUT_S) -> None:
        """Probe ``db`` until cancelled. A probe that hangs past ``timeout_s`` counts as a
        failure; the next round waits for that same probe instead of piling up threads."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-probe")
        probe: asyncio.Future[None] | None = None
        try:
            while True:
                if probe is None:
                    probe = loop.run_in_executor(executor, db.ping, timeout_s)
                done, _ = await asyncio.wait({probe}, timeout=timeout_s + 1.0)
                if probe in done:
                    error = probe.exception()
                    probe = None
                    await self._database(error is None, _reason(error))
                else:
                    await self._database(False, f"no answer within {timeout_s:.0f} s")
                await asyncio.sleep(interval_s)
        finally:  # never block the event loop on a probe that hangs
            executor.shutdown(wait=False, cancel_futures=True)

    async def _database(self, ok: bool, reason: str) -> None:
        if ok != self.database_ok:
            if ok:
                log.warning("the database answers again: health SERVING")
            else:
                log.warning("the database does not answer (%s): health NOT_SERVING", reason)
        self.database_ok = ok
        await self._publish()

    async def _publish(self) -> None:
        ready = SERVING if self.wanted and self.database_ok else NOT_SERVING
        statuses = {name: ready for name in self.services}
        statuses[LIVENESS] = SERVING if self.wanted else NOT_SERVING
        for name, status in statuses.items():
            if self._server_status.get(name) != status:
                await self.set(name, status)


def _reason(error: BaseException | None) -> str:
    if error is None:
        return ""
    detail = getattr(error, "detail", "")
    return f"{error}: {detail}" if detail else str(error)
