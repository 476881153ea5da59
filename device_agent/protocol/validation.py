"""Validation of authentic updates before an aggregator folds them in, and the replay window.

Authentication (``open_update``) says who sent an update; validation says
whether to count it. Checks run cheapest first and the first failure raises
:class:`RejectedUpdateError` with a reason code from :class:`RejectReason`,
which the aggregator counts and returns in the device's receipt. A
:class:`ReplayWindow` remembers recent (round, nonce) pairs per sender in
bounded memory and exports its state as plain data for the aggregator's store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import numpy as np

from device_agent.errors import RejectedUpdateError
from device_agent.parameters import norm_of_squares, sum_of_squares
from device_agent.protocol.fast_norm import decided_alike, float32_squares
from device_agent.protocol.envelope import OpenedUpdate
from device_agent.protocol.headers import MessageKind, UpdateHeader

#: name -> (shape, dtype name), e.g. ``{"base.0.weight": ((64, 20), "float32")}``.
ParamSpec = Mapping[str, tuple[tuple[int, ...], str]]


class RejectReason(str, Enum):
    """Why an authentic update was not counted (the ``reason`` of RejectedUpdateError)."""

    KIND = "kind"
    FLEET = "fleet"
    REGION = "region"
    WRONG_BUNDLE_VERSION = "wrong_bundle_version"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    TIMESTAMP = "timestamp"
    SAMPLE_COUNT = "sample_count"
    REPLAY = "replay"
    REPLAY_CAPACITY = "replay_capacity"
    MISSING_TENSOR = "missing_tensor"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    DTYPE = "dtype"
    SHAPE = "shape"
    NON_FINITE = "non_finite"
    NORM = "norm"


def _reject(reason: RejectReason, detail: str) -> RejectedUpdateError:
    return RejectedUpdateError(reason.value, detail)


REPLAY_STATE_VERSION = 1


class ReplayWindow:
    """Remembers which (round, nonce) pairs each sender has used, within a window of rounds.

    A sender's floor is ``highest round seen - rounds + 1`` (and never below the
    global floor set by :meth:`advance`); anything older is rejected as
    ``stale_round`` because its nonces are forgotten. Memory is bounded by
    ``max_senders x max_per_sender`` nonces: a sender over its quota loses its
    oldest round (the floor moves past it), and a new sender beyond
    ``max_senders`` is rejected with ``replay_capacity`` rather than evicting
    someone whose nonces would then be replayable. Not thread-safe.
    """

    def __init__(self, *, rounds: int = 8, max_senders: int = 100_000, max_per_sender: int = 64) -> None:
        if rounds < 1 or max_senders < 1 or max_per_sender < 1:
            raise ValueError("rounds, max_senders and max_per_sender must be >= 1")
        self.rounds = rounds
        self.max_senders = max_senders
        self.max_per_sender = max_per_sender
        self._floor = 0
        self._floors: dict[str, int] = {}
        self._seen: dict[str, dict[int, set[bytes]]] = {}

    @property
    def floor(self) -> int:
        """The lowest round any sender may still use (0 until :meth:`advance` moves it)."""
        return self._floor

    def __len__(self) -> int:
        """How many (sender, round, nonce) entries are remembered."""
        return sum(len(nonces) for rounds in self._seen.values() for nonces in rounds.values())

    def check(self, sender: str, round: int, nonce: bytes) -> None:
        """RejectedUpdateError (``stale_round``, ``replay``, ``replay_capacity``) unless the pair is new; records nothing."""
        floor = max(self._floor, self._floors.get(sender, 0))
        if round < floor:
            raise _reject(RejectReason.STALE_ROUND, f"round {round} is older than the replay window (floor {floor})")
        if nonce in self._seen.get(sender, {}).get(round, ()):
            raise _reject(RejectReason.REPLAY, f"nonce {nonce.hex()} of round {round} already seen")
        if sender not in self._floors and len(self._floors) >= self.max_senders:
            raise _reject(RejectReason.REPLAY_CAPACITY, f"the replay window already tracks {self.max_senders} senders")

    def record(self, sender: str, round: int, nonce: bytes) -> None:
        """Check the pair, then remember it."""
        self.check(sender, round, nonce)
        seen = self._seen.setdefault(sender, {})
        self._floors[sender] = max(self._floors.get(sender, 0), round - self.rounds + 1)
        seen.setdefault(round, set()).add(nonce)
        self._prune(sender)
        while sum(len(nonces) for nonces in seen.values()) > self.max_per_sender:
            oldest = min(seen)
            del seen[oldest]
            self._floors[sender] = oldest + 1

    def advance(self, current_round: int) -> None:
        """Forget rounds older than ``current_round - rounds + 1``; the floor never moves back."""
        self._floor = max(self._floor, current_round - self.rounds + 1)
        for sender in list(self._seen):
            self._prune(sender)
            if not self._seen[sender] and self._floors[sender] <= self._floor:
                del self._seen[sender], self._floors[sender]

    def _prune(self, sender: str) -> None:
        floor = max(self._floor, self._floors[sender])
        seen = self._seen[sender]
        for old in [r for r in seen if r < floor]:
            del seen[old]

    def export_state(self) -> dict[str, Any]:
        """The window as plain JSON-ready data (for SQLite or a file); sorted, so equal windows export equal."""
        return {
            "version": REPLAY_STATE_VERSION,
            "rounds": self.rounds,
            "floor": self._floor,
            "senders": {
                sender: {
                    "floor": self._floors[sender],
                    "seen": sorted([r, nonce.hex()] for r, nonces in self._seen[sender].items() for nonce in nonces),
                }
                for sender in sorted(self._floors)
            },
        }

    @classmethod
    def from_state(cls, state: Any, *, max_senders: int = 100_000, max_per_sender: int = 64) -> ReplayWindow:
        """Rebuild a window from :meth:`export_state` data; ValueError if the data is not such a state."""
        try:
            if state["version"] != REPLAY_STATE_VERSION:
                raise ValueError(f"unsupported replay state version {state['version']!r}")
            window = cls(rounds=_int(state["rounds"]), max_senders=max_senders, max_per_sender=max_per_sender)
            window._floor = _int(state["floor"])
            for sender, entry in state["senders"].items():
                if not isinstance(sender, str):
                    raise ValueError("sender ids must be strings")
                window._floors[sender] = _int(entry["floor"])
                seen = window._seen.setdefault(sender, {})
                for r, nonce_hex in entry["seen"]:
                    seen.setdefault(_int(r), set()).add(bytes.fromhex(nonce_hex))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a replay window state: {exc!r}") from exc
        return window


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class UpdateValidator:
    """What an aggregator accepts.

    ``params``: the exact tensors expected (name -> (shape, dtype)).
    ``max_norm``: bound on the L2 norm over all tensors together (None: no bound).
    Rounds ``current_round - max_round_lag .. current_round + max_rounds_ahead`` are accepted.
    ``max_sample_count`` (None: no upper bound; at least 1 is always required).
    ``fleet``, ``region``, ``bundle_version``: required values (None: any).
    ``kind``: ``update`` for a regional aggregator, ``aggregate`` for the root.
    ``max_clock_skew_s``: how far the sender's timestamp may be from ``clock()`` (None: unchecked).
    """

    params: ParamSpec
    max_norm: float | None = None
    max_round_lag: int = 0
    max_rounds_ahead: int = 0
    max_sample_count: int | None = None
    fleet: str | None = None
    region: str | None = None
    bundle_version: int | None = None
    kind: MessageKind = MessageKind.UPDATE
    max_clock_skew_s: float | None = None
    clock: Callable[[], float] = field(default=time.time, compare=False)

    def __post_init__(self) -> None:
        spec = {}
        for name, (shape, dtype) in self.params.items():
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"param {name!r}: negative dimension in {shape}")
            spec[name] = (dims, np.dtype(dtype).name)
        object.__setattr__(self, "params", MappingProxyType(spec))
        object.__setattr__(self, "kind", MessageKind(self.kind))
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError("max_norm must be a positive finite number or None")
        if self.max_round_lag < 0 or self.max_rounds_ahead < 0:
            raise ValueError("max_round_lag and max_rounds_ahead must be >= 0")
        if self.max_sample_count is not None and self.max_sample_count < 1:
            raise ValueError("max_sample_count must be >= 1 or None")

    def validate(self, opened: OpenedUpdate, *, current_round: int, replay: ReplayWindow | None = None) -> None:
        """Raise RejectedUpdateError unless ``opened`` should be counted.

        With a ``replay`` window, an update that passes every check is recorded
        in it (so validating the same update twice rejects the second as ``replay``).
        """
        header = opened.header
        self.check_header(header, current_round)
        if replay is not None:
            replay.check(header.sender, header.round, header.nonce)
        self.check_tensors(opened.tensors)
        if replay is not None:
            replay.record(header.sender, header.round, header.nonce)

    def check_header(self, header: UpdateHeader, current_round: int) -> None:
        """The header checks of :meth:`validate` alone (kind, fleet, region, bundle, round, timestamp, sample count)."""
        for name, expected, got in (
            (RejectReason.KIND, self.kind, header.kind),
            (RejectReason.FLEET, self.fleet, header.fleet),
            (RejectReason.REGION, self.region, header.region),
            (RejectReason.WRONG_BUNDLE_VERSION, self.bundle_version, header.bundle_version),
        ):
            if expected is not None and got != expected:
                field = "bundle_version" if name is RejectReason.WRONG_BUNDLE_VERSION else name.value
                raise _reject(name, f"expected {field} {_plain(expected)!r}, got {_plain(got)!r}")
        if header.round < current_round - self.max_round_lag:
            raise _reject(RejectReason.STALE_ROUND, f"round {header.round} is older than {current_round - self.max_round_lag}")
        if header.round > current_round + self.max_rounds_ahead:
            raise _reject(RejectReason.FUTURE_ROUND, f"round {header.round} is ahead of {current_round + self.max_rounds_ahead}")
        if self.max_clock_skew_s is not None:
            skew = header.timestamp_ms / 1000.0 - self.clock()
            if abs(skew) > self.max_clock_skew_s:
                raise _reject(RejectReason.TIMESTAMP, f"timestamp is {skew:+.1f} s from the aggregator clock")
        if header.sample_count < 1 or (self.max_sample_count is not None and header.sample_count > self.max_sample_count):
            raise _reject(RejectReason.SAMPLE_COUNT, f"sample count {header.sample_count} outside 1..{self.max_sample_count}")

    def check_tensors(self, tensors: Mapping[str, np.ndarray], *, exact_near: tuple[float, ...] = ()) -> float:
        """The tensor checks of :meth:`validate` alone (names, dtypes, shapes, finiteness, norm); returns the
        global L2 norm it measured, for the caller to reuse.

        One pass per tensor gives both its share of the norm and its finiteness: a non-finite entry makes
        the sum of squares non-finite, and only then is the tensor scanned for NaN or Inf (a finite tensor
        whose squares overflow is not ``non_finite``). Float32 tensors are summed by float32 BLAS with a proven
        error bound (:mod:`device_agent.protocol.fast_norm`); the norm is measured again exactly (float64, as
        :func:`~device_agent.parameters.global_norm`, bit for bit) whenever ``max_norm`` or a value in
        ``exact_near`` (the caller's own thresholds, e.g. a clip bound) lies within that bound, so every
        decision is the exact one; otherwise the value returned is within ``~(n + 1) 2**-24`` (relative) of it.
        """
        if missing := sorted(set(self.params) - set(tensors)):
            raise _reject(RejectReason.MISSING_TENSOR, f"missing {missing[:5]}")
        if unexpected := sorted(set(tensors) - set(self.params)):
            raise _reject(RejectReason.UNEXPECTED_TENSOR, f"unexpected {unexpected[:5]}")
        squares: dict[str, float] = {}
        slack = 0.0
        for name, (shape, dtype) in sorted(self.params.items()):
            tensor = tensors[name]
            if tensor.dtype.name != dtype:
                raise _reject(RejectReason.DTYPE, f"{name}: expected {dtype}, got {tensor.dtype.name}")
            if tensor.shape != shape:
                raise _reject(RejectReason.SHAPE, f"{name}: expected {shape}, got {tensor.shape}")
            fast = float32_squares(tensor)
            if fast is not None:
                squares[name], error = fast
                slack += error
                continue
            squares[name] = sum_of_squares(name, tensor)
            if not math.isfinite(squares[name]) and tensor.dtype.kind == "f" and not np.all(np.isfinite(tensor)):
                raise _reject(RejectReason.NON_FINITE, f"{name} has NaN or Inf values")
        norm = norm_of_squares([squares[name] for name in tensors])
        thresholds = exact_near if self.max_norm is None else (self.max_norm, *exact_near)
        if not decided_alike(norm, slack, thresholds):  # too close to call: global_norm's order, bit for bit
            norm = norm_of_squares([sum_of_squares(name, tensors[name]) for name in tensors])
        if self.max_norm is not None and norm > self.max_norm:
            raise _reject(RejectReason.NORM, f"L2 norm {norm:.6g} exceeds {self.max_norm:.6g}")
        return norm


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value
