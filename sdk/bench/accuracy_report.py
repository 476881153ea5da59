"""The accuracy benchmark's summary (pure), claims and reports: JSON, Markdown tables and PNG plots per setting."""

from __future__ import annotations

import json
import multiprocessing
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdk.bench.accuracy_claims import check_claims
from sdk.bench.accuracy_cold_start import cold_start_claims, cold_start_summary, format_cold_start, plot_cold_start
from sdk.bench.accuracy_devices import device_analysis, format_devices, plot_devices
from sdk.bench.accuracy_settings import AccuracySetting, Profile, setting_from_dict, settings

# -- the summary (pure) -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SummaryRow:
    """One line of a setting's table: accuracies in [0, 1], bytes per participating device per round (mean over rounds).

    With several seeds every figure is the mean over seeds (``per_device``: each
    device's mean), ``personalised_seed_std`` the standard deviation over seeds
    of the mean accuracy. ``gain_mean``: mean over devices (and seeds) of the
    accuracy minus local-only's on the same device and seed; ``gain_seed_std``:
    its standard deviation over seeds; ``share_clear``: the share of devices
    whose mean gain exceeds the standard deviation over seeds of their own gain
    (None with one seed, or for local-only itself).
    """

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
    seeds: int = 1
    personalised_seed_std: float | None = None
    gain_mean: float | None = None
    gain_seed_std: float | None = None
    share_clear: float | None = None
    per_seed_device: list[dict[str, float]] = field(default_factory=list, repr=False)


def _row(label: str, acc: dict[str, float], examples: dict[str, int], *, global_acc: dict[str, float] | None,
         local: dict[str, float] | None, rounds: Sequence[dict[str, Any]], seconds: float, best: float | None = None) -> SummaryRow:
    values = np.array(list(acc.values()))
    total = sum(examples[c] for c in acc)
    pooled = float(sum(acc[c] * examples[c] for c in acc) / total)
    up = float(np.mean([r["bytes_up_per_device"] for r in rounds])) if rounds else 0
    down = float(np.mean([r["bytes_down_per_device"] for r in rounds])) if rounds else 0
    return SummaryRow(
        label=label, personalised_mean=float(values.mean()), personalised_std=float(values.std()),
        personalised_min=float(values.min()), pooled=pooled,
        best_round_pooled=max([pooled, *(r["pooled"] for r in rounds)]) if best is None else best,
        global_mean=float(np.mean(list(global_acc.values()))) if global_acc else None,
        share_beating_local=None if local is None else float(np.mean([acc[c] > local[c] for c in acc])),
        bytes_up=int(up), bytes_down=int(down), seconds=seconds, per_device=dict(acc), per_seed_device=[dict(acc)],
    )


def _seed_rows(results: Sequence[dict[str, Any]]) -> list[SummaryRow]:
    """The rows of one seed's runs (FedAvg+FT rows from the FedAvg run, two rows from a Ditto run)."""
    from sdk.simulation.algorithms import ALGORITHMS

    local_run = next((r for r in results if r["run"]["algorithm"] == "local"), None)
    local = local_run["final"]["personalised"] if local_run else None
    rows: list[SummaryRow] = []
    for r in results:
        ex = r["test_examples"]
        algo = r["run"]["algorithm"]
        compare = None if algo == "local" else local
        # Only algorithms without a personal head have a whole global model to evaluate.
        has_global = not ALGORITHMS[algo].personal_head and algo != "local"
        global_acc = r["final"]["global"] if has_global else None
        own = r["final"].get("personal_model") or {}
        if own:  # Ditto: its personal model alone, then the mixture each device chose on validation
            rows.append(_row(r["label"], own, ex, global_acc=global_acc, local=compare, rounds=r["rounds"], seconds=r["seconds"],
                             best=0.0))
            rows.append(_row(f"{r['label']}+choice", r["final"]["personalised"], ex, global_acc=global_acc, local=compare,
                             rounds=r["rounds"], seconds=r["seconds"]))
        else:
            rows.append(_row(r["label"], r["final"]["personalised"], ex, global_acc=global_acc, local=compare, rounds=r["rounds"],
                             seconds=r["seconds"]))
        for kind, acc in sorted(r["final"]["fine_tuned"].items()):
            rows.append(_row(f"{r['label']}+FT({kind})", acc, ex, global_acc=None, local=local, rounds=r["rounds"],
                             seconds=r["seconds"], best=0.0))
        for name, acc in (r["final"].get("candidates") or {}).items():
            rows.append(_row(_candidate_label(r["label"], name), acc, ex, global_acc=None, local=local,
                             rounds=r["rounds"], seconds=r["seconds"], best=0.0))
        for rule, acc in (r["final"].get("chosen") or {}).items():
            rows.append(_row(f"{r['label']}, chosen ({rule})", acc, ex, global_acc=None, local=local,
                             rounds=r["rounds"], seconds=r["seconds"], best=0.0))
    return rows


