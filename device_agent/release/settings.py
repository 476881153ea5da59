"""The ``[release]`` settings of a device (parsed from agent.toml by :mod:`device_agent.daemon.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class ReleaseSettings:
    """The ``[release]`` table of agent.toml.

    ``root_file``: the fleet's TUF ``root.json`` from provisioning (the trust
    anchor; newer roots are followed). ``groups``: device groups for targeting.
    ``window`` chunk subscriptions at a time, ``chunks_per_s`` at most,
    ``chunk_timeout_s`` before asking again. ``settle_s``: quiet time after the
    last metadata message before a refresh; ``recheck_s``: refresh at least this
    often. ``trial_epochs``: local epochs of the health trial on a new version
    (None: the round budget's).
    """

    root_file: Path
    groups: tuple[str, ...] = ()
    window: int = 4
    chunks_per_s: float = 20.0
    chunk_timeout_s: float = 15.0
    settle_s: float = 0.5
    recheck_s: float = 300.0
    trial_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.window < 1 or not self.chunks_per_s > 0 or not self.chunk_timeout_s > 0:
            raise ValueError("window must be >= 1, chunks_per_s and chunk_timeout_s > 0")
        if self.settle_s < 0 or not self.recheck_s > 0:
            raise ValueError("settle_s must be >= 0 and recheck_s > 0")
