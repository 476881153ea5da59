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

This module holds the settings, the pure summary (:func:`summarise`) and the
report writers; :func:`run_one` is what a worker executes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Profile = Literal["full", "quick"]
DEFAULT_SETTINGS = ("watch", "watch-scarce", "watch-recording", "fmnist", "synthetic")
"""What ``fedge bench accuracy`` runs without ``--setting``; ``fmnist-long`` is opt-in (about an hour on 2 cores)."""
TIE_MARGIN = 0.005
"""Accuracy differences up to half a point count as ties in the claims (seed-to-seed spread measured on the
smartwatch setting is 0.03-1 point)."""
PFLLIB_FMNIST_DIR01 = {"FedAvg": 85.85, "FedProx": 85.63, "FedFomo": 97.21, "FedPer": 97.44, "FedRep": 97.56, "Ditto": 97.47}


@dataclass(frozen=True, kw_only=True)
class AccuracyRun:
    """One algorithm run inside a setting.

    ``label`` names the row; ``algorithm`` is a key of
    :data:`sdk.simulation.algorithms.ALGORITHMS`. ``regional_weight`` not
    None runs the two-tier hierarchy over the dataset's regions.
    """

    label: str
    algorithm: str
    mu: float | None = None
    stragglers: float = 0.0
    regional_weight: float | None = None
    finetune_epochs: int = 0
    fomo_candidates: int = 5


@dataclass(frozen=True, kw_only=True)
class AccuracySetting:
    """A dataset split, a model, a budget, and the runs compared on it."""

    name: str
    title: str
    dataset: str  # "watch-time" | "watch-scarce" | "watch-recording" | "fashion-mnist" | "synthetic" | "digits"
    model: str  # "cnn1d" | "cnn2d" | "logreg" | "mlp"
    rounds: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    runs: tuple[AccuracyRun, ...]
    participation: float = 1.0
    straggler_work: float = 0.5
    subsample: float | None = None
    regions: str | None = None  # None | "side" | "labels-<k>"
    notes: tuple[str, ...] = ()


def _personal_runs(ft_epochs: int) -> tuple[AccuracyRun, ...]:
    return (
        AccuracyRun(label="Local-only", algorithm="local"),
        AccuracyRun(label="FedAvg", algorithm="fedavg", finetune_epochs=ft_epochs),
        AccuracyRun(label="FedProx", algorithm="fedprox", mu=0.01),
        AccuracyRun(label="FedSim", algorithm="fedsim"),
        AccuracyRun(label="FedAlt", algorithm="fedalt"),
        AccuracyRun(label="FedFomo", algorithm="fedfomo", fomo_candidates=5),
    )


