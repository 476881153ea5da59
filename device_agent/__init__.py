"""fedge device agent: torch-free on-device training and the federation wire protocol."""

from __future__ import annotations

__version__ = "0.1.0"
