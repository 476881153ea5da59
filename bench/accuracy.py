"""Accuracy benchmark: ``python bench/accuracy.py [options]`` is the same as ``fedge bench accuracy [options]``."""

import sys

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "accuracy", *sys.argv[1:]], prog_name="fedge")
