"""The agent with a compressing bundle, over a real Mosquitto: what it sends, the residual it keeps, crash safety."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.compression import CompressionSpec, compress_delta, decoded_values
from device_agent.protocol.envelope import open_update
from device_agent.protocol.receipts import ReceiptStatus
from device_agent.state_store import ResidualFile
from tests.device_agent.bundle.resign import resigned
from tests.device_agent.daemon.test_agent_rounds import advance_on_accept

pytestmark = pytest.mark.mosquitto

SPEC = "topk:0.3+q8"


@pytest.fixture
def compressing(fleet, bundle_factory, fleet_key, tmp_path):
    """The fleet, its agent config pointing at the digits bundle re-signed with ``compression = topk:0.3+q8``."""
    fleet.sections["bundle"]["path"] = resigned(bundle_factory("fedavg"), tmp_path / "compressing.fedge", fleet_key,
                                                 version=1, compression=SPEC)
    return fleet


def test_agent_sends_compressed_deltas_and_carries_what_it_did_not_send(compressing):
    agent = compressing.agent()
    assert agent.compression == CompressionSpec.parse(SPEC)
    models = {0: agent.trainer.global_reference}
    advance_on_accept(compressing.responder, models, last_round=1)
    compressing.responder.publish_model(0, models[0])

    deltas, residual = [], None
    for _ in range(2):
        update = agent.train_round(agent.wait_for_model(10.0))
        deltas.append(update.delta)
        expected = compress_delta(update.delta, residual, agent.compression)
        assert agent.submit(agent.seal_update(update)).status is ReceiptStatus.ACCEPTED
        opened = compressing.responder.opened[-1]
        assert opened.header.encoding.value == "topk_q8"
        for name, value in decoded_values(expected.tensors).items():
            np.testing.assert_array_equal(opened.tensors[name], value)
        residual = expected.residual

    # What went out plus what the device still holds is what it trained (error feedback loses nothing).
    saved = ResidualFile(agent.state.directory / "residual.bin").load()
    assert saved is not None and saved.round == 1
    for name in deltas[0]:
        sent = sum(o.tensors[name].astype(np.float64) for o in compressing.responder.opened)
        truth = sum(d[name].astype(np.float64) for d in deltas)
        np.testing.assert_allclose(sent + saved.after[name], truth, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(saved.after[name], residual[name])
    # Sparse and quantised: far fewer bytes than the float32 delta would take.
    raw_bytes = sum(v.nbytes for v in deltas[0].values())
    assert max(len(b) for b in compressing.responder.blobs) < raw_bytes / 4


def test_agent_reseals_a_round_from_the_residual_it_started_with(compressing):
    first = compressing.agent()
    compressing.responder.answering.clear()
    compressing.responder.publish_model(0, first.trainer.global_reference)
    update = first.train_round(first.wait_for_model(10.0))
    sealed = first.seal_update(update)
    first.state.clear_pending()  # as if the process died after saving the residual, before the pending update
    first.close(graceful=False)

    second = compressing.agent()
    resealed = second._resume(0)
    assert resealed is not None and resealed.header.nonce != sealed.header.nonce
    keys = compressing.keys
    opened = [open_update(s.blob, recipient_key=keys.aggregator, sender_public_key={s.header.sender: keys.device.public_key()})
              for s in (sealed, resealed)]
    for name in update.delta:
        np.testing.assert_array_equal(opened[0].tensors[name], opened[1].tensors[name])
