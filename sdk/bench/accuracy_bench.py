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

Progress: every run writes its result to ``<out>/.progress/<setting>/<run>-seed<k>/result.json``
as soon as it finishes, and settings with ``checkpoint_every`` also keep each
round's metrics and, every few rounds, the whole simulated fleet there
(:mod:`sdk.simulation.checkpoint`). ``resume=True`` reuses finished runs and
continues interrupted ones from their last checkpoint; it also reuses the runs
an earlier report of the setting in ``<out>/<setting>.json`` holds (same
profile, setting, run and hyper-parameters; a report cut to some runs with
``--run`` counts), so adding runs to a report runs only those. Without it a
setting's progress is cleared first. Once a setting's report is written its progress
folder is removed, and ``<out>/.progress`` itself once it is empty.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import shutil
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
    setting_from_dict,
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
    """The setting's data for run seed ``seed`` (the loader seed is ``setting.data_seed`` when the setting fixes it)."""
    import sdk.datasets as ds

    fixed = setting.data_seed is not None
    dseed = setting.data_seed if fixed else seed
    if setting.dataset == "folder":
        data = ds.load_client_folder(setting.data_dir or "", num_classes=setting.num_classes)
    elif setting.dataset == "watch-time":
        data = ds.load_watch(seed=dseed, split=ds.TimeSplit(), regions_by="side")
    elif setting.dataset == "watch-scarce":
        data = ds.load_watch(seed=dseed, split=ds.TimeSplit(train_fraction=0.25), regions_by="side")
    elif setting.dataset == "watch-recording":
        data = ds.load_watch(seed=dseed, split=ds.RecordingSplit(), regions_by="side")
    elif setting.dataset == "fashion-mnist":
        data = ds.load_fashion_mnist(num_clients=setting.clients or 20, alpha=0.1, seed=dseed if fixed else dseed + 1,
                                     subsample=setting.subsample, val_fraction=0.1)
    elif setting.dataset == "synthetic":
        data = ds.make_synthetic(alpha=1.0, beta=1.0, seed=dseed)
    elif setting.dataset == "digits":
        data = ds.load_digits(num_clients=setting.clients or 8, label_skew=0.3, seed=dseed)
    else:
        raise ValueError(f"unknown dataset {setting.dataset!r}")
    if setting.regions is not None and setting.regions.startswith("labels-"):
        data = data.with_regions(ds.regions_by_label_mix(data, int(setting.regions.split("-")[1]), seed=dseed))
    if setting.per_class is not None:
        data = ds.limit_per_class(data, train_per_class=setting.per_class)
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


