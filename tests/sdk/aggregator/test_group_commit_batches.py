"""Batches against the same updates handled one at a time, on real stores (regression tests from the review of an
intake that folded each update as it was admitted; measured and reverted, see docs/benchmarks.md).

Every comparison is bit for bit: a batch (and its refold when the transaction keeps fewer updates than it folded)
must give exactly what folding the accepted updates one by one gives, under every aggregation rule, with clipping
binding, and with FedFomo on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from sdk.aggregation import AggregationConfig
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregator import IncomingUpdate, RegionalAggregator, Verdict
from tests.sdk.aggregator import scenario

QUORUM = scenario.RoundPolicy(quorum=500, deadline_s=60.0)
#: Fixed bound 0.8: this scenario's deltas have norms ~2, so every update is clipped.
TIGHT = InfluencePolicy(norm="fixed", norm_bound=0.8, weight="fixed", max_sample_count=1_000_000)
#: Sample counts above 60 are capped: the weight bound binds too.
CAPPED = InfluencePolicy(norm="fixed", norm_bound=scenario.NORM_BOUND, weight="fixed", max_sample_count=60)

CONFIGS: dict[str, dict[str, Any]] = {
    "mean": {},
    "mean-clipped": {"influence": TIGHT},
    "mean-capped": {"influence": CAPPED},
    "median": {"aggregation": AggregationConfig(rule="median")},
    "trimmed-mean-clipped": {"aggregation": AggregationConfig(rule="trimmed_mean", trim_fraction=0.2), "influence": TIGHT},
    "fedfomo": {"fomo_candidates": 4},
}


def _answers(handled: list[Any]) -> list[tuple[Verdict, str]]:
    return [(h.verdict, h.reason) for h in handled]


def _same_round(left: RegionalAggregator, right: RegionalAggregator) -> None:
    """Both stores' round 0: the same counts, counters and merged result, bit for bit."""
    one, two = left._intake.merge(0), right._intake.merge(0)
    assert (one.update_count, one.sample_count) == (two.update_count, two.sample_count)
    assert (one.mean_delta is None) == (two.mean_delta is None)
    for name, value in (two.mean_delta or {}).items():
        np.testing.assert_array_equal((one.mean_delta or {})[name], value)
    a, b = left.status(), right.status()
    assert (a.accepted, a.samples, a.rejections(), a.counters.get("duplicate"), a.counters.get("clipped:norm"),
            a.counters.get("clipped:sample_count")) == \
        (b.accepted, b.samples, b.rejections(), b.counters.get("duplicate"), b.counters.get("clipped:norm"),
         b.counters.get("clipped:sample_count"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_group_commit_batch_with_a_conflict_equals_one_at_a_time(
        open_region: Callable[..., RegionalAggregator], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = CONFIGS[name]
    updates = scenario.device_updates(count=6, seed=31)
    blobs = [scenario.seal(u) for u in updates]

    def pair(db: str, *, race: bool) -> tuple[RegionalAggregator, RegionalAggregator]:
        # race: b counts blobs[0] after a looked its batch up (a conflict at a's commit: the refold path).
        # Otherwise b counts it before a starts (a's lookup answers it).
        a = open_region(db=db, member="a", policy=QUORUM, **overrides)
        a.start_round(0, scenario.initial_model())
        b = open_region(db=db, member="b", policy=QUORUM, **overrides)
        if race:
            store, lookup, pending = a._intake._store, a._intake._store.find_acceptances, [blobs[0]]

            def find_then_race(round: int, senders: object) -> object:
                found = lookup(round, senders)  # type: ignore[arg-type]
                while pending:
                    assert b.handle_update(pending.pop()).verdict is Verdict.ACCEPTED
                return found

            monkeypatch.setattr(store, "find_acceptances", find_then_race)
        else:
            assert b.handle_update(blobs[0]).verdict is Verdict.ACCEPTED
        return a, b

    a, _ = pair("batch.sqlite", race=True)
    # blobs[0] is taken by b during the batch, blobs[2] comes twice, 5 is too long.
    too_long = scenario.seal(updates[5], delta={k: v * 1000 for k, v in updates[5].delta.items()})
    batch = [blobs[0], blobs[1], blobs[2], too_long, blobs[3], blobs[2], blobs[4]]
    handled = a.handle_updates([IncomingUpdate(blob=b) for b in batch])
    one, _ = pair("one.sqlite", race=False)
    singles = [one.handle_update(b) for b in batch]
    assert _answers(handled) == _answers(singles) == [
        (Verdict.DUPLICATE, ""), (Verdict.ACCEPTED, ""), (Verdict.ACCEPTED, ""), (Verdict.REJECTED, "norm"),
        (Verdict.ACCEPTED, ""), (Verdict.DUPLICATE, ""), (Verdict.ACCEPTED, "")]
    _same_round(a, one)
    if name == "mean-clipped":
        assert a.status().counters["clipped:norm"] == 4
    if name == "mean-capped":
        assert a.status().counters["clipped:sample_count"] >= 1
    if name == "fedfomo":  # each accepted device's delta is handed on, as sent; the pool holds each device's model
        for h, blob_index in zip(handled, (None, 1, 2, None, 3, None, 4)):
            if blob_index is None:
                assert h.delta is None
                continue
            assert h.delta is not None
            for tensor, value in updates[blob_index].delta.items():
                np.testing.assert_array_equal(h.delta[tensor], value)
        assert sorted(d for d in (u.device for u in updates[1:5]) if d in a.candidates) == [u.device for u in updates[1:5]]


def test_group_commit_two_updates_of_one_sender_in_one_batch(open_region: Callable[..., RegionalAggregator]) -> None:
    updates = scenario.device_updates(count=3, seed=37)
    u = updates[0]
    other = {k: v + 1 for k, v in u.delta.items()}
    cases = [
        ([scenario.seal(u), scenario.seal(u)], [(Verdict.ACCEPTED, ""), (Verdict.DUPLICATE, "")]),
        ([scenario.seal(u), scenario.seal(u, nonce=b"n" * 16)], [(Verdict.ACCEPTED, ""), (Verdict.REJECTED, "already_counted")]),
        ([scenario.seal(u), scenario.seal(u, delta=other)], [(Verdict.ACCEPTED, ""), (Verdict.REJECTED, "replay")]),
        ([scenario.seal(u, delta={k: v * 1000 for k, v in u.delta.items()}), scenario.seal(u)],
         [(Verdict.REJECTED, "norm"), (Verdict.ACCEPTED, "")]),
        ([scenario.seal(u, round=1), scenario.seal(u, nonce=b"m" * 16)],
         [(Verdict.REJECTED, "future_round"), (Verdict.ACCEPTED, "")]),
        ([scenario.seal(u), scenario.seal(u), scenario.seal(u, nonce=b"k" * 16), scenario.seal(u)],
         [(Verdict.ACCEPTED, ""), (Verdict.DUPLICATE, ""), (Verdict.REJECTED, "already_counted"), (Verdict.DUPLICATE, "")]),
    ]
    for i, (blobs, expected) in enumerate(cases):
        region = open_region(db=f"case{i}.sqlite", policy=QUORUM)
        region.start_round(0, scenario.initial_model())
        one = open_region(db=f"one{i}.sqlite", policy=QUORUM)
        one.start_round(0, scenario.initial_model())
        handled = _answers(region.handle_updates([IncomingUpdate(blob=b) for b in [*blobs, scenario.seal(updates[1])]]))
        assert handled == _answers([one.handle_update(b) for b in [*blobs, scenario.seal(updates[1])]])
        assert handled[:-1] == expected, i
        _same_round(region, one)


KINDS = ("fresh", "resend", "other_nonce", "other_content", "stale", "future", "norm", "malformed", "auth", "wrong_topic")


def mixed_batches(seed: int, batches: int = 12) -> list[list[IncomingUpdate]]:
    """Seeded batches mixing fresh updates, exact resends, second updates, replays and every early refusal."""
    rng = np.random.default_rng(seed)
    updates = scenario.device_updates(count=8, seed=seed)
    sent: list[int] = []
    out = []
    for _ in range(batches):
        batch = []
        for _ in range(int(rng.integers(1, 9))):
            kind = KINDS[int(rng.integers(len(KINDS)))]
            i = int(rng.integers(len(updates)))
            u = updates[i]
            if kind == "resend" and sent:
                blob = scenario.seal(updates[sent[int(rng.integers(len(sent)))]], round=1)
            elif kind == "other_nonce":
                blob = scenario.seal(u, nonce=bytes(rng.integers(0, 256, 16, dtype=np.uint8)), round=1)
            elif kind == "other_content":
                blob = scenario.seal(u, delta={k: v * 0.5 for k, v in u.delta.items()}, round=1)
            elif kind == "stale":
                blob = scenario.seal(u, round=0)
            elif kind == "future":
                blob = scenario.seal(u, round=2)
            elif kind == "norm":
                blob = scenario.seal(u, delta={k: v * 1000 for k, v in u.delta.items()}, round=1)
            elif kind == "malformed":
                blob = bytes(rng.integers(0, 256, 64, dtype=np.uint8))
            elif kind == "auth":
                blob = scenario.seal(u, key=scenario.signing_key("intruder"), round=1)
            else:
                blob = scenario.seal(u, round=1)
                sent.append(i)
            batch.append(IncomingUpdate(blob=blob, topic_sender="eu-dev-9" if kind == "wrong_topic" else None))
        out.append(batch)
    return out


def run_mixed(open_region: Callable[..., RegionalAggregator], seed: int, db: str, *, one_at_a_time: bool,
              **overrides: Any) -> tuple[list[tuple[Verdict, str]], RegionalAggregator]:
    """Round 1 (after an empty round 0) fed ``mixed_batches(seed)``; the answers and the aggregator."""
    region = open_region(db=db, policy=QUORUM, **overrides)
    region.start_round(0, scenario.initial_model())
    region.close_round()
    region.start_round(1, scenario.initial_model(8))
    answers: list[tuple[Verdict, str]] = []
    for batch in mixed_batches(seed):
        if one_at_a_time:
            answers += _answers([region.handle_updates([item])[0] for item in batch])
        else:
            answers += _answers(region.handle_updates(batch))
    return answers, region


def digest(region: RegionalAggregator, round: int = 1) -> str:
    """A hash of the round's merged result (for comparing runs of two code versions)."""
    merged = region._intake.merge(round)
    h = hashlib.sha256(f"{merged.update_count}:{merged.sample_count}".encode())
    for name in sorted(merged.mean_delta or {}):
        h.update((merged.mean_delta or {})[name].tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("config", ["mean", "mean-clipped", "trimmed-mean-clipped"])
@pytest.mark.parametrize("seed", [2, 3, 5])
def test_group_commit_mixed_batches_answer_and_fold_as_one_at_a_time(
        open_region: Callable[..., RegionalAggregator], seed: int, config: str) -> None:
    overrides = CONFIGS[config]
    batched, region = run_mixed(open_region, seed, f"b{seed}.sqlite", one_at_a_time=False, **overrides)
    single, one = run_mixed(open_region, seed, f"s{seed}.sqlite", one_at_a_time=True, **overrides)
    assert batched == single
    assert {reason for _, reason in batched} >= {"", "already_counted", "auth", "future_round", "malformed", "norm", "replay", "stale_round"}
    assert {v for v, _ in batched} == {Verdict.ACCEPTED, Verdict.DUPLICATE, Verdict.REJECTED}
    _same_round(region, one)
    assert digest(region) == digest(one)
