"""Group commit with two members on one real SQLite file (regression tests from the review of an intake that folded
each update as it was admitted; that intake was measured and reverted, these hold for the batch intake).

The intake looks the batch's senders up in the store before it validates (a repeat is answered first, whichever
member counted the first). An acceptance another member commits between that lookup and this member's commit is
found at the commit, and the kept updates are refolded: the tests below make that race happen at a chosen point (a
hook on the key lookup of a later update). Each answer here is what the exactly-once rules of docs/protocol.md
("Rounds, resends and replays") ask for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.keys import key_id, save_public_key
from device_agent.protocol.validation import ReplayWindow
from sdk.aggregator import IncomingUpdate, RegionalAggregator, Verdict
from sdk.aggregator import round_cache
from sdk.aggregator.registry import REVOKED_FILE, KeyRegistry
from tests.sdk.aggregator import scenario

QUORUM = scenario.RoundPolicy(quorum=50, deadline_s=60.0)


@pytest.fixture
def updates() -> list[scenario.DeviceUpdate]:
    return scenario.device_updates(count=5, seed=23)


def _pair(open_region: Callable[..., RegionalAggregator], **overrides: object) -> tuple[RegionalAggregator, RegionalAggregator]:
    """Members ``a`` and ``b`` of region eu on one store, round 0 started by ``a``."""
    a = open_region(db="shared.sqlite", member="a", policy=QUORUM, **overrides)
    a.start_round(0, scenario.initial_model())
    b = open_region(db="shared.sqlite", member="b", policy=QUORUM, **overrides)
    return a, b


def _batch(region: RegionalAggregator, *blobs: bytes) -> list[tuple[Verdict, str]]:
    return [(h.verdict, h.reason) for h in region.handle_updates([IncomingUpdate(blob=b) for b in blobs])]


def test_group_commit_resend_of_the_other_members_acceptance_is_a_duplicate_and_the_refold_is_exact(
        open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate],
        monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = [scenario.seal(u) for u in updates]
    a, b = _pair(open_region)
    # b counts blobs[0] after a looked its batch up: a's commit finds b's row (a conflict), refolds blobs[1] and
    # blobs[2] alone, and the next pass answers blobs[0] a duplicate (only that path can: the lookup saw nothing).
    _after_lookup(a, lambda: _accepted(b, blobs[0]), monkeypatch)
    assert _batch(a, blobs[0], blobs[1], blobs[2]) == [(Verdict.DUPLICATE, ""), (Verdict.ACCEPTED, ""), (Verdict.ACCEPTED, "")]
    assert a.status().accepted == 3 and a.status().counters["duplicate"] == 1
    merged = a._intake.merge(0)
    # The same acceptances folded one at a time (b: blobs[0]; a: blobs[1], then blobs[2]) on another store.
    c = open_region(db="reference.sqlite", member="a", policy=QUORUM)
    c.start_round(0, scenario.initial_model())
    d = open_region(db="reference.sqlite", member="b", policy=QUORUM)
    assert [d.handle_update(blobs[0]).verdict, c.handle_update(blobs[1]).verdict, c.handle_update(blobs[2]).verdict] == \
        [Verdict.ACCEPTED] * 3
    reference = c._intake.merge(0)
    assert merged.mean_delta is not None and reference.mean_delta is not None
    assert (merged.update_count, merged.sample_count) == (reference.update_count, reference.sample_count) == \
        (3, sum(u.samples for u in updates[:3]))
    for name, value in reference.mean_delta.items():
        np.testing.assert_array_equal(merged.mean_delta[name], value)


def test_group_commit_a_second_update_of_a_sender_the_other_member_counted_is_already_counted_even_when_invalid(
        open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate]) -> None:
    a, b = _pair(open_region)
    assert _batch(b, scenario.seal(updates[0])) == [(Verdict.ACCEPTED, "")]
    too_long = {name: value * 1000 for name, value in updates[0].delta.items()}
    second = scenario.seal(updates[0], nonce=scenario.random_nonce(), delta=too_long)
    # The pipeline answers "already counted" before it validates (intake docstring; docs/protocol.md): a sender that
    # has an update counted in the current round hears already_counted, whichever member it reaches.
    assert _batch(b, second) == [(Verdict.REJECTED, "already_counted")]
    assert _batch(a, second) == [(Verdict.REJECTED, "already_counted")]


def test_group_commit_round_closed_by_the_other_member_answers_resends_and_newcomers_as_before(
        open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate]) -> None:
    blobs = [scenario.seal(u) for u in updates]
    a, b = _pair(open_region)
    assert _batch(b, blobs[0]) == [(Verdict.ACCEPTED, "")]
    assert a.status().accepted == 1  # a has read the round before b closes it
    b.close_round()
    assert _batch(a, blobs[0], scenario.seal(updates[0], nonce=scenario.random_nonce()), blobs[1]) == [
        (Verdict.DUPLICATE, ""), (Verdict.REJECTED, "already_counted"), (Verdict.REJECTED, "stale_round")]


def _after_lookup(region: RegionalAggregator, action: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``action`` once, right after ``region`` looked its batch's senders up in the store and before its commit:
    the window in which another member's commit (or a SIGHUP reload thread) races this member's batch."""
    store = region._intake._store
    lookup = store.find_acceptances
    pending = [action]

    def find_then_act(round: int, senders: object) -> object:
        found = lookup(round, senders)  # type: ignore[arg-type]
        while pending:
            pending.pop()()
        return found

    monkeypatch.setattr(store, "find_acceptances", find_then_act)


