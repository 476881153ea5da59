"""The demo's results as data, and the text the CLI prints for them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdk.demo.settings import DemoSettings


@dataclass(frozen=True, kw_only=True)
class RegionRound:
    """Round ``round`` of one region, once every device of it has finished the round.

    ``statuses``: device id -> how its round ended (``accepted``, ``rejected``...).
    ``mean_train_loss``: mean over the devices that trained of their mean local training loss (NaN if none trained).
    ``elapsed_s``: seconds since the devices started when the region's last device finished.
    """

    round: int
    region: str
    statuses: Mapping[str, str]
    mean_train_loss: float
    elapsed_s: float

    @property
    def accepted(self) -> int:
        """How many devices' updates were accepted (a recognised resend counts as accepted)."""
        return sum(s in ("accepted", "duplicate") for s in self.statuses.values())


@dataclass(frozen=True, kw_only=True)
class RegionSummary:
    """Mean test accuracies over the devices of a region (or of all regions: ``name`` "all").

    Each device counts once (an unweighted mean over devices, not over test windows).
    """

    name: str
    devices: int
    test_examples: int
    personal_accuracy: float
    global_accuracy: float


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    """A finished demo run.

    ``round_seconds[r]``: wall time of round r, from the end of round r-1 (or
    the devices' start) until the last device's round-r receipt.
    ``global_shift``: L2 norm over every shared parameter of G_R - G_0, the
    root's final global model minus its initial one. ``final_round`` is R.
    ``workdir``: where keys, bundle, broker files and state were kept (None: removed after the run).
    ``broker``: the backend that ran, ``"mosquitto"`` or ``"embedded"`` (amqtt, no ACLs).
    """

    settings: DemoSettings
    rounds: tuple[RegionRound, ...]
    round_seconds: tuple[float, ...]
    regions: tuple[RegionSummary, ...]
    overall: RegionSummary
    global_shift: float
    final_round: int
    setup_seconds: float
    workdir: Path | None = None
    broker: str = "mosquitto"

    @property
    def all_accepted(self) -> bool:
        """Whether every device's update was accepted in every round."""
        return all(r.accepted == len(r.statuses) for r in self.rounds)


def summarise(name: str, personal: Sequence[float], global_: Sequence[float], test_examples: Sequence[int]) -> RegionSummary:
    """A :class:`RegionSummary` of per-device accuracies (NaN means when there are no devices)."""
    return RegionSummary(
        name=name, devices=len(personal), test_examples=int(sum(test_examples)),
        personal_accuracy=float(np.mean(personal)) if personal else float("nan"),
        global_accuracy=float(np.mean(global_)) if global_ else float("nan"),
    )


def parameter_shift(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``after - before`` over every parameter (both must name the same parameters)."""
    if set(before) != set(after):
        raise ValueError("the two models name different parameters")
    return float(np.sqrt(sum(np.sum((after[n].astype(np.float64) - before[n].astype(np.float64)) ** 2) for n in before)))


def format_round(line: RegionRound) -> str:
    """One progress line: round, region, updates accepted, mean train loss, elapsed time."""
    return (f"round {line.round + 1:>2d}  region {line.region:<6s}  accepted {line.accepted}/{len(line.statuses)}  "
            f"mean train loss {line.mean_train_loss:.3f}  t={line.elapsed_s:6.1f} s")


def broker_line(backend: str) -> str:
    """Which brokers carried the run; the embedded one says that it enforces no ACLs."""
    if backend == "embedded":
        return "brokers: embedded (amqtt in this process, MQTT 3.1.1, passwords checked, ACLs NOT enforced: dev mode only)"
    return "brokers: Mosquitto (generated passwords and ACLs enforced)"


def format_result(result: DemoResult) -> str:
    """The final table: accuracies per region and overall, then round times and what was measured."""
    s = result.settings
    rows = [*result.regions, result.overall]
    lines = [
        f"{'region':<8s} {'devices':>7s} {'test windows':>12s} {'personalised acc':>16s} {'global-model acc':>16s}",
        *(f"{r.name:<8s} {r.devices:>7d} {r.test_examples:>12d} {r.personal_accuracy:>16.3f} {r.global_accuracy:>16.3f}"
          for r in rows),
        "",
        "round times: " + "  ".join(f"r{i + 1} {t:.1f}s" for i, t in enumerate(result.round_seconds))
        + f"   (setup {result.setup_seconds:.1f}s)",
        f"updates accepted: {'all' if result.all_accepted else 'NOT all'} "
        f"({sum(r.accepted for r in result.rounds)}/{sum(len(r.statuses) for r in result.rounds)}); "
        f"global model moved by {result.global_shift:.3f} (L2, G_{result.final_round} - G_0)",
        f"{s.rounds} rounds, FedAlt, mu={s.mu:g}, lr={s.learning_rate:g}, {s.epochs} epoch(s) per phase; chance = 1/7 = 0.143.",
        "personalised: each device's own model after its last round, on its own test split;",
        f"global-model: the root's final global shared layers G_{result.final_round} with each device's own head.",
        broker_line(result.broker),
    ]
    return "\n".join(lines)
