"""WatchJob fan-out: one database poller for every watched job, however many there are.

Workers run in other processes and write events to the database, so the API process learns
of them by polling. One task polls for all watched jobs: each interval it reads the
``last_event_sequence`` of every watched job that has not ended (one query per 500 jobs), then
fetches the new events of the jobs with news only (one transaction for all of them). The
events of the latest fetch are each job's shared *tail*: watchers that are caught up take
their events from it. A watcher that is behind (it joined late or reconnected with
``after_sequence``) pages through the stored events itself, a bounded batch at a time, until
it reaches the tail, so no stream ever holds more than one batch and no job's history is
kept in memory. A stream ends after the job's final state event.

A client (its principal, or its host without authentication) may hold `max_watches` streams
at once; beyond that WatchJob answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from edgeprune.service.converters import is_final_event
from edgeprune.service.errors import ResourceExhausted, Unavailable
from edgeprune.storage import EventRecord, EventRepo, JobRecord, JobRepo

log = logging.getLogger(__name__)
BATCH = 200  # events per read: what one stream, or one job's tail, holds at most


@dataclass(eq=False)
class _Job:
    """A watched job: what the poller knows of it, and its watchers' wake-up."""

    job_id: str
    last_seq: int  # the highest sequence number fetched into `tail` (or known when watched)
    ended: bool  # its final state event is at or before last_seq
    tail: list[EventRecord] = field(default_factory=list)  # the latest fetch, dense seqs
    final_job: JobRecord | None = None  # the stored job, read once for its final event
    error: BaseException | None = None
    watchers: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def cached(self, cursor: int) -> list[EventRecord] | None:
        """The tail's events after `cursor`, if the tail holds the next one."""
        if self.tail and self.tail[0].sequence <= cursor + 1 <= self.tail[-1].sequence:
            return self.tail[cursor + 1 - self.tail[0].sequence:]
        return None


class EventHub:
    """Shared polling of job events for WatchJob."""

    def __init__(self, events: EventRepo, jobs: JobRepo, *, poll_s: float,
                 max_watches: int = 100) -> None:
        self.events = events
        self.jobs = jobs
        self.poll_s = poll_s
        self.max_watches = max_watches
        self.watched: dict[str, _Job] = {}
        self.clients: Counter[str] = Counter()
        self.poller: asyncio.Task[None] | None = None
        self.closed = False

    async def watch(self, job: JobRecord, after_seq: int, *,
                    client: str) -> AsyncIterator[tuple[EventRecord, JobRecord | None]]:
        """Stored then live events of ``job`` after ``after_seq``; yields (event, stored job)
        with the final state event, (event, None) before it."""
        if self.closed:
            raise Unavailable("the server is shutting down", reason="DRAINING")
        if self.clients[client] >= self.max_watches:
            raise ResourceExhausted(
                f"this client already watches {self.max_watches} streams "
                "(max_watches_per_client); end one first", reason="TOO_MANY_WATCHES")
        self.clients[client] += 1
        entry = self.watched.get(job.id)
        if entry is None or entry.error is not None:
            entry = self.watched[job.id] = _Job(job.id, job.last_event_sequence, job.state.final)
        entry.watchers += 1
        if self.poller is None or self.poller.done():
            self.poller = asyncio.create_task(self._poll(), name="watch-poller")
        try:
            async for item in self._follow(entry, after_seq):
                yield item
        finally:
            self.clients[client] -= 1
            if not self.clients[client]:
                del self.clients[client]
            entry.watchers -= 1
            if entry.watchers == 0 and self.watched.get(job.id) is entry:
                del self.watched[job.id]

    async def _follow(self, job: _Job, cursor: int) -> AsyncIterator[tuple[EventRecord, JobRecord | None]]:
        while True:
            async with job.changed:
                await job.changed.wait_for(
                    lambda c=cursor: job.last_seq > c or job.ended or job.error is not None)
                if job.error is not None:
                    raise job.error
                if job.last_seq <= cursor:  # ended at or before the cursor
                    return
                batch = job.cached(cursor)
            if batch is None:  # behind the tail: page through the stored events
                batch = await asyncio.to_thread(self.events.after, job.job_id, cursor,
                                                limit=BATCH)
            for event in batch:
                if is_final_event(event):
                    yield event, await self._final_job(job)
                    return
                yield event, None
                cursor = event.sequence

    async def _final_job(self, job: _Job) -> JobRecord:
        if job.final_job is None:
            job.final_job = await asyncio.to_thread(self.jobs.get, job.job_id, full=False)
        return job.final_job

    async def _poll(self) -> None:
        """Until no job is watched: one round of `_poll_once` per interval (at once again
        while some job has more news than a batch)."""
        while self.watched and not self.closed:
            try:
                more = await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - ends the streams; the next watch retries
                log.warning("watch poller failed: %r", exc)
                await self._fail(exc)
                return
            if not more:
                await asyncio.sleep(self.poll_s)

    async def _poll_once(self) -> bool:
        live = {job_id: job for job_id, job in self.watched.items()
                if not job.ended and job.error is None}
        if not live:
            return False
        seqs = await asyncio.to_thread(self.events.last_sequences, list(live))
        news = {job_id: job.last_seq for job_id, job in live.items()
                if seqs.get(job_id, 0) > job.last_seq}
        fetched = await asyncio.to_thread(self.events.after_many, news, limit=BATCH) if news else {}
        for job_id, events in fetched.items():
            job = live[job_id]
            async with job.changed:
                if events:
                    job.tail = events
                    job.last_seq = events[-1].sequence
                    job.ended = any(is_final_event(e) for e in events)
                job.changed.notify_all()
        return any(len(events) == BATCH for events in fetched.values())

    async def _fail(self, exc: BaseException) -> None:
        for job in list(self.watched.values()):
            async with job.changed:
                job.error = exc
                job.changed.notify_all()

    async def close(self) -> None:
        """End every watch with UNAVAILABLE (the server is draining; clients reconnect
        elsewhere with their last sequence number)."""
        self.closed = True
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        await self._fail(Unavailable("the server is shutting down; watch again from the last "
                                     "sequence number", reason="DRAINING"))
        self.watched.clear()
