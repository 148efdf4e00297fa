"""Greater-Than (Hanna et al. 2023) with the probability-difference metric.

Clean: "The war lasted from the year 1732 to the year 17"; good answers are the years after 32, bad
ones the years up to 32; the metric is ``sum p(good) - sum p(bad)``. Corrupted: the start year
1701 (Hanna's "01" corruption), which makes every later year acceptable.

Tokenizers write years differently, so the answer format is found for each tokenizer, in order:

* ``two_digit``: the prompt ends in "17" and a two-digit "YY" is one token (GPT-2);
* ``one_digit``: the prompt ends in "17" and numbers are written digit by digit (SmolLM2, LLaMA-3
  style): the answer is the tens digit, good digits are above YY's tens digit, bad ones below it
  (the equal digit is neither);
* ``whole_year``: the prompt ends in "the year" and " 17YY" is one token (years 1710-1799).

Answers that are not one token in a format are left out of the sets; a format needs most of them.
Examples are divided between the splits by a hash of the prompt (80 / 10 / 10).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.tasks.base import Example, encode, sample_examples, split_of, words

NOUNS = words(
    """
    war abduction accord affair agreement attack campaign captivity case challenge chaos
    clash competition confrontation conspiracy construction contract cooperation crisis
    custody deal decline development dispute dynasty effort empire epidemic exchange
    expansion expedition famine friendship growth hostility illness imprisonment insurgency
    invasion investigation journey kingdom marriage negotiation occupation operation
    outbreak partnership pilgrimage plague program project quest rebellion reign
    relationship revolt riot rivalry rule siege strike study tour tradition treaty trial
    truce voyage uprising
    """
)
VERBS = ("lasted", "went on", "continued")
CENTURY = "17"
CORRUPT_YEAR = 1  # Hanna et al.'s "01" start year
SPLIT_WEIGHTS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
MIN_COVERAGE = 0.8  # share of a format's answers that must be one token


@dataclass(frozen=True)
class YearFormat:
    """How this tokenizer answers: ``suffix`` ends the prompt, ``tokens`` maps answer values
    (two-digit years, or tens digits) to token ids, ``years`` are the start years to draw."""

    name: str
    suffix: str
    tokens: dict[int, int]
    years: range

    def answer_sets(self, year: int) -> tuple[list[int], list[int]]:
        """(good, bad) token ids after the start year ``17{year:02d}``."""
        if self.name == "one_digit":
            tens = year // 10
            return (
                [t for d, t in self.tokens.items() if d > tens],
                [t for d, t in self.tokens.items() if d < tens],
            )
        return (
            [t for y, t in self.tokens.items() if y > year],
            [t for y, t in self.tokens.items() if y <= year],
        )


_FORMATS = (
    ("two_digit", f" {CENTURY}", {y: f"{y:02d}" for y in range(100)}, range(2, 99)),
    ("one_digit", f" {CENTURY}", {d: str(d) for d in range(10)}, range(10, 90)),
    ("whole_year", "", {y: f" {CENTURY}{y}" for y in range(10, 100)}, range(11, 99)),
)


def year_format(tokenizer: Any) -> YearFormat:
    """The first format (see the module doc) in which this tokenizer answers with one token."""
    probe = f"The war lasted from the year {CENTURY}32 to the year"
    for name, suffix, answers, years in _FORMATS:
        prompt = probe + suffix
        before = encode(tokenizer, [prompt], special=True)[0]
        afters = encode(tokenizer, [prompt + text for text in answers.values()], special=True)
        tokens = {
            value: after[-1]
            for value, after in zip(answers, afters, strict=True)
            if len(after) == len(before) + 1 and after[: len(before)] == before
        }
        if len(tokens) >= MIN_COVERAGE * len(answers):
            return YearFormat(name, suffix, tokens, years)
    raise InvalidArgument(
        "greater_than: this tokenizer writes years in no supported way (two-digit "
        "tokens, single digits, or whole years)",
        field="tokenizer",
    )


def greater_than_examples(
    tokenizer: Any, *, n: int, seed: int = 0, split: str = "train"
) -> list[Example]:
    """``n`` greater-than examples of ``split`` for this tokenizer (see the module doc)."""
    fmt = year_format(tokenizer)

    def prompt(noun: str, verb: str, year: int) -> str:
        return f"The {noun} {verb} from the year {CENTURY}{year:02d} to the year{fmt.suffix}"

    def candidate(rng: random.Random) -> Example | None:
        noun, verb, year = rng.choice(NOUNS), rng.choice(VERBS), rng.choice(fmt.years)
        good, bad = fmt.answer_sets(year)
        if not good or not bad:
            return None
        clean = prompt(noun, verb, year)
        length = len(encode(tokenizer, [clean], special=True)[0])
        for start in (CORRUPT_YEAR, fmt.years.start):
            corrupted = prompt(noun, verb, start)
            if len(encode(tokenizer, [corrupted], special=True)[0]) == length:
                return Example(clean=clean, corrupted=corrupted, good=good, bad=bad)
        return None

    def in_split(ex: Example) -> bool:
        return split_of(str(ex.clean), SPLIT_WEIGHTS) == split

    return sample_examples(candidate, in_split, n=n, seed=seed, task="greater_than", split=split)
