"""Training benchmark: ``python bench/train.py`` is the same as ``fedge bench train``."""

from sdk.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "train"], prog_name="fedge")
