"""Shared fixtures: a fleet signing key, the digits dataset and cached bundle builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mosquitto: integration test against a real Mosquitto broker")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "packaging: builds device-only venvs (cached under ~/.cache/fedge-tests) and resolves wheels with pip")
    config.addinivalue_line("markers", "aarch64: runs the agent in an emulated Raspberry Pi root (qemu-user + debootstrap; cached)")


@pytest.fixture(scope="session")
def fleet_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory, fleet_key: Ed25519PrivateKey):
    """build(mode, mu=..., optimizer=..., ...) -> path of a signed .fedge for a digits MLP (cached)."""
    import torch

    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.model_spec import ParameterSplit
    from sdk.models import BASE_HEAD_SPLIT, PersonalizedMLP

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("bundles")

    def build(mode: str, *, mu: float = 0.0, optimizer: str = "adamw", lr: float = 0.01, loss: str = "cross_entropy",
              hidden: tuple[int, ...] = (32,), num_classes: int = 10, seed: int = 0, in_features: int = 64,
              finetune: tuple[str, ...] = (), ditto_lambda: float = 0.0) -> Path:
        key = (mode, mu, optimizer, lr, loss, hidden, num_classes, seed, in_features, finetune, ditto_lambda)
        if key not in cache:
            torch.manual_seed(seed)
            model = PersonalizedMLP(in_features, hidden, num_classes)
            split = BASE_HEAD_SPLIT if mode in ("fedsim", "fedalt") else ParameterSplit(shared=("*",))
            path = root / f"b{len(cache)}.fedge"
            build_bundle(model, example_input=torch.zeros(2, in_features), split=split,
                         spec=TrainingSpec(mode=mode, mu=mu, optimizer=optimizer, learning_rate=lr, loss=loss, finetune=finetune,
                                           ditto_lambda=ditto_lambda),
                         signing_key=fleet_key, out_path=path, model_name="digits-mlp")
            cache[key] = path
        return cache[key]

    return build


@pytest.fixture
def install(tmp_path: Path, fleet_key: Ed25519PrivateKey):
    """install(bundle_path) -> TrainingBundle installed under tmp_path."""
    from device_agent.bundle.archive import install_bundle

    counter = iter(range(1000))

    def _install(path: Path):
        return install_bundle(path, fleet_key.public_key(), tmp_path / f"installed-{next(counter)}")

    return _install


from tests.model_bundles import model_bundle  # noqa: E402, F401
from tests.mosquitto_broker import mosquitto_fixture  # noqa: E402

mosquitto = mosquitto_fixture()
