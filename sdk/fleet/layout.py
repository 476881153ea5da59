"""Where everything lives in a fleet directory (``fedge fleet init --out FLEET``) and in each provisioning directory.

Fleet directory (the operator's; keep ``keys/`` and ``brokers/pki/`` offline)::

    topology.toml            the topology it was made from (regions, brokers; the device lists there are the first ones)
    inventory.json           the devices as they are now: region, key id; revoked keys (fedge fleet add/remove/rekey/move)
    keys/fleet.key .pub      the bundle signing key (fedge bundle build --key FLEET/keys/fleet.key)
    keys/release/            the release roles' keys (sdk.release.keys; root and targets belong offline)
    release/repository/      the fleet's TUF repository (fedge release publish); release/root.json its trust anchor
    bundles/model.fedge      the fleet's current bundle (copied into every aggregator and device directory)
    brokers/                 fedge broker-config's output: root/ <region>/ (one per broker host), credentials/, pki/
    aggregators/root/        the root service: root.toml, keys/, regions/<region>.pub, bundles/, its store
    aggregators/<region>/    a regional service: regional.toml, keys/, devices/<id>.pub + revoked.txt (the registry)
    aggregators/<middle>/    a middle tier (a region with child regions): middle.toml, keys/, regions/<child>.pub
    devices/<id>/            one self-contained provisioning directory per device (below)
    run/                     pid files of what `fedge fleet up` started (so day-2 commands can signal reloads)

Provisioning directory (what `fedge-device-setup provision DIR` copies to /etc/fedge on a Pi, or what
`fedge-agent run --config DIR/agent.toml` runs in place); every path in agent.toml is relative to it,
except what the agent writes (``[devices] state_dir``)::

    agent.toml
    keys/device.key          the device's Ed25519 identity key (0600); keys/device.pub beside it
    keys/mqtt-password       its broker password (0600)
    keys/fleet.pub           the bundle signing key it trusts
    keys/root.pub keys/region.pub keys/aggregator.x25519.pub   its aggregators' keys
    keys/ca.pem              the fleet CA, when TLS is on (keys/client.crt, keys/client.key with mTLS)
    keys/release/root.json   the release root of trust (TUF root v1; newer roots arrive over MQTT)
    bundles/model.fedge      the bundle it starts from
"""

from __future__ import annotations

from pathlib import PurePosixPath

TOPOLOGY_FILE = PurePosixPath("topology.toml")
INVENTORY_FILE = PurePosixPath("inventory.json")
KEYS_DIR = PurePosixPath("keys")
FLEET_KEY = KEYS_DIR / "fleet.key"
FLEET_PUB = KEYS_DIR / "fleet.pub"
RELEASE_KEYS_DIR = KEYS_DIR / "release"
BUNDLES_DIR = PurePosixPath("bundles")
BUNDLE_FILE = BUNDLES_DIR / "model.fedge"
BROKERS_DIR = PurePosixPath("brokers")
AGGREGATORS_DIR = PurePosixPath("aggregators")
DEVICES_DIR = PurePosixPath("devices")
RUN_DIR = PurePosixPath("run")
ROOT_SITE = "root"

# inside an aggregator directory
ROOT_CONFIG = PurePosixPath("root.toml")
REGIONAL_CONFIG = PurePosixPath("regional.toml")
MIDDLE_CONFIG = PurePosixPath("middle.toml")
SIGNING_KEY = KEYS_DIR / "signing.key"
SIGNING_PUB = KEYS_DIR / "signing.pub"
ENCRYPTION_KEY = KEYS_DIR / "encryption.key"
ENCRYPTION_PUB = KEYS_DIR / "encryption.x25519.pub"
ROOT_VERIFY_PUB = KEYS_DIR / "root.pub"
ROOT_ENCRYPTION_PUB = KEYS_DIR / "root.x25519.pub"
PARENT_VERIFY_PUB = KEYS_DIR / "parent.pub"
"""A tier below a middle tier: its parent's Ed25519 key (right below the root: ``keys/root.pub``)."""
PARENT_ENCRYPTION_PUB = KEYS_DIR / "parent.x25519.pub"
AGGREGATOR_FLEET_PUB = KEYS_DIR / "fleet.pub"
MQTT_PASSWORD = KEYS_DIR / "mqtt-password"
REGISTRY_DIR = PurePosixPath("devices")
REGION_KEYS_DIR = PurePosixPath("regions")
"""The keys of the tiers right below (the root's, a middle tier's ``child_keys_dir``): ``<child>.pub``."""
REVOKED_FILE = REGISTRY_DIR / "revoked.txt"
STORE_FILE = PurePosixPath("store.sqlite")

# inside a device's provisioning directory
AGENT_CONFIG = PurePosixPath("agent.toml")
DEVICE_KEY = KEYS_DIR / "device.key"
DEVICE_PUB = KEYS_DIR / "device.pub"
DEVICE_FLEET_PUB = KEYS_DIR / "fleet.pub"
DEVICE_ROOT_PUB = KEYS_DIR / "root.pub"
DEVICE_REGION_PUB = KEYS_DIR / "region.pub"
DEVICE_AGGREGATOR_PUB = KEYS_DIR / "aggregator.x25519.pub"
DEVICE_CA = KEYS_DIR / "ca.pem"
DEVICE_CLIENT_CERT = KEYS_DIR / "client.crt"
DEVICE_CLIENT_KEY = KEYS_DIR / "client.key"
DEVICE_RELEASE_DIR = KEYS_DIR / "release"
RELEASE_ROOT = PurePosixPath("release") / "root.json"
TRUST_ANCHOR = KEYS_DIR / "release" / "root.json"
"""The release trust anchor inside a device's or an aggregator's directory (``[release] root_file``)."""


def aggregator_dir(site: str) -> PurePosixPath:
    """``aggregators/<site>`` (``root`` or a region name)."""
    return AGGREGATORS_DIR / site


def service_config(tier: str) -> PurePosixPath:
    """The TOML file of a ``root``, ``middle`` or ``regional`` service in its aggregator directory."""
    return {"root": ROOT_CONFIG, "middle": MIDDLE_CONFIG, "regional": REGIONAL_CONFIG}[tier]


def device_dir(device: str) -> PurePosixPath:
    """``devices/<id>``."""
    return DEVICES_DIR / device
