"""A bundle is used only if its signature and every file hash check out."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.archive import install_bundle, load_bundle, verify_bundle
from device_agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, TrainingMode, parse_manifest
from device_agent.errors import BundleError, BundleVerificationError


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a bundle archive, letting ``edit(name, data)`` change members (None drops one)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


def test_bundle_verify_accepts_untouched_bundle(bundle_factory, fleet_key):
    manifest = verify_bundle(bundle_factory("fedalt", mu=0.1), fleet_key.public_key())
    assert manifest.hyperparameters.mode is TrainingMode.FEDALT
    assert manifest.hyperparameters.mu == pytest.approx(0.1)
    assert {p.role for p in manifest.parameters} == {"shared", "personal"}
    # 2 ORT-training sets x 4 files, and the portable kind: 2 step graphs, the eval graph, the initial weights
    assert len(manifest.files) == 12
    assert [k.value for k in manifest.artifact_kinds] == ["ort-training", "portable"]


def test_bundle_tampered_manifest_is_refused(bundle_factory, fleet_key, tmp_path):
    def edit(name, data):
        if name == MANIFEST_NAME:
            doc = json.loads(data)
            doc["hyperparameters"]["mu"] = 0.0  # quietly switch FedProx off
            return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return data

    bad = _rewrite(bundle_factory("fedprox", mu=0.1), tmp_path / "bad.fedge", edit)
    with pytest.raises(BundleVerificationError):
        verify_bundle(bad, fleet_key.public_key())
    with pytest.raises(BundleVerificationError):
        install_bundle(bad, fleet_key.public_key(), tmp_path / "inst")
    assert not (tmp_path / "inst").exists()


def test_bundle_tampered_artifact_is_refused(bundle_factory, fleet_key, tmp_path):
    def edit(name, data):
        if name.endswith("training_model.onnx"):
            return data[:-1] + bytes([data[-1] ^ 1])
        return data

    bad = _rewrite(bundle_factory("fedsim", mu=0.1), tmp_path / "bad.fedge", edit)
    with pytest.raises(BundleVerificationError):
        install_bundle(bad, fleet_key.public_key(), tmp_path / "inst")


def test_bundle_wrong_signing_key_is_refused(bundle_factory, tmp_path):
    with pytest.raises(BundleVerificationError):
        verify_bundle(bundle_factory("fedavg"), Ed25519PrivateKey.generate().public_key())


def test_bundle_unsigned_or_with_extra_file_is_refused(bundle_factory, fleet_key, tmp_path):
    src = bundle_factory("fedavg")
    unsigned = _rewrite(src, tmp_path / "unsigned.fedge", lambda n, d: None if n == SIGNATURE_NAME else d)
    with pytest.raises(BundleVerificationError):
        verify_bundle(unsigned, fleet_key.public_key())
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "extra.fedge", "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
        zout.writestr("payload.so", b"\x7fELF")
    with pytest.raises(BundleVerificationError):
        verify_bundle(tmp_path / "extra.fedge", fleet_key.public_key())


def test_bundle_installed_directory_is_reverified(bundle_factory, fleet_key, tmp_path):
    bundle = install_bundle(bundle_factory("fedavg"), fleet_key.public_key(), tmp_path / "inst")
    assert load_bundle(bundle.directory, fleet_key.public_key()).manifest_sha256 == bundle.manifest_sha256
    ckpt = bundle.path(bundle.manifest.artifact_sets[0].checkpoint)
    ckpt.write_bytes(ckpt.read_bytes() + b"\x00")
    with pytest.raises(BundleVerificationError):
        load_bundle(bundle.directory, fleet_key.public_key())


def test_bundle_not_a_zip_gives_clear_error(fleet_key, tmp_path):
    junk = tmp_path / "junk.fedge"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(BundleError, match="not a fedge bundle"):
        verify_bundle(junk, fleet_key.public_key())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format_version=99), "format version 99"),
        (lambda d: d["hyperparameters"].update(mode="fedfancy"), "hyperparameters.mode"),
        (lambda d: d["parameters"][0].update(role="both"), "role"),
        (lambda d: d["parameters"][0].update(shape=[-1]), "bad dimension"),
        (lambda d: d["artifact_sets"][0].update(checkpoint="../../etc/passwd"), "plain file name"),
        (lambda d: d.pop("label"), "missing field 'label'"),
        (lambda d: d.update(compression="zip"), "manifest.compression: .*'zip'"),
        (lambda d: d.update(compression=8), "manifest.compression: expected"),
    ],
)
def test_manifest_parse_names_the_problem(bundle_factory, mutate, message):
    with zipfile.ZipFile(bundle_factory("fedavg")) as zf:
        doc = json.loads(zf.read(MANIFEST_NAME))
    mutate(doc)
    with pytest.raises(BundleError, match=message):
        parse_manifest(json.dumps(doc).encode())


def test_ditto_manifest_carries_lambda_and_two_full_sets(bundle_factory, fleet_key):
    manifest = verify_bundle(bundle_factory("ditto", ditto_lambda=0.5), fleet_key.public_key())
    h = manifest.hyperparameters
    assert h.mode is TrainingMode.DITTO and h.ditto_lambda == pytest.approx(0.5) and manifest.has_anchors
    everything = tuple(p.name for p in manifest.parameters)
    assert {s.name.value: s.trainable for s in manifest.artifact_sets} == {"joint": everything, "ditto": everything}
    assert {s.name.value for s in manifest.portable.sets} == {"joint", "ditto"}
    # other modes' manifests do not mention the field at all (their signed bytes are as before)
    with zipfile.ZipFile(bundle_factory("fedavg")) as zf:
        assert "ditto_lambda" not in json.loads(zf.read(MANIFEST_NAME))["hyperparameters"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["hyperparameters"].pop("ditto_lambda"), "ditto_lambda"),
        (lambda d: d["hyperparameters"].update(ditto_lambda=0), "ditto_lambda"),
        (lambda d: d["hyperparameters"].update(mode="fedavg"), "ditto_lambda"),
        (lambda d: d["parameters"][-1].update(role="personal"), "federates every parameter"),
        (lambda d: d["artifact_sets"].pop(), "mode ditto needs exactly"),
    ],
)
def test_ditto_manifest_parse_names_the_problem(bundle_factory, mutate, message):
    with zipfile.ZipFile(bundle_factory("ditto", ditto_lambda=0.5)) as zf:
        doc = json.loads(zf.read(MANIFEST_NAME))
    mutate(doc)
    with pytest.raises(BundleError, match=message):
        parse_manifest(json.dumps(doc).encode())


def test_manifest_compression_field_round_trips_and_is_absent_by_default(bundle_factory):
    with zipfile.ZipFile(bundle_factory("fedavg")) as zf:
        raw = zf.read(MANIFEST_NAME)
    plain = parse_manifest(raw)
    assert plain.compression is None and b"compression" not in plain.to_json_bytes()
    assert plain.to_json_bytes() == raw  # bundles signed before the field existed verify unchanged
    doc = json.loads(raw)
    doc["compression"] = "topk:0.3+q4"
    parsed = parse_manifest(json.dumps(doc).encode())
    assert parsed.compression == "topk:0.3+q4"
    assert json.loads(parsed.to_json_bytes())["compression"] == "topk:0.3+q4"
