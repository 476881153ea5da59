#!/bin/sh
# Install the fedge device agent on Raspberry Pi OS Lite (bookworm, 64-bit) from the firmware overlay.
#
#   sudo sh install.sh fedge-overlay-bookworm-arm64.tar.gz [PROVISIONING_DIR]
#
# Checks the tar against TAR.sha256 when that file lies beside it, checks the machine
# (aarch64) and its Python (the overlay's version), stops a running agent, replaces
# /opt/fedge, runs `fedge-device-setup system` (user fedge, /etc/fedge, /var/lib/fedge,
# unit enabled), installs the sensor adapter lying beside this script (sensor_windows.py as
# /opt/fedge/bin/fedge-sensor-windows, fedge-sensor.service not enabled: its input is yours
# to choose) and, given a provisioning directory (agent.toml + keys/ + bundles/), installs
# it, which starts the agent. Nothing else on the system is touched.
# Also runs in a chroot (pi-gen stage, emulated root): systemd is used only when running.
# Exit codes: 0 ok, 1 failure, 2 usage error.
set -eu

die() { echo "install.sh: error: $*" >&2; exit 1; }
[ $# -ge 1 ] && [ $# -le 2 ] || { sed -n '4p' "$0" | sed 's/^# *//' >&2; exit 2; }
tarball=$1
provision=${2:-}
[ "$(id -u)" = 0 ] || die "run as root (sudo sh install.sh ...)"
[ -f "$tarball" ] || die "$tarball does not exist"
[ -z "$provision" ] || [ -f "$provision/agent.toml" ] || die "$provision has no agent.toml"

if [ -f "$tarball.sha256" ]; then
    expected=$(cut -d' ' -f1 "$tarball.sha256")
    actual=$(sha256sum "$tarball" | cut -d' ' -f1)
    [ "$expected" = "$actual" ] || die "$tarball does not match $tarball.sha256"
    echo "install.sh: $tarball matches its SHA-256"
fi

machine=$(uname -m)
[ "$machine" = aarch64 ] || die "this overlay is for aarch64 (64-bit Raspberry Pi OS); this machine is $machine"
want=$(tar -xzOf "$tarball" opt/fedge/share/fedge-overlay.json | sed -n 's/.*"python": "\([0-9.]*\)".*/\1/p')
have=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "/usr/bin/python3 is missing (apt-get install python3)"
[ "$want" = "$have" ] || die "the overlay was built for Python $want, /usr/bin/python3 is $have (rebuild it with --python-version $have)"

if [ -d /run/systemd/system ] && systemctl is-active --quiet fedge-agent.service; then
    systemctl stop fedge-agent.service
    echo "install.sh: stopped fedge-agent (its pending update stays in /var/lib/fedge)"
fi
# Replace the venv whole, so files of packages a new overlay no longer has do not linger.
rm -rf /opt/fedge/venv
tar -xzf "$tarball" -C / --numeric-owner
echo "install.sh: installed /opt/fedge ($(du -sh /opt/fedge | cut -f1))"

here=$(dirname "$0")
if [ -f "$here/sensor_windows.py" ]; then
    install -D -m 0644 "$here/sensor_windows.py" /opt/fedge/libexec/sensor_windows.py
    install -d /opt/fedge/bin
    printf '#!/bin/sh\nexec /opt/fedge/venv/bin/python3 -I /opt/fedge/libexec/sensor_windows.py "$@"\n' \
        > /opt/fedge/bin/fedge-sensor-windows.new
    chmod 0755 /opt/fedge/bin/fedge-sensor-windows.new
    mv /opt/fedge/bin/fedge-sensor-windows.new /opt/fedge/bin/fedge-sensor-windows
    [ ! -f "$here/fedge-sensor.service" ] || install -m 0644 "$here/fedge-sensor.service" /etc/systemd/system/fedge-sensor.service
    echo "install.sh: installed /opt/fedge/bin/fedge-sensor-windows (and fedge-sensor.service, not enabled)"
fi

/opt/fedge/sbin/fedge-device-setup system
if [ -n "$provision" ]; then
    /opt/fedge/sbin/fedge-device-setup provision "$provision"
else
    echo "install.sh: next: sudo /opt/fedge/sbin/fedge-device-setup provision DIR (agent.toml, keys/, bundles/)"
fi
