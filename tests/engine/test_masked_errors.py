"""Bad input to CircuitModel raises InvalidArgument naming the field; unknown families are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from edgeprune.engine.errors import InvalidArgument, UnsupportedArchitecture
from edgeprune.engine.masked import CircuitModel
from tests.engine.masked_models import batch, tiny_models


@pytest.fixture(scope="module")
def model() -> CircuitModel:
    return CircuitModel(tiny_models()["gpt2"])


IDS, CORRUPTED, MASK = batch()


def _bad(**overrides):
    kwargs = {"attention_mask": MASK, "corrupted_ids": CORRUPTED}
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (_bad(corrupted_ids=CORRUPTED[:, :5]), "corrupted_ids"),
        (_bad(corrupted_ids=CORRUPTED[:2]), "corrupted_ids"),
        (_bad(corrupted_ids=None), "corrupted_ids"),
        (_bad(corrupted_ids=CORRUPTED + 1000), "corrupted_ids"),
        (_bad(edge_mask=torch.ones(5)), "edge_mask"),
        (_bad(edge_mask=torch.ones(137, dtype=torch.long)), "edge_mask"),
        (_bad(edge_mask={"tok->a7.h0.q": 0.0}), "edge_mask"),
        (_bad(edge_mask={"m1->m0": 0.0}), "edge_mask"),
        (_bad(edge_mask={"tok->logits": "off"}), "edge_mask"),
        (_bad(edge_mask=[1.0, 0.0]), "edge_mask"),
        (_bad(node_mask=torch.ones(3)), "node_mask"),
        (_bad(node_mask={"a0.h9": 0.0}), "node_mask"),
        (_bad(ablation="random"), "ablation"),
        (_bad(ablation="zero", ablated=torch.zeros(10, 3, 7, 32)), "ablated"),
        (_bad(ablated=torch.zeros(10, 2, 7, 32)), "ablated"),
        (_bad(ablated=torch.zeros(9, 1, 7, 32)), "ablated"),
        (_bad(positions=torch.tensor([0, 1, 7])), "positions"),
        (_bad(positions=torch.tensor([0, -1, 2])), "positions"),
        (_bad(positions=torch.tensor([0, 1])), "positions"),
        (_bad(positions=torch.tensor([0.0, 1.0, 2.0])), "positions"),
        (_bad(attention_mask=MASK[:, :5]), "attention_mask"),
        (_bad(attention_mask=MASK.flip(1)), "attention_mask"),  # left padding
        (_bad(attention_mask=MASK * 2), "attention_mask"),
    ],
)
def test_bad_logits_arguments(model, kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        model.logits(IDS, **kwargs)
    assert err.value.field == field, str(err.value)


@pytest.mark.parametrize(
    "ids",
    [
        IDS.float(),
        IDS[0],
        IDS + 1000,
        -IDS - 1,
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(1, 33, dtype=torch.long),
        [[1, 2, 3]],
    ],
)
def test_bad_input_ids(model, ids):
    for call in (model.logits, model.ablation_outputs, model.mean_ablation, model.reference_logits):
        with pytest.raises(InvalidArgument) as err:
            call(ids)
        assert err.value.field == "input_ids"


def test_ablation_outputs_into_a_given_tensor(model):
    expected = model.ablation_outputs(IDS, attention_mask=MASK)  # [W, B, T, D]
    out = torch.full_like(expected, float("nan"))
    got = model.ablation_outputs(IDS, attention_mask=MASK, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, expected)
    for bad in (
        out[:, :2],  # another shape
        out.double(),  # another dtype
        out.transpose(1, 2).contiguous().transpose(1, 2),  # not contiguous
        out.numpy(),  # not a tensor
    ):
        with pytest.raises(InvalidArgument) as err:
            model.ablation_outputs(IDS, attention_mask=MASK, out=bad)
        assert err.value.field == "out"


def test_unsupported_architecture_names_the_supported_ones():
    opt = OPTForCausalLM(
        OPTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=16,
            vocab_size=20,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(UnsupportedArchitecture) as err:
        CircuitModel(opt)
    message = str(err.value)
    assert "'opt'" in message
    for name in ("gpt2", "gpt_neox", "gemma2", "llama", "qwen2", "mistral", "tracr"):
        assert name in message
    with pytest.raises(UnsupportedArchitecture):
        CircuitModel(nn.Linear(2, 2))
