"""Device trainer (ORT, no torch) vs PyTorch eager: steps/s and peak RSS, side by side.

Each measurement runs in its own fresh subprocess so that peak RSS belongs to
that runtime alone; the ORT process hides torch from the import system so it
cannot be loaded even though it is installed on the host. Runs alternate
(ORT, torch, ORT, torch, ...) and the median of the repeats is reported, since
the machines are noisy; the headline figures are ratios within one run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_COMMON = """
import json, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.normal(size=[cfg["batch"], *cfg["input_shape"]]).astype(np.float32)
y = rng.integers(0, cfg["classes"], cfg["batch"]).astype(np.int64)
from sdk.bench.process_memory import status_mb
def report(steps, seconds, t_import):
    print(json.dumps({"steps_per_s": steps / seconds, "peak_rss_mb": status_mb("VmHWM"),
                      "import_s": t_import, "torch_loaded": "torch" in sys.modules}))
"""

ORT_CHILD = textwrap.dedent(
    """
    import sys, time
    from device_agent.import_guard import ModuleBlocker
    sys.meta_path.insert(0, ModuleBlocker(("torch", "onnx")))
    t0 = time.perf_counter()
    from device_agent.bundle.archive import load_bundle
    from device_agent.keys import load_verify_key
    from device_agent.bundle.manifest import ArtifactSetName
    from device_agent.training_backends import open_backend
    t_import = time.perf_counter() - t0
    """
) + _COMMON + textwrap.dedent(
    """
    bundle = load_bundle(cfg["bundle"], load_verify_key(cfg["pub"]))
    backend = open_backend("ort-training", bundle, threads=cfg["threads"])
    for _ in range(cfg["warmup"]):
        backend.train_step(ArtifactSetName.JOINT, x, y)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        backend.train_step(ArtifactSetName.JOINT, x, y)
    report(cfg["steps"], time.perf_counter() - t0, t_import)
    """
)

TORCH_CHILD = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    import torch
    import sdk.models as zoo
    t_import = time.perf_counter() - t0
    """
) + _COMMON + textwrap.dedent(
    """
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = getattr(zoo, cfg["factory"])(**cfg["kwargs"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
    for _ in range(cfg["warmup"]):
        step()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    report(cfg["steps"], time.perf_counter() - t0, t_import)
    """
)


@dataclass(frozen=True, kw_only=True)
class BenchModel:
    """A model to benchmark: factory name in sdk.models, its kwargs, input shape and classes."""

    name: str
    factory: str
    kwargs: dict[str, object]
    input_shape: tuple[int, ...]
    classes: int
    steps: int


@dataclass(frozen=True, kw_only=True)
class TrainBenchRow:
    """Median figures for one model: ORT vs torch and their ratios."""

    model: str
    parameters: int
    batch: int
    ort_steps_per_s: float
    torch_steps_per_s: float
    speedup: float
    ort_peak_rss_mb: float
    torch_peak_rss_mb: float
    rss_ratio: float
    ort_import_s: float
    torch_import_s: float
    repeats: int


DEFAULT_MODELS = (
    BenchModel(name="mlp-20-64-32-4", factory="PersonalizedMLP", kwargs={"in_features": 20, "hidden": [64, 32], "num_classes": 4},
               input_shape=(20,), classes=4, steps=3000),
    BenchModel(name="cnn1d-6x100-7", factory="PersonalizedCNN1D", kwargs={"in_channels": 6, "num_classes": 7},
               input_shape=(6, 100), classes=7, steps=300),
)


def _run_child(code: str, cfg: dict[str, object]) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build(model: BenchModel, work: Path, key: Ed25519PrivateKey) -> Path:
    import torch

    import sdk.models as zoo
    from device_agent.bundle.manifest import OptimizerKind, TrainingMode
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.model_spec import ParameterSplit

    torch.manual_seed(0)
    net = getattr(zoo, model.factory)(**model.kwargs)
    path = work / f"{model.name}.fedge"
    build_bundle(net, example_input=torch.zeros((2, *model.input_shape)), split=ParameterSplit(shared=("*",)),
                 spec=TrainingSpec(mode=TrainingMode.FEDAVG, optimizer=OptimizerKind.ADAMW, learning_rate=1e-3), signing_key=key,
                 out_path=path, model_name=model.name)
    from device_agent.bundle.archive import install_bundle

    install_bundle(path, key.public_key(), work / model.name)
    return work / model.name


def run_train_bench(
    *, models: tuple[BenchModel, ...] = DEFAULT_MODELS, batch: int = 32, threads: int = 2, repeats: int = 3,
    step_scale: float = 1.0, progress=None,  # type: ignore[no-untyped-def]
) -> list[TrainBenchRow]:
    """Measure every model ``repeats`` times per runtime, alternating, and return median rows."""
    from device_agent.keys import save_public_key

    rows = []
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        save_public_key(key.public_key(), work / "fleet.pub")
        for model in models:
            bundle_dir = _build(model, work, key)
            steps = max(20, int(model.steps * step_scale))
            cfg = {"bundle": str(bundle_dir), "pub": str(work / "fleet.pub"), "batch": batch, "input_shape": list(model.input_shape),
                   "classes": model.classes, "threads": threads, "warmup": max(5, steps // 10), "steps": steps,
                   "factory": model.factory, "kwargs": model.kwargs}
            ort_runs, torch_runs = [], []
            for _ in range(repeats):
                ort_runs.append(_run_child(ORT_CHILD, cfg))
                torch_runs.append(_run_child(TORCH_CHILD, cfg))
                if progress is not None:
                    progress(1)
            if any(r["torch_loaded"] for r in ort_runs):
                raise RuntimeError("the ORT benchmark process loaded torch; its RSS figure would be meaningless")
            med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
            import torch

            import sdk.models as zoo

            n_params = sum(p.numel() for p in getattr(zoo, model.factory)(**model.kwargs).parameters())
            ort_sps, torch_sps = med(ort_runs, "steps_per_s"), med(torch_runs, "steps_per_s")
            ort_rss, torch_rss = med(ort_runs, "peak_rss_mb"), med(torch_runs, "peak_rss_mb")
            rows.append(TrainBenchRow(
                model=model.name, parameters=int(n_params), batch=batch, ort_steps_per_s=ort_sps, torch_steps_per_s=torch_sps,
                speedup=ort_sps / torch_sps, ort_peak_rss_mb=ort_rss, torch_peak_rss_mb=torch_rss, rss_ratio=torch_rss / ort_rss,
                ort_import_s=med(ort_runs, "import_s"), torch_import_s=med(torch_runs, "import_s"), repeats=repeats,
            ))
            del torch
    return rows


def format_table(rows: list[TrainBenchRow]) -> str:
    """A plain-text table of the rows."""
    head = f"{'model':18s} {'params':>7s} {'ORT steps/s':>12s} {'torch steps/s':>14s} {'speedup':>8s} {'ORT RSS MB':>11s} {'torch RSS MB':>13s} {'RSS ratio':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.model:18s} {r.parameters:7d} {r.ort_steps_per_s:12.0f} {r.torch_steps_per_s:14.0f} {r.speedup:7.2f}x "
                     f"{r.ort_peak_rss_mb:11.0f} {r.torch_peak_rss_mb:13.0f} {r.rss_ratio:8.2f}x")
    return "\n".join(lines)


def write_json(rows: list[TrainBenchRow], path: Path, *, threads: int) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "train", "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": threads,
                                             "platform": platform.platform()}, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))
