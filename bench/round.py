"""Round benchmark: ``python bench/round.py [options]`` is the same as ``fedge bench round [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "round", *sys.argv[1:]], prog_name="fedge")
