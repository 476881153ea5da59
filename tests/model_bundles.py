"""Bundles of the reference models (MLP, 1D-CNN, 2D-CNN) with both artifact kinds, built once per session.

The ``model_bundle`` fixture is exposed by ``tests/conftest.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass(frozen=True, kw_only=True)
class ModelCase:
    """A model from sdk.models, its constructor arguments and one example's shape."""

    factory: str
    kwargs: tuple[tuple[str, object], ...]
    input_shape: tuple[int, ...]
    outputs: int


MODELS = {
    "mlp": ModelCase(factory="PersonalizedMLP", kwargs=(("in_features", 12), ("hidden", (16,)), ("num_classes", 4)),
                     input_shape=(12,), outputs=4),
    # base.2.weight (160 x 256) is large enough for its own AdamW update and moments (portable: opt.m@base.2.weight)
    "mlp-wide": ModelCase(factory="PersonalizedMLP", kwargs=(("in_features", 12), ("hidden", (256, 160)), ("num_classes", 4)),
                          input_shape=(12,), outputs=4),
    "cnn1d": ModelCase(factory="PersonalizedCNN1D", kwargs=(("in_channels", 3), ("num_classes", 5), ("width", 4)),
                       input_shape=(3, 20), outputs=5),
    "cnn2d": ModelCase(factory="PersonalizedCNN2D", kwargs=(("in_channels", 1), ("num_classes", 10), ("hidden", 16)),
                       input_shape=(1, 28, 28), outputs=10),
}


def make_data(model: str, loss: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and labels fitting ``model`` and ``loss``."""
    case = MODELS[model]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *case.input_shape)).astype(np.float32)
    if loss == "cross_entropy":
        return x, rng.integers(0, case.outputs, n).astype(np.int64)
    if loss == "mse":
        return x, rng.normal(size=(n, case.outputs)).astype(np.float32)
    return x, rng.integers(0, 2, (n, case.outputs)).astype(np.float32)


@pytest.fixture(scope="session")
def model_bundle(run_shared_dir: Path, fleet_key):
    """build(model, mode, mu=, optimizer=, loss=, lr=, finetune=, kinds=, ditto_lambda=, micro_batch=) -> (bundle path, torch model) (built once per run).

    Every model starts from ``torch.manual_seed(0)`` (as ``bundle_factory``'s), not from the
    order of builds, so every xdist worker holds the same model as the bundle another worker
    may have built, and a test's numbers do not depend on which tests ran before it.
    """
    import torch

    import sdk.models as zoo
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.model_spec import ParameterSplit
    from sdk.models import BASE_HEAD_SPLIT

    from tests.run_shared import build_once

    cache: dict[tuple, tuple[Path, object]] = {}

    def build(model: str, mode: str, *, mu: float = 0.0, optimizer: str = "adamw", loss: str = "cross_entropy",
              lr: float = 0.01, finetune: tuple[str, ...] = (), kinds: tuple[str, ...] = ("ort-training", "portable"),
              ditto_lambda: float = 0.0, micro_batch: int = 0):
        key = (model, mode, mu, optimizer, loss, lr, finetune, kinds, ditto_lambda, *((micro_batch,) if micro_batch else ()))
        if key not in cache:
            case = MODELS[model]
            torch.manual_seed(0)
            net = getattr(zoo, case.factory)(**dict(case.kwargs))
            split = BASE_HEAD_SPLIT if mode in ("fedsim", "fedalt") else ParameterSplit(shared=("*",))

            def _build(path: Path) -> None:
                build_bundle(net, example_input=torch.zeros((2, *case.input_shape)), split=split,
                             spec=TrainingSpec(mode=mode, mu=mu, optimizer=optimizer, learning_rate=lr, loss=loss, finetune=finetune,
                                               ditto_lambda=ditto_lambda, micro_batch=micro_batch),
                             signing_key=fleet_key, out_path=path, model_name=f"{model}-{mode}", kinds=kinds)

            cache[key] = (build_once(run_shared_dir, ("model-bundle", *key), _build), net)
        return cache[key]

    return build
