"""Write each lab device's local data, as its sensor adapter would: scikit-learn's digits, split non-IID.

Usage: python write_lab_data.py FLEET_DIR [--per-device N]

Every device of FLEET_DIR/devices gets ``<dir>/var/data/local.npz`` (arrays ``x`` (N, 64) float32 and ``y`` (N,)),
drawn mostly from two classes of its own (80%) and the rest from all ten, so personal heads have something to learn.
Host-side only (a lab on one machine); a real device's data never leaves it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fleet_dir", type=Path)
    parser.add_argument("--per-device", type=int, default=200)
    args = parser.parse_args(argv)
    devices = sorted(p for p in (args.fleet_dir / "devices").glob("*") if (p / "agent.toml").is_file())
    if not devices:
        print(f"error: no provisioning directories under {args.fleet_dir / 'devices'} (run fedge fleet init first)",
              file=sys.stderr)
        return 2
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    for index, device in enumerate(devices):
        own = np.flatnonzero(np.isin(y, [(2 * index) % 10, (2 * index + 1) % 10]))
        mine = rng.choice(own, size=int(0.8 * args.per_device), replace=False)
        rest = rng.choice(len(y), size=args.per_device - len(mine), replace=False)
        chosen = rng.permutation(np.concatenate([mine, rest]))
        out = device / "var" / "data"
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "local.npz", x=x[chosen], y=y[chosen].astype(np.int64))
        print(f"{device.name}: {len(chosen)} examples, mostly digits {(2 * index) % 10} and {(2 * index + 1) % 10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
