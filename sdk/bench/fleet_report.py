"""The fleet benchmark's figures: from a raw :class:`~sdk.bench.fleet_bench.FleetRun` to the summary, table, JSON, PNG.

Pure apart from :func:`write_json` and :func:`write_png`. Definitions:

- **round**: the root's model ``r`` to its model ``r + 1``, seen on the root broker.
- **receipt latency**: per lightweight device and round, its (first) publish to
  its first receipt, pooled over rounds; agents are reported by their own
  round results.
- **CPU seconds** and **bytes**: differences of /proc readings at the start and
  the end of the rounds; **utilisation**: CPU seconds over that window (1.0 =
  one core busy the whole time); **CPU wait**: seconds its threads were ready
  to run but waited for a CPU (the share of the machine other work took from
  it). **Peak RSS**: ``VmHWM`` since the process started.
- **what saturates first**: the machine when its cores were >= 85% busy over
  the window (this machine is shared, so the figure includes other jobs),
  otherwise the busiest process when it used >= 85% of a core; otherwise
  nothing did (rounds then wait on latency, not on capacity).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sdk.bench.fleet_bench import FleetRun
from sdk.bench.proc_stats import difference

SATURATED = 0.85
_TIER_NAMES = {"broker": "regional brokers", "regional": "regional aggregators", "root": "root aggregator",
               "generator": "load generators", "agent": "agents"}


def _latencies(run: FleetRun) -> list[float]:
    values = []
    for result in run.generator_results:
        for record in result["devices"].values():
            receipts = sorted(at for at, _ in record["receipts"])
            for _r, sent in sorted(record["sent"].items(), key=lambda kv: int(kv[0])):
                later = [at for at in receipts if at >= sent[0]]
                if later:
                    values.append(later[0] - sent[0])
                    receipts.remove(later[0])
    return values


def _process_rows(run: FleetRun) -> list[dict[str, Any]]:
    rows = []
    for proc in run.processes:
        before, after = run.before[proc.name], run.after[proc.name]
        cpu = difference(before.cpu_s, after.cpu_s)
        rows.append({"name": proc.name, "kind": proc.kind, "cpu_s": cpu,
                     "utilisation": None if cpu is None else cpu / run.window_s,
                     "run_queue_wait_s": difference(before.run_wait_s, after.run_wait_s),
                     "peak_rss_mb": after.peak_rss_mb,
                     # Only Mosquitto moves its sockets' bytes through read(2)/write(2); Python's recv/send are not
                     # in rchar/wchar (which count its SQLite and log writes instead), so bytes are brokers' only.
                     "bytes_in": difference(before.read_bytes, after.read_bytes) if proc.kind == "broker" else None,
                     "bytes_out": difference(before.written_bytes, after.written_bytes) if proc.kind == "broker" else None})
    return rows


def _tier_totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    tiers: dict[str, dict[str, float]] = {}
    for row in rows:
        kind = "root broker" if row["name"] == "broker root" else _TIER_NAMES[row["kind"]]
        tier = tiers.setdefault(kind, {"processes": 0, "cpu_s": 0.0, "run_queue_wait_s": 0.0, "peak_rss_mb_max": 0.0,
                                       "bytes_in": 0.0, "bytes_out": 0.0})
        tier["processes"] += 1
        tier["cpu_s"] += row["cpu_s"] or 0.0
        tier["run_queue_wait_s"] += row["run_queue_wait_s"] or 0.0
        tier["peak_rss_mb_max"] = max(tier["peak_rss_mb_max"], row["peak_rss_mb"] or 0.0)
        tier["bytes_in"] += row["bytes_in"] or 0.0
        tier["bytes_out"] += row["bytes_out"] or 0.0
    for name, tier in tiers.items():
        if "broker" not in name:
            tier["bytes_in"] = tier["bytes_out"] = None  # type: ignore[assignment]  # not measured (see _process_rows)
    return tiers


def _saturation(run: FleetRun, rows: list[dict[str, Any]], tiers: dict[str, dict[str, float]]) -> dict[str, Any]:
    ours = sum(r["cpu_s"] or 0.0 for r in rows)
    cores = os.cpu_count() or 1
    busiest = max(rows, key=lambda r: r["utilisation"] or 0.0)
    share = ours / (run.window_s * cores)
    shares = {name: t["cpu_s"] / ours for name, t in tiers.items()} if ours > 0 else {}
    heaviest = max(shares, key=lambda name: shares[name]) if shares else None
    waited = sum(r["run_queue_wait_s"] or 0.0 for r in rows)
    regions = [m for site, m in run.service_metrics.items() if site != "root" and m.get("commit_mean_ms") is not None]
    # Seconds each regional store spent in COMMIT (fsync included), as a share of the rounds: a region handles its
    # updates one at a time, so this is the part of its round its disk decided.
    commit_share = (sum(m["commits"] * m["commit_mean_ms"] / 1000 for m in regions) / len(regions) / run.window_s
                    if regions else None)
    if run.machine_busy is not None and run.machine_busy >= SATURATED:
        verdict = (f"the machine: its {cores} cores were {run.machine_busy:.0%} busy over the rounds "
                   f"(this run's processes {share:.0%}, the rest other jobs); busiest process {busiest['name']} "
                   f"at {busiest['utilisation']:.0%} of a core")
    elif (busiest["utilisation"] or 0.0) >= SATURATED:
        verdict = f"one process: {busiest['name']} at {busiest['utilisation']:.0%} of a core"
    elif commit_share is not None and commit_share >= 0.5:
        verdict = f"the disk: each regional store spent {commit_share:.0%} of the rounds committing (fsync)"
    else:
        verdict = (f"nothing: the busiest process ({busiest['name']}) used {busiest['utilisation']:.0%} of a core "
                   f"and the machine was {run.machine_busy or 0:.0%} busy; rounds wait on latency, not capacity")
    if heaviest is not None:
        verdict += f"; of this run's CPU the {heaviest} took {shares[heaviest]:.0%}"
    verdict += f"; its processes ran {ours:.1f} CPU-s and waited {waited:.1f} s for a CPU"
    if commit_share is not None:
        verdict += f"; regional stores committed {commit_share:.0%} of the time"
    return {"verdict": verdict, "machine_busy": run.machine_busy, "cores": cores, "our_share_of_machine": share,
            "busiest_process": busiest["name"], "busiest_utilisation": busiest["utilisation"],
            "cpu_share_by_tier": shares, "heaviest_tier": heaviest, "our_cpu_s": ours, "our_run_queue_wait_s": waited,
            "regional_commit_share": commit_share,
            # What the rounds would take if this run's CPU work were the only work on the machine, spread over
            # every core: an estimate (it ignores waiting and serial steps), not a measurement.
            "cpu_bound_round_estimate_s": ours / cores / run.config.rounds}


def summarise(run: FleetRun) -> dict[str, Any]:
    """Every figure of the run, JSON-ready (module docstring for the definitions)."""
    config = run.config
    rounds = [run.model_times[r + 1] - run.model_times[r] for r in range(config.rounds)]
    latencies = _latencies(run)
    rows = _process_rows(run)
    tiers = _tier_totals(rows)
    counts = [c for per_round in run.accepted.values() for c in per_round.values()]
    expected = run.light_devices * config.rounds
    updates = expected + sum(len(a.get("rounds", [])) for a in run.agent_results.values())
    per_update = {name: {"cpu_ms": 1000 * t["cpu_s"] / updates,
                         "bytes_in": t["bytes_in"] / updates if "broker" in name else None,
                         "bytes_out": t["bytes_out"] / updates if "broker" in name else None} for name, t in tiers.items()}
    update_bytes = max((r["update_bytes"] for r in run.generator_results), default=0)
    return {
        "benchmark": "fleet",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "config": asdict(config),
        "model": {"parameters": run.parameters, "update_bytes": update_bytes, "bundle_version": run.bundle_version},
        "setup_s": run.setup_s,
        "devices_by_region": run.devices_by_region,
        "rounds": {"seconds": rounds, "median_s": statistics.median(rounds), "total_s": sum(rounds),
                   "updates_per_s": updates / sum(rounds)},
        "receipts": {
            "lightweight_devices": run.light_devices, "expected": expected,
            "accepted_once": sum(1 for c in counts if c == 1), "accepted_more_than_once": sum(1 for c in counts if c > 1),
            "missing": expected - len(counts), "other": run.other_receipts,
            "resends": sum(r["resends"] for r in run.generator_results),
            "latency_ms": None if not latencies else {
                "p50": 1000 * float(np.percentile(latencies, 50)), "p95": 1000 * float(np.percentile(latencies, 95)),
                "max": 1000 * max(latencies), "count": len(latencies)},
        },
        "agents": {device: {"finished": a.get("finished"), "statuses": [x.get("status") for x in a.get("rounds", [])],
                            **({"error": a["error"]} if "error" in a else {})} for device, a in run.agent_results.items()},
        "generators": [{"devices": len(r["devices"]), "seal_s": r["seal_s"], "connect_s": r["connect_s"],
                        "cpu_serving_s": r["cpu_serving_s"], "bad_models": r["bad_models"]} for r in run.generator_results],
        "window_s": run.window_s,
        "processes": rows,
        "tiers": tiers,
        "per_update": per_update,
        "saturation": _saturation(run, rows, tiers),
        "global_model_check": {"checked": run.model_max_abs_diff is not None, "max_abs_diff": run.model_max_abs_diff},
        "aggregator_metrics": run.service_metrics,
    }


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """Rounds, receipts, one line per process, per-tier costs per update, the saturation verdict."""
    c, rounds, rec = summary["config"], summary["rounds"], summary["receipts"]
    lat = rec["latency_ms"] or {"p50": float("nan"), "p95": float("nan")}
    lines = [
        f"{c['devices']} devices ({c['agents']} real agents) in {c['regions']} regions, {c['rounds']} round(s); "
        f"{summary['model']['parameters']} shared parameters, {summary['model']['update_bytes']} B per sealed update",
        "round s: " + ", ".join(f"{s:.2f}" for s in rounds["seconds"]) +
        f" (median {rounds['median_s']:.2f}; {rounds['updates_per_s']:.0f} updates/s)",
        f"receipts: {rec['accepted_once']}/{rec['expected']} accepted once, {rec['accepted_more_than_once']} more than once, "
        f"{rec['missing']} missing, {rec['resends']} resends; latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms",
    ]
    for device, agent in summary["agents"].items():
        lines.append(f"agent {device}: {agent.get('statuses')}" + (f" ERROR {agent['error']}" if "error" in agent else ""))
    head = (f"{'process':22s} {'CPU s':>8s} {'of a core':>10s} {'CPU wait s':>11s} {'peak RSS MB':>12s} {'MB in':>9s} "
            f"{'MB out':>9s}")
    lines += ["", head, "-" * len(head)]
    for row in summary["processes"]:
        util = "-" if row["utilisation"] is None else f"{row['utilisation']:.0%}"
        cpu = "-" if row["cpu_s"] is None else f"{row['cpu_s']:.2f}"
        rss = "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.1f}"
        wait = "-" if row["run_queue_wait_s"] is None else f"{row['run_queue_wait_s']:.2f}"
        lines.append(f"{row['name']:22s} {cpu:>8s} {util:>10s} {wait:>11s} {rss:>12s} {_mb(row['bytes_in']):>9s} "
                     f"{_mb(row['bytes_out']):>9s}")
    lines += ["", f"{'per update':22s} {'CPU ms':>8s} {'kB in':>10s} {'kB out':>12s}"]
    for name, figures in summary["per_update"].items():
        kb_in = "-" if figures["bytes_in"] is None else f"{figures['bytes_in'] / 1e3:.1f}"
        kb_out = "-" if figures["bytes_out"] is None else f"{figures['bytes_out'] / 1e3:.1f}"
        lines.append(f"{name:22s} {figures['cpu_ms']:8.2f} {kb_in:>10s} {kb_out:>12s}")
    lines += ["", f"{'aggregator (/metrics)':22s} {'counted':>8s} {'dup':>5s} {'rejected':>9s} {'dropped':>8s} "
                  f"{'in-service ms':>14s} {'commits':>8s} {'commit ms':>10s}"]
    for site, m in summary["aggregator_metrics"].items():
        if "error" in m:
            lines.append(f"{site:22s} unreadable: {m['error']}")
            continue
        service_ms = "-" if m["receipt_latency_mean_ms"] is None else f"{m['receipt_latency_mean_ms']:.1f}"
        commit_ms = "-" if m["commit_mean_ms"] is None else f"{m['commit_mean_ms']:.1f}"
        lines.append(f"{site:22s} {m['accepted']:8d} {m['duplicates']:5d} {m['rejected']:9d} "
                     f"{m['inbox_dropped'] + m['service_dropped']:8d} {service_ms:>14s} {m['commits']:8d} {commit_ms:>10s}")
    check = summary["global_model_check"]
    lines += ["", f"window {summary['window_s']:.1f} s; saturates first: {summary['saturation']['verdict']}",
              "global model vs numpy reference: " +
              (f"max |diff| {check['max_abs_diff']:.2e}" if check["checked"] else "not checked (real agents' updates are unknown)")]
    return "\n".join(lines)


def write_json(summary: dict[str, Any], path: Path) -> None:
    """Write the summary as JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


