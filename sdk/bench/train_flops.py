"""The useful arithmetic of one training step, counted from the layer shapes, and the SGEMM peak it is held to.

Counted: the multiply-adds of every ``Conv1d``, ``Conv2d`` and ``Linear``
(2 FLOPs each), forward, weight gradient (as many as the forward) and input
gradient (as many again, except for a layer whose input needs no gradient:
the first one, fed by the data). Not counted: bias adds, activations,
pooling, the loss and the optimizer, which are memory-bound work a faster
kernel cannot turn into FLOPs. This is the usual "model FLOPs" convention
(Kaplan et al. 2020; Chowdhery et al. 2022's MFU), so GFLOP/s divided by the
machine's SGEMM peak says how much of the core the training step keeps busy.

The peak is measured, not taken from a data sheet: one onnxruntime MatMul
(the same MLAS kernels the device runs) of square float32 matrices, best of
several short windows, in its own process.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
from torch import nn

#: Matrix sizes tried for the peak (the best one counts): large enough to be compute-bound, small enough for L2.
PEAK_SIZES = (256, 384, 512)


def training_flops(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> int:
    """FLOPs of one training step (forward + backward) of ``model`` on a batch of ``batch`` examples."""
    per_example = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal per_example
        passes = 3 if inputs[0].requires_grad else 2  # forward, weight gradient, input gradient
        per_example += 2 * _macs_per_output(module) * output.numel() * passes

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    try:
        with torch.enable_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for handle in handles:
            handle.remove()
    return per_example * batch


def _macs_per_output(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (module.in_channels // module.groups) * math.prod(module.kernel_size)
    raise TypeError(f"no FLOP count for {type(module).__name__}")


def write_matmul_models(work: Path) -> dict[int, str]:
    """One ``a @ b`` ONNX model per size in PEAK_SIZES, written under ``work``; size -> path."""
    import onnx
    from onnx import TensorProto, helper

    paths = {}
    for n in PEAK_SIZES:
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
                                  [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        path = work / f"sgemm-{n}.onnx"
        onnx.save(model, str(path))
        paths[n] = str(path)
    return paths


#: The peak child: {"gflops": best GFLOP/s over sizes and windows, "gflops_per_cpu_s": the same per second of its CPU
#: time} on stdout. Its config: threads, models (size -> path).
PEAK_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import onnxruntime as ort
    cfg = json.loads(sys.argv[1])
    best = best_cpu = 0.0
    for size, path in cfg["models"].items():
        n = int(size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = cfg["threads"]
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        binding = session.io_binding()
        a, b = (ort.OrtValue.ortvalue_from_numpy(rng.random((n, n), dtype=np.float32)) for _ in range(2))
        c = ort.OrtValue.ortvalue_from_shape_and_type((n, n), np.float32)
        binding.bind_ortvalue_input("a", a)
        binding.bind_ortvalue_input("b", b)
        binding.bind_ortvalue_output("c", c)
        for _ in range(3):
            session.run_with_iobinding(binding)
        reps = max(1, int(2e7 / n ** 3))  # windows of ~10 ms
        for _ in range(cfg["windows"]):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                session.run_with_iobinding(binding)
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
            best_cpu = max(best_cpu, 2 * n ** 3 * reps / max(time.process_time() - c0, 1e-9) / 1e9)
    print(json.dumps({"gflops": best, "gflops_per_cpu_s": best_cpu, "version": ort.__version__}))
    """
)
