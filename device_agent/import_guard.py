"""Making chosen packages unimportable: how the agent keeps torch out, and how tests play a torch-less device."""

from __future__ import annotations

import importlib.abc
from collections.abc import Iterable
from typing import Any


class ModuleBlocker(importlib.abc.MetaPathFinder):
    """A meta-path finder that raises ModuleNotFoundError for ``names`` and their submodules.

    Insert it at the front of ``sys.meta_path``; modules already imported are
    unaffected (the import system finds them in ``sys.modules`` first).
    """

    def __init__(self, names: Iterable[str], *, reason: str = "is not available on this device") -> None:
        self.names = tuple(names)
        self.reason = reason

    def blocks(self, fullname: str) -> bool:
        """Whether ``fullname`` is one of the blocked packages or inside one."""
        return any(fullname == n or fullname.startswith(n + ".") for n in self.names)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if self.blocks(fullname):
            raise ModuleNotFoundError(f"{fullname} {self.reason}", name=fullname)
        return None
