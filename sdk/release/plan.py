"""Turning a signed bundle and an operator's choices into a :class:`ReleaseInfo` (pure apart from reading the bundle).

:func:`plan_release` checks the bundle against the fleet key first (an
operator cannot publish what devices would refuse), then fills in the
release metadata: targets, canary, expiry, chunking. :func:`pick_canary`
resolves a canary *share* into explicit devices at publish time, so the
canary set is written down in signed metadata (auditable, and the same on
every device and the controller): a deterministic draw per release, spread
over the targeted regions.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle.archive import verify_bundle
from device_agent.bundle.manifest import BundleManifest
from device_agent.errors import BundleError, FedgeError
from device_agent.release.release_info import ReleaseInfo, ReleaseTargets, SharedStart, chunk_digests, release_path

#: Chunk bytes by default: well inside any broker limit fedge generates (topic and MQTT overhead on top).
DEFAULT_CHUNK_SIZE = 64 * 1024
CHUNK_OVERHEAD = 1024
"""Bytes kept free in each packet for the topic and MQTT headers."""


class ReleasePlanError(FedgeError, ValueError):
    """A release cannot be made as asked (bundle, targets, canary); the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class ReleaseChoices:
    """What the operator chose for one release.

    ``targets``: who gets it. ``canary``: explicit canary devices; or
    ``canary_share`` (0 < share <= 1) of the targeted devices, drawn at publish
    time (at least one per targeted region). ``expires_ms``: the release is not
    installed after this. ``chunk_size`` None: :data:`DEFAULT_CHUNK_SIZE`, capped
    to fit ``message_size_limit``. ``max_accuracy_drop_pct``: how far below the
    previous version's validation accuracy a canary may land and still count as healthy.
    """

    targets: ReleaseTargets = ReleaseTargets()
    canary: tuple[str, ...] = ()
    canary_share: float | None = None
    expires_ms: int
    chunk_size: int | None = None
    shared_start: SharedStart = SharedStart.CARRY
    max_accuracy_drop_pct: int = 20


def chunk_size_for(message_size_limit: int, requested: int | None = None) -> int:
    """The chunk size to use under a broker's ``message_size_limit`` (``requested`` capped to fit)."""
    room = message_size_limit - CHUNK_OVERHEAD
    if room < 1024:
        raise ReleasePlanError(f"message_size_limit {message_size_limit} leaves no room for chunks of at least 1 KiB")
    size = DEFAULT_CHUNK_SIZE if requested is None else requested
    if size < 1024:
        raise ReleasePlanError(f"chunk size {size} is below the 1 KiB minimum")
    return min(size, room)


def pick_canary(devices: Mapping[str, str], targets: ReleaseTargets, share: float, *, seed: int,
                groups: Mapping[str, Sequence[str]] | None = None) -> tuple[str, ...]:
    """``share`` of the targeted devices (``devices``: id -> region), at least one per targeted region, drawn with ``seed``."""
    if not 0 < share <= 1:
        raise ReleasePlanError(f"canary share must be in (0, 1], got {share}")
    eligible = sorted(d for d, region in devices.items()
                      if targets.matches(device=d, region=region, groups=tuple((groups or {}).get(d, ()))))
    if not eligible:
        raise ReleasePlanError(f"no device matches the release targets ({targets.describe()})")
    rng = random.Random(seed)
    by_region: dict[str, list[str]] = {}
    for device in eligible:
        by_region.setdefault(devices[device], []).append(device)
    chosen = {rng.choice(members) for _, members in sorted(by_region.items())}
    want = max(len(chosen), math.ceil(share * len(eligible)))
    rest = [d for d in eligible if d not in chosen]
    rng.shuffle(rest)
    chosen.update(rest[: want - len(chosen)])
    return tuple(sorted(chosen))


def plan_release(bundle: Path, *, release: int, fleet: str, fleet_key: Ed25519PublicKey, choices: ReleaseChoices,
                 message_size_limit: int, devices: Mapping[str, str] | None = None) -> tuple[ReleaseInfo, bytes]:
    """The release metadata for ``bundle`` as release ``release`` and the bundle's bytes.

    ReleasePlanError when the bundle does not verify with ``fleet_key``, a canary
    device is unknown or not targeted, or the choices do not fit together.
    """
    try:
        manifest: BundleManifest = verify_bundle(bundle, fleet_key)
        data = bundle.read_bytes()
    except (BundleError, OSError) as exc:
        raise ReleasePlanError(f"{bundle}: not a bundle signed by this fleet's key ({exc})") from exc
    canary = choices.canary
    if choices.canary_share is not None:
        if canary:
            raise ReleasePlanError("give canary devices or a canary share, not both")
        if devices is None:
            raise ReleasePlanError("a canary share needs the fleet's device list")
        canary = pick_canary(devices, choices.targets, choices.canary_share, seed=release)
    if devices is not None:
        unknown = sorted(set(canary) - set(devices))
        if unknown:
            raise ReleasePlanError(f"canary device(s) not in the fleet: {', '.join(unknown)}")
        untargeted = sorted(d for d in canary if not choices.targets.matches(device=d, region=devices[d]))
        if untargeted:
            raise ReleasePlanError(f"canary device(s) not targeted by the release: {', '.join(untargeted)}")
    chunk = chunk_size_for(message_size_limit, choices.chunk_size)
    info = ReleaseInfo(
        path=release_path(release),
        length=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        release=release,
        bundle_version=manifest.bundle_version,
        model_name=manifest.model_name,
        fleet=fleet,
        targets=choices.targets,
        canary=tuple(sorted(canary)),
        expires_ms=choices.expires_ms,
        chunk_size=chunk,
        chunk_sha256=chunk_digests(data, chunk),
        shared_start=choices.shared_start,
        max_accuracy_drop_pct=choices.max_accuracy_drop_pct,
    )
    return info, data
