"""Fleet benchmark: ``python bench/fleet.py [options]`` is the same as ``fedge bench fleet [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "fleet", *sys.argv[1:]], prog_name="fedge")
