"""Small clean-ups on the exported ONNX graph that onnxruntime's own optimiser does not do.

- Identical initializers become one: the forward and the backward of a
  convolution each create the same unfold index; once they read one
  initializer, onnxruntime's common-subexpression elimination merges the two
  unfolds into one node.
- ``MatMul(Expand(W), B)`` where the Expand only adds leading batch axes to a
  matrix becomes ``MatMul(W, B)``: ``torch.matmul`` of a matrix with a batch
  traces to expand + bmm, which would copy the weights once per example and
  run a batched GEMM; ONNX MatMul broadcasts the matrix by itself.
- A mean's backward (``expand(g) / n``, then a product with the activation
  gradient mask) becomes ``(g / n)`` broadcast straight into the product:
  the division moves above the Expand, and an Expand feeding an elementwise
  op whose other operand already has the expanded shape is dropped (ONNX
  broadcasting gives the same result without materialising the copy).
- Three leftovers of the loss and its gradient that onnxruntime keeps as
  kernels: a CastLike of a constant (becomes a Cast, which onnxruntime
  folds), an Expand to a scalar's shape (a no-op), a mean over all axes
  kept as 1-sized axes then squeezed (one ReduceMean with keepdims=0).
- The exporter's provenance (every node's FX node, namespace and stack
  trace as metadata) is dropped: nine tenths of a step graph's bytes, and
  onnxruntime keeps it in memory (2 MB of a 2D-CNN session).
"""

from __future__ import annotations

import onnx


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for out in graph.output:
        if out.name in renames:  # never happens for initializers the step graph outputs, but keep outputs intact
            raise ValueError(f"graph output {out.name} is a duplicated initializer")


def dedupe_initializers(graph: onnx.GraphProto) -> int:
    """Point every use of an initializer at the first one with the same type, shape and bytes; return how many went."""
    graph_inputs = {i.name for i in graph.input}
    seen: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    renames: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        if init.name in graph_inputs or init.data_location == onnx.TensorProto.EXTERNAL:
            keep.append(init)
            continue
        key = (init.data_type, tuple(init.dims), onnx.numpy_helper.to_array(init).tobytes())
        if key in seen:
            renames[init.name] = seen[key]
        else:
            seen[key] = init.name
            keep.append(init)
    if renames:
        _rename_inputs(graph, renames)
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return len(renames)


