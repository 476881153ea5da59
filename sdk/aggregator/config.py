"""Configuration shared by both aggregator tiers, and the checks on models they are given.

:class:`AggregatorConfig` holds what a regional aggregator and the root have
in common; :class:`~sdk.aggregator.regional.RegionalConfig` and
:class:`~sdk.aggregator.root.RootConfig` extend it with their own fields.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device_agent.parameters import as_float32, check_finite, check_layout
from device_agent.protocol.frame_versions import FRAME_VERSIONS, check_frame_policy
from device_agent.protocol.headers import check_id, check_int
from device_agent.protocol.tensor_codec import DecodeLimits
from device_agent.protocol.validation import ParamSpec
from sdk.aggregator.round_state import RoundPolicy


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """What every aggregator needs.

    ``fleet``: the fleet id. ``encryption_key``: this aggregator's X25519
    private key (senders seal to its public half). ``signing_key``: its
    Ed25519 key (receipts, models it publishes, aggregates it forwards).
    ``spec``: name -> (shape, dtype) of the shared parameters
    (``BundleManifest.shared_spec()``). ``bundle_version``: the bundle every
    update must come from. ``policy``: quorum and deadline. ``norm_bound``:
    the L2 bound on an incoming update (None: unbounded). ``replay_rounds``:
    how many rounds the replay window (and the accepted set) remembers.
    ``update_frames``: the frame versions of sealed updates it opens (default both;
    another is refused as ``malformed``). ``announce_frames``: name them in the
    ``frames`` field of the models it signs, so senders seal the highest one both
    speak; off by default because a device older than that field refuses such a
    model (docs/protocol.md, "Frames": upgrade the devices, then turn it on).
    ``clock``: monotonic seconds, for deadlines. ``wall_clock``: Unix
    seconds, for the timestamps of what this aggregator signs.
    """

    fleet: str
    encryption_key: X25519PrivateKey
    signing_key: Ed25519PrivateKey
    spec: ParamSpec
    bundle_version: int
    policy: RoundPolicy
    norm_bound: float | None = None
    replay_rounds: int = 8
    update_frames: frozenset[int] = FRAME_VERSIONS
    announce_frames: bool = False
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    wall_clock: Callable[[], float] = field(default=time.time, compare=False)

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        if not isinstance(self.encryption_key, X25519PrivateKey):
            raise TypeError("encryption_key must be an X25519PrivateKey")
        if not isinstance(self.signing_key, Ed25519PrivateKey):
            raise TypeError("signing_key must be an Ed25519PrivateKey")
        if not isinstance(self.policy, RoundPolicy):
            raise TypeError("policy must be a RoundPolicy")
        check_int("bundle_version", self.bundle_version)
        spec = {str(name): (tuple(int(d) for d in shape), np.dtype(dtype).name) for name, (shape, dtype) in self.spec.items()}
        if not spec:
            raise ValueError("spec must name at least one shared parameter")
        object.__setattr__(self, "spec", MappingProxyType(spec))
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ValueError(f"norm_bound must be positive and finite or None, got {self.norm_bound}")
        if isinstance(self.replay_rounds, bool) or not isinstance(self.replay_rounds, int) or self.replay_rounds < 1:
            raise ValueError(f"replay_rounds must be an integer >= 1, got {self.replay_rounds!r}")
        frames = frozenset(self.update_frames)
        if not frames or not frames <= FRAME_VERSIONS:
            raise ValueError(f"update_frames must be a non-empty subset of {sorted(FRAME_VERSIONS)}, got {sorted(frames)}")
        object.__setattr__(self, "update_frames", frames)
        if not isinstance(self.announce_frames, bool):
            raise TypeError("announce_frames must be a bool")
        check_frame_policy(frames, self.announce_frames)

    @property
    def announced_frames(self) -> tuple[int, ...] | None:
        """The ``frames`` field of the models this aggregator signs (None: left out, version 1 only)."""
        return tuple(sorted(self.update_frames)) if self.announce_frames else None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of the shared parameters."""
        return {name: shape for name, (shape, _) in self.spec.items()}

    def decode_limits(self) -> DecodeLimits:
        """Decode limits for incoming updates: room for the spec twice over in float64, so that
        a wrong dtype or an extra tensor is still decoded and rejected with its own reason."""
        total = sum(8 * math.prod(shape) for shape in self.shapes.values())
        return DecodeLimits(max_tensors=2 * len(self.spec) + 8, max_total_bytes=2 * total + 4096)


def conform_params(spec: ParamSpec, params: Mapping[str, np.ndarray], *, what: str) -> dict[str, np.ndarray]:
    """``params`` as fresh arrays of the spec's dtypes; ValueError unless names, shapes and finiteness match."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be a mapping of name -> array, got {type(params).__name__}")
    check_layout({name: shape for name, (shape, _) in spec.items()}, params, what=what)
    check_finite(params, what=what)
    return {name: np.array(params[name], dtype=dtype) for name, (_, dtype) in spec.items()}


def apply_delta(params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """``params + delta`` computed in float64 and returned as float32; ``delta`` None gives a float32 copy of ``params``."""
    if delta is None:
        return {name: as_float32(value).copy() for name, value in params.items()}
    return {
        name: as_float32(np.asarray(value, dtype=np.float64) + np.asarray(delta[name], dtype=np.float64))
        for name, value in params.items()
    }
