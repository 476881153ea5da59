"""A dashboard configuration from a fleet directory (``fedge fleet init``'s output), so ``--fleet DIR`` is enough.

It reads what ``fedge fleet status`` reads: the monitoring account's
credentials for the root broker (every region's statuses are bridged
there), each region's device registry, and in addition the root's signing
key (to verify the round announcements), the release root of trust
(``release/root.json``, to verify the rollout's stage) and the ``[metrics]`` table of each
aggregator's TOML (an endpoint with a fixed port becomes a scrape URL).
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from device_agent.daemon.errors import ConfigError
from device_agent.keys import load_verify_key
from device_agent.protocol.envelope import SenderKeys
from sdk.dashboard.config import DashboardConfig, MonitorBroker

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)


def config_from_fleet(directory: Path, *, metrics: Sequence[str] = ()) -> DashboardConfig:
    """The dashboard of the fleet in ``directory`` (ConfigError naming what is missing); ``metrics`` adds URLs."""
    from device_agent.errors import FedgeError
    from sdk.fleet.tiers import tier_of
    from sdk.fleet import layout
    from sdk.fleet.day2 import open_fleet
    from sdk.fleet.status_fetch import monitor_endpoints

    try:
        opened = open_fleet(directory)
        topology = opened.spec.topology
        if topology.monitor is None:
            raise ConfigError(f"{directory}: this fleet has no monitoring account ([monitor] in its topology)")
        root = monitor_endpoints(opened.directory, topology.monitor)[layout.ROOT_SITE]
    except FedgeError as exc:
        raise ConfigError(str(exc)) from exc
    registries: dict[str, SenderKeys] = dict(opened.registries())  # the regions devices join (middle tiers have none)
    root_dir = opened.directory / layout.aggregator_dir(layout.ROOT_SITE)
    model_keys = {}
    signing = root_dir / layout.SIGNING_PUB
    if signing.is_file():
        model_keys["root"] = load_verify_key(signing)
    urls = [*_metrics_url(root_dir / layout.ROOT_CONFIG)]
    for region in topology.regions:
        config = layout.service_config(tier_of(topology, region.name).value)
        urls += _metrics_url(opened.directory / layout.aggregator_dir(region.name) / config)
    urls += [u for u in metrics if u not in urls]
    broker = MonitorBroker(host=root.host, port=root.port, username=root.username, password=root.password,
                           ca_file=root.ca_file, cert_file=root.cert_file, key_file=root.key_file, role="root",
                           max_packet_size=topology.message_size_limit)
    try:
        release_root = opened.directory / layout.RELEASE_ROOT
        return DashboardConfig(fleet=topology.fleet, topic_prefix=topology.topic_prefix, mqtt=broker,
                               registries=registries, model_keys=model_keys, metrics=tuple(urls),
                               release_root=release_root if release_root.is_file() else None)
    except ValueError as exc:
        raise ConfigError(f"{directory}: {exc}") from exc


def _metrics_url(config: Path) -> list[str]:
    """The scrape URL of a service TOML's ``[metrics]`` (none without the table, or with port 0)."""
    try:
        table = tomllib.loads(config.read_text(encoding="utf-8")).get("metrics")
    except (OSError, ValueError):
        return []
    if not isinstance(table, dict) or not isinstance(table.get("port"), int) or table["port"] == 0:
        return []
    bind = str(table.get("bind", "127.0.0.1"))
    try:
        address = ipaddress.ip_address(bind)
    except ValueError:
        return []
    host = "127.0.0.1" if address.is_unspecified else bind  # a service listening everywhere is reached locally
    host = f"[{host}]" if ":" in host else host
    return [f"http://{host}:{table['port']}/metrics"]
