"""Contributor-list benchmark: ``python bench/contributors.py [options]`` is the same as ``fedge bench contributors [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "contributors", *sys.argv[1:]], prog_name="fedge")
