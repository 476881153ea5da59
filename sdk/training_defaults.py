"""fedge's default training hyperparameters, defined once.

``fedge demo``, ``fedge simulate``, ``fedge bundle build``,
:class:`sdk.artifacts.TrainingSpec` and :func:`sdk.simulation.compare` all
start from these values. The learning rate was chosen from the sensitivity
sweep on the built-in datasets (``fedge bench sweep``; figures and the
reasoning in docs/tuning.md): with AdamW it is the value that was within a
point of the best for every measured dataset and algorithm, not the best on
any single one.
"""

from __future__ import annotations

DEFAULT_LEARNING_RATE = 0.005
"""AdamW step size a bundle carries unless told otherwise (a device may override it per round)."""

DEFAULT_OPTIMIZER = "adamw"
"""The optimizer bundles are built with unless told otherwise."""