def run_one(setting: AccuracySetting, run: AccuracyRun, *, seed: int = 0, threads: int = 1,
            progress: Path | None = None) -> dict[str, Any]:
    """Build the run's bundle, simulate it, and return every figure as plain JSON-able data.

    ``progress``: the run's progress folder; settings with ``checkpoint_every``
    keep a resumable checkpoint in ``progress/checkpoint``.
    """
    from dataclasses import replace

    from device_agent.compression import CompressionSpec
    from device_agent.trainer import TrainBudget
    from sdk.simulation.checkpoint import SimulationCheckpoint
    from sdk.simulation.cold_start import ColdStartConfig
    from sdk.simulation.runner import BundleTraining, run_algorithm
    from sdk.simulation.simulator import HierarchyConfig, SimulationConfig

    data = _load_dataset(setting, seed)
    newcomers = tuple(c for c in data.clients if c.client_id in setting.newcomers)
    if len(newcomers) != len(setting.newcomers):
        raise ValueError(f"{setting.name}: newcomers {sorted(set(setting.newcomers) - {c.client_id for c in newcomers})} not in the data")
    if newcomers:
        data = replace(data, clients=tuple(c for c in data.clients if c.client_id not in setting.newcomers))
    cold_start = None if not newcomers else ColdStartConfig(
        join_rounds=setting.join_rounds, samples=setting.newcomer_samples, head_epochs=setting.head_epochs,
        local_epochs=setting.rounds * setting.epochs, batch_size=setting.batch_size)
    hierarchy = None if run.regional_weight is None else HierarchyConfig(regional_weight=run.regional_weight)
    config = SimulationConfig(
        rounds=setting.rounds, budget=TrainBudget(epochs=setting.epochs, batch_size=setting.batch_size),
        participation=setting.participation, straggler_fraction=run.stragglers, straggler_work=setting.straggler_work,
        hierarchy=hierarchy, finetune_epochs=run.finetune_epochs, choice_epochs=run.choice_epochs, seed=seed,
        cold_start=cold_start,
        compression=CompressionSpec.parse(run.compression), downlink_compression=CompressionSpec.parse(run.downlink),
    )
    checkpoint = (SimulationCheckpoint(progress / "checkpoint", every=setting.checkpoint_every)
                  if progress is not None and setting.checkpoint_every else None)
    done = run_algorithm(data, run.algorithm, model=_model_source(setting, data), config=config, fomo_candidates=run.fomo_candidates,
                         training=BundleTraining(learning_rate=setting.learning_rate, optimizer=setting.optimizer, mu=run.mu,
                                                 ditto_lambda=run.ditto_lambda),
                         threads=threads, checkpoint=checkpoint, newcomers=newcomers)
    result, mu, n_params, head_params = done.result, done.mu, done.parameters, done.personal_parameters
    validation = result.validation
    last = result.rounds[-1] if result.rounds else None
    return {
        "label": run.label,
        "run": asdict(run),
        "seed": seed,
        "mu": mu,
        "ditto_lambda": done.ditto_lambda,
        "parameters": n_params,
        "head_parameters": head_params,
        "seconds": result.seconds,
        "test_examples": result.test_examples,
        "regions": {c.client_id: c.region for c in data.clients},
        "devices": {c.client_id: {"train": len(c.train.y), "classes": int(len(np.unique(c.train.y))), "val": len(c.val.y),
                                  "test": len(c.test.y)} for c in data.clients},
        "dataset_description": data.description,
        "validation": None if validation is None else {"fraction": validation.fraction, "held_out": validation.held_out,
                                                       "note": validation.describe()},
        "fomo_kept_own": {"per_device": result.fomo_kept_own_rate, "overall": result.fomo_kept_own_overall},
        "final": {
            "personalised": result.final_accuracy,
            "global": result.rounds[-1].global_accuracy if result.rounds else {},
            "regional": result.rounds[-1].regional_accuracy if result.rounds else {},
            "fine_tuned": result.fine_tuned_accuracy,
            "personal_model": last.personal_model_accuracy if last else {},
            "serving_weight": last.serving_weight if last else {},
            "candidates": result.candidate_accuracy,
            "chosen": result.chosen_accuracy,
            "chosen_model": result.chosen_model,
        },
        "cold_start": [asdict(c) for c in result.cold_start],
        "rounds": [
            {"round": r.round_number, "mean": r.mean_accuracy, "pooled": r.pooled_accuracy,
             "global_mean": float(np.mean(list(r.global_accuracy.values()))) if r.global_accuracy else None,
             "regional_mean": float(np.mean(list(r.regional_accuracy.values()))) if r.regional_accuracy else None,
             "personal_model_mean": (float(np.mean(list(r.personal_model_accuracy.values())))
                                     if r.personal_model_accuracy else None),
             "aggregated": len(r.aggregated), "dropped": len(r.dropped),
             "bytes_up_per_device": r.bytes_up_per_device, "bytes_down_per_device": r.bytes_down_per_device,
             "seconds": r.seconds}
            for r in result.rounds
        ],
    }


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "run"


def run_dir(out_dir: Path, setting: AccuracySetting, run: AccuracyRun, seed: int) -> Path:
    """The progress folder of one run of ``setting`` with ``seed`` under ``out_dir``."""
    return out_dir / ".progress" / setting.name / f"{_slug(run.label)}-seed{seed}"


def _numbers_of(setting: AccuracySetting) -> dict[str, Any]:
    """What in a setting changes the numbers (its title and notes do not), as plain JSON data."""
    plain = json.loads(json.dumps(asdict(setting)))
    return {k: v for k, v in plain.items() if k not in ("title", "notes")}


def _same_run(saved_setting: dict[str, Any], result: dict[str, Any], setting: AccuracySetting, run: AccuracyRun) -> bool:
    """Whether ``result`` (saved with ``saved_setting``) is ``run`` of ``setting`` with today's hyper-parameters.

    The settings are compared without their run lists, which a cut (``--run``) shortens; the run itself is compared whole.
    """
    from sdk.simulation.algorithms import algorithm

    try:
        saved = _numbers_of(setting_from_dict(saved_setting))
        same = ({k: v for k, v in saved.items() if k != "runs"} == {k: v for k, v in _numbers_of(setting).items() if k != "runs"}
                and result["run"] == asdict(run) and result["label"] == run.label)
    except (ValueError, KeyError, TypeError):
        return False
    spec = algorithm(run.algorithm)
    lam = run.ditto_lambda if run.ditto_lambda is not None else spec.default_ditto_lambda
    mu = run.mu if run.mu is not None else spec.default_mu
    return same and result.get("mu") == mu and result.get("ditto_lambda", 0.0) == lam


