"""Input and output names of the portable training-step and eval graphs: the contract between host and device.

A portable step graph maps the current training state to the next one:
inputs ``x``, ``y``, ``lr``, ``param.<name>`` for every model parameter,
``anchor.<name>`` for every shared parameter when the bundle has a FedProx
term, and its optimizer state (AdamW: ``opt.step``, ``opt.m``, ``opt.v``);
outputs ``loss`` and, for each updated state value ``X``, ``new.X``. The device therefore needs no
knowledge of the optimizer: it feeds every ``X`` and keeps every ``new.X``.
AdamW's moments: a large trainable parameter ``w`` has its own, shaped like
it (``opt.m@w``, ``opt.v@w``), and its update is a dozen elementwise ops that
write ``new.param.w`` directly; all other trainable parameters share two flat
float32 vectors (``opt.m``, ``opt.v``: those parameters flattened and
concatenated in manifest order), so their update is a dozen ops in all rather
than per parameter. Which parameters have their own moments is read from the
graph's inputs (graphs built before this split have only ``opt.m``/``opt.v``).
The parameters that share the flat moments are also one flat input,
``flat.param`` (same order), and the step writes them as one output,
``new.flat.param``, not one ``new.param.*`` each: the device keeps them in one
buffer and binds each of their ``param.*`` inputs to a view of it, so the
update needs no concatenation or split. Graphs without ``flat.param`` (built
before it) output every ``new.param.*``.
The eval graph takes ``x``, ``y``, every ``param.*`` and ``anchor.*`` and
returns ``loss`` and ``output`` (the model's logits).

In place: a step graph reads each optimizer state input (``opt.*``) only in the
computation of its own ``new.opt.*`` (the moment's decay, the step's increment),
so the output may be written into the input's buffer; the builder keeps it so,
and the device binds both to one buffer. Parameters are read by the backward
pass too, which could run after their update: a step graph whose builder proved
otherwise (every read of a parameter, and of the flat parameters' views, comes
before its update by data dependency) says so in its model metadata
(``PARAMS_IN_PLACE`` = ``"1"``), and the device then keeps one buffer per
parameter; without it (graphs built before, or a model the proof does not
cover) each updated parameter has two buffers that swap roles each step.
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
#: Separator between a moment's name and the parameter it belongs to (``opt.m@w``).
OWN = "@"
NEW = "new."
#: The parameters that share the flat AdamW moments, flattened and concatenated (a view of each is its param.* input).
FLAT_PARAMS = "flat.param"
#: Model metadata key: "1" when the step graph's parameters may be updated in place (see the module docstring).
PARAMS_IN_PLACE = "fedge.params_in_place"


def param(name: str) -> str:
    """Graph name of model parameter ``name``."""
    return PARAM + name


def anchor(name: str) -> str:
    """Graph name of the FedProx anchor of shared parameter ``name``."""
    return ANCHOR + name


def own_moment(flat_name: str, parameter: str) -> str:
    """Graph name of a parameter's own moment (``OPT_M`` or ``OPT_V`` for ``flat_name``)."""
    return flat_name + OWN + parameter


def moment_owner(input_name: str) -> tuple[str, str] | None:
    """(``OPT_M`` or ``OPT_V``, parameter) for an own moment's input name; None for any other input."""
    for flat in (OPT_M, OPT_V):
        if input_name.startswith(flat + OWN):
            return flat, input_name[len(flat) + len(OWN):]
    return None


def new(state_name: str) -> str:
    """Output name carrying the updated value of input ``state_name``."""
    return NEW + state_name


def updated(output_name: str) -> str | None:
    """The input an output updates (``new.param.w`` -> ``param.w``); None for ``loss`` and other outputs."""
    return output_name[len(NEW):] if output_name.startswith(NEW) else None


def updated_in_place(state_name: str) -> bool:
    """Whether a step graph's ``new.<state_name>`` may be written into the buffer ``state_name`` is read from (optimizer state)."""
    return state_name == OPT_STEP or state_name in (OPT_M, OPT_V) or moment_owner(state_name) is not None
