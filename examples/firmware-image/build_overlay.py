#!/usr/bin/env python3
"""Build the fedge device-agent overlay: a root-filesystem tar for Debian / Raspberry Pi OS bookworm arm64.

The overlay holds the agent in its own virtual environment under /opt/fedge/venv, built
on this (any) host without emulation: pip resolves and installs aarch64 wheels for the
target's CPython into the venv's site-packages (``pip install --target`` with platform
tags, offline from a wheelhouse), and the venv layout around them points at the target's
/usr/bin/python3. Beside it: the hardened systemd unit, the sysusers.d entry for the
``fedge`` user, a systemd preset, ``fedge-device-setup`` and /etc/fedge.

    python3 examples/firmware-image/build_overlay.py --out fedge-overlay.tar.gz
    python3 examples/firmware-image/build_overlay.py --wheelhouse wheels/ --offline ...   # no network

Needs only Python >= 3.10 with pip on the host (and the network, unless --offline with a
full wheelhouse). Prints one JSON object describing the tar. Exit 0 ok, 1 failure, 2 usage.
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOTFS = HERE / "rootfs"
PREFIX = "opt/fedge"
VENV = f"{PREFIX}/venv"
#: Raspberry Pi OS / Debian bookworm: CPython 3.11, glibc 2.36 (manylinux_2_28 and older wheels run).
DEFAULT_PYTHON = "3.11"
DEFAULT_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
#: ELF e_machine of AArch64: every shared object in the overlay must be one.
EM_AARCH64 = 183
#: Packages of the fedge wheel a device never imports (the host SDK); left out of the overlay.
HOST_ONLY_PACKAGES = ("sdk",)

LAUNCHER = """#!/{venv}/bin/python3 -I
# fedge-agent launcher (written by examples/firmware-image/build_overlay.py); -I: isolated mode.
import os
import sys

# onnxruntime >= 1.29's official Linux wheels upload usage telemetry and keep a device id under
# ~/.cache unless this is set before the runtime initialises; a device agent never phones home.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from device_agent.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
"""


class BuildError(Exception):
    """The overlay could not be built; the message says why."""


@dataclass(frozen=True, kw_only=True)
class Target:
    """What the overlay is built for: CPython ``python`` (major.minor) on ``platforms`` (wheel platform tags)."""

    python: str
    platforms: tuple[str, ...]

    def pip_args(self) -> list[str]:
        """pip's options that select wheels for the target instead of this host."""
        major, minor = self.python.split(".")
        args = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp",
                "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
        for platform in self.platforms:
            args += ["--platform", platform]
        return args


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if "is ignored" not in ln]
        raise BuildError(f"pip {args[0]} failed:\n" + "\n".join(lines[-15:]))


#: What the fedge wheel is built from; copied to a clean directory first, so stale files in a
#: checkout's build/ can never end up in the wheel.
WHEEL_SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "device_agent", "sdk")


