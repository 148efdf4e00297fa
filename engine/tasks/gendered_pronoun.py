"""Gendered Pronoun (Mathwin et al. 2023), as Edge Pruning and MIB use it.

Clean: "So Mary is a really great friend, isn't" -> " she", distractor " he". Corrupted: the same
template with a name of the other gender ("So John is a really great friend, isn't"), which
flips the answer. Names are single tokens with a leading space in the given tokenizer, so clean and
corrupted have equal token lengths. Examples are divided between the splits by a hash of the
prompt (80 / 10 / 10).
"""

from __future__ import annotations

import random
from typing import Any

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.tasks.base import Example, sample_examples, single_tokens, split_of, words

MALE = words(
    """
    John James David Paul Mark Peter Michael Robert Tom Bob Daniel Andrew Thomas Richard
    Henry George Jack Ben Steven Joseph Adam Brian Kevin Eric Frank Max William Charles
    Matthew Anthony Edward Scott Jason Ryan Gary Larry Simon Luke Arthur Harry
    """
)
FEMALE = words(
    """
    Mary Alice Sarah Emma Anna Lisa Laura Kate Susan Linda Jessica Rachel Emily Sophie Grace
    Claire Helen Amy Lucy Anne Karen Nancy Ruth Jane Julia Rose Elizabeth Jennifer Patricia
    Barbara Margaret Sandra Donna Michelle Carol Maria Olivia Sophia Hannah Natalie
    """
)
TEMPLATES = (
    "So [NAME] is a really great friend, isn't",
    "So [NAME] is such a good cook, isn't",
    "So [NAME] is a very good athlete, isn't",
    "So [NAME] is a really nice person, isn't",
    "So [NAME] is such a funny person, isn't",
    "So [NAME] is always full of energy, isn't",
    "So [NAME] is really thoughtful, isn't",
    "So [NAME] is quite the storyteller, isn't",
    "So [NAME] is a bit of a genius, isn't",
    "So [NAME] is always on time, isn't",
    "So [NAME] is great with kids, isn't",
    "So [NAME] is a talented musician, isn't",
    "So [NAME] is a great teacher, isn't",
    "So [NAME] is very good at chess, isn't",
    "So [NAME] is a wonderful neighbour, isn't",
    "So [NAME] is really good at math, isn't",
    "So [NAME] is a hard worker, isn't",
    "So [NAME] is always so calm, isn't",
    "So [NAME] is a fast runner, isn't",
    "So [NAME] is really kind to everyone, isn't",
    "So [NAME] is a brilliant painter, isn't",
    "So [NAME] is very patient, isn't",
    "So [NAME] is such a good dancer, isn't",
    "So [NAME] is a loyal friend, isn't",
)
PRONOUNS = {"male": " he", "female": " she"}
SPLIT_WEIGHTS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


def gendered_pronoun_examples(
    tokenizer: Any, *, n: int, seed: int = 0, split: str = "train"
) -> list[Example]:
    """``n`` gendered-pronoun examples of ``split`` for this tokenizer, half of each gender."""
    if len(single_tokens(tokenizer, list(PRONOUNS.values()))) != 2:
        raise InvalidArgument(
            'gendered_pronoun needs " he" and " she" to be single tokens in this tokenizer',
            field="tokenizer",
        )
    names = {
        "male": [w[1:] for w in single_tokens(tokenizer, [f" {x}" for x in MALE])],
        "female": [w[1:] for w in single_tokens(tokenizer, [f" {x}" for x in FEMALE])],
    }
    for gender, found in names.items():
        if not found:
            raise InvalidArgument(
                f"gendered_pronoun found no {gender} first name that is a single "
                "token with a leading space in this tokenizer",
                field="tokenizer",
            )

    def candidate(rng: random.Random) -> Example:
        gender, other = ("male", "female") if rng.random() < 0.5 else ("female", "male")
        template = rng.choice(TEMPLATES)
        return Example(
            clean=template.replace("[NAME]", rng.choice(names[gender])),
            corrupted=template.replace("[NAME]", rng.choice(names[other])),
            target=PRONOUNS[gender],
            distractor=PRONOUNS[other],
        )

    def in_split(ex: Example) -> bool:
        return split_of(str(ex.clean), SPLIT_WEIGHTS) == split

    return sample_examples(
        candidate, in_split, n=n, seed=seed, task="gendered_pronoun", split=split
    )
