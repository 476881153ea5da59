"""The aggregators on MQTT: one import for the services and what they share.

- :mod:`~sdk.aggregator.service_base`: the connection, the rate-limited fair inbox, the loop, size-checked publishing.
- :mod:`~sdk.aggregator.regional_service`: :class:`RegionalService` (devices in, receipts and aggregates out).
- :mod:`~sdk.aggregator.root_service`: :class:`RootService` (aggregates in, receipts and global models out).
"""

from __future__ import annotations

from sdk.aggregator.regional_service import RegionalService
from sdk.aggregator.root_service import RootService
from sdk.aggregator.service_base import MqttAggregatorService, ServiceReport, make_client

__all__ = ["MqttAggregatorService", "RegionalService", "RootService", "ServiceReport", "make_client"]
