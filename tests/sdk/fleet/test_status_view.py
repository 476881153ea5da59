"""The fleet status view: verified rows, forged and malformed ones shown as such, silent devices listed."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.protocol.status import DeviceStatus, ReleaseStatus, sign_status
from device_agent.protocol.topics import TopicLayout
from sdk.fleet.status_view import FORGED, MALFORMED, MISSING, VERIFIED, build_view, render_table

LAYOUT = TopicLayout(fleet="lab")


def _status(device: str, region: str, **changes) -> DeviceStatus:
    values = dict(fleet="lab", region=region, device=device, sequence=1, timestamp_ms=1, online=True, agent_version="0.1.0",
                  bundle_model="digits", bundle_version=2, backend="portable", last_round=5, last_round_status="accepted",
                  last_loss=0.25, last_val_accuracy=0.9, free_memory_bytes=300 * 2**20)
    values.update(changes)
    return DeviceStatus(**values)


def test_status_view_verifies_each_status_against_its_regions_registry() -> None:
    a, b, c = (Ed25519PrivateKey.generate() for _ in range(3))
    registries = {"eu": {"eu-1": a.public_key(), "eu-2": b.public_key()}, "us": {"us-1": c.public_key()}}
    expected = {"eu-1": "eu", "eu-2": "eu", "us-1": "us", "us-2": "us"}
    refused = ReleaseStatus(state="refused", version=3, reason="metadata expired")
    messages = [
        (LAYOUT.region_device_status("eu", "eu-1"), sign_status(_status("eu-1", "eu", release=refused), signer_key=a)),
        (LAYOUT.region_device_status("eu", "eu-2"), sign_status(_status("eu-2", "eu"), signer_key=a)),  # eu-1 forges eu-2
        (LAYOUT.region_device_status("us", "us-1"), b"FDGS\x01junk"),
        (LAYOUT.region_device_status("eu", "us-1"), sign_status(_status("us-1", "us"), signer_key=c)),  # on eu's subtree
        (LAYOUT.region_device_status("us", "us-2"), b""),  # a cleared topic
    ]
    view = build_view(layout=LAYOUT, regions=["eu", "us"], registries=registries, expected=expected, messages=messages)
    assert view.row("eu-1").verdict == VERIFIED and view.row("eu-1").status.release.reason == "metadata expired"
    assert view.row("eu-2").verdict == FORGED and view.row("eu-2").status is None
    assert view.row("us-2").verdict == MISSING
    rows = {(r.device, r.region): r for rows in view.regions.values() for r in rows}
    assert rows[("us-1", "us")].verdict == MALFORMED
    assert rows[("us-1", "eu")].verdict in (FORGED, MALFORMED) and rows[("us-1", "eu")].status is None
    table = render_table(view)
    assert "refused v3: metadata expired" in table and "FORGED OR UNKNOWN KEY" in table and "never reported" in table


def test_status_view_json_has_no_nan_and_keeps_the_loss_verdict() -> None:
    key = Ed25519PrivateKey.generate()
    message = (LAYOUT.region_device_status("eu", "eu-1"), sign_status(_status("eu-1", "eu", last_loss=float("nan")),
                                                                      signer_key=key))
    view = build_view(layout=LAYOUT, regions=["eu"], registries={"eu": {"eu-1": key.public_key()}},
                      expected={"eu-1": "eu"}, messages=[message])
    row = json.loads(json.dumps(view.to_json(), allow_nan=False))["regions"]["eu"][0]
    assert row["last_loss"] is None and row["loss_finite"] is False and row["bundle_version"] == 2
    assert "nan" in render_table(view)


def test_status_view_lists_a_status_from_a_device_no_region_registers() -> None:
    key = Ed25519PrivateKey.generate()
    message = (LAYOUT.device_status("ghost"), sign_status(_status("ghost", "eu"), signer_key=key))
    view = build_view(layout=LAYOUT, regions=["eu"], registries={"eu": {}}, expected={}, messages=[message])
    row = view.row("ghost")
    assert row.verdict == FORGED and not row.registered and row.status is None
