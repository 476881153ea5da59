"""Packing training artifacts into a signed, versioned bundle (``.fedge`` zip).

A bundle carries both artifact kinds by default (ORT-training artifacts and
portable graphs, every file hashed in the signed manifest), so any device can
train it with whichever backend it has.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.manifest import FORMAT_VERSION, FORMAT_VERSION_WITHOUT_PORTABLE, MANIFEST_NAME, SIGNATURE_NAME, ArtifactKind, BundleManifest, FileEntry
from device_agent.keys import key_id
from sdk.artifacts import ALL_KINDS, GeneratedArtifacts, TrainingSpec, generate_training_artifacts
from sdk.model_spec import ParameterSplit


def _file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return FileEntry(size=path.stat().st_size, sha256=digest.hexdigest())


def manifest_for(
    generated: GeneratedArtifacts, *, model_name: str, bundle_version: int, signing_key: Ed25519PrivateKey, created_at: int | None = None,
    compression: str | None = None,
) -> BundleManifest:
    """The manifest describing ``generated`` (files hashed from disk); ``compression``: what devices send up (None: float32)."""
    files = {f: _file_entry(generated.directory / f) for f in generated.files}
    return BundleManifest(
        format_version=FORMAT_VERSION if generated.portable is not None else FORMAT_VERSION_WITHOUT_PORTABLE,
        model_name=model_name,
        bundle_version=int(bundle_version),
        created_at=int(time.time()) if created_at is None else int(created_at),
        signer_key_id=key_id(signing_key.public_key()),
        hyperparameters=generated.hyperparameters,
        inputs=generated.inputs,
        label=generated.label,
        output_name=generated.output_name,
        parameters=generated.parameters,
        artifact_sets=generated.artifact_sets,
        files=files,
        portable=generated.portable,
        compression=None if compression is None else _compression(compression),
    )


def _compression(text: str) -> str | None:
    """The canonical text of a compression spec (``none`` is stored as no field at all)."""
    from device_agent.compression import CompressionSpec

    spec = CompressionSpec.parse(text)
    return spec.describe() if spec.enabled else None


def write_bundle(directory: Path, manifest: BundleManifest, signing_key: Ed25519PrivateKey, out_path: Path) -> Path:
    """Sign ``manifest`` and zip it with the files it lists from ``directory`` into ``out_path``."""
    raw = manifest.to_json_bytes()
    signature = signing_key.sign(raw)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST_NAME, raw)
        zf.writestr(SIGNATURE_NAME, signature)
        for name in sorted(manifest.files):
            zf.write(directory / name, arcname=name)
    os.replace(tmp, out_path)
    return out_path


def build_bundle(
    model: torch.nn.Module,
    *,
    example_input: torch.Tensor,
    split: ParameterSplit,
    spec: TrainingSpec,
    signing_key: Ed25519PrivateKey,
    out_path: str | os.PathLike[str],
    model_name: str,
    bundle_version: int = 1,
    kinds: Sequence[ArtifactKind | str] = ALL_KINDS,
    compression: str | None = None,
) -> BundleManifest:
    """Export ``model``, generate the training artifacts of each kind in ``kinds`` for ``spec``, and write a signed bundle.

    Returns the manifest that was signed. ``example_input`` fixes every input
    dimension except the batch axis. ``compression``: how devices compress
    their updates (``CompressionSpec`` text, e.g. ``topk:0.3+q4``; None or
    ``none``: full float32). A model the training graphs cannot
    express raises ``UnsupportedModelError`` naming the layer; nothing is written.
    """
    chosen = tuple(ArtifactKind(k) for k in kinds)
    with tempfile.TemporaryDirectory(prefix="fedge-artifacts-") as tmp:
        generated = generate_training_artifacts(model, example_input=example_input, split=split, spec=spec, out_dir=tmp,
                                                kinds=chosen)
        manifest = manifest_for(generated, model_name=model_name, bundle_version=bundle_version, signing_key=signing_key,
                                compression=compression)
        write_bundle(Path(tmp), manifest, signing_key, Path(out_path))
    return manifest
