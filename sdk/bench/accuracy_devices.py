"""Per-device view of a multi-seed setting: which devices gain over local-only, which cannot, and by which statistic.

The data-scarce target counts a device as *clearly ahead* when its mean gain
over the seeds exceeds the standard deviation of its own gain over those seeds
(three seeds: a standard deviation from three numbers, ddof 1). Next to it
this module reports what bounds that share:

- *at the ceiling*: local-only is right on every test example on every seed;
  such a device can tie, never gain;
- *one test example*: the accuracy step of one test example on the device
  (100 / test examples, in points), the resolution of every per-device gain;
- the same share with the *global* seed spread as the threshold (the standard
  deviation over seeds of the fleet's mean gain, one number for every device);
- *any gain* (mean gain > 0) and *not worse* (mean gain >= 0);
- *best of all rows*: the share of devices on which at least one row is
  clearly ahead: an upper bound for any per-device choice among the rows,
  even one that could see the test data.

Pure functions over the summary and the runs' JSON, plus one plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, kw_only=True)
class RowShares:
    """One row's per-device statistics (shares of all devices, 0..1; gains in accuracy, not points)."""

    label: str
    gain_mean: float
    clear: float
    clear_global: float
    any_gain: float
    not_worse: float
    clear_of_beatable: float | None


def _per_device(rows_per_seed: Sequence[dict[str, float]], devices: Sequence[str]) -> np.ndarray:
    return np.array([[seed[d] for d in devices] for seed in rows_per_seed], dtype=np.float64)


def ceiling_devices(local_per_seed: Sequence[dict[str, float]]) -> list[str]:
    """Devices on which local-only is right on every test example on every seed."""
    devices = list(local_per_seed[0])
    acc = _per_device(local_per_seed, devices)
    return [d for d, col in zip(devices, acc.T) if np.all(col >= 1.0)]


def row_shares(label: str, row_per_seed: Sequence[dict[str, float]], local_per_seed: Sequence[dict[str, float]]) -> RowShares:
    """The statistics of the module docs for one row (the same devices and seeds as ``local_per_seed``); >= 2 seeds."""
    if len(row_per_seed) != len(local_per_seed) or len(row_per_seed) < 2:
        raise ValueError("need the row and local-only on the same two or more seeds")
    devices = list(local_per_seed[0])
    gains = _per_device(row_per_seed, devices) - _per_device(local_per_seed, devices)
    mean = gains.mean(axis=0)
    own_std = gains.std(axis=0, ddof=1)
    spread = float(np.std(gains.mean(axis=1), ddof=1))
    ceiling = set(ceiling_devices(local_per_seed))
    beatable = [i for i, d in enumerate(devices) if d not in ceiling]
    clear = mean > own_std
    return RowShares(
        label=label, gain_mean=float(mean.mean()), clear=float(clear.mean()), clear_global=float((mean > spread).mean()),
        any_gain=float((mean > 0).mean()), not_worse=float((mean >= 0).mean()),
        clear_of_beatable=float(clear[beatable].mean()) if beatable else None,
    )


def best_of_rows(rows: dict[str, Sequence[dict[str, float]]], local_per_seed: Sequence[dict[str, float]]) -> tuple[float, dict[str, list[str]]]:
    """Share of devices where at least one row is clearly ahead, and which rows are, per device."""
    devices = list(local_per_seed[0])
    base = _per_device(local_per_seed, devices)
    ahead: dict[str, list[str]] = {d: [] for d in devices}
    for label, per_seed in rows.items():
        gains = _per_device(per_seed, devices) - base
        for d, m, s in zip(devices, gains.mean(axis=0), gains.std(axis=0, ddof=1)):
            if m > s:
                ahead[d].append(label)
    return float(np.mean([bool(v) for v in ahead.values()])), ahead


