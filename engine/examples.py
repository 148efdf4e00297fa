"""The example format and its checks that need no tokenizer (and import no torch).

An :class:`Example` is one clean prompt, its corrupted twin, and what the model should answer. A
JSON Lines dataset holds one example object a line (:func:`parse_example`). Everything that can be
judged without the model's tokenizer is checked here: JSON, field names and types, empty values,
token-id lists (length, integer ids, equal clean and corrupted lengths), answer-set sizes. The
tokenizer's part (text answers that must be one token, token counts of text, the vocabulary) is
:func:`edgeprune.engine.tasks.base.from_examples`'s, which runs these checks first, so a bad example
gets the same message wherever it is caught. A service can import this module to check uploads
without loading torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edgeprune.engine.errors import InvalidArgument

MAX_EXAMPLES = 50_000  # examples in one dataset
MAX_TOKENS_PER_EXAMPLE = 1_024  # tokens in one clean (or corrupted) prompt
MAX_ANSWER_SET = 128  # tokens in one example's good (or bad) set
MAX_ANSWER_TOKENS = 64  # tokens in one multi-token target (or distractor)
FIELDS = ("clean", "corrupted", "target", "distractor", "good", "bad", "multi_token")
MIXED_ANSWER_SETS = "either every example or none has both good and bad answer sets"

Tokens = str | list[int]
Token = str | int
# One token; or, with all_positions, one token id (or None) a position; or, with multi_token,
# text of any number of tokens or a list of token ids.
Answer = Token | list[int | None]

_INDEX = re.compile(r"^examples\[(\d+)\]")


@dataclass
class Example:
    """One prompt pair; ``good`` / ``bad`` are answer token sets for the probability difference.

    ``multi_token``: the target (and distractor) may be several tokens, text tokenised after the
    prompt or a list of token ids. The model is teacher-forced: both prompts are extended with
    the target's tokens but the last, and every target token's position is an answer position
    (the distractor's k-th token is compared with the target's k-th; it may be shorter).
    """

    clean: Tokens
    corrupted: Tokens
    target: Answer | None = None
    distractor: Answer | None = None
    good: list[Token] | None = None
    bad: list[Token] | None = None
    multi_token: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The example as JSON-ready fields (unset answers and a false multi_token left out)."""
        return {k: v for k, v in vars(self).items() if v is not None and v is not False}


# ---- one example's fields ----------------------------------------------------------------------


def check_token_id(tok: Any, where: str) -> int:
    """An integer token id (its range is the vocabulary's, checked with the tokenizer)."""
    if isinstance(tok, bool) or not isinstance(tok, int):
        raise InvalidArgument(f"{where}: token ids must be integers, got {tok!r}", field=where)
    return tok


def check_prompt(value: Any, where: str) -> None:
    """``clean`` / ``corrupted``: non-empty text, or a non-empty list of at most
    :data:`MAX_TOKENS_PER_EXAMPLE` integer ids."""
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(f"{where} is empty", field=where)
        return
    if not isinstance(value, list | tuple):
        raise InvalidArgument(
            f"{where} must be text or a list of token ids, got {type(value).__name__}", field=where
        )
    check_token_count(len(value), where)
    for tok in value:
        check_token_id(tok, where)


def check_token_count(n: int, where: str) -> None:
    if n == 0:
        raise InvalidArgument(f"{where} has no tokens", field=where)
    if n > MAX_TOKENS_PER_EXAMPLE:
        raise InvalidArgument(
            f"{where} has {n} tokens, more than the limit of {MAX_TOKENS_PER_EXAMPLE}", field=where
        )


def check_answer(value: Any, where: str, *, per_position: bool) -> None:
    """A target or distractor: one token (non-empty text or an id), or, where ``per_position``
    may apply (answers at every position), a list of ids or None."""
    if value is None:
        return
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(f"{where} is empty", field=where)
    elif per_position and isinstance(value, list | tuple):
        for tok in value:
            if tok is not None:
                check_token_id(tok, where)
    else:
        check_token_id(value, where)


def check_answer_set(values: Any, where: str) -> None:
    """``good`` / ``bad``: a non-empty list of at most :data:`MAX_ANSWER_SET` tokens."""
    if values is None:
        return
    if not isinstance(values, list | tuple) or not values:
        raise InvalidArgument(f"{where} must be a non-empty list of tokens", field=where)
    if len(values) > MAX_ANSWER_SET:
        raise InvalidArgument(
            f"{where} has {len(values)} tokens, more than the limit of {MAX_ANSWER_SET}",
            field=where,
        )
    for value in values:
        check_answer(value, where, per_position=False)


def check_example(ex: Example, where: str, *, all_positions: bool | None = None) -> None:
    """Every check of one example that needs no tokenizer. ``all_positions`` None: either
    answer layout is allowed (an upload does not know yet how a job will use it)."""
    check_prompt(ex.clean, f"{where}.clean")
    check_prompt(ex.corrupted, f"{where}.corrupted")
    if isinstance(ex.clean, list | tuple) and isinstance(ex.corrupted, list | tuple):
        check_equal_lengths(len(ex.clean), len(ex.corrupted), where)
    if not isinstance(ex.multi_token, bool):
        raise InvalidArgument(
            f"{where}.multi_token must be true or false, got {ex.multi_token!r}",
            field=f"{where}.multi_token",
        )
    if ex.multi_token:
        check_multi_token(ex, where, all_positions=all_positions)
    else:
        for name in ("target", "distractor"):
            check_answer(
                getattr(ex, name), f"{where}.{name}", per_position=all_positions is not False
            )
    check_answer_set(ex.good, f"{where}.good")
    check_answer_set(ex.bad, f"{where}.bad")


