"""``fedge bench sweep``: how accuracy moves with learning rate, local epochs and FedProx mu.

A measured sensitivity study on the built-in datasets, run with the same
simulator as everything else (real ORT training per device, seeded). The
grid is one-factor-at-a-time around a base point, plus the lr x epochs
interaction, so it stays small enough for two shared cores:

- **lr**: every learning rate in :data:`LEARNING_RATES`, local epochs 1, for
  local-only, FedAvg and FedAlt;
- **epochs**: local epochs 2 and 4 at three learning rates, same algorithms;
- **mu**: FedProx and FedAlt with mu in :data:`MUS` (mu 0 is in the lr axis);
- **personal_epochs**: FedAlt's head phase at 2 and 4 epochs with the shared
  phase at 1.

Every point is one run with seed 0 (the seed-to-seed spread measured on the
smartwatch setting is 0.03-1 point; read differences below that as ties).
:func:`recommend_learning_rate` picks the learning rate whose worst shortfall
from the best learning rate of each (dataset, algorithm) is smallest: the
default that is safest everywhere rather than best anywhere. Outputs
``sweep.json`` (every point, per device), ``sweep.md`` and ``sweep.png``;
``previous`` results (an earlier ``sweep.json`` of the same seed) are reused
point by point, so a grown grid only runs its new points.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Profile = Literal["full", "quick"]
LEARNING_RATES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)
EPOCHS = (2, 4)
EPOCH_LRS = (0.001, 0.005, 0.01)
MUS = (0.01, 0.1, 1.0)
BASE_LR = 0.005
AXIS_ALGORITHMS = ("local", "fedavg", "fedalt")


@dataclass(frozen=True, kw_only=True)
class SweepDataset:
    """A built-in dataset as the sweep uses it: the loader's arguments, the model, rounds and batch size."""

    name: str
    model: str
    rounds: int
    batch_size: int = 32
    subsample: float | None = None
    description: str = ""


SWEEP_DATASETS = {
    d.name: d for d in (
        SweepDataset(name="watch", model="cnn1d", rounds=20,
                     description="smartwatch, 20 clients (subject x arm), time split, 1D-CNN"),
        SweepDataset(name="digits", model="mlp", rounds=20,
                     description="scikit-learn digits, 10 clients, Dirichlet(0.5) label skew, MLP (64 hidden)"),
        SweepDataset(name="fmnist", model="cnn2d", rounds=10, subsample=0.1,
                     description="Fashion-MNIST, 10% subsample, Dirichlet(0.1) over 20 clients, 2D-CNN"),
    )
}


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One run of the sweep; ``axis`` says which question it answers (lr, epochs, mu, personal_epochs)."""

    axis: str
    dataset: str
    algorithm: str
    learning_rate: float
    epochs: int = 1
    mu: float | None = None
    personal_epochs: int | None = None


def sweep_points(datasets: Sequence[str], profile: Profile = "full") -> list[SweepPoint]:
    """The grid, without duplicates; ``quick`` is two learning rates, two algorithms (a smoke run)."""
    if profile == "quick":
        return [SweepPoint(axis="lr", dataset=d, algorithm=a, learning_rate=lr)
                for d in datasets for a in ("local", "fedalt") for lr in (0.001, 0.01)]
    points: list[SweepPoint] = []
    for d in datasets:
        points += [SweepPoint(axis="lr", dataset=d, algorithm=a, learning_rate=lr) for a in AXIS_ALGORITHMS for lr in LEARNING_RATES]
        points += [SweepPoint(axis="epochs", dataset=d, algorithm=a, learning_rate=lr, epochs=e)
                   for a in AXIS_ALGORITHMS for lr in EPOCH_LRS for e in EPOCHS]
        points += [SweepPoint(axis="mu", dataset=d, algorithm=a, learning_rate=BASE_LR, mu=mu) for a in ("fedprox", "fedalt") for mu in MUS]
        points += [SweepPoint(axis="personal_epochs", dataset=d, algorithm="fedalt", learning_rate=BASE_LR, personal_epochs=pe)
                   for pe in EPOCHS]
    return points


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int, quick: bool):  # type: ignore[no-untyped-def]
    import sdk.datasets as ds

    spec = SWEEP_DATASETS[name]
    if name == "watch":
        return ds.load_watch(seed=seed, split=ds.TimeSplit())
    if name == "digits":
        return ds.load_digits(num_clients=10, label_skew=0.5, seed=seed)
    return ds.load_fashion_mnist(num_clients=20, alpha=0.1, seed=seed + 1, subsample=0.02 if quick else spec.subsample,
                                 val_fraction=0.1)


def run_point(point: SweepPoint, *, seed: int = 0, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """Simulate one point; every figure as plain JSON-able data."""
    from device_agent.trainer import TrainBudget
    from sdk.simulation.catalog import builtin_model
    from sdk.simulation.runner import BundleTraining, run_algorithm
    from sdk.simulation.simulator import SimulationConfig

    spec = SWEEP_DATASETS[point.dataset]
    data = _dataset(point.dataset, seed, quick)
    config = SimulationConfig(rounds=2 if quick else spec.rounds, seed=seed,
                              budget=TrainBudget(epochs=point.epochs, batch_size=spec.batch_size, personal_epochs=point.personal_epochs))
    run = run_algorithm(data, point.algorithm, model=builtin_model(spec.model, data, hidden=(64,)), config=config,
                        training=BundleTraining(learning_rate=point.learning_rate, mu=point.mu), threads=threads)
    acc = run.result.final_accuracy
    return {"point": asdict(point), "mu": run.mu, "mean": run.result.mean_final_accuracy, "std": float(np.std(list(acc.values()))),
            "per_device": acc, "rounds": [r.mean_accuracy for r in run.result.rounds], "seconds": run.result.seconds}


def recommend_learning_rate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The lr-axis learning rate with the smallest worst shortfall from each (dataset, algorithm)'s best.

    Pure: reads the ``lr`` axis points only. Returns the choice, every
    candidate's worst shortfall (accuracy points in [0, 1]) and, per
    (dataset, algorithm), the best learning rate and the accuracy at the choice.
    """
    table: dict[tuple[str, str], dict[float, float]] = {}
    for r in results:
        p = r["point"]
        if p["axis"] == "lr":
            table.setdefault((p["dataset"], p["algorithm"]), {})[p["learning_rate"]] = r["mean"]
    if not table:
        return {"learning_rate": None, "worst_shortfall": {}, "per_setting": []}
    candidates = sorted(set.intersection(*(set(v) for v in table.values())))
    worst = {lr: max(max(v.values()) - v[lr] for v in table.values()) for lr in candidates}
    choice = min(candidates, key=lambda lr: (worst[lr], lr))
    per_setting = [{"dataset": d, "algorithm": a, "best_lr": max(v, key=lambda lr: v[lr]), "best": max(v.values()),
                    "at_choice": v[choice]} for (d, a), v in sorted(table.items())]
    return {"learning_rate": choice, "worst_shortfall": {str(lr): w for lr, w in worst.items()}, "per_setting": per_setting}


