"""Device training backends (portable, ort-training; torch hidden) vs PyTorch eager: steps/s, peak RSS, import time.

Each measurement runs in its own fresh subprocess so that peak RSS belongs to
that runtime alone. The agent processes make torch, onnx and sdk unimportable
(and check torch never loaded), as on a device. Runs alternate (ort-training,
portable, torch, ...) and the median of the repeats is reported, since the
machines are noisy; the headline figures are ratios within one run.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

RUNTIMES = ("ort-training", "portable", "torch")

_COMMON = """
import json, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.normal(size=[cfg["batch"], *cfg["input_shape"]]).astype(np.float32)
y = rng.integers(0, cfg["classes"], cfg["batch"]).astype(np.int64)
def peak_rss_mb():
    with open("/proc/self/status") as fh:  # VmHWM, not ru_maxrss (which survives exec)
        return next(int(l.split()[1]) / 1024 for l in fh if l.startswith("VmHWM:"))
def report(steps, seconds, t_import, version):
    print(json.dumps({"steps_per_s": steps / seconds, "peak_rss_mb": peak_rss_mb(), "import_s": t_import,
                      "torch_loaded": "torch" in sys.modules, "version": version}))
def timed(step):
    for _ in range(cfg["warmup"]):
        step()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    return time.perf_counter() - t0
"""

AGENT_CHILD = textwrap.dedent(
    """
    import sys, time
    from device_agent.import_guard import ModuleBlocker
    sys.meta_path.insert(0, ModuleBlocker(("torch", "onnx", "sdk")))
    t0 = time.perf_counter()
    from device_agent.bundle.archive import load_bundle
    from device_agent.bundle.manifest import ArtifactSetName
    from device_agent.keys import load_verify_key
    from device_agent.training_backends import open_backend
    from device_agent.training_backends.runtime import onnxruntime_module
    ort = onnxruntime_module()
    t_import = time.perf_counter() - t0
    """
) + _COMMON + textwrap.dedent(
    """
    bundle = load_bundle(cfg["bundle"], load_verify_key(cfg["pub"]))
    backend = open_backend(cfg["runtime"], bundle, threads=cfg["threads"])
    seconds = timed(lambda: backend.train_step(ArtifactSetName.JOINT, x, y))
    report(cfg["steps"], seconds, t_import, "onnxruntime " + ort.__version__)
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
    report(cfg["steps"], timed(step), t_import, "torch " + torch.__version__)
    """
)


@dataclass(frozen=True, kw_only=True)
class BenchModel:
    """A model to benchmark: factory name in sdk.models, its kwargs, input shape, classes and timed steps."""

    name: str
    factory: str
    kwargs: dict[str, object]
    input_shape: tuple[int, ...]
    classes: int
    steps: int


@dataclass(frozen=True, kw_only=True)
class RuntimeFigures:
    """Medians for one runtime on one model."""

    steps_per_s: float
    peak_rss_mb: float
    import_s: float
    version: str


@dataclass(frozen=True, kw_only=True)
class TrainBenchRow:
    """One model: each runtime's medians and the ratios that are the headline."""

    model: str
    parameters: int
    batch: int
    repeats: int
    runtimes: dict[str, RuntimeFigures]
    portable_vs_ort_training: float
    portable_vs_torch: float
    ort_training_vs_torch: float
    torch_rss_over_portable: float


DEFAULT_MODELS = (
    BenchModel(name="mlp-20-64-32-4", factory="PersonalizedMLP", kwargs={"in_features": 20, "hidden": [64, 32], "num_classes": 4},
               input_shape=(20,), classes=4, steps=3000),
    BenchModel(name="cnn1d-6x100-7", factory="PersonalizedCNN1D", kwargs={"in_channels": 6, "num_classes": 7},
               input_shape=(6, 100), classes=7, steps=300),
    BenchModel(name="cnn2d-1x28x28-10", factory="PersonalizedCNN2D", kwargs={"in_channels": 1, "num_classes": 10},
               input_shape=(1, 28, 28), classes=10, steps=60),
)


