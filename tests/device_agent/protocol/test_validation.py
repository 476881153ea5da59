"""Update validation (each reject reason) and the bounded, persistable replay window."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from device_agent.errors import RejectedUpdateError
from device_agent.parameters import global_norm
from device_agent.protocol.envelope import OpenedUpdate
from device_agent.protocol.headers import MessageKind, UpdateHeader
from device_agent.protocol.validation import RejectReason, ReplayWindow, UpdateValidator

SPEC = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}
NOW = 1_700_000_000.0


@pytest.fixture
def validator() -> UpdateValidator:
    return UpdateValidator(
        params=SPEC, max_norm=10.0, max_round_lag=1, max_rounds_ahead=0, max_sample_count=1000,
        fleet="demo", region="eu", bundle_version=3, max_clock_skew_s=60.0, clock=lambda: NOW,
    )


def _update(make_header: Callable[..., UpdateHeader], tensors: dict[str, np.ndarray] | None = None, **header: Any) -> OpenedUpdate:
    tensors = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)} if tensors is None else tensors
    fields: dict[str, Any] = {"timestamp_ms": int(NOW * 1000)}
    fields.update(header)
    return OpenedUpdate(header=make_header(**fields), tensors=tensors, sender_key_id="00" * 8)


def _tensors(**changes: np.ndarray) -> dict[str, np.ndarray]:
    out = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    out.update(changes)
    return out


def test_validator_accepts_a_good_update(validator: UpdateValidator, make_header: Callable[..., UpdateHeader]) -> None:
    validator.validate(_update(make_header), current_round=5)
    validator.validate(_update(make_header, round=4), current_round=5)


CASES: list[tuple[RejectReason, dict[str, Any], dict[str, np.ndarray] | None]] = [
    (RejectReason.KIND, {"kind": MessageKind.AGGREGATE}, None),
    (RejectReason.FLEET, {"fleet": "other"}, None),
    (RejectReason.REGION, {"region": "us"}, None),
    (RejectReason.WRONG_BUNDLE_VERSION, {"bundle_version": 2}, None),
    (RejectReason.STALE_ROUND, {"round": 3}, None),
    (RejectReason.FUTURE_ROUND, {"round": 6}, None),
    (RejectReason.TIMESTAMP, {"timestamp_ms": int((NOW + 61) * 1000)}, None),
    (RejectReason.TIMESTAMP, {"timestamp_ms": int((NOW - 61) * 1000)}, None),
    (RejectReason.SAMPLE_COUNT, {"sample_count": 0}, None),
    (RejectReason.SAMPLE_COUNT, {"sample_count": 1001}, None),
    (RejectReason.MISSING_TENSOR, {}, {"w": np.zeros((2, 3), np.float32)}),
    (RejectReason.UNEXPECTED_TENSOR, {}, _tensors(extra=np.zeros(1, np.float32))),
    (RejectReason.DTYPE, {}, _tensors(b=np.zeros(3, np.float64))),
    (RejectReason.SHAPE, {}, _tensors(w=np.zeros((3, 2), np.float32))),
    (RejectReason.NON_FINITE, {}, _tensors(b=np.array([0, np.nan, 0], np.float32))),
    (RejectReason.NON_FINITE, {}, _tensors(w=np.full((2, 3), -np.inf, np.float32))),
    (RejectReason.NORM, {}, _tensors(w=np.full((2, 3), 4.1, np.float32))),
]


@pytest.mark.parametrize(("reason", "header", "tensors"), CASES, ids=[f"{c[0].value}-{i}" for i, c in enumerate(CASES)])
def test_validator_rejects_with_reason(
    validator: UpdateValidator, make_header: Callable[..., UpdateHeader],
    reason: RejectReason, header: dict[str, Any], tensors: dict[str, np.ndarray] | None,
) -> None:
    with pytest.raises(RejectedUpdateError) as caught:
        validator.validate(_update(make_header, tensors, **header), current_round=5)
    assert caught.value.reason == reason.value and caught.value.detail


def test_validator_norm_is_over_all_tensors_together(validator: UpdateValidator, make_header: Callable[..., UpdateHeader]) -> None:
    just_under = _tensors(w=np.full((2, 3), 4.0, np.float32), b=np.full(3, 0.9, np.float32))  # sqrt(96 + 2.43) < 10
    validator.validate(_update(make_header, just_under), current_round=5)
    over = _tensors(w=np.full((2, 3), 4.0, np.float32), b=np.full(3, 1.2, np.float32))  # sqrt(96 + 4.32) > 10
    with pytest.raises(RejectedUpdateError, match="norm"):
        validator.validate(_update(make_header, over), current_round=5)


def test_validator_optional_checks_off_accept_anything_structurally_right(make_header: Callable[..., UpdateHeader]) -> None:
    lenient = UpdateValidator(params=SPEC)
    big = _tensors(w=np.full((2, 3), 1e6, np.float32))
    lenient.validate(_update(make_header, big, timestamp_ms=0, sample_count=10**9), current_round=5)


def test_check_tensors_returns_the_global_norm_bit_for_bit_near_a_threshold_and_close_to_it_elsewhere() -> None:
    rng = np.random.default_rng(7)
    tensors = {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    exact = global_norm(tensors)
    assert UpdateValidator(params=SPEC).check_tensors(tensors) == pytest.approx(exact, rel=1e-6)  # float32 BLAS
    assert UpdateValidator(params=SPEC, max_norm=exact).check_tensors(tensors) == exact  # at the bound: measured exactly
    assert UpdateValidator(params=SPEC).check_tensors(tensors, exact_near=(exact * (1 + 1e-7),)) == exact


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_tensors_finds_a_non_finite_value_without_a_norm_bound(bad: float) -> None:
    """Finiteness is read off the sum of squares: a NaN or Inf anywhere is still named, with or without ``max_norm``."""
    b = np.array([0.0, 1.0, 2.0], np.float32)
    b[1] = bad
    with pytest.raises(RejectedUpdateError) as caught:
        UpdateValidator(params=SPEC).check_tensors(_tensors(b=b))
    assert caught.value.reason == RejectReason.NON_FINITE.value and "b" in caught.value.detail


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_check_tensors_a_huge_but_finite_float64_tensor_is_not_non_finite() -> None:
    """float64 squares can overflow while every value is finite: that is a norm of inf, not ``non_finite``."""
    spec = {"w": ((2,), "float64")}
    huge = {"w": np.array([1e200, -1e200], np.float64)}
    assert UpdateValidator(params=spec).check_tensors(huge) == math.inf
    with pytest.raises(RejectedUpdateError) as caught:
        UpdateValidator(params=spec, max_norm=1.0).check_tensors(huge)
    assert caught.value.reason == RejectReason.NORM.value


def test_validator_records_accepted_updates_in_the_replay_window(validator: UpdateValidator, make_header: Callable[..., UpdateHeader]) -> None:
    window = ReplayWindow(rounds=4)
    update = _update(make_header)
    validator.validate(update, current_round=5, replay=window)
    with pytest.raises(RejectedUpdateError, match="^replay"):
        validator.validate(update, current_round=5, replay=window)


def test_validator_does_not_record_rejected_updates(validator: UpdateValidator, make_header: Callable[..., UpdateHeader]) -> None:
    window = ReplayWindow()
    with pytest.raises(RejectedUpdateError, match="norm"):
        validator.validate(_update(make_header, _tensors(w=np.full((2, 3), 9.0, np.float32))), current_round=5, replay=window)
    assert len(window) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_norm": 0.0}, {"max_norm": float("inf")}, {"max_round_lag": -1}, {"max_sample_count": 0}, {"params": {"w": ((-1,), "float32")}}, {"params": {"w": ((1,), "floaty")}}],
)
def test_validator_rejects_bad_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        UpdateValidator(**{"params": SPEC, **kwargs})


# --- replay window -------------------------------------------------------------------------


def _nonce(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_replay_window_rejects_repeats_and_accepts_new_nonces() -> None:
    window = ReplayWindow()
    window.record("dev-1", 5, _nonce(1))
    window.record("dev-1", 5, _nonce(2))
    window.record("dev-2", 5, _nonce(1))
    with pytest.raises(RejectedUpdateError) as caught:
        window.record("dev-1", 5, _nonce(1))
    assert caught.value.reason == "replay"


def test_replay_window_rejects_rounds_older_than_the_window() -> None:
    window = ReplayWindow(rounds=3)
    window.record("dev-1", 10, _nonce(1))
    window.record("dev-1", 8, _nonce(2))
    with pytest.raises(RejectedUpdateError) as caught:
        window.record("dev-1", 7, _nonce(3))
    assert caught.value.reason == "stale_round"


def test_replay_window_advance_forgets_old_rounds_and_senders() -> None:
    window = ReplayWindow(rounds=2)
    for device in range(50):
        window.record(f"dev-{device}", 1, _nonce(device))
    window.advance(10)
    assert len(window) == 0 and window.export_state()["senders"] == {}
    with pytest.raises(RejectedUpdateError, match="stale_round"):
        window.check("dev-3", 1, _nonce(3))
    window.advance(5)
    assert window.floor == 9


def test_replay_window_memory_per_sender_is_bounded() -> None:
    window = ReplayWindow(rounds=100, max_per_sender=4)
    for i in range(20):
        window.record("dev-1", i, _nonce(i))
    assert len(window) == 4
    with pytest.raises(RejectedUpdateError, match="stale_round"):
        window.check("dev-1", 15, _nonce(15))  # forgotten, so refused rather than replayable
    window.check("dev-1", 19, _nonce(99))


def test_replay_window_refuses_new_senders_beyond_capacity() -> None:
    window = ReplayWindow(max_senders=2)
    window.record("dev-1", 1, _nonce(1))
    window.record("dev-2", 1, _nonce(1))
    with pytest.raises(RejectedUpdateError) as caught:
        window.record("dev-3", 1, _nonce(1))
    assert caught.value.reason == "replay_capacity"
    window.record("dev-1", 2, _nonce(2))


def test_replay_window_state_survives_export_and_import_as_json() -> None:
    window = ReplayWindow(rounds=4)
    window.record("dev-1", 5, _nonce(1))
    window.record("dev-2", 6, _nonce(2))
    window.advance(5)
    state = json.loads(json.dumps(window.export_state()))
    restored = ReplayWindow.from_state(state)
    assert restored.export_state() == window.export_state()
    with pytest.raises(RejectedUpdateError, match="^replay"):
        restored.check("dev-1", 5, _nonce(1))
    with pytest.raises(RejectedUpdateError, match="stale_round"):
        restored.check("dev-9", 1, _nonce(1))


@pytest.mark.parametrize(
    "state",
    [
        None,
        {},
        {"version": 2, "rounds": 4, "floor": 0, "senders": {}},
        {"version": 1, "rounds": -1, "floor": 0, "senders": {}},
        {"version": 1, "rounds": 4, "floor": 0, "senders": {"d": {"floor": 0, "seen": [[1, "zz"]]}}},
        {"version": 1, "rounds": 4, "floor": 0, "senders": {"d": {"floor": True, "seen": []}}},
    ],
)
def test_replay_window_from_state_rejects_garbage(state: Any) -> None:
    with pytest.raises(ValueError):
        ReplayWindow.from_state(state)
