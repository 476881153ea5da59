"""The device agent against a real Mosquitto and a real-protocol responder: rounds, trust, retries, crashes.

Each test runs a fresh broker (``mosquitto`` fixture), a :class:`Responder`
that opens sealed updates and signs receipts, and agents opened from a TOML
config on disk, training a real ORT bundle on digits.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.daemon.agent import RoundStatus
from device_agent.daemon.agent_state import AgentProgress, AgentStateFiles
from device_agent.daemon.errors import ReceiptTimeoutError
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from tests.device_agent.daemon.fleet_harness import REGION, Responder
from tests.mosquitto_broker import wait_for

pytestmark = pytest.mark.mosquitto


def advance_on_accept(responder: Responder, models: dict[int, dict[str, np.ndarray]], last_round: int) -> None:
    """Make the responder publish round r+1 = model r + the device's delta after accepting round r (up to ``last_round``)."""

    def advance(opened) -> None:
        r = opened.header.round
        if r < last_round:
            models[r + 1] = {n: models[r][n] + opened.tensors[n] for n in models[r]}
            responder.publish_model(r + 1, models[r + 1])

    responder.on_accept = advance


def test_agent_completes_two_rounds_with_signed_models_and_receipts(fleet):
    agent = fleet.agent()
    models = {0: agent.trainer.global_reference}
    advance_on_accept(fleet.responder, models, last_round=1)
    fleet.responder.publish_model(0, models[0])

    result = agent.run(max_rounds=2)

    assert [(r.round, r.status, r.trained) for r in result.rounds] == [
        (0, RoundStatus.ACCEPTED, True), (1, RoundStatus.ACCEPTED, True)]
    assert not result.stopped and result.finished == 2
    headers = [o.header for o in fleet.responder.opened]
    assert [(h.round, h.sender, h.region, h.sample_count) for h in headers] == [
        (0, "eu-dev-0001", REGION, 256), (1, "eu-dev-0001", REGION, 256)]
    # Round 1 trained from the model the responder derived from round 0's delta.
    for name, value in models[1].items():
        np.testing.assert_array_equal(agent.trainer.global_reference[name], value)
    assert agent.trainer.round == 1
    assert agent.progress.completed_round == 1 and agent.progress.highest_model_round == 1
    assert agent.state.load_pending() is None
    receipt = open_receipt(agent.progress.last_receipt, trusted_signers=fleet.keys.region.public_key())
    assert receipt.answers(headers[1]) and receipt.status is ReceiptStatus.ACCEPTED
    assert sum(agent.intake.ignored.values()) == 0


def test_agent_ignores_models_it_must_not_train_on(fleet):
    agent = fleet.agent()
    weights = agent.trainer.global_reference
    fleet.responder.publish_model(3, weights, signer=Ed25519PrivateKey.generate())
    assert agent.wait_for_model(0.5) is None
    fleet.responder.publish_model(3, weights, bundle_version=2)
    fleet.responder.publish_model(3, weights, region="us")
    fleet.responder.publish_model(3, {k: v for k, v in weights.items() if k != "head.bias"})
    assert agent.wait_for_model(0.5) is None
    assert agent.intake.ignored == {"untrusted_model": 1, "model_bundle_version": 1, "model_scope": 1, "model_shape": 1}

    fleet.responder.publish_model(3, weights, signer=fleet.keys.root, region=None)  # the root's own model is fine
    model = agent.wait_for_model(5.0)
    assert model is not None and model.header.round == 3
    fleet.responder.publish_model(2, weights)  # a rollback to an older round
    assert agent.wait_for_model(0.5, after_round=3) is None
    assert agent.intake.ignored["model_rollback"] == 1


