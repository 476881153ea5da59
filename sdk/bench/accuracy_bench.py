"""``fedge bench accuracy``: every algorithm on real non-IID data, side by side, with the method written down.

A *setting* is a dataset split, a model, a training budget and a list of
*runs* (one algorithm each, possibly with stragglers or a hierarchy). Each
run is one :class:`~sdk.simulation.simulator.FederatedSimulator` on a bundle
built for that algorithm: real ORT training per device, the deployment's
aggregation rules. Runs are independent and go to a process pool, one ORT
thread per worker, so two cores run two runs at once.

Outputs per setting under ``out_dir``: ``<setting>.json`` (every per-device,
per-round figure), ``<setting>.md`` (the table and the claims checked),
``<setting>-rounds.png`` (accuracy per round), ``<setting>-gain.png``
(per-device gain over local-only) and, for hierarchical settings,
``<setting>-tiers.png`` (global vs regional vs personalised).

The settings live in :mod:`sdk.bench.accuracy_settings`, the pure summary
and the report writers in :mod:`sdk.bench.accuracy_report`; this module holds
:func:`run_one` (what a worker executes) and the process pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sdk.bench.accuracy_report import SummaryRow, format_table, rewrite_reports, summarise, write_plots, write_setting
from sdk.bench.accuracy_settings import (
    DEFAULT_SETTINGS,
    AccuracyRun,
    AccuracySetting,
    Profile,
    settings,
    user_setting,
)

__all__ = [
    "DEFAULT_SETTINGS", "AccuracyRun", "AccuracySetting", "SummaryRow", "format_table", "rewrite_reports", "run_accuracy_bench",
    "run_one", "settings", "summarise", "user_setting", "write_plots", "write_setting",
]

logger = logging.getLogger(__name__)


# -- one run (a worker) -----------------------------------------------------------------------

def _load_dataset(setting: AccuracySetting, seed: int):  # type: ignore[no-untyped-def]
    import sdk.datasets as ds

    if setting.dataset == "folder":
        data = ds.load_client_folder(setting.data_dir or "", num_classes=setting.num_classes)
    elif setting.dataset == "watch-time":
        data = ds.load_watch(seed=seed, split=ds.TimeSplit(), regions_by="side")
    elif setting.dataset == "watch-scarce":
        data = ds.load_watch(seed=seed, split=ds.TimeSplit(train_fraction=0.25), regions_by="side")
    elif setting.dataset == "watch-recording":
        data = ds.load_watch(seed=seed, split=ds.RecordingSplit(), regions_by="side")
    elif setting.dataset == "fashion-mnist":
        data = ds.load_fashion_mnist(num_clients=20, alpha=0.1, seed=seed + 1, subsample=setting.subsample, val_fraction=0.1)
    elif setting.dataset == "synthetic":
        data = ds.make_synthetic(alpha=1.0, beta=1.0, seed=seed)
    elif setting.dataset == "digits":
        data = ds.load_digits(num_clients=8, label_skew=0.3, seed=seed)
    else:
        raise ValueError(f"unknown dataset {setting.dataset!r}")
    if setting.regions is not None and setting.regions.startswith("labels-"):
        data = data.with_regions(ds.regions_by_label_mix(data, int(setting.regions.split("-")[1]), seed=seed))
    return data


def _model_source(setting: AccuracySetting, data):  # type: ignore[no-untyped-def]
    from sdk.model_factory import model_factory
    from sdk.simulation.catalog import builtin_model, default_model_kind
    from sdk.simulation.runner import ModelSource

    if ":" in setting.model:
        return ModelSource(factory=model_factory(setting.model, setting.model_args), personal=setting.personal,
                           shared=setting.shared, name=setting.name)
    kind = default_model_kind(data.input_shape) if setting.model == "auto" else setting.model
    return builtin_model(kind, data)


def run_one(setting: AccuracySetting, run: AccuracyRun, *, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Build the run's bundle, simulate it, and return every figure as plain JSON-able data."""
    from device_agent.compression import CompressionSpec
    from device_agent.trainer import TrainBudget
    from sdk.simulation.runner import BundleTraining, run_algorithm
    from sdk.simulation.simulator import HierarchyConfig, SimulationConfig

    data = _load_dataset(setting, seed)
    hierarchy = None if run.regional_weight is None else HierarchyConfig(regional_weight=run.regional_weight)
    config = SimulationConfig(
        rounds=setting.rounds, budget=TrainBudget(epochs=setting.epochs, batch_size=setting.batch_size),
        participation=setting.participation, straggler_fraction=run.stragglers, straggler_work=setting.straggler_work,
        hierarchy=hierarchy, finetune_epochs=run.finetune_epochs, seed=seed,
        compression=CompressionSpec.parse(run.compression), downlink_compression=CompressionSpec.parse(run.downlink),
    )
    done = run_algorithm(data, run.algorithm, model=_model_source(setting, data), config=config, fomo_candidates=run.fomo_candidates,
                         training=BundleTraining(learning_rate=setting.learning_rate, optimizer=setting.optimizer, mu=run.mu),
                         threads=threads)
    result, mu, n_params, head_params = done.result, done.mu, done.parameters, done.personal_parameters
    validation = result.validation
    return {
        "label": run.label,
        "run": asdict(run),
        "mu": mu,
        "parameters": n_params,
        "head_parameters": head_params,
        "seconds": result.seconds,
        "test_examples": result.test_examples,
        "regions": {c.client_id: c.region for c in data.clients},
        "dataset_description": data.description,
        "validation": None if validation is None else {"fraction": validation.fraction, "held_out": validation.held_out,
                                                       "note": validation.describe()},
        "fomo_kept_own": {"per_device": result.fomo_kept_own_rate, "overall": result.fomo_kept_own_overall},
        "final": {
            "personalised": result.final_accuracy,
            "global": result.rounds[-1].global_accuracy if result.rounds else {},
            "regional": result.rounds[-1].regional_accuracy if result.rounds else {},
            "fine_tuned": result.fine_tuned_accuracy,
        },
        "rounds": [
            {"round": r.round_number, "mean": r.mean_accuracy, "pooled": r.pooled_accuracy,
             "global_mean": float(np.mean(list(r.global_accuracy.values()))) if r.global_accuracy else None,
             "regional_mean": float(np.mean(list(r.regional_accuracy.values()))) if r.regional_accuracy else None,
             "aggregated": len(r.aggregated), "dropped": len(r.dropped),
             "bytes_up_per_device": r.bytes_up_per_device, "bytes_down_per_device": r.bytes_down_per_device,
             "seconds": r.seconds}
            for r in result.rounds
        ],
    }