def copy_wheel_sources(source: Path, dest: Path) -> Path:
    """Copy what the fedge distribution is built from (:data:`WHEEL_SOURCES`) to ``dest``; ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WHEEL_SOURCES:
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (source / name).is_file():
            shutil.copy2(source / name, dest / name)
        else:
            raise BuildError(f"{source} is not a fedge checkout: {name} is missing")
    return dest


def build_fedge_wheel(source: Path, out_dir: Path, epoch: int) -> Path:
    """The fedge wheel of the checkout at ``source`` (pure Python), built from a clean copy, zip times ``epoch``."""
    clean = copy_wheel_sources(source, out_dir / "src")
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out_dir), str(clean), env={"SOURCE_DATE_EPOCH": str(epoch)})
    shutil.rmtree(clean)
    wheels = sorted(out_dir.glob("fedge-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one fedge wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


def install_site_packages(*, requirement: str, links: list[Path], site: Path, target: Target, offline: bool,
                          wheelhouse: Path) -> None:
    """Resolve ``requirement`` for ``target`` into ``wheelhouse`` (unless offline), then install it into ``site``."""
    find = [arg for link in links for arg in ("--find-links", str(link))]
    if not offline:
        _pip("download", "--quiet", "--dest", str(wheelhouse), *find, *target.pip_args(), requirement)
    # pip download copies the fedge wheel into the wheelhouse too; a copy from an earlier build
    # (same version, older code) must never be the one installed.
    for stale in wheelhouse.glob("fedge-*.whl"):
        stale.unlink()
    _pip("install", "--quiet", "--no-index", "--no-compile", "--target", str(site), *find, *target.pip_args(), requirement)


def lay_out_venv(root: Path, target: Target) -> Path:
    """Write the venv around site-packages: pyvenv.cfg, python symlinks to /usr/bin/python3, the launcher."""
    venv = root / VENV
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {target.python}\n")
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "bin" / f"python{target.python}").symlink_to("python3")
    launcher = venv / "bin" / "fedge-agent"
    launcher.write_text(LAUNCHER.format(venv=VENV))
    launcher.chmod(0o755)
    site = venv / "lib" / f"python{target.python}" / "site-packages"
    shutil.rmtree(site / "bin", ignore_errors=True)  # pip's scripts carry this host's interpreter path
    for name in HOST_ONLY_PACKAGES:
        shutil.rmtree(site / name, ignore_errors=True)
    return venv


def copy_system_files(root: Path) -> None:
    """The unit, sysusers.d entry, preset, setup script, /etc/fedge and the on-device README."""
    files = {
        "usr/lib/systemd/system/fedge-agent.service": ("fedge-agent.service", 0o644),
        "usr/lib/sysusers.d/fedge.conf": ("sysusers-fedge.conf", 0o644),
        "usr/lib/systemd/system-preset/80-fedge.preset": ("80-fedge.preset", 0o644),
        f"{PREFIX}/sbin/fedge-device-setup": ("fedge-device-setup", 0o755),
        f"{PREFIX}/share/doc/fedge/README.md": ("README.device.md", 0o644),
        "etc/fedge/agent.toml.example": ("agent.toml.example", 0o644),
    }
    for dest, (name, mode) in files.items():
        path = root / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOTFS / name, path)
        path.chmod(mode)
    (root / "etc" / "fedge").chmod(0o750)


def elf_machine(path: Path) -> int | None:
    """ELF e_machine of ``path``, or None when it is not an ELF file."""
    with open(path, "rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def check_binaries(root: Path) -> int:
    """Number of ELF files under ``root``; BuildError when any is not AArch64 (a host wheel slipped in)."""
    count = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            machine = elf_machine(path)
            if machine is None:
                continue
            count += 1
            if machine != EM_AARCH64:
                raise BuildError(f"{path.relative_to(root)} is not an AArch64 binary (e_machine {machine})")
    return count


def compile_bytecode(root: Path, target: Target, epoch: int) -> bool:
    """Precompile site-packages when this Python is the target's version (the venv is read-only on the device).

    Timestamp pycs record the source mtime, so every mtime is set to ``epoch`` first (the tar keeps them).
    """
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (epoch, epoch))
    if f"{sys.version_info.major}.{sys.version_info.minor}" != target.python:
        return False
    site = root / VENV / "lib" / f"python{target.python}" / "site-packages"
    proc = subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/", str(site)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"compileall failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    for path in site.rglob("__pycache__"):
        for item in [path, *path.iterdir()]:
            os.utime(item, (epoch, epoch))
    return True


def write_manifest(root: Path, *, wheels: list[Path], target: Target, epoch: int, bytecode: bool) -> dict[str, object]:
    """/opt/fedge/share/fedge-overlay.json: what went in (wheels and their SHA-256) and for what."""
    manifest: dict[str, object] = {
        "format": 1,
        "python": target.python,
        "platforms": list(target.platforms),
        "source_date_epoch": epoch,
        "bytecode": bytecode,
        "excluded_packages": list(HOST_ONLY_PACKAGES),
        "wheels": {w.name: hashlib.sha256(w.read_bytes()).hexdigest() for w in sorted(wheels, key=lambda p: p.name)},
    }
    path = root / PREFIX / "share" / "fedge-overlay.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.utime(path, (epoch, epoch))
    return manifest


#: Directories the target system already has: the tar carries no entry for them, so extracting it
#: never changes their mode, owner or mtime (tar creates any that are missing).
SYSTEM_DIRS = frozenset({"etc", "opt", "usr", "usr/lib", "usr/lib/systemd", "usr/lib/systemd/system",
                         "usr/lib/sysusers.d", "usr/lib/systemd/system-preset"})
#: Directories that are not world-readable: /etc/fedge holds keys (fedge-device-setup gives it to group fedge).
PRIVATE_DIRS = {"etc/fedge": 0o750}


def _mode(info: tarfile.TarInfo) -> int:
    """Normalised permissions, whatever this host's umask made: 0755 dirs and programs, 0644 files."""
    if info.isdir():
        return PRIVATE_DIRS.get(info.name, 0o755)
    return 0o755 if info.mode & 0o111 else 0o644


