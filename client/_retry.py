"""Retry policy for unary calls (AIP-194): retry only UNAVAILABLE, with capped
exponential backoff and full jitter, inside the call's overall deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

__all__ = ["Deadline", "RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How a unary call is retried.

    Only codes in ``retry_codes`` are retried (by default UNAVAILABLE: the request never
    reached a server that acted on it). SubmitJob is safe to retry because the client
    sets its request_id once per ``submit`` call. Attempt ``n`` (0-based) waits a
    uniformly random time in ``[0, min(max_backoff, initial_backoff * multiplier**n)]``.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (full jitter)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return (rng or random).uniform(0.0, cap)

    def delay(self, code: grpc.StatusCode, attempt: int, deadline: Deadline) -> float | None:
        """The wait before retrying a call that failed with ``code`` on ``attempt``, or None
        when it must not be retried (wrong code, attempts used up, or past the deadline)."""
        if code not in self.retry_codes or attempt + 1 >= self.max_attempts:
            return None
        wait = self.backoff(attempt)
        remaining = deadline.remaining()
        if remaining is not None and wait >= remaining:
            return None
        return wait


class Deadline:
    """An absolute deadline for a whole call, retries included (None = no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())
