"""Models down as compressed deltas (pure: numpy in, numpy out).

The publisher (a tier that serves a model) keeps :class:`DeltaChain`: the
model its devices reconstruct. Each round it compresses ``target - held``
(the gap from its true model, so what one delta did not carry is carried by
the next: error feedback on the publisher's side, as the simulator's
``Downlink`` does), decodes what it will send exactly as a device will, and
adds it to ``held`` with :func:`add_delta`. A device applies the same bytes
with :func:`apply_model_delta` to the same base, so every device that
applied every delta holds bit for bit the publisher's ``held``; the delta
names its base by round and digest, and the digest of what it makes, so a
device that holds another base (or computed another sum) finds out and takes
the full model instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from device_agent.compression.feedback import compress_delta
from device_agent.compression.spec import CompressedTensor, CompressionSpec
from device_agent.protocol.model_delta import model_digest
from device_agent.protocol.tensor_codec import decode_tensors, encode_tensors


@dataclass(frozen=True, kw_only=True, eq=False)
class HeldModel:
    """A model as devices hold it: float32 tensors by name, the round it starts, its :func:`model_digest`
    (compare digests, not objects: equality is identity)."""

    round: int
    tensors: dict[str, np.ndarray]
    digest: bytes

    @classmethod
    def of(cls, round: int, tensors: Mapping[str, np.ndarray]) -> HeldModel:
        """Hold ``tensors`` (copied) as the model of ``round``."""
        held = {n: np.array(v) for n, v in tensors.items()}
        return cls(round=round, tensors=held, digest=model_digest(held))


def add_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + delta`` per tensor in the base's dtype (float32 + float32: one IEEE rounding, the same everywhere)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found by the caller's finiteness check
        return {n: np.add(v, np.asarray(delta[n], dtype=v.dtype), dtype=v.dtype) for n, v in base.items()}


@dataclass(frozen=True, kw_only=True, eq=False)
class DeltaStep:
    """One published delta: ``tensors`` to encode with ``encoding``, from ``base`` to ``result``."""

    tensors: dict[str, CompressedTensor | np.ndarray]
    encoding: str
    payload: bytes
    base: HeldModel
    result: HeldModel


class DeltaChain:
    """The publisher's side: the model its devices reconstruct (``held``) and the next delta towards a target."""

    def __init__(self, spec: CompressionSpec) -> None:
        if not spec.enabled:
            raise ValueError("a delta chain needs a compression spec other than none")
        self.spec = spec
        #: What a device that applied every delta holds (None before the first model).
        self.held: HeldModel | None = None

    def restart(self, round: int, target: Mapping[str, np.ndarray]) -> HeldModel:
        """Start over from the full ``target`` (first model, another bundle, a gap it cannot bridge)."""
        self.held = HeldModel.of(round, {n: np.asarray(v, dtype=np.float32) for n, v in target.items()})
        return self.held

    def advance(self, round: int, target: Mapping[str, np.ndarray]) -> DeltaStep | None:
        """Move ``held`` towards ``target`` for ``round`` by one compressed delta; None (and a :meth:`restart`)
        when there is no earlier model of the same tensors, the round does not move forward, or the gap is not
        finite. ValueError never escapes: the full model is always the way out."""
        base = self.held
        if base is None or round <= base.round or _layout(base.tensors) != _layout(target):
            self.restart(round, target)
            return None
        gap = {n: np.asarray(target[n], np.float64) - v.astype(np.float64) for n, v in base.tensors.items()}
        try:
            out = compress_delta({n: np.zeros(v.shape, np.float32) for n, v in gap.items()}, gap, self.spec)
        except ValueError:
            self.restart(round, target)
            return None
        payload = encode_tensors(out.tensors, encoding=self.spec.encoding)
        decoded = decode_tensors(payload, encoding=self.spec.encoding)  # exactly what a device will add
        result = HeldModel.of(round, add_delta(base.tensors, decoded))
        self.held = result
        return DeltaStep(tensors=out.tensors, encoding=self.spec.encoding, payload=payload, base=base, result=result)


def _layout(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (tuple(np.shape(v)), np.asarray(v).dtype.name) for n, v in tensors.items()}


@dataclass(frozen=True, kw_only=True, eq=False)
class AppliedDelta:
    """The outcome of :func:`apply_model_delta`: ``model`` when it applied, else ``reason`` (a short code) and
    ``detail`` (one line); the device then takes the full model."""

    model: HeldModel | None
    reason: str | None = None
    detail: str = ""


def apply_model_delta(held: HeldModel | None, delta: Mapping[str, np.ndarray], *, round: int, base_round: int,
                      base_digest: bytes, digest: bytes) -> AppliedDelta:
    """``held + delta`` as the model of ``round`` when ``held`` is the delta's base and the sum is finite and has
    the announced digest. Reasons: ``no_base``, ``base_mismatch``, ``shape``, ``non_finite``, ``digest``."""
    if held is None:
        return AppliedDelta(model=None, reason="no_base", detail=f"no model held; the delta starts from round {base_round}")
    if held.round != base_round or held.digest != base_digest:
        return AppliedDelta(model=None, reason="base_mismatch",
                            detail=f"the delta starts from round {base_round} ({base_digest.hex()[:12]}), "
                                   f"the device holds round {held.round} ({held.digest.hex()[:12]})")
    if _layout(delta) != _layout(held.tensors):
        return AppliedDelta(model=None, reason="shape", detail="delta tensors do not match the held model's")
    if not all(np.all(np.isfinite(v)) for v in delta.values()):
        return AppliedDelta(model=None, reason="non_finite", detail="the delta has NaN or infinite values")
    summed = add_delta(held.tensors, delta)
    if not all(np.all(np.isfinite(v)) for v in summed.values()):
        return AppliedDelta(model=None, reason="non_finite", detail="the delta makes NaN or infinite values")
    result = HeldModel.of(round, summed)
    if result.digest != digest:
        return AppliedDelta(model=None, reason="digest",
                            detail=f"the sum's digest {result.digest.hex()[:12]} is not the announced {digest.hex()[:12]}")
    return AppliedDelta(model=result)