def device_analysis(summary: dict[str, Any], results: Sequence[dict[str, Any]], *, best: str | None = None) -> dict[str, Any] | None:
    """Everything the per-device section shows, as JSON-able data; None without local-only or with one seed.

    ``best``: the row to show device by device (default: the non-local row with the highest mean gain).
    """
    rows = {r["label"]: r["per_seed_device"] for r in summary["rows"]}
    local = rows.get("Local-only")
    if local is None or len(local) < 2:
        return None
    others = {label: per_seed for label, per_seed in rows.items() if label != "Local-only" and len(per_seed) == len(local)}
    shares = [row_shares(label, per_seed, local) for label, per_seed in others.items()]
    if not shares:
        return None
    best = best or max(shares, key=lambda s: s.gain_mean).label
    devices = list(local[0])
    facts = next((r.get("devices") for r in results if r.get("devices")), None) or {}
    gains = _per_device(others[best], devices) - _per_device(local, devices)
    local_acc = _per_device(local, devices)
    oracle, ahead = best_of_rows(others, local)
    per_device = [
        {"device": d, **(facts.get(d) or {}), "local_mean": float(local_acc[:, i].mean()), "local_std": float(local_acc[:, i].std(ddof=1)),
         "gain_mean": float(gains[:, i].mean()), "gain_std": float(gains[:, i].std(ddof=1)),
         "clear": bool(gains[:, i].mean() > gains[:, i].std(ddof=1)), "rows_ahead": ahead[d]}
        for i, d in enumerate(devices)
    ]
    return {"best": best, "shares": [asdict(s) for s in shares], "ceiling": ceiling_devices(local), "best_of_rows": oracle,
            "devices": per_device}


def format_devices(analysis: dict[str, Any]) -> str:
    """The per-device section of a setting's report (Markdown)."""
    lines = ["", "#### Per device: who gains over local-only, and by which statistic", "",
             "*Clearly ahead*: mean gain over the seeds above the standard deviation of the device's own gain (the"
             " target's statistic); *above global spread*: above the seed-to-seed standard deviation of the fleet's mean"
             " gain; *beatable*: devices where local-only is not already right on every test example of every seed.", "",
             "| row | mean gain | clearly ahead | of beatable devices | above global spread | any gain | not worse |",
             "|---|---|---|---|---|---|---|"]
    for s in sorted(analysis["shares"], key=lambda s: -s["gain_mean"]):
        beat = "—" if s["clear_of_beatable"] is None else f"{100 * s['clear_of_beatable']:.0f}%"
        lines.append(f"| {s['label']} | {100 * s['gain_mean']:+.2f} | {100 * s['clear']:.0f}% | {beat} |"
                     f" {100 * s['clear_global']:.0f}% | {100 * s['any_gain']:.0f}% | {100 * s['not_worse']:.0f}% |")
    n = len(analysis["devices"])
    lines += ["", f"At the ceiling (local-only right on every test example, every seed): {len(analysis['ceiling'])} of {n}"
                  f" devices{' (' + ', '.join(analysis['ceiling']) + ')' if analysis['ceiling'] else ''}. Clearly ahead with"
                  f" at least one row (the best any per-device choice among these rows could do, even one that saw the"
                  f" test data): {100 * analysis['best_of_rows']:.0f}%.", "",
              f"Device by device, {analysis['best']} (gain in points, mean ± std over seeds; one test example = 100 / test"
              " examples points):", "",
              "| device | train | classes | validation | test (one example) | local-only | gain | clearly ahead | rows clearly ahead |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in analysis["devices"]:
        test = d.get("test")
        one = f"{test} ({100 / test:.1f})" if test else "—"
        lines.append(f"| {d['device']} | {d.get('train', '—')} | {d.get('classes', '—')} | {d.get('val', '—')} | {one} |"
                     f" {100 * d['local_mean']:.2f} ± {100 * d['local_std']:.2f} | {100 * d['gain_mean']:+.2f} ±"
                     f" {100 * d['gain_std']:.2f} | {'yes' if d['clear'] else 'no'} | {len(d['rows_ahead'])} |")
    return "\n".join(lines)


def plot_devices(analysis: dict[str, Any], title: str, path: Path) -> Path:
    """Gain of the best row against the device's local-only accuracy (error bar: seed std; colour: classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = analysis["devices"]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    x = [100 * d["local_mean"] for d in devices]
    y = [100 * d["gain_mean"] for d in devices]
    err = [100 * d["gain_std"] for d in devices]
    classes = [d.get("classes", 0) for d in devices]
    ax.errorbar(x, y, yerr=err, fmt="none", ecolor="grey", lw=0.8, zorder=1)
    points = ax.scatter(x, y, c=classes, cmap="viridis", s=[36 if d["clear"] else 18 for d in devices],
                        marker="o", zorder=2, edgecolors=["black" if d["clear"] else "none" for d in devices])
    if any(classes):
        fig.colorbar(points, ax=ax, label="classes in the device's training data")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("local-only accuracy on the device (%, mean over seeds)")
    ax.set_ylabel(f"gain of {analysis['best']} (points)")
    ax.set_title(f"{title}\nper device; black edge: clearly ahead; bar: std of the gain over seeds", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
