"""Does an uploaded dataset suit the job's model? Checked at SubmitJob and EvaluateCircuit.

An upload is checked without a model (JSON, fields, types: see uploads.py). What needs the
model's tokenizer (a text answer that must be one token after its prompt, clean and corrupted of
equal token length, token counts, ids inside the vocabulary) is checked here, with the engine's
own validator (`edgeprune.engine.tasks.base.checked_lengths`), so every bad example is listed with
the message a worker would give for the first. The API loads only the tokenizer of an allow-listed
reference (`edgeprune.engine.loading.load_tokenizer`: no weights; it imports torch and
transformers once, on the first such job). A model whose tokenizer the API cannot read (a
``smollm2-135m`` not yet cached by a worker, files only the workers see) is left to the workers.
The same pass measures the longest tokenised example, which the memory check reads. Datasets
never change, so each (dataset, model, answer layout) is checked once.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from typing import Any

from edgeprune.engine import errors as engine_errors
from edgeprune.engine.examples import Example
from edgeprune.service.errors import InvalidArgument
from edgeprune.service.uploads import brief
from edgeprune.storage import DatasetRepo

log = logging.getLogger(__name__)

MAX_REPORTED = 20  # bad examples listed in one error
BATCH = 1000  # examples tokenised at once
MAX_CACHED = 256  # (dataset, model, layout) results kept
RETRY_S = 60.0  # how long a model whose tokenizer the API cannot read is left to the workers


@functools.lru_cache(maxsize=16)
def _loaded_tokenizer(ref: str) -> Any:
    """Raises when the API cannot read it (not cached: a worker may cache the model later)."""
    from edgeprune.engine.loading import load_tokenizer  # torch: only once a dataset job comes

    tokenizer = load_tokenizer(ref)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer of {ref} here yet")
    return tokenizer


_unreadable: dict[str, float] = {}  # ref -> when it was last found unreadable (time.monotonic)


def _shared_tokenizer(ref: str) -> Any | None:
    if time.monotonic() - _unreadable.get(ref, -RETRY_S) < RETRY_S:
        return None
    try:
        return _loaded_tokenizer(ref)
    except (engine_errors.EngineError, OSError) as err:  # the worker reports the real problem
        log.warning("datasets for %s are checked by the workers only for now: %s", ref, err)
        _unreadable[ref] = time.monotonic()
        return None


_per_thread = threading.local()


def model_tokenizer(ref: str) -> Any | None:
    """The tokenizer of an allow-listed model reference for this thread, or None when the API
    cannot read it. Request threads each get their own copy: a fast tokenizer used by two
    threads at once can fail ("Already borrowed")."""
    mine: dict[str, Any] = getattr(_per_thread, "tokenizers", None) or {}
    _per_thread.tokenizers = mine
    if ref not in mine:
        shared = _shared_tokenizer(ref)
        if shared is None:
            return None
        mine[ref] = copy.deepcopy(shared)
    return mine[ref]


class DatasetChecks:
    """Checks stored datasets against models' tokenizers, remembering the answers."""

    def __init__(self, datasets: DatasetRepo) -> None:
        self.datasets = datasets
        # (dataset, model, all positions) -> (the first bad examples' messages, how many are bad,
        # the longest good example's tokens)
        self._found: dict[tuple[str, str, bool], tuple[list[str], int, int]] = {}
        self._lock = threading.Lock()

    def check(self, dataset_id: str, ref: str, field: str, *, all_positions: bool) -> int | None:
        """INVALID_ARGUMENT on ``field`` listing the bad examples (the first MAX_REPORTED and
        a count of the rest) when the model's tokenizer rejects some; else the longest example's
        token count, or None when the API cannot read the model's tokenizer."""
        key = (dataset_id, ref, all_positions)
        with self._lock:
            found = self._found.get(key)
        if found is None:
            tokenizer = model_tokenizer(ref)
            if tokenizer is None:
                return None
            found = self._bad_examples(dataset_id, tokenizer, all_positions=all_positions)
            with self._lock:
                if len(self._found) >= MAX_CACHED:
                    self._found.pop(next(iter(self._found)))
                self._found[key] = found
        listed, bad, longest = found
        if bad:
            raise _error(field, listed, bad)
        return longest

    def _bad_examples(self, dataset_id: str, tokenizer: Any, *,
                      all_positions: bool) -> tuple[list[str], int, int]:
        from edgeprune.engine.tasks.base import checked_lengths, vocab_size_of

        vocab = vocab_size_of(tokenizer)
        listed: list[str] = []
        total = start = longest = 0
        for rows in self.datasets.iter_examples(dataset_id, batch_size=BATCH):
            batch = [Example(**row) for row in rows]
            for result in checked_lengths(batch, tokenizer, start=start,
                                          all_positions=all_positions, vocab_size=vocab):
                if isinstance(result, int):
                    longest = max(longest, result)
                    continue
                total += 1
                if len(listed) < MAX_REPORTED:
                    listed.append(brief(str(result)))
            start += len(batch)
        return listed, total, longest


def _error(field: str, listed: list[str], total: int) -> InvalidArgument:
    error = InvalidArgument(f"the model's tokenizer rejects {listed[0]}", field=field,
                            reason="DATASET_DOES_NOT_FIT_MODEL")
    error.violations = [(field, message) for message in listed]
    if total > 1:
        error.message += f" (and {total - 1} more bad examples)"
    if total > len(listed):
        error.violations.append((field, f"{total - len(listed)} more bad examples not listed"))
    return error