def _candidate_label(label: str, name: str) -> str:
    """The row of a candidate of the choice against local-only: ``FT(all)`` -> ``FedAvg+FT(all, early stop)``."""
    if name.startswith("FT(") and name.endswith(")"):
        return f"{label}+{name[:-1]}, early stop)"
    if name.startswith("local+"):  # an even ensemble of the local model and the others named
        members = name.split("+")[1:]
        if members == ["served"]:
            return f"{label}, ensemble with local"
        return f"{label}+{'+'.join(m[:-1] + ', early stop)' if m.startswith('FT(') else m for m in members)}, ensemble with local"
    return f"{label}, {name}"


def _std(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _combine(label: str, rows: Sequence[SummaryRow], local: Sequence[SummaryRow] | None) -> SummaryRow:
    """One row from the same row of every seed (means over seeds; gains paired with local-only seed by seed)."""
    devices = list(rows[0].per_device)
    per_seed = [r.per_device for r in rows]

    def mean(name: str) -> float:
        return float(np.mean([getattr(r, name) for r in rows]))

    gains: list[dict[str, float]] = []
    if local is not None and label != local[0].label:
        gains = [{d: acc[d] - base.per_device[d] for d in devices} for acc, base in zip(per_seed, local)]
    share_clear = None
    if len(gains) > 1:
        share_clear = float(np.mean([np.mean([g[d] for g in gains]) > np.std([g[d] for g in gains], ddof=1) for d in devices]))
    globals_ = [r.global_mean for r in rows if r.global_mean is not None]
    shares = [r.share_beating_local for r in rows if r.share_beating_local is not None]
    mean_gains = [float(np.mean(list(g.values()))) for g in gains]
    return SummaryRow(
        label=label, personalised_mean=mean("personalised_mean"), personalised_std=mean("personalised_std"),
        personalised_min=mean("personalised_min"), pooled=mean("pooled"), best_round_pooled=mean("best_round_pooled"),
        global_mean=float(np.mean(globals_)) if globals_ else None,
        share_beating_local=float(np.mean(shares)) if shares else None,
        bytes_up=rows[0].bytes_up, bytes_down=rows[0].bytes_down, seconds=mean("seconds"),
        per_device={d: float(np.mean([acc[d] for acc in per_seed])) for d in devices}, seeds=len(rows),
        personalised_seed_std=_std([r.personalised_mean for r in rows]),
        gain_mean=float(np.mean(mean_gains)) if gains else None, gain_seed_std=_std(mean_gains) if gains else None,
        share_clear=share_clear, per_seed_device=[dict(acc) for acc in per_seed],
    )


def summarise(setting: AccuracySetting, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Table rows (means over the seeds present), the claims this setting can check, and what Ditto devices chose."""
    seeds = list(dict.fromkeys(r.get("seed") for r in results))
    per_seed = {k: _seed_rows([r for r in results if r.get("seed") == k]) for k in seeds}
    labels = [row.label for row in per_seed[seeds[0]]]
    by_seed = {label: [next(row for row in per_seed[k] if row.label == label) for k in seeds] for label in labels}
    local = by_seed.get("Local-only")
    rows = [_combine(label, by_seed[label], local) for label in labels]
    table = {row.label: row for row in rows}
    by_label = {r["label"]: r for r in results if r.get("seed") == seeds[0]}
    claims = check_claims(setting, table, by_label)
    kept = {r["label"]: r["fomo_kept_own"] for r in results
            if r.get("seed") == seeds[0] and (r.get("fomo_kept_own") or {}).get("overall") is not None}
    validation = next((r["validation"]["note"] for r in results if (r.get("validation") or {}).get("note")), "")
    cold = cold_start_summary(results)
    if cold is not None:
        claims += cold_start_claims(cold)
    return {"rows": [asdict(row) for row in rows], "claims": claims, "fomo_kept_own": kept, "validation": validation,
            "seeds": seeds, "choices": _choices(results), "cold_start": cold, "picked": _picked(results)}


def _picked(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per run with a choice against local-only: how many devices (over seeds) kept each candidate."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        for rule, picked in (r["final"].get("chosen_model") or {}).items():
            entry = out.setdefault(f"{r['label']}, chosen ({rule})", {})
            for name in picked.values():
                entry[name] = entry.get(name, 0) + 1
    return out


def _choices(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per Ditto run: how many devices (over seeds) ended serving the personal model, the global one or a mixture."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        weights = r["final"].get("serving_weight") or {}
        if not weights:
            continue
        entry = out.setdefault(f"{r['label']}+choice", {"personal": 0, "global": 0, "mixture": 0, "weights": []})
        for w in weights.values():
            entry["personal" if w >= 1.0 else "global" if w <= 0.0 else "mixture"] += 1
            entry["weights"].append(w)
    return out


# -- reports ----------------------------------------------------------------------------------

def _gain(row: dict[str, Any]) -> str:
    if row["gain_mean"] is None:
        return "—"
    spread = "" if row["gain_seed_std"] is None else f" ± {100 * row['gain_seed_std']:.2f}"
    return f"{100 * row['gain_mean']:+.2f}{spread}"


def format_table(setting: AccuracySetting, summary: dict[str, Any]) -> str:
    """The setting's table (percent) and its claims, as Markdown."""
    seeds = [k for k in summary.get("seeds", [None]) if k is not None]
    multi = len(seeds) > 1
    lines = [f"### {setting.title}", "", *(f"{note}\n" for note in setting.notes)]
    if multi:
        lines += [f"Mean over seeds {', '.join(map(str, seeds))} (± the standard deviation over seeds for the mean and the"
                  " gain; the device spread, minimum and pooled figures are seed means). *Gain*: accuracy minus local-only's"
                  " on the same device and seed, in points. *Clearly ahead*: the share of devices whose mean gain exceeds"
                  " the standard deviation of their own gain over the seeds.", ""]
    head = "| method | personalised mean" + (" ± seed std" if multi else " ± std over devices") + (
        " | device std" if multi else "") + " | min | pooled | best-round pooled | global model | gain over local-only |" \
        " beats local-only |" + (" clearly ahead |" if multi else "") + " up / down per device per round | wall s |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for row in summary["rows"]:
        glob = "—" if row["global_mean"] is None else f"{100 * row['global_mean']:.2f}"
        share = "—" if row["share_beating_local"] is None else f"{100 * row['share_beating_local']:.0f}%"
        best = "—" if row["best_round_pooled"] == 0.0 else f"{100 * row['best_round_pooled']:.2f}"
        traffic = "0" if not row["bytes_up"] else f"{row['bytes_up'] / 1024:,.1f} KiB / {row['bytes_down'] / 1024:,.1f} KiB"
        if multi:
            seed_std = "" if row.get("personalised_seed_std") is None else f" ± {100 * row['personalised_seed_std']:.2f}"
            first = f"{100 * row['personalised_mean']:.2f}{seed_std} | {100 * row['personalised_std']:.2f}"
        else:
            first = f"{100 * row['personalised_mean']:.2f} ± {100 * row['personalised_std']:.2f}"
        clear = "" if not multi else (" — |" if row.get("share_clear") is None else f" {100 * row['share_clear']:.0f}% |")
        lines.append(f"| {row['label']} | {first} | {100 * row['personalised_min']:.2f} | {100 * row['pooled']:.2f} | {best} |"
                     f" {glob} | {_gain(row)} | {share} |{clear} {traffic} | {row['seconds']:.0f} |")
    if summary.get("validation"):
        lines += ["", f"Validation: {summary['validation']}."]
    for label, kept in (summary.get("fomo_kept_own") or {}).items():
        worst = max(kept["per_device"].items(), key=lambda item: item[1])
        lines += ["", f"{label}: a device kept only its own model (no peer helped on its validation split) in"
                      f" {100 * kept['overall']:.0f}% of device-rounds; most often {worst[0]} ({100 * worst[1]:.0f}%)."]
    for label, chose in (summary.get("choices") or {}).items():
        total = chose["personal"] + chose["global"] + chose["mixture"]
        lines += ["", f"{label}: after the last round {chose['personal']} of {total} devices{' (all seeds)' if multi else ''}"
                      f" served their personal model, {chose['global']} the global model and {chose['mixture']} a mixture"
                      f" (median weight on the personal model {float(np.median(chose['weights'])):.1f}), each chosen on its own"
                      " validation split."]
    for label, picked in (summary.get("picked") or {}).items():
        kept = ", ".join(f"{n} {name}" for name, n in sorted(picked.items(), key=lambda item: -item[1]))
        lines += ["", f"{label}: of {sum(picked.values())} devices{' (all seeds)' if multi else ''} kept {kept}, each chosen"
                      " on its own validation split (`FT(...)`: fine-tuned with early stopping)."]
    if summary.get("cold_start"):
        lines.append(format_cold_start(summary["cold_start"]))
    if summary["claims"]:
        lines += ["", "Claims checked:", ""]
        for c in summary["claims"]:
            mark = {True: "holds", False: "does NOT hold", None: "not measured"}[c["holds"]]
            lines.append(f"- {c['claim']}: **{mark}** ({c['evidence']})")
    return "\n".join(lines)


def round_curves(results: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean per-device accuracy per round for every row that has one, averaged over the seeds present.

    A Ditto run gives two curves: ``<label>`` (its personal model) and ``<label>+choice`` (what the devices served).
    """
    curves: dict[str, list[list[float]]] = {}
    for r in results:
        own = [x.get("personal_model_mean") for x in r["rounds"]]
        if own and all(v is not None for v in own):
            curves.setdefault(r["label"], []).append([float(v) for v in own])  # type: ignore[arg-type]
            curves.setdefault(f"{r['label']}+choice", []).append([x["mean"] for x in r["rounds"]])
        else:
            curves.setdefault(r["label"], []).append([x["mean"] for x in r["rounds"]])
    return {label: [float(v) for v in np.mean(np.array(runs), axis=0)] for label, runs in curves.items()}


def write_plots(setting: AccuracySetting, results: Sequence[dict[str, Any]], summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots: accuracy per round, gain over local-only per device, and tiers for hierarchical runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, curve in round_curves(results).items():
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("mean per-device test accuracy (%)" + (", mean over seeds" if len(summary.get("seeds", [])) > 1 else ""))
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

    if summary.get("cold_start"):
        written.append(plot_cold_start(summary["cold_start"], setting.title, out_dir / f"{setting.name}-cold-start.png"))

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
    devices = device_analysis(summary, results)
    if devices is not None:
        summary["devices"] = devices
        table += "\n" + format_devices(devices)
    payload = {
        "setting": asdict(setting), "profile": profile, "seed": seed, "seeds": list(setting.run_seeds(seed)),
        "machine": {"python": platform.python_version(), "machine": platform.machine(), "cpus": multiprocessing.cpu_count()},
        "dataset": results[0]["dataset_description"] if results else "",
        "summary": summary, "runs": list(results),
    }
    tmp = out_dir / f"{setting.name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(out_dir / f"{setting.name}.json")
    (out_dir / f"{setting.name}.md").write_text(table + "\n")
    write_plots(setting, results, summary, out_dir)
    if devices is not None:
        plot_devices(devices, setting.title, out_dir / f"{setting.name}-devices.png")
    return table, summary


def rewrite_reports(out_dir: Path, names: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Rebuild the Markdown and PNGs of settings from their JSON (after a change to the summary or plots)."""
    reports = {}
    for name in names:
        payload = json.loads((out_dir / f"{name}.json").read_text())
        setting = settings(payload["profile"]).get(name) or setting_from_dict(payload["setting"])
        reports[name] = write_setting(setting, payload["runs"], out_dir, seed=payload["seed"], profile=payload["profile"])
    return reports


