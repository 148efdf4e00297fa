"""Task datasets: the built-in generators, validation, batching and JSONL custom datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.loading import smollm2_gguf
from edgeprune.engine.tasks import (
    MAX_EXAMPLES,
    MAX_TOKENS_PER_EXAMPLE,
    SPLITS,
    TASKS,
    Example,
    build_task,
    from_examples,
    ioi,
    load_jsonl,
    parse_jsonl,
)
from edgeprune.engine.tasks import gendered_pronoun as gp
from edgeprune.engine.tasks import greater_than as gt
from edgeprune.engine.tracr_model import load_tracr

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tracr"


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir: Path) -> PreTrainedTokenizerFast:
    """The tiny checkpoints' byte-level BPE (names, pronouns and years are single tokens)."""
    return AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))


def _year_tokenizer(pre_tokenizer: pre_tokenizers.PreTokenizer) -> PreTrainedTokenizerFast:
    """A BPE trained on year sentences, pre-tokenised by ``pre_tokenizer`` (digits or pairs)."""
    corpus = [
        f"The war lasted from the year 17{y:02d} to the year 17{y * 7 % 100:02d}."
        for y in range(100)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _byte_level(first: pre_tokenizers.PreTokenizer) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([first, pre_tokenizers.ByteLevel(add_prefix_space=False)])


# ---- built-in generators -------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_disjoint_deterministic_and_valid(
    tok: PreTrainedTokenizerFast, task: str
) -> None:
    sets = {split: build_task(task, tok, n=20, seed=3, split=split) for split in SPLITS}
    prompts = {split: {str(ex.clean) for ex in ds.examples} for split, ds in sets.items()}
    assert all(len(p) == 20 for p in prompts.values())
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    again = build_task(task, tok, n=20, seed=3, split="test")
    assert again.content_hash == sets["test"].content_hash
    assert build_task(task, tok, n=20, seed=4, split="test").content_hash != again.content_hash
    for ds in sets.values():
        assert ds.name == task and ds.metric == TASKS[task].metric
        lengths = ds.attention_mask.sum(1)  # [N]
        # the last answer position is the last token (a prompt's, or a forced answer token's)
        last = ds.positions.gather(1, ds.answer_mask.sum(1, keepdim=True) - 1)[:, 0]  # [N]
        assert torch.equal(last, lengths - 1)
        assert torch.equal(
            ds.clean_ids.ne(ds.corrupted_ids).logical_and(ds.attention_mask == 0),
            torch.zeros_like(ds.attention_mask, dtype=torch.bool),
        )
        assert not torch.equal(ds.clean_ids, ds.corrupted_ids)


def test_ioi_abc_corruption_and_answers(tok: PreTrainedTokenizerFast) -> None:
    ds = build_task("ioi", tok, n=30, seed=0, split="train")
    for i, ex in enumerate(ds.examples):
        io, s = ex.target.strip(), ex.distractor.strip()
        clean_words = ex.clean.replace(",", " ").replace(".", " ").split()
        corrupt_words = ex.corrupted.replace(",", " ").replace(".", " ").split()
        assert clean_words.count(io) == 1 and clean_words.count(s) == 2
        others = [w for w in corrupt_words if w in ioi.NAMES]
        assert len(others) == 3 and len(set(others)) == 3  # three different names: A, B, C
        assert not {io, s} & set(others)
        assert tok.decode([int(ds.target_ids[i, 0])]) == ex.target
        assert tok.decode([int(ds.distractor_ids[i, 0])]) == ex.distractor
        n = int(ds.attention_mask[i].sum())
        assert tok.decode(ds.clean_ids[i, :n].tolist()) == ex.clean


def test_ioi_templates_are_split_between_train_and_test(tok: PreTrainedTokenizerFast) -> None:
    train = {ex.clean for ex in ioi.ioi_examples(tok, n=60, seed=1, split="train")}
    test = {ex.clean for ex in ioi.ioi_examples(tok, n=20, seed=1, split="test")}
    assert all(
        _from_template(p, ioi.TRAIN_TEMPLATES) and not _from_template(p, ioi.HELDOUT_TEMPLATES)
        for p in train
    )
    assert all(
        _from_template(p, ioi.HELDOUT_TEMPLATES) and not _from_template(p, ioi.TRAIN_TEMPLATES)
        for p in test
    )


def _from_template(prompt: str, templates: tuple[str, ...]) -> bool:
    """Whether ``prompt`` fills one of ``templates`` (names, place and object as any words)."""
    for template in templates:
        body = re.escape(template[: template.rindex(" [A]")])
        for slot in ("\\[A\\]", "\\[B\\]", "\\[PLACE\\]", "\\[OBJECT\\]"):
            body = body.replace(slot, r"\w+")
        if re.fullmatch(body, prompt):
            return True
    return False


