"""The build-time proofs that a step graph's state may be updated in place on the device.

The device binds ``X`` and ``new.X`` to one buffer when that is safe: every node that reads
``X`` is the producer of ``new.X`` or one of its ancestors, so any execution order onnxruntime
picks finishes every read before the write. A node with a subgraph (the micro-batch ``Loop``)
reads what its subgraph reads from the enclosing graph too.

- The optimizer state (``opt.*``, ``graph_names.updated_in_place``) must pass: the builder refuses
  a step graph otherwise (:func:`check_in_place_updates`).
- The parameters pass when every read of a parameter is an ancestor of its update: in a micro-batched
  step every update waits for the loop; in a whole-batch step each separately updated weight's update
  waits for the gradient of the parameter before it (``step.update_order``), which the backward
  computes from that layer's input gradient, the last read of the weight (without it onnxruntime may
  update a layer before the backward reads its weights for the layer below; making every update wait
  for the whole backward instead was measured 5 MB worse, every gradient then living until the first
  update). A graph that passes is marked for the device
  (:func:`parameters_update_in_place`, ``graph_names.PARAMS_IN_PLACE``), one that does not keeps two
  buffers per parameter. ``flat.param`` counts with the ``param.*`` of the parameters it holds, since
  the device binds those inputs to views of it.
"""

from __future__ import annotations

import onnx

from device_agent.training_backends import graph_names as g
from sdk.portable_graph.support import UnsupportedModelError


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    local |= {out for node in graph.node for out in node.output}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(n for n in _reads(node) if n and n not in local)
    return reads


def _reads(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, and what its subgraphs read from the enclosing graph."""
    names = list(node.input)
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            names.extend(sorted(_outer_reads(sub)))
    return names


def _ancestors(producers: dict[str, onnx.NodeProto], name: str) -> set[int]:
    """ids of the nodes ``name`` depends on, its producer included."""
    seen: set[int] = set()
    stack = [name]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(_reads(node))
    return seen


#: Ops onnxruntime may fold into their consumers (a Transpose into a Gemm's transB, a Reshape into nothing), so that
#: the consumer reads the op's input itself: their outputs count as reads of that input.
_TRANSPARENT = frozenset({"Transpose", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Expand"})


def _with_views(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """``names`` and every value a chain of transparent ops makes of them."""
    names = set(names)
    grew = True
    while grew:
        grew = False
        for node in graph.node:
            if node.op_type in _TRANSPARENT and node.input and node.input[0] in names and not names.issuperset(node.output):
                names.update(node.output)
                grew = True
    return names


def _late_reader(graph: onnx.GraphProto, names: set[str], output: str) -> str | None:
    """The first node that reads one of ``names`` (or a transparent view of one) and is not an ancestor of
    ``output``'s producer; None when there is none."""
    producers = {out: node for node in graph.node for out in node.output if out}
    before = _ancestors(producers, output)
    names = _with_views(graph, names)
    for node in graph.node:
        if id(node) not in before and names.intersection(_reads(node)):
            return node.name or node.op_type
    return None


def check_in_place_updates(graph: onnx.GraphProto) -> None:
    """Raise UnsupportedModelError when some ``opt.*`` input is read by a node its ``new.opt.*`` does not depend on."""
    outputs = {o.name for o in graph.output}
    for value in graph.input:
        name = value.name
        if not g.updated_in_place(name) or g.new(name) not in outputs:
            continue
        late = _late_reader(graph, {name}, g.new(name))
        if late is not None:
            raise UnsupportedModelError(f"the step graph reads {name} after it may be overwritten (node {late}): "
                                        "it cannot be updated in place")


def parameters_update_in_place(graph: onnx.GraphProto, flat: tuple[str, ...] = ()) -> bool:
    """Whether every updated parameter (and ``flat.param`` with ``flat``, the parameters it holds) may share one buffer
    with its update."""
    outputs = {o.name for o in graph.output}
    inputs = [i.name for i in graph.input]
    updated = [n for n in inputs if g.new(n) in outputs and (n.startswith(g.PARAM) or n == g.FLAT_PARAMS)]
    if not updated:
        return False
    for name in updated:
        aliases = {name} if name != g.FLAT_PARAMS else {name, *map(g.param, flat)}
        if _late_reader(graph, aliases, g.new(name)) is not None:
            return False
    return True
