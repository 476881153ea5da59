"""Device training backends (portable, ort-training; torch hidden) vs PyTorch eager: steps/s, GFLOP/s, peak RSS, import time.

Each measurement runs in its own fresh subprocess so that peak RSS belongs to
that runtime alone. The agent processes make torch, onnx and sdk unimportable
(and check torch never loaded), as on a device, and import what the device's
daemon (``fedge-agent run``) holds when it trains: its CLI and daemon stack
(MQTT, TLS, release metadata), the bundle verification (cryptography), onnxruntime. Runs alternate (SGEMM peak,
ort-training, portable, torch, ...) and the median of the repeats is reported,
since the machines are noisy; the headline figures are ratios within one run.

Arithmetic efficiency (``train_flops``): each run times its steps in ten
windows; GFLOP/s is the step's useful FLOPs times the best window's steps/s,
and % of peak divides it by the best SGEMM window measured in the same round
at the same thread count. Best against best, so that other jobs on a shared
machine stretch neither side of the ratio. The same figures are also given
per second of the process's own CPU time (``time.process_time``, against the
peak's, likewise): a time slice another job takes counts in neither, which
keeps the one-thread efficiency meaningful on a loaded machine (shared caches
and memory bandwidth still cost; with several threads it is per core-second).
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

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

if TYPE_CHECKING:
    import torch

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
def report(timing, t_import, version):
    seconds, steps, best_window, best_cpu_window = timing
    print(json.dumps({"steps_per_s": steps / seconds, "best_window_steps_per_s": best_window,
                      "best_window_steps_per_cpu_s": best_cpu_window, "peak_rss_mb": peak_rss_mb(),
                      "import_s": t_import, "torch_loaded": "torch" in sys.modules, "version": version}))
def timed(step):
    for _ in range(cfg["warmup"]):
        step()
    windows, cpu_windows = [], []
    per_window = max(1, cfg["steps"] // 10)
    for _ in range(cfg["steps"] // per_window):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(per_window):
            step()
        windows.append(time.perf_counter() - t0)
        cpu_windows.append(time.process_time() - c0)
    return sum(windows), per_window * len(windows), per_window / min(windows), per_window / max(min(cpu_windows), 1e-9)
"""

AGENT_CHILD = textwrap.dedent(
    """
    import sys, time
    from device_agent.import_guard import ModuleBlocker
    sys.meta_path.insert(0, ModuleBlocker(("torch", "onnx", "sdk")))
    t0 = time.perf_counter()
    # What the device's daemon (`fedge-agent run`, the firmware's service) holds when it trains: the CLI and the
    # daemon's stack (MQTT, TLS, release metadata) besides the bundle verification (cryptography) and onnxruntime.
    import device_agent.cli, device_agent.daemon.bootstrap  # noqa: F401
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
    report(timed(lambda: backend.train_step(ArtifactSetName.JOINT, x, y)), t_import, "onnxruntime " + ort.__version__)
    """
)

TORCH_CHILD = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    # The same non-training stack as the agent processes (CLI, MQTT, TLS, release metadata, cryptography; no
    # onnxruntime): a device training with PyTorch would hold it too, so peak RSS compares the runtimes alone.
    import device_agent.cli, device_agent.daemon.bootstrap  # noqa: F401
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
    report(timed(step), t_import, "torch " + torch.__version__)
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
    #: The portable bundle's micro_batch (0: whole batch, the default build; see TrainingSpec.micro_batch).
    micro_batch: int = 0


@dataclass(frozen=True, kw_only=True)
class RuntimeFigures:
    """One runtime on one model: medians over the repeats, and the arithmetic rate of its best timing window."""

    steps_per_s: float
    peak_rss_mb: float
    import_s: float
    version: str
    gflops: float
    percent_of_peak: float
    #: The same per second of this process's CPU time, against the peak's: time slices other jobs take dilute neither.
    gflops_per_cpu_s: float
    percent_of_peak_cpu: float


@dataclass(frozen=True, kw_only=True)
class TrainBenchRow:
    """One model: each runtime's medians and the ratios that are the headline."""

    model: str
    parameters: int
    batch: int
    repeats: int
    threads: int
    mflop_per_step: float
    sgemm_peak_gflops: float
    sgemm_peak_gflops_per_cpu_s: float
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
    # Not the default build: the same 2D-CNN with `fedge bundle build --micro-batch 8` (ort-training and torch unchanged).
    BenchModel(name="cnn2d-28x28-micro8", factory="PersonalizedCNN2D", kwargs={"in_channels": 1, "num_classes": 10},
               input_shape=(1, 28, 28), classes=10, steps=60, micro_batch=8),
)


