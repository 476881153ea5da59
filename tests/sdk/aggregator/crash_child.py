"""A regional aggregator process for the crash tests: handles sealed blobs from a folder, then waits to be killed.

Usage: ``python -m tests.sdk.aggregator.crash_child DB BLOB_DIR LIMIT PAUSE_S``. Handles
the ``*.blob`` files in name order (at most LIMIT of them), printing one line
per handled update after it returns (so after its commit), then ``done``,
then sleeps until the parent SIGKILLs it. It never closes the store cleanly.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sdk.aggregator import RegionalAggregator
from tests.sdk.aggregator import scenario


def main(argv: list[str]) -> None:
    db, blob_dir, limit, pause = argv[0], Path(argv[1]), int(argv[2]), float(argv[3])
    region = RegionalAggregator.open(db, scenario.regional_config("eu"))
    for path in sorted(blob_dir.glob("*.blob"))[:limit]:
        handled = region.handle_update(path.read_bytes())
        print(f"{handled.verdict.value} {path.name}", flush=True)
        time.sleep(pause)
    print("done", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
