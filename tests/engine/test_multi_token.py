"""Multi-token answers: the example format, teacher-forced datasets, and metrics over every answer
token checked against the Hugging Face model's own teacher-forced logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.examples import MAX_ANSWER_TOKENS
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.metrics import evaluate
from edgeprune.engine.tasks import Example, from_examples, parse_jsonl
from edgeprune.engine.tasks.jsonl import load_jsonl

ROWS = [  # results of several tokens in the tiny tokenizer; distractors as long or shorter
    {"clean": "12 + 35 =", "corrupted": "14 + 31 =", "target": " 147", "distractor": " 45",
     "multi_token": True},
    {"clean": "The war lasted from the year", "corrupted": "The war lasted to the year",
     "target": " 1732 to 1740", "distractor": " 1745 to", "multi_token": True},
    {"clean": "So Mary is", "corrupted": "So John is", "target": " she", "distractor": " he"},
]


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def test_teacher_forced_rows(tok: PreTrainedTokenizerFast) -> None:
    examples, _ = parse_jsonl(json.dumps(r) for r in ROWS)
    ds = from_examples(examples, tok)
    widths = []
    for i, row in enumerate(ROWS):
        prompt = _ids(tok, row["clean"])
        answer = _ids(tok, row["clean"] + row["target"])[len(prompt):]
        wrong = _ids(tok, row["clean"] + row["distractor"])[len(prompt):]
        k = len(answer)
        widths.append(k)
        assert int(ds.answer_mask[i].sum()) == k
        assert ds.target_ids[i, :k].tolist() == answer
        assert ds.distractor_ids[i, :k].tolist() == wrong + [-1] * (k - len(wrong))
        n = len(prompt) + k - 1
        assert ds.clean_ids[i, :n].tolist() == prompt + answer[:-1]
        corrupted = _ids(tok, row["corrupted"])
        assert ds.corrupted_ids[i, :n].tolist() == corrupted + answer[:-1]
        assert ds.positions[i, :k].tolist() == list(range(len(prompt) - 1, n))
    assert widths[0] > 1 and widths[1] > 2 and widths[2] == 1
    assert ds.positions.shape[1] == max(widths)
    # the format round-trips; a single-token row stays without the flag
    again = [json.loads(line) for line in ds.to_jsonl().splitlines()]
    assert again == ROWS


def test_token_id_answers(tok: PreTrainedTokenizerFast) -> None:
    prompt = _ids(tok, "12 + 35 =")
    ds = from_examples([Example(prompt, prompt[:-2] + prompt[-1:] * 2, target=[5, 6, 7],
                                distractor=[8], multi_token=True)], tok)
    assert ds.target_ids[0].tolist() == [5, 6, 7] and ds.distractor_ids[0].tolist() == [8, -1, -1]
    assert ds.clean_ids[0].tolist() == prompt + [5, 6]


@pytest.mark.parametrize("row, field, message", [
    ({"distractor": " 1732 to 1740 and more"}, "line 1.distractor", "more than the target's"),
    ({"target": "sa", "clean": "So Li", "corrupted": "So Jo"}, "line 1.target",
     "does not tokenise apart from the prompt"),
    ({"target": None}, "line 1.target", "required with multi_token"),
    ({"multi_token": "yes"}, "line 1.multi_token", "true or false"),
    ({"good": [" 1"], "bad": [" 2"]}, "line 1.good", "do not go with multi_token"),
    ({"target": []}, "line 1.target", "non-empty list"),
    ({"target": list(range(MAX_ANSWER_TOKENS + 1))}, "line 1.target", "more than the limit"),
])
def test_bad_multi_token_rows(tok: PreTrainedTokenizerFast, row: dict, field: str,
                              message: str) -> None:
    base = {"clean": "The war lasted from the year", "corrupted": "The war lasted to the year",
            "target": " 1732 to 1740", "multi_token": True}
    line = json.dumps({k: v for k, v in {**base, **row}.items() if v is not None})
    with pytest.raises(InvalidArgument, match=message) as err:
        load_jsonl([line], tok)
    assert err.value.field == field


def test_multi_token_is_not_an_every_position_answer(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(InvalidArgument, match="every position") as err:
        from_examples([Example("12 + 35 =", "14 + 31 =", target=" 47", multi_token=True)], tok,
                      all_positions=True)
    assert err.value.field == "examples[0].multi_token"


def test_metrics_over_every_answer_token_match_the_hf_model(
    tok: PreTrainedTokenizerFast, tiny_gpt2_dir: Path
) -> None:
    """logit difference averaged over the answer tokens, and KL at each of them, by hand from
    the Hugging Face model run on the prompts extended with the answer (teacher forcing)."""
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).eval()
    model = CircuitModel(hf, tok)
    examples, _ = parse_jsonl(json.dumps(r) for r in ROWS)
    ds = from_examples(examples, tok)
    got = evaluate(model, None, ds, batch_size=2)
    diffs, kls = [], []
    for row in ROWS:
        prompt = _ids(tok, row["clean"])
        answer = _ids(tok, row["clean"] + row["target"])[len(prompt):]
        wrong = _ids(tok, row["clean"] + row["distractor"])[len(prompt):]
        with torch.no_grad():
            clean = hf(torch.tensor([prompt + answer[:-1]])).logits[0]  # [T,V]
            corrupted = hf(torch.tensor([_ids(tok, row["corrupted"]) + answer[:-1]])).logits[0]
        at = range(len(prompt) - 1, len(prompt) - 1 + len(answer))
        per_token = [clean[p, t] - clean[p, d] for p, t, d in zip(at, answer, wrong, strict=False)]
        diffs.append(torch.stack(per_token).mean())
        for p in at:  # all masks 0 with corrupted ablation is the corrupted run
            log_p, log_q = clean[p].log_softmax(-1), corrupted[p].log_softmax(-1)
            kls.append((log_p.exp() * (log_p - log_q)).sum())
    assert got["full_logit_diff"] == pytest.approx(float(torch.stack(diffs).mean()), abs=1e-4)
    assert got["empty_kl"] == pytest.approx(float(torch.stack(kls).mean()), abs=1e-4)
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
