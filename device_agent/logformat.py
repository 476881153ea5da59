"""The two log formats of ``fedge`` and ``fedge-agent`` (``--log-format text|json``), standard library only.

``text`` is one human line per record. ``json`` is one JSON object per line
(JSON Lines) for log shippers: ``ts`` (UTC, ISO 8601 with milliseconds),
``level``, ``logger``, ``message``, ``exception`` when there is one, and any
``extra=`` fields a call passes. Control characters in a message (a device
id that holds a newline, say) are escaped by the JSON encoder, so one record
is always one line and cannot forge another.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

#: The ``--log-format`` choices.
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}
#: Marks the handler the command lines install, so they reformat their own handler only.
_HANDLER_MARK = "_fedge_cli_handler"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, on one line (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (non-JSON values of ``extra=`` fields as their ``str``)."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, allow_nan=False)


def make_formatter(kind: str) -> logging.Formatter:
    """The formatter for ``kind`` (``text`` or ``json``); ValueError for anything else."""
    if kind == "json":
        return JsonLinesFormatter()
    if kind == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {kind!r}")


def install_handler(kind: str = "text") -> logging.Handler | None:
    """Give the root logger a stderr handler in format ``kind`` unless it already has handlers (as
    :func:`logging.basicConfig` does); an earlier handler of ours is reformatted instead. The handler, or
    None when the root's handlers are someone else's (a test runner's, an embedding program's)."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]
    if ours:
        for handler in ours:
            handler.setFormatter(make_formatter(kind))
        return ours[0]
    if root.handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(make_formatter(kind))
    root.addHandler(handler)
    return handler
