"""Test helper: a copy of a signed bundle with another version (or model name), re-signed with the real fleet key."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME


def resigned(src: Path, dst: Path, key: Ed25519PrivateKey, *, version: int, model_name: str | None = None,
             compression: str | None = None) -> Path:
    """``src`` with ``bundle_version`` = ``version`` (and ``model_name``, ``compression``), signed again by ``key``, written to ``dst``."""
    with zipfile.ZipFile(src) as zin:
        members = {name: zin.read(name) for name in zin.namelist()}
    doc = json.loads(members[MANIFEST_NAME])
    doc["bundle_version"] = version
    if model_name is not None:
        doc["model_name"] = model_name
    if compression is not None:
        doc["compression"] = compression
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    members[MANIFEST_NAME] = raw
    members[SIGNATURE_NAME] = key.sign(raw)
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return dst
