"""Addition and subtraction in the shape of MIB's arithmetic task.

Clean: "12 + 35 =" -> " 47". Corrupted: other operands with another result and the same token
length ("14 + 31 =" -> " 45"), whose result is the distractor. With ``multi_token`` (the default)
the answer is every token of the result, teacher-forced (``Example.multi_token``: the distractor
may have fewer tokens, never more); without it the answer is the result's first token and the
distractor's first token must differ from it. Subtraction draws a >= b, so results are never
negative. Prompts are divided between the splits by a hash of the prompt (80 / 10 / 10); small
``max_operand`` values hold few distinct prompts, so ask for few examples.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable
from typing import Any

from edgeprune.engine.tasks.base import Example, encode, sample_examples, split_of

OPERATIONS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("+", operator.add),
    "sub": ("-", operator.sub),
}
SPLIT_WEIGHTS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


def arithmetic_examples(
    tokenizer: Any,
    *,
    n: int,
    seed: int = 0,
    split: str = "train",
    operation: str = "add",
    max_operand: int = 99,
    multi_token: bool = True,
) -> list[Example]:
    """``n`` examples of ``split``: ``operation`` ("add" or "sub") on operands in
    [0, ``max_operand``]."""
    symbol, apply = OPERATIONS[operation]

    def operands(rng: random.Random) -> tuple[int, int]:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        return (max(a, b), min(a, b)) if operation == "sub" else (a, b)

    def candidate(rng: random.Random) -> Example | None:
        (a, b), (c, d) = operands(rng), operands(rng)
        result, other = apply(a, b), apply(c, d)
        if result == other:
            return None
        clean, corrupted = f"{a} {symbol} {b} =", f"{c} {symbol} {d} ="
        # [clean, corrupted, clean + its result, clean + the corrupted result]
        ids = encode(
            tokenizer, [clean, corrupted, f"{clean} {result}", f"{clean} {other}"], special=True
        )
        prompt = ids[0]
        if len(ids[1]) != len(prompt) or any(x[: len(prompt)] != prompt for x in ids[2:]):
            return None
        answer, wrong = ids[2][len(prompt) :], ids[3][len(prompt) :]
        if multi_token:
            if not answer or not wrong or len(wrong) > len(answer):
                return None
            return Example(
                clean=clean,
                corrupted=corrupted,
                target=f" {result}",
                distractor=f" {other}",
                multi_token=True,
            )
        if not answer or not wrong or answer[0] == wrong[0]:
            return None
        return Example(clean=clean, corrupted=corrupted, target=answer[0], distractor=wrong[0])

    def in_split(ex: Example) -> bool:
        return split_of(str(ex.clean), SPLIT_WEIGHTS) == split

    return sample_examples(
        candidate, in_split, n=n, seed=seed, task=f"arithmetic_{operation}", split=split
    )
