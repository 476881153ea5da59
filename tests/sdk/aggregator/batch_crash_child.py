"""A regional aggregator process for the group-commit crash test: handles sealed blobs in batches, on command.

Usage: ``python -m tests.sdk.aggregator.batch_crash_child DB BLOB_DIR BATCH``. For every line
``go`` on stdin it hands the next BATCH ``*.blob`` files (name order) to
:meth:`RegionalAggregator.handle_updates` and, once that returns (so after the
batch's commit), prints one ``<verdict> <file>`` line per update, then ``batch``.
The intake's DEBUG log goes to stderr, where the parent waits for "folded, committing".
It never closes the store cleanly: the parent SIGKILLs it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sdk.aggregator import IncomingUpdate, RegionalAggregator
from tests.sdk.aggregator import scenario


def main(argv: list[str]) -> None:
    db, blob_dir, batch = argv[0], Path(argv[1]), int(argv[2])
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("sdk.aggregator.intake").setLevel(logging.DEBUG)
    region = RegionalAggregator.open(db, scenario.regional_config("eu"))
    paths = sorted(blob_dir.glob("*.blob"))
    for start in range(0, len(paths), batch):
        if sys.stdin.readline().strip() != "go":
            break
        chunk = paths[start:start + batch]
        answers = region.handle_updates([IncomingUpdate(blob=path.read_bytes()) for path in chunk])
        for path, handled in zip(chunk, answers):
            print(f"{handled.verdict.value} {path.name}", flush=True)
        print("batch", flush=True)
    sys.stdin.readline()  # wait for the kill


if __name__ == "__main__":
    main(sys.argv[1:])