def format_table(results: Sequence[dict[str, Any]], recommendation: dict[str, Any]) -> str:
    """Markdown: mean accuracy per (dataset, algorithm, epochs) row and learning-rate column, then the other axes."""
    lines = []
    lrs = sorted({r["point"]["learning_rate"] for r in results})
    rows: dict[tuple[str, str, int], dict[float, float]] = {}
    for r in results:
        p = r["point"]
        if p["axis"] in ("lr", "epochs"):
            rows.setdefault((p["dataset"], p["algorithm"], p["epochs"]), {})[p["learning_rate"]] = r["mean"]
    lines += ["| dataset | algorithm | epochs | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
              "|---|---|---|" + "---|" * len(lrs)]
    for (d, a, e), v in sorted(rows.items()):
        cells = " | ".join("—" if lr not in v else f"{100 * v[lr]:.2f}" for lr in lrs)
        lines.append(f"| {d} | {a} | {e} | {cells} |")
    other = [r for r in results if r["point"]["axis"] in ("mu", "personal_epochs")]
    if other:
        lines += ["", "| dataset | algorithm | lr | epochs | mu | personal epochs | mean accuracy |", "|---|---|---|---|---|---|---|"]
        for r in sorted(other, key=lambda r: (r["point"]["dataset"], r["point"]["algorithm"], r["point"]["axis"])):
            p = r["point"]
            lines.append(f"| {p['dataset']} | {p['algorithm']} | {p['learning_rate']:g} | {p['epochs']} | {r['mu']:g} | "
                         f"{p['personal_epochs'] if p['personal_epochs'] is not None else p['epochs']} | {100 * r['mean']:.2f} |")
    if recommendation["learning_rate"] is not None:
        worst = recommendation["worst_shortfall"]
        lines += ["", f"Recommended learning rate: **{recommendation['learning_rate']:g}** (worst shortfall from the best lr of any"
                      f" dataset x algorithm: {100 * worst[str(recommendation['learning_rate'])]:.2f} points; every candidate: "
                      + ", ".join(f"{float(lr):g}: {100 * w:.2f}" for lr, w in worst.items()) + ")"]
    return "\n".join(lines)


