"""Examples, tokenised task datasets, validation and batching.

An :class:`Example` is one clean prompt, its corrupted twin (same token length), and what the
model should answer: a ``target`` and a ``distractor`` token (logit-difference tasks), or sets of
``good`` and ``bad`` tokens (probability-difference tasks such as greater-than). Text is
tokenised by the model's tokenizer; lists of token ids are used as they are.

:func:`from_examples` validates examples and turns them into a :class:`TaskDataset`: right-padded
tensors on the CPU that the masked model consumes directly::

    for batch in dataset.batches(32):
        logits = model.logits(
            batch.clean_ids, attention_mask=batch.attention_mask, positions=batch.positions,
            corrupted_ids=batch.corrupted_ids,
        )  # [B,P,V]

Answer positions are the last prompt token (P = 1), the positions of a teacher-forced
multi-token answer (``Example.multi_token``: P = its token count), or every position
(tracr-style tasks); ``answer_mask`` marks the positions a row really has. Every bad input raises
:class:`~edgeprune.engine.errors.InvalidArgument` naming the example and field at fault.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from edgeprune.engine.errors import InvalidArgument

# The example format and its tokenizer-free checks (engine/examples.py, no torch there).
from edgeprune.engine.examples import (
    MAX_EXAMPLES,
    MIXED_ANSWER_SETS,
    Example,
    Token,
    Tokens,
    check_answer_length,
    check_equal_lengths,
    check_example,
    check_token_count,
    check_token_id,
)

SPLITS = ("train", "validation", "test")
MAX_MISSES = 2_000  # generators give up after this many draws in a row without a new example
METRICS = ("logit_diff", "prob_diff")

Metric = Literal["logit_diff", "prob_diff"]


@dataclass(frozen=True, eq=False)
class TaskDataset:
    """A tokenised dataset (tensors on the CPU, rows right-padded; see the module doc).

    ``positions`` [N,P] are the answer positions; ``answer_mask`` [N,P] marks the real ones
    (padded entries point at position 0). ``target_ids`` / ``distractor_ids`` [N,P] hold -1 where
    there is no answer; ``good_ids`` / ``bad_ids`` [N,K] are -1 padded token sets, or None.
    """

    name: str
    metric: Metric
    split: str
    clean_ids: torch.Tensor  # [N,T]
    corrupted_ids: torch.Tensor  # [N,T]
    attention_mask: torch.Tensor  # [N,T] 1 token / 0 pad, shared by clean and corrupted
    positions: torch.Tensor  # [N,P]
    target_ids: torch.Tensor  # [N,P]
    distractor_ids: torch.Tensor  # [N,P]
    good_ids: torch.Tensor | None = None  # [N,K]
    bad_ids: torch.Tensor | None = None  # [N,K]
    examples: list[Example] = field(default_factory=list)
    content_hash: str = ""
    answer_mask: torch.Tensor | None = None  # [N,P] bool; None -> every position is real

    def __post_init__(self) -> None:
        if self.answer_mask is None:
            object.__setattr__(
                self, "answer_mask", torch.ones_like(self.positions, dtype=torch.bool)
            )
        if not self.content_hash:
            object.__setattr__(self, "content_hash", _content_hash(self))

    def __len__(self) -> int:
        return self.clean_ids.shape[0]

    @property
    def has_targets(self) -> bool:
        """Whether some answer position has a target token."""
        return bool((self.target_ids >= 0).any())

    @property
    def has_distractors(self) -> bool:
        return bool((self.distractor_ids >= 0).any())

    @property
    def has_answer_sets(self) -> bool:
        return self.good_ids is not None and self.bad_ids is not None

    def subset(self, index: Sequence[int] | torch.Tensor | slice) -> TaskDataset:
        """The rows at ``index``, trimmed to their longest row (answer positions keep their width P,
        so per-row tensors of every batch line up)."""
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        idx = torch.as_tensor(
            list(index) if not isinstance(index, torch.Tensor) else index, dtype=torch.long
        )  # [n]
        t = max(int(self.attention_mask[idx].sum(1).max()), 1) if len(idx) else 1
        answer_mask = self.answer_mask[idx] if self.answer_mask is not None else None  # [n,P]
        return replace(
            self,
            clean_ids=self.clean_ids[idx, :t],  # [n,t]
            corrupted_ids=self.corrupted_ids[idx, :t],  # [n,t]
            attention_mask=self.attention_mask[idx, :t],  # [n,t]
            positions=self.positions[idx],  # [n,P]
            answer_mask=answer_mask,
            target_ids=self.target_ids[idx],  # [n,P]
            distractor_ids=self.distractor_ids[idx],  # [n,P]
            good_ids=None if self.good_ids is None else self.good_ids[idx],  # [n,K]
            bad_ids=None if self.bad_ids is None else self.bad_ids[idx],  # [n,K]
            examples=[self.examples[i] for i in idx.tolist()] if self.examples else [],
            content_hash="",
        )

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[TaskDataset]:
        """Consecutive (or, with ``shuffle``, seeded random) batches, trimmed to their rows."""
        if batch_size < 1:
            raise InvalidArgument(
                f"batch_size must be at least 1, got {batch_size}", field="batch_size"
            )
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))  # [N]
        else:
            order = torch.arange(len(self))  # [N]
        for start in range(0, len(self), batch_size):
            yield self.subset(order[start : start + batch_size])

    def to_jsonl(self) -> str:
        """The dataset's examples, one JSON object a line (the format :func:`load_jsonl` reads)."""
        return "".join(json.dumps(ex.to_dict()) + "\n" for ex in self.examples)


