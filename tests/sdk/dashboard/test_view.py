"""FleetView: which status wins, what the snapshot says, problems and the rollout summary."""

from __future__ import annotations

import json

from device_agent.protocol.status import DeviceStatus, ReleaseStatus
from sdk.dashboard.view import MAX_DEVICE_ROWS, FleetView


def _status(device: str, *, ts: int, seq: int = 0, online: bool = True, region: str = "eu", **fields) -> DeviceStatus:
    return DeviceStatus(fleet="f", region=region, device=device, sequence=seq, timestamp_ms=ts, online=online,
                        agent_version="0.1.0", **fields)


def test_view_keeps_the_newest_status_but_always_takes_an_offline_will() -> None:
    view = FleetView(fleet="f", wall_clock=lambda: 1000.0)
    assert view.apply_status(_status("a", ts=5000, seq=4, bundle_version=2))
    assert not view.apply_status(_status("a", ts=4000, seq=9, bundle_version=1))  # older: ignored
    assert view.apply_status(_status("a", ts=1000, seq=0, online=False))  # the will, built at connect time
    [row] = view.snapshot()["devices"]
    assert row["online"] is False
    assert not view.apply_status(_status("a", ts=900, seq=0, online=False))  # offline and older than held: ignored


def test_view_snapshot_summarises_and_is_json() -> None:
    view = FleetView(fleet="f", wall_clock=lambda: 100.0)
    view.apply_status(_status("a", ts=99_000, bundle_model="m", bundle_version=2, backend="portable", last_round=3,
                              last_round_status="accepted", last_val_accuracy=0.8, last_loss=float("inf")))
    view.apply_status(_status("b", ts=99_000, region="us", bundle_model="m", bundle_version=3, last_round=3,
                              last_round_status="failed", last_round_reason="non-finite loss", last_val_accuracy=0.6,
                              release=ReleaseStatus(state="installed", version=3, progress=100)))
    view.apply_status(_status("c", ts=99_000, online=False, region="us",
                              release=ReleaseStatus(state="fetching", version=3, progress=40)))
    view.apply_bridge("us", False)
    view.reject("status")
    snap = view.snapshot()
    json.dumps(snap, allow_nan=False)
    assert snap["summary"] | {} == {"devices": 3, "online": 2, "regions": 2, "round": None, "collecting": None,
                                    "root_model_round": None}
    assert [r["device"] for r in snap["devices"]] == ["c", "b", "a"]  # offline first, then failing
    assert snap["devices"][2]["loss"] is None and snap["devices"][2]["loss_text"] == "inf"
    assert snap["versions"] == [{"model": "", "version": None, "devices": 1}, {"model": "m", "version": 2, "devices": 1},
                                {"model": "m", "version": 3, "devices": 1}]
    assert snap["backends"] == {"portable": 1, "unknown": 2}
    [release] = snap["release"]["releases"]
    assert release == {"version": 3, "devices": 2, "states": {"fetching": 1, "installed": 1}, "installed": 1,
                       "running": 1, "failed": 0}
    assert snap["problems"] == ["bridge of region us to the root is down", "1 device(s) offline",
                                "1 device(s) whose last round was not accepted",
                                "1 status or model message(s) refused (see below)"]
    regions = {r["region"]: r for r in snap["regions"]}
    assert regions["eu"]["accuracy"] == 0.8 and regions["us"]["bridge"] == "down"


def test_view_caps_device_rows() -> None:
    view = FleetView(fleet="f")
    for i in range(MAX_DEVICE_ROWS + 7):
        view.apply_status(_status(f"d{i}", ts=1))
    snap = view.snapshot()
    assert len(snap["devices"]) == MAX_DEVICE_ROWS and snap["devices_left_out"] == 7
