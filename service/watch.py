"""WatchJob fan-out: one database poller per watched job, however many watchers it has.

Workers run in other processes and write events to the database, so the API process learns
of them by polling. A `_Feed` polls one job's events (in a thread: storage is synchronous),
keeps them in order and wakes its watchers; each watcher keeps its own cursor, so a watcher that
joins late or reconnects with ``after_sequence`` gets the stored events first, then the live
ones, each exactly once. The feed stops after the job's final state event or when its last
watcher leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from edgeprune.service.converters import is_final_event
from edgeprune.service.errors import Unavailable
from edgeprune.storage import EventRecord, EventRepo, JobRecord, JobRepo

log = logging.getLogger(__name__)
BATCH = 500


class _Feed:
    def __init__(self, hub: EventHub, job_id: str) -> None:
        self.hub = hub
        self.job_id = job_id
        self.events: list[EventRecord] = []  # seq 1..n in order
        self.final_job: JobRecord | None = None  # set with the final event
        self.error: BaseException | None = None
        self.changed = asyncio.Condition()
        self.watchers = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    @property
    def done(self) -> bool:
        return self.final_job is not None or self.error is not None

    async def run(self) -> None:
        try:
            while not self.done:
                new = await asyncio.to_thread(self.hub.events.after, self.job_id, self.last_seq,
                                              limit=BATCH)
                if new and any(is_final_event(e) for e in new):
                    self.final_job = await asyncio.to_thread(self.hub.jobs.get, self.job_id)
                async with self.changed:
                    self.events.extend(new)
                    self.changed.notify_all()
                if len(new) < BATCH and not self.done:
                    await asyncio.sleep(self.hub.poll_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every watcher
            log.warning("event feed of job %s failed: %r", self.job_id, exc)
            async with self.changed:
                self.error = exc
                self.changed.notify_all()

    async def follow(self, after_seq: int) -> AsyncIterator[tuple[EventRecord, JobRecord | None]]:
        """Events with seq > after_seq, ending after the final one."""
        cursor = after_seq
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda c=cursor: self.last_seq > c or self.done)
                batch = self.events[cursor:]  # sequence numbers are dense from 1
                if not batch and self.error is not None:
                    raise self.error
                if not batch and self.final_job is not None:
                    return  # the final event was at or before after_seq
            for event in batch:
                final = is_final_event(event)
                yield event, (self.final_job if final else None)
                cursor = event.seq
                if final:
                    return


class EventHub:
    """Shared feeds of job events for WatchJob."""

    def __init__(self, events: EventRepo, jobs: JobRepo, *, poll_s: float) -> None:
        self.events = events
        self.jobs = jobs
        self.poll_s = poll_s
        self.feeds: dict[str, _Feed] = {}
        self.closed = False

    async def watch(self, job_id: str, after_seq: int) -> AsyncIterator[tuple[EventRecord, JobRecord | None]]:
        """Replay then follow a job's events after ``after_seq``; yields (event, job) where
        job is the stored job with the final event, else None."""
        if self.closed:
            raise Unavailable("the server is shutting down", reason="DRAINING")
        feed = self.feeds.get(job_id)
        if feed is None or (feed.done and feed.error is not None):
            feed = self.feeds[job_id] = _Feed(self, job_id)
            feed.task = asyncio.create_task(feed.run(), name=f"feed-{job_id}")
        feed.watchers += 1
        try:
            async for item in feed.follow(after_seq):
                yield item
        finally:
            feed.watchers -= 1
            if feed.watchers == 0 and self.feeds.get(job_id) is feed:
                del self.feeds[job_id]
                if feed.task is not None and not feed.task.done():
                    feed.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await feed.task

    async def close(self) -> None:
        """End every watch with UNAVAILABLE (the server is draining; clients reconnect
        elsewhere with their last sequence number)."""
        self.closed = True
        for feed in list(self.feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
            async with feed.changed:
                feed.error = Unavailable("the server is shutting down; watch again from the "
                                         "last sequence number", reason="DRAINING")
                feed.changed.notify_all()
        self.feeds.clear()