def _run_child(code: str, cfg: dict[str, object]) -> dict[str, object]:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child ({cfg['runtime']}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _build(model: BenchModel, work: Path, key: Ed25519PrivateKey) -> Path:
    import torch

    import sdk.models as zoo
    from device_agent.bundle.archive import install_bundle
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
    install_bundle(path, key.public_key(), work / model.name)
    return work / model.name


def _parameters(model: BenchModel) -> int:
    import sdk.models as zoo

    return int(sum(p.numel() for p in getattr(zoo, model.factory)(**model.kwargs).parameters()))


def run_train_bench(
    *, models: tuple[BenchModel, ...] = DEFAULT_MODELS, batch: int = 32, threads: int = 2, repeats: int = 3,
    step_scale: float = 1.0, progress: Callable[[int], object] | None = None,
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
            base = {"bundle": str(bundle_dir), "pub": str(work / "fleet.pub"), "batch": batch, "input_shape": list(model.input_shape),
                    "classes": model.classes, "threads": threads, "warmup": max(5, steps // 10), "steps": steps,
                    "factory": model.factory, "kwargs": model.kwargs}
            runs: dict[str, list[dict[str, object]]] = {r: [] for r in RUNTIMES}
            for _ in range(repeats):
                for runtime in RUNTIMES:
                    code = TORCH_CHILD if runtime == "torch" else AGENT_CHILD
                    runs[runtime].append(_run_child(code, {**base, "runtime": runtime}))
                if progress is not None:
                    progress(1)
            if any(r["torch_loaded"] for name in ("ort-training", "portable") for r in runs[name]):
                raise RuntimeError("a device-agent benchmark process loaded torch; its RSS figure would be meaningless")
            figures = {name: RuntimeFigures(
                steps_per_s=statistics.median(float(r["steps_per_s"]) for r in rs),  # type: ignore[arg-type]
                peak_rss_mb=statistics.median(float(r["peak_rss_mb"]) for r in rs),  # type: ignore[arg-type]
                import_s=statistics.median(float(r["import_s"]) for r in rs),  # type: ignore[arg-type]
                version=str(rs[0]["version"])) for name, rs in runs.items()}
            sps = {n: f.steps_per_s for n, f in figures.items()}
            rows.append(TrainBenchRow(
                model=model.name, parameters=_parameters(model), batch=batch, repeats=repeats, runtimes=figures,
                portable_vs_ort_training=sps["portable"] / sps["ort-training"], portable_vs_torch=sps["portable"] / sps["torch"],
                ort_training_vs_torch=sps["ort-training"] / sps["torch"],
                torch_rss_over_portable=figures["torch"].peak_rss_mb / figures["portable"].peak_rss_mb,
            ))
    return rows


def format_table(rows: list[TrainBenchRow]) -> str:
    """A plain-text table: steps/s, peak RSS and import time per runtime, then the ratios."""
    head = (f"{'model':18s} {'params':>7s} | {'steps/s  portable':>17s} {'ort-train':>9s} {'torch':>7s} | "
            f"{'RSS MB portable':>15s} {'ort-train':>9s} {'torch':>6s} | {'import s  port.':>15s} {'torch':>6s} | "
            f"{'port/ort':>8s} {'port/torch':>10s} {'RSS torch/port':>14s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        f = r.runtimes
        lines.append(
            f"{r.model:18s} {r.parameters:7d} | {f['portable'].steps_per_s:17.0f} {f['ort-training'].steps_per_s:9.0f} "
            f"{f['torch'].steps_per_s:7.0f} | {f['portable'].peak_rss_mb:15.0f} {f['ort-training'].peak_rss_mb:9.0f} "
            f"{f['torch'].peak_rss_mb:6.0f} | {f['portable'].import_s:15.2f} {f['torch'].import_s:6.2f} | "
            f"{r.portable_vs_ort_training:7.2f}x {r.portable_vs_torch:9.2f}x {r.torch_rss_over_portable:13.2f}x")
    return "\n".join(lines)


def write_json(rows: list[TrainBenchRow], path: Path, *, threads: int) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "train", "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": threads,
                                             "platform": platform.platform()}, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))


def write_png(rows: list[TrainBenchRow], path: Path) -> None:
    """Two bar charts: steps/s relative to PyTorch eager (log scale), and peak RSS, per model and runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for i, runtime in enumerate(RUNTIMES):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        speed.bar(xs, [r.runtimes[runtime].steps_per_s / r.runtimes["torch"].steps_per_s for r in rows], width, label=runtime)
        memory.bar(xs, [r.runtimes[runtime].peak_rss_mb for r in rows], width, label=runtime)
    for ax, title in ((speed, "training steps/s relative to PyTorch eager"), (memory, "peak RSS (MB)")):
        ax.set_xticks(range(len(rows)), [r.model for r in rows], fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
