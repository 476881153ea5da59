"""Where a device process's memory goes: ``VmRSS`` / ``VmHWM`` after each phase of training one bundle.

``python -m sdk.bench.train_phases [model] [--batch N]`` (default the 2D-CNN, batch 32)
builds the model's bundle as ``fedge bench train`` does and runs one fresh device
process (torch, onnx and sdk unimportable; the daemon's imports, as in the
benchmark's device processes) that prints its ``VmRSS`` and ``VmHWM``, and how
the resident set splits into anonymous memory (heap, arenas, buffers: ``RssAnon``)
and file-backed pages (the libraries' code and data: ``RssFile``), after: the
imports, verifying and loading the bundle, opening the backend, opening the step
session, the first step, and five steps. One thread, portable backend.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.bench.train_bench import DEFAULT_MODELS, _build, _run_child

PHASES_CHILD = textwrap.dedent(
    """
    import json, sys
    from device_agent.import_guard import ModuleBlocker
    sys.meta_path.insert(0, ModuleBlocker(("torch", "onnx", "sdk")))
    cfg = json.loads(sys.argv[1])
    phases = []
    def mark(name):
        keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(keys))
        phases.append({"phase": name, **{k: int(v.split()[0]) / 1024 for k, v in status.items()}})
    import numpy as np
    import device_agent.cli, device_agent.daemon.bootstrap  # noqa: F401
    from device_agent.bundle.archive import load_bundle
    from device_agent.bundle.manifest import ArtifactSetName
    from device_agent.keys import load_verify_key
    from device_agent.training_backends import open_backend
    from device_agent.training_backends.runtime import onnxruntime_module
    onnxruntime_module()
    mark("imports")
    bundle = load_bundle(cfg["bundle"], load_verify_key(cfg["pub"]))
    mark("bundle verified and loaded")
    backend = open_backend("portable", bundle, threads=1)
    mark("backend open (parameters)")
    backend._activate(ArtifactSetName.JOINT)  # what the first train_step does first: open the step session
    mark("step session open (moments)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((cfg["batch"], *cfg["input_shape"])).astype(np.float32)
    y = rng.integers(0, cfg["classes"], cfg["batch"]).astype(np.int64)
    backend.train_step(ArtifactSetName.JOINT, x, y)
    mark("first step")
    for _ in range(4):
        backend.train_step(ArtifactSetName.JOINT, x, y)
    mark("five steps")
    print(json.dumps({"phases": phases, "tuf_loaded": "tuf" in sys.modules}))
    """
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="cnn2d-1x28x28-10", choices=[m.name for m in DEFAULT_MODELS])
    parser.add_argument("--batch", type=int, default=32, help="examples per step (default 32, as fedge bench train)")
    args = parser.parse_args(argv)
    model = next(m for m in DEFAULT_MODELS if m.name == args.model)
    from device_agent.keys import save_public_key

    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="fedge-phases-") as tmp:
        work = Path(tmp)
        save_public_key(key.public_key(), work / "fleet.pub")
        bundle_dir = _build(model, work, key, model.micro_batch)
        result = _run_child(PHASES_CHILD, {"bundle": str(bundle_dir), "pub": str(work / "fleet.pub"), "batch": args.batch,
                                           "input_shape": list(model.input_shape), "classes": model.classes, "threads": 1})
    print(f"{model.name}: device process, portable backend, batch {args.batch}, one thread "
          f"(python-tuf loaded: {result['tuf_loaded']})")
    previous = 0.0
    for p in result["phases"]:  # type: ignore[union-attr]
        print(f"  {p['phase']:30s} VmRSS {p['VmRSS']:6.1f} MB ({p['VmRSS'] - previous:+5.1f})   VmHWM {p['VmHWM']:6.1f} MB   "
              f"anonymous {p['RssAnon']:5.1f}  file-backed {p['RssFile']:5.1f}")
        previous = p["VmRSS"]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