def _mu_curve(results: Sequence[dict[str, Any]], dataset: str, algo: str) -> dict[float, float]:
    """mu -> accuracy at the base lr and 1 epoch; mu 0 is the lr axis's point (FedAvg's for FedProx)."""
    base = "fedavg" if algo == "fedprox" else algo
    out = {}
    for r in results:
        p = r["point"]
        if p["dataset"] != dataset or p["learning_rate"] != BASE_LR or p["epochs"] != 1:
            continue
        if p["axis"] == "lr" and p["algorithm"] == base:
            out[0.0] = r["mean"]
        elif p["axis"] == "mu" and p["algorithm"] == algo:
            out[float(r["mu"])] = r["mean"]
    return out


def write_plot(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """One column per dataset: accuracy vs lr (per algorithm and epochs), and vs mu."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["point"]["dataset"] for r in results))
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.6 * len(datasets), 7.4), squeeze=False)
    styles = {1: "-", 2: "--", 4: ":"}
    for col, d in enumerate(datasets):
        ax = axes[0][col]
        curves: dict[tuple[str, int], dict[float, float]] = {}
        for r in results:
            p = r["point"]
            if p["dataset"] == d and p["axis"] in ("lr", "epochs"):
                curves.setdefault((p["algorithm"], p["epochs"]), {})[p["learning_rate"]] = 100 * r["mean"]
        for (algo, epochs), v in sorted(curves.items()):
            xs = sorted(v)
            ax.plot(xs, [v[x] for x in xs], styles.get(epochs, "-."), marker="o", ms=3,
                    color=f"C{list(AXIS_ALGORITHMS).index(algo) if algo in AXIS_ALGORITHMS else 3}",
                    label=f"{algo}, {epochs} epoch{'s' if epochs > 1 else ''}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (AdamW)")
        ax.set_ylabel("final mean per-device accuracy (%)")
        ax.set_title(d, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax = axes[1][col]
        for algo, color in (("fedprox", "C3"), ("fedalt", "C2")):
            pts = _mu_curve(results, d, algo)
            if pts:
                xs = sorted(pts)
                ax.plot([max(x, 1e-3) for x in xs], [100 * pts[x] for x in xs], marker="o", ms=3, color=color, label=algo)
        ax.set_xscale("log")
        ax.set_xlabel(f"mu (lr {BASE_LR:g}, 1 epoch; mu 0 drawn at 0.001)")
        ax.set_ylabel("final mean per-device accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_in_worker(point: SweepPoint, seed: int, quick: bool) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    return run_point(point, seed=seed, quick=quick, threads=1)


def run_sweep(datasets: Sequence[str], *, profile: Profile = "full", seed: int = 0, workers: int = 2, out_dir: Path,
              progress: Callable[[str], None] | None = None, previous: Sequence[dict[str, Any]] = ()) -> tuple[str, dict[str, Any]]:
    """Run the grid on ``workers`` processes; write ``sweep.json``, ``.md`` and ``.png`` under ``out_dir``; return the table and payload.

    ``previous``: results of an earlier run with the same seed and profile;
    points found there are not run again.
    """
    unknown = [d for d in datasets if d not in SWEEP_DATASETS]
    if unknown:
        raise ValueError(f"unknown sweep datasets {unknown}; choose from {sorted(SWEEP_DATASETS)}")
    quick = profile == "quick"
    points = sweep_points(datasets, profile)
    start = time.perf_counter()
    done = {json.dumps(r["point"], sort_keys=True): r for r in previous}
    results: dict[int, dict[str, Any]] = {i: done[k] for i, p in enumerate(points) if (k := json.dumps(asdict(p), sort_keys=True)) in done}
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold ORT threads
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        futures = {pool.submit(_run_in_worker, p, seed, quick): i for i, p in enumerate(points) if i not in results}
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if progress is not None:
                p = result["point"]
                progress(f"{p['dataset']} {p['algorithm']} lr={p['learning_rate']:g} epochs={p['epochs']} mu={result['mu']:g}"
                         f" pe={p['personal_epochs']}: {100 * result['mean']:.2f}% in {result['seconds']:.0f} s")
    ordered = [results[i] for i in range(len(points))]
    recommendation = recommend_learning_rate(ordered)
    table = format_table(ordered, recommendation)
    payload = {
        "profile": profile, "seed": seed, "workers": workers, "wall_seconds": time.perf_counter() - start,
        "reused_points": len(points) - len(futures),
        "machine": {"python": platform.python_version(), "machine": platform.machine(), "cpus": multiprocessing.cpu_count()},
        "datasets": {d: asdict(SWEEP_DATASETS[d]) for d in datasets}, "optimizer": "adamw",
        "recommendation": recommendation, "results": ordered,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(out_dir / "sweep.json")
    (out_dir / "sweep.md").write_text(table + "\n")
    write_plot(ordered, out_dir / "sweep.png")
    return table, payload
