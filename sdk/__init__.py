"""fedge SDK (host side): model export, bundle building, aggregators, simulation and the CLI."""

from __future__ import annotations

__version__ = "0.1.0"