def test_ioi_needs_single_token_names() -> None:
    pairs = _year_tokenizer(_byte_level(pre_tokenizers.Digits(individual_digits=True)))
    with pytest.raises(InvalidArgument) as err:
        build_task("ioi", pairs, n=5)
    assert err.value.field == "tokenizer"


def test_gendered_pronoun_answers_follow_the_name(tok: PreTrainedTokenizerFast) -> None:
    ds = build_task("gendered_pronoun", tok, n=30, seed=0, split="train")
    for ex in ds.examples:
        name = ex.clean.split()[1]
        other = ex.corrupted.split()[1]
        expected = " he" if name in gp.MALE else " she"
        assert ex.target == expected and ex.distractor != expected
        assert (other in gp.MALE) != (name in gp.MALE)
    genders = {ex.target for ex in ds.examples}
    assert genders == {" he", " she"}


@pytest.mark.parametrize(
    ("pre", "fmt", "answer_len"),
    [
        (_byte_level(pre_tokenizers.Digits(individual_digits=True)), "one_digit", 1),
        (_byte_level(pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")), "two_digit", 2),
        (None, "whole_year", 4),
    ],
)
def test_greater_than_year_formats(
    tok: PreTrainedTokenizerFast, pre, fmt: str, answer_len: int
) -> None:
    tokenizer = tok if pre is None else _year_tokenizer(pre)
    assert gt.year_format(tokenizer).name == fmt
    ds = build_task("greater_than", tokenizer, n=25, seed=0, split="validation")
    assert ds.metric == "prob_diff" and ds.has_answer_sets and not ds.has_targets
    for i, ex in enumerate(ds.examples):
        year = int(ex.clean.split(" from the year 17")[1][:2])
        good = [tokenizer.decode([t]).strip() for t in ds.good_ids[i].tolist() if t >= 0]
        bad = [tokenizer.decode([t]).strip() for t in ds.bad_ids[i].tolist() if t >= 0]
        assert good and bad and all(len(a) == answer_len for a in good + bad)
        cut = {"one_digit": lambda a: int(a), "two_digit": int, "whole_year": lambda a: int(a[2:])}[
            fmt
        ]
        if fmt == "one_digit":
            assert all(cut(a) > year // 10 for a in good) and all(cut(a) < year // 10 for a in bad)
        else:
            assert all(cut(a) > year for a in good) and all(cut(a) <= year for a in bad)
        assert " from the year 17" in ex.corrupted and ex.corrupted != ex.clean


def _sentences() -> list[str]:
    """Task-like text in which names, pronouns and years are frequent enough to become tokens."""
    names = ioi.NAMES[:12]
    lines = [
        f"When {a} and {b} went to the store, {b} gave a drink to {a}."
        for a in names
        for b in names
    ]
    lines += [f"So {n} is nice, isn't {p}? Yes, {p} is." for n in names for p in ("he", "she")]
    lines += [f"The war lasted from the year 17{y} to the year 17{y}." for y in range(10, 100)]
    lines += [f"Question: What colour is it?\n{x}. red\nAnswer: {x}" for x in "ABCD"] * 5
    return lines


def test_sentencepiece_style_tokenizer_with_bos() -> None:
    """Metaspace ("▁Mary") pieces and a BOS token: answers are judged in context."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "<pad>"], show_progress=False
    )
    tok.train_from_iterator(_sentences() * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    sp = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )
    for task in sorted(TASKS):
        ds = build_task(task, sp, n=10, seed=0, split="test")
        assert (ds.clean_ids[:, 0] == sp.bos_token_id).all()
        last = ds.positions.gather(1, ds.answer_mask.sum(1, keepdim=True) - 1)[:, 0]  # [N]
        assert torch.equal(last, ds.attention_mask.sum(1) - 1)
    ioi_set = build_task("ioi", sp, n=10, seed=0)
    assert (
        sp.convert_ids_to_tokens(int(ioi_set.target_ids[0, 0]))
        == "▁" + ioi_set.examples[0].target[1:]
    )


def test_too_many_examples_for_a_split(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InvalidArgument) as err:
        build_task("gendered_pronoun", tok, n=5_000, split="test")
    assert err.value.field == "n"
    for n in (0, -1, 10**9):
        with pytest.raises(InvalidArgument, match="n must be"):
            build_task("ioi", tok, n=n)
    with pytest.raises(InvalidArgument) as err:
        build_task("nope", tok, n=3)
    assert err.value.field == "task" and "ioi" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        build_task("ioi", tok, n=3, split="dev")
    assert err.value.field == "split"


# ---- from_examples: validation -------------------------------------------------------------------


def _expect(
    field: str, examples: list[Example], tok: PreTrainedTokenizerFast, **kw
) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        from_examples(examples, tok, **kw)
    assert err.value.field == field, (err.value.field, str(err.value))
    return err.value


def test_validation_names_the_field(tok: PreTrainedTokenizerFast) -> None:
    good = Example("When Mary and John went", "When Anna and Paul went", " to", " and")
    _expect("examples", [], tok)
    _expect(
        "examples[1].corrupted", [good, Example("So Mary is", "So Mary is a", " she", " he")], tok
    )
    _expect("examples[0].target", [Example("So Mary is", "So John is", " Zed", " he")], tok)
    _expect("examples[0].distractor", [Example("So Mary is", "So John is", " she", "")], tok)
    _expect("examples[0].clean", [Example("", "x")], tok)
    _expect("examples[0].clean", [Example([1, 2, 10**6], [1, 2, 3])], tok)
    _expect("examples[0].clean", [Example([1, 2.5], [1, 2])], tok)
    _expect("examples[0].corrupted", [Example("a b", None)], tok)  # type: ignore[arg-type]
    _expect(
        "examples[0].clean",
        [Example([1] * (MAX_TOKENS_PER_EXAMPLE + 1), [1] * (MAX_TOKENS_PER_EXAMPLE + 1))],
        tok,
    )
    _expect("examples[0].good", [Example([5, 6], [5, 7], good=[])], tok)
    _expect("examples", [Example([5, 6], [5, 7], good=[5], bad=[6]), Example([5, 6], [5, 8])], tok)
    _expect("metric", [good], tok, metric="accuracy")
    err = _expect("examples[0].target", [Example("So Mary is", "So John is", " Zed", " he")], tok)
    assert "one token" in str(err)
    _expect("tokenizer", [Example("So Mary is", "So John is")], None, vocab_size=10)  # type: ignore[arg-type]
    _expect("tokenizer", [Example([1], [2])], None)  # type: ignore[arg-type]
    assert len(from_examples([Example([1], [2], target=3)], None, vocab_size=10)) == 1  # type: ignore[arg-type]


def test_from_ids_and_text_targets(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("So Mary is a doctor")["input_ids"]
    she = tok(" she")["input_ids"][0]
    ds = from_examples(
        [
            Example(ids, ids[:1] + ids[1:], she, " he"),
            Example("So John is", "So Mary is", " he", " she"),
        ],
        tok,
        name="mine",
    )
    assert ds.metric == "logit_diff" and ds.name == "mine" and len(ds) == 2
    assert ds.target_ids[:, 0].tolist() == [she, tok(" he")["input_ids"][0]]
    assert ds.clean_ids.shape == (2, len(ids)) and ds.attention_mask[1].sum() == 3
    assert ds.positions[:, 0].tolist() == [len(ids) - 1, 2]


def test_all_positions_datasets_mask_their_answers(tok: PreTrainedTokenizerFast) -> None:
    ds = from_examples(
        [Example([5, 6, 7], [5, 7, 6], target=[3, None]), Example([5, 6], [6, 5], target=[1])],
        tok,
        all_positions=True,
        skip_first=True,
    )
    assert ds.positions.tolist() == [[1, 2], [1, 0]]
    assert ds.answer_mask.tolist() == [[True, True], [True, False]]
    assert ds.target_ids.tolist() == [[3, -1], [1, -1]]
    with pytest.raises(InvalidArgument) as err:
        from_examples(
            [Example([5, 6], [6, 5], target=[1, 2])], tok, all_positions=True, skip_first=True
        )
    assert err.value.field == "examples[0].target"


def test_batches_trim_and_cover_every_row(tok: PreTrainedTokenizerFast) -> None:
    ds = build_task("ioi", tok, n=23, seed=0)
    batches = list(ds.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    for b in batches:
        assert b.clean_ids.shape[1] == int(b.attention_mask.sum(1).max())
        assert b.positions.shape == (len(b), 1) and b.content_hash
    order = torch.cat([b.clean_ids[:, 0] for b in ds.batches(5, shuffle=True, seed=1)])
    again = torch.cat([b.clean_ids[:, 0] for b in ds.batches(5, shuffle=True, seed=1)])
    assert torch.equal(order, again)
    rows = sorted(
        tuple(b.examples[i].clean for i in range(len(b))) for b in ds.batches(5, shuffle=True)
    )
    assert sorted(ex for r in rows for ex in r) == sorted(ex.clean for ex in ds.examples)
    sub = ds.subset([3, 0])
    assert sub.examples == [ds.examples[3], ds.examples[0]]
    assert torch.equal(sub.target_ids, ds.target_ids[[3, 0]])
    with pytest.raises(InvalidArgument):
        next(ds.batches(0))


# ---- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_round_trip(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    ds = build_task("ioi", tok, n=6, seed=0, split="test")
    path = tmp_path / "ioi.jsonl"
    path.write_text(ds.to_jsonl() + "\n")
    loaded = load_jsonl(path, tok, name="ioi", split="test")
    assert loaded.content_hash == ds.content_hash
    gt_set = build_task("greater_than", tok, n=4, seed=0)
    again = load_jsonl(gt_set.to_jsonl().encode(), tok, name="greater_than")
    assert again.metric == "prob_diff" and again.content_hash == gt_set.content_hash


@pytest.mark.parametrize(
    ("lines", "field", "text"),
    [
        (
            ['{"clean": "So Mary is", "corrupted": "So John is"}', "{oops"],
            "line 2",
            "not valid JSON",
        ),
        (["[1, 2]"], "line 1", "JSON object"),
        (['{"clean": "So Mary is"}'], "line 1.corrupted", "missing"),
        (['{"clean": "a", "corrupted": "b", "answer": 1}'], "line 1.answer", "unknown"),
        (
            ["", '{"clean": "So Mary is", "corrupted": "So John is", "target": " Zed"}'],
            "line 2.target",
            "one token",
        ),
        (
            ['{"clean": "So Mary is", "corrupted": "So John is a"}'],
            "line 1.corrupted",
            "same number",
        ),
        (["", "  "], "dataset", "no examples"),
    ],
)
def test_jsonl_errors_name_the_line(
    tok: PreTrainedTokenizerFast, lines: list[str], field: str, text: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        load_jsonl("\n".join(lines).encode(), tok)
    assert err.value.field == field and text in str(err.value)
    assert str(err.value).startswith(field.split(".")[0]) or field == "dataset"


def test_jsonl_limits(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    line = json.dumps({"clean": "So Mary is", "corrupted": "So John is", "target": " she"}) + "\n"
    with pytest.raises(InvalidArgument) as err:
        load_jsonl((line * 100).encode(), tok, max_bytes=len(line) * 10)
    assert err.value.field == "dataset" and "bytes" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        load_jsonl(tmp_path / "missing.jsonl", tok)
    assert err.value.field == "path"
    streamed = load_jsonl(iter([line, line.encode()]), tok)
    assert len(streamed) == 2 and not streamed.has_distractors
    with pytest.raises(InvalidArgument) as err:
        parse_jsonl([line] * (MAX_EXAMPLES + 1))
    assert err.value.field == "dataset" and str(MAX_EXAMPLES) in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        from_examples([Example([1], [2])] * (MAX_EXAMPLES + 1), tok)
    assert err.value.field == "examples"


@pytest.mark.slow
def test_smollm2_tokenizer_builds_every_task() -> None:
    """SmolLM2 writes numbers digit by digit after a space token: greater-than answers a digit."""
    gguf = smollm2_gguf()
    smol = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert gt.year_format(smol).name == "one_digit"
    for task in sorted(TASKS):
        ds = build_task(task, smol, n=50, seed=0, split="test")
        assert len(ds) == 50 and ds.content_hash
    ioi_set = build_task("ioi", smol, n=200, seed=0)
    assert len({ex.target for ex in ioi_set.examples}) > 20  # many single-token names


# ---- tracr ---------------------------------------------------------------------------------------


def test_tracr_tasks_cover_every_position_after_bos(tok: PreTrainedTokenizerFast) -> None:
    _, tracr_tok = load_tracr(FIXTURES / "reverse")
    sets = {
        split: build_task("tracr_reverse", tracr_tok, n=12, seed=0, split=split) for split in SPLITS
    }
    inputs = [{ex.clean for ex in ds.examples} for ds in sets.values()]
    assert not (inputs[0] & inputs[1] or inputs[0] & inputs[2] or inputs[1] & inputs[2])
    ds = sets["train"]
    lengths = ds.attention_mask.sum(1)  # [N]
    assert torch.equal(ds.answer_mask.sum(1), lengths - 1)  # every position but BOS
    assert ds.positions.shape[1] == tracr_tok.max_seq_len - 1 and not ds.has_targets
    assert all(ex.clean.startswith("BOS ") for ex in ds.examples)
    with pytest.raises(InvalidArgument) as err:
        build_task("ioi", tracr_tok, n=3)
    assert err.value.field == "task"
    with pytest.raises(InvalidArgument) as err:
        build_task("tracr_reverse", tok, n=3)
    assert err.value.field == "task"
