"""Writing what fedge wrote before backends existed: format-1 bundles and format-1 state generations.

Both are produced by the code paths that made them (ORT-training artifact
generation, the training API's own checkpoint writer), so the tests read real
old-format files rather than hand-made imitations.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.archive import TrainingBundle
from device_agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME
from device_agent.state_store import StateStore


def as_format1_bundle(src: Path, dst: Path, key: Ed25519PrivateKey) -> Path:
    """Rewrite an ORT-training-only bundle as format 1 (the manifest the previous release signed), re-signed."""
    with zipfile.ZipFile(src) as zin:
        doc = json.loads(zin.read(MANIFEST_NAME))
        if "portable" in doc:
            raise ValueError("a format-1 bundle carries ORT-training artifacts only; build with kinds=('ort-training',)")
        doc["format_version"] = 1
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        with zipfile.ZipFile(dst, "w") as zout:
            zout.writestr(MANIFEST_NAME, raw)
            zout.writestr(SIGNATURE_NAME, key.sign(raw))
            for name in zin.namelist():
                if name not in (MANIFEST_NAME, SIGNATURE_NAME):
                    zout.writestr(name, zin.read(name))
    return dst


def save_format1_generation(trainer, state_dir: Path) -> None:
    """Save ``trainer`` (on the ort-training backend) the way fedge did before state format 2:
    one ORT checkpoint with optimizer state per artifact set, ``global.npz``, no ``state_format``."""
    backend = trainer._backend
    backend._sync()
    bundle: TrainingBundle = trainer.bundle

    def write(d: Path) -> None:
        for name, session in backend._sessions.items():
            session.save(d / f"ckpt-{name.value}")
        with open(d / "global.npz", "wb") as fh:
            np.savez(fh, **trainer.global_reference)

    StateStore(state_dir).save(write, {"manifest_sha256": bundle.manifest_sha256, "round": trainer.round,
                                       "total_steps": trainer.total_steps})
