"""Reading object-dtype ``.npy`` files (pickled numpy arrays) without executing arbitrary code.

Some public datasets (seglearn's smartwatch data among them) ship as an
object-dtype ``.npy``: a normal npy header followed by a pickle. The usual
pickle-enabled ``np.load`` runs that pickle with the standard
unpickler, which imports and calls whatever the file names
(``os.system``, ``builtins.eval``...): loading a dataset would mean trusting
everything that wrote it and every mirror it passed through.

:func:`read_object_npy` parses the npy header with numpy's own format
functions, then unpickles the rest with :class:`RestrictedUnpickler`, whose
``find_class`` is an allow-list (the "Restricting Globals" recipe of the
Python ``pickle`` documentation). Why this is safe:

- In a pickle, the only ways to reach a callable are globals (the
  ``GLOBAL``, ``STACK_GLOBAL`` and ``INST`` opcodes, which resolve through
  ``find_class``), the ``copyreg`` extension registry (``EXT1/2/4``) and
  persistent ids. Before unpickling, the opcode stream is scanned with
  ``pickletools.genops`` and any ``EXT*`` or ``PERSID`` opcode is refused:
  the C unpickler serves extension codes from a process-wide cache without
  asking ``find_class``, so an entry some other code registered and loaded
  would otherwise slip past the allow-list. Everything else a pickle can
  build is plain data (str, bytes, int, float, list, tuple, dict, set).
- The allow-list maps exactly these names to exactly these objects, and
  nothing else resolves:
  ``numpy[._]core.multiarray._reconstruct`` -> a wrapper that only makes an
  *empty* ``ndarray`` (its data then comes from the file via
  ``ndarray.__setstate__``, which numpy checks against shape and dtype);
  ``numpy.ndarray`` and ``numpy.dtype`` (type objects: calling them builds
  arrays or dtypes from data, never code);
  ``numpy[._]core.multiarray.scalar`` (a numpy scalar from a dtype and its
  bytes); and ``_codecs.encode`` -> a wrapper that only does
  ``str.encode("latin-1")`` (how pickle protocol 2 stores ``bytes``).
- ``BUILD`` calls ``__setstate__`` on what was built; on these types that
  only fills in array or dtype state from data.

A pickle can still make large arrays (memory, not code); the file's own
size bounds that. numpy's pickle-protocol-5 path (``_frombuffer``) is not on
the list: ``np.save`` writes protocol 3, and older files protocol 2. Anything outside the list raises
:class:`~sdk.datasets.errors.UnsafePickleError` before it is imported.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdk.datasets.errors import DatasetFormatError, UnsafePickleError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]


def _reconstruct_empty(subtype: Any, shape: Any, dtype: Any) -> Any:
    """``_reconstruct`` limited to what ndarray pickles use: an empty plain ndarray (state follows)."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise UnsafePickleError(f"refused ndarray reconstruction with subtype={subtype!r}, shape={shape!r}")
    return _multiarray._reconstruct(np.ndarray, (0,), dtype)


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` limited to the latin-1 round trip pickle protocol 2 uses for ``bytes``."""
    name = encoding.replace("-", "").replace("_", "").lower() if isinstance(encoding, str) else None
    if not isinstance(text, str) or name not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals needed to rebuild arrays (see module docs)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused to load global {module}.{name}") from None


# Opcodes that reach objects without find_class: the copyreg extension cache and persistent ids.
_REFUSED_OPCODES = frozenset({"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"})


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` after refusing extension and persistent-id opcodes."""
    for opcode, _, position in pickletools.genops(data):
        if opcode.name in _REFUSED_OPCODES:
            raise UnsafePickleError(f"refused opcode {opcode.name} at byte {position}")
        if opcode.name == "STOP":
            break
    return RestrictedUnpickler(io.BytesIO(data)).load()


def read_object_npy(path: str | os.PathLike[str]) -> Any:
    """Load an object-dtype ``.npy`` file safely; returns the stored array (0-d arrays: use ``.item()``).

    Raises :class:`~sdk.datasets.errors.DatasetFormatError` for a file that is
    not an npy file or not object-dtype, and
    :class:`~sdk.datasets.errors.UnsafePickleError` when its pickle names
    anything outside the allow-list.
    """
    with Path(path).open("rb") as fp:
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise DatasetFormatError(f"{path}: unsupported npy format version {version}")
        except ValueError as exc:
            raise DatasetFormatError(f"{path}: not a valid npy file: {exc}") from exc
        if not dtype.hasobject:
            raise DatasetFormatError(f"{path}: dtype {dtype} holds no objects; use np.load(allow_pickle=False)")
        payload = fp.read()
    try:
        array = restricted_loads(payload)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetFormatError(f"{path}: malformed pickle payload: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise DatasetFormatError(f"{path}: payload does not match the header shape {shape}")
    return array
