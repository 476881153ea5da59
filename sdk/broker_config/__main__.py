"""``python -m sdk.broker_config``: the ``fedge broker-config`` command on its own."""

from __future__ import annotations

from sdk.broker_config.cli import broker_config

if __name__ == "__main__":
    broker_config(prog_name="python -m sdk.broker_config")