def settings(profile: Profile = "full") -> dict[str, AccuracySetting]:
    """The benchmark's settings; ``quick`` shrinks rounds and data for a smoke run."""
    quick = profile == "quick"
    watch_common = dict(model="cnn1d", rounds=4 if quick else 30, epochs=2, batch_size=32, learning_rate=0.005, optimizer="adamw")
    hier = (
        AccuracyRun(label="Hier. FedAvg a=0.5", algorithm="fedavg", regional_weight=0.5),
        AccuracyRun(label="Hier. FedAvg a=0.9", algorithm="fedavg", regional_weight=0.9),
    )
    out = [
        AccuracySetting(
            name="watch", title="Smartwatch exercises, 20 clients (subject x arm), time split", dataset="watch-time",
            regions="side", runs=(*_personal_runs(2), *hier,
                                  AccuracyRun(label="Hier. FedAlt a=0.5", algorithm="fedalt", regional_weight=0.5)),
            **watch_common,  # type: ignore[arg-type]
            notes=("Each recording is cut in time: the last 25% of every recording is test, 15% of the rest validation;"
                   " windows never cross a cut, so no time step is in two splits.",
                   "Hierarchical runs: two regions, the left-arm and the right-arm clients."),
        ),
        AccuracySetting(
            name="watch-scarce", title="Smartwatch exercises, 20 clients, time split, only the first 25% of each training segment",
            dataset="watch-scarce", runs=_personal_runs(2), **watch_common,  # type: ignore[arg-type]
            notes=("As the watch setting, but each device keeps only the first quarter of its training steps (the first few"
                   " repetitions of each exercise): the scarce-data case of a new device. Validation and test are unchanged.",),
        ),
        AccuracySetting(
            name="watch-recording", title="Smartwatch exercises, 20 clients, split by recording (unseen exercise)",
            dataset="watch-recording", runs=_personal_runs(2), **watch_common,  # type: ignore[arg-type]
            notes=("Every client has exactly one recording per exercise, so holding out whole recordings means each"
                   " client's test (and validation) exercise is one it has no training data for.",),
        ),
        AccuracySetting(
            name="fmnist", title="Fashion-MNIST, Dirichlet(0.1) over 20 clients, all clients every round",
            dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 15, epochs=1, batch_size=32,
            learning_rate=0.001, optimizer="adamw", subsample=0.05 if quick else 0.5, regions="labels-4",
            runs=(*_personal_runs(1), hier[0]),
            notes=("Hierarchical run: four regions of clients grouped by label mix (k-means on label histograms).",),
        ),
    ]
    out.append(AccuracySetting(
        name="fmnist-long", title="Fashion-MNIST Dir(0.1): local-only vs FedAlt over 40 rounds (the round-budget check)",
        dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 40, epochs=1, batch_size=32,
        learning_rate=0.001, optimizer="adamw", subsample=0.05 if quick else 0.5,
        runs=(AccuracyRun(label="Local-only", algorithm="local"), AccuracyRun(label="FedAlt", algorithm="fedalt")),
        notes=("Same data, model and budget per round as the fmnist setting, 40 rounds instead of 15.",),
    ))
    stragglers = (0.0, 0.5, 0.9)
    synthetic_runs = tuple(
        run for s in stragglers for run in (
            AccuracyRun(label=f"FedAvg, {s:.0%} stragglers", algorithm="fedavg", stragglers=s),
            AccuracyRun(label=f"FedProx mu=1, {s:.0%} stragglers", algorithm="fedprox", mu=1.0, stragglers=s),
        )
    )
    out.append(AccuracySetting(
        name="synthetic", title="FedProx Synthetic(1, 1), 30 devices, multinomial logistic regression",
        dataset="synthetic", model="logreg", rounds=10 if quick else 100, epochs=20, batch_size=10, learning_rate=0.01,
        optimizer="sgd", participation=10 / 30, straggler_work=0.25, runs=synthetic_runs,
        notes=("As in Li et al. (2020): 10 of 30 devices per round, 20 local epochs, batch 10, SGD lr 0.01; a straggler does"
               " a quarter of its budget; FedAvg drops stragglers' updates, FedProx keeps their partial work.",),
    ))
    return {s.name: s for s in out}


# -- one run (a worker) -----------------------------------------------------------------------

def _load_dataset(setting: AccuracySetting, seed: int):  # type: ignore[no-untyped-def]
    import sdk.datasets as ds

    if setting.dataset == "watch-time":
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


