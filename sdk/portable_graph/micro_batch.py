"""Micro-batched step graphs: the forward and backward run on slices of the batch inside an ONNX ``Loop``.

A step graph that runs the whole batch at once keeps every activation of the
batch alive until its gradient is computed (on the 2D-CNN at batch 32, ~20 MB
at once: the unfolded convolution inputs, the pooling taps). A micro-batched
step graph has the same inputs and outputs (``graph_names``), so any agent runs
it, but its body is

    Loop over ceil(N / B) slices of x and y (the last one may be shorter):
        loss_i, grads_i = gradients(x[i*B : (i+1)*B], y[...], scale = n_i / N, params)
        sum_loss += loss_i;  sum_grads += grads_i
    apply(lr, state, sum_loss, sum_grads)  -> FedProx term, optimizer update

so only one slice's activations are alive at a time. The gradient of the mean
loss over the batch is the sum over the slices of n_i / N times each slice's
mean-loss gradient; the scale is applied to the slice's loss, so it reaches
every gradient through the backward pass without a pass over the gradients.
The two halves are traced and exported separately (``step.make_slice_gradients``,
``step.make_apply``) and joined here; the builder checks the result against the
whole-batch step run eagerly, with a batch that leaves a shorter last slice.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from device_agent.training_backends import graph_names as g

#: Prefix of every name inside the loop (the gradient graph's own, the slicing) and of the apply graph's internals.
_BODY = "mb."
_APPLY = "ap."
SUMMED = "sum."
TASK_LOSS = "task.loss"


def _rename(name: str, prefix: str, renames: dict[str, str], keep: set[str]) -> str:
    if not name or name in keep:
        return name
    return renames.get(name, prefix + name)


def _renamed_nodes(graph: onnx.GraphProto, prefix: str, renames: dict[str, str], keep: set[str]) -> list[onnx.NodeProto]:
    """Copies of ``graph``'s nodes with every value name prefixed, except ``keep`` (outer inputs) and ``renames``."""
    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"cannot embed node {node.op_type} with a subgraph in a micro-batch loop")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [_rename(n, prefix, renames, keep) for n in node.input]
        copy.output[:] = [_rename(n, prefix, renames, keep) for n in node.output]
        copy.name = prefix + node.name if node.name else ""
        nodes.append(copy)
    return nodes


def _renamed_initializers(graph: onnx.GraphProto, prefix: str) -> list[onnx.TensorProto]:
    out = []
    for init in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = prefix + init.name
        out.append(copy)
    return out


def _int64(name: str, value: int | list[int]) -> onnx.TensorProto:
    if isinstance(value, list):
        return helper.make_tensor(name, TensorProto.INT64, [len(value)], value)
    return helper.make_tensor(name, TensorProto.INT64, [], [value])


