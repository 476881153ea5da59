"""The release benchmark runs end to end (fresh processes, a real repository) and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

from sdk.bench.release_bench import TUF_STACK, format_table, installed_mib, measure_imports, measure_verify, write_json


def test_release_bench_measures_the_tuf_stack(tmp_path: Path) -> None:
    sizes = installed_mib(TUF_STACK)
    assert all(sizes[name] is not None and sizes[name] > 0 for name in TUF_STACK), sizes
    imports = measure_imports(1)
    assert [r.variant for r in imports] == ["agent core", "agent core + tuf"]
    assert all(r.import_s > 0 and r.peak_rss_mb > 0 for r in imports)
    verify = [measure_verify(releases=3, bundle_kib=64, repeats=1)]
    assert verify[0].releases == 3 and verify[0].seconds > 0
    table = format_table(sizes, imports, verify)
    assert "tuf adds" in table and "3 releases" in table
    write_json(tmp_path / "release.json", sizes, imports, verify)
    doc = json.loads((tmp_path / "release.json").read_text())
    assert set(doc) >= {"installed_mib", "imports", "verify"}