def test_group_commit_round_closed_under_the_commit_answers_every_update_stale(
        open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate],
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _pair(open_region)
    assert _batch(b, scenario.seal(updates[0])) == [(Verdict.ACCEPTED, "")]
    _after_lookup(a, b.close_round, monkeypatch)  # b closes round 0 between a's lookup and a's commit
    answers = _batch(a, scenario.seal(updates[1]), scenario.seal(updates[2]), scenario.seal(updates[0]))
    assert answers == [(Verdict.REJECTED, "stale_round"), (Verdict.REJECTED, "stale_round"), (Verdict.DUPLICATE, "")]
    assert a.status().accepted == 1 and b._intake.merge(0).update_count == 1


def test_group_commit_a_key_revoked_while_a_batch_is_refolded_still_answers_the_batch(
        open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    keys_dir = tmp_path / "devices"
    keys_dir.mkdir()
    for u in updates:
        save_public_key(scenario.signing_key(u.device).public_key(), keys_dir / f"{u.device}.pub")
    registry = KeyRegistry(keys_dir)
    blobs = [scenario.seal(u) for u in updates]
    a, b = _pair(open_region, device_keys=registry)

    def race() -> None:  # after a's lookup: b counts blobs[0], and updates[1]'s device is removed (SIGHUP reload)
        _accepted(b, blobs[0])
        (keys_dir / REVOKED_FILE).write_text(f"{key_id(scenario.signing_key(updates[1].device).public_key())} removed\n")
        assert registry.reload() is not None

    _after_lookup(a, race, monkeypatch)
    # a's commit conflicts on blobs[0] and refolds the others from the tensors it holds: blobs[1] authenticated when
    # it arrived and counts, although its key is revoked now (the next update from that device will not).
    answers = _batch(a, blobs[0], blobs[1], blobs[2])
    assert answers == [(Verdict.DUPLICATE, ""), (Verdict.ACCEPTED, ""), (Verdict.ACCEPTED, "")]
    assert a.status().accepted == 3
    assert _batch(a, scenario.seal(updates[1], nonce=scenario.random_nonce())) == [(Verdict.REJECTED, "auth")]


def _accepted(region: RegionalAggregator, blob: bytes) -> None:
    assert _batch(region, blob) == [(Verdict.ACCEPTED, "")]


class _SmallWindow(ReplayWindow):
    """A real replay window with room for two senders (the default holds 100 000: the same rule, reachable here)."""

    def __init__(self, *, rounds: int = 8, max_senders: int = 2, max_per_sender: int = 64) -> None:
        super().__init__(rounds=rounds, max_senders=2, max_per_sender=max_per_sender)

    @classmethod
    def from_state(cls, state: object, *, max_senders: int = 2, max_per_sender: int = 64) -> ReplayWindow:
        window = ReplayWindow.from_state(state, max_senders=2, max_per_sender=max_per_sender)
        small = cls(rounds=window.rounds)
        small.__dict__.update(window.__dict__, max_senders=2)
        return small


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(round_cache, "ReplayWindow", _SmallWindow)
    yield


def test_group_commit_window_at_capacity_resend_after_close_is_a_duplicate(
        open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate],
        request: pytest.FixtureRequest) -> None:
    blobs = [scenario.seal(u) for u in updates]
    b = open_region(db="shared.sqlite", member="b", policy=QUORUM)
    b.start_round(0, scenario.initial_model())
    assert _batch(b, *blobs[:3]) == [(Verdict.ACCEPTED, "")] * 3
    request.getfixturevalue("small_windows")
    a = open_region(db="shared.sqlite", member="a", policy=QUORUM)  # its window remembers 2 of the 3 senders
    assert len(a._intake._window) == 2  # the third sender's acceptance is not in it
    assert _batch(a, blobs[2]) == [(Verdict.DUPLICATE, "")]  # collecting: the store lookup finds b's row
    b.close_round()
    # Closed and not yet replaced: an exact resend is acknowledged again (its receipt may have been lost).
    assert _batch(a, blobs[2]) == [(Verdict.DUPLICATE, "")]
    assert _batch(a, scenario.seal(updates[2], nonce=scenario.random_nonce())) == [(Verdict.REJECTED, "already_counted")]
    assert a.status().accepted == 3


def test_group_commit_a_batch_of_the_other_members_acceptances_is_answered_within_the_attempts(
        open_region: Callable[..., RegionalAggregator]) -> None:
    updates = scenario.device_updates(count=8, seed=29)
    blobs = [scenario.seal(u) for u in updates]
    a, b = _pair(open_region)
    assert _batch(b, *blobs[:6]) == [(Verdict.ACCEPTED, "")] * 6
    # Every sender b took, three times over (exact, exact, another nonce), and two newcomers twice: the store lookups
    # answer b's senders; the second copy of a newcomer waits for the first's commit.
    batch = [*blobs[:6], *blobs[:6], *(scenario.seal(u, nonce=bytes(16)) for u in updates[:6]), blobs[6], blobs[7], blobs[7]]
    answers = _batch(a, *batch)
    assert answers == [(Verdict.DUPLICATE, "")] * 12 + [(Verdict.REJECTED, "already_counted")] * 6 + \
        [(Verdict.ACCEPTED, ""), (Verdict.ACCEPTED, ""), (Verdict.DUPLICATE, "")]
    assert a.status().accepted == 8