def test_agent_progress_from_another_bundle_does_not_block_this_bundles_rounds(fleet, tmp_path):
    AgentStateFiles(tmp_path / "agent" / "state").save_progress(
        AgentProgress(bundle_version=7, completed_round=50, highest_model_round=50))
    agent = fleet.agent()
    assert agent.progress == AgentProgress(bundle_version=1)
    fleet.responder.publish_model(0, agent.trainer.global_reference)
    model = agent.wait_for_model(5.0)
    assert model is not None and model.header.round == 0


def test_agent_resends_the_identical_blob_until_a_receipt_comes(fleet):
    fleet.sections["submit"].update(receipt_timeout_s=0.4, max_attempts=6)
    agent = fleet.agent()
    responder = fleet.responder
    responder.answering.clear()
    responder.publish_model(0, agent.trainer.global_reference)
    threading.Thread(target=lambda: wait_for(lambda: len(responder.blobs) >= 3, 10) and responder.answering.set(),
                     daemon=True).start()

    result = agent.run(max_rounds=1)

    assert [(r.status, r.trained) for r in result.rounds] == [(RoundStatus.ACCEPTED, True)]
    assert len(responder.blobs) >= 3
    assert len(set(responder.blobs)) == 1, "every attempt must carry the same bytes (same nonce)"
    assert agent.progress.completed_round == 0


def test_agent_gives_up_after_max_attempts_and_keeps_the_update_pending(fleet):
    fleet.sections["submit"].update(receipt_timeout_s=0.2, max_attempts=2)
    agent = fleet.agent()
    fleet.responder.answering.clear()
    fleet.responder.publish_model(0, agent.trainer.global_reference)
    model = agent.wait_for_model(5.0)
    sealed = agent.seal_update(agent.train_round(model))
    with pytest.raises(ReceiptTimeoutError):
        agent.submit(sealed)
    assert wait_for(lambda: len(fleet.responder.blobs) == 2)
    assert agent.state.load_pending() == sealed
    assert agent.progress.completed_round == -1


def test_agent_surfaces_a_rejected_receipt_with_its_reason(fleet):
    agent = fleet.agent()
    fleet.responder.reject = "norm"
    fleet.responder.publish_model(0, agent.trainer.global_reference)
    result = agent.run(max_rounds=1)
    assert [(r.status, r.reason) for r in result.rounds] == [(RoundStatus.REJECTED, "norm")]
    assert result.rounds[0].receipt is not None and result.rounds[0].receipt.status is ReceiptStatus.REJECTED
    assert agent.state.load_pending() is None and agent.progress.completed_round == 0


def test_agent_restarted_with_a_pending_update_resends_the_same_bytes_without_training(fleet):
    fleet.sections["submit"].update(receipt_timeout_s=0.2, max_attempts=1)
    first = fleet.agent()
    fleet.responder.answering.clear()
    fleet.responder.publish_model(0, first.trainer.global_reference)
    assert first.run(max_rounds=0).rounds == ()  # max_rounds=0: nothing to do
    outcome = first.complete_round(first.wait_for_model(5.0))
    assert outcome.status is RoundStatus.NO_RECEIPT and outcome.trained
    steps = first.trainer.total_steps
    pending = first.state.load_pending()
    first.close(graceful=False)  # the process "dies" here

    fleet.responder.answering.set()
    fleet.sections["submit"].update(receipt_timeout_s=2.0)
    second = fleet.agent()
    assert second.trainer.total_steps == steps and second.trainer.round == 0
    result = second.run(max_rounds=1)

    assert [(r.status, r.trained) for r in result.rounds] == [(RoundStatus.ACCEPTED, False)]
    assert second.trainer.total_steps == steps, "the restarted agent must not train again"
    assert fleet.responder.blobs[-1] == pending.blob
    assert set(fleet.responder.blobs) == {pending.blob}
    assert second.state.load_pending() is None


