"""fedge's default training hyperparameters, defined once.

``fedge demo``, ``fedge simulate``, ``fedge bundle build``, ``fedge bench
accuracy --data``, :class:`sdk.artifacts.TrainingSpec` and
:func:`sdk.simulation.compare` all start from these values. The learning rate
was chosen from the sensitivity sweep on the built-in datasets (``fedge bench
sweep``; figures and reasoning in docs/tuning.md): of the learning rates
measured, it has the smallest worst shortfall from the best learning rate of
every (dataset, algorithm) pair, so it is the safest everywhere rather than the
best anywhere.
"""

from __future__ import annotations

DEFAULT_LEARNING_RATE = 0.01
"""AdamW step size a bundle carries unless told otherwise (a device may override it per round)."""

DEFAULT_OPTIMIZER = "adamw"
"""The optimizer bundles are built with unless told otherwise."""
