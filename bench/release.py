"""Release benchmark: ``python bench/release.py [options]`` is the same as ``fedge bench release [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "release", *sys.argv[1:]], prog_name="fedge")
