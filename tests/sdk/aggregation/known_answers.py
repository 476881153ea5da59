"""The known-answer vectors in ``data/known_answers.json``, and a float32-aware comparison.

The JSON was generated once with exact rational arithmetic (``fractions``,
``statistics.median``, sorted lists), independently of the code under test.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).parent / "data" / "known_answers.json"


def params(**arrays: Any) -> dict[str, np.ndarray]:
    """A float32 parameter dict from keyword arguments: ``params(w=[1.0, 2.0], b=0.5)``."""
    return {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}


def as_params(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    """A JSON object of nested lists as a float32 parameter dict."""
    return {name: np.asarray(value, dtype=np.float32) for name, value in raw.items()}


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(DATA.read_text())
    return raw


def known_answers() -> dict[str, Any]:
    """A fresh copy of the known answers with every parameter dict as float32 arrays."""
    raw: dict[str, Any] = json.loads(json.dumps(_raw()))
    raw["updates"] = [as_params(u) for u in raw["updates"]]
    for key in ("weighted_mean", "coordinate_median"):
        raw[key] = as_params(raw[key])
    for key in ("trimmed_mean", "clip_by_norm", "mix_regional"):
        raw[key]["expected"] = as_params(raw[key]["expected"])
    for key in ("by_samples", "uniform"):
        raw["combine_regions"][key] = as_params(raw["combine_regions"][key])
    return raw


def assert_params_close(actual: dict[str, np.ndarray] | None, expected: dict[str, np.ndarray]) -> None:
    """Same names, float32 ndarrays of the expected shapes, values equal to float32 precision."""
    assert actual is not None
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert isinstance(actual[name], np.ndarray), name
        assert actual[name].dtype == np.float32, name
        assert actual[name].shape == value.shape, name
        np.testing.assert_allclose(actual[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
