"""FedFomo's server side: every device's latest shared model, and which of them to serve a device.

Zhang et al., "Personalized Federated Learning with First Order Model
Optimization", ICLR 2021 (arXiv:2012.08565): the server keeps each client's
latest model and sends a client the peers it asks for. Here a device's model
is what it trained this round, ``S_r + d_k`` (its delta is measured against
the served model S_r; docs/protocol.md). Pure and in memory: no I/O, so an
aggregator restart starts with an empty pool that refills as devices upload.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.protocol.headers import check_id


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One device's latest shared model (float32) and the round it trained it in."""

    device: str
    round: int
    params: Mapping[str, np.ndarray]


class CandidatePool:
    """At most one model per device (the newest round wins); at most ``max_devices`` devices.

    ``max_devices`` None: unbounded. When full, recording a new device evicts
    the one recorded longest ago. Not thread-safe.
    """

    def __init__(self, *, max_devices: int | None = None) -> None:
        if max_devices is not None and (isinstance(max_devices, bool) or not isinstance(max_devices, int) or max_devices < 1):
            raise ValueError(f"max_devices must be an integer >= 1 or None, got {max_devices!r}")
        self.max_devices = max_devices
        self._models: OrderedDict[str, Candidate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, device: object) -> bool:
        return device in self._models

    def get(self, device: str) -> Candidate | None:
        """The model recorded for ``device``, None when it has none."""
        return self._models.get(device)

    def record(self, device: str, round: int, params: Mapping[str, np.ndarray]) -> bool:
        """Keep ``params`` (copied, float32) as ``device``'s model of ``round``; False (nothing kept) when older than the one held."""
        check_id("device", device)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        held = self._models.get(device)
        if held is not None and held.round > round:
            return False
        self._models.pop(device, None)
        if self.max_devices is not None and len(self._models) >= self.max_devices:
            self._models.popitem(last=False)
        copied = {name: np.array(value, dtype=np.float32) for name, value in params.items()}
        self._models[device] = Candidate(device=device, round=round, params=copied)
        return True

    def choose(self, requester: str, k: int, *, prefer: Sequence[str] = (), rng: np.random.Generator) -> list[Candidate]:
        """Up to ``k`` models for ``requester``: the ``prefer`` ids it holds first (in order), then random others.

        Never the requester's own model and never one device twice; fewer than
        ``k`` (possibly none) when the pool holds fewer other devices.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        picked: list[str] = []
        for device in prefer:
            if len(picked) < k and device != requester and device in self._models and device not in picked:
                picked.append(device)
        others = sorted(d for d in self._models if d != requester and d not in picked)
        fill = min(k - len(picked), len(others))
        if fill > 0:
            picked.extend(others[int(i)] for i in rng.choice(len(others), size=fill, replace=False))
        return [self._models[d] for d in picked]
