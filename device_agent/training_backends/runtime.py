"""Importing onnxruntime on the device, with torch kept out, and finding out what it can do.

``import onnxruntime.training`` imports torch (training/__init__ -> optim), and
even ``import onnxruntime`` probes ``onnxruntime.training.ortmodule`` (and so
torch) when torch happens to be installed. The agent therefore imports
onnxruntime with torch and ``onnxruntime.training`` hidden, so a device that
has torch installed for other reasons still does not pay its ~300 MB of RSS,
and reaches the on-device training classes in ``onnxruntime.capi._pybind_state``
directly.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from types import ModuleType

from device_agent.errors import FedgeError
from device_agent.import_guard import ModuleBlocker

logger = logging.getLogger(__name__)

_HIDDEN = ("torch", "onnxruntime.training")
#: onnxruntime's ArenaExtendStrategy: each new region twice the last (its default), not just the size asked for.
_NEXT_POWER_OF_TWO = 0


class BackendUnavailableError(FedgeError):
    """The requested training backend cannot run here (runtime missing, or the bundle lacks its artifacts)."""


@functools.cache
def onnxruntime_module() -> ModuleType:
    """The ``onnxruntime`` module, imported with torch hidden; BackendUnavailableError when it is not installed.

    Telemetry is switched off before and after the import: onnxruntime's Linux wheels
    since 1.29 send usage events to Microsoft and write a device id under ~/.cache
    unless told not to, and a fleet device must not phone anywhere but its broker.
    ``ORT_DISABLE_TELEMETRY=0`` in the environment is respected as an explicit opt-in.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if "onnxruntime" in sys.modules or "torch" in sys.modules:
        import onnxruntime
    else:
        finder = ModuleBlocker(_HIDDEN, reason="is hidden from the fedge device agent")
        sys.meta_path.insert(0, finder)
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendUnavailableError(f"onnxruntime is not installed ({exc}); install fedge[device]") from exc
        finally:
            sys.meta_path.remove(finder)
    onnxruntime.set_default_logger_severity(3)
    if os.environ.get("ORT_DISABLE_TELEMETRY") != "0" and hasattr(onnxruntime, "disable_telemetry_events"):
        onnxruntime.disable_telemetry_events()
    return onnxruntime


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None when there is none."""
    try:
        return str(onnxruntime_module().__version__)
    except BackendUnavailableError:
        return None


@functools.cache
def has_training_api() -> bool:
    """True when the installed onnxruntime is an onnxruntime-training build (Module, Optimizer, checkpoints)."""
    try:
        onnxruntime_module()
        from onnxruntime.capi import _pybind_state as capi
    except (BackendUnavailableError, ImportError):
        return False
    return all(hasattr(capi, n) for n in ("Module", "Optimizer", "load_checkpoint", "save_checkpoint"))


def has_inference_session() -> bool:
    """True when onnxruntime is installed (every build has InferenceSession, which the portable backend needs)."""
    try:
        return hasattr(onnxruntime_module(), "InferenceSession")
    except BackendUnavailableError:
        return False


@functools.cache
def shared_cpu_arena() -> bool:
    """Register one CPU memory arena for the sessions of this process that opt in; False when this onnxruntime cannot.

    A session opts in with the session config entry ``session.use_env_allocators = 1``;
    the train and eval sessions then share one arena. It grows in doubling regions
    (``kNextPowerOfTwo``, onnxruntime's default): with the sessions' memory patterns off
    (``portable``), measured on the 2D-CNN step, 2 MB less peak RSS than growing by exactly
    the size requested (``kSameAsRequested``, 105.7 -> 103.8 MB, same speed; the exact-size
    regions fragment: a request that fits no free chunk of one region makes a new one).
    """
    ort = onnxruntime_module()
    try:
        config = ort.OrtArenaCfg(0, _NEXT_POWER_OF_TWO, -1, -1)
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, config)
    except (AttributeError, RuntimeError, TypeError) as exc:  # an onnxruntime without the API: each session keeps its own
        logger.info("onnxruntime %s: no shared CPU arena (%s)", getattr(ort, "__version__", "?"), exc)
        return False
    return True


@functools.cache
def _malloc_trim() -> object | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    import ctypes  # here: only a process that opens a step graph loads it

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols, the C library's among them
    except (OSError, TypeError):  # no dlopen(NULL) on this platform
        return None


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); False where there is no such call.

    glibc keeps freed heap for later allocations; after a step graph opens, its temporaries (the
    flattened moments, the slots' first copies) are free, and returning them lowers the 2D-CNN
    device process's peak by ~1 MB (docs/benchmarks.md). Changes no value anywhere.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # type: ignore[operator]
    return True
