"""Typed access to one table of a TOML file, with errors that name the file and the dotted key.

Every getter records the key it read, so :meth:`TomlTable.done` can refuse
keys nobody asked for: a misspelt option fails loudly instead of silently
falling back to its default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from device_agent.daemon.errors import ConfigError
from device_agent.protocol.headers import check_id

_E = TypeVar("_E", bound=Enum)
#: Default marker for required keys.
REQUIRED: Any = object()


class TomlTable:
    """Typed, key-naming access to one TOML table (``prefix`` is its dotted name, empty for the top).

    Getters take a default (``REQUIRED`` when the key must be present) and
    return it unchanged when the key is absent; relative paths resolve against ``base_dir``.
    """

    def __init__(self, data: Mapping[str, Any], *, prefix: str, source: str, base_dir: Path) -> None:
        self._data = data
        self._prefix = prefix
        self._source = source
        self._base = base_dir
        self._read: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError naming the file and this table's ``key``."""
        name = f"{self._prefix}.{key}" if self._prefix else key
        return ConfigError(f"{self._source}: {name}: {message}")

    def _get(self, key: str, default: Any) -> tuple[bool, Any]:
        """(present, value); the default when absent, an error when absent and REQUIRED."""
        self._read.add(key)
        if key in self._data:
            return True, self._data[key]
        if default is REQUIRED:
            raise self.error(key, "missing (required)")
        return False, default

    def value(self, key: str, default: Any = REQUIRED) -> Any:
        """The value as TOML gave it, for keys the caller checks itself."""
        return self._get(key, default)[1]

    def optional_table(self, key: str) -> TomlTable | None:
        """The sub-table ``key``, or None when absent."""
        present, value = self._get(key, None)
        if not present:
            return None
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a table, got {value!r}")
        prefix = f"{self._prefix}.{key}" if self._prefix else key
        return TomlTable(value, prefix=prefix, source=self._source, base_dir=self._base)

    def table(self, key: str) -> TomlTable:
        """The sub-table ``key``, which must be present."""
        table = self.optional_table(key)
        if table is None:
            raise self.error(key, "missing (required)")
        return table

    def section(self, key: str) -> TomlTable:
        """The sub-table ``key`` whose keys all have defaults: an empty table when absent."""
        table = self.optional_table(key)
        prefix = f"{self._prefix}.{key}" if self._prefix else key
        return table if table is not None else TomlTable({}, prefix=prefix, source=self._source, base_dir=self._base)

    def string(self, key: str, default: Any = REQUIRED) -> Any:
        """A non-empty string."""
        present, value = self._get(key, default)
        if present and (not isinstance(value, str) or not value):
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def identifier(self, key: str) -> str:
        """A required fedge id (device, fleet, region)."""
        value = self.string(key)
        try:
            check_id(key, value)
        except ValueError:
            raise self.error(key, f"{value!r} is not a valid id ([A-Za-z0-9][A-Za-z0-9._:@-]{{0,127}})") from None
        return str(value)

    def integer(self, key: str, default: Any = REQUIRED, *, minimum: int | None = None, maximum: int | None = None) -> Any:
        """An integer (not a bool) within ``minimum..maximum`` (None: unbounded)."""
        present, value = self._get(key, default)
        if present and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            lo = "" if minimum is None else str(minimum)
            hi = "" if maximum is None else str(maximum)
            raise self.error(key, f"expected an integer in {lo}..{hi}, got {value!r}")
        return value

    def number(self, key: str, default: Any = REQUIRED, *, minimum: float | None = None, positive: bool = False) -> Any:
        """A finite number as float; ``positive`` requires > 0, ``minimum`` >= that."""
        present, value = self._get(key, default)
        if not present:
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and ((positive and not value > 0) or (minimum is not None and value < minimum)):
            ok = False
        if not ok:
            want = "a number > 0" if positive else f"a number >= {minimum}" if minimum is not None else "a finite number"
            raise self.error(key, f"expected {want}, got {value!r}")
        return float(value)

    def choice(self, key: str, enum: type[_E], default: Any = REQUIRED) -> Any:
        """One of ``enum``'s values, returned as the member."""
        present, value = self._get(key, default)
        if not present:
            return value
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in enum)
            raise self.error(key, f"expected one of {allowed}, got {value!r}") from None

    def path(self, key: str, default: Any = REQUIRED, *, must_exist: bool = False) -> Any:
        """A path (``~`` expanded, relative to ``base_dir``); ``must_exist`` requires a file there."""
        present, value = self._get(key, default)
        if not present:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a path, got {value!r}")
        return self._resolve(key, value, must_exist)

    def paths(self, key: str, default: Any = REQUIRED, *, must_exist: bool = False) -> Any:
        """One path or a non-empty list of them, as a tuple of paths."""
        present, value = self._get(key, default)
        if not present:
            return value
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"expected a path or a non-empty list of paths, got {value!r}")
        return tuple(self._resolve(key, v, must_exist) for v in value)

    def _resolve(self, key: str, value: str, must_exist: bool) -> Path:
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else self._base / path
        if must_exist and not path.is_file():
            raise self.error(key, f"file {str(path)!r} does not exist")
        return path

    def done(self) -> None:
        """ConfigError for the first key of this table no getter asked for (a typo, usually)."""
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise self.error(unknown[0], f"unknown key (this table takes: {known})")