def _run_child(code: str, cfg: dict[str, object]) -> dict[str, object]:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child ({cfg.get('runtime', 'sgemm peak')}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _build(model: BenchModel, work: Path, key: Ed25519PrivateKey, micro_batch: int = 0) -> Path:
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
                 spec=TrainingSpec(mode=TrainingMode.FEDAVG, optimizer=OptimizerKind.ADAMW, learning_rate=1e-3,
                                  micro_batch=micro_batch), signing_key=key,
                 out_path=path, model_name=model.name)
    install_bundle(path, key.public_key(), work / model.name)
    return work / model.name


def _network(model: BenchModel) -> torch.nn.Module:
    import sdk.models as zoo

    return getattr(zoo, model.factory)(**model.kwargs)  # type: ignore[no-any-return]


def _figures(runs: list[dict[str, object]], flops: int, peak: float, peak_cpu: float) -> RuntimeFigures:
    best = max(float(r["best_window_steps_per_s"]) for r in runs)  # type: ignore[arg-type]
    gflops = best * flops / 1e9
    gflops_cpu = max(float(r["best_window_steps_per_cpu_s"]) for r in runs) * flops / 1e9  # type: ignore[arg-type]
    return RuntimeFigures(
        steps_per_s=statistics.median(float(r["steps_per_s"]) for r in runs),  # type: ignore[arg-type]
        peak_rss_mb=statistics.median(float(r["peak_rss_mb"]) for r in runs),  # type: ignore[arg-type]
        import_s=statistics.median(float(r["import_s"]) for r in runs),  # type: ignore[arg-type]
        version=str(runs[0]["version"]), gflops=gflops, percent_of_peak=100 * gflops / peak,
        gflops_per_cpu_s=gflops_cpu, percent_of_peak_cpu=100 * gflops_cpu / peak_cpu)


