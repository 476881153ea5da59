"""Fixtures for the daemon tests: fleet keys on disk, local data, a config writer and a running fleet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.daemon.bootstrap import open_agent
from device_agent.daemon.config import load_config
from tests.device_agent.daemon.fleet_harness import FleetKeys, Responder, agent_sections, write_config
from tests.mosquitto_broker import MosquittoBroker, MosquittoFactory


@pytest.fixture
def fleet_keys(tmp_path: Path, fleet_key: Ed25519PrivateKey) -> FleetKeys:
    """Fresh root, region, aggregator and device keys (the bundle signer is the session fleet key)."""
    return FleetKeys(directory=tmp_path / "keys", fleet=fleet_key).write()


@pytest.fixture
def local_data(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> Path:
    """256 digits examples as the device's local .npz."""
    x, y = digits
    path = tmp_path / "local.npz"
    np.savez(path, x=x[:256], y=y[:256])
    return path


@pytest.fixture
def sections(tmp_path: Path, fleet_keys: FleetKeys, local_data: Path, bundle_factory) -> Callable[[int], dict[str, dict[str, Any]]]:
    """sections(port) -> the agent config as editable dicts (fedavg digits bundle, state under tmp_path/agent)."""

    def make(port: int) -> dict[str, dict[str, Any]]:
        return agent_sections(fleet_keys, work=tmp_path / "agent", port=port, bundle=bundle_factory("fedavg"),
                              data=local_data)

    return make


@dataclass
class Fleet:
    """A broker, a responder and a way to open agents on it; everything is closed at teardown."""

    broker: MosquittoBroker
    responder: Responder
    keys: FleetKeys
    config_path: Path
    sections: dict[str, dict[str, Any]]
    _agents: list[Any]

    def agent(self, **injected: Any):
        """A started agent from the current ``sections`` (rewritten to the config file first)."""
        write_config(self.config_path, self.sections)
        agent = open_agent(load_config(self.config_path), **injected)
        self._agents.append(agent)
        agent.start()
        return agent


@pytest.fixture
def fleet_factory(mosquitto: MosquittoFactory, fleet_keys: FleetKeys, sections, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """fleet_factory(extra_config="") -> a Fleet on a fresh broker (``extra_config`` appended to mosquitto.conf)."""
    fleets: list[Fleet] = []

    def make(extra_config: str = "") -> Fleet:
        broker = mosquitto.start(extra_config=extra_config)
        work = tmp_path / "agent"
        work.mkdir(exist_ok=True)
        made = Fleet(broker=broker, responder=Responder(broker.port, fleet_keys), keys=fleet_keys,
                     config_path=work / "agent.toml", sections=sections(broker.port), _agents=[])
        fleets.append(made)
        return made

    try:
        yield make
    finally:
        for made in fleets:
            for agent in made._agents:
                agent.close()
            made.responder.close()
            assert not made.responder.errors


@pytest.fixture
def fleet(fleet_factory: Callable[..., Fleet]) -> Fleet:
    """A fleet on a default (anonymous, persistent) broker."""
    return fleet_factory()
