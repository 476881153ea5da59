"""Fleet directories for the provisioning tests: a loopback topology and ``init_fleet`` on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.fleet.provision import ProvisionedFleet, init_fleet
from sdk.fleet.spec import parse_fleet_spec


def loopback_topology(ports: dict[str, tuple[int, int]] | None = None, *, tls: bool = False, mtls: bool = False,
                      extra: str = "", fleet: str = "lab") -> str:
    """Root + regions eu (2 devices) and us (2 devices from a pattern) on 127.0.0.1; ``ports``: broker -> (plain, tls)."""
    ports = ports or {"root": (21883, 28883), "eu": (21884, 28884), "us": (21885, 28885)}

    def address(name: str) -> str:
        plain, secure = ports[name]
        return f'host = "127.0.0.1"\nbind = "127.0.0.1"\nport = {plain}\ntls_port = {secure}\n'

    return f"""
[fleet]
name = "{fleet}"
message_size_limit = 1048576

[tls]
enabled = {str(tls).lower()}
require_client_certs = {str(mtls).lower()}

[root]
{address("root")}aggregators = ["root-agg"]

[[regions]]
name = "eu"
{address("eu")}aggregators = ["eu-agg"]
devices = ["eu-dev-0001", "eu-dev-0002"]

[[regions]]
name = "us"
{address("us")}aggregators = ["us-agg"]
device_count = 2

[devices]
state_dir = "var"

[devices.training]
epochs = 1
batch_size = 32
threads = 1

[devices.submit]
receipt_timeout_s = 10.0
max_attempts = 5

[devices.backoff]
initial_s = 0.5
max_s = 5.0

[aggregators]
deadline_s = 30
{extra}"""


@pytest.fixture
def make_fleet(tmp_path: Path, fleet_key: Ed25519PrivateKey, bundle_factory) -> Callable[..., ProvisionedFleet]:
    """make_fleet(**topology_kwargs) -> a fleet directory under tmp_path with the digits bundle, owner left alone."""
    count = iter(range(100))

    def make(*, bundle: bool = True, out: Path | None = None, **kwargs) -> ProvisionedFleet:
        text = loopback_topology(**kwargs)
        return init_fleet(parse_fleet_spec(text), out or tmp_path / f"fleet{next(count)}", topology_text=text,
                          fleet_key=fleet_key, bundle=bundle_factory("fedavg") if bundle else None)

    return make
