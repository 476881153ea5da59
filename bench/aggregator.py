"""Aggregator benchmark: ``python bench/aggregator.py [options]`` is the same as ``fedge bench aggregator [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "aggregator", *sys.argv[1:]], prog_name="fedge")
