"""The regional service's group commit when other events run while updates wait for their batch (regression tests
from the review of a service that took each update in on arrival; measured and reverted, see docs/benchmarks.md):
a deadline or quorum close by the tick, a counter flush, another member's commit, a root receipt, a FedFomo request,
a stop, and a root model that waited for its bundle.

Real SQLite stores and real sealed updates; the service is driven without a broker (``handle_message``,
``on_tick`` and ``flush_batch``, as the service loop calls them). What updates queued as bytes and
``handle_updates`` at the flush answer is computed on a second store and compared with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.keys import raw_public_bytes
from device_agent.protocol.candidate_request import CandidateRequest, sign_candidate_request
from device_agent.protocol.envelope import sign_model
from device_agent.protocol.headers import ModelHeader
from device_agent.protocol.topics import TopicLayout
from sdk.aggregator import IncomingUpdate, RegionalAggregator, RootAggregator, Verdict
from sdk.aggregator.outcomes import HandledUpdate
from sdk.aggregator.regional_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.sdk.aggregator import scenario

LAYOUT = TopicLayout(fleet=scenario.FLEET)


class _Recording(RegionalService):
    """The real service; every answer it sends a receipt for is kept (device, verdict, reason)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.answers: list[tuple[str, Verdict, str]] = []

    def send_receipt(self, device: str, handled: HandledUpdate, *, arrived: float | None) -> None:
        self.answers.append((device, handled.verdict, handled.reason))
        super().send_receipt(device, handled, arrived=arrived)


@pytest.fixture(scope="module")
def updates() -> list[scenario.DeviceUpdate]:
    return scenario.device_updates(count=6, seed=23)


@pytest.fixture(scope="module")
def blobs(updates: list[scenario.DeviceUpdate]) -> list[bytes]:
    return [scenario.seal(update) for update in updates]


def _service(region: RegionalAggregator, clock: scenario.StepClock) -> _Recording:
    return _Recording(region, region="eu", layout=LAYOUT, clock=clock,
                      broker=BrokerSettings(host="127.0.0.1", port=1, client_id="eu-review"),  # never connected
                      loop=LoopSettings(batch_max_updates=10, batch_max_wait_s=1.0))


def _started(open_region: Callable[..., RegionalAggregator], db: str) -> RegionalAggregator:
    region = open_region(db=db, policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0))
    region.start_round(0, scenario.initial_model())
    return region


def _old_path_answers(open_region: Callable[..., RegionalAggregator], updates: list[scenario.DeviceUpdate],
                      blobs: list[bytes]) -> list[tuple[str, Verdict, str]]:
    """handle_updates on a second store: three committed, the round closed by its deadline, then the two that
    were queued (as bytes) handed to handle_updates at the flush."""
    region = _started(open_region, "old.sqlite")
    first = region.handle_updates([IncomingUpdate(blob=b, topic_sender=u.device) for u, b in zip(updates[:3], blobs[:3])])
    region.close_round()
    late = region.handle_updates([IncomingUpdate(blob=b, topic_sender=u.device) for u, b in zip(updates[3:5], blobs[3:5])])
    return [(u.device, h.verdict, h.reason) for u, h in zip(updates[:5], first + late)]