def _content_hash(ds: TaskDataset) -> str:
    """sha256 over the name, metric and every tensor, so equal data hashes equal on any machine."""
    h = hashlib.sha256(f"{ds.name}|{ds.metric}".encode())
    for t in (
        ds.clean_ids,
        ds.corrupted_ids,
        ds.attention_mask,
        ds.positions,
        ds.answer_mask,
        ds.target_ids,
        ds.distractor_ids,
        ds.good_ids,
        ds.bad_ids,
    ):
        if t is None:
            h.update(b"none")
            continue
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- tokenisation ----------------------------------------------------------------------------


def encode(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    """Token ids of each text. Hugging Face tokenizers add special tokens (e.g. BOS) when
    ``special``; anything else (e.g. a TracrTokenizer) is called as ``tokenizer.encode(text)``."""
    if not texts:
        return []
    if tokenizer is None:
        raise InvalidArgument(
            "text needs a tokenizer; without one give token ids", field="tokenizer"
        )
    if callable(tokenizer) and hasattr(tokenizer, "pad_token_id"):
        return list(tokenizer(texts, add_special_tokens=special)["input_ids"])
    return [list(tokenizer.encode(text)) for text in texts]


def vocab_size_of(tokenizer: Any) -> int:
    """The number of token ids the tokenizer can produce."""
    try:
        return len(tokenizer)
    except TypeError:
        vocab = getattr(tokenizer, "vocab", None)
        if vocab is None:
            raise InvalidArgument(
                "give a tokenizer or the vocabulary size", field="tokenizer"
            ) from None
        return len(vocab)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


class _Validator:
    """Turns the text and ids of examples into checked token ids; errors name the field."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._encoded: dict[tuple[str, bool], list[int]] = {}  # (text, special tokens) -> ids

    def prime(self, examples: Sequence[Any]) -> None:
        """Tokenise every text the examples need in two batched calls (not one by one)."""
        texts: dict[bool, set[str]] = {True: set(), False: set()}
        for ex in examples:
            if not isinstance(ex, Example):
                continue
            texts[True].update(v for v in (ex.clean, ex.corrupted) if isinstance(v, str) and v)
            answers = [ex.target, ex.distractor]
            answers += [
                a for group in (ex.good, ex.bad) if isinstance(group, list | tuple) for a in group
            ]
            for answer in answers:
                if isinstance(answer, str) and answer:
                    texts[False].add(answer)
                    if isinstance(ex.clean, str):
                        texts[True].add(ex.clean + answer)
        for special, group in texts.items():
            ordered = sorted(group)
            self._encoded.update(
                zip(
                    ((t, special) for t in ordered),
                    encode(self.tokenizer, ordered, special=special),
                    strict=True,
                )
            )

    def encode(self, text: str, *, special: bool) -> list[int]:
        key = (text, special)
        if key not in self._encoded:
            self._encoded[key] = encode(self.tokenizer, [text], special=special)[0]
        return self._encoded[key]

    def ids(self, value: Tokens, where: str) -> list[int]:
        """A prompt (checked by `check_example`) as token ids in the vocabulary; text is
        tokenised with special tokens."""
        ids = self.encode(value, special=True) if isinstance(value, str) else list(value)
        check_token_count(len(ids), where)
        for tok in ids:
            self.check_id(tok, where)
        return ids

    def check_id(self, tok: Any, where: str) -> int:
        check_token_id(tok, where)
        if not 0 <= tok < self.vocab_size:
            raise InvalidArgument(
                f"{where}: token id {tok} is outside the vocabulary [0, {self.vocab_size})",
                field=where,
            )
        return tok

    def answer(self, value: Token, prompt: Tokens, where: str) -> int:
        """One answer token: an id as it is, or text that must tokenise to exactly one token.

        Text following a text prompt is checked in context: ``prompt + value`` must tokenise to the
        prompt's tokens plus one (so a SentencePiece word or a leading space is judged correctly).
        """
        if not isinstance(value, str):
            return self.check_id(value, where)
        alone = self.encode(value, special=False)
        if isinstance(prompt, str):
            before = self.encode(prompt, special=True)
            after = self.encode(prompt + value, special=True)
            if len(after) == len(before) + 1 and after[: len(before)] == before:
                return after[-1]
        elif len(alone) == 1:
            return alone[0]
        raise InvalidArgument(
            f"{where} {value!r} must be exactly one token after the prompt, but it is "
            f"{len(alone)} token(s) {alone} on its own (set multi_token for a longer answer)",
            field=where,
        )

    def answer_tokens(self, value: Any, prompt: Tokens, where: str) -> list[int]:
        """A multi-token answer's ids: a list of ids as it is, or text tokenised after the prompt
        (``prompt + value`` must tokenise to the prompt's tokens and at least one more, the
        answer's, so no token straddles the boundary)."""
        if not isinstance(value, str):
            ids = [self.check_id(tok, where) for tok in value]
        elif isinstance(prompt, str):
            before = self.encode(prompt, special=True)
            after = self.encode(prompt + value, special=True)
            if len(after) <= len(before) or after[: len(before)] != before:
                raise InvalidArgument(
                    f"{where} {value!r} does not tokenise apart from the prompt: the prompt's last "
                    "token changes when the answer follows it (start the answer at a word "
                    "boundary, e.g. with a space)",
                    field=where,
                )
            ids = after[len(before) :]
        else:
            ids = self.encode(value, special=False)
        check_answer_length(len(ids), where)
        return ids


def from_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    name: str = "custom",
    split: str = "train",
    metric: Metric | None = None,
    all_positions: bool = False,
    skip_first: bool = False,
    vocab_size: int | None = None,
) -> TaskDataset:
    """Validate and tokenise examples into a :class:`TaskDataset`.

    ``metric`` defaults to "prob_diff" when the examples carry good/bad sets and no targets, else
    "logit_diff". ``all_positions``: every prompt position is an answer position (``skip_first``
    leaves out position 0, e.g. a BOS); a target or distractor is then a list with one token per
    answer position: a token id or None. Raises InvalidArgument naming ``examples[i].field``.
    """
    if not examples:
        raise InvalidArgument("the dataset has no examples", field="examples")
    if len(examples) > MAX_EXAMPLES:
        raise InvalidArgument(
            f"the dataset has {len(examples)} examples, more than the limit of {MAX_EXAMPLES}",
            field="examples",
        )
    if split not in SPLITS:
        raise InvalidArgument(f"split must be one of {SPLITS}, got {split!r}", field="split")
    check = _Validator(tokenizer, vocab_size or vocab_size_of(tokenizer))
    check.prime(examples)
    rows: list[_Row] = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise InvalidArgument(f"examples[{i}] is not an Example", field=f"examples[{i}]")
        rows.append(_row(ex, f"examples[{i}]", check, all_positions, skip_first))
    has_sets = any(r.good or r.bad for r in rows)
    has_targets = any(t >= 0 for r in rows for t in r.targets)
    if metric is None:
        metric = "prob_diff" if has_sets and not has_targets else "logit_diff"
    if metric not in METRICS:
        raise InvalidArgument(f"metric must be one of {METRICS}, got {metric!r}", field="metric")
    if has_sets and not all(r.good and r.bad for r in rows):
        raise InvalidArgument(MIXED_ANSWER_SETS, field="examples")
    return _stack(
        rows,
        name=name,
        split=split,
        metric=metric,
        pad=_pad_id(tokenizer),
        examples=list(examples),
        has_sets=has_sets,
    )



def checked_lengths(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    start: int = 0,
    all_positions: bool = False,
    skip_first: bool = False,
    vocab_size: int | None = None,
) -> Iterator[int | InvalidArgument]:
    """Per example, in order: the token length of its row as :func:`from_examples` builds it (a
    multi-token answer's teacher-forced tokens included), or the error it would raise, with the
    same message (the first is the one from_examples raises). Examples are numbered from
    ``start``: a caller checks every example of a large dataset a batch at a time."""
    check = _Validator(tokenizer, vocab_size or vocab_size_of(tokenizer))
    check.prime(examples)
    for i, ex in enumerate(examples, start=start):
        try:
            yield len(_row(ex, f"examples[{i}]", check, all_positions, skip_first).clean)
        except InvalidArgument as err:
            yield err


@dataclass
class _Row:
    clean: list[int]
    corrupted: list[int]
    positions: list[int]
    targets: list[int]
    distractors: list[int]
    good: list[int]
    bad: list[int]


def _row(ex: Example, where: str, check: _Validator, all_positions: bool, skip_first: bool) -> _Row:
    check_example(ex, where, all_positions=all_positions)
    clean = check.ids(ex.clean, f"{where}.clean")
    corrupted = check.ids(ex.corrupted, f"{where}.corrupted")
    check_equal_lengths(len(clean), len(corrupted), where)
    if ex.multi_token:
        return _multi_token_row(ex, where, check, clean, corrupted)
    if all_positions:
        positions = list(range(1 if skip_first else 0, len(clean)))
        if not positions:
            raise InvalidArgument(f"{where}.clean has no answer position", field=f"{where}.clean")
        targets = _per_position(ex.target, len(positions), f"{where}.target", check)
        distractors = _per_position(ex.distractor, len(positions), f"{where}.distractor", check)
    else:
        positions = [len(clean) - 1]
        targets = [
            -1 if ex.target is None else check.answer(ex.target, ex.clean, f"{where}.target")
        ]
        distractors = [
            -1
            if ex.distractor is None
            else check.answer(ex.distractor, ex.clean, f"{where}.distractor")
        ]
    good = _answer_set(ex.good, ex.clean, f"{where}.good", check)
    bad = _answer_set(ex.bad, ex.clean, f"{where}.bad", check)
    return _Row(clean, corrupted, positions, targets, distractors, good, bad)


def _multi_token_row(
    ex: Example, where: str, check: _Validator, clean: list[int], corrupted: list[int]
) -> _Row:
    """Teacher forcing: both prompts go on with the target's tokens but the last, and the k-th
    answer position (the prompt's last token, then each forced token) predicts the target's k-th
    token; the corrupted prompt is forced with the same tokens so positions line up."""
    targets = check.answer_tokens(ex.target, ex.clean, f"{where}.target")
    distractors: list[int] = []
    if ex.distractor is not None:
        distractors = check.answer_tokens(ex.distractor, ex.clean, f"{where}.distractor")
        if len(distractors) > len(targets):
            raise InvalidArgument(
                f"{where}.distractor has {len(distractors)} tokens, more than the target's "
                f"{len(targets)}: the model is forced along the target, so only the distractor's "
                "first tokens can be compared with it",
                field=f"{where}.distractor",
            )
    forced = targets[:-1]
    check_token_count(len(clean) + len(forced), f"{where}.clean")
    start = len(clean) - 1
    return _Row(
        clean=clean + forced,
        corrupted=corrupted + forced,
        positions=list(range(start, start + len(targets))),
        targets=targets,
        distractors=distractors + [-1] * (len(targets) - len(distractors)),
        good=[],
        bad=[],
    )


def _per_position(value: Any, p: int, where: str, check: _Validator) -> list[int]:
    if value is None:
        return [-1] * p
    if not isinstance(value, list | tuple) or len(value) != p:
        raise InvalidArgument(
            f"{where} must list one token (or None) per answer position ({p})", field=where
        )
    return [-1 if v is None else check.check_id(v, where) for v in value]


def _answer_set(values: Any, prompt: Tokens, where: str, check: _Validator) -> list[int]:
    if values is None:
        return []
    return [check.answer(v, prompt, where) for v in values]


def _stack(
    rows: list[_Row],
    *,
    name: str,
    split: str,
    metric: Metric,
    pad: int,
    examples: list[Example],
    has_sets: bool,
) -> TaskDataset:
    n = len(rows)
    t = max(len(r.clean) for r in rows)
    p = max(len(r.positions) for r in rows)
    clean = torch.full((n, t), pad, dtype=torch.long)  # [N,T]
    corrupted = torch.full((n, t), pad, dtype=torch.long)  # [N,T]
    attention = torch.zeros((n, t), dtype=torch.long)  # [N,T]
    positions = torch.zeros((n, p), dtype=torch.long)  # [N,P]
    answer_mask = torch.zeros((n, p), dtype=torch.bool)  # [N,P]
    targets = torch.full((n, p), -1, dtype=torch.long)  # [N,P]
    distractors = torch.full((n, p), -1, dtype=torch.long)  # [N,P]
    for i, r in enumerate(rows):
        clean[i, : len(r.clean)] = torch.tensor(r.clean)
        corrupted[i, : len(r.corrupted)] = torch.tensor(r.corrupted)
        attention[i, : len(r.clean)] = 1
        k = len(r.positions)
        positions[i, :k] = torch.tensor(r.positions)
        answer_mask[i, :k] = True
        targets[i, :k] = torch.tensor(r.targets)
        distractors[i, :k] = torch.tensor(r.distractors)
    good = _pad_sets([r.good for r in rows]) if has_sets else None  # [N,K]
    bad = _pad_sets([r.bad for r in rows]) if has_sets else None  # [N,K]
    return TaskDataset(
        name=name,
        metric=metric,
        split=split,
        clean_ids=clean,
        corrupted_ids=corrupted,
        attention_mask=attention,
        positions=positions,
        target_ids=targets,
        distractor_ids=distractors,
        good_ids=good,
        bad_ids=bad,
        examples=examples,
        answer_mask=answer_mask,
    )


def _pad_sets(sets: list[list[int]]) -> torch.Tensor:
    k = max(len(s) for s in sets)
    out = torch.full((len(sets), k), -1, dtype=torch.long)  # [N,K]
    for i, s in enumerate(sets):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# ---- generating disjoint splits --------------------------------------------------------------


def split_of(key: str, splits: Sequence[tuple[str, float]]) -> str:
    """A split for ``key``, fixed by a hash of the key alone (never by a seed): a text lands in
    the same split for every seed and sample size, so splits never share an example."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    total = sum(w for _, w in splits)
    acc = 0.0
    for name, weight in splits:
        acc += weight / total
        if u < acc:
            return name
    return splits[-1][0]


def sample_examples(
    candidate: Callable[[random.Random], Example | None],
    in_split: Callable[[Example], bool],
    *,
    n: int,
    seed: int,
    task: str,
    split: str,
) -> list[Example]:
    """``n`` distinct examples (by clean prompt) drawn by ``candidate`` that belong to ``split``.

    ``candidate`` returns None for a draw it rejects (e.g. unequal token lengths). Raises
    InvalidArgument(field="n") when the split does not hold ``n`` distinct examples.
    """
    check_count(n)
    if split not in SPLITS:
        raise InvalidArgument(f"split must be one of {SPLITS}, got {split!r}", field="split")
    rng = random.Random(f"{task}:{seed}:{split}")
    seen: set[str] = set()
    out: list[Example] = []
    misses = (
        0  # consecutive draws that gave nothing new: the split is exhausted long before the cap
    )
    while misses < MAX_MISSES:
        ex = candidate(rng)
        key = "" if ex is None else str(ex.clean)
        if ex is None or key in seen or not in_split(ex):
            misses += 1
            continue
        misses = 0
        seen.add(key)
        out.append(ex)
        if len(out) == n:
            return out
    raise InvalidArgument(
        f"{task}: found only {len(out)} distinct {split} examples for this tokenizer, "
        f"fewer than the {n} requested",
        field="n",
    )


def check_count(n: int) -> None:
    """Raise InvalidArgument(field="n") unless 1 <= n <= MAX_EXAMPLES."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_EXAMPLES:
        raise InvalidArgument(
            f"n must be an integer from 1 to {MAX_EXAMPLES}, got {n!r}", field="n"
        )


def words(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of ``text`` (for long word lists)."""
    return tuple(text.split())


def single_tokens(tokenizer: Any, words: Sequence[str], *, context: str = "So") -> list[str]:
    """The words (e.g. " Mary") that are one token after ``context`` in this tokenizer.

    Judged in context, as prompts use them: a SentencePiece tokenizer writes " Mary" alone as two
    pieces but "So Mary" as "So" + " Mary".
    """
    before = encode(tokenizer, [context], special=False)[0]
    after = encode(tokenizer, [context + w for w in words], special=False)
    return [
        w
        for w, ids in zip(words, after, strict=True)
        if len(ids) == len(before) + 1 and ids[: len(before)] == before
    ]
