"""Tied parameters (spec 5.4-5.7), against accelerate."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from accelerate.utils import modeling as upstream
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from bigmodel.tied import (
    check_tied_parameters_in_config,
    check_tied_parameters_on_same_device,
    find_tied_parameters,
    retie_parameters,
)


def two_linears() -> nn.Module:
    return nn.Sequential(OrderedDict(linear1=nn.Linear(4, 4), linear2=nn.Linear(4, 4)))


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


def test_find_tied_parameters_groups_every_name_of_a_parameter() -> None:
    model = two_linears()
    assert find_tied_parameters(model) == []
    model.linear2.weight = model.linear1.weight
    assert find_tied_parameters(model, ignored_keyword=1) == [["linear1.weight", "linear2.weight"]]


def test_find_tied_parameters_of_a_module_used_twice() -> None:
    linear = nn.Linear(4, 4)
    groups = find_tied_parameters(nn.Sequential(linear, linear))
    assert sorted(groups) == [["0.bias", "1.bias"], ["0.weight", "1.weight"]]


def test_find_tied_parameters_matches_accelerate_on_gpt2() -> None:
    model = tiny_gpt2()
    assert find_tied_parameters(model) == upstream.find_tied_parameters(model)
    assert find_tied_parameters(model) == [["lm_head.weight", "transformer.wte.weight"]]


def test_retie_parameters_shares_the_first_non_meta_member() -> None:
    model = two_linears()
    model.linear1.weight = nn.Parameter(torch.ones(4, 4))
    model.linear2.weight = nn.Parameter(torch.zeros(4, 4, device="meta"))
    retie_parameters(model, [["linear2.weight", "linear1.weight"]])
    assert model.linear2.weight is model.linear1.weight
    assert torch.equal(model.linear2.weight.data, torch.ones(4, 4))


def test_retie_parameters_leaves_all_meta_groups_alone() -> None:
    model = two_linears().to("meta")
    before = model.linear2.weight
    retie_parameters(model, [["linear1.weight", "linear2.weight"]])
    assert model.linear2.weight is before and model.linear1.weight is not before


def test_tied_parameters_on_different_devices_log_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    groups = [["linear1.weight", "linear2.weight"]]
    with caplog.at_level(logging.WARNING, logger="bigmodel.tied"):
        check_tied_parameters_on_same_device(groups, {"linear1": 0, "linear2": 0})
        assert caplog.records == []
        check_tied_parameters_on_same_device(groups, {"linear1": 0, "linear2": "cpu"})
    assert len(caplog.records) == 1
    assert "Tied parameters are on different devices" in caplog.records[0].getMessage()
    assert "'linear2.weight': 'cpu'" in caplog.records[0].getMessage()


def test_tied_parameter_devices_resolve_through_parents_and_root() -> None:
    groups = [["block.linear1.weight", "block.linear2.weight"]]
    check_tied_parameters_on_same_device(groups, {"": 0})
    check_tied_parameters_on_same_device(groups, {"block": 1})
    with pytest.raises(ValueError, match="does not contain the module block.linear1.weight"):
        check_tied_parameters_on_same_device(groups, {"other": 0})


def test_check_tied_parameters_in_config() -> None:
    model = tiny_gpt2()
    assert check_tied_parameters_in_config(model) is True
    assert check_tied_parameters_in_config(model) == upstream.check_tied_parameters_in_config(model)
    untied = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, tie_word_embeddings=False)
    )
    assert check_tied_parameters_in_config(untied) == upstream.check_tied_parameters_in_config(
        untied
    )
    assert check_tied_parameters_in_config(two_linears()) is False
