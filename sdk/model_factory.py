"""Loading a user's PyTorch model from ``MODULE:CALLABLE`` (the ``--model`` option of the fedge CLI).

``MODULE`` is a dotted module name, found first in the current working
directory and then among the installed packages (so ``--model mymodels:Net``
works from the folder holding ``mymodels.py`` without setting PYTHONPATH), or
a path to a ``.py`` file (``--model models/net.py:Net``). ``CALLABLE`` is a
class or function returning a ``torch.nn.Module``; ``KEY=VALUE`` arguments
are passed to it, each value read as a Python literal (``hidden=64``,
``sizes=(32,16)``, ``name='x'``) or else kept as a string.

Every failure (no such module, an error inside it, no such attribute, bad
arguments, not a module) raises :class:`ModelLoadError` with one line naming
what failed. Importing a module runs its code: only name modules you trust.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from device_agent.errors import FedgeError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch


class ModelLoadError(FedgeError, ValueError):
    """A ``MODULE:CALLABLE`` model could not be imported or built; the message says which part failed."""


def parse_model_args(items: Iterable[str]) -> dict[str, object]:
    """``["hidden=64", "name=x"]`` -> ``{"hidden": 64, "name": "x"}`` (literals where they parse, else strings)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelLoadError(f"model argument {item!r}: expected KEY=VALUE with KEY a Python identifier")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


@contextmanager
def _working_directory_first() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_path(path: Path) -> ModuleType:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    name = f"_fedge_user_model_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the module look themselves up here
    spec.loader.exec_module(module)
    return module


def import_model_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``MODULE:CALLABLE`` (see the module docstring for where it is looked up)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"model {spec!r}: expected MODULE:CALLABLE, e.g. mymodels:Net or sdk.models:PersonalizedMLP")
    try:
        with _working_directory_first():
            if module_name.endswith(".py"):
                module = _import_path(Path(module_name))
            else:
                module = importlib.import_module(module_name)
    except ModelLoadError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ModelLoadError(f"model {spec!r}: no module {module_name!r} in the current directory ({os.getcwd()}) "
                                 "or the installed packages") from exc
        raise ModelLoadError(f"model {spec!r}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:  # any error raised by the user's module while it is imported
        raise ModelLoadError(f"model {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"model {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"model {spec!r}: {attr} is not callable")
    return target  # type: ignore[no-any-return]


def build_user_model(factory: Callable[..., Any], kwargs: dict[str, object], *, spec: str = "model") -> torch.nn.Module:
    """Call ``factory(**kwargs)`` and check it returned a ``torch.nn.Module`` with parameters."""
    import torch

    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's constructor: bad arguments, or its own error
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelLoadError(f"model {spec}({shown}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise ModelLoadError(f"model {spec} has no parameters to train")
    return model


def model_factory(spec: str, args: Iterable[str] = ()) -> Callable[[], torch.nn.Module]:
    """A zero-argument factory for ``MODULE:CALLABLE`` with ``KEY=VALUE`` ``args``: imports now, builds on each call."""
    factory = import_model_factory(spec)
    kwargs = parse_model_args(args)
    return lambda: build_user_model(factory, kwargs, spec=spec)


def load_model(spec: str, args: Iterable[str] = ()) -> torch.nn.Module:
    """Import ``MODULE:CALLABLE`` and build the model with ``KEY=VALUE`` ``args`` (ModelLoadError on any failure)."""
    return model_factory(spec, args)()