def run_one(setting: AccuracySetting, run: AccuracyRun, *, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Build the run's bundle, simulate it, and return every figure as plain JSON-able data."""
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.bundle.archive import install_bundle
    from device_agent.bundle.manifest import OptimizerKind
    from device_agent.trainer import TrainBudget
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.simulation.algorithms import algorithm
    from sdk.simulation.catalog import build_model
    from sdk.simulation.simulator import FederatedSimulator, HierarchyConfig, SimulationConfig

    spec = algorithm(run.algorithm)
    data = _load_dataset(setting, seed)
    torch.manual_seed(seed)  # every run of a setting starts from the same initial weights
    model, split, finetune = build_model(setting.model, data, personal=spec.personal_head)
    n_params = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    key = Ed25519PrivateKey.generate()
    mu = spec.default_mu if run.mu is None else run.mu
    hierarchy = None if run.regional_weight is None else HierarchyConfig(regional_weight=run.regional_weight)
    with tempfile.TemporaryDirectory(prefix="fedge-acc-") as tmp:
        build_bundle(model, example_input=torch.zeros((2, *data.input_shape)), split=split,
                     spec=TrainingSpec(mode=spec.mode, mu=mu, optimizer=OptimizerKind(setting.optimizer), learning_rate=setting.learning_rate,
                                       finetune=finetune if run.finetune_epochs else ()),
                     signing_key=key, out_path=Path(tmp) / "b.fedge", model_name=setting.name)
        bundle = install_bundle(Path(tmp) / "b.fedge", key.public_key(), Path(tmp) / "bundle")
        config = SimulationConfig(
            rounds=setting.rounds, budget=TrainBudget(epochs=setting.epochs, batch_size=setting.batch_size),
            participation=setting.participation, straggler_fraction=run.stragglers, straggler_work=setting.straggler_work,
            straggler_policy=spec.straggler_policy, federated=spec.federated,  # type: ignore[arg-type]
            fomo_candidates=run.fomo_candidates if spec.fomo else None, hierarchy=hierarchy,
            finetune_epochs=run.finetune_epochs, seed=seed,
        )
        sim = FederatedSimulator(bundle, data, config, threads=threads)
        result = sim.run()
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


# -- the summary (pure) -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SummaryRow:
    """One line of a setting's table: accuracies in [0, 1], bytes per participating device per round."""

    label: str
    personalised_mean: float
    personalised_std: float
    personalised_min: float
    pooled: float
    best_round_pooled: float
    global_mean: float | None
    share_beating_local: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    per_device: dict[str, float] = field(repr=False)


def _row(label: str, acc: dict[str, float], examples: dict[str, int], *, global_acc: dict[str, float] | None,
         local: dict[str, float] | None, rounds: Sequence[dict[str, Any]], seconds: float, best: float | None = None) -> SummaryRow:
    values = np.array(list(acc.values()))
    total = sum(examples[c] for c in acc)
    pooled = float(sum(acc[c] * examples[c] for c in acc) / total)
    up = max((r["bytes_up_per_device"] for r in rounds), default=0)
    down = max((r["bytes_down_per_device"] for r in rounds), default=0)
    return SummaryRow(
        label=label, personalised_mean=float(values.mean()), personalised_std=float(values.std()),
        personalised_min=float(values.min()), pooled=pooled,
        best_round_pooled=max([pooled, *(r["pooled"] for r in rounds)]) if best is None else best,
        global_mean=float(np.mean(list(global_acc.values()))) if global_acc else None,
        share_beating_local=None if local is None else float(np.mean([acc[c] > local[c] for c in acc])),
        bytes_up=int(up), bytes_down=int(down), seconds=seconds, per_device=dict(acc),
    )


def summarise(setting: AccuracySetting, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Table rows (FedAvg+FT rows derived from the FedAvg run) and the claims this setting can check."""
    from sdk.simulation.algorithms import ALGORITHMS

    by_label = {r["label"]: r for r in results}
    local_run = next((r for r in results if r["run"]["algorithm"] == "local"), None)
    local = local_run["final"]["personalised"] if local_run else None
    rows: list[SummaryRow] = []
    for r in results:
        ex = r["test_examples"]
        is_local = r["run"]["algorithm"] == "local"
        # Only algorithms without a personal head have a whole global model to evaluate.
        has_global = not ALGORITHMS[r["run"]["algorithm"]].personal_head and r["run"]["algorithm"] != "local"
        rows.append(_row(r["label"], r["final"]["personalised"], ex, global_acc=r["final"]["global"] if has_global else None,
                         local=None if is_local else local, rounds=r["rounds"], seconds=r["seconds"]))
        for kind, acc in sorted(r["final"]["fine_tuned"].items()):
            rows.append(_row(f"{r['label']}+FT({kind})", acc, ex, global_acc=None, local=local, rounds=r["rounds"],
                             seconds=r["seconds"], best=0.0))
    table = {row.label: row for row in rows}
    claims = _claims(setting, table, by_label)
    return {"rows": [asdict(row) for row in rows], "claims": claims}


def _claim(text: str, holds: bool | None, evidence: str) -> dict[str, Any]:
    return {"claim": text, "holds": holds, "evidence": evidence}


def _claims(setting: AccuracySetting, table: dict[str, SummaryRow], by_label: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    mean = {k: v.personalised_mean for k, v in table.items()}
    personal: list[str] = [k for k in ("FedSim", "FedAlt", "FedFomo") if k in mean]
    if personal and "FedAvg" in table and "Local-only" in mean:
        best = max(personal, key=lambda k: mean[k])
        fedavg_global = table["FedAvg"].global_mean or 0.0
        lead = mean[best] - mean["Local-only"]
        out.append(_claim(f"the best personalised method beats FedAvg's global model and local-only by more than {TIE_MARGIN:.3f}"
                          " (mean per-device accuracy)",
                          mean[best] > fedavg_global + TIE_MARGIN and lead > TIE_MARGIN,
                          f"{best} {mean[best]:.4f} vs FedAvg global {fedavg_global:.4f}, local-only {mean['Local-only']:.4f}"
                          + (" (a tie with local-only)" if abs(lead) <= TIE_MARGIN else "")))
    if "FedAlt" in mean and "FedSim" in mean:
        out.append(_claim("FedAlt matches or beats FedSim", mean["FedAlt"] >= mean["FedSim"] - 0.002,
                          f"FedAlt {mean['FedAlt']:.4f} vs FedSim {mean['FedSim']:.4f} (tolerance 0.002)"))
    if "FedAlt" in mean and "FedAvg" in table and "FedAvg+FT(all)" in mean:
        base = table["FedAvg"].global_mean or 0.0
        full_gain = mean["FedAvg+FT(all)"] - base
        part_gain = mean["FedAlt"] - base
        ratio = part_gain / full_gain if full_gain > 0 else math.nan
        fedalt = by_label["FedAlt"]
        share = fedalt["head_parameters"] / fedalt["parameters"]
        out.append(_claim("a personal head with < 10% of the parameters gets >= 90% of full personalisation's gain (Pillutla et al.)",
                          bool(share < 0.10 and full_gain > 0 and ratio >= 0.9),
                          f"head = {share:.1%} of {fedalt['parameters']:,} parameters; gain over FedAvg's global model: "
                          f"FedAlt {part_gain:+.4f}, full fine-tuning (FedAvg+FT(all)) {full_gain:+.4f}, ratio {ratio:.2f}"))
    if setting.dataset == "fashion-mnist" and personal:
        best = max(personal, key=lambda k: table[k].best_round_pooled)
        ref = max(PFLLIB_FMNIST_DIR01.values())
        ours = 100 * table[best].best_round_pooled
        out.append(_claim("the best personalised method is within 1 point of PFLlib's best published figure (97.56)",
                          ours >= ref - 1.0, f"{best} {ours:.2f} (best round, pooled over test examples) vs PFLlib FedRep {ref:.2f}"))
    if setting.dataset == "synthetic":
        avg = next((k for k in mean if k.startswith("FedAvg, 90%")), None)
        prox = next((k for k in mean if k.startswith("FedProx mu=1, 90%")), None)
        if avg and prox:
            a, p = table[avg].global_mean or 0.0, table[prox].global_mean or 0.0
            out.append(_claim("FedProx beats FedAvg with 90% stragglers (global model, mean per-device test accuracy)",
                              p > a, f"FedProx {p:.4f} vs FedAvg {a:.4f}"))
    hier = [k for k in mean if k.startswith("Hier. FedAvg")]
    flat = table.get("FedAvg")
    if hier and flat is not None:
        best = max(hier, key=lambda k: mean[k])
        out.append(_claim("hierarchical cluster-aware FedAvg beats flat FedAvg when regions differ (model each device is served)",
                          mean[best] > flat.personalised_mean,
                          f"{best} {mean[best]:.4f} vs flat FedAvg {flat.personalised_mean:.4f}"))
    return out


# -- reports ----------------------------------------------------------------------------------

def format_table(setting: AccuracySetting, summary: dict[str, Any]) -> str:
    """The setting's table (percent) and its claims, as Markdown."""
    lines = [f"### {setting.title}", "", *(f"{note}\n" for note in setting.notes),
             "| method | personalised mean ± std | min | pooled | best-round pooled | global model | beats local-only | "
             "up / down per device per round | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        glob = "—" if row["global_mean"] is None else f"{100 * row['global_mean']:.2f}"
        share = "—" if row["share_beating_local"] is None else f"{100 * row['share_beating_local']:.0f}%"
        best = "—" if row["best_round_pooled"] == 0.0 else f"{100 * row['best_round_pooled']:.2f}"
        traffic = "0" if not row["bytes_up"] else f"{row['bytes_up'] / 1024:,.1f} KiB / {row['bytes_down'] / 1024:,.1f} KiB"
        lines.append(f"| {row['label']} | {100 * row['personalised_mean']:.2f} ± {100 * row['personalised_std']:.2f} | "
                     f"{100 * row['personalised_min']:.2f} | {100 * row['pooled']:.2f} | {best} | {glob} | {share} | "
                     f"{traffic} | {row['seconds']:.0f} |")
    if summary["claims"]:
        lines += ["", "Claims checked:", ""]
        for c in summary["claims"]:
            mark = {True: "holds", False: "does NOT hold", None: "not measured"}[c["holds"]]
            lines.append(f"- {c['claim']}: **{mark}** ({c['evidence']})")
    return "\n".join(lines)


def write_plots(setting: AccuracySetting, results: Sequence[dict[str, Any]], summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots: accuracy per round, gain over local-only per device, and tiers for hierarchical runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        ax.plot([x["round"] + 1 for x in r["rounds"]], [100 * x["mean"] for x in r["rounds"]], label=r["label"])
    ax.set_xlabel("round")
    ax.set_ylabel("mean per-device test accuracy (%)")
    ax.set_title(setting.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / f"{setting.name}-rounds.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    local_row = next((row for row in summary["rows"] if row["label"].startswith("Local-only")), None)
    if local_row is not None:
        others = [row for row in summary["rows"] if row is not local_row]
        gains = [[100 * (row["per_device"][c] - local_row["per_device"][c]) for c in row["per_device"]] for row in others]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(others)), 4.2))
        ax.boxplot(gains, showmeans=True)
        ax.set_xticks(range(1, len(others) + 1), [row["label"] for row in others], rotation=25, ha="right", fontsize=7)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel("per-device accuracy gain over local-only (points)")
        ax.set_title(f"{setting.title}: gain over local-only", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / f"{setting.name}-gain.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    tiered = [r for r in results if r["final"]["regional"]]
    if tiered:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        width = 0.8 / 3
        for i, (name, key) in enumerate((("global model", "global"), ("regional model", "regional"), ("served / personalised", "personalised"))):
            ax.bar([j + (i - 1) * width for j in range(len(tiered))],
                   [100 * float(np.mean(list(r["final"][key].values()))) for r in tiered], width, label=name)
        ax.set_xticks(range(len(tiered)), [r["label"] for r in tiered], fontsize=8)
        # Flat references: FedAvg's global model and the personal-head methods, as lines across the bars.
        refs = [(r["label"], 100 * float(np.mean(list(r["final"]["personalised"].values())))) for r in results
                if not r["final"]["regional"] and r["run"]["algorithm"] in ("fedavg", "fedalt", "local")]
        for (label, value), style in zip(refs, ("--", ":", "-.")):
            ax.axhline(value, color="black", lw=0.9, ls=style, label=f"{label} (flat): {value:.1f}")
        ax.set_ylim(0, 100)
        ax.set_ylabel("mean per-device test accuracy (%)")
        ax.set_title(f"{setting.name}: hierarchical runs, global vs regional vs served model", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        written.append(out_dir / f"{setting.name}-tiers.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_setting(setting: AccuracySetting, results: Sequence[dict[str, Any]], out_dir: Path, *, seed: int,
                  profile: Profile) -> tuple[str, dict[str, Any]]:
    """JSON + Markdown + PNGs for one setting; returns the Markdown table and the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(setting, results)
    table = format_table(setting, summary)
    payload = {
        "setting": asdict(setting), "profile": profile, "seed": seed,
        "machine": {"python": platform.python_version(), "machine": platform.machine(), "cpus": multiprocessing.cpu_count()},
        "dataset": results[0]["dataset_description"] if results else "",
        "summary": summary, "runs": list(results),
    }
    tmp = out_dir / f"{setting.name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(out_dir / f"{setting.name}.json")
    (out_dir / f"{setting.name}.md").write_text(table + "\n")
    write_plots(setting, results, summary, out_dir)
    return table, summary


def rewrite_reports(out_dir: Path, names: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Rebuild the Markdown and PNGs of settings from their JSON (after a change to the summary or plots)."""
    reports = {}
    for name in names:
        payload = json.loads((out_dir / f"{name}.json").read_text())
        setting = settings(payload["profile"])[name]
        reports[name] = write_setting(setting, payload["runs"], out_dir, seed=payload["seed"], profile=payload["profile"])
    return reports


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
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Run every run of the named settings on ``workers`` processes; write and return each setting's report."""
    table = settings(profile)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {sorted(table)}")
    chosen = [table[n] for n in names]
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

