"""The ``--model MODULE:CALLABLE`` / ``--model-arg KEY=VALUE`` options, shared by ``fedge bundle build`` and ``fedge simulate``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch

MODEL_HELP = ("Model factory as MODULE:CALLABLE (e.g. mymodels:Net, models/net.py:Net or sdk.models:PersonalizedMLP);"
              " MODULE is looked up in the current directory first.")
MODEL_ARG_HELP = "KEY=VALUE passed to the model factory (repeatable; VALUE is read as a Python literal, else a string)."


def cli_import_factory(spec: str) -> Callable[..., Any]:
    """The ``--model`` callable (working directory first), or exit 2 with one line."""
    from sdk.model_factory import ModelLoadError, import_model_factory

    try:
        return import_model_factory(spec)
    except ModelLoadError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from exc


def cli_model_args(items: tuple[str, ...]) -> dict[str, object]:
    """The ``--model-arg KEY=VALUE`` values as keyword arguments, or exit 2 with one line."""
    from sdk.model_factory import ModelLoadError, parse_model_args

    try:
        return parse_model_args(items)
    except ModelLoadError as exc:
        raise click.BadParameter(str(exc), param_hint="--model-arg") from exc


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
