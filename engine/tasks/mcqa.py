"""Multiple-choice question answering in the shape of MIB's MCQA, generated from a word list.

Clean::

    Question: What colour is a banana?
    A. red
    B. yellow
    C. blue
    D. green
    Answer:

-> " B" (the correct option's letter). Corrupted: the same question with its options permuted so
the correct one sits under another letter; the distractor is that letter, so the logit difference
is the model's preference for the clean answer's position over the corrupted one's. The options
are the same words in another order, so both prompts have the same tokens up to order (draws
whose token counts still differ are dropped).

Facts are divided between the splits (three in five train, one validation, one test), so
held-out metrics measure a circuit on questions it was not trained on. The letters " A" .. must
each be one token after "Answer:" in the tokenizer.
"""

from __future__ import annotations

import random
from typing import Any

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.tasks.base import Example, encode, sample_examples, single_tokens

COLOURS = ("red", "yellow", "green", "blue", "white", "black", "orange", "brown", "pink", "purple")
# (subject, its colour); each fact has one unambiguous colour among COLOURS.
FACTS = (
    ("a banana", "yellow"), ("grass", "green"), ("the sky", "blue"), ("snow", "white"),
    ("coal", "black"), ("a strawberry", "red"), ("a carrot", "orange"), ("chocolate", "brown"),
    ("a flamingo", "pink"), ("an eggplant", "purple"), ("a lemon", "yellow"), ("a frog", "green"),
    ("the sea", "blue"), ("milk", "white"), ("a crow", "black"), ("blood", "red"),
    ("a pumpkin", "orange"), ("soil", "brown"), ("a pig", "pink"), ("a plum", "purple"),
)
LETTERS = "ABCD"
ANSWER_CUE = "Answer:"
SPLIT_OF_FACT = {3: "validation", 4: "test"}  # fact index % 5 -> split; the rest train


def facts_of(split: str) -> list[tuple[str, str]]:
    """The facts whose questions belong to ``split``."""
    return [f for i, f in enumerate(FACTS) if SPLIT_OF_FACT.get(i % 5, "train") == split]


def prompt(subject: str, options: list[str]) -> str:
    """The question about ``subject`` with ``options`` under the letters A, B, ..."""
    lines = [f"Question: What colour is {subject}?"]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=False)]
    return "\n".join([*lines, ANSWER_CUE])


def mcqa_examples(
    tokenizer: Any, *, n: int, seed: int = 0, split: str = "train", n_choices: int = 4
) -> list[Example]:
    """``n`` multiple-choice questions of ``split`` with ``n_choices`` options (2-4) each."""
    if not 2 <= n_choices <= len(LETTERS):
        raise InvalidArgument(
            f"n_choices must be from 2 to {len(LETTERS)}, got {n_choices}",
            field="params['n_choices']",
        )
    letters = [f" {letter}" for letter in LETTERS[:n_choices]]
    if len(single_tokens(tokenizer, letters, context=ANSWER_CUE)) != n_choices:
        raise InvalidArgument(
            f"mcqa needs the letters {', '.join(repr(x) for x in letters)} to be single tokens "
            f"after {ANSWER_CUE!r} in this tokenizer",
            field="tokenizer",
        )
    facts = facts_of(split)

    def candidate(rng: random.Random) -> Example | None:
        subject, colour = rng.choice(facts)
        options = [colour, *rng.sample([c for c in COLOURS if c != colour], n_choices - 1)]
        rng.shuffle(options)
        moved = options[:]
        while moved.index(colour) == options.index(colour):
            rng.shuffle(moved)
        clean, corrupted = prompt(subject, options), prompt(subject, moved)
        lengths = {len(ids) for ids in encode(tokenizer, [clean, corrupted], special=True)}
        if len(lengths) != 1:
            return None
        return Example(
            clean=clean,
            corrupted=corrupted,
            target=letters[options.index(colour)],
            distractor=letters[moved.index(colour)],
        )

    return sample_examples(
        candidate, lambda ex: True, n=n, seed=seed, task="mcqa", split=split
    )
