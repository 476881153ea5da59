"""Attack benchmark: ``python bench/attack.py [options]`` is the same as ``fedge bench attack [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "attack", *sys.argv[1:]], prog_name="fedge")
