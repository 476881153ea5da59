"""Who gets in: ``fedge dashboard`` refuses to expose itself, enforces Basic auth, serves HTTPS (real processes, loopback)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sdk.broker_config.pki import create_ca, issue_server_cert
from tests.sdk.dashboard.process import REPO, DashboardProcess

PASSWORD = "correct-horse-battery"


def _config(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.keys import save_public_key

    (tmp_path / "keys").mkdir()
    save_public_key(Ed25519PrivateKey.generate().public_key(), tmp_path / "keys" / "dev-1.pub")
    path = tmp_path / "dashboard.toml"
    path.write_text('fleet = "f"\n[registries]\neu = "keys"\n[server]\nport = 0\n')
    auth = tmp_path / "auth"
    auth.write_text(f"ops:{PASSWORD}\n")
    auth.chmod(0o600)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from sdk.cli.main import main; main()", "dashboard", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def _get(url: str, *, user: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_dashboard_refuses_to_leave_loopback_unprotected(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bare = _cli("--config", str(config), "--bind", "0.0.0.0", "--max-seconds", "1")
    assert bare.returncode == 2 and bare.stderr.count("\n") == 1 and "without authentication" in bare.stderr, bare.stderr
    clear = _cli("--config", str(config), "--bind", "0.0.0.0", "--auth-file", str(tmp_path / "auth"), "--max-seconds", "1")
    assert clear.returncode == 2 and "clear text" in clear.stderr and "Traceback" not in clear.stderr, clear.stderr
    neither = _cli("--max-seconds", "1")
    assert neither.returncode == 2 and "--config FILE or --fleet DIR" in neither.stderr, neither.stderr
    (tmp_path / "auth").chmod(0o644)
    shared = _cli("--config", str(config), "--auth-file", str(tmp_path / "auth"), "--max-seconds", "1")
    assert shared.returncode == 2 and "chmod 600" in shared.stderr, shared.stderr


def test_dashboard_with_an_auth_file_asks_everyone_but_the_health_check(tmp_path: Path) -> None:
    config = _config(tmp_path)
    board = DashboardProcess(config, tmp_path / "log", "--auth-file", str(tmp_path / "auth"))
    try:
        for path in ("", "api/snapshot", "events", "plots/accuracy.svg", "static/dashboard.js"):
            code, headers, _ = _get(board.url + path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            assert _get(board.url + path, user="ops:wrong-password-x")[0] == 401
        code, headers, body = _get(board.url + "api/snapshot", user=f"ops:{PASSWORD}")
        assert code == 200 and json.loads(body)["fleet"] == "f" and headers["X-Content-Type-Options"] == "nosniff"
        assert _get(board.url + "healthz")[0] == 200
        assert _get(board.url + "static/../dashboard.toml", user=f"ops:{PASSWORD}")[0] == 404
    finally:
        assert board.stop() == 0


def test_dashboard_serves_https_with_a_certificate(tmp_path: Path) -> None:
    config = _config(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    ca = create_ca("test CA", now=now)
    server = issue_server_cert(ca, hosts=["127.0.0.1"], now=now, valid_days=1)
    (tmp_path / "cert.pem").write_bytes(server.cert_pem)
    (tmp_path / "key.pem").write_bytes(server.key_pem)
    board = DashboardProcess(config, tmp_path / "log", "--tls-cert", str(tmp_path / "cert.pem"),
                             "--tls-key", str(tmp_path / "key.pem"))
    try:
        assert board.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        code, _, body = _get(board.url + "api/snapshot", context=context)
        assert code == 200 and json.loads(body)["fleet"] == "f"
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP gets no answer
            _get(board.url.replace("https", "http") + "api/snapshot")
    finally:
        assert board.stop() == 0
