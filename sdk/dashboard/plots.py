"""The dashboard's plots, drawn server-side with matplotlib as SVG (pure: data in, bytes out).

Why server-side: matplotlib is already a host dependency, nothing has to be
vendored or fetched by the browser, and the page shows the SVG through an
``<img>``, where a browser runs no script and follows no link whatever the
file holds. Text is drawn as paths (``svg.fonttype = "path"``) with mathtext
off (``text.parse_math = False``), so a label such as ``$\\alpha$`` or
``<script>`` is drawn as those characters and never becomes markup or math.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sdk.dashboard.history import AccuracyPoint  # noqa: E402

#: Above this many devices the per-device lines give way to a band (10th-90th percentile).
MAX_DEVICE_LINES = 30
_RC: Any = {"text.parse_math": False, "text.usetex": False, "svg.fonttype": "path", "svg.hashsalt": "fedge-dashboard",
       "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}


def _svg(fig: Figure) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return out.getvalue()


def accuracy_svg(fleet: Sequence[AccuracyPoint], regions: Mapping[str, Sequence[AccuracyPoint]],
                 devices: Mapping[str, Sequence[tuple[int, float]]]) -> bytes:
    """Validation accuracy over rounds: per device (thin lines, or a band for many), per region, fleet-wide."""
    with matplotlib.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        series = [s for s in devices.values() if s]
        if 0 < len(series) <= MAX_DEVICE_LINES:
            for i, device_points in enumerate(series):
                ax.plot([r for r, _ in device_points], [a for _, a in device_points], color="0.75", linewidth=0.7,
                        label="devices" if i == 0 else None)
        elif series:
            _band(ax, series)
        for name, points in regions.items():
            ax.plot([p.round for p in points], [p.mean for p in points], linewidth=1.6, marker=".", label=f"region {name}")
        if fleet:
            ax.plot([p.round for p in fleet], [p.mean for p in fleet], color="black", linewidth=2.4, label="fleet")
        ax.set_xlabel("round")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if fleet or regions or series:
            ax.legend(loc="lower right", fontsize=8, ncols=2)
        else:
            ax.text(0.5, 0.5, "no accuracy reported yet", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return _svg(fig)


def _band(ax: object, series: list[Sequence[tuple[int, float]]]) -> None:
    import numpy as np

    by_round: dict[int, list[float]] = {}
    for points in series:
        for r, a in points:
            by_round.setdefault(r, []).append(a)
    rounds = sorted(by_round)
    low = [float(np.percentile(by_round[r], 10)) for r in rounds]
    high = [float(np.percentile(by_round[r], 90)) for r in rounds]
    ax.fill_between(rounds, low, high, color="0.85", label=f"devices, 10th-90th percentile ({len(series)})")  # type: ignore[attr-defined]


def updates_svg(tallies: Mapping[int, Mapping[str, int]]) -> bytes:
    """Updates per round at the regional aggregators: accepted, duplicates, and rejections by reason, stacked."""
    with matplotlib.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(7.5, 3.0))
        rounds = sorted(tallies)
        kinds = sorted({k for cell in tallies.values() for k in cell}, key=lambda k: (k != "accepted", k != "duplicate", k))
        bottom = [0] * len(rounds)
        for kind in kinds:
            heights = [tallies[r].get(kind, 0) for r in rounds]
            if not any(heights):
                continue
            color = "tab:green" if kind == "accepted" else ("tab:gray" if kind == "duplicate" else None)
            ax.bar(rounds, heights, bottom=bottom, label=kind.replace("rejected:", "rejected: "), color=color, width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xlabel("round")
        ax.set_ylabel("updates")
        ax.grid(axis="y", alpha=0.3)
        if rounds:
            ax.legend(loc="upper left", fontsize=8, ncols=3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.text(0.5, 0.5, "no closed round seen yet", ha="center", va="center", transform=ax.transAxes)
        return _svg(fig)