def _dims(graph: onnx.GraphProto, name: str) -> list[int | str] | None:
    """Static sizes (symbolic ones as their name) of a value, None when the graph does not record its shape."""
    for vi in (*graph.value_info, *graph.input, *graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in graph.initializer:
        if init.name == name:
            return list(init.dims)
    return None


def fold_matmul_expands(graph: onnx.GraphProto) -> int:
    """Feed matrices that an Expand only broadcasts over batch axes straight into MatMul; return how many."""
    producers = {out: node for node in graph.node for out in node.output}
    folded = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        for slot in (0, 1):
            expand = producers.get(node.input[slot])
            if expand is None or expand.op_type != "Expand":
                continue
            source, target = _dims(graph, expand.input[0]), _dims(graph, expand.output[0])
            other = _dims(graph, node.input[1 - slot])
            if source is None or target is None or other is None or len(other) < len(target) or len(source) > len(target):
                continue
            if source[-2:] != target[-2:] or any(d != 1 for d in source[:-2]):
                continue  # only leading (batch) axes may be broadcast, and the other operand must carry them all
            node.input[slot] = expand.input[0]
            folded += 1
    if folded:
        _drop_dead_expands(graph)
    return folded


_BROADCASTING = ("Add", "Sub", "Mul", "Div")


def _scalar(graph: onnx.GraphProto, name: str) -> bool:
    """Whether ``name`` is a single value (rank 0, or every axis of size 1), by its recorded shape."""
    dims = _dims(graph, name)
    if dims is None:
        for node in graph.node:  # constants the exporter emits as nodes record no value_info
            if node.op_type == "Constant" and node.output[0] == name:
                return any(a.name == "value" and all(d == 1 for d in a.t.dims) for a in node.attribute)
        return False
    return all(d == 1 for d in dims)


def _constant_ints(graph: onnx.GraphProto, name: str) -> list[int] | None:
    """The values of an integer constant (initializer or Constant node), None when ``name`` is not one."""
    for init in graph.initializer:
        if init.name == name:
            return [int(v) for v in onnx.numpy_helper.to_array(init).reshape(-1)]
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return [int(v) for v in onnx.numpy_helper.to_array(a.t).reshape(-1)]
                if a.name == "value_ints":
                    return list(a.ints)
    return None


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def hoist_scalar_ops_above_expands(graph: onnx.GraphProto) -> int:
    """``Div/Mul(Expand(a), s)`` -> ``Expand(Div/Mul(a, s))`` for a single value s, where the Expand feeds nothing else.

    A single value broadcasts the same before and after the Expand, so only the amount of work changes.
    """
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    moved = 0
    for node in list(graph.node):
        if node.op_type not in ("Div", "Mul") or not _scalar(graph, node.input[1]):
            continue
        expand = producers.get(node.input[0])
        if expand is None or expand.op_type != "Expand" or expand.output[0] in outputs:
            continue
        if len(_consumers(graph, expand.output[0])) != 1:
            continue
        middle, final = expand.output[0], node.output[0]
        node.input[0], node.output[0] = expand.input[0], middle  # the scalar op now runs on the small tensor
        expand.input[0], expand.output[0] = middle, final
        producers[middle], producers[final] = node, expand
        stale = [vi for vi in graph.value_info if vi.name == middle]  # its recorded shape was the expanded one
        for vi in stale:
            graph.value_info.remove(vi)
        moved += 1
    if moved:
        _sort_topologically(graph)
    return moved


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so that every node comes after the producers of its inputs (stable otherwise)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    order: list[int] = []
    state = [0] * len(graph.node)  # 0 new, 1 visiting, 2 placed

    def place(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if expanded:
                state[j] = 2
                order.append(j)
                continue
            if state[j]:
                continue
            state[j] = 1
            stack.append((j, True))
            for name in reversed(graph.node[j].input):
                k = produced_by.get(name)
                if k is not None and state[k] == 0:
                    stack.append((k, False))

    for i in range(len(graph.node)):
        place(i)
    nodes = [onnx.NodeProto() for _ in order]
    for target, i in zip(nodes, order):
        target.CopyFrom(graph.node[i])
    del graph.node[:]
    graph.node.extend(nodes)


def fold_broadcast_expands(graph: onnx.GraphProto) -> int:
    """Feed an Expand's input straight into elementwise ops whose other operand already has the expanded shape."""
    producers = {out: node for node in graph.node for out in node.output}
    folded = 0
    for node in graph.node:
        if node.op_type not in _BROADCASTING:
            continue
        for slot in (0, 1):
            expand = producers.get(node.input[slot])
            if expand is None or expand.op_type != "Expand":
                continue
            partner = producers.get(node.input[1 - slot])
            if partner is not None and partner.op_type == "Expand":
                continue  # one operand must keep the full shape
            target, other = _dims(graph, expand.output[0]), _dims(graph, node.input[1 - slot])
            if target is None or other is None or target != other:
                continue
            node.input[slot] = expand.input[0]
            folded += 1
            break
    if folded:
        _drop_dead_expands(graph)
    return folded


def _drop_dead_expands(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Expand" and not any(o in used for o in n.output)]:
        graph.node.remove(n)


def _bypass(graph: onnx.GraphProto, node: onnx.NodeProto, source: str) -> None:
    """Remove ``node`` (one output), pointing its consumers at ``source``."""
    target = node.output[0]
    if target in {o.name for o in graph.output}:
        return  # the value is a graph output: keep its producer
    for other in graph.node:
        for i, name in enumerate(other.input):
            if name == target:
                other.input[i] = source
    graph.node.remove(node)


def drop_identity_expands(graph: onnx.GraphProto) -> int:
    """Remove Expands whose output has their input's shape (the exporter's broadcast of a scalar to a scalar).

    An output of rank 0 needs no recorded input shape: Expand never lowers the rank, so the input is a scalar too.
    """
    dropped = 0
    for node in [n for n in graph.node if n.op_type == "Expand"]:
        source, target = _dims(graph, node.input[0]), _dims(graph, node.output[0])
        if target == [] or (source is not None and source == target):
            _bypass(graph, node, node.input[0])
            dropped += 1
    return dropped


def squeeze_reductions(graph: onnx.GraphProto) -> int:
    """``Reshape(ReduceSum(x, keepdims=1))`` that only drops the reduced axes -> ``ReduceSum(x, keepdims=0)``."""
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    merged = 0
    for reshape in [n for n in graph.node if n.op_type == "Reshape" and n.output[0] not in outputs]:
        reduce = producers.get(reshape.input[0])
        if reduce is None or reduce.op_type != "ReduceSum" or len(_consumers(graph, reduce.output[0])) != 1:
            continue
        if any(a.name == "keepdims" and a.i == 0 for a in reduce.attribute) or len(reduce.input) < 2:
            continue
        axes = _constant_ints(graph, reduce.input[1])
        kept, wanted = _dims(graph, reduce.output[0]), _dims(graph, reshape.output[0])
        if axes is None or kept is None or wanted is None:
            continue
        reduced = {a % len(kept) for a in axes}
        if [d for i, d in enumerate(kept) if i not in reduced] != wanted:
            continue
        _drop_kept_axes(graph, reduce, reshape)
        merged += 1
    return merged


def _drop_kept_axes(graph: onnx.GraphProto, reduce: onnx.NodeProto, follower: onnx.NodeProto) -> None:
    """Make ``reduce`` drop its reduced axes (keepdims=0) and bypass ``follower``, the node that dropped them."""
    del reduce.attribute[:]
    reduce.attribute.append(onnx.helper.make_attribute("keepdims", 0))
    for vi in [vi for vi in graph.value_info if vi.name == reduce.output[0]]:
        graph.value_info.remove(vi)  # it recorded the kept axes
    _bypass(graph, follower, reduce.output[0])


def _elem_type(graph: onnx.GraphProto, name: str) -> int | None:
    for vi in (*graph.value_info, *graph.input, *graph.output):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return int(vi.type.tensor_type.elem_type)
    for init in graph.initializer:
        if init.name == name:
            return int(init.data_type)
    return None


def castlike_to_cast(graph: onnx.GraphProto) -> int:
    """``CastLike(a, b)`` -> ``Cast(a, to=type of b)`` where b's type is recorded; onnxruntime folds a Cast of a constant."""
    changed = 0
    for node in [n for n in graph.node if n.op_type == "CastLike"]:
        to = _elem_type(graph, node.input[1])
        if to is None:
            continue
        cast = onnx.helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=to)
        node.CopyFrom(cast)
        changed += 1
    return changed


def squeeze_full_reductions(graph: onnx.GraphProto) -> int:
    """``Squeeze(ReduceMean/ReduceSum over every axis, keepdims=1)`` -> the reduction with keepdims=0 (a scalar)."""
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    merged = 0
    for squeeze in [n for n in graph.node if n.op_type == "Squeeze" and len(n.input) == 1]:
        reduce = producers.get(squeeze.input[0])
        if reduce is None or reduce.op_type not in ("ReduceMean", "ReduceSum") or {reduce.output[0], squeeze.output[0]} & outputs:
            continue
        if len(_consumers(graph, reduce.output[0])) != 1 or (len(reduce.input) > 1 and reduce.input[1]):
            continue  # the reduction must be over every axis (no axes input)
        attrs = {a.name: a.i for a in reduce.attribute}
        if attrs.get("noop_with_empty_axes", 0) or attrs.get("keepdims", 1) == 0:
            continue
        _drop_kept_axes(graph, reduce, squeeze)
        merged += 1
    return merged


def strip_provenance(graph: onnx.GraphProto) -> int:
    """Drop every node's metadata and doc string (what the exporter records about the traced code); return how many nodes had some."""
    stripped = 0
    for node in graph.node:
        if len(node.metadata_props) or node.doc_string:
            del node.metadata_props[:]
            node.doc_string = ""
            stripped += 1
    return stripped


def clean_up(proto: onnx.ModelProto) -> None:
    """Apply every pass above to ``proto`` in place."""
    strip_provenance(proto.graph)
    dedupe_initializers(proto.graph)
    fold_matmul_expands(proto.graph)
    hoist_scalar_ops_above_expands(proto.graph)
    fold_broadcast_expands(proto.graph)
    drop_identity_expands(proto.graph)
    squeeze_reductions(proto.graph)
    squeeze_full_reductions(proto.graph)
    castlike_to_cast(proto.graph)