def run_train_bench(
    *, models: tuple[BenchModel, ...] = DEFAULT_MODELS, batch: int = 32, threads: int = 2, repeats: int = 3,
    step_scale: float = 1.0, progress: Callable[[int], object] | None = None,
) -> list[TrainBenchRow]:
    """Measure every model ``repeats`` times per runtime (and the SGEMM peak), alternating, and return median rows."""
    from device_agent.keys import save_public_key
    from sdk.bench.train_flops import PEAK_CHILD, training_flops, write_matmul_models

    rows = []
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        save_public_key(key.public_key(), work / "fleet.pub")
        peak_cfg = {"threads": threads, "windows": 20, "models": write_matmul_models(work)}
        for model in models:
            bundle_dir = _build(model, work, key, model.micro_batch)
            steps = max(20, int(model.steps * step_scale))
            base = {"bundle": str(bundle_dir), "pub": str(work / "fleet.pub"), "batch": batch, "input_shape": list(model.input_shape),
                    "classes": model.classes, "threads": threads, "warmup": max(5, steps // 10), "steps": steps,
                    "factory": model.factory, "kwargs": model.kwargs}
            runs: dict[str, list[dict[str, object]]] = {r: [] for r in RUNTIMES}
            peaks, cpu_peaks = [], []
            for _ in range(repeats):
                peak_run = _run_child(PEAK_CHILD, peak_cfg)
                peaks.append(float(peak_run["gflops"]))  # type: ignore[arg-type]
                cpu_peaks.append(float(peak_run["gflops_per_cpu_s"]))  # type: ignore[arg-type]
                for runtime in RUNTIMES:
                    code = TORCH_CHILD if runtime == "torch" else AGENT_CHILD
                    runs[runtime].append(_run_child(code, {**base, "runtime": runtime}))
                if progress is not None:
                    progress(1)
            if any(r["torch_loaded"] for name in ("ort-training", "portable") for r in runs[name]):
                raise RuntimeError("a device-agent benchmark process loaded torch; its RSS figure would be meaningless")
            net = _network(model)
            flops = training_flops(net, model.input_shape, batch)
            peak, peak_cpu = max(peaks), max(cpu_peaks)
            figures = {name: _figures(rs, flops, peak, peak_cpu) for name, rs in runs.items()}
            sps = {n: f.steps_per_s for n, f in figures.items()}
            rows.append(TrainBenchRow(
                model=model.name, parameters=int(sum(p.numel() for p in net.parameters())), batch=batch, repeats=repeats,
                threads=threads, mflop_per_step=flops / 1e6, sgemm_peak_gflops=peak, sgemm_peak_gflops_per_cpu_s=peak_cpu, runtimes=figures,
                portable_vs_ort_training=sps["portable"] / sps["ort-training"], portable_vs_torch=sps["portable"] / sps["torch"],
                ort_training_vs_torch=sps["ort-training"] / sps["torch"],
                torch_rss_over_portable=figures["torch"].peak_rss_mb / figures["portable"].peak_rss_mb,
            ))
    return rows


def format_table(rows: list[TrainBenchRow]) -> str:
    """Plain-text tables: speed (steps/s, GFLOP/s, % of SGEMM peak) and footprint (peak RSS, import time), then the ratios."""
    if not rows:
        return "(no models)"
    order = ("portable", "ort-training", "torch")
    head = (f"{'model':18s} {'params':>7s} {'MFLOP':>6s} | {'steps/s  portable':>17s} {'ort-train':>9s} {'torch':>7s} | "
            f"{'GFLOP/s portable':>16s} {'ort-train':>9s} {'torch':>6s} | {'% peak portable':>15s} {'ort-train':>9s} {'torch':>6s}")
    lines = [f"SGEMM peak (onnxruntime MatMul, {rows[0].threads} thread(s), best window, measured with each model): "
             + " / ".join(f"{r.sgemm_peak_gflops:.0f}" for r in rows) + " GFLOP/s", head, "-" * len(head)]
    for r in rows:
        f = [r.runtimes[n] for n in order]
        lines.append(f"{r.model:18s} {r.parameters:7d} {r.mflop_per_step:6.1f} | {f[0].steps_per_s:17.0f} {f[1].steps_per_s:9.0f} "
                     f"{f[2].steps_per_s:7.0f} | {f[0].gflops:16.1f} {f[1].gflops:9.1f} {f[2].gflops:6.1f} | "
                     f"{f[0].percent_of_peak:14.0f}% {f[1].percent_of_peak:8.0f}% {f[2].percent_of_peak:5.0f}%")
    lines += ["", "Per second of the process's own CPU time (other jobs' time slices dilute neither side; peak "
              + " / ".join(f"{r.sgemm_peak_gflops_per_cpu_s:.0f}" for r in rows) + " GFLOP/s per CPU-second):"]
    for r in rows:
        f = [r.runtimes[n] for n in order]
        lines.append(f"{r.model:18s} GFLOP/s per CPU-s {f[0].gflops_per_cpu_s:6.1f} {f[1].gflops_per_cpu_s:9.1f} "
                     f"{f[2].gflops_per_cpu_s:6.1f} | % peak {f[0].percent_of_peak_cpu:4.0f}% {f[1].percent_of_peak_cpu:8.0f}% "
                     f"{f[2].percent_of_peak_cpu:5.0f}%")
    head2 = (f"{'model':18s} | {'RSS MB portable':>15s} {'ort-train':>9s} {'torch':>6s} | {'import s  port.':>15s} {'torch':>6s} | "
             f"{'port/ort':>8s} {'port/torch':>10s} {'RSS torch/port':>14s}")
    lines += ["", head2, "-" * len(head2)]
    for r in rows:
        f = [r.runtimes[n] for n in order]
        lines.append(f"{r.model:18s} | {f[0].peak_rss_mb:15.0f} {f[1].peak_rss_mb:9.0f} {f[2].peak_rss_mb:6.0f} | "
                     f"{f[0].import_s:15.2f} {f[2].import_s:6.2f} | {r.portable_vs_ort_training:7.2f}x {r.portable_vs_torch:9.2f}x "
                     f"{r.torch_rss_over_portable:13.2f}x")
    return "\n".join(lines)


def write_json(rows: list[TrainBenchRow], path: Path, *, threads: int) -> None:
    """Write rows plus machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "train", "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": threads,
                                             "platform": platform.platform()}, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2))


def write_png(rows: list[TrainBenchRow], path: Path) -> None:
    """Three bar charts per model and runtime: steps/s relative to PyTorch eager (log), % of the SGEMM peak, peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, efficiency, memory) = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.27
    for i, runtime in enumerate(RUNTIMES):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        speed.bar(xs, [r.runtimes[runtime].steps_per_s / r.runtimes["torch"].steps_per_s for r in rows], width, label=runtime)
        efficiency.bar(xs, [r.runtimes[runtime].percent_of_peak for r in rows], width, label=runtime)
        memory.bar(xs, [r.runtimes[runtime].peak_rss_mb for r in rows], width, label=runtime)
    threads = rows[0].threads if rows else 0
    for ax, title in ((speed, "training steps/s relative to PyTorch eager"),
                      (efficiency, f"% of SGEMM peak ({threads} thread(s))"), (memory, "peak RSS (MB)")):
        ax.set_xticks(range(len(rows)), [r.model for r in rows], fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_yscale("log")
    efficiency.axhline(60, color="grey", linewidth=0.8, linestyle="--")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
