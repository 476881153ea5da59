"""Shared fixtures: a fleet signing key, the digits dataset and cached bundle builds."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


pytest_plugins = ["tests.cpu_accounting"]


def pytest_configure(config: pytest.Config) -> None:
    from tests.cpu_accounting import CpuSummary

    if not config.pluginmanager.has_plugin("fedge-cpu-summary") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(CpuSummary(), "fedge-cpu-summary")
    config.addinivalue_line("markers", "mosquitto: integration test against a real Mosquitto broker")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "packaging: builds device-only venvs (cached under ~/.cache/fedge-tests) and resolves wheels with pip")
    config.addinivalue_line("markers", "aarch64: runs the agent in an emulated Raspberry Pi root (qemu-user + debootstrap; cached)")


#: Test directories whose tests share a costly session fixture: each runs on one xdist worker.
_ONE_WORKER_DIRS = ("tests/field/",)  # the emulated Raspberry Pi: one firmware build and overlay install per run


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup`` (scripts/test.sh): each test is scheduled alone, except tests that share a costly fixture.

    xdist's own ``xdist_group`` marker does nothing with pytest 9 (xdist 3.8 renames the
    node id through an attribute pytest 9 no longer reads), so the groups are decided
    here from the node id: a module that defines a module-scoped fixture is one group
    (the fixture is built once, not once per worker), and so is each of _ONE_WORKER_DIRS.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope_of(nodeid)

    return SharedFixtureScheduling(config, log)


def _scope_of(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    one_dir = next((d for d in _ONE_WORKER_DIRS if module.startswith(d)), None)
    if one_dir is not None:
        return one_dir
    return module if _has_module_fixture(module) else nodeid


@functools.cache
def _has_module_fixture(module: str) -> bool:
    path = Path(__file__).resolve().parents[1] / module
    return path.suffix == ".py" and path.is_file() and 'scope="module"' in path.read_text(errors="replace")


@pytest.fixture(scope="session")
def fleet_key(testrun_uid: str) -> Ed25519PrivateKey:
    """The fleet's signing key: new for each test run, the same in all its xdist workers (they share bundles)."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"fedge-tests/fleet/{testrun_uid}".encode()).digest())


@pytest.fixture(scope="session")
def run_shared_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A directory all xdist workers of this run share (the session's base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent / "shared" if worker_id != "master" else base / "shared"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="session")
def bundle_factory(run_shared_dir: Path, fleet_key: Ed25519PrivateKey):
    """build(mode, mu=..., optimizer=..., ...) -> path of a signed .fedge for a digits MLP (built once per run)."""
    import torch

    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.model_spec import ParameterSplit
    from sdk.models import BASE_HEAD_SPLIT, PersonalizedMLP

    from tests.run_shared import build_once

    def build(mode: str, *, mu: float = 0.0, optimizer: str = "adamw", lr: float = 0.01, loss: str = "cross_entropy",
              hidden: tuple[int, ...] = (32,), num_classes: int = 10, seed: int = 0, in_features: int = 64,
              finetune: tuple[str, ...] = (), ditto_lambda: float = 0.0) -> Path:
        key = (mode, mu, optimizer, lr, loss, hidden, num_classes, seed, in_features, finetune, ditto_lambda)

        def _build(path: Path) -> None:
            torch.manual_seed(seed)
            model = PersonalizedMLP(in_features, hidden, num_classes)
            split = BASE_HEAD_SPLIT if mode in ("fedsim", "fedalt") else ParameterSplit(shared=("*",))
            build_bundle(model, example_input=torch.zeros(2, in_features), split=split,
                         spec=TrainingSpec(mode=mode, mu=mu, optimizer=optimizer, learning_rate=lr, loss=loss, finetune=finetune,
                                           ditto_lambda=ditto_lambda),
                         signing_key=fleet_key, out_path=path, model_name="digits-mlp")

        return build_once(run_shared_dir, ("digits-mlp", *key), _build)

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