def check_multi_token(ex: Example, where: str, *, all_positions: bool | None) -> None:
    """A multi-token example: a target (text or token ids), an optional distractor of the same
    kind, no answer sets, and not scored at every position."""
    if all_positions:
        raise InvalidArgument(
            f"{where}.multi_token: a multi-token answer cannot be scored at every position",
            field=f"{where}.multi_token",
        )
    if ex.target is None:
        raise InvalidArgument(
            f"{where}.target is required with multi_token", field=f"{where}.target"
        )
    for name in ("good", "bad"):
        if getattr(ex, name) is not None:
            raise InvalidArgument(
                f"{where}.{name}: answer sets are single tokens; they do not go with multi_token",
                field=f"{where}.{name}",
            )
    for name in ("target", "distractor"):
        check_answer_tokens(getattr(ex, name), f"{where}.{name}")


def check_answer_tokens(value: Any, where: str) -> None:
    """A multi-token answer: non-empty text, or a list of 1 to :data:`MAX_ANSWER_TOKENS` ids."""
    if value is None:
        return
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(f"{where} is empty", field=where)
        return
    if not isinstance(value, list | tuple) or not value:
        raise InvalidArgument(
            f"{where} must be text or a non-empty list of token ids with multi_token", field=where
        )
    check_answer_length(len(value), where)
    for tok in value:
        check_token_id(tok, where)


def check_answer_length(n: int, where: str) -> None:
    if n > MAX_ANSWER_TOKENS:
        raise InvalidArgument(
            f"{where} has {n} tokens, more than the limit of {MAX_ANSWER_TOKENS}", field=where
        )


def check_equal_lengths(clean: int, corrupted: int, where: str) -> None:
    if clean != corrupted:
        raise InvalidArgument(
            f"{where}: clean and corrupted must have the same number of tokens, got {clean} "
            f"and {corrupted}",
            field=f"{where}.corrupted",
        )


class AnswerSets:
    """Whether answer sets are all-or-none across a dataset, counted one example at a time."""

    def __init__(self) -> None:
        self.with_sets = self.partial = self.total = 0

    def add(self, ex: Example) -> None:
        self.total += 1
        if ex.good and ex.bad:
            self.with_sets += 1
        elif ex.good or ex.bad:
            self.partial += 1

    def check(self) -> None:
        if self.partial or 0 < self.with_sets < self.total:
            raise InvalidArgument(MIXED_ANSWER_SETS, field="examples")


# ---- JSON Lines ----------------------------------------------------------------------------------


def parse_example(text: str, number: int) -> Example:
    """The example on JSONL line ``number``, checked as far as no tokenizer is needed. Errors
    read "line N: ..." with field "line N" or "line N.<field>"."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgument(
            f"line {number}: not valid JSON ({err.msg} at column {err.colno})",
            field=f"line {number}",
        ) from None
    except RecursionError:
        raise InvalidArgument(
            f"line {number}: not valid JSON (nested too deeply)", field=f"line {number}"
        ) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise InvalidArgument(f"line {number}: not valid JSON ({err})", field=f"line {number}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(
            f"line {number}: expected a JSON object, got {type(obj).__name__}",
            field=f"line {number}",
        )
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise InvalidArgument(
            f"line {number}: unknown field(s) {unknown}; allowed: {list(FIELDS)}",
            field=f"line {number}.{unknown[0]}",
        )
    for required in ("clean", "corrupted"):
        if required not in obj:
            raise InvalidArgument(
                f"line {number}: missing field {required!r}", field=f"line {number}.{required}"
            )
    for name, value in obj.items():
        # JSON may escape half of a surrogate pair ("\ud800"): Python decodes it, but it is
        # not Unicode, so no tokenizer or database could take it.
        if _has_lone_surrogate(value):
            raise InvalidArgument(
                f"line {number}: {name} holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF "
                "escape), which is not valid Unicode",
                field=f"line {number}.{name}",
            )
        # PostgreSQL's text and JSONB cannot hold NUL ("\u0000"); no prompt needs one.
        if _has_nul(value):
            raise InvalidArgument(f"line {number}: {name} holds a NUL character (\\u0000)",
                                  field=f"line {number}.{name}")
    ex = Example(**obj)
    try:
        check_example(ex, "examples[0]")
    except InvalidArgument as err:
        raise at_line(err, number) from None
    return ex


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list | tuple):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def at_line(err: InvalidArgument, number: int) -> InvalidArgument:
    """An error about ``examples[i]`` rewritten to name JSONL line ``number`` instead."""
    match = _INDEX.match(err.field or "")
    if match is None:
        return err
    line = f"line {number}"
    message = _INDEX.sub("", str(err), count=1).lstrip(":. ")
    field = (err.field or "")[match.end() :].lstrip(".")
    return InvalidArgument(f"{line}: {message}", field=f"{line}.{field}" if field else line)


def index_of(err: InvalidArgument) -> int | None:
    """The example index an ``examples[i]...`` error names, or None."""
    match = _INDEX.match(err.field or "")
    return None if match is None else int(match[1])
