"""Carrying parameters across bundle versions: by name where the shape matches, finite values only."""

from __future__ import annotations

import numpy as np

from device_agent.release.carry import carry_parameters


def test_carry_keeps_matching_names_and_shapes_and_resets_the_rest() -> None:
    old = {"head.weight": np.ones((2, 3)), "head.bias": np.full(2, np.nan), "base.0.weight": np.ones((4, 4)),
           "gone": np.zeros(1)}
    new = {"head.weight": np.zeros((2, 3), np.float32), "head.bias": np.zeros(2, np.float32),
           "base.0.weight": np.zeros((5, 4), np.float32), "base.1.weight": np.zeros(3, np.float32)}
    carried = carry_parameters(old, new)
    assert carried.kept == ("head.weight",)
    assert carried.reset == ("head.bias", "base.0.weight", "base.1.weight"), "non-finite and reshaped values start afresh"
    assert set(carried.params) == set(new)
    np.testing.assert_array_equal(carried.params["head.weight"], np.ones((2, 3)))
    assert carried.params["head.weight"].dtype == np.float32
    np.testing.assert_array_equal(carried.params["base.0.weight"], new["base.0.weight"])
    assert carried.params["base.0.weight"] is not new["base.0.weight"]
    assert carried.summary() == "kept 1 (head.weight), reset 3 (head.bias, base.0.weight, base.1.weight)"
