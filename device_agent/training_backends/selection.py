"""Choosing and opening a training backend.

``auto`` prefers ``ort-training`` when onnxruntime-training is installed and
the bundle carries its artifacts, else ``portable``. Why: where both can run
(an x86_64 machine with onnxruntime-training), ort-training is what such
devices ran before backends existed, so their behaviour and saved state stay
exactly as they were, and its fused C++ optimizer is faster on tiny
AdamW models (docs/benchmarks.md). Everywhere else (aarch64, armhf, Python
3.12+, any mainstream onnxruntime) only ``portable`` can run. A forced choice
that cannot run raises :class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import logging

from device_agent.bundle.archive import TrainingBundle
from device_agent.bundle.manifest import ArtifactKind, BundleManifest
from device_agent.training_backends.base import BackendName, TrainingBackend
from device_agent.training_backends.runtime import BackendUnavailableError, has_inference_session, has_training_api
from device_agent.training_backends.state import TrainingState

logger = logging.getLogger(__name__)


def installed_backends() -> tuple[BackendName, ...]:
    """The backends the installed onnxruntime can run (ort-training first); empty without onnxruntime."""
    names = (BackendName.ORT_TRAINING,) if has_training_api() else ()
    return names + ((BackendName.PORTABLE,) if has_inference_session() else ())


def choose_backend(requested: BackendName | str, manifest: BundleManifest) -> BackendName:
    """The backend to use for ``manifest``: ``requested`` itself, or the ``auto`` choice described above."""
    requested = BackendName(requested)
    installed = installed_backends()
    carried = manifest.artifact_kinds
    if requested is not BackendName.AUTO:
        if requested not in installed:
            extra = "device-ort-training" if requested is BackendName.ORT_TRAINING else "device"
            raise BackendUnavailableError(f"backend {requested.value} is not installed here (install fedge[{extra}])")
        if requested.artifact_kind not in carried:
            raise BackendUnavailableError(f"the bundle carries no {requested.value} artifacts "
                                          f"(it has {[k.value for k in carried]}); rebuild it with both kinds")
        return requested
    for name in installed:
        if name.artifact_kind in carried:
            return name
    if not installed:
        raise BackendUnavailableError("no onnxruntime is installed (install fedge[device] or fedge[device-ort-training])")
    if carried == (ArtifactKind.ORT_TRAINING,):
        raise BackendUnavailableError("this bundle carries only ORT-training artifacts and onnxruntime-training is not "
                                      "installed here; rebuild the bundle (fedge bundle build adds the portable graphs)")
    raise BackendUnavailableError(f"no installed backend ({[n.value for n in installed]}) runs this bundle's "
                                  f"artifacts ({[k.value for k in carried]})")


def open_backend(
    name: BackendName | str, bundle: TrainingBundle, *, threads: int | None = None, state: TrainingState | None = None
) -> TrainingBackend:
    """An opened backend ``name`` (not ``auto``) on ``bundle``, resuming ``state`` when given."""
    name = BackendName(name)
    if name is BackendName.ORT_TRAINING:
        from device_agent.training_backends.ort_training import OrtTrainingBackend

        return OrtTrainingBackend(bundle, threads=threads, state=state)
    if name is BackendName.PORTABLE:
        from device_agent.training_backends.portable import PortableBackend

        return PortableBackend(bundle, threads=threads, state=state)
    raise ValueError(f"open_backend needs a concrete backend, got {name.value}")