def compose_micro_batched(gradients: onnx.ModelProto, apply: onnx.ModelProto, *, micro_batch: int) -> onnx.ModelProto:
    """One step graph from a micro-batch's ``gradients`` graph (x, y, scale, param.* -> loss, grads) and the
    ``apply`` graph (lr, state, ``task.loss``, ``sum.<grad>``... -> the step's outputs)."""
    if micro_batch < 1:
        raise ValueError("micro_batch must be >= 1")
    grad_graph, apply_graph = gradients.graph, apply.graph
    grad_inputs = [i.name for i in grad_graph.input]
    if grad_inputs[:3] != [g.X, g.Y, "scale"]:
        raise ValueError(f"the gradient graph's inputs start with {grad_inputs[:3]}, not x, y, scale")
    grad_outputs = [o.name for o in grad_graph.output]
    sums = {SUMMED + name: name for name in grad_outputs[1:]}
    apply_inputs = {i.name: i for i in apply_graph.input}
    # Without a FedProx term the apply graph passes the loss through, and the exporter names that input ``loss``.
    task = TASK_LOSS if TASK_LOSS in apply_inputs else g.LOSS
    missing = [n for n in (task, *sums) if n not in apply_inputs]
    if missing:
        raise ValueError(f"the apply graph lacks inputs {missing}")
    outer = set(grad_inputs[3:])  # the parameters, read by the loop body from the enclosing graph

    # The loop body: slice x and y, run the gradient graph on the slice, add into the running sums.
    i, cond, loss_in = _BODY + "i", _BODY + "cond", _BODY + "loss.in"
    acc_in = {s: _BODY + s + ".in" for s in sums}
    acc_out = {s: _BODY + s + ".out" for s in sums}
    body_nodes = [
        helper.make_node("Mul", [i, _BODY + "size"], [_BODY + "start"]),
        helper.make_node("Add", [_BODY + "start", _BODY + "size"], [_BODY + "stop.max"]),
        helper.make_node("Min", [_BODY + "stop.max", _BODY + "n"], [_BODY + "stop"]),
        helper.make_node("Unsqueeze", [_BODY + "start", _BODY + "axis0"], [_BODY + "starts"]),
        helper.make_node("Unsqueeze", [_BODY + "stop", _BODY + "axis0"], [_BODY + "stops"]),
        helper.make_node("Slice", [g.X, _BODY + "starts", _BODY + "stops", _BODY + "axis0"], [_BODY + "x"]),
        helper.make_node("Slice", [g.Y, _BODY + "starts", _BODY + "stops", _BODY + "axis0"], [_BODY + "y"]),
        helper.make_node("Sub", [_BODY + "stop", _BODY + "start"], [_BODY + "count"]),
        helper.make_node("Cast", [_BODY + "count"], [_BODY + "count.f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [_BODY + "n"], [_BODY + "n.f"], to=TensorProto.FLOAT),
        helper.make_node("Div", [_BODY + "count.f", _BODY + "n.f"], [_BODY + "scale"]),
    ]
    renames = {g.X: _BODY + "x", g.Y: _BODY + "y", "scale": _BODY + "scale"}
    body_nodes += _renamed_nodes(grad_graph, _BODY + "g.", renames, outer)
    body_nodes.append(helper.make_node("Add", [loss_in, _BODY + "g." + grad_outputs[0]], [_BODY + "loss.out"]))
    for s, name in sums.items():
        body_nodes.append(helper.make_node("Add", [acc_in[s], _BODY + "g." + name], [acc_out[s]]))
    body_nodes.append(helper.make_node("Identity", [cond], [_BODY + "cond.out"]))

    def value(name: str, like: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(like)
        copy.name = name
        return copy

    scalar_float = helper.make_tensor_value_info("", TensorProto.FLOAT, [])
    body = helper.make_graph(
        body_nodes, "micro_batch",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         value(loss_in, scalar_float), *(helper.make_tensor_value_info(acc_in[s], TensorProto.FLOAT, None) for s in sums)],
        [helper.make_tensor_value_info(_BODY + "cond.out", TensorProto.BOOL, []), value(_BODY + "loss.out", scalar_float),
         *(helper.make_tensor_value_info(acc_out[s], TensorProto.FLOAT, None) for s in sums)],
        initializer=_renamed_initializers(grad_graph, _BODY + "g."))

    # The enclosing graph: the batch size, the trip count, zeroed sums, the loop, then the apply graph.
    main_nodes = [
        helper.make_node("Shape", [g.X], [_BODY + "n.1"], start=0, end=1),
        helper.make_node("Squeeze", [_BODY + "n.1"], [_BODY + "n"]),
        helper.make_node("Add", [_BODY + "n", _BODY + "size.minus.1"], [_BODY + "n.up"]),
        helper.make_node("Div", [_BODY + "n.up", _BODY + "size"], [_BODY + "trips"]),
    ]
    initializers = [_int64(_BODY + "size", micro_batch), _int64(_BODY + "size.minus.1", micro_batch - 1),
                    _int64(_BODY + "axis0", [0]), helper.make_tensor(_BODY + "true", TensorProto.BOOL, [], [True]),
                    helper.make_tensor(_BODY + "loss.0", TensorProto.FLOAT, [], [0.0])]
    main_nodes.append(helper.make_node(
        "Loop", [_BODY + "trips", _BODY + "true", _BODY + "loss.0", *(_BODY + "loss.0" for _ in sums)],
        [task, *sums], body=body, name="micro_batches"))
    keep = set(apply_inputs) | {o.name for o in apply_graph.output}
    main_nodes += _renamed_nodes(apply_graph, _APPLY, {}, keep)
    initializers += _renamed_initializers(apply_graph, _APPLY)

    x_y = [i for i in grad_graph.input if i.name in (g.X, g.Y)]
    state = [i for i in apply_graph.input if i.name != task and i.name not in sums]
    graph = helper.make_graph(main_nodes, "fedge_micro_batched_step", [*x_y, *state], list(apply_graph.output),
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=list(gradients.opset_import), producer_name="fedge")
    model.ir_version = gradients.ir_version
    onnx.checker.check_model(model)
    return model