def write_png(summary: dict[str, Any], path: Path) -> None:
    """Three panels: CPU seconds per process, peak RSS per process, bytes through each broker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["processes"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, max(4.0, 0.28 * len(rows))))
    axes[0].barh(names, [r["cpu_s"] or 0 for r in rows], color="tab:blue")
    axes[0].set_xlabel(f"CPU s over the rounds ({summary['window_s']:.0f} s window)")
    axes[1].barh(names, [r["peak_rss_mb"] or 0 for r in rows], color="tab:green")
    axes[1].set_xlabel("peak RSS (MB)")
    brokers = [r for r in rows if r["kind"] == "broker"]
    y = np.arange(len(brokers))
    axes[2].barh(y - 0.2, [(r["bytes_in"] or 0) / 1e6 for r in brokers], height=0.4, label="in")
    axes[2].barh(y + 0.2, [(r["bytes_out"] or 0) / 1e6 for r in brokers], height=0.4, label="out")
    axes[2].set_yticks(y, [r["name"] for r in brokers])
    axes[2].set_xlabel("MB through each broker")
    axes[2].legend()
    c = summary["config"]
    fig.suptitle(f"fedge bench fleet: {c['devices']} devices, {c['regions']} regions, {c['rounds']} rounds; "
                 f"median round {summary['rounds']['median_s']:.2f} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
