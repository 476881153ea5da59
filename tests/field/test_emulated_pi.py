"""The firmware overlay on an emulated Raspberry Pi (Debian bookworm arm64 under qemu-user), installed by install.sh.

Select with ``pytest -m aarch64``; it also runs in the default run. Where the
machine cannot emulate (not root, no binfmt_misc, debootstrap failing) the
tests fail with the reason.
"""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from device_agent.keys import save_public_key
from tests.field.arm64_root import EmulatedPi

#: The first test pays for the session's fixtures: a cold Debian root (debootstrap, 3-4 min) and the overlay.
pytestmark = [pytest.mark.aarch64, pytest.mark.timeout(1800)]

AGENT = "/opt/fedge/venv/bin/fedge-agent"
PYTHON = "/opt/fedge/venv/bin/python3"
UNIT = "/usr/lib/systemd/system/fedge-agent.service"
QUIET = {"ORT_DISABLE_TELEMETRY": "1"}


def test_emulated_pi_runs_the_overlay_venv_on_aarch64_as_the_unit_user(emulated_pi: EmulatedPi, overlay) -> None:
    probe = ("import json, platform, sys, onnxruntime, numpy, device_agent, importlib.util\n"
             "print(json.dumps({'machine': platform.machine(), 'python': sys.version.split()[0], 'prefix': sys.prefix,\n"
             "  'ort': onnxruntime.__version__, 'sdk': importlib.util.find_spec('sdk') is not None,\n"
             "  'torch': importlib.util.find_spec('torch') is not None, 'path': sys.path}))")
    proc = emulated_pi.run([PYTHON, "-I", "-c", probe], user="fedge", env=QUIET, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["machine"] == "aarch64" and found["python"].startswith("3.11.")
    assert found["prefix"] == "/opt/fedge/venv" and found["sdk"] is False and found["torch"] is False
    wheels = overlay.summary["wheels"]
    assert any(w.startswith(f"onnxruntime-{found['ort']}-") and "aarch64" in w for w in wheels), (found["ort"], wheels)
    assert not any(p.startswith("/usr/lib/python3/dist-packages") for p in found["path"])  # only the venv's packages

    help_proc = emulated_pi.run([AGENT, "--help"], user="fedge", env=QUIET, timeout=300)
    assert help_proc.returncode == 0 and "fedge-agent" in help_proc.stdout, help_proc.stderr


def test_emulated_pi_install_made_the_user_the_directories_and_enabled_the_unit(emulated_pi: EmulatedPi) -> None:
    passwd = emulated_pi.path("/etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("fedge:"))
    uid, gid, home, shell = (entry.split(":")[i] for i in (2, 3, 5, 6))
    assert int(uid) < 1000 and home == "/var/lib/fedge" and shell.endswith("nologin")  # a system user
    etc = emulated_pi.path("/etc/fedge").stat()
    assert (etc.st_uid, etc.st_gid, stat.S_IMODE(etc.st_mode)) == (0, int(gid), 0o750)
    state = emulated_pi.path("/var/lib/fedge").stat()
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (int(uid), 0o750)
    wants = emulated_pi.path("/etc/systemd/system/multi-user.target.wants/fedge-agent.service")
    assert wants.is_symlink() and str(wants.readlink()).endswith("/systemd/system/fedge-agent.service")


def test_emulated_pi_systemd_accepts_the_unit_and_rates_it_safe(emulated_pi: EmulatedPi) -> None:
    """systemd (the root's own, aarch64) parses the unit with its real user and paths; not run: no systemd as PID 1 here."""
    verify = emulated_pi.run(["systemd-analyze", "verify", UNIT], timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    security = emulated_pi.run(["systemd-analyze", "security", "--offline=true", UNIT], timeout=300)
    assert security.returncode == 0, security.stderr
    line = next(ln for ln in security.stdout.splitlines() if "Overall exposure level" in ln)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 2.0, line  # systemd's scale: 0 (locked down) .. 10 (exposed); <= 2 is rated "OK"


def own_lines(stderr: str) -> list[str]:
    """stderr without onnxruntime's emulation-only warning (qemu shows no CPU vendor; a real Pi does)."""
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith("onnxruntime cpuid_info warning: Unknown CPU vendor")]


def tamper(bundle: bytes) -> bytes:
    """The bundle re-zipped with one byte of its largest artifact flipped: a well-formed archive, a wrong hash."""
    with zipfile.ZipFile(io.BytesIO(bundle)) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    victim = max(entries, key=lambda e: len(e[1]))[0].filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info, data in entries:
            if info.filename == victim:
                data = bytes([data[0] ^ 0x01]) + data[1:]
            target.writestr(info, data)
    return out.getvalue()


def test_emulated_pi_agent_installs_a_signed_bundle_and_refuses_a_tampered_one(emulated_pi: EmulatedPi, bundle_factory,
                                                                             fleet_key) -> None:
    work = emulated_pi.path("/tmp/bundle-check")
    work.mkdir()
    save_public_key(fleet_key.public_key(), work / "fleet.pub")
    bundle = Path(bundle_factory("fedavg")).read_bytes()
    (work / "good.fedge").write_bytes(bundle)
    (work / "bad.fedge").write_bytes(tamper(bundle))
    for path in [work, *work.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    good = emulated_pi.run([AGENT, "install", "/tmp/bundle-check/good.fedge", "--fleet-key", "/tmp/bundle-check/fleet.pub",
                            "--dest", "/var/lib/fedge/check/good"], user="fedge", env=QUIET, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["installed"] == "/var/lib/fedge/check/good"
    bad = emulated_pi.run([AGENT, "install", "/tmp/bundle-check/bad.fedge", "--fleet-key", "/tmp/bundle-check/fleet.pub",
                           "--dest", "/var/lib/fedge/check/bad"], user="fedge", env=QUIET, timeout=300)
    assert bad.returncode == 1 and bad.stdout == ""  # 1: a bundle refused (docs/device-agent.md)
    assert own_lines(bad.stderr) == ["fedge-agent: error: bundle verification failed"], bad.stderr
    assert not emulated_pi.path("/var/lib/fedge/check/bad").exists()


def public_pem(private_key) -> bytes:
    """The PEM of ``private_key``'s public key, as fleet.pub files hold it."""
    return private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def stage_files(pi: EmulatedPi, inside: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` into a fresh directory ``inside`` the root, readable by the agent's user."""
    directory = pi.path(inside)
    directory.mkdir(parents=True)
    directory.chmod(0o755)
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o644)
    return directory


#: aarch64 (onnxruntime's NEON kernels, under qemu) vs x86_64 (its AVX kernels): the same graphs, batches and seed,
#: float32 sums in different orders. The cross-backend tolerance; measured worst |difference| after 16 AdamW steps of
#: FedAlt's two phases: 3.0e-8 (MLP and 1D-CNN).
CROSS_ARCH_TOL = {"rtol": 1e-5, "atol": 2e-6}


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_emulated_pi_trains_with_the_portable_backend_like_x86_64(emulated_pi: EmulatedPi, model_bundle, install, fleet_key,
                                                                  model: str, tmp_path: Path) -> None:
    """`fedge-agent train` on the emulated Pi and DeviceTrainer(portable) on this host: same bundle, batches, seed."""
    from device_agent.data import load_npz
    from device_agent.trainer import DeviceTrainer, TrainBudget
    from tests.model_bundles import make_data

    path, _ = model_bundle(model, "fedalt", mu=0.1, optimizer="adamw")
    x, y = make_data(model, "cross_entropy", 64, seed=3)
    data = io.BytesIO()
    np.savez(data, x=x, y=y)
    inside = f"/tmp/train-{model}"
    stage_files(emulated_pi, inside, {"b.fedge": Path(path).read_bytes(), "local.npz": data.getvalue(),
                                      "fleet.pub": public_pem(fleet_key)})
    state = f"/var/lib/fedge/train-{model}"
    for argv in ([AGENT, "install", f"{inside}/b.fedge", "--fleet-key", f"{inside}/fleet.pub", "--dest", f"{state}/bundle"],
                 [AGENT, "train", "--bundle-dir", f"{state}/bundle", "--fleet-key", f"{inside}/fleet.pub", "--state", f"{state}/s",
                  "--data", f"{inside}/local.npz", "--epochs", "2", "--batch-size", "16", "--seed", "7", "--threads", "1",
                  "--backend", "portable"]):
        proc = emulated_pi.run(argv, user="fedge", env=QUIET, timeout=600)
        assert proc.returncode == 0, proc.stderr
    pi = json.loads(proc.stdout)
    assert pi["backend"] == "portable" and pi["steps"] == 16  # 2 phases x 2 epochs x 4 batches

    host_bundle = install(path)
    host = DeviceTrainer(host_bundle, backend="portable", threads=1)
    report = host.train(load_npz(emulated_pi.path(f"{inside}/local.npz")),
                        TrainBudget(epochs=2, batch_size=16), rng=np.random.default_rng(7))
    assert report.steps == pi["steps"]
    np.testing.assert_allclose(pi["mean_loss"], report.mean_loss, rtol=CROSS_ARCH_TOL["rtol"])
    trained_on_pi = DeviceTrainer(host_bundle, state_dir=emulated_pi.path(f"{state}/s"), backend="portable")
    worst = 0.0
    for name, value in {**host.get_shared(), **host.get_personal()}.items():
        theirs = {**trained_on_pi.get_shared(), **trained_on_pi.get_personal()}[name]
        np.testing.assert_allclose(theirs, value, err_msg=name, **CROSS_ARCH_TOL)
        worst = max(worst, float(np.max(np.abs(theirs - value))))
    initial = DeviceTrainer(host_bundle, backend="portable").get_shared()
    assert any(not np.array_equal(initial[n], v) for n, v in trained_on_pi.get_shared().items())  # it did train
    print(f"{model}: worst |aarch64 - x86_64| after {pi['steps']} steps = {worst:.3g}; emulated training {pi['seconds']:.2f} s")
