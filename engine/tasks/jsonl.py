"""Custom datasets from JSON Lines: one example a line.

Each line is an object with the fields of :class:`~edgeprune.engine.tasks.base.Example`::

    {"clean": "When Mary and John ...", "corrupted": "When Anna and Paul ...",
     "target": " Mary", "distractor": " John"}
    {"clean": [464, 1110, 33], "corrupted": [464, 1110, 34], "good": [" 5", " 6"], "bad": [" 1"]}

``clean`` and ``corrupted`` are required (text or token ids); ``target`` / ``distractor`` (one
token, text or id) and ``good`` / ``bad`` (lists of tokens) are optional; ``"multi_token": true``
makes the target and distractor answers of several tokens (text or lists of ids, teacher-forced). Reading streams the
input and stops at :data:`MAX_JSONL_BYTES` or
:data:`~edgeprune.engine.tasks.base.MAX_EXAMPLES`; every error names the line.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.examples import at_line, index_of, parse_example
from edgeprune.engine.tasks.base import MAX_EXAMPLES, Example, Metric, TaskDataset, from_examples

MAX_JSONL_BYTES = 64 * 2**20


def parse_jsonl(
    lines: Iterable[str | bytes], *, max_bytes: int = MAX_JSONL_BYTES
) -> tuple[list[Example], list[int]]:
    """Examples from JSON lines (blank lines skipped) and the line number of each."""
    examples: list[Example] = []
    numbers: list[int] = []
    size = 0
    for number, raw in enumerate(lines, start=1):
        size += len(raw)
        if size > max_bytes:
            raise InvalidArgument(
                f"the dataset is larger than the limit of {max_bytes} bytes", field="dataset"
            )
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        if len(examples) == MAX_EXAMPLES:
            raise InvalidArgument(
                f"the dataset has more than the limit of {MAX_EXAMPLES} examples", field="dataset"
            )
        examples.append(parse_example(text, number))
        numbers.append(number)
    if not examples:
        raise InvalidArgument("the dataset has no examples", field="dataset")
    return examples, numbers


def examples_to_dataset(
    examples: list[Example], numbers: list[int], tokenizer: Any, **options: Any
) -> TaskDataset:
    """:func:`from_examples`, with errors that name the line instead of the example index."""
    try:
        return from_examples(examples, tokenizer, **options)
    except InvalidArgument as err:
        index = index_of(err)
        if index is None:
            raise
        raise at_line(err, numbers[index]) from None


def load_jsonl(
    source: str | Path | bytes | Iterable[str | bytes],
    tokenizer: Any,
    *,
    name: str = "custom",
    split: str = "train",
    metric: Metric | None = None,
    all_positions: bool = False,
    max_bytes: int = MAX_JSONL_BYTES,
) -> TaskDataset:
    """A validated dataset from a JSONL file path, its bytes, or an iterable of lines."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise InvalidArgument(f"no such dataset file: {path}", field="path")
        with path.open("rb") as stream:
            examples, numbers = parse_jsonl(stream, max_bytes=max_bytes)
    elif isinstance(source, bytes):
        examples, numbers = parse_jsonl(source.splitlines(keepends=True), max_bytes=max_bytes)
    else:
        examples, numbers = parse_jsonl(source, max_bytes=max_bytes)
    return examples_to_dataset(
        examples,
        numbers,
        tokenizer,
        name=name,
        split=split,
        metric=metric,
        all_positions=all_positions,
    )
