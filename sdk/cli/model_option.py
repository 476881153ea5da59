"""The ``--model MODULE:CALLABLE`` / ``--model-arg KEY=VALUE`` options, shared by ``fedge bundle build`` and ``fedge simulate``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import torch

MODEL_HELP = ("Model factory as MODULE:CALLABLE (e.g. mymodels:Net, models/net.py:Net or sdk.models:PersonalizedMLP);"
              " MODULE is looked up in the current directory first.")
MODEL_ARG_HELP = "KEY=VALUE passed to the model factory (repeatable; VALUE is read as a Python literal, else a string)."


def cli_model_factory(spec: str, args: tuple[str, ...]) -> Callable[[], torch.nn.Module]:
    """``sdk.model_factory.model_factory`` with its errors as one-line usage errors (exit 2)."""
    from sdk.model_factory import ModelLoadError, model_factory

    try:
        factory = model_factory(spec, args)
    except ModelLoadError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from exc

    def build() -> torch.nn.Module:
        try:
            return factory()
        except ModelLoadError as exc:
            raise click.BadParameter(str(exc), param_hint="--model") from exc

    return build


def cli_load_model(spec: str, args: tuple[str, ...]) -> torch.nn.Module:
    """Import and build ``--model`` with its ``--model-arg`` values, or exit 2 with one line."""
    return cli_model_factory(spec, args)()
