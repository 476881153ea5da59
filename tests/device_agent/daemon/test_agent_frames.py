"""The agent seals in the highest frame version the model's publisher announces, over a real Mosquitto."""

from __future__ import annotations

import pytest

from device_agent.daemon.agent import RoundStatus

pytestmark = pytest.mark.mosquitto


def test_agent_seals_version_1_until_a_model_announces_the_prehashed_frame(fleet):
    agent = fleet.agent()
    models = {0: agent.trainer.global_reference}

    def advance(opened) -> None:  # round 1's model announces frames 1 and 2
        if opened.header.round == 0:
            models[1] = {n: models[0][n] + opened.tensors[n] for n in models[0]}
            fleet.responder.publish_model(1, models[1], frames=(1, 2))

    fleet.responder.on_accept = advance
    fleet.responder.publish_model(0, models[0])
    result = agent.run(max_rounds=2)

    assert [(r.round, r.status) for r in result.rounds] == [(0, RoundStatus.ACCEPTED), (1, RoundStatus.ACCEPTED)]
    assert [o.frame_version for o in fleet.responder.opened] == [1, 2]
    assert [b[4] for b in fleet.responder.blobs] == [1, 2]


def test_agent_reseals_after_a_restart_in_the_frame_version_the_model_announces(fleet):
    first = fleet.agent()
    fleet.responder.publish_model(0, first.trainer.global_reference, frames=(2,))
    first.train_round(first.wait_for_model(5.0))  # trainer state saved; "crash" before sealing
    first.close(graceful=False)

    second = fleet.agent()  # seals the saved delta without training: still for an aggregator that reads only 2
    result = second.run(max_rounds=1)

    assert [(r.status, r.trained) for r in result.rounds] == [(RoundStatus.ACCEPTED, False)]
    assert [o.frame_version for o in fleet.responder.opened] == [2]