def test_service_deadline_close_while_updates_wait_never_acknowledges_an_update_left_out_of_the_aggregate(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock,
    updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    region = _started(open_region, "eu.sqlite")
    service = _service(region, clock)
    for update, blob in zip(updates[:3], blobs[:3]):
        service.handle_message(LAYOUT.device_update(update.device), blob)
    service.flush_batch(force=True)  # three committed and acknowledged
    clock.advance(59.5)
    for update, blob in zip(updates[3:5], blobs[3:5]):
        service.handle_message(LAYOUT.device_update(update.device), blob)  # queued for the batch, not committed
    clock.advance(0.6)  # the deadline (60 s) has passed; the batch's latency cap (1 s) has not
    service.flush_batch()  # as the loop calls it: not due yet
    assert service.batch_due_in() is not None
    service.on_tick()  # the loop's tick while the batch waits: the deadline closes round 0
    closed = region.close_round()  # idempotent: what the tick closed
    assert closed.update_count == 3
    service.flush_batch(force=True)  # the batch's latency cap, or the next flush
    acknowledged = [device for device, verdict, _ in service.answers if verdict is Verdict.ACCEPTED]
    # Every "accepted" receipt promises the update counts: all of them must be in the sealed aggregate.
    assert len(acknowledged) == closed.update_count, (
        f"{len(acknowledged)} updates acknowledged as accepted, the closed round's aggregate counts {closed.update_count}: "
        f"{service.answers}")
    assert region.status().accepted == closed.update_count
    assert service.answers == _old_path_answers(open_region, updates, blobs)


def test_service_counter_flush_and_another_members_commit_while_updates_wait_answer_once_each(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock,
    updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    """Between two adds: a counter flush (after a refused forgery), and member ``b`` of the same store accepting
    the very update this member has queued plus one of its own. Each update counts once, the queued copy is
    answered as a duplicate."""
    region = _started(open_region, "eu.sqlite")
    other = open_region(db="eu.sqlite", member="b", policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0))
    service = _service(region, clock)
    forged = scenario.seal(updates[5], key=scenario.signing_key("intruder"))
    service.handle_message(LAYOUT.device_update(updates[5].device), forged)
    service.handle_message(LAYOUT.device_update(updates[0].device), blobs[0])
    service.flush_counters()
    assert region.status().rejections() == {} and region.status().accepted == 0  # queued: nothing opened or committed
    assert [h.verdict for h in other.handle_updates([IncomingUpdate(blob=b) for b in blobs[:2]])] == [Verdict.ACCEPTED] * 2
    service.handle_message(LAYOUT.device_update(updates[1].device), blobs[1])  # b counted it: a duplicate at the flush
    service.handle_message(LAYOUT.device_update(updates[2].device), blobs[2])
    service.flush_batch(force=True)
    assert [(v, r) for _, v, r in service.answers] == [
        (Verdict.REJECTED, "auth"), (Verdict.DUPLICATE, ""), (Verdict.DUPLICATE, ""), (Verdict.ACCEPTED, "")]
    service.flush_counters()
    status = region.status()
    assert (status.accepted, status.rejections()) == (3, {"auth": 1})
    closed = region.close_round()
    assert closed.update_count == 3 and closed.sample_count == sum(u.samples for u in updates[:3])


def test_service_quorum_reached_by_another_member_closes_while_updates_wait_without_losing_the_queued_update(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock,
    updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    """This member has one update queued; member ``b`` commits three others, reaching the quorum (3); this
    member's tick closes the round. The queued update must not be acknowledged unless the aggregate counts it
    (it is answered stale_round)."""
    region = open_region(db="eu.sqlite", policy=scenario.RoundPolicy(quorum=3, deadline_s=60.0))
    region.start_round(0, scenario.initial_model())
    other = open_region(db="eu.sqlite", member="b", policy=scenario.RoundPolicy(quorum=3, deadline_s=60.0))
    service = _service(region, clock)
    service.handle_message(LAYOUT.device_update(updates[0].device), blobs[0])
    assert [h.verdict for h in other.handle_updates([IncomingUpdate(blob=b) for b in blobs[1:4]])] == [Verdict.ACCEPTED] * 3
    service.on_tick()  # the loop's tick while the batch waits: the quorum closes round 0 here
    closed = region.close_round()
    service.flush_batch(force=True)
    assert service.answers[0][1:] != (Verdict.ACCEPTED, "") or closed.update_count == 4, (
        f"{updates[0].device} acknowledged as accepted, the aggregate counts {closed.update_count} updates without it")
    assert service.answers == [(updates[0].device, Verdict.REJECTED, "stale_round")]


class _SwitchesTo4(_Recording):
    """The real service, with the bundle library's lookup in ``_switch_for`` replaced by its outcome (v4 is here:
    adopt its config; a follower needs a built bundle library, several CPU-seconds of torch export)."""

    def _switch_for(self, blob: bytes) -> bool:
        self.aggregator.adopt(replace(self.aggregator.config, bundle_version=4))
        return True


def test_service_a_waiting_root_model_of_another_version_commits_the_queued_updates_before_switching(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock,
    updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    """RegionalService.on_tick starts a root model that waited for its bundle (``_waiting_model``) by calling
    handle_root_model directly. The rule (docs/aggregation.md, "Group commit"): a root model first commits the
    updates queued before it, so the one queued from round 0 counts in round 0, not stale after the switch to v4."""
    region = _started(open_region, "eu.sqlite")
    service = _SwitchesTo4(region, region="eu", layout=LAYOUT, clock=clock,
                           broker=BrokerSettings(host="127.0.0.1", port=1, client_id="eu-review"),
                           loop=LoopSettings(batch_max_updates=10, batch_max_wait_s=1.0))
    service.handle_message(LAYOUT.device_update(updates[0].device), blobs[0])  # v3, round 0: queued for the batch
    model = sign_model(ModelHeader.create(fleet=scenario.FLEET, sender="root", round=1, bundle_version=4),
                       scenario.initial_model(), signer_key=scenario.signing_key("root"))
    service.handle_root_model(model)  # what on_tick does with the waiting model once its bundle is here
    assert region.config.bundle_version == 4 and region.status().round == 1
    for update in updates[1:3]:
        service.handle_message(LAYOUT.device_update(update.device), scenario.seal(update, round=1, bundle_version=4))
    service.flush_batch(force=True)
    assert service.answers == [(updates[0].device, Verdict.ACCEPTED, ""),
                               (updates[1].device, Verdict.ACCEPTED, ""), (updates[2].device, Verdict.ACCEPTED, "")]
    assert region.status().accepted == 2  # round 1's


def test_service_root_receipt_while_updates_wait_settles_the_aggregate_and_the_queued_updates_answer_stale(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock, tmp_path: Path,
    updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    """Round 0 closed by its deadline with an empty batch; late updates are queued while the root's receipt for
    the aggregate arrives between two of them: the aggregate settles, the late ones are stale_round, nothing else
    is counted."""
    region = _started(open_region, "eu.sqlite")
    service = _service(region, clock)
    for update, blob in zip(updates[:3], blobs[:3]):
        service.handle_message(LAYOUT.device_update(update.device), blob)
    service.flush_batch(force=True)
    clock.advance(61.0)
    service.on_tick()  # nothing open: the deadline closes round 0 with the three
    pending = region.pending_aggregate()
    assert pending is not None
    root = RootAggregator.open(tmp_path / "root.sqlite", scenario.root_config(regions=("eu",), clock=clock))
    root.start_round(0, scenario.initial_model())
    answer = root.handle_aggregate(pending, topic_region="eu")
    root.close()
    assert answer.verdict is Verdict.ACCEPTED and answer.receipt is not None
    service.handle_message(LAYOUT.device_update(updates[3].device), blobs[3])
    service.handle_message(LAYOUT.region_receipt("eu"), answer.receipt)
    service.handle_message(LAYOUT.device_update(updates[4].device), blobs[4])
    service.flush_batch(force=True)
    assert region.pending_aggregate() is None and region.status().counters["aggregate_acknowledged"] == 1
    assert service.answers == _old_path_answers(open_region, updates, blobs)
    assert region.status().accepted == 3 and region.close_round().update_count == 3


def test_service_fedfomo_request_while_updates_wait_is_served_from_committed_updates_only(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock,
    updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    """FedFomo on: a candidate request between two queued updates is answered from the pool of COMMITTED updates;
    the queued update joins the pool at its commit."""
    region = open_region(db="eu.sqlite", policy=scenario.RoundPolicy(quorum=6, deadline_s=60.0), fomo_candidates=4)
    region.start_round(0, scenario.initial_model())
    service = _service(region, clock)
    for update, blob in zip(updates[:2], blobs[:2]):
        service.handle_message(LAYOUT.device_update(update.device), blob)
    service.flush_batch(force=True)
    service.handle_message(LAYOUT.device_update(updates[2].device), blobs[2])  # queued, not committed
    asker = updates[5].device
    request = sign_candidate_request(CandidateRequest.create(
        fleet=scenario.FLEET, region="eu", device=asker, round=0, k=4, prefer=(updates[2].device,),
        reply_key=raw_public_bytes(X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key())),
        signer_key=scenario.signing_key(asker))
    served = region.handle_candidate_request(request, topic_device=asker)
    assert sorted(served.peers) == sorted(u.device for u in updates[:2])  # the queued one is not in the pool yet
    service.handle_message(LAYOUT.device_update(updates[3].device), blobs[3])
    service.flush_batch(force=True)
    assert [v for _, v, _ in service.answers] == [Verdict.ACCEPTED] * 4
    assert sorted(d for d in (u.device for u in updates[:4]) if d in region.candidates) == sorted(u.device for u in updates[:4])
    assert region.status().accepted == 4


def test_service_stop_commits_and_answers_the_queued_updates(
    open_region: Callable[..., RegionalAggregator], clock: scenario.StepClock,
    updates: list[scenario.DeviceUpdate], blobs: list[bytes],
) -> None:
    """The service stops while updates wait for their batch: run()'s last flush commits and answers them;
    nothing is left queued. No broker listens on the port: run() ends at once."""
    region = _started(open_region, "eu.sqlite")
    service = _service(region, clock)
    for update, blob in zip(updates[:2], blobs[:2]):
        service.handle_message(LAYOUT.device_update(update.device), blob)
    assert region.status().accepted == 0
    stop = threading.Event()
    stop.set()
    service.run(stop)
    assert [(d, v) for d, v, _ in service.answers] == [(u.device, Verdict.ACCEPTED) for u in updates[:2]]
    assert region.status().accepted == 2 and service.batch_due_in() is None
