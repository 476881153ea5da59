"""The cold-start part of an accuracy report: newcomers joining a fleet vs training alone (summary pure, then Markdown and PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def cold_start_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Per join round and sample count: accuracy of every way a newcomer can start (mean and std over newcomers x seeds).

    Ways: ``local-only`` (from runs that report it), ``<run> global`` (the fleet's
    model as it is, where it is whole) and ``<run> + head`` (head trained on the
    samples). ``beats_local``: for each fleet way, the share of (newcomer, seed)
    pairs where it beats local-only on the same samples. None without cold-start results.
    """
    entries = [(r["label"], r.get("seed"), c) for r in results for c in r.get("cold_start") or []]
    if not entries:
        return None
    local: dict[tuple[Any, str, int], float] = {}
    for _, seed, c in entries:
        if c["local"] is not None:
            local.setdefault((seed, c["device"], c["samples"]), c["local"])
    table: dict[tuple[int, int], dict[str, list[tuple[Any, str, float]]]] = {}
    for label, seed, c in entries:
        cell = table.setdefault((c["join_round"], c["samples"]), {})
        if c["zero_shot"] is not None:
            cell.setdefault(f"{label} global", []).append((seed, c["device"], c["zero_shot"]))
        cell.setdefault(f"{label} + head", []).append((seed, c["device"], c["fleet"]))
    rows = []
    for (join_round, samples), cell in sorted(table.items()):
        base = {(s, d): v for (s, d, n), v in local.items() if n == samples}
        row: dict[str, Any] = {"join_round": join_round, "samples": samples, "ways": {}}
        if base:
            row["ways"]["local-only"] = {"mean": float(np.mean(list(base.values()))), "std": float(np.std(list(base.values()))),
                                         "n": len(base), "beats_local": None}
        for way, values in cell.items():
            accs = [v for _, _, v in values]
            wins = [v > base[(s, d)] for s, d, v in values if (s, d) in base]
            row["ways"][way] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs),
                                "beats_local": float(np.mean(wins)) if wins else None}
        rows.append(row)
    return {"rows": rows, "ways": list(dict.fromkeys(w for row in rows for w in row["ways"]))}


def format_cold_start(summary: dict[str, Any]) -> str:
    """Markdown: one table per join round, one row per sample count, one column per way (mean ± std, share beating local)."""
    ways = summary["ways"]
    lines = ["", "Cold start: a newcomer's test accuracy (%, mean ± std over newcomers and seeds; in brackets the share of"
                 " newcomer-seeds beating local-only on the same examples)."]
    for join_round in sorted({row["join_round"] for row in summary["rows"]}):
        lines += ["", f"Joining after round {join_round}:", "", "| examples | " + " | ".join(ways) + " |",
                  "|---|" + "---|" * len(ways)]
        for row in (r for r in summary["rows"] if r["join_round"] == join_round):
            cells = []
            for way in ways:
                got = row["ways"].get(way)
                if got is None:
                    cells.append("—")
                    continue
                share = "" if got["beats_local"] is None else f" ({100 * got['beats_local']:.0f}%)"
                cells.append(f"{100 * got['mean']:.1f} ± {100 * got['std']:.1f}{share}")
            lines.append(f"| {row['samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cold_start(summary: dict[str, Any], title: str, path: Path) -> Path:
    """Accuracy against the newcomer's examples at the last join round, and against the join round per example count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(row["join_round"] for row in summary["rows"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for way in summary["ways"]:
        points = [(row["samples"], row["ways"][way]) for row in summary["rows"] if row["join_round"] == last and way in row["ways"]]
        left.errorbar([p[0] for p in points], [100 * p[1]["mean"] for p in points], yerr=[100 * p[1]["std"] for p in points],
                      marker="o", capsize=3, label=way, ls="--" if way == "local-only" else "-")
    left.set_xscale("log")
    left.set_xlabel("newcomer's labelled examples")
    left.set_ylabel("newcomer test accuracy (%)")
    left.set_title(f"joining after round {last}", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    heads = [w for w in summary["ways"] if w.endswith("+ head")]
    for samples in sorted({row["samples"] for row in summary["rows"]}):
        rows = sorted((r for r in summary["rows"] if r["samples"] == samples), key=lambda r: r["join_round"])
        for way in heads:
            right.plot([r["join_round"] for r in rows], [100 * r["ways"][way]["mean"] for r in rows], marker="o",
                       label=f"{way}, {samples} examples")
        base = [r["ways"].get("local-only") for r in rows]
        if base and base[0] is not None:
            right.axhline(100 * base[0]["mean"], ls="--", lw=0.8, color="grey")
    right.set_xlabel("fleet rounds before joining")
    right.set_ylabel("newcomer test accuracy (%)")
    right.set_title("dashed: local-only on the same examples", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cold_start_claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per example count, at the last join round: does the best way to join the fleet beat training alone on the mean?"""
    last = max(row["join_round"] for row in summary["rows"])
    out = []
    for row in (r for r in summary["rows"] if r["join_round"] == last):
        local = row["ways"].get("local-only")
        fleet = {w: v for w, v in row["ways"].items() if w != "local-only"}
        if local is None or not fleet:
            continue
        best, got = max(fleet.items(), key=lambda item: item[1]["mean"])
        out.append({"claim": f"a newcomer with {row['samples']} examples is better off joining the fleet (after round {last})"
                             " than training alone", "holds": got["mean"] > local["mean"],
                    "evidence": f"{best} {100 * got['mean']:.1f} vs local-only {100 * local['mean']:.1f} (mean over"
                                f" {got['n']} newcomer-seeds; ahead on {100 * (got['beats_local'] or 0.0):.0f}% of them)"})
    return out
