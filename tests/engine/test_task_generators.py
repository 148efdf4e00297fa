"""MCQA and arithmetic generators, and the params schema every built-in task declares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from edgeprune.engine import contract
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.tasks import SPLITS, TASKS, build_task, mcqa
from edgeprune.engine.tasks.base import encode


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))


def _options(prompt: str) -> dict[str, str]:
    """letter -> option of an MCQA prompt."""
    return dict(re.findall(r"^([A-D])\. (\w+)$", prompt, flags=re.MULTILINE))


@pytest.mark.parametrize("n_choices", [2, 4])
def test_mcqa_answers_and_corruption(tok: PreTrainedTokenizerFast, n_choices: int) -> None:
    splits = {s: build_task("mcqa", tok, n=20, seed=1, split=s, params={"n_choices": n_choices})
              for s in SPLITS}
    subjects = {s: {re.search(r"is (.+)\?", ex.clean)[1] for ex in ds.examples}  # type: ignore[index, arg-type]
                for s, ds in splits.items()}
    # the splits ask about different facts, not only different option orders
    assert not subjects["train"] & (subjects["validation"] | subjects["test"])
    assert not subjects["validation"] & subjects["test"]
    colour_of = dict(mcqa.FACTS)
    for ds in splits.values():
        assert ds.metric == "logit_diff" and ds.positions.shape[1] == 1
        assert bool(ds.clean_ids.ne(ds.corrupted_ids).any(1).all())  # every pair differs
        for i, ex in enumerate(ds.examples):
            clean, corrupted = _options(ex.clean), _options(ex.corrupted)  # type: ignore[arg-type]
            assert len(clean) == n_choices and sorted(clean.values()) == sorted(corrupted.values())
            subject = re.search(r"is (.+)\?", ex.clean)[1]  # type: ignore[index, arg-type]
            right = colour_of[subject]
            letter = next(k for k, v in clean.items() if v == right)
            moved = next(k for k, v in corrupted.items() if v == right)
            assert (ex.target, ex.distractor) == (f" {letter}", f" {moved}") and letter != moved
            # the answer the generator names is the token the dataset scores
            ids = encode(tok, [ex.clean + ex.target], special=True)[0]  # type: ignore[operator]
            assert int(ds.target_ids[i, 0]) == ids[-1]
            assert int(ds.attention_mask[i].sum()) == len(ids) - 1  # same length, clean and corrupted


def test_mcqa_needs_single_token_letters() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.add_tokens([chr(c) for c in range(32, 127)] + ["\n"])  # one token a character
    chars = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=" ")
    with pytest.raises(InvalidArgument, match="single tokens") as err:
        build_task("mcqa", chars, n=2)
    assert err.value.field == "tokenizer"


@pytest.mark.parametrize("operation", ["add", "sub"])
def test_arithmetic_multi_token_answers(tok: PreTrainedTokenizerFast, operation: str) -> None:
    ds = build_task("arithmetic", tok, n=20, seed=2, split="validation",
                    params={"operation": operation, "max_operand": "999"})
    symbol = {"add": "+", "sub": "-"}[operation]
    assert ds.positions.shape[1] > 1  # three-digit results take several tokens here
    for i, ex in enumerate(ds.examples):
        a, b = map(int, re.fullmatch(rf"(\d+) \{symbol} (\d+) =", ex.clean).groups())  # type: ignore[union-attr, arg-type]
        c, d = map(int, re.fullmatch(rf"(\d+) \{symbol} (\d+) =", ex.corrupted).groups())  # type: ignore[union-attr, arg-type]
        result = a + b if operation == "add" else a - b
        other = c + d if operation == "add" else c - d
        assert ex.multi_token and ex.target == f" {result}" and ex.distractor == f" {other}"
        assert result >= 0 and other != result and max(a, b, c, d) <= 999
        prompt = encode(tok, [ex.clean], special=True)[0]
        answer = encode(tok, [f"{ex.clean} {result}"], special=True)[0][len(prompt):]
        k = int(ds.answer_mask[i].sum())
        assert k == len(answer) and ds.target_ids[i, :k].tolist() == answer
        assert ds.positions[i, :k].tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + k))
        # teacher forcing: both prompts go on with the answer's tokens but the last
        n = int(ds.attention_mask[i].sum())
        assert n == len(prompt) + k - 1
        assert ds.clean_ids[i, len(prompt):n].tolist() == answer[:-1]
        assert ds.corrupted_ids[i, len(prompt):n].tolist() == answer[:-1]


def test_arithmetic_first_token(tok: PreTrainedTokenizerFast) -> None:
    ds = build_task("arithmetic", tok, n=20, seed=0, params={"multi_token": False})
    assert ds.positions.shape[1] == 1
    for i, ex in enumerate(ds.examples):
        a, b = map(int, re.findall(r"\d+", ex.clean))  # type: ignore[arg-type]  # "a + b ="
        result = a + b
        prompt = encode(tok, [ex.clean], special=True)[0]
        first = encode(tok, [f"{ex.clean} {result}"], special=True)[0][len(prompt)]
        assert not ex.multi_token and ex.target == first == int(ds.target_ids[i, 0])
        assert ex.distractor != ex.target


def test_params_are_typed_and_checked(tok: PreTrainedTokenizerFast) -> None:
    as_text = build_task("mcqa", tok, n=5, params={"n_choices": "3"})
    typed = build_task("mcqa", tok, n=5, params={"n_choices": 3})
    assert as_text.content_hash == typed.content_hash
    assert all(len(_options(ex.clean)) == 3 for ex in typed.examples)  # type: ignore[arg-type]
    default = build_task("mcqa", tok, n=5)
    assert all(len(_options(ex.clean)) == 4 for ex in default.examples)  # type: ignore[arg-type]
    for task, params, key, message in [
        ("mcqa", {"n_choices": 5}, "n_choices", r"must be in \[2, 4\], got 5"),
        ("mcqa", {"n_choices": "two"}, "n_choices", "must be an integer"),
        ("mcqa", {"letters": "ABCD"}, "letters", "has no parameter 'letters'"),
        ("arithmetic", {"operation": "mul"}, "operation", "must be one of add, sub"),
        ("arithmetic", {"multi_token": "maybe"}, "multi_token", "must be true or false"),
        ("arithmetic", {"max_operand": 3}, "max_operand", r"must be in \[9, 9999\]"),
        ("ioi", {"n_choices": 2}, "n_choices", r"its parameters: none"),
    ]:
        with pytest.raises(InvalidArgument, match=message) as err:
            build_task(task, tok, n=5, params=params)
        assert err.value.field == f"params[{key!r}]"


def test_the_contract_declares_every_task() -> None:
    for name, spec in TASKS.items():
        info = contract.BUILTIN[name]
        assert (spec.metric, spec.description, spec.params) == (
            info.metric, info.description, info.params)
        for param in info.params:  # every default passes its own check
            assert param.parse(param.default) == param.default
