"""Tasks for compiled Tracr programs: every input position is an answer position.

Inputs are "BOS x1 .. xk" over the program's input vocabulary (k from 1 to max_seq_len - 1); the
corrupted input is another sequence of the same length. There are no target tokens: a circuit is
judged by how closely it reproduces the compiled model's own output at every position after BOS
(KL and exact match), the standard Tracr recovery check. Inputs are divided between the splits by
a hash (80 / 10 / 10); tiny programs have few distinct inputs, so ask for few examples.
"""

from __future__ import annotations

import random
from typing import Any

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.tasks.base import Example, sample_examples, split_of
from edgeprune.engine.tracr_model import TracrTokenizer

PREFIX = "tracr_"
SPLIT_WEIGHTS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


def tracr_examples(tokenizer: Any, *, n: int, seed: int = 0, split: str = "train") -> list[Example]:
    """``n`` random input sequences of ``split`` for a compiled program's tokenizer."""
    if not isinstance(tokenizer, TracrTokenizer):
        raise InvalidArgument("tracr_* tasks need a tracr model", field="task")
    special = {tokenizer.bos_token, tokenizer.pad_token}
    vocab = [t for t in tokenizer.vocab if t not in special]
    if not vocab or tokenizer.max_seq_len < 2:
        raise InvalidArgument("the tracr program has no input tokens", field="model")

    def sequence(rng: random.Random, length: int) -> str:
        return " ".join([tokenizer.bos_token, *(rng.choice(vocab) for _ in range(length))])

    def candidate(rng: random.Random) -> Example:
        length = rng.randint(1, tokenizer.max_seq_len - 1)
        return Example(clean=sequence(rng, length), corrupted=sequence(rng, length))

    def in_split(ex: Example) -> bool:
        return split_of(str(ex.clean), SPLIT_WEIGHTS) == split

    return sample_examples(candidate, in_split, n=n, seed=seed, task="tracr", split=split)
