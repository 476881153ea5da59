"""The aggregator services' own view of a fleet bench run, from their Prometheus ``/metrics`` endpoints.

Each service of the bench's fleet gets a ``[metrics]`` section on a free
loopback port (:func:`enable_metrics`, found in its log by :func:`port_from_log`); after the last round the bench reads
every endpoint once (:func:`scrape`) and keeps, per service, what tells where
an update's time went and that nothing was lost: updates counted, duplicates,
rejections and drops, the mean time from an update's arrival to its signed
receipt *inside* the service, and the mean SQLite commit. The services start
fresh, so their counters are the run's totals.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

_METRICS_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def enable_metrics(config_file: Path) -> None:
    """Append a ``[metrics]`` section to a service's TOML: loopback, port 0 (the service takes a free port and logs
    it: picking one here could race with the many client connections of the run)."""
    with open(config_file, "a", encoding="utf-8") as handle:
        handle.write('\n[metrics]\nbind = "127.0.0.1"\nport = 0\n')


def port_from_log(text: str) -> int | None:
    """The port of the ``metrics on http://127.0.0.1:<port>/metrics`` line a service logs at start, or None."""
    found = _METRICS_LINE.search(text)
    return int(found.group(1)) if found else None


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> ``name{label="value",...}`` (labels sorted) -> value, every sample."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return samples


def _total(samples: dict[str, float], name: str) -> float:
    """The sum of ``name`` over all its label sets (0 when absent)."""
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


def _mean_ms(samples: dict[str, float], histogram: str) -> float | None:
    count = samples.get(f"{histogram}_count", 0.0)
    return None if count == 0 else 1000.0 * samples[f"{histogram}_sum"] / count


def figures(samples: dict[str, float]) -> dict[str, Any]:
    """What the bench reports of one service (module docstring); means None when nothing was observed."""
    return {
        "accepted": int(_total(samples, "fedge_updates_accepted_total")),
        "duplicates": int(_total(samples, "fedge_updates_duplicate_total")),
        "rejected": int(_total(samples, "fedge_updates_rejected_total")),
        "inbox_dropped": int(_total(samples, "fedge_inbox_dropped_total")),
        "service_dropped": int(_total(samples, "fedge_service_dropped_total")),
        "receipts": int(samples.get("fedge_update_receipt_latency_seconds_count", 0.0)),
        "receipt_latency_mean_ms": _mean_ms(samples, "fedge_update_receipt_latency_seconds"),
        "commits": int(samples.get("fedge_store_commit_seconds_count", 0.0)),
        "commit_mean_ms": _mean_ms(samples, "fedge_store_commit_seconds"),
        "rounds_closed": int(_total(samples, "fedge_rounds_closed_total")),
    }


def scrape(port: int, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Read ``http://127.0.0.1:<port>/metrics`` and return :func:`figures` of it (``{"error": ...}`` when unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:  # noqa: S310 - loopback
            return figures(parse(response.read().decode("utf-8")))
    except OSError as exc:
        return {"error": str(exc)}
