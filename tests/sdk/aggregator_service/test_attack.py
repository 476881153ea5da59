"""An authenticated device attacking through the real services on real Mosquitto, default configuration.

The regional and root services run on one broker (no bridge needed for this);
six honest devices and one attacker send sealed updates for three rounds. The
attacker sends ``-d`` at L2 norm 4.6e4 with ``sample_count`` 10^12 (the field
test), then ``2**53 - 1`` (which used to make every close raise). Every round
must close, every honest update be accepted, and every global model equal the
numpy reference of the documented default bounds (tests/integration/reference.py),
which caps what the attacker moves per round at its bounded share.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.envelope import open_model
from device_agent.protocol.receipts import ReceiptStatus, open_receipt
from sdk.aggregator import RegionalAggregator, RegionalConfig, RoundPolicy
from sdk.aggregator.mqtt_service import RegionalService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.integration.reference import bounded_sum, default_bounds, global_steps, l2
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.conftest import Started
from tests.sdk.aggregator_service.harness import (
    BUNDLE_VERSION,
    FLEET,
    LAYOUT,
    SPEC,
    Device,
    Observer,
    ServiceThread,
    TierKeys,
    random_params,
)
from tests.sdk.aggregator_service.test_tier_policies import _root_thread

pytestmark = pytest.mark.mosquitto

ROUNDS = 3
ATTACKER = "eu-dev-evil"
COUNTS = {0: 10**12, 1: (1 << 53) - 1, 2: 10**12}


def test_attacker_with_huge_norm_and_sample_count_moves_the_model_by_its_bounded_share_only(
        mosquitto: MosquittoFactory, started: Started, tmp_path: Path) -> None:
    rng = np.random.default_rng(17)
    broker = mosquitto.start()
    region, root = TierKeys(), TierKeys()
    honest = [Device(device_id=f"eu-dev-{i}", region="eu", samples=int(rng.integers(20, 80)), delta={}) for i in range(6)]
    evil = Device(device_id=ATTACKER, region="eu", samples=50, delta={})
    config = RegionalConfig(  # the default influence policy
        fleet=FLEET, region="eu", encryption_key=region.encryption, signing_key=region.signing, spec=SPEC,
        bundle_version=BUNDLE_VERSION, policy=RoundPolicy(quorum=len(honest) + 1, deadline_s=60.0),
        device_keys={d.device_id: d.key.public_key() for d in [*honest, evil]},
        root_verify_key=root.signing.public_key(), root_encryption_key=root.encryption.public_key(),
    )
    settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="eu-agg", share_group="eu")

    def build() -> tuple[RegionalService, RegionalAggregator]:
        aggregator = RegionalAggregator.open(tmp_path / "eu.sqlite", config)
        return RegionalService(aggregator, region="eu", layout=LAYOUT, broker=settings, loop=LoopSettings(tick_s=0.05)), aggregator

    devices = started.observer(Observer(broker.port, client_id="devices")).subscribe(
        f"{LAYOUT.base}/dev/+/down/receipt", LAYOUT.global_model, LAYOUT.root_model)
    started.thread(ServiceThread(build))
    initial = random_params(rng)
    started.thread(_root_thread(port=broker.port, keys=root, regions={"eu": region}, initial=initial,
                                store=tmp_path / "root.sqlite", deadline_s=60.0))
    models = {}
    history: dict[int, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for r in range(ROUNDS):
        _, served = devices.receive(lambda t: t == LAYOUT.global_model)[0]
        model = open_model(served, trusted_signers=region.signing.public_key())
        assert model.header.round == r
        models[r] = model.tensors
        history[r] = []
        for device in honest:
            delta = random_params(rng, 0.1)
            history[r].append((device.samples, delta))
            devices.publish(LAYOUT.device_update(device.device_id), device.seal(device.header(r), region.encryption, delta))
        flipped = {k: -v for k, v in history[r][0][1].items()}
        attack = {k: (v * (4.6e4 / l2(flipped))).astype(np.float32) for k, v in flipped.items()}
        evil.samples = COUNTS[r]
        history[r].append((evil.samples, attack))
        devices.publish(LAYOUT.device_update(ATTACKER), evil.seal(evil.header(r), region.encryption, attack))
        receipts = [open_receipt(blob, trusted_signers=region.signing.public_key())
                    for _, blob in devices.receive(lambda t: t.endswith("/down/receipt"), count=len(honest) + 1)]
        assert {(x.device, x.status) for x in receipts} == {(d.device_id, ReceiptStatus.ACCEPTED) for d in [*honest, evil]}
    _, served = devices.receive(lambda t: t == LAYOUT.global_model)[0]
    models[ROUNDS] = open_model(served, trusted_signers=region.signing.public_key()).tensors

    # Every global model is the bounded mean of what was sent, with the documented default bounds.
    steps = global_steps({"eu": history}, ROUNDS)
    bounds = default_bounds(history, ROUNDS)
    for r in range(ROUNDS):
        honest_only = history[r][:-1]
        total = sum(n for n, _ in honest_only)
        plain = {k: sum(n * d[k].astype(np.float64) for n, d in honest_only) / total for k in SPEC}
        for name in SPEC:
            np.testing.assert_allclose(models[r + 1][name], models[r][name].astype(np.float64) + steps[r][name], atol=1e-5, rtol=0)
        # What the attacker moved beyond the honest devices' own step is at most its bounded share of (bound + |honest|).
        clip, cap = bounds[r]
        weights = [min(n, cap) for n, _ in history[r]]
        share = weights[-1] / sum(weights)
        moved = l2({k: models[r + 1][k].astype(np.float64) - models[r][k] - plain[k] for k in SPEC})
        part, weight = bounded_sum(honest_only, bounds[r])  # the honest devices alone, under the same bounds
        without = {k: v / weight for k, v in part.items()}
        bounding_shift = l2({k: without[k] - plain[k] for k in SPEC})
        assert moved <= share * (clip + l2(without)) + bounding_shift + 1e-5, (r, moved, share, clip)
        assert moved < 10 * l2(plain), (r, moved)  # nothing like the field test's 7,000x
