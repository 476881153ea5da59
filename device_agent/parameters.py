"""Parameter dicts: the shared type, layout checks and the global L2 norm.

A *parameter dict* maps a parameter name (the ONNX initializer name, e.g.
``base.0.weight``) to a real-valued numpy array. Models, deltas and
aggregates all use it, for the shared layers only. Every function in
:mod:`sdk.aggregation` and the device-side personalization code check their inputs here, so a wrong key, shape,
dtype or a non-finite value fails loudly with a message naming the parameter
instead of broadcasting silently into a wrong model.

A layout mismatch or a non-finite value is a caller mistake at this level
(``ValueError``): the regional aggregator is expected to validate a decoded
update with :func:`check_update` first and turn the error into a
:class:`~device_agent.errors.RejectedUpdateError` with its own reason code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeAlias

import numpy as np

ParameterDict: TypeAlias = Mapping[str, np.ndarray]
"""Parameter name -> array. Shared layers only."""

Layout: TypeAlias = dict[str, tuple[int, ...]]
"""Parameter name -> shape: what two parameter dicts must agree on."""


def as_real_array(name: str, value: object) -> np.ndarray:
    """``value`` as a numpy array, refusing anything not real-valued (bool, complex, object).

    Raises ``TypeError`` naming the parameter.
    """
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"parameter {name!r}: dtype {arr.dtype} is not a real number type")
    return arr


def as_float32(value: object) -> np.ndarray:
    """``value`` as a float32 ndarray; 0-d results of numpy arithmetic stay arrays, not scalars."""
    return np.asarray(value, dtype=np.float32)


def layout_of(params: ParameterDict) -> Layout:
    """The layout (name -> shape) of a parameter dict; an empty dict for an empty one."""
    if not isinstance(params, Mapping):
        raise TypeError(f"expected a mapping of name -> array, got {type(params).__name__}")
    layout: Layout = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {type(name).__name__}")
        layout[name] = tuple(as_real_array(name, value).shape)
    return layout


def check_layout(expected: Layout, params: ParameterDict, *, what: str = "update") -> None:
    """Raise ``ValueError`` unless ``params`` has exactly the names and shapes of ``expected``.

    The message lists missing and unexpected names, or the first shape that differs.
    """
    actual = layout_of(params)
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing parameters {missing}, unexpected parameters {unexpected}")
    for name, shape in expected.items():
        if actual[name] != shape:
            raise ValueError(f"{what}: parameter {name!r} has shape {actual[name]}, expected {shape}")


def check_finite(params: ParameterDict, *, what: str = "update") -> None:
    """Raise ``ValueError`` naming the first parameter holding a NaN or an infinity."""
    for name, value in params.items():
        if not np.all(np.isfinite(as_real_array(name, value))):
            raise ValueError(f"{what}: parameter {name!r} holds NaN or infinite values")


def check_update(expected: Layout | None, params: ParameterDict, *, what: str = "update") -> Layout:
    """Check ``params`` is a finite, non-empty parameter dict with layout ``expected``.

    ``expected`` None accepts any non-empty layout (the first update of a round
    fixes it). Returns the layout of ``params``.
    """
    layout = layout_of(params)
    if not layout:
        raise ValueError(f"{what}: empty parameter dict")
    if expected is not None:
        check_layout(expected, params, what=what)
    check_finite(params, what=what)
    return layout


def global_norm(params: ParameterDict) -> float:
    """The L2 norm of all tensors flattened into one vector, in float64; 0.0 for an empty dict.

    An infinite or NaN entry makes the result infinite or NaN.
    """
    return norm_of_squares([sum_of_squares(name, value) for name, value in params.items()])


def sum_of_squares(name: str, value: object) -> float:
    """``sum(value**2)`` over one real array, in float64 (inf or NaN when it holds a non-finite entry).

    For float32 and float16 arrays the converse holds too: their squares cannot overflow float64,
    so a finite result proves every entry finite (the aggregators' validator relies on it)."""
    flat = as_real_array(name, value).astype(np.float64, copy=False).ravel()
    return float(np.dot(flat, flat))


def norm_of_squares(squares: list[float]) -> float:
    """The global L2 norm from per-tensor :func:`sum_of_squares`, added in the order given."""
    total = 0.0
    for part in squares:
        total += part
    return math.sqrt(total)


def layout_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """A validated layout from name -> shape; raises ``ValueError`` when empty or a dimension is negative."""
    layout = {str(name): tuple(int(d) for d in shape) for name, shape in shapes.items()}
    if not layout:
        raise ValueError("expected shapes must name at least one parameter")
    for name, shape in layout.items():
        if any(d < 0 for d in shape):
            raise ValueError(f"parameter {name!r}: negative dimension in shape {shape}")
    return layout


def check_positive(value: object, *, what: str) -> float:
    """``value`` as a float, refusing bools, non-numbers, and anything not positive and finite."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    result = float(value)
    if not (math.isfinite(result) and result > 0):
        raise ValueError(f"{what} must be positive and finite, got {result}")
    return result


def check_weight(weight: object, *, what: str = "weight") -> float:
    """``weight`` as a float, refusing bools, non-numbers, NaN, infinities and negatives.

    Zero is allowed: it means "counted, contributes nothing".
    """
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a real number, got {type(weight).__name__}")
    value = float(weight)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value
