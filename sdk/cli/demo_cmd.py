"""``fedge demo``: the whole on-device loop on one machine.

Builds a fleet key and a signed FedAlt bundle on the host, then, for each
simulated device, runs the real device agent in its own process with torch
unavailable: verify and install the bundle, train on that device's own
(label-skewed) data, save state, and evaluate the personalised model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

_NO_TORCH_AGENT = (
    "import importlib.abc, sys\n"
    "class NoTorch(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'onnx', 'sdk'):\n"
    "            raise ModuleNotFoundError(name, name=name)\n"
    "sys.meta_path.insert(0, NoTorch())\n"
    "from device_agent.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _agent(*args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH_AGENT, *args], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise click.ClickException(f"device agent failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--devices", type=int, default=4, show_default=True, help="Number of simulated devices.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Keep keys, bundle and device state here (default: a temp dir).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(devices: int, epochs: int, workdir: Path | None, seed: int) -> None:
    """Run the on-device training loop end to end (local; no broker yet)."""
    import torch
    from sklearn.datasets import load_digits
    from tqdm import tqdm

    from device_agent.keys import save_private_key, save_public_key
    from device_agent.bundle.manifest import OptimizerKind, TrainingMode
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.models import BASE_HEAD_SPLIT, PersonalizedMLP
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with tempfile.TemporaryDirectory(prefix="fedge-demo-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        save_private_key(key, work / "fleet.key")
        save_public_key(key.public_key(), work / "fleet.pub")
        torch.manual_seed(seed)
        build_bundle(PersonalizedMLP(64, (64,), 10), example_input=torch.zeros(2, 64), split=BASE_HEAD_SPLIT,
                     spec=TrainingSpec(mode=TrainingMode.FEDALT, mu=0.01, optimizer=OptimizerKind.ADAMW, learning_rate=0.005),
                     signing_key=key, out_path=work / "digits.fedge", model_name="digits-mlp")
        click.echo(f"built and signed {work / 'digits.fedge'} (fedalt, mu=0.01)")
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        rng = np.random.default_rng(seed)
        rows = []
        for d in tqdm(range(devices), desc="devices", unit="device"):
            # each device sees mostly 3 of the 10 digits: a small, skewed local dataset
            favourite = rng.choice(10, 3, replace=False)
            p = np.where(np.isin(y, favourite), 8.0, 1.0)
            idx = rng.choice(len(y), 400, replace=False, p=p / p.sum())
            dev = work / f"device-{d}"
            dev.mkdir(exist_ok=True)
            np.savez(dev / "train.npz", x=x[idx[:300]], y=y[idx[:300]])
            np.savez(dev / "test.npz", x=x[idx[300:]], y=y[idx[300:]])
            _agent("install", str(work / "digits.fedge"), "--fleet-key", str(work / "fleet.pub"), "--dest", str(dev / "bundle"))
            before = _agent("evaluate", "--bundle-dir", str(dev / "bundle"), "--fleet-key", str(work / "fleet.pub"),
                            "--state", str(dev / "state"), "--data", str(dev / "test.npz"))
            after = _agent("train", "--bundle-dir", str(dev / "bundle"), "--fleet-key", str(work / "fleet.pub"), "--state",
                           str(dev / "state"), "--data", str(dev / "train.npz"), "--eval-data", str(dev / "test.npz"),
                           "--epochs", str(epochs), "--seed", str(seed + d))
            rows.append((d, sorted(favourite.tolist()), before["accuracy"], after["eval_accuracy"], after["steps"]))
        click.echo(f"\n{'device':>6s} {'main digits':>12s} {'acc before':>10s} {'acc after':>10s} {'steps':>6s}")
        for d, fav, b, a, s in rows:
            click.echo(f"{d:6d} {str(fav):>12s} {b:10.3f} {a:10.3f} {s:6d}")
        click.echo(f"mean personalised accuracy: {np.mean([r[3] for r in rows]):.3f} (devices trained without torch)")
