"""Error feedback: compress ``delta + residual``, keep what was not sent as the next residual.

``corrected = delta + residual`` (float64), ``sent = C(corrected)``,
``residual' = corrected - decoded(sent)``. So ``decoded(sent) + residual' ==
corrected`` and, over rounds, what was sent plus the last residual equals the
sum of the true deltas (up to the float64 rounding of ``delta + residual``,
none at all for deltas on a common binary grid, which the tests use to check
it bit for bit): nothing is lost, only delayed (Seide et al., 2014;
Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019; Stich et al.,
"Sparsified SGD with Memory", NeurIPS 2018). With round-to-nearest
power-of-two quantisation (:mod:`.quantise`) and top-k selection the
subtraction is exact in float64; stochastic rounding is unbiased but its
residual is exact only up to float64 rounding.

The residual is kept in float64: the device's persisted state holds it
(named float64 arrays, backend-neutral: :class:`device_agent.state_store.ResidualFile`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from device_agent.compression.quantise import quantise
from device_agent.compression.sparsify import keep_count, top_k_indices
from device_agent.compression.spec import CompressedTensor, CompressionSpec


@dataclass(frozen=True, kw_only=True)
class CompressedDelta:
    """What to send (``tensors``, by name) and the residual to keep for the next round (float64, by name)."""

    tensors: dict[str, CompressedTensor | np.ndarray]
    residual: dict[str, np.ndarray]


def compress_delta(
    delta: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    spec: CompressionSpec,
    *,
    rng: np.random.Generator | None = None,
) -> CompressedDelta:
    """Compress ``delta + residual`` per tensor by ``spec``; ``residual`` None or missing names count as zero.

    ``rng`` None quantises by rounding to nearest, else stochastically.
    With ``spec`` ``none`` the float32 delta is sent as is and the residual is
    carried over unchanged (nothing is dropped, so nothing new is kept).
    Non-float32 tensors are sent as they are. ValueError on a residual whose
    shape does not match, or on non-finite values.
    """
    residual = residual or {}
    unknown = sorted(set(residual) - set(delta))
    if unknown:
        raise ValueError(f"residual names {unknown[:5]} are not in the delta")
    tensors: dict[str, CompressedTensor | np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    for name in sorted(delta):
        value = np.asarray(delta[name])
        if value.dtype != np.float32:
            tensors[name] = value
            continue
        previous = residual.get(name)
        if previous is not None and previous.shape != value.shape:
            raise ValueError(f"residual {name!r} has shape {previous.shape}, the delta {value.shape}")
        if not spec.enabled:
            tensors[name] = value
            if previous is not None:
                kept[name] = np.array(previous, dtype=np.float64)
            continue
        corrected = value.astype(np.float64) if previous is None else value.astype(np.float64) + previous
        if not np.all(np.isfinite(corrected)):
            raise ValueError(f"delta {name!r} plus its residual has non-finite values")
        packed = _compress_one(corrected, spec, rng)
        tensors[name] = packed
        kept[name] = corrected - packed.to_dense().astype(np.float64)
    return CompressedDelta(tensors=tensors, residual=kept)


def _compress_one(corrected: np.ndarray, spec: CompressionSpec, rng: np.random.Generator | None) -> CompressedTensor:
    flat = corrected.ravel()
    indices = None
    if spec.topk is not None:
        indices = top_k_indices(flat, keep_count(flat.size, spec.topk))
        flat = flat[indices]
    if spec.bits is not None:
        values: object = quantise(flat, bits=spec.bits, block=spec.block, rng=rng)
    else:
        # float32 values: the residual takes the float64 -> float32 rounding too.
        values = flat.astype(np.float32)
    return CompressedTensor(shape=tuple(corrected.shape), indices=indices, values=values)  # type: ignore[arg-type]


def decoded_values(tensors: Mapping[str, CompressedTensor | np.ndarray]) -> dict[str, np.ndarray]:
    """What an aggregator decodes ``tensors`` to: dense arrays by name."""
    return {n: t.to_dense() if isinstance(t, CompressedTensor) else np.array(t) for n, t in tensors.items()}


@dataclass(frozen=True, kw_only=True)
class ResidualState:
    """The device's error-feedback memory after sealing ``round`` of bundle ``bundle_version``.

    ``before``: the residual that round started from; ``after``: what it left
    for the next. Keeping both makes a re-seal of the same round after a crash
    (the trainer saved, the update not yet sealed) start from the same residual.
    """

    bundle_version: int
    round: int
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]


def residual_for(state: ResidualState | None, *, bundle_version: int, round: int) -> dict[str, np.ndarray] | None:
    """The residual to add to ``round``'s delta: ``after`` of an earlier round, ``before`` of this one
    (a re-seal), None for another bundle, nothing saved, or a saved round after ``round``."""
    if state is None or state.bundle_version != bundle_version or state.round > round:
        return None
    return state.before if state.round == round else state.after
