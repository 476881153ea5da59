"""``fedge bench contributors`` on small lists: every device counted, sizes grow with N, JSON written (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from sdk.bench.contributors_bench import format_table, run_contributors_bench, write_json


def test_contributors_bench_counts_every_device_and_writes_json(tmp_path: Path) -> None:
    rows = run_contributors_bench((20, 200))
    assert [r.devices_per_child for r in rows] == [20, 200]
    assert rows[1].list_mb > rows[0].list_mb and rows[1].sealed_mb > rows[0].sealed_mb
    assert all(r.intake_ms > 0 and r.close_ms > 0 for r in rows)
    write_json(rows, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["rows"][1]["devices_per_child"] == 200
    assert "devices/child" in format_table(rows)
