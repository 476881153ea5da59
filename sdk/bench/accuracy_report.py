"""The accuracy benchmark's summary (pure), claims and reports: JSON, Markdown tables and PNG plots per setting."""

from __future__ import annotations

import json
import math
import multiprocessing
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdk.bench.accuracy_settings import PFLLIB_FMNIST_DIR01, TIE_MARGIN, AccuracySetting, Profile, setting_from_dict, settings

# -- the summary (pure) -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SummaryRow:
    """One line of a setting's table: accuracies in [0, 1], bytes per participating device per round (mean over rounds)."""

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
    up = float(np.mean([r["bytes_up_per_device"] for r in rounds])) if rounds else 0
    down = float(np.mean([r["bytes_down_per_device"] for r in rounds])) if rounds else 0
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
    kept = {r["label"]: r["fomo_kept_own"] for r in results if (r.get("fomo_kept_own") or {}).get("overall") is not None}
    validation = next((r["validation"]["note"] for r in results if (r.get("validation") or {}).get("note")), "")
    return {"rows": [asdict(row) for row in rows], "claims": claims, "fomo_kept_own": kept, "validation": validation}


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
    out.extend(_compression_claims(table, by_label))
    hier = [k for k in mean if k.startswith("Hier. FedAvg")]
    flat = table.get("FedAvg")
    if hier and flat is not None:
        best = max(hier, key=lambda k: mean[k])
        out.append(_claim("hierarchical cluster-aware FedAvg beats flat FedAvg when regions differ (model each device is served)",
                          mean[best] > flat.personalised_mean,
                          f"{best} {mean[best]:.4f} vs flat FedAvg {flat.personalised_mean:.4f}"))
    return out


COMPRESSION_TARGET = 8.0
"""Issue 12: at least 8x fewer bytes (up + down) per device per round than full float32, at most half a point lost."""


def _compression_claims(table: dict[str, SummaryRow], by_label: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each compressed run against the float32 run of the same algorithm (same label before the first comma)."""
    out = []
    for label, result in by_label.items():
        run = result["run"]
        if run.get("compression", "none") == "none" and run.get("downlink", "none") == "none":
            continue
        base = table.get(label.split(",")[0])
        row = table[label]
        if base is None or not (row.bytes_up + row.bytes_down):
            continue
        ratio = (base.bytes_up + base.bytes_down) / (row.bytes_up + row.bytes_down)
        up_ratio = base.bytes_up / row.bytes_up if row.bytes_up else math.nan
        lost = base.personalised_mean - row.personalised_mean
        out.append(_claim(f"{label}: >= {COMPRESSION_TARGET:g}x fewer bytes than float32 with <= 0.5 points lost",
                          ratio >= COMPRESSION_TARGET and lost <= TIE_MARGIN,
                          f"{ratio:.1f}x fewer bytes up + down (up alone {up_ratio:.1f}x); accuracy {100 * row.personalised_mean:.2f}"
                          f" vs {100 * base.personalised_mean:.2f} ({-100 * lost:+.2f} points)"))
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
    if summary.get("validation"):
        lines += ["", f"Validation: {summary['validation']}."]
    for label, kept in (summary.get("fomo_kept_own") or {}).items():
        worst = max(kept["per_device"].items(), key=lambda item: item[1])
        lines += ["", f"{label}: a device kept only its own model (no peer helped on its validation split) in"
                      f" {100 * kept['overall']:.0f}% of device-rounds; most often {worst[0]} ({100 * worst[1]:.0f}%)."]
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
        setting = settings(payload["profile"]).get(name) or setting_from_dict(payload["setting"])
        reports[name] = write_setting(setting, payload["runs"], out_dir, seed=payload["seed"], profile=payload["profile"])
    return reports


