"""A middle tier: its children's sealed aggregates in, one sealed aggregate per round out to its parent.

With a middle tier the hierarchy is as deep as the operator wants
(root -> regions -> cells -> devices, or deeper): a middle tier is a region
whose members are aggregators instead of devices. Towards its parent it is
exactly a :class:`~sdk.aggregator.regional.RegionalAggregator` (it starts
rounds from its parent's signed model, serves its children a mixed model
signed with its own key, seals one aggregate per round to its parent with
the devices it counted, stores it and resends it until the parent's signed
receipt). Towards its children it is exactly the root: each child's
aggregate runs through the same exactly-once intake (authenticated, one per
child and round, validated, folded in one transaction, receipt signed after
the commit), weighted by the child's sample count, with no influence
bounds (a child's aggregate is already a bounded mean; bounds apply where
updates come from devices).

Round ``r`` at middle tier ``m`` with children ``j`` (notation of docs/aggregation.md)::

    M_r   the model m's parent served it for round r (G_r when the parent is the root)
    S_r   = a * R_{r-1} + (1 - a) * M_r      the model m serves its children (a = regional_weight)
    D_r   = sum_j N_j D_j / sum_j N_j        N_j: child j's sample count, D_j: its mean delta
    N     = sum_j N_j                        m's sample count; its @contributors is the union of its children's
    R_r   = S_r + D_r

With ``a = 0`` at every tier every served model is G_r and G_{r+1} is the
flat sample-weighted mean over every device below the root (the mean is
linear), as in multi-level HierFAVG (Liu et al., ICC 2020). A device listed
by two children of one middle tier is refused there as ``device_overlap``;
listed by two branches, at the first tier where the branches meet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from device_agent.protocol.envelope import SenderKeys
from device_agent.protocol.headers import MessageKind
from sdk.aggregation import AggregationConfig
from sdk.aggregation.influence import InfluencePolicy
from sdk.aggregator.config import AggregatorConfig
from sdk.aggregator.intake import UpdateIntake
from sdk.aggregator.outcomes import HandledUpdate
from sdk.aggregator.regional import RegionalAggregator, RegionalConfig
from sdk.aggregator.store import AggregatorStore
from sdk.aggregator.tier import open_with_store


@dataclass(frozen=True, kw_only=True)
class MiddleConfig(RegionalConfig):
    """A middle tier: :class:`RegionalConfig` whose ``device_keys`` are its children's keys (child id -> Ed25519
    public key, or a lookup returning None for an unknown child; :attr:`child_keys`).

    ``region`` is the tier's id (its children's ``parent``); ``parent``,
    ``root_verify_key`` and ``root_encryption_key`` name the tier above (None
    and the root's keys right below the root). Children are combined by their
    sample counts with the mean: ``aggregation`` must stay the mean,
    ``influence`` the default (unused: bounds apply at the tiers that take
    device updates) and FedFomo off. ``policy.quorum`` counts children.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aggregation.rule != "mean":
            raise ValueError("a middle tier combines its children's aggregates with the mean "
                             f"(aggregation.rule {self.aggregation.rule!r})")
        if self.influence != InfluencePolicy():
            raise ValueError("a middle tier does not bound influence: its children's aggregates are bounded means "
                             "(set [influence] at the tiers that take device updates)")
        if self.fomo_candidates:
            raise ValueError("FedFomo is served by the tiers that take device updates, not by a middle tier")

    @property
    def child_keys(self) -> SenderKeys:
        """The children's public keys (the same object as ``device_keys``)."""
        return self.device_keys


class MiddleAggregator(RegionalAggregator):
    """A middle tier over a durable store (module docstring).

    Phases: :meth:`handle_root_model` (the parent's model) starts a round and
    gives the model to publish for the children; :meth:`handle_aggregate`
    takes each child's sealed aggregate; when :meth:`should_close` says so,
    :meth:`close_round` gives the sealed aggregate for the parent, which
    :meth:`pending_aggregate` returns until :meth:`handle_root_receipt` stores
    the parent's answer.
    """

    def __init__(self, config: MiddleConfig, *, store: AggregatorStore) -> None:
        if not isinstance(config, MiddleConfig):
            raise TypeError("config must be a MiddleConfig")
        super().__init__(config, store=store)

    def _make_intake(self, config: AggregatorConfig) -> UpdateIntake:
        if not isinstance(config, MiddleConfig):
            raise TypeError("config must be a MiddleConfig")
        return UpdateIntake(
            config=config,
            store=self._store,
            identity=config.region,
            kind=MessageKind.AGGREGATE,
            region=None,
            sender_keys=config.device_keys,
            aggregation=AggregationConfig(rule="mean"),
            weight_of=lambda header: float(header.sample_count),
            sender_is_region=True,
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: RegionalConfig, *, member: str = "main",
             rng: np.random.Generator | None = None) -> MiddleAggregator:
        """Open (or create) the middle tier's SQLite store at ``path`` as ``member`` and resume where it stood
        (``rng`` is unused: no FedFomo here)."""
        if not isinstance(config, MiddleConfig):
            raise TypeError("config must be a MiddleConfig")
        return open_with_store(path, identity=f"middle:{config.fleet}/{config.region}", member=member,
                               build=lambda store: cls(config, store=store))

    def handle_aggregate(self, blob: bytes | bytearray | memoryview, *, topic_child: str | None = None) -> HandledUpdate:
        """Authenticate, validate and durably count one child's sealed aggregate; never raises for bad input.

        ``topic_child``: the child id from the topic it arrived on (None: unchecked).
        """
        return self._intake.handle(blob, topic_sender=topic_child)

    def handle_update(self, blob: bytes | bytearray | memoryview, *, topic_device: str | None = None) -> HandledUpdate:
        """Same as :meth:`handle_aggregate`: a middle tier takes aggregates only (a device update is refused as ``kind``)."""
        return self.handle_aggregate(blob, topic_child=topic_device)

    def _contributors(self, round: int) -> list[tuple[str, int]]:
        """The union of the children's contributor lists of ``round`` (each device once, with its bounded weight)."""
        return self._intake.store.counted_contributors(round)
