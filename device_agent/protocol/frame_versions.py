"""Which frame version a sealed update travels in: the recipient announces, the sender picks.

A tier announces the frame versions it opens in the ``frames`` field of the model
headers it signs (absent: version 1 only, as every reader before version 2). A
sender seals the highest version both speak, so a new device never sends a
prehashed frame to an aggregator that cannot read it (docs/protocol.md, "Frames").
"""

from __future__ import annotations

from collections.abc import Iterable

from device_agent.protocol._frame import FRAME_PREHASHED, FRAME_V1, FRAME_VERSIONS

__all__ = ["FRAME_PREHASHED", "FRAME_V1", "FRAME_VERSIONS", "check_frame_policy", "choose_frame_version",
           "parse_frame_versions"]


def choose_frame_version(announced: Iterable[int] | None) -> int:
    """The highest frame version in both ``announced`` and :data:`FRAME_VERSIONS`; None or no overlap: 1.

    No overlap cannot happen with a fedge aggregator (each reads version 1 unless told to refuse it,
    and then it announces what it reads); version 1 is then the one most readers take.
    """
    common = FRAME_VERSIONS.intersection(announced or ())
    return max(common) if common else FRAME_V1


def parse_frame_versions(text: str) -> frozenset[int]:
    """``"1,2"`` / ``"2"`` as a set of frame versions this code reads; ValueError naming the problem."""
    versions: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) not in FRAME_VERSIONS:
            raise ValueError(f"frame version {part!r} is not one of {', '.join(map(str, sorted(FRAME_VERSIONS)))}")
        versions.add(int(part))
    return frozenset(versions)


def check_frame_policy(update_frames: frozenset[int], announce: bool) -> None:
    """ValueError when a tier opening ``update_frames`` could not be sent to: without version 1 it must announce."""
    if FRAME_V1 not in update_frames and not announce:
        raise ValueError("refusing frame version 1 needs announce_frames = true "
                         "(senders seal version 1 unless the model header names another)")
