"""Reading a benchmark process's own memory figures from /proc (Linux)."""

from __future__ import annotations


def status_mb(field: str = "VmHWM") -> float:
    """A ``/proc/self/status`` memory field in MB (``VmHWM`` = peak RSS); NaN when unavailable.

    VmHWM, not ``ru_maxrss``: ru_maxrss survives ``exec`` and would count the
    parent's pages at fork, so a child started from a torch-laden parent would
    report the parent's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
