"""The fleet as ``fedge fleet status`` shows it: every retained status verified, one row per device, per region.

Pure: retained messages (topic, payload) and the registries in, a
:class:`FleetView` out. Each status is opened with
:func:`~device_agent.protocol.status.open_status` against the key its
region's registry holds for the device the topic names; anything that does
not verify is shown as ``forged or unknown key`` or ``malformed``, with
nothing from its content, because nothing in it can be trusted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from device_agent.errors import AuthenticationError, MalformedMessageError
from device_agent.protocol.envelope import SenderKeys
from device_agent.protocol.status import DeviceStatus, open_status
from device_agent.protocol.topics import TopicLayout

VERIFIED, FORGED, MALFORMED, MISSING = "verified", "forged or unknown key", "malformed", "never reported"


@dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """One device's line: ``verdict`` says whether ``status`` (None unless verified) can be trusted."""

    device: str
    region: str
    verdict: str
    status: DeviceStatus | None = None
    detail: str = ""
    registered: bool = True


@dataclass(frozen=True, kw_only=True)
class FleetView:
    """Rows by region (regions in topology order, devices sorted)."""

    fleet: str
    regions: Mapping[str, tuple[DeviceRow, ...]]

    def row(self, device: str) -> DeviceRow:
        """The row of ``device``; KeyError when it appears nowhere."""
        for rows in self.regions.values():
            for row in rows:
                if row.device == device:
                    return row
        raise KeyError(device)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (``--json``): floats that are not finite become null, as everywhere in fedge's output."""
        return {"fleet": self.fleet, "regions": {r: [_row_json(row) for row in rows] for r, rows in self.regions.items()}}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _row_json(row: DeviceRow) -> dict[str, Any]:
    out: dict[str, Any] = {"device": row.device, "region": row.region, "verdict": row.verdict, "registered": row.registered}
    if row.detail:
        out["detail"] = row.detail
    status = row.status
    if status is not None:
        out.update(
            online=status.online, timestamp_ms=status.timestamp_ms, sequence=status.sequence,
            agent_version=status.agent_version, bundle_model=status.bundle_model, bundle_version=status.bundle_version,
            backend=status.backend, last_round=status.last_round, last_round_status=status.last_round_status,
            last_round_reason=status.last_round_reason, last_loss=_finite(status.last_loss),
            loss_finite=status.loss_is_finite if status.last_loss is not None else None,
            last_val_accuracy=_finite(status.last_val_accuracy), free_memory_bytes=status.free_memory_bytes,
            uptime_s=status.uptime_s, release=status.release.to_dict(),
        )
    return out


def _verify(payload: bytes, *, fleet: str, device: str, region: str | None, keys: SenderKeys) -> tuple[str, DeviceStatus | None, str]:
    try:
        return VERIFIED, open_status(payload, device_keys=keys, fleet=fleet, device=device, region=region), ""
    except AuthenticationError:
        return FORGED, None, "the signature does not verify with the registered key of this device"
    except MalformedMessageError as exc:
        return MALFORMED, None, str(exc)


def build_view(
    *,
    layout: TopicLayout,
    regions: Iterable[str],
    registries: Mapping[str, SenderKeys],
    expected: Mapping[str, str],
    messages: Iterable[tuple[str, bytes]],
) -> FleetView:
    """The view of ``messages`` (retained ``(topic, payload)`` from statuses, regional or root form).

    ``registries``: region -> its device keys. ``expected``: device -> region
    (the inventory): devices that sent nothing are listed as never reported;
    statuses from devices not in the inventory are listed, unregistered.
    """
    order = list(regions)
    rows: dict[tuple[str, str], DeviceRow] = {}
    for topic, payload in messages:
        source = layout.status_source(topic)
        if source is None or not payload:  # an empty retained message clears a topic: nothing to show
            continue
        topic_region, device = source
        region = topic_region or expected.get(device)
        if region is None or region not in registries:
            rows[(device, region or "?")] = DeviceRow(device=device, region=region or "?", verdict=FORGED,
                                                      detail="no region registers this device", registered=False)
            continue
        verdict, status, detail = _verify(payload, fleet=layout.fleet, device=device, region=topic_region or region,
                                          keys=registries[region])
        rows[(device, region)] = DeviceRow(device=device, region=region, verdict=verdict, status=status, detail=detail,
                                           registered=expected.get(device) == region)
    for device, region in expected.items():
        rows.setdefault((device, region), DeviceRow(device=device, region=region, verdict=MISSING))
    for _, region in rows:
        if region not in order:
            order.append(region)
    return FleetView(fleet=layout.fleet, regions={
        region: tuple(sorted((r for (_, rg), r in rows.items() if rg == region), key=lambda r: r.device))
        for region in order})


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else str(value)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def render_table(view: FleetView) -> str:
    """The human table: one block per region."""
    head = ("device", "online", "bundle", "backend", "last round", "loss", "val acc", "free mem", "release")
    out = [f"fleet {view.fleet}"]
    for region, rows in view.regions.items():
        online = sum(1 for r in rows if r.status is not None and r.status.online)
        out.append(f"\nregion {region}: {len(rows)} devices, {online} online")
        table = [head]
        for row in rows:
            s = row.status
            if s is None:
                table.append((row.device, row.verdict.upper() if row.verdict != MISSING else "-", "-", "-", "-", "-", "-",
                              "-", row.detail[:60] if row.verdict != MISSING else "never reported"))
                continue
            bundle = "-" if s.bundle_version is None else f"{s.bundle_model or '?'} v{s.bundle_version}"
            last = "-" if s.last_round is None else f"{s.last_round} {s.last_round_status}".strip()
            release = s.release.state.value + ("" if s.release.version is None else f" v{s.release.version}")
            if s.release.state.value in ("fetching", "verifying", "installing"):
                release += f" {s.release.progress}%"
            if s.release.reason:
                release += f": {s.release.reason}"
            name = row.device if row.registered else f"{row.device} (not in inventory)"
            table.append((name, "yes" if s.online else "no", bundle, s.backend or "-",
                          last, _fmt(s.last_loss, ".4f"), _fmt(s.last_val_accuracy, ".3f"), _mib(s.free_memory_bytes),
                          release))
        widths = [max(len(str(line[i])) for line in table) for i in range(len(head))]
        out += ["  " + "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join(out) + "\n"
