"""One training step on freshly generated ORT-training artifacts, in a child process.

onnxruntime-training 1.19 does not only raise on graphs it cannot train: on
some (average pooling's gradient) it dies with SIGFPE. The check therefore runs
in its own process, so such a model is refused at build time with one line
instead of killing the build here, or the agent on a device later.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from device_agent.bundle.manifest import ArtifactSet, LossKind

# The child imports onnxruntime the way the device agent does (torch and onnxruntime.training
# hidden): a plain ``import onnxruntime`` of the training wheel probes ortmodule and so imports
# torch and onnx, several seconds per build for nothing.
_CHILD = """
import json, sys
import numpy as np
from device_agent.training_backends.runtime import onnxruntime_module
onnxruntime_module()
from onnxruntime.capi import _pybind_state as capi
from onnxruntime.capi.onnxruntime_inference_collection import OrtValue
cfg = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.normal(size=[3, *cfg["input_shape"]]).astype(np.float32)
if cfg["loss"] == "cross_entropy":
    y = np.zeros((3,), dtype=np.int64)
else:
    y = np.zeros([3, *cfg["output_shape"][1:]], dtype=np.float32)
device = capi.OrtDevice(capi.OrtDevice.cpu(), capi.OrtDevice.default_memory(), 0)
options = capi.SessionOptions()
options.log_severity_level = 3
for s in cfg["sets"]:
    state = capi.load_checkpoint(s["checkpoint"])
    module = capi.Module(s["training_model"], state, s["eval_model"], device, options)
    optimizer = capi.Optimizer(s["optimizer_model"], state, device, options)
    inputs, fetches = capi.OrtValueVector(), capi.OrtValueVector()
    values = [OrtValue.ortvalue_from_numpy(a) for a in (x, y)]
    for v in values:
        inputs.push_back(v._ortvalue)
    module.train_step_with_ort_values(inputs, fetches)
    optimizer.optimizer_step()
    if not np.isfinite(fetches[0].numpy()).all():
        sys.exit(f"artifact set {s['name']}: the loss of one training step is not finite")
print("ok")
"""


class OrtSmokeTestError(RuntimeError):
    """onnxruntime-training failed (or crashed) training generated artifacts for one step."""


def smoke_test_ort_sets(sets: Sequence[ArtifactSet], directory: Path, *, input_shape: tuple[int, ...], loss: LossKind,
                        output_shape: tuple[int, ...]) -> None:
    """Train every set one step on random inputs in a child process; OrtSmokeTestError (one line) if that fails."""
    cfg = {"input_shape": list(input_shape), "loss": loss.value, "output_shape": list(output_shape),
           "sets": [{"name": s.name.value, "checkpoint": os.fspath(directory / s.checkpoint),
                     "training_model": os.fspath(directory / s.training_model), "eval_model": os.fspath(directory / s.eval_model),
                     "optimizer_model": os.fspath(directory / s.optimizer_model)} for s in sets]}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=600,
                          check=False)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise OrtSmokeTestError(f"onnxruntime-training crashed ({name}) training one step of these artifacts")
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise OrtSmokeTestError(f"onnxruntime-training cannot train these artifacts: {lines[-1] if lines else proc.returncode}")
