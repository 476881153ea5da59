"""Fleet directories for the provisioning tests: a loopback topology and ``init_fleet`` on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.fleet.provision import ProvisionedFleet, init_fleet
from sdk.fleet.spec import parse_fleet_spec

#: The device and aggregator sections every test topology shares (the deadline is added by each).
DEVICE_SECTIONS = """
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
"""


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
{DEVICE_SECTIONS}deadline_s = 30
{extra}"""


DEEP_PARENTS = {"eu": None, "eu-a": "eu", "eu-b": "eu", "west": None}
"""The three-level tree of the deep-fleet tests: root -> middle tier eu -> cells eu-a, eu-b; and a two-level region west."""
DEEP_DEVICES = {"eu-a": ["eu-a-d1", "eu-a-d2"], "eu-b": ["eu-b-d1"], "west": ["west-d1"]}


def deep_topology(ports: dict[str, int] | None = None, *, fleet: str = "deep", deadline_s: float = 30) -> str:
    """:data:`DEEP_PARENTS` on 127.0.0.1 (no TLS); ``ports``: site -> plain port (TLS ports are that + 7000)."""
    ports = ports or {site: 22883 + i for i, site in enumerate(("root", *DEEP_PARENTS))}

    def address(name: str) -> str:
        return f'host = "127.0.0.1"\nbind = "127.0.0.1"\nport = {ports[name]}\ntls_port = {ports[name] + 7000}\n'

    text = f"""
[fleet]
name = "{fleet}"
message_size_limit = 1048576

[tls]
enabled = false

[root]
{address("root")}aggregators = ["root-agg"]
"""
    for name, parent in DEEP_PARENTS.items():
        text += f"""
[[regions]]
name = "{name}"
{address(name)}aggregators = ["{name}-agg"]
devices = {json.dumps(DEEP_DEVICES.get(name, []))}
""" + (f'parent = "{parent}"\n' if parent else "")
    return text + f"""{DEVICE_SECTIONS}deadline_s = {deadline_s}
"""


@pytest.fixture
def make_fleet(tmp_path: Path, fleet_key: Ed25519PrivateKey, bundle_factory) -> Callable[..., ProvisionedFleet]:
    """make_fleet(**topology_kwargs) -> a fleet directory under tmp_path with the digits bundle, owner left alone
    (``deep=True``: the three-level :func:`deep_topology`)."""
    count = iter(range(100))

    def make(*, bundle: bool = True, out: Path | None = None, deep: bool = False, **kwargs) -> ProvisionedFleet:
        text = deep_topology(**kwargs) if deep else loopback_topology(**kwargs)
        return init_fleet(parse_fleet_spec(text), out or tmp_path / f"fleet{next(count)}", topology_text=text,
                          fleet_key=fleet_key, bundle=bundle_factory("fedavg") if bundle else None)

    return make
