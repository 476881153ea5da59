"""The build-time proof that a step graph's optimizer state may be updated in place on the device.

The device binds ``opt.X`` and ``new.opt.X`` to one buffer (``graph_names.updated_in_place``).
That is safe when every node that reads ``opt.X`` is the producer of ``new.opt.X`` or one of its
ancestors: any execution order onnxruntime picks must then finish every read before the write.
"""

from __future__ import annotations

import onnx

from device_agent.training_backends import graph_names as g
from sdk.portable_graph.support import UnsupportedModelError


def _ancestors(producers: dict[str, onnx.NodeProto], name: str) -> set[int]:
    """ids of the nodes ``name`` depends on, its producer included."""
    seen: set[int] = set()
    stack = [name]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.input)
    return seen


def check_in_place_updates(graph: onnx.GraphProto) -> None:
    """Raise UnsupportedModelError when some ``opt.*`` input is read by a node its ``new.opt.*`` does not depend on."""
    producers = {out: node for node in graph.node for out in node.output if out}
    outputs = {o.name for o in graph.output}
    for value in graph.input:
        name = value.name
        if not g.updated_in_place(name) or g.new(name) not in outputs:
            continue
        before = _ancestors(producers, g.new(name))
        late = [n.name or n.op_type for n in graph.node if name in n.input and id(n) not in before]
        if late:
            raise UnsupportedModelError(f"the step graph reads {name} after it may be overwritten (node {late[0]}): "
                                        "it cannot be updated in place")