def test_agent_restarted_after_training_but_before_sealing_seals_the_saved_delta(fleet):
    first = fleet.agent()
    weights = first.trainer.global_reference
    fleet.responder.publish_model(0, weights)
    update = first.train_round(first.wait_for_model(5.0))  # trainer state saved; "crash" before sealing
    first.close(graceful=False)

    second = fleet.agent()
    steps = second.trainer.total_steps
    result = second.run(max_rounds=1)

    assert [(r.status, r.trained) for r in result.rounds] == [(RoundStatus.ACCEPTED, False)]
    assert second.trainer.total_steps == steps
    sent = fleet.responder.opened[-1].tensors
    for name, delta in update.delta.items():
        np.testing.assert_array_equal(sent[name], delta)


def test_agent_skips_a_round_it_cannot_train_and_keeps_running(fleet, local_data):
    agent = fleet.agent()
    fleet.responder.publish_model(0, agent.trainer.global_reference)
    local_data.write_bytes(b"not an npz file")
    result = agent.run(max_rounds=1)
    assert [(r.status, r.trained) for r in result.rounds] == [(RoundStatus.FAILED, False)]
    assert "cannot load the local data" in result.rounds[0].reason
    assert agent.progress.completed_round == 0 and fleet.responder.blobs == []


class _Crash(BaseException):
    """Stands for the process being killed (not an Exception, so nothing catches it)."""


def test_agent_killed_mid_training_retrains_the_round_from_the_last_saved_state(fleet, monkeypatch):
    first = fleet.agent()
    models = {0: first.trainer.global_reference}
    advance_on_accept(fleet.responder, models, last_round=1)
    fleet.responder.publish_model(0, models[0])
    assert [r.status for r in first.run(max_rounds=1).rounds] == [RoundStatus.ACCEPTED]
    saved_steps = first.trainer.total_steps
    model = first.wait_for_model(5.0)
    assert model is not None and model.header.round == 1

    def crash(*args, **kwargs):
        raise _Crash()

    monkeypatch.setattr(first.trainer, "save_state", crash)  # dies after training, before anything is saved
    with pytest.raises(_Crash):
        first.complete_round(model)
    first.close(graceful=False)

    second = fleet.agent()
    assert second.trainer.round == 0 and second.trainer.total_steps == saved_steps
    result = second.run(max_rounds=1)
    assert [(r.round, r.status, r.trained) for r in result.rounds] == [(1, RoundStatus.ACCEPTED, True)]
    assert second.trainer.total_steps == 2 * saved_steps
    assert [o.header.round for o in fleet.responder.opened] == [0, 1]


def test_agent_survives_a_broker_crash_while_waiting_for_a_receipt(fleet):
    """The broker is killed (SIGKILL: sessions and retained messages lost) mid-round; the agent
    reconnects, re-subscribes, resends the same bytes and finishes both rounds."""
    fleet.sections["submit"].update(receipt_timeout_s=0.5, max_attempts=30)
    agent = fleet.agent()
    responder = fleet.responder
    models = {0: agent.trainer.global_reference}

    def advance(opened) -> None:
        responder.answering.clear()  # round 1's receipt is held back until the broker has crashed
        models[1] = {n: models[0][n] + opened.tensors[n] for n in models[0]}
        responder.publish_model(1, models[1])

    responder.on_accept = advance
    responder.publish_model(0, models[0])
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(result=agent.run(max_rounds=2)), daemon=True)
    runner.start()
    assert wait_for(lambda: any(o.header.round == 1 for o in responder.opened), 15)

    fleet.broker.restart(crash=True)
    assert wait_for(lambda: agent.connection.connects == 2 and responder.connections == 2, 10)
    responder.answering.set()
    runner.join(20)

    result = outcome["result"]
    assert [(r.round, r.status) for r in result.rounds] == [(0, RoundStatus.ACCEPTED), (1, RoundStatus.ACCEPTED)]
    round_one = [blob for blob, o in zip(responder.blobs, responder.opened) if o.header.round == 1]
    assert len(round_one) >= 2 and len(set(round_one)) == 1, "round 1 was resent after the crash with the same bytes"
