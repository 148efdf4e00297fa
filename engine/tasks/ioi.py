"""Indirect Object Identification (Wang et al. 2023) with the ABC corruption.

Clean: "When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect
object), distractor " John" (the subject). Corrupted: the same template with three other names
in the three name slots ("When Alice and Bob went to the store, Carl gave a drink to"), so it
carries no information about which name to repeat. Only names that are a single token (with
their leading space) in the given tokenizer are used, so clean and corrupted always have equal
token lengths.

Templates are split between splits: the train split uses two thirds of them, validation and test
the held-out third (divided between them by a hash of the prompt), so held-out metrics measure a
circuit on sentence shapes it was not trained on.
"""

from __future__ import annotations

import random
from typing import Any

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.tasks.base import Example, sample_examples, single_tokens, split_of, words

NAMES = words(
    """
    Mary John Alice Bob Tom James Sarah Emma David Paul Anna Lisa Mark Laura Peter Kate
    Michael Susan Robert Linda Jessica Daniel Rachel Andrew Emily Thomas Sophie Richard
    Grace Henry Claire George Helen Jack Amy Sam Lucy Ben Anne Steven Karen Joseph Nancy
    Adam Ruth Brian Jane Kevin Julia Eric Rose Frank Alex Max
    """
)
PLACES = words(
    """
    store park school garden station office market river house restaurant hospital library
    beach church museum
    """
)
OBJECTS = words(
    """
    drink book ball key ring letter gift bone snack kiss basketball necklace computer bag
    bottle
    """
)
# [A] is the indirect object (the answer), [B] the subject named twice; [A] ends every sentence.
TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] thought about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)
TRAIN_TEMPLATES = tuple(t for i, t in enumerate(TEMPLATES) if i % 3 != 2)
HELDOUT_TEMPLATES = tuple(t for i, t in enumerate(TEMPLATES) if i % 3 == 2)
MIN_NAMES = 5  # two clean names and three different corrupted ones


def fill(template: str, first: str, second: str, repeated: str, place: str, obj: str) -> str:
    """The prompt of ``template`` up to the answer: names fill the first pair and the repeated slot.

    The first pair keeps the template's order of [B] and [A] (``first``, ``second``).
    """
    prompt = template[: template.rindex(" [A]")]
    prompt = prompt.replace("[B] and [A]", f"{first} and {second}", 1)
    prompt = prompt.replace("[B]", repeated).replace("[PLACE]", place).replace("[OBJECT]", obj)
    return prompt


def ioi_examples(tokenizer: Any, *, n: int, seed: int = 0, split: str = "train") -> list[Example]:
    """``n`` IOI examples of ``split`` (ABBA and BABA orders mixed) for this tokenizer."""
    names = [w[1:] for w in single_tokens(tokenizer, [f" {name}" for name in NAMES])]
    if len(names) < MIN_NAMES:
        raise InvalidArgument(
            f"ioi needs at least {MIN_NAMES} first names that are single tokens with a leading "
            "space in "
            f"this tokenizer, found {len(names)}",
            field="tokenizer",
        )
    templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES

    def candidate(rng: random.Random) -> Example:
        template = rng.choice(templates)
        io, s, c1, c2, c3 = rng.sample(names, 5)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        first, second = (s, io) if rng.random() < 0.5 else (io, s)  # BABA or ABBA
        return Example(
            clean=fill(template, first, second, s, place, obj),
            corrupted=fill(template, c1, c2, c3, place, obj),
            target=f" {io}",
            distractor=f" {s}",
        )

    def in_split(ex: Example) -> bool:
        return (
            split == "train" or split_of(str(ex.clean), [("validation", 1), ("test", 1)]) == split
        )

    return sample_examples(candidate, in_split, n=n, seed=seed, task="ioi", split=split)
