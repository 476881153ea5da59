"""The services' /metrics and /healthz, scraped over HTTP during and after real rounds on real Mosquitto.

A regional and a root service share one broker (the topics they exchange
need no bridge), each with its own :class:`MetricsEndpoint` on a free
loopback port. The test sends a known mix of updates (accepted, a replay,
garbage) and checks every counter against what it sent and received.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from device_agent.protocol.envelope import open_model
from sdk.aggregator import RootAggregator, RootConfig, RoundPolicy
from sdk.aggregator.metrics import REJECT_REASONS
from sdk.aggregator.metrics_endpoint import MetricsEndpoint
from sdk.aggregator.mqtt_service import RootService
from sdk.aggregator.service_config import BrokerSettings, LoopSettings
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.conftest import Started
from tests.sdk.aggregator_service.harness import (
    BUNDLE_VERSION,
    FLEET,
    LAYOUT,
    SPEC,
    WAIT,
    Device,
    Observer,
    ServiceThread,
    TierKeys,
    random_params,
)
from tests.sdk.aggregator_service.scrape import Scrape, get_json, scrape
from tests.sdk.aggregator_service.test_regional_service import regional_thread

pytestmark = pytest.mark.mosquitto

OPERATIONS = Path(__file__).resolve().parents[3] / "docs" / "operations.md"


def alert_rule_metrics() -> set[str]:
    """The fedge_* names the example alert rules of docs/operations.md use."""
    text = OPERATIONS.read_text()
    rules = text[text.index("Example alert rules"):]
    rules = rules[rules.index("```yaml"):]
    rules = rules[: rules.index("```", 7)]
    names = set(re.findall(r"fedge_[a-z0-9_]+", rules))
    assert len(names) >= 8, names
    return names


def _endpoint(thread: ServiceThread) -> MetricsEndpoint:
    service = thread.service
    assert service is not None
    return MetricsEndpoint(host="127.0.0.1", port=0, registry=service.metrics.registry, health=service.health).start()


def _until(url: str, check, what: str) -> Scrape:
    """Scrape ``url`` until ``check(scrape)`` holds (bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    while True:
        got = scrape(url)
        if check(got):
            return got
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def test_metrics_count_what_happened_in_a_round(mosquitto: MosquittoFactory, started: Started, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    broker = mosquitto.start()
    region, root = TierKeys(), TierKeys()
    devices = [Device(device_id=f"eu-dev-{i}", region="eu", samples=n, delta=random_params(rng, 0.1))
               for i, n in enumerate((10, 30, 60))]
    observer = started.observer(Observer(broker.port, client_id="observer")).subscribe(
        f"{LAYOUT.base}/dev/+/down/receipt", LAYOUT.global_model)
    regional = started.thread(regional_thread(
        region="eu", keys=region, root=root, devices=devices, store=tmp_path / "eu.sqlite", quorum=3,
        broker=BrokerSettings(host="127.0.0.1", port=broker.port, client_id="eu-agg", max_packet_size=65536)))
    root_config = RootConfig(fleet=FLEET, encryption_key=root.encryption, signing_key=root.signing, spec=SPEC,
                             bundle_version=BUNDLE_VERSION, policy=RoundPolicy(quorum=1, deadline_s=60.0, min_updates=0),
                             region_keys={"eu": region.signing.public_key()})
    initial = random_params(rng)

    def build_root() -> tuple[RootService, RootAggregator]:
        aggregator = RootAggregator.open(tmp_path / "root.sqlite", root_config)
        settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="root-agg", max_packet_size=65536)
        return RootService(aggregator, layout=LAYOUT, broker=settings, loop=LoopSettings(tick_s=0.05),
                           initial_params=initial), aggregator

    root_thread = started.thread(ServiceThread(build_root))
    eu_endpoint, root_endpoint = _endpoint(regional), _endpoint(root_thread)
    try:
        [(_, served)] = observer.receive(lambda t: t == LAYOUT.global_model)
        assert open_model(served, trusted_signers=region.signing.public_key()).header.round == 0

        # Round 0 at the region: garbage (no receipt), two accepted updates and a replay of the first one.
        first = devices[0].header(0)
        sent = [("eu-dev-0", b"garbage, not a sealed update"), ("eu-dev-0", devices[0].seal(first, region.encryption)),
                ("eu-dev-0", devices[0].seal(first, region.encryption, random_params(rng))),
                ("eu-dev-1", devices[1].seal(devices[1].header(0), region.encryption))]
        for device_id, blob in sent:
            observer.publish(LAYOUT.device_update(device_id), blob)
        receipts = observer.receive(lambda t: t.endswith("/down/receipt"), count=3)

        # Scraped during the round (quorum is 3): the counters are exactly what was sent.
        # (The current-round gauges follow the store within a second.)
        during = _until(eu_endpoint.url, lambda s: s.value("fedge_update_receipt_latency_seconds_count") == 3
                        and s.value("fedge_round_accepted_updates") == 2, "three receipt latencies and two acceptances")
        assert during.value("fedge_updates_accepted_total") == 2
        assert during.value("fedge_updates_rejected_total", reason="replay") == 1
        assert during.value("fedge_updates_rejected_total", reason="malformed") == 1
        assert sum(during.labelled("fedge_updates_rejected_total").values()) == 2
        assert {dict(labels)["reason"] for labels in during.labelled("fedge_updates_rejected_total")} >= set(REJECT_REASONS)
        assert during.value("fedge_mqtt_received_messages_total", kind="update") == 4
        assert during.value("fedge_mqtt_received_bytes_total", kind="update") == sum(len(b) for _, b in sent)
        assert during.value("fedge_mqtt_sent_messages_total", kind="receipt") == 3
        assert during.value("fedge_mqtt_sent_bytes_total", kind="receipt") == sum(len(b) for _, b in receipts)
        assert during.value("fedge_store_commit_seconds_count") >= 2  # round start + the acceptances (group commit: one commit per batch)
        assert during.value("fedge_round_current") == 0 and during.value("fedge_round_collecting") == 1
        assert during.value("fedge_round_samples") == 40
        assert during.value("fedge_rounds_closed_total") == 0 and during.value("fedge_closed_round") == -1
        assert during.value("fedge_broker_connected") == 1 and during.value("fedge_broker_connects_total") == 1
        info = during.labelled("fedge_aggregator_info")
        assert [dict(labels) for labels in info][0] | {"version": ""} == {
            "fleet": FLEET, "tier": "regional", "region": "eu", "member": "main", "bundle_version": str(BUNDLE_VERSION),
            "version": ""}
        assert during.value("process_resident_memory_bytes") > 0

        # The third update reaches quorum: the region closes round 0 and forwards; the root closes its round 0
        # (quorum 1), acknowledges, and round 1 reaches the region.
        observer.publish(LAYOUT.device_update("eu-dev-2"), devices[2].seal(devices[2].header(0), region.encryption))
        while True:
            [(_, served)] = observer.receive(lambda t: t == LAYOUT.global_model)
            if open_model(served, trusted_signers=region.signing.public_key()).header.round == 1:
                break
        after = _until(eu_endpoint.url, lambda s: s.value("fedge_aggregates_acknowledged_total") == 1
                       and s.value("fedge_round_current") == 1 and s.value("fedge_round_accepted_updates") == 0,
                       "the root's receipt and round 1")
        assert after.value("fedge_rounds_closed_total") == 1 and after.value("fedge_closed_round") == 0
        assert after.value("fedge_closed_round_updates", verdict="accepted", reason="") == 3
        assert after.value("fedge_closed_round_updates", verdict="rejected", reason="replay") == 1
        assert after.value("fedge_closed_round_updates", verdict="rejected", reason="malformed") == 1
        assert after.value("fedge_closed_round_updates", verdict="rejected", reason="auth") == 0
        assert after.value("fedge_round_duration_seconds_count") == 1  # the region saw round 0 open
        assert after.value("fedge_round_last_closed_timestamp_seconds") > time.time() - 60
        assert after.value("fedge_aggregates_forwarded_total") == 1 and after.value("fedge_aggregate_pending") == 0
        assert after.value("fedge_models_published_total") == 2  # rounds 0 and 1

        at_root = _until(root_endpoint.url, lambda s: s.value("fedge_rounds_closed_total") == 1, "the root's close")
        assert at_root.value("fedge_updates_accepted_total") == 1
        assert at_root.value("fedge_closed_round_updates", verdict="accepted", reason="") == 1
        assert at_root.value("fedge_round_current") == 1
        assert at_root.value("fedge_round_duration_seconds_count") == 1  # the root bootstrapped round 0 itself
        assert at_root.value("fedge_mqtt_received_bytes_total", kind="aggregate") == \
            after.value("fedge_mqtt_sent_bytes_total", kind="aggregate") > 0
        assert at_root.value("fedge_mqtt_sent_messages_total", kind="receipt") == 1
        assert {dict(labels)["tier"] for labels in at_root.labelled("fedge_aggregator_info")} == {"root"}

        # Every metric the documented alert rules use is served (regional and root together).
        served = after.names() | at_root.names()
        assert alert_rule_metrics() <= served, alert_rule_metrics() - served

        code, body = get_json(eu_endpoint.url.replace("/metrics", "/healthz"))
        assert code == 200 and body["status"] == "ok" and body["service"] == "regional aggregator eu", body
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(eu_endpoint.url.replace("/metrics", "/other"), timeout=5)
        assert missing.value.code == 404

        # A stopped service is unhealthy (the endpoint outlives it here), with the reasons.
        regional.stop()
        code, body = get_json(eu_endpoint.url.replace("/metrics", "/healthz"))
        assert code == 503 and body["status"] == "unhealthy"
        assert any("not connected" in p for p in body["problems"]) and any("loop" in p for p in body["problems"]), body
        assert scrape(eu_endpoint.url).value("fedge_broker_connected") == 0
    finally:
        eu_endpoint.close()
        root_endpoint.close()
