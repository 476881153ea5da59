"""Where a portable training step spends its time: onnxruntime's per-node profile of the step graph.

``python -m sdk.bench.train_profile [--threads 1] [model ...]`` builds the
portable graphs of the ``fedge bench train`` models (AdamW, cross-entropy,
batch 32), runs the step graph with ``SessionOptions.enable_profiling`` and
prints, per model, the kernel time per op type and the GEMM nodes (MatMul,
Gemm and their fused forms) with their FLOPs and rate. The GEMM FLOPs are
read from the profiled shapes, so they check the analytic count of
``train_flops`` against the graph that actually runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdk.bench.train_bench import DEFAULT_MODELS, BenchModel

_GEMMS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})


@dataclass(frozen=True, kw_only=True)
class StepProfile:
    """Kernel time of one step (profiler's sum over nodes), per op type, and the GEMM nodes' share."""

    model: str
    kernel_ms: float
    wall_ms: float
    by_op_ms: dict[str, float]
    gemm_mflop: float
    gemm_ms: float

    @property
    def gemm_gflops(self) -> float:
        """The GEMM nodes' FLOPs over their own kernel time."""
        return self.gemm_mflop / self.gemm_ms if self.gemm_ms else 0.0


def gemm_flops(op: str, inputs: list[list[int]], output: list[int]) -> int:
    """FLOPs of one MatMul/Gemm node from its profiled shapes: ``2 * output size * K``.

    The first operand holds M and K in its last two axes, transposed or not, and
    the output's second-to-last axis is M, so K = (its last two axes) / M.
    """
    del op
    first = inputs[0]
    k = int(np.prod(first[-2:])) // output[-2] if len(first) >= 2 else first[0]
    return 2 * int(np.prod(output)) * k


def summarise(events: list[dict[str, object]], *, model: str, wall_ms: float) -> StepProfile:
    """Fold an onnxruntime profile (its JSON events) into per-step figures."""
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    by_op: collections.Counter[str] = collections.Counter()
    flops = gemm_us = 0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args: dict[str, object] = e["args"]  # type: ignore[assignment]
        op, dur = str(args["op_name"]), int(e["dur"])  # type: ignore[call-overload]
        by_op[op] += dur
        if op in _GEMMS:
            shapes = [list(s.values())[0] for s in args["input_type_shape"]]  # type: ignore[attr-defined]
            out = [list(s.values())[0] for s in args["output_type_shape"]][0]  # type: ignore[attr-defined]
            flops += gemm_flops(op, shapes, out)
            gemm_us += dur
    runs = max(runs, 1)
    return StepProfile(model=model, kernel_ms=sum(by_op.values()) / runs / 1e3, wall_ms=wall_ms,
                       by_op_ms={k: v / runs / 1e3 for k, v in by_op.most_common()},
                       gemm_mflop=flops / runs / 1e6, gemm_ms=gemm_us / runs / 1e3)


def profile_step(model: BenchModel, *, batch: int = 32, threads: int = 1, steps: int | None = None,
                 work: Path) -> StepProfile:
    """Build ``model``'s portable step graph under ``work`` and profile ``steps`` steps of it."""
    import onnxruntime
    import torch

    import sdk.models as zoo
    from device_agent.bundle.manifest import ArtifactSetName, LossKind, OptimizerKind
    from sdk.portable_graph.builder import PortablePlan, build_portable_graphs

    torch.manual_seed(0)
    net = getattr(zoo, model.factory)(**model.kwargs)
    names = tuple(n for n, _ in net.named_parameters())
    plan = PortablePlan(sets=((ArtifactSetName.JOINT, names),), shared=names, mu=0.0, loss=LossKind.CROSS_ENTROPY,
                        optimizer=OptimizerKind.ADAMW, learning_rate=1e-3)
    artifacts = build_portable_graphs(net, example_input=torch.zeros((2, *model.input_shape)), plan=plan, out_dir=work)
    params = dict(np.load(work / artifacts.initial_parameters))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "profile")
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(work / artifacts.sets[0].step_model), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        if i.name == "x":
            feeds[i.name] = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
        elif i.name == "y":
            feeds[i.name] = rng.integers(0, model.classes, batch).astype(np.int64)
        elif i.name == "lr":
            feeds[i.name] = np.array(1e-3, np.float32)
        elif i.name == "opt.step":
            feeds[i.name] = np.array(3, np.int64)
        elif i.name.startswith("param."):
            feeds[i.name] = params[i.name.removeprefix("param.")]
        else:  # AdamW moments
            feeds[i.name] = np.full(i.shape, 1e-4, np.float32)
    n = steps if steps is not None else max(5, model.steps // 5)
    session.run(None, feeds)  # warm-up (also profiled; summarise divides by the number of runs)
    t0 = time.perf_counter()
    for _ in range(n):
        session.run(None, feeds)
    wall_ms = (time.perf_counter() - t0) / n * 1e3
    events = json.loads(Path(session.end_profiling()).read_text())
    return summarise(events, model=model.name, wall_ms=wall_ms)


def format_profile(p: StepProfile, *, top: int = 14) -> str:
    """Op types by kernel time, then the GEMM summary."""
    lines = [f"{p.model}: kernel time {p.kernel_ms:.2f} ms/step (wall {p.wall_ms:.2f} ms, profiling on)"]
    for op, ms in list(p.by_op_ms.items())[:top]:
        lines.append(f"  {op:14s} {ms:8.3f} ms {100 * ms / p.kernel_ms:5.1f}%")
    lines.append(f"  GEMM nodes: {p.gemm_mflop:.1f} MFLOP in {p.gemm_ms:.3f} ms ({100 * p.gemm_ms / p.kernel_ms:.0f}% of the step)"
                 f" = {p.gemm_gflops:.1f} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: profile the named bench models (default: all)."""
    parser = argparse.ArgumentParser(prog="python -m sdk.bench.train_profile", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: every fedge bench train model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    known = {m.name: m for m in DEFAULT_MODELS}
    unknown = [m for m in args.models if m not in known]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; known: {', '.join(known)}")
    for name in args.models or list(known):
        with tempfile.TemporaryDirectory(prefix="fedge-profile-") as tmp:
            print(format_profile(profile_step(known[name], batch=args.batch, threads=args.threads, work=Path(tmp))))


if __name__ == "__main__":
    main()
