"""Declaring shared and personal parameters fails loudly on any mismatch."""

from __future__ import annotations

import pytest
import torch

from sdk.artifacts import TrainingSpec, generate_training_artifacts
from sdk.model_spec import ParameterSplit, ParameterSplitError, Role, parse_prefixes
from sdk.models import PersonalizedMLP

NAMES = ["base.0.weight", "base.0.bias", "baseline.w", "head.weight", "head.bias"]


def test_split_assigns_by_prefix_not_substring():
    roles = ParameterSplit(shared=("base", "baseline"), personal=("head",)).assign(NAMES)
    assert roles["base.0.weight"] is Role.SHARED and roles["baseline.w"] is Role.SHARED
    assert roles["head.bias"] is Role.PERSONAL


def test_split_star_shares_everything_not_personal():
    roles = ParameterSplit(shared=("*",), personal=("head",)).assign(NAMES)
    assert [n for n, r in roles.items() if r is Role.PERSONAL] == ["head.weight", "head.bias"]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (ParameterSplit(shared=("base", "baseline"), personal=("haed",)), "match no parameter"),
        (ParameterSplit(shared=("base",), personal=("head",)), "baseline.w matches neither"),
        (ParameterSplit(shared=("base", "baseline", "head"), personal=("head.weight",)), "matches both"),
    ],
)
def test_split_mismatch_is_a_clear_error(split, message):
    with pytest.raises(ParameterSplitError, match=message):
        split.assign(NAMES)


def test_split_rejects_same_prefix_in_both_roles():
    with pytest.raises(ParameterSplitError, match="both shared and personal"):
        ParameterSplit(shared=("head",), personal=("head",))


def test_parse_prefixes_cli_form():
    assert parse_prefixes(" base, features ,") == ("base", "features")


@pytest.mark.parametrize(
    ("mode", "mu", "personal", "message"),
    [("fedavg", 0.0, ("head",), "declare no personal"), ("fedalt", 0.0, (), "needs a personal head")],
)
def test_mode_and_split_must_agree(tmp_path, mode, mu, personal, message):
    split = ParameterSplit(shared=("*",), personal=personal)
    with pytest.raises(ValueError, match=message):
        generate_training_artifacts(PersonalizedMLP(4, (3,), 2), example_input=torch.zeros(1, 4), split=split,
                                    spec=TrainingSpec(mode=mode, mu=mu), out_dir=tmp_path)


def test_training_spec_validates_mu():
    with pytest.raises(ValueError, match="fedprox needs mu"):
        TrainingSpec(mode="fedprox", mu=0.0)
    with pytest.raises(ValueError, match="no proximal term"):
        TrainingSpec(mode="fedavg", mu=0.1)
