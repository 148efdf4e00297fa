"""A dataset upload parsed as its chunks arrive, in bounded memory.

Lines are cut from the chunks with a buffer of at most `MAX_LINE_BYTES` and parsed one at a time
by the engine's own JSONL parser (`edgeprune.engine.examples.parse_example`), so an upload holds
exactly what a worker can read. The checked examples go to an anonymous temporary file, not to
memory and not yet to the database: a bad upload then leaves nothing behind, and the database
transaction that stores a good one lasts as long as the insert, not as long as the client takes
to send (on SQLite a transaction holds the only write lock, which workers need to heartbeat).

Every bad line is reported (the first `MAX_REPORTED` as BadRequest violations ``chunk line N``,
with a count of the rest); size and count limits stop the upload at once with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edgeprune.engine.errors import InvalidArgument as EngineInvalidArgument
from edgeprune.engine.examples import AnswerSets, parse_example
from edgeprune.service.errors import InvalidArgument, ResourceExhausted

MAX_LINE_BYTES = 1024 * 1024  # one example; far above what MAX_TOKENS_PER_EXAMPLE allows
MAX_REPORTED = 20  # bad lines listed in one error
# Characters kept of one violation's description: errors quote the values at fault, and the
# details of a status travel in a trailer that clients cap (8 KiB by default).
MAX_DESCRIPTION = 160


class UploadSlots:
    """At most ``limit`` uploads at once in this process: each holds a chunk, a line buffer and
    a database insert, so the API's memory is bounded by the number of uploads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            if self._used >= self.limit:
                raise ResourceExhausted(
                    f"the server is receiving {self.limit} uploads already; retry later",
                    reason="TOO_MANY_UPLOADS")
            self._used += 1
        try:
            yield
        finally:
            with self._lock:
                self._used -= 1


class StreamedUpload:
    """Feed it the upload's chunks in order, then `finish`; `examples` reads the checked
    examples back. Not thread-safe: one caller feeds it (chunk by chunk, in any thread)."""

    def __init__(self, *, max_bytes: int, max_examples: int) -> None:
        self.max_bytes = max_bytes
        self.max_examples = max_examples
        self.size = 0  # bytes received
        self.count = 0  # examples (non-blank lines)
        self.violations: list[tuple[str, str]] = []
        self.bad_lines = 0
        self._line = 0  # number of the line being received
        self._pending = bytearray()
        self._too_long = False  # the line being received is over MAX_LINE_BYTES: skip its rest
        self._sets = AnswerSets()
        self._spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ResourceExhausted(f"chunk: the dataset is larger than {self.max_bytes} bytes",
                                    reason="LIMIT_EXCEEDED",
                                    violations=[("chunk", f"over {self.max_bytes} bytes")])
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._extend(chunk, start, end)
            self._end_line()
            start = end + 1
        self._extend(chunk, start, len(chunk))

    def finish(self) -> None:
        """Raise if anything was wrong: every bad line (INVALID_ARGUMENT), or no examples."""
        if self._pending or self._too_long:
            self._end_line()  # the last line has no newline
        if not self.violations:
            try:
                self._sets.check()
            except EngineInvalidArgument as err:
                self._bad("chunk", str(err))
        if not self.violations and self.count == 0:
            self._bad("chunk", "the dataset has no examples")
        if self.violations:
            first_field, first = self.violations[0]
            error = InvalidArgument(first, field=first_field)
            # "chunk line 3: not valid JSON ...", not the line number twice
            error.message = f"chunk {first}" if first.startswith("line ") else error.message
            error.violations = list(self.violations)
            if self.bad_lines > 1:
                error.message += f" (and {self.bad_lines - 1} more bad lines)"
            if self.bad_lines > len(self.violations):
                error.violations.append(
                    ("chunk", f"{self.bad_lines - len(self.violations)} more bad lines not listed"))
            raise error

    def examples(self) -> Iterator[dict[str, Any]]:
        """The checked examples in order, read back one at a time."""
        self._spool.seek(0)
        for line in self._spool:
            yield json.loads(line)

    def close(self) -> None:
        self._spool.close()

    # ------------------------------------------------------------------------------ lines

    def _extend(self, chunk: bytes, start: int, end: int) -> None:
        if self._too_long or start == end:
            return
        if len(self._pending) + end - start > MAX_LINE_BYTES:
            self._too_long = True
            self._pending.clear()
            return
        self._pending += chunk[start:end]

    def _end_line(self) -> None:
        self._line += 1
        where = f"line {self._line}"
        if self._too_long:
            self._too_long = False
            self._bad_line(f"{where}: longer than the limit of {MAX_LINE_BYTES} bytes")
            return
        raw = bytes(self._pending)
        self._pending.clear()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self._bad_line(f"{where}: not UTF-8 (byte {err.start + 1} of the line)")
            return
        if not text.strip():
            return
        self.count += 1
        if self.count > self.max_examples:
            raise ResourceExhausted(f"chunk: more than {self.max_examples} examples",
                                    reason="LIMIT_EXCEEDED",
                                    violations=[("chunk", "too many examples")])
        try:
            example = parse_example(text, self._line)
        except EngineInvalidArgument as err:
            self._bad_line(str(err))
            return
        self._sets.add(example)
        if not self.violations:  # once the upload is bad nothing is kept
            self._spool.write(json.dumps(example.to_dict(), ensure_ascii=False).encode() + b"\n")

    def _bad_line(self, message: str) -> None:
        self.bad_lines += 1
        if len(self.violations) < MAX_REPORTED:
            self._bad(f"chunk line {self._line}", message)

    def _bad(self, field: str, message: str) -> None:
        self.violations.append((field, brief(message)))


def brief(description: str) -> str:
    """A violation's description, cut to MAX_DESCRIPTION characters."""
    if len(description) <= MAX_DESCRIPTION:
        return description
    return description[:MAX_DESCRIPTION - 3] + "..."
