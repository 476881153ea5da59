"""Tracing a step or eval function to ATen ops and exporting it as a standard-ops ONNX graph.

``make_fx`` with the decomposition table turns the function (forward,
``torch.func.grad``, optimizer) into a flat ATen graph; symbolic tracing keeps
the batch axis free (real tracing bakes the batch size into convolution
graphs). ``onnx_capture`` then captures it with torch.export's ATen-IR path,
the convolution lowering inside that capture, and hands it to torch.onnx with
nothing left to decompose; where it cannot (other torch internals), a second
``make_fx`` pass lowers the convolutions and ``torch.onnx.export`` captures and
decomposes on its own (the same graph, more time). torch's dynamo
exporter writes it at opset 18 with its graph optimizer off (``optimize=True``
deletes ``Add(x, eps)`` and Adam's weights go NaN). The result is checked to
hold ``ai.onnx`` ops only at opset <= 18 and stamped to IR 10, what
onnxruntime 1.19 loads.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.export import Dim
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx

from device_agent.bundle.manifest import MAX_PORTABLE_OPSET
from sdk.portable_graph import onnx_capture
from sdk.portable_graph.decompositions import decomposition_table, lowering_table
from sdk.portable_graph.graph_passes import clean_up
from sdk.portable_graph.support import UnsupportedModelError

logger = logging.getLogger(__name__)

OPSET = 18
#: onnxruntime 1.19 loads IR <= 10.
IR_VERSION = 10
_STANDARD_DOMAINS = ("", "ai.onnx")


def export_graph(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], *, input_names: list[str], output_names: list[str],
                 path: Path, batch_inputs: Sequence[int] = (0, 1)) -> onnx.ModelProto:
    """Trace ``fn(*inputs)`` and write it to ``path`` with a dynamic first axis on the inputs at ``batch_inputs`` (x, y)."""
    try:
        # Without duck shaping: a batch that happens to equal some weight dimension (4 channels, batch 4)
        # would share its symbol and be specialised into a fixed batch size.
        with _quiet(), _shared_torchlib_registry(), fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="symbolic")(*inputs)
            batch = Dim("batch")
            dynamic = tuple({0: batch} if i in batch_inputs else None for i in range(len(inputs)))
            if not onnx_capture.export_with_capture(gm, inputs, lowering=lowering_table(), dynamic_shapes=dynamic, path=path,
                                                    opset=OPSET, input_names=input_names, output_names=output_names):
                gm = make_fx(gm, decomposition_table=lowering_table(), tracing_mode="symbolic")(*inputs)
                torch.onnx.export(gm, tuple(inputs), os.fspath(path), dynamo=True, opset_version=OPSET, optimize=False,
                                  dynamic_shapes=dynamic, input_names=input_names, output_names=output_names,
                                  verbose=False)
    except Exception as exc:  # the tracer and exporter raise many types; all mean "cannot express this model"
        raise UnsupportedModelError(f"cannot express the model as a standard ONNX training graph: {_first_line(exc)}") from exc
    proto = onnx.load(os.fspath(path))
    clean_up(proto)
    check_standard_ops(proto)
    if proto.ir_version > IR_VERSION:
        proto.ir_version = IR_VERSION
    onnx.save(proto, os.fspath(path))
    return proto


def check_standard_ops(proto: onnx.ModelProto) -> None:
    """Raise UnsupportedModelError unless every node is an ``ai.onnx`` op and the opset is <= 18."""
    bad = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in _STANDARD_DOMAINS})
    if bad or proto.functions:
        raise UnsupportedModelError(f"the training graph needs non-standard ops {bad or [f.name for f in proto.functions]}")
    for imp in proto.opset_import:
        if imp.domain in _STANDARD_DOMAINS and imp.version > MAX_PORTABLE_OPSET:
            raise UnsupportedModelError(f"the training graph needs opset {imp.version} (> {MAX_PORTABLE_OPSET})")
        if imp.domain not in _STANDARD_DOMAINS:
            raise UnsupportedModelError(f"the training graph imports domain {imp.domain!r}")


def _first_line(exc: BaseException) -> str:
    # The exporter wraps the real cause; the innermost message names the op.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


try:  # torch's exporter rebuilds the torchlib op registry (~1 s) on every export and only reads it
    from torch.onnx._internal.exporter import _constants, _registration

    _FROM_TORCHLIB: Any = _registration.ONNXRegistry.__dict__["from_torchlib"]
except (ImportError, AttributeError, KeyError):  # another torch layout: every export builds its own
    _FROM_TORCHLIB = None


@functools.cache
def _torchlib_registry(cls: type, opset_version: int) -> Any:
    return _FROM_TORCHLIB.__func__(cls, opset_version=opset_version)


@contextlib.contextmanager
def _shared_torchlib_registry() -> Any:
    """Within the block, torch's exporter gets one torchlib registry per opset, built once per process."""
    if _FROM_TORCHLIB is None:
        yield
        return

    def from_torchlib(cls: type, opset_version: int = _constants.TORCHLIB_OPSET) -> Any:
        return _torchlib_registry(cls, opset_version)

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)  # type: ignore[assignment]
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = _FROM_TORCHLIB  # type: ignore[method-assign]


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter prints progress and warns about every torchvision op it skips; keep that out of the build's output."""
    sink = io.StringIO()
    torch_onnx_logger = logging.getLogger("torch.onnx")
    level = torch_onnx_logger.level
    torch_onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_logger.setLevel(level)
        if sink.getvalue():
            logger.debug("torch.onnx said:\n%s", sink.getvalue())