def finished_result(folder: Path, setting: AccuracySetting, run: AccuracyRun) -> dict[str, Any] | None:
    """The result a finished run left in ``folder``, if it was made with this setting, run and hyper-parameters (else None)."""
    try:
        saved = json.loads((folder / "result.json").read_text())
        return saved["result"] if _same_run(saved["setting"], saved["result"], setting, run) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reported_results(out_dir: Path, setting: AccuracySetting, *, profile: Profile, seed: int = 0
                     ) -> dict[tuple[str, int], dict[str, Any]]:
    """(run label, seed) -> each run of ``setting`` the report ``out_dir/<name>.json`` already holds with the same
    setting, run and hyper-parameters (the report may be a cut: runs added later reuse the ones it has)."""
    try:
        payload = json.loads((out_dir / f"{setting.name}.json").read_text())
        if payload["profile"] != profile:
            return {}
        saved_setting, saved_runs = payload["setting"], list(payload["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    runs = {run.label: run for run in setting.runs}
    seeds = set(setting.run_seeds(seed))
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for result in saved_runs:
        run = runs.get(result.get("label")) if isinstance(result, dict) else None
        if run is not None and result.get("seed") in seeds and _same_run(saved_setting, result, setting, run):
            found[(run.label, result["seed"])] = result
    return found


def _run_in_worker(setting: AccuracySetting, run: AccuracyRun, seed: int, folder: Path) -> tuple[str, str, int, dict[str, Any]]:
    logging.basicConfig(level=logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    result = run_one(setting, run, seed=seed, threads=1, progress=folder)
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps({"setting": asdict(setting), "result": result}))
    tmp.replace(folder / "result.json")
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return setting.name, run.label, seed, result


def run_accuracy_bench(
    names: Sequence[str],
    *,
    profile: Profile = "full",
    seed: int = 0,
    workers: int = 2,
    out_dir: Path,
    progress: Callable[[str], None] | None = None,
    extra: Sequence[AccuracySetting] = (),
    resume: bool = False,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Run every run of the named settings and the ``extra`` ones (e.g. :func:`user_setting`) on ``workers`` processes.

    Each setting runs its own seeds, or ``seed`` when it has none. ``resume``
    reuses finished runs and checkpoints under ``out_dir/.progress`` (see the
    module docs). Writes and returns each setting's report; ``names`` may also
    name the ``extra`` settings.
    """
    table = settings(profile)
    added = {s.name: s for s in extra}
    unknown = [n for n in names if n not in table and n not in added]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {sorted(table)}")
    chosen = [table[n] for n in names if n in table and n not in added] + list(added.values())
    jobs = [(s, run, k) for s in chosen for k in s.run_seeds(seed) for run in s.runs]
    results: dict[str, dict[tuple[str, int], dict[str, Any]]] = {s.name: {} for s in chosen}
    reported = {s.name: reported_results(out_dir, s, profile=profile, seed=seed) if resume else {} for s in chosen}
    pending = []
    for s, run, k in jobs:
        folder = run_dir(out_dir, s, run, k)
        found, source = finished_result(folder, s, run) if resume else None, folder
        if found is None and (run.label, k) in reported[s.name]:
            found, source = reported[s.name][(run.label, k)], out_dir / f"{s.name}.json"
        if found is not None:
            results[s.name][(run.label, k)] = found
            if progress is not None:
                progress(f"{s.name}: {run.label} (seed {k}) reused from {source}")
            continue
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        pending.append((s, run, k, folder))
    # Longest first keeps both workers busy to the end.
    cost = {"cnn2d": 100.0, "cnn1d": 3.0, "logreg": 1.0, "mlp": 0.5}
    factor = {"fedalt": 1.6, "ditto": 2.0}
    pending.sort(key=lambda job: -cost.get(job[0].model, 1.0) * job[0].rounds * factor.get(job[1].algorithm, 1.0))
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold ORT threads
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        futures = [pool.submit(_run_in_worker, s, run, k, folder) for s, run, k, folder in pending]
        for future in as_completed(futures):
            name, label, k, result = future.result()
            results[name][(label, k)] = result
            if progress is not None:
                progress(f"{name}: {label} (seed {k}) {100 * float(np.mean(list(result['final']['personalised'].values()))):.2f}%"
                         f" in {result['seconds']:.0f} s")
    reports = {}
    for s in chosen:
        ordered = [results[s.name][(run.label, k)] for k in s.run_seeds(seed) for run in s.runs]
        reports[s.name] = write_setting(s, ordered, out_dir, seed=seed, profile=profile)
        shutil.rmtree(out_dir / ".progress" / s.name, ignore_errors=True)
    try:
        (out_dir / ".progress").rmdir()  # only when no other setting's progress is left in it
    except OSError:
        pass
    logger.info("accuracy bench: %d runs in %.0f s (%d reused)", len(jobs), time.perf_counter() - start, len(jobs) - len(pending))
    return reports
