"""A cheaper route through torch.onnx for a graph ``make_fx`` has already decomposed (private torch API, with a fallback).

``torch.onnx.export(graph_module)`` captures with ``torch.export`` (training IR,
which still holds ``detach_`` and in-place ops), then re-traces the whole
program to functionalise and decompose it (``run_decompositions``): about half
of a bundle build, spent on a graph that is already decomposed. Here:

- the capture is ``torch.export``'s ATen-IR path (``pre_dispatch=False``):
  functional and decomposed in the one trace;
- the rewrites of the lowering table (the convolution forward) run inside that
  same capture, in place of a second ``make_fx`` pass: the graph's nodes call
  them instead of the ATen op; so do rewrites of the few ops make_fx leaves that
  torch.onnx cannot translate (``squeeze.dims``);
- torch.onnx's decomposition returns the program untouched when every op in it
  already has an ONNX translation (what it would decompose is exactly the ops
  without one), else it runs as before.

``export_with_capture`` returns False when this torch's internals are not the
ones it was written against (torch 2.13) or the route fails; the caller then
takes the public route (two ``make_fx`` passes and ``torch.onnx.export``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental import _config as fx_config

logger = logging.getLogger(__name__)

try:
    from torch.export._trace import _export as _export_aten_ir
    from torch.onnx._internal.exporter import _decomp, _fx_passes

    _DECOMPOSE: Any = _fx_passes.decompose_with_registry
    _IMPLEMENTED: Any = _decomp.get_onnx_implemented_overloads
except (ImportError, AttributeError):  # another torch layout: the public route only
    _DECOMPOSE = None

#: False turns the route off (the tests use it to prove the public route still builds the same graphs).
ENABLED = True


def available() -> bool:
    """True when this torch has the internals the route uses."""
    return ENABLED and _DECOMPOSE is not None


def export_with_capture(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], *, lowering: dict[Any, Callable[..., Any]],
                        dynamic_shapes: tuple[Any, ...], path: Path, opset: int, input_names: list[str],
                        output_names: list[str]) -> bool:
    """Write ``gm`` (already decomposed by make_fx) to ``path`` as ONNX the cheap way; False when it cannot (the caller overwrites)."""
    if not available():
        return False
    try:
        lowered = _call_lowerings(gm, {**_UNTRANSLATED, **lowering})
        with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]  # as torch.onnx's own capture
            program = _export_aten_ir(lowered, tuple(inputs), dynamic_shapes=dynamic_shapes, strict=False, pre_dispatch=False)
        with _decompose_only_untranslatable():
            torch.onnx.export(program, tuple(inputs), os.fspath(path), dynamo=True, opset_version=opset, optimize=False,
                              input_names=input_names, output_names=output_names, verbose=False)
    except Exception as exc:  # internals that differ from torch 2.13's, or a graph this route cannot take: the public one decides
        logger.debug("cheap export route failed, taking torch.onnx's own: %s", exc)
        return False
    return True


def _squeeze_dims(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    # No ONNX translation in torch 2.13 (its reference decomposition emits prims.squeeze, which the capture cannot
    # functionalise): one squeeze.dim per axis, last axis first, each a no-op unless that axis has size 1, as squeeze.dims.
    for dim in sorted({d % x.dim() for d in dims}, reverse=True):
        x = torch.ops.aten.squeeze.dim(x, dim)
    return x


#: Ops make_fx leaves that torch.onnx cannot translate, rewritten inside the capture (else its re-trace would run).
_UNTRANSLATED: dict[Any, Callable[..., Any]] = {torch.ops.aten.squeeze.dims: _squeeze_dims}


def _call_lowerings(gm: torch.fx.GraphModule, lowering: dict[Any, Callable[..., Any]]) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose nodes of a lowered op call the rewrite (or the op, where the rewrite declines)."""
    copy = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())  # type: ignore[no-untyped-call]
    for node in copy.graph.nodes:
        if node.op == "call_function" and node.target in lowering:
            node.target = _lowered(node.target, lowering[node.target])
    copy.recompile()
    return copy


def _lowered(op: Any, rewrite: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        out = rewrite(*args, **kwargs)
        return op(*args, **kwargs) if out is NotImplemented else out

    call.__name__ = f"lowered_{op.__name__.replace('.', '_')}"
    return call


@contextlib.contextmanager
def _decompose_only_untranslatable() -> Iterator[None]:
    """Within the block, torch.onnx skips its re-trace when no op of the program needs decomposing."""

    def decompose(program: torch.export.ExportedProgram, registry: Any) -> torch.export.ExportedProgram:
        implemented = set(_IMPLEMENTED(registry))
        missing = {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
                   for node in module.graph.nodes
                   if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target not in implemented}
        if not missing:
            return program
        logger.debug("decomposing %s for torch.onnx", sorted(missing))
        return _DECOMPOSE(program, registry)  # type: ignore[no-any-return]

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = _DECOMPOSE
