"""An emulated Raspberry Pi for tests: a Debian bookworm arm64 root run through qemu-user, built once per machine.

Recipe (docs/field.md): qemu-user-static + binfmt_misc (``update-binfmts --enable
qemu-aarch64``, flags ``F``: the kernel holds the interpreter, so nothing of qemu
is needed inside the root), a one-stage ``debootstrap --arch=arm64
--variant=minbase`` from the Debian mirror this machine's apt already uses, and two
files onnxruntime's cpuinfo reads, ``/sys/devices/system/cpu/{possible,present}``
(bind-mounting the host's /sys makes aarch64 onnxruntime crash under qemu).

The root is cached (:mod:`tests.build_cache`) keyed by everything that goes into
it, and never modified: each session runs an overlayfs copy of it (a plain copy
where overlayfs is unavailable) with /proc mounted. The root shares the host's
network namespace, so the agent inside reaches brokers on 127.0.0.1.

Everything here raises :class:`EmulationUnavailable` with the reason when the
machine cannot emulate (not root, no binfmt_misc, debootstrap failing): the
tests turn that into a failure, never a skip.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.build_cache import held_entry, key_of

logger = logging.getLogger(__name__)

SUITE = "bookworm"
ARCH = "arm64"
#: python3: what Raspberry Pi OS Lite ships (3.11 on bookworm); systemd: systemd-sysusers, systemctl
#: (offline) and systemd-analyze, which the overlay's setup uses on a real Pi too.
INCLUDE = ("python3", "systemd")
#: Bump when the recipe below changes (a new cache entry is built).
RECIPE = 1
HOST_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The CPU qemu emulates: a Raspberry Pi 4's core. qemu's default ("max") advertises SVE/SME, onnxruntime
#: then picks kernels qemu runs ~15x slower still (measured: 12 CNN steps 35-47 s vs 3.2-3.4 s), and no Pi has them.
EMULATED_CPU = "cortex-a72"
_APT_LOCK = Path(tempfile.gettempdir()) / "fedge-apt-install.lock"


class EmulationUnavailable(RuntimeError):
    """This machine cannot run the emulated root; the message says why and what to do."""


def _run(cmd: Sequence[str], *, timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulationUnavailable(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        raise EmulationUnavailable(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    return proc


def _install_host_packages() -> None:
    missing = [p for p, tool in zip(HOST_PACKAGES, ("qemu-aarch64-static", "update-binfmts", "debootstrap"))
               if shutil.which(tool, path=PATH) is None]
    if not missing:
        return
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *missing]
    with open(_APT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(apt, capture_output=True, timeout=900, check=False).returncode != 0:
            _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], timeout=900, what="apt-get update")
            _run(apt, timeout=900, what=f"apt-get install {' '.join(missing)}")


def prepare_host() -> None:
    """Make sure qemu-user, binfmt_misc with an aarch64 entry (flag F) and debootstrap are ready; installs them as root."""
    if os.geteuid() != 0:
        raise EmulationUnavailable("the emulated Raspberry Pi needs root (binfmt_misc, debootstrap, chroot, mounts); "
                                   "run the tests as root, as CI does")
    _install_host_packages()
    if not (BINFMT / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], timeout=30,
             what=f"mounting binfmt_misc on {BINFMT} (a container may need --privileged)")
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        _run(["update-binfmts", "--enable", "qemu-aarch64"], timeout=60, what="update-binfmts --enable qemu-aarch64")
    text = entry.read_text() if entry.exists() else ""
    flags = re.search(r"^flags: (\S*)", text, re.MULTILINE)
    if not text.startswith("enabled") or flags is None or "F" not in flags.group(1):
        raise EmulationUnavailable(f"binfmt_misc has no enabled qemu-aarch64 entry with flag F (fix-binary): {text!r}")


def debian_mirror() -> str:
    """``$FEDGE_DEBIAN_MIRROR``, else the Debian archive this machine's apt sources use, else deb.debian.org."""
    if os.environ.get("FEDGE_DEBIAN_MIRROR"):
        return os.environ["FEDGE_DEBIAN_MIRROR"].rstrip("/")
    uris: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        uris += re.findall(r"^URIs:\s*(\S+)", path.read_text(errors="replace"), re.MULTILINE)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        uris += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", listing.read_text(errors="replace"), re.MULTILINE)
    for uri in uris:
        if uri.startswith("http") and uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def _debootstrap(entry: Path, mirror: str) -> None:
    root = entry / "root"
    cmd = ["debootstrap", f"--arch={ARCH}", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(root), mirror]
    started = time.monotonic()
    with open(entry / "debootstrap.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=1200)
        except BaseException as exc:  # a timeout, or pytest's: never leave dpkg running in the cache
            os.killpg(proc.pid, 9)
            proc.wait(timeout=60)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise EmulationUnavailable(f"debootstrap did not finish in {exc.timeout:g} s") from exc
            raise
    if proc.returncode != 0:
        tail = (entry / "debootstrap.log").read_text(errors="replace")[-2000:]
        raise EmulationUnavailable(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    cpu = root / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present"):
        (cpu / name).write_text("0\n")
    machine = _run(["chroot", str(root), "/usr/bin/python3", "-c", "import platform; print(platform.machine())"],
                   timeout=120, what="python3 in the new arm64 root").stdout.strip()
    if machine != "aarch64":
        raise EmulationUnavailable(f"python3 in the arm64 root reports machine {machine!r}, not aarch64")
    (entry / "build-seconds").write_text(f"{time.monotonic() - started:.1f}\n")


@contextmanager
def cached_root() -> Iterator[tuple[Path, bool]]:
    """(the cached, read-only arm64 root, True when this call built it); held in use until the context ends."""
    prepare_host()
    mirror = debian_mirror()
    kind = f"{ARCH}-{SUITE}-root"
    entry = f"{kind}-r{RECIPE}-{key_of(SUITE, ARCH, 'minbase', INCLUDE, mirror)}"
    with held_entry(kind, entry, lambda p: _debootstrap(p, mirror), keep=1, timeout_s=1500) as (path, built):
        yield path / "root", built


class EmulatedPi:
    """A writable copy of the cached root (overlayfs over it) with /proc mounted; commands run in it through chroot.

    ``close()`` kills what is still running inside, unmounts and removes the copy.
    """

    def __init__(self, lower: Path, work: Path) -> None:
        self.work = work
        self.root = work / "merged"
        self._mounts: list[Path] = []
        self._processes: list[subprocess.Popen[str]] = []
        for name in ("upper", "ovl-work", "merged"):
            (work / name).mkdir(parents=True)
        options = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'ovl-work'}"
        if subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
                          capture_output=True, timeout=30, check=False).returncode == 0:
            self._mounts.append(self.root)
        else:  # e.g. the cache itself on overlayfs: copy instead (slower, same result)
            logger.info("overlayfs unavailable, copying %s", lower)
            _run(["cp", "-a", f"{lower}/.", str(self.root)], timeout=600, what="copying the arm64 root")
        _run(["mount", "-t", "proc", "proc", str(self.root / "proc")], timeout=30, what="mounting /proc in the arm64 root")
        self._mounts.append(self.root / "proc")

    def path(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path in the root)."""
        return self.root / inside.lstrip("/")

    def command(self, argv: Sequence[str], *, user: str | None = None, env: Mapping[str, str] | None = None) -> list[str]:
        """The host command that runs ``argv`` in the root (as ``user``, with a clean environment plus ``env``).

        ``QEMU_CPU`` is in that environment because each exec starts a new qemu, which reads it.
        """
        home = "/root" if user is None else "/var/lib/fedge"
        clean = {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", "QEMU_CPU": EMULATED_CPU, **(env or {})}
        userspec = [f"--userspec={user}:{user}"] if user else []
        return ["chroot", *userspec, str(self.root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in clean.items()), *argv]

    def run(self, argv: Sequence[str], *, user: str | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the root and wait (TimeoutExpired after ``timeout``)."""
        return subprocess.run(self.command(argv, user=user, env=env), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start(self, argv: Sequence[str], *, user: str | None = None, env: Mapping[str, str] | None = None,
              stdout_path: Path, stderr_path: Path) -> subprocess.Popen[str]:
        """Start ``argv`` in the root in the background (output to the two files); killed by :meth:`close` if still running."""
        with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
            proc = subprocess.Popen(self.command(argv, user=user, env=env), stdout=out, stderr=err, text=True,
                                    start_new_session=True)
        self._processes.append(proc)
        return proc

    def close(self) -> None:
        """Kill leftovers, unmount (lazily if busy) and remove the copy."""
        for proc in self._processes:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
        for mount in reversed(self._mounts):
            if subprocess.run(["umount", str(mount)], capture_output=True, timeout=60, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60, check=False)
        if any(os.path.ismount(m) for m in self._mounts):
            logger.warning("could not unmount everything under %s; left in place", self.work)
            return
        shutil.rmtree(self.work, ignore_errors=True)
