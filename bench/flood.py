"""Flood benchmark: ``python bench/flood.py [options]`` is the same as ``fedge bench flood [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "flood", *sys.argv[1:]], prog_name="fedge")
