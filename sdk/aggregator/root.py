"""The root aggregator: regions' sealed aggregates in, the next signed global model out.

Round ``r`` at the root::

    G_r          the global model it published for round r
    D_j, N_j     region j's mean delta and its sample count (a sealed ``aggregate``)
    G_{r+1} = G_r + sum_j w_j D_j / sum_j w_j      w_j = N_j ("samples") or 1 ("uniform")

By sample count this equals one flat FedAvg over every device of every
region (the weighted mean is linear), as in HierFAVG (Liu et al., ICC 2020);
``uniform`` lets every region count once. A region that sent nothing leaves
the mean (it is absent, not a zero). Aggregates go through the same intake
as device updates (authentication, one per region and round, validation,
durable exactly-once folding), so a region that resends its aggregate after
a crash is acknowledged, not counted twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from device_agent.protocol.envelope import SenderKeys
from device_agent.protocol.headers import MessageKind, check_id
from sdk.aggregation import AggregationConfig, RegionWeighting
from sdk.aggregator.config import AggregatorConfig, apply_delta
from sdk.aggregator.errors import RoundStateError
from sdk.aggregator.intake import UpdateIntake
from sdk.aggregator.outcomes import HandledUpdate
from sdk.aggregator.records import RoundRecord
from sdk.aggregator.store import AggregatorStore
from sdk.aggregator.tier import AggregatorTier, open_with_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VersionSwitch:
    """A switch of the root to another bundle version at the next round boundary.

    ``config``: the root's config for the new version (its spec and bundle
    version). ``start``: the new version's first global model from the old
    version's last one (the release's ``shared_start``: carried where names and
    shapes match, or the new bundle's own weights).
    """

    config: RootConfig
    start: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class RootConfig(AggregatorConfig):
    """The root aggregator: :class:`AggregatorConfig` plus the root's own settings.

    ``region_keys``: region id -> that region's Ed25519 public key (or a
    lookup returning None for an unknown region); an aggregate's sender must
    be its region. ``root_id``: the id the root signs as. ``weighting``:
    ``"samples"`` or ``"uniform"`` (see the module docstring). ``policy.quorum``
    is a number of regions; ``policy.min_updates`` must be 0: the root always
    moves on at its deadline, with whatever arrived (nothing: G_{r+1} = G_r),
    so a lost aggregate can delay the federation by one deadline, never stall it.
    """

    region_keys: SenderKeys
    root_id: str = "root"
    weighting: RegionWeighting = "samples"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("root_id", self.root_id)
        if self.policy.min_updates != 0:
            raise ValueError("the root's policy.min_updates must be 0: it moves on at its deadline whatever arrived "
                             f"(got {self.policy.min_updates})")
        if self.weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {self.weighting!r}")


class RootAggregator(AggregatorTier):
    """The root over a durable store.

    Phases: :meth:`start_round` once to bootstrap (the signed G_0 to publish),
    :meth:`handle_aggregate` for each region's sealed aggregate, and when
    :meth:`should_close` says so, :meth:`close_round`, which computes G_{r+1},
    starts round r+1 in the same transaction, and returns it signed.
    """

    def __init__(self, config: RootConfig, *, store: AggregatorStore) -> None:
        if not isinstance(config, RootConfig):
            raise TypeError("config must be a RootConfig")
        self._store = store
        super().__init__(config=config, intake=self._make_intake(config), identity=config.root_id)
        self._root = config

    def _make_intake(self, config: AggregatorConfig) -> UpdateIntake:
        assert isinstance(config, RootConfig)
        uniform = config.weighting == "uniform"
        return UpdateIntake(
            config=config,
            store=self._store,
            identity=config.root_id,
            kind=MessageKind.AGGREGATE,
            region=None,
            sender_keys=config.region_keys,
            aggregation=AggregationConfig(rule="mean"),
            weight_of=lambda header: 1.0 if uniform else float(header.sample_count),
            sender_is_region=True,
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: RootConfig, *, member: str = "main") -> RootAggregator:
        """Open (or create) the root's SQLite store at ``path`` as ``member`` and resume where it stood."""
        return open_with_store(path, identity=f"root:{config.fleet}/{config.root_id}", member=member, build=lambda store: cls(config, store=store))

    def start_round(self, round: int, global_params: Mapping[str, np.ndarray]) -> bytes:
        """Start ``round`` with ``global_params`` as G_r: the global model signed for the regions.

        For bootstrapping (or an operator's restart from a chosen model):
        idempotent for the current round, ModelRejectedError ``stale_round``
        for an older one.
        """
        return self._start(round, global_params, self._serve)

    def handle_aggregate(self, blob: bytes | bytearray | memoryview, *, topic_region: str | None = None) -> HandledUpdate:
        """Authenticate, validate and durably count one region's sealed aggregate; never raises for bad input.

        ``topic_region``: the region from the topic it arrived on (None: unchecked).
        """
        return self._intake.handle(blob, topic_sender=topic_region)

    def close_round(self, *, switch: VersionSwitch | None = None) -> bytes:
        """G_{r+1} = G_r + the weighted mean of the regions' deltas, signed; round r+1 starts with it.

        With no aggregate accepted, G_{r+1} = G_r (logged). ``switch``: round r+1
        runs another bundle version (docs/rollout.md): its G_{r+1} is ``switch.start``
        applied to the old G_{r+1}, signed with the new version, and the root
        adopts ``switch.config`` once that round is stored. RoundStateError before the first round.
        """
        with self._intake.write_transaction():
            record = self._intake.store.load_round()
            if record is None:
                raise RoundStateError("no round has started")
            merged = self._intake.merge(record.round)
            if merged.mean_delta is None:
                logger.warning("root round %d closed without any regional aggregate: the global model is unchanged", record.round)
            missing = self._missing_regions(record.round)
            if missing:
                self._intake.count("regions_missing", len(missing))
                logger.warning("root round %d closed without %d region(s): %s", record.round, len(missing), ", ".join(missing))
            new_global = apply_delta(record.global_params, merged.mean_delta)
            version = None
            if switch is not None:
                new_global = switch.start(new_global)
                version = switch.config.bundle_version
            blob = self._sign_model(round=record.round + 1, params=new_global, region=None, bundle_version=version)
            self._intake.write_round_start(previous=record, round=record.round + 1, global_params=new_global,
                                           base_params=new_global, model_blob=blob, fresh_bounds=switch is not None)
            logger.debug(
                "root round %d closed: %d regions, %d samples", record.round, merged.update_count, merged.sample_count
            )
        if switch is not None:
            self.adopt(switch.config)
        self._intake.refresh()
        return blob

    @property
    def config(self) -> RootConfig:
        """The configuration in force (it changes when the root adopts another bundle version)."""
        return self._root

    def adopt(self, config: AggregatorConfig) -> None:
        """Run another bundle version (see :meth:`AggregatorTier.adopt`)."""
        if not isinstance(config, RootConfig):
            raise TypeError("config must be a RootConfig")
        super().adopt(config)
        self._root = config

    def _missing_regions(self, round: int) -> list[str]:
        """Regions with a known key that had no aggregate accepted for ``round`` (empty for a key lookup function)."""
        keys = self._root.region_keys
        if not isinstance(keys, Mapping):
            return []
        reported = {sender for sender, _ in self._intake.store.contributions(round)}
        return sorted(set(keys) - reported)

    def _serve(self, record: RoundRecord | None, round: int, global_params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bytes]:
        return global_params, self._sign_model(round=round, params=global_params, region=None)
