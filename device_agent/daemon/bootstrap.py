"""Turning an :class:`AgentConfig` into a running :class:`DeviceAgent`: keys, bundle, trainer, data, connection."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from device_agent.bundle.archive import TrainingBundle, install_bundle, load_bundle, verify_bundle
from device_agent.daemon.agent import DeviceAgent
from device_agent.daemon.agent_state import AgentStateFiles
from device_agent.daemon.config import AgentConfig, DataConfig, DataFormat
from device_agent.daemon.connection import MqttConnection
from device_agent.daemon.errors import ConfigError
from device_agent.daemon.keyring import load_device_keys
from device_agent.daemon.status_reporter import StatusReporter
from device_agent.daemon.version_switch import VersionSwitch
from device_agent.data import DataSource, load_csv, load_npz
from device_agent.errors import BundleError
from device_agent.keys import load_verify_key
from device_agent.release.policy import DeviceIdentity
from device_agent.trainer import DeviceTrainer
from device_agent.training_backends.runtime import onnxruntime_version

if TYPE_CHECKING:  # python-tuf loads with the release client, only when [release] is configured
    from device_agent.release.client import ReleaseClient

logger = logging.getLogger(__name__)


def open_bundle(config: AgentConfig) -> TrainingBundle:
    """The verified bundle in ``install_dir``, (re)installed from ``bundle_path`` when that differs or nothing valid is installed."""
    try:
        fleet_key = load_verify_key(config.fleet_public_key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"bundle.fleet_public_key: cannot load {config.fleet_public_key}: {exc}") from exc
    installed: TrainingBundle | None = None
    if config.install_dir.is_dir():
        try:
            installed = load_bundle(config.install_dir, fleet_key)
        except BundleError as exc:
            logger.warning("installed bundle in %s is not usable (%s)", config.install_dir, exc)
    archive = config.bundle_path
    if archive is not None and archive.exists():
        offered = verify_bundle(archive, fleet_key)
        if installed is not None and offered.bundle_version < installed.manifest.bundle_version:
            # A release installed a newer version since provisioning: bundle.path is history, not a downgrade to make.
            logger.info("keeping bundle v%d in %s (newer than v%d at bundle.path)", installed.manifest.bundle_version,
                        config.install_dir, offered.bundle_version)
        elif installed is None or offered != installed.manifest:
            installed = install_bundle(archive, fleet_key, config.install_dir)
    elif installed is None:
        raise BundleError(f"no verified bundle in {config.install_dir} and no bundle archive at {archive} (bundle.path)")
    return installed


def data_loader(data: DataConfig) -> Callable[[], DataSource]:
    """A function that reads the device's local data file afresh (called once per round)."""
    fmt = data.format
    if fmt is DataFormat.AUTO:
        fmt = DataFormat.CSV if data.path.suffix.lower() == ".csv" else DataFormat.NPZ

    def load() -> DataSource:
        if fmt is DataFormat.CSV:
            return load_csv(data.path, label_column=data.label_column, feature_shape=data.feature_shape)
        return load_npz(data.path, x_key=data.x_key, y_key=data.y_key)

    return load


def open_agent(
    config: AgentConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
    poll_interval_s: float = 0.05,
) -> DeviceAgent:
    """A ready (not yet connected) agent: keys loaded, bundle verified, trainer resumed from the state dir.

    The local data is read once here so a bad data file fails at start-up, not mid-round.
    """
    keys = load_device_keys(config)
    bundle = open_bundle(config)
    state = AgentStateFiles(config.state_dir)
    trainer = DeviceTrainer(bundle, state_dir=state.trainer_dir, threads=config.threads, backend=config.backend)
    load_data = data_loader(config.data)
    try:
        examples = len(load_data())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.path: cannot load {config.data.path}: {exc}") from exc
    logger.info("device %s: bundle %s v%d, %d local examples, state in %s, training backend %s (onnxruntime %s)",
                config.device_id, bundle.manifest.model_name, bundle.manifest.bundle_version, examples, config.state_dir,
                trainer.backend_name.value, onnxruntime_version())
    rng = rng if rng is not None else random.Random()
    topics = config.topics
    manifest = bundle.manifest
    backend = getattr(trainer, "backend_name", None)  # trainers with one backend only do not name it
    status = StatusReporter(fleet=config.fleet, region=config.region, device=config.device_id,
                            signing_key=keys.signing_key, wall_clock=wall_clock, clock=clock)
    status.update(bundle_model=manifest.model_name, bundle_version=manifest.bundle_version,
                  backend=str(getattr(backend, "value", backend or "ort-training")))
    connection = MqttConnection(
        config.broker,
        client_id=config.device_id,
        presence_topic=topics.device_status(config.device_id),
        online_payload=status.online_payload,
        offline_payload=status.offline_payload,
        subscriptions=(topics.global_model, topics.global_model_delta, topics.device_receipt(config.device_id))
        + ((topics.device_candidates(config.device_id),) if config.fomo_candidates else ())
        + ((topics.release_metadata_filter,) if config.release is not None else ()),
        backoff=config.backoff,
        clock=clock,
        rng=rng,
        poll_interval_s=poll_interval_s,
    )
    status.attach(connection.refresh_presence)
    load_validation = None if config.data.validation_path is None else data_loader(
        replace(config.data, path=config.data.validation_path))
    release, switch = _release(config, connection, state, load_data, load_validation, clock=clock, wall_clock=wall_clock)
    return DeviceAgent(
        config,
        keys=keys,
        trainer=trainer,
        load_data=load_data,
        connection=connection,
        state=state,
        clock=clock,
        wall_clock=wall_clock,
        rng=rng,
        random_bytes=random_bytes,
        train_rng=np.random.default_rng(config.seed),
        load_validation=load_validation,
        status=status,
        release=release,
        switch=switch,
    )


def _release(config: AgentConfig, connection: MqttConnection, state: AgentStateFiles, load_data: Callable[[], DataSource],
             load_validation: Callable[[], DataSource] | None, *, clock: Callable[[], float],
             wall_clock: Callable[[], float]) -> tuple[ReleaseClient | None, VersionSwitch | None]:
    """The release client and version switch when ``[release]`` is configured, else (None, None)."""
    settings = config.release
    if settings is None:
        return None, None
    fleet_key = load_verify_key(config.fleet_public_key)
    from device_agent.release.client import ReleaseClient  # python-tuf: only in a daemon that follows releases

    client = ReleaseClient(
        settings,
        identity=DeviceIdentity(device=config.device_id, fleet=config.fleet, region=config.region, groups=settings.groups),
        directory=state.directory / "release",
        topics=config.topics,
        fleet_keys=fleet_key,
        subscribe=connection.subscribe,
        unsubscribe=connection.unsubscribe,
        clock=clock,
        wall_clock=wall_clock,
    )
    trial_budget = config.budget if settings.trial_epochs is None else replace(config.budget, epochs=settings.trial_epochs)
    switch = VersionSwitch(config, client=client, fleet_keys=fleet_key, trainer_dir=state.trainer_dir, load_data=load_data,
                           load_validation=load_validation, trial_budget=trial_budget,
                           rng=np.random.default_rng(config.seed))
    return client, switch
