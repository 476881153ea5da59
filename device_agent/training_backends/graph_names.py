"""Input and output names of the portable training-step and eval graphs: the contract between host and device.

A portable step graph maps the current training state to the next one:
inputs ``x``, ``y``, ``lr``, ``param.<name>`` for every model parameter,
``anchor.<name>`` for every shared parameter when the bundle has a FedProx
term, and its optimizer state (AdamW: ``opt.step``, ``opt.m``, ``opt.v``);
outputs ``loss`` and, for each updated state value ``X``, ``new.X``. The device therefore needs no
knowledge of the optimizer: it feeds every ``X`` and keeps every ``new.X``.
AdamW's moments are two flat float32 vectors per set (``opt.m``, ``opt.v``:
the set's trainable parameters flattened and concatenated in manifest order),
so the update is a dozen ops for the whole model rather than per parameter.
The eval graph takes ``x``, ``y``, every ``param.*`` and ``anchor.*`` and
returns ``loss`` and ``output`` (the model's logits).
"""

from __future__ import annotations

X = "x"
Y = "y"
LR = "lr"
LOSS = "loss"
OUTPUT = "output"
PARAM = "param."
ANCHOR = "anchor."
OPT_STEP = "opt.step"
OPT_M = "opt.m"
OPT_V = "opt.v"
NEW = "new."


def param(name: str) -> str:
    """Graph name of model parameter ``name``."""
    return PARAM + name


def anchor(name: str) -> str:
    """Graph name of the FedProx anchor of shared parameter ``name``."""
    return ANCHOR + name


def new(state_name: str) -> str:
    """Output name carrying the updated value of input ``state_name``."""
    return NEW + state_name


def updated(output_name: str) -> str | None:
    """The input an output updates (``new.param.w`` -> ``param.w``); None for ``loss`` and other outputs."""
    return output_name[len(NEW):] if output_name.startswith(NEW) else None
