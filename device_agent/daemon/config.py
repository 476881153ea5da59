"""The agent's configuration: one TOML file, parsed and validated here and nowhere else.

Every problem raises :class:`~device_agent.daemon.errors.ConfigError` naming
the file and the dotted key (``agent.toml: broker.port: expected an integer
in 1..65535, got 'abc'``); unknown keys are errors too, so a typo never
silently falls back to a default. Relative paths are resolved against the
directory of the config file. Key and certificate files must exist when the
config is loaded; the bundle archive, install and state directories and the
data file are checked when the agent opens them. See ``examples/agent.toml``
and ``docs/device-agent.md`` for every key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from device_agent.daemon.backoff import BackoffPolicy
from device_agent.daemon.errors import ConfigError
from device_agent.daemon.toml_table import TomlTable
from device_agent.protocol.headers import MAX_CANDIDATES, check_id
from device_agent.protocol.tensor_codec import Encoding, payload_version
from device_agent.protocol.topics import TopicLayout
from device_agent.release.settings import ReleaseSettings
from device_agent.trainer import TrainBudget
from device_agent.training_backends import BackendName

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

class OversizePolicy(str, Enum):
    """What to do with a payload over the broker limit: split it into chunk frames, or refuse it."""

    CHUNK = "chunk"
    REFUSE = "refuse"


class DataFormat(str, Enum):
    """How to read the local data file; ``auto`` picks by suffix (``.csv``, else ``.npz``)."""

    AUTO = "auto"
    NPZ = "npz"
    CSV = "csv"


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """TLS towards the broker. ``ca_file`` None uses the system trust store; cert and key (mTLS) come together or not at all."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """How to reach the regional broker.

    ``username`` None sends the device id (Mosquitto ACL patterns use ``%u``);
    ``password`` / ``password_file`` None: no password. ``tls`` None: plain TCP.
    ``max_packet_size`` is the largest PUBLISH the agent sends (set it to the
    fleet's ``message_size_limit``); bigger payloads follow ``oversized``.
    """

    host: str
    port: int = 1883
    keepalive_s: int = 60
    connect_timeout_s: float = 10.0
    max_packet_size: int = 256 * 1024
    oversized: OversizePolicy = OversizePolicy.CHUNK
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    tls: TlsConfig | None = None

    def read_password(self) -> str | None:
        """The password (the file's first line when ``password_file`` is set), or None for none."""
        passwords = self.read_passwords()
        return passwords[0] if passwords else (None if self.password_file is None else "")

    def read_passwords(self) -> tuple[str, ...]:
        """The passwords to try, in order, read now: ``password``, or ``password_file``'s first two non-empty lines.

        Empty for no password. The connection reads the file before every connect
        attempt and moves to the second line when the broker refuses the first,
        so a password can be rotated on a running device (docs/broker.md).
        OSError when the file cannot be read.
        """
        if self.password_file is not None:
            lines = [line for line in self.password_file.read_text(encoding="utf-8").splitlines() if line]
            return tuple(lines[:2])
        return () if self.password is None else (self.password,)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The device's local training data: an ``.npz`` with arrays ``x_key``/``y_key`` or a numeric CSV.

    ``label_column`` (CSV) is a header name or an index; ``feature_shape`` None keeps rows flat.
    ``validation_path``: held-out data in the same format, used by FedFomo (None: none).
    """

    path: Path
    validation_path: Path | None = None
    format: DataFormat = DataFormat.AUTO
    x_key: str = "x"
    y_key: str = "y"
    label_column: int | str = -1
    feature_shape: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything ``fedge-agent run`` needs. Build it with :func:`load_config` / :func:`parse_config`.

    ``bundle_path`` None: use what is installed in ``install_dir``. ``receipt_signers``
    defaults to ``model_signers``. ``threads`` None lets ONNX Runtime choose;
    ``seed`` None shuffles with fresh randomness each round. ``fomo_candidates``:
    FedFomo peers to ask the region for each round (0: off), answered within
    ``fomo_timeout_s``; it needs ``data.validation_path``. ``backend``: the training
    backend (``auto`` chooses from what is installed and what the bundle carries).
    ``release`` None: the device does not follow releases (no ``[release]`` table).
    """

    device_id: str
    fleet: str
    region: str
    broker: BrokerConfig
    bundle_path: Path | None
    install_dir: Path
    state_dir: Path
    fleet_public_key: Path
    device_private_key: Path
    aggregator_public_key: Path
    model_signers: tuple[Path, ...]
    receipt_signers: tuple[Path, ...]
    data: DataConfig
    budget: TrainBudget = TrainBudget()
    threads: int | None = None
    backend: BackendName = BackendName.AUTO
    seed: int | None = None
    encoding: Encoding = Encoding.RAW
    fomo_candidates: int = 0
    fomo_timeout_s: float = 10.0
    receipt_timeout_s: float = 30.0
    max_attempts: int = 5
    backoff: BackoffPolicy = BackoffPolicy()
    release: ReleaseSettings | None = None

    @property
    def topics(self) -> TopicLayout:
        """The fleet's topic layout."""
        return TopicLayout(fleet=self.fleet)


def _tls(t: TomlTable | None) -> TlsConfig | None:
    if t is None:
        return None
    tls = TlsConfig(
        ca_file=t.path("ca_file", None, must_exist=True),
        cert_file=t.path("cert_file", None, must_exist=True),
        key_file=t.path("key_file", None, must_exist=True),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise t.error("cert_file" if tls.cert_file is None else "key_file", "cert_file and key_file go together (mTLS)")
    t.done()
    return tls


def _broker(t: TomlTable) -> BrokerConfig:
    password = t.string("password", None)
    password_file = t.path("password_file", None, must_exist=True)
    if password is not None and password_file is not None:
        raise t.error("password_file", "give password or password_file, not both")
    broker = BrokerConfig(
        host=t.string("host"),
        port=t.integer("port", 1883, minimum=1, maximum=65535),
        keepalive_s=t.integer("keepalive_s", 60, minimum=5, maximum=65535),
        connect_timeout_s=t.number("connect_timeout_s", 10.0, positive=True),
        # Below ~1 KiB a chunk frame (76-byte header) plus the topic leaves almost no room for data.
        max_packet_size=t.integer("max_packet_size", 256 * 1024, minimum=1024, maximum=268_435_455),
        oversized=t.choice("oversized", OversizePolicy, OversizePolicy.CHUNK),
        username=t.string("username", None),
        password=password,
        password_file=password_file,
        tls=_tls(t.optional_table("tls")),
    )
    t.done()
    return broker


def _data(t: TomlTable) -> DataConfig:
    label = t.value("label_column", -1)
    if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
        raise t.error("label_column", f"expected a column index or a header name, got {label!r}")
    shape = t.value("feature_shape", None)
    if shape is not None and (not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise t.error("feature_shape", f"expected a list of positive integers, got {shape!r}")
    data = DataConfig(
        path=t.path("path"),
        validation_path=t.path("validation_path", None),
        format=t.choice("format", DataFormat, DataFormat.AUTO),
        x_key=t.string("x_key", "x"),
        y_key=t.string("y_key", "y"),
        label_column=label,
        feature_shape=tuple(shape) if shape is not None else None,
    )
    t.done()
    return data


def _budget(t: TomlTable) -> TrainBudget:
    budget = TrainBudget(
        epochs=t.integer("epochs", 1, minimum=0),
        batch_size=t.integer("batch_size", 32, minimum=1),
        max_steps=t.integer("max_steps", None, minimum=0),
        personal_epochs=t.integer("personal_epochs", None, minimum=0),
        learning_rate=t.number("learning_rate", None, positive=True),
    )
    return budget


def _backoff(t: TomlTable | None) -> BackoffPolicy:
    if t is None:
        return BackoffPolicy()
    initial = t.number("initial_s", 1.0, positive=True)
    maximum = t.number("max_s", max(60.0, initial), positive=True)
    if maximum < initial:
        raise t.error("max_s", f"must be >= initial_s ({initial}), got {maximum}")
    multiplier = t.number("multiplier", 2.0, minimum=1.0)
    jitter = t.number("jitter", 0.5, minimum=0.0)
    if jitter > 1:
        raise t.error("jitter", f"expected a fraction in [0, 1], got {jitter}")
    t.done()
    return BackoffPolicy(initial_s=initial, max_s=maximum, multiplier=multiplier, jitter=jitter)


def _release(t: TomlTable | None) -> ReleaseSettings | None:
    if t is None:
        return None
    groups = t.value("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise t.error("groups", f"expected a list of group names, got {groups!r}")
    for group in groups:
        try:
            check_id("group", group)
        except ValueError as exc:
            raise t.error("groups", str(exc)) from None
    settings = ReleaseSettings(
        root_file=t.path("root_file", must_exist=True),
        groups=tuple(groups),
        window=t.integer("window", 4, minimum=1, maximum=64),
        chunks_per_s=t.number("chunks_per_second", 20.0, positive=True),
        chunk_timeout_s=t.number("chunk_timeout_s", 15.0, positive=True),
        settle_s=t.number("settle_s", 0.5, minimum=0.0),
        recheck_s=t.number("recheck_s", 300.0, positive=True),
        trial_epochs=t.integer("trial_epochs", None, minimum=1),
    )
    t.done()
    return settings


def parse_config(data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] = ".", source: str = "<config>") -> AgentConfig:
    """Validate parsed TOML data; relative paths are taken from ``base_dir``, errors name ``source``."""
    top = TomlTable(data, prefix="", source=source, base_dir=Path(base_dir))
    device, bundle, state, keys = top.table("device"), top.table("bundle"), top.table("state"), top.table("keys")
    training, submit = top.section("training"), top.section("submit")
    # The id alphabet excludes '/', '+', '#' and a leading '$', so ids are also valid topic segments.
    device_id, fleet, region = device.identifier("id"), device.identifier("fleet"), device.identifier("region")
    device.done()
    model_signers = keys.paths("model_signers", must_exist=True)
    config = AgentConfig(
        device_id=device_id,
        fleet=fleet,
        region=region,
        broker=_broker(top.table("broker")),
        bundle_path=bundle.path("path", None),
        install_dir=bundle.path("install_dir"),
        fleet_public_key=bundle.path("fleet_public_key", must_exist=True),
        state_dir=state.path("dir"),
        device_private_key=keys.path("device_private_key", must_exist=True),
        aggregator_public_key=keys.path("aggregator_public_key", must_exist=True),
        model_signers=model_signers,
        receipt_signers=keys.paths("receipt_signers", model_signers, must_exist=True),
        data=_data(top.table("data")),
        budget=_budget(training),
        threads=training.integer("threads", None, minimum=1),
        backend=training.choice("backend", BackendName, BackendName.AUTO),
        seed=training.integer("seed", None, minimum=0),
        encoding=_plain_encoding(training),
        fomo_candidates=training.integer("fomo_candidates", 0, minimum=0, maximum=MAX_CANDIDATES),
        fomo_timeout_s=training.number("fomo_timeout_s", 10.0, positive=True),
        receipt_timeout_s=submit.number("receipt_timeout_s", 30.0, positive=True),
        max_attempts=submit.integer("max_attempts", 5, minimum=1),
        backoff=_backoff(top.optional_table("backoff")),
        release=_release(top.optional_table("release")),
    )
    for table in (bundle, state, keys, training, submit, top):
        table.done()
    return config


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent TOML file (ConfigError for any problem, naming the key)."""
    file = Path(path)
    try:
        with open(file, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: tomllib recurses per nesting level (found by fuzzing: ~1,000 nested inline tables)
        raise ConfigError(f"{file}: not valid TOML: {str(exc) or type(exc).__name__}") from exc
    return parse_config(data, base_dir=file.resolve().parent, source=str(file))


def _plain_encoding(training: TomlTable) -> Encoding:
    """``raw``, ``fp16`` or ``int8``: compression with error feedback is the bundle's choice (its ``compression`` field)."""
    encoding = training.choice("encoding", Encoding, Encoding.RAW)
    if payload_version(encoding) != 1:
        raise training.error("encoding", f"expected 'raw', 'fp16' or 'int8', got {encoding.value!r}"
                             " (compressed updates are chosen by the bundle's compression field)")
    return encoding