def _run_in_worker(setting: AccuracySetting, run: AccuracyRun, seed: int) -> tuple[str, str, dict[str, Any]]:
    logging.basicConfig(level=logging.WARNING)
    return setting.name, run.label, run_one(setting, run, seed=seed, threads=1)


def run_accuracy_bench(
    names: Sequence[str],
    *,
    profile: Profile = "full",
    seed: int = 0,
    workers: int = 2,
    out_dir: Path,
    progress: Callable[[str], None] | None = None,
    extra: Sequence[AccuracySetting] = (),
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Run every run of the named settings and the ``extra`` ones (e.g. :func:`user_setting`) on ``workers`` processes.

    Writes and returns each setting's report; ``names`` may also name the ``extra`` settings.
    """
    table = settings(profile)
    added = {s.name: s for s in extra}
    unknown = [n for n in names if n not in table and n not in added]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {sorted(table)}")
    chosen = [table[n] for n in names if n in table and n not in added] + list(added.values())
    jobs = [(s, run) for s in chosen for run in s.runs]
    # Longest first keeps both workers busy to the end.
    cost = {"cnn2d": 100.0, "cnn1d": 3.0, "logreg": 1.0, "mlp": 0.5}
    jobs.sort(key=lambda job: -cost.get(job[0].model, 1.0) * job[0].rounds * (1.6 if job[1].algorithm == "fedalt" else 1.0))
    results: dict[str, dict[str, dict[str, Any]]] = {s.name: {} for s in chosen}
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold ORT threads
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        futures = [pool.submit(_run_in_worker, s, run, seed) for s, run in jobs]
        for future in as_completed(futures):
            name, label, result = future.result()
            results[name][label] = result
            if progress is not None:
                progress(f"{name}: {label} {100 * float(np.mean(list(result['final']['personalised'].values()))):.2f}%"
                         f" in {result['seconds']:.0f} s")
    reports = {}
    for s in chosen:
        ordered = [results[s.name][run.label] for run in s.runs]
        reports[s.name] = write_setting(s, ordered, out_dir, seed=seed, profile=profile)
    logger.info("accuracy bench: %d runs in %.0f s", len(jobs), time.perf_counter() - start)
    return reports

