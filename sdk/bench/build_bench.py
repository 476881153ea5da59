"""How long a bundle's training artifacts take to build: the cheap export route vs torch.onnx's public one, side by side.

``python -m sdk.bench.build_bench [--repeat 1] [--out build_bench.json] [model ...]`` builds, per
model, the fedalt/AdamW artifacts of both kinds (portable + ORT-training), alternating the export
route of ``sdk.portable_graph.onnx_capture`` (ATen-IR capture, no re-trace) with the public route
it falls back to (two ``make_fx`` passes, ``torch.onnx.export`` with its own capture and
decomposition) in one process, and prints a table of seconds per build (best of ``--repeat``).
A model is a reference model's name or ``MODULE:CALLABLE@AxB?KEY=VALUE&...`` (loaded the way ``fedge bundle
build --model MODULE:CALLABLE --model-arg KEY=VALUE`` loads it, ``sdk.model_factory``; parameters named
``base.*``/``head.*``, one example's shape ``AxB``), e.g.
``tests.sdk.portable_graph.zoo:EveryLayerNet@2x8x8?avg_pool=False``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_REFERENCE = {  # the reference models of the test suite's bundles (tests/model_bundles.py)
    "mlp": ("PersonalizedMLP", {"in_features": 12, "hidden": (16,), "num_classes": 4}, (12,)),
    "cnn1d": ("PersonalizedCNN1D", {"in_channels": 3, "num_classes": 5, "width": 4}, (3, 20)),
    "cnn2d": ("PersonalizedCNN2D", {"in_channels": 1, "num_classes": 10, "hidden": 16}, (1, 28, 28)),
}
#: EveryLayerNet without its average pools: onnxruntime-training cannot train those, and both kinds are built.
DEFAULT_MODELS = ("mlp", "cnn1d", "cnn2d", "tests.sdk.portable_graph.zoo:EveryLayerNet@2x8x8?avg_pool=False")


@dataclass(frozen=True, kw_only=True)
class BuildTime:
    """Best seconds of one model's build (both kinds, fedalt, AdamW) per export route."""

    model: str
    cheap_s: float
    public_s: float

    @property
    def speedup(self) -> float:
        return self.public_s / self.cheap_s


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name in _REFERENCE:
        import sdk.models as zoo

        factory, kwargs, shape = _REFERENCE[name]
        return getattr(zoo, factory)(**kwargs), shape
    from sdk.model_factory import load_model

    target, _, rest = name.partition("@")
    dims, _, options = rest.partition("?")
    if ":" not in target or not dims:
        raise SystemExit(f"model {name!r}: expected a reference model ({', '.join(_REFERENCE)}) or MODULE:CALLABLE@AxB[?KEY=VALUE&...]")
    return load_model(target, [item for item in options.split("&") if item]), tuple(int(d) for d in dims.split("x"))


def _build_once(name: str, *, cheap: bool) -> float:
    from sdk.artifacts import TrainingSpec, generate_training_artifacts
    from sdk.models import BASE_HEAD_SPLIT
    from sdk.portable_graph import onnx_capture

    model, shape = _model(name)
    spec = TrainingSpec(mode="fedalt", optimizer="adamw", learning_rate=0.01)
    onnx_capture.ENABLED = cheap
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            generate_training_artifacts(model, example_input=torch.zeros((2, *shape)), spec=spec, out_dir=Path(out),
                                        split=BASE_HEAD_SPLIT)
            return time.perf_counter() - start
    finally:
        onnx_capture.ENABLED = True


def measure(models: list[str], *, repeat: int) -> list[BuildTime]:
    """Per model: alternate the two routes ``repeat`` times each (cheap first) and keep each route's best."""
    _build_once("mlp", cheap=True)  # warm-up: imports and torch.onnx's registry, not the first model's cost
    rows = []
    for name in models:
        cheap, public = [], []
        for _ in range(repeat):
            cheap.append(_build_once(name, cheap=True))
            public.append(_build_once(name, cheap=False))
        rows.append(BuildTime(model=name, cheap_s=min(cheap), public_s=min(public)))
        print(f"{name:50s} cheap {rows[-1].cheap_s:6.1f} s   public {rows[-1].public_s:6.1f} s   x{rows[-1].speedup:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdk.bench.build_bench", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = measure(args.models, repeat=max(1, args.repeat))
    total_cheap, total_public = sum(r.cheap_s for r in rows), sum(r.public_s for r in rows)
    print(f"{'total':50s} cheap {total_cheap:6.1f} s   public {total_public:6.1f} s   x{total_public / total_cheap:.2f}")
    if args.out:
        args.out.write_text(json.dumps([{**asdict(r), "speedup": round(r.speedup, 3)} for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
