"""Coverage-guided fuzzing of the byte parsers with atheris (libFuzzer), for long runs by hand.

    pip install atheris
    python -m tests.fuzz.atheris_fuzz --seconds 600            # every target in turn, time split evenly
    python -m tests.fuzz.atheris_fuzz --target npz --seconds 120

Each target runs in its own process (atheris.Fuzz never returns); an input that raises anything but the target's
documented errors is written to ``fuzz-crashes/<target>-<n>`` and reported. Prints inputs run per target.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

_CHILD = """
import sys, atheris
with atheris.instrument_imports():
    from tests.fuzz.targets import TARGETS
target = next(t for t in TARGETS if t.name == sys.argv[1])

def one(data):
    try:
        target.run(data)
    except target.allowed:
        pass

atheris.Setup([sys.argv[0], sys.argv[3], "-rss_limit_mb=2048", "-max_total_time=" + sys.argv[2],
               "-artifact_prefix=" + sys.argv[4]], one)
atheris.Fuzz()
"""


def main() -> int:
    from tests.fuzz.targets import TARGETS, seeds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="total budget, split over the targets")
    parser.add_argument("--target", action="append", help="run only these targets (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"), help="corpus and crash directory")
    args = parser.parse_args()
    chosen = [t.name for t in TARGETS if not args.target or t.name in args.target]
    budget = args.seconds / len(chosen)
    report = {}
    for name in chosen:
        corpus = args.out / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds().get(name, [])):
            (corpus / f"seed-{i}").write_bytes(seed)
        crashes = args.out / "crashes"
        crashes.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-c", _CHILD, name, str(max(1, int(budget))), str(corpus),
                              f"{crashes}/{name}.crash-"], capture_output=True, text=True, timeout=budget + 120)
        done = re.search(r"Done (\d+) runs", run.stderr)
        runs = int(done.group(1)) if done else 0
        found = sorted(p.name for p in crashes.glob(f"{name}.crash-*"))
        report[name] = {"inputs": runs, "seconds": round(time.monotonic() - started, 1), "crashes": found,
                        "exit": run.returncode}
        if run.returncode != 0:
            report[name]["tail"] = run.stderr[-2000:]
        print(json.dumps({name: report[name]}), flush=True)
    return 1 if any(r["crashes"] or r["exit"] != 0 for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
