"""One algorithm on one dataset: the model is checked against the data and the split before any training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdk.datasets import clients_from_arrays
from sdk.model_spec import ParameterSplit
from sdk.simulation import compare
from sdk.simulation.algorithms import algorithm
from sdk.simulation.runner import ModelSource
from sdk.training_defaults import DEFAULT_LEARNING_RATE


class Net(torch.nn.Module):
    def __init__(self, features: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.base = torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def _clients(features: int = 5) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {f"c{i}": {"x_train": rng.normal(size=(30, features)), "y_train": rng.integers(0, 3, 30),
                      "x_test": rng.normal(size=(10, features)), "y_test": np.arange(10) % 3} for i in range(2)}


def test_model_source_check_names_what_does_not_fit() -> None:
    data = clients_from_arrays(_clients())
    ModelSource(factory=Net, personal=("head",)).check(data, algorithm("fedalt"))  # fits
    with pytest.raises(ValueError, match=r"^split: prefixes match no parameter: \['hed'\]"):
        ModelSource(factory=Net, personal=("hed",)).check(data, algorithm("fedalt"))
    with pytest.raises(ValueError, match=r"^model: Net rejects examples of shape \(5,\): RuntimeError"):
        ModelSource(factory=lambda: Net(features=4), name="Net").check(data, algorithm("fedavg"))
    with pytest.raises(ValueError, match=r"^model: Net returns \(2, 4\) for 2 examples; expected \(2, 3\)"):
        ModelSource(factory=lambda: Net(classes=4), name="Net").check(data, algorithm("fedavg"))
    with pytest.raises(ValueError, match="fedalt keeps a personal head"):
        ModelSource(factory=Net).check(data, algorithm("fedalt"))


def test_compare_refuses_before_training_and_runs_when_it_fits() -> None:
    clients = _clients()
    split = ParameterSplit(shared=("base",), personal=("head",))
    with pytest.raises(ValueError, match="unknown algorithm 'scaffold'"):
        compare(clients, Net, split=split, algorithms=["local", "scaffold"])
    with pytest.raises(ValueError, match="fedalt keeps a personal head"):
        compare(clients, Net, algorithms=["fedavg", "fedalt"])
    with pytest.raises(ValueError, match="rejects examples of shape"):
        compare(_clients(features=6), Net, split=split)
    table = compare(clients, Net, split=split, algorithms=["fedavg", "fedfomo"], rounds=2, fomo_candidates=1)
    assert [r.algorithm for r in table.results] == ["fedavg", "fedfomo"] and table.devices == ("c0", "c1")
    assert table["fedavg"].global_mean is not None and table["fedfomo"].global_mean is None
    assert table["fedfomo"].fomo_kept_own is not None and table["fedavg"].fomo_kept_own is None
    assert table.settings["learning_rate"] == DEFAULT_LEARNING_RATE and "fedfomo kept only its own model" in str(table)
    with pytest.raises(KeyError, match="was not compared"):
        table["local"]