def write_tar(root: Path, out: Path, epoch: int) -> None:
    """A reproducible gzip tar of ``root``: sorted names, root:root, normalised modes, every mtime ``epoch``."""
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=epoch, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
            name = path.relative_to(root).as_posix()
            if name in SYSTEM_DIRS:
                continue
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = epoch
            if not info.issym():
                info.mode = _mode(info)
            if info.isfile():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def build_overlay(*, source: Path, out: Path, target: Target, wheelhouse: Path, offline: bool, extra: str,
                  epoch: int) -> dict[str, object]:
    """Build the overlay tar at ``out``; a summary (sizes, SHA-256, wheels)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedge-overlay-") as tmp:
        work = Path(tmp)
        own = work / "fedge-wheel"
        own.mkdir()
        fedge_wheel = build_fedge_wheel(source, own, epoch)
        root = work / "root"
        site = root / VENV / "lib" / f"python{target.python}" / "site-packages"
        install_site_packages(requirement=f"fedge[{extra}]", links=[own, wheelhouse], site=site, target=target,
                              offline=offline, wheelhouse=wheelhouse)
        lay_out_venv(root, target)
        copy_system_files(root)
        binaries = check_binaries(root)
        installed = {dist.name.removesuffix(".dist-info").lower() for dist in site.glob("*.dist-info")}
        used = [fedge_wheel] + [w for w in wheelhouse.glob("*.whl")
                                if "-".join(w.name.split("-")[:2]).lower() in installed and not w.name.startswith("fedge-")]
        bytecode = compile_bytecode(root, target, epoch)
        write_manifest(root, wheels=used, target=target, epoch=epoch, bytecode=bytecode)
        size = _tree_size(root)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_tar(root, out, epoch)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    Path(f"{out}.sha256").write_text(f"{digest}  {out.name}\n")  # `sha256sum -c` format; install.sh checks it
    return {"overlay": str(out), "sha256": digest, "tar_bytes": out.stat().st_size, "installed_bytes": size,
            "elf_files": binaries, "bytecode": bytecode, "python": target.python,
            "wheels": sorted(w.name for w in used)}


def _default_epoch(source: Path) -> int:
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    proc = subprocess.run(["git", "-C", str(source), "log", "-1", "--format=%ct"], capture_output=True, text=True, check=False)
    return int(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip().isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example:\n  python3 examples/firmware-image/build_overlay.py --out fedge-overlay.tar.gz")
    parser.add_argument("--out", type=Path, default=Path("fedge-overlay-bookworm-arm64.tar.gz"), help="overlay tar to write (default: %(default)s)")
    parser.add_argument("--source", type=Path, default=HERE.parents[1], help="fedge checkout to package (default: this one)")
    parser.add_argument("--wheelhouse", type=Path, default=None, help="directory of target wheels: downloads are kept here (default: a temporary one)")
    parser.add_argument("--offline", action="store_true", help="download nothing: the wheelhouse must hold every dependency")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON, help="target CPython major.minor (default: %(default)s, bookworm)")
    parser.add_argument("--platform", action="append", dest="platforms", help=f"wheel platform tag, repeatable (default: {' '.join(DEFAULT_PLATFORMS)})")
    parser.add_argument("--extra", default="device", help="fedge extra that brings the runtime (default: %(default)s: mainstream onnxruntime, portable backend)")
    args = parser.parse_args(argv)
    if args.offline and args.wheelhouse is None:
        parser.error("--offline needs --wheelhouse")
    if len(args.python_version.split(".")) != 2:
        parser.error("--python-version must be major.minor, e.g. 3.11")
    target = Target(python=args.python_version, platforms=tuple(args.platforms or DEFAULT_PLATFORMS))
    try:
        with tempfile.TemporaryDirectory(prefix="fedge-wheelhouse-") as tmp:
            summary = build_overlay(source=args.source.resolve(), out=args.out.resolve(), target=target,
                                    wheelhouse=(args.wheelhouse or Path(tmp)).resolve(), offline=args.offline,
                                    extra=args.extra, epoch=_default_epoch(args.source))
    except (BuildError, OSError) as exc:
        print(f"build_overlay: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
