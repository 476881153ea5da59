"""FedProx's Synthetic(alpha, beta) federated data (Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020, section 5.1 and appendix C.1).

Device ``k`` holds ``n_k`` examples of a softmax-regression problem of its own:

- ``n_k = floor(LogNormal(4, 2)) + 50`` (power-law sizes);
- ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (60 x 10), ``b_k ~ N(u_k, 1)`` (10):
  ``alpha`` controls how much the local models differ;
- ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (60): ``beta`` controls how much
  the local inputs differ;
- ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j^-1.2`` (j = 1..60);
- ``y = argmax(softmax(W_k x + b_k))`` (= argmax of the logits).

``iid=True`` gives the paper's Synthetic-IID: one ``W``, ``b ~ N(0, 1)`` for
all devices and ``v_k = 0``. As in the reference generator
(github.com/litian96/FedProx, ``data/synthetic_1_1/generate_synthetic.py``),
``alpha`` and ``beta`` are used as *standard deviations* (numpy's ``scale``);
the paper writes them as variances (same thing for 0 and 1). The reference
draws with the global ``np.random`` state; fedge uses a seeded
``numpy.random.Generator``, so the distribution matches, not the numbers.
The reference cuts each device 90/10 into train/test; fedge defaults to
75/25 plus a validation set carved from the training part.
"""

from __future__ import annotations

import numpy as np

from sdk.datasets.federated import FederatedDataset, client_ids, region_names, split_client

SIZE_LOG_MEAN = 4.0
SIZE_LOG_STD = 2.0
MIN_SIZE = 50


def synthetic_device_sizes(num_devices: int, *, rng: np.random.Generator) -> np.ndarray:
    """Examples per device: ``floor(LogNormal(4, 2)) + 50`` as int64, like the FedProx generator."""
    if num_devices < 1:
        raise ValueError("num_devices must be >= 1")
    return rng.lognormal(SIZE_LOG_MEAN, SIZE_LOG_STD, num_devices).astype(np.int64) + MIN_SIZE


def feature_variances(dimension: int) -> np.ndarray:
    """The diagonal of Sigma: ``j ** -1.2`` for ``j = 1..dimension``."""
    return np.arange(1, dimension + 1, dtype=np.float64) ** -1.2


def make_synthetic(
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
    num_devices: int = 30,
    dimension: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    test_fraction: float = 0.25,
    val_fraction: float = 0.1,
    num_regions: int | None = None,
) -> FederatedDataset:
    """Generate Synthetic(``alpha``, ``beta``) (or Synthetic-IID with ``iid=True``); see module docs.

    Examples are float32 vectors of length ``dimension``. ``num_regions``
    groups devices round-robin into ``region-<k>``; ``None`` gives no regions.
    The same arguments give identical arrays.
    """
    if alpha < 0 or beta < 0:
        raise ValueError("alpha and beta must be >= 0")
    if dimension < 1 or num_classes < 2:
        raise ValueError("dimension must be >= 1 and num_classes >= 2")
    rng = np.random.default_rng(seed)
    sizes = synthetic_device_sizes(num_devices, rng=rng)
    std_x = np.sqrt(feature_variances(dimension))
    if iid:
        shared_w = rng.normal(0.0, 1.0, (dimension, num_classes))
        shared_b = rng.normal(0.0, 1.0, num_classes)
        model_means = np.zeros(num_devices)
        input_means = np.zeros((num_devices, dimension))
    else:
        model_means = rng.normal(0.0, alpha, num_devices)
        input_centres = rng.normal(0.0, beta, num_devices)
        input_means = rng.normal(input_centres[:, None], 1.0, (num_devices, dimension))
    ids = client_ids("device", num_devices)
    regions = region_names(num_devices, num_regions)
    clients = []
    for k in range(num_devices):
        if iid:
            w, b = shared_w, shared_b
        else:
            w = rng.normal(model_means[k], 1.0, (dimension, num_classes))
            b = rng.normal(model_means[k], 1.0, num_classes)
        # A diagonal Sigma makes the multivariate normal independent per coordinate.
        x = input_means[k] + std_x * rng.standard_normal((int(sizes[k]), dimension))
        y = np.argmax(x @ w + b, axis=1)
        clients.append(split_client(client_id=ids[k], region=regions[k], x=x, y=y, rng=rng,
                                    test_fraction=test_fraction, val_fraction=val_fraction))
    name = "synthetic_iid" if iid else f"synthetic_{alpha:g}_{beta:g}"
    return FederatedDataset(
        name=name,
        clients=tuple(clients),
        input_shape=(dimension,),
        num_classes=num_classes,
        description=(f"FedProx Synthetic{'-IID' if iid else f'({alpha:g}, {beta:g})'}: {num_devices} devices, "
                     f"{dimension}-dim x, {num_classes} classes, floor(LogNormal(4, 2)) + 50 examples each, "
                     f"per-device shuffled {1 - test_fraction:.0%}/{test_fraction:.0%} train/test cut, "
                     f"{val_fraction:.0%} of train held out for val, seed {seed}"),
    )
