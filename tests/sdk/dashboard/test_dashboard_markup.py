"""Whatever a device puts in its status reaches the page as text, never as markup (headless Chromium, real Mosquitto).

A registered device publishes a correctly signed status whose free-text
fields (round reason, release reason) hold HTML, script and mathtext; an
impostor publishes a status signed with a key the registry does not know.
The page must show the first one's strings exactly as characters, run
nothing, create no element from them, and count the impostor's as refused.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.keys import save_public_key
from device_agent.protocol.status import DeviceStatus, ReleaseStatus, sign_status
from device_agent.protocol.topics import TopicLayout
from tests.mosquitto_broker import MosquittoFactory
from tests.sdk.aggregator_service.harness import Observer
from tests.sdk.dashboard.browser import screenshot, wait_until
from tests.sdk.dashboard.process import DashboardProcess

pytestmark = pytest.mark.mosquitto

LAYOUT = TopicLayout(fleet="markup")
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">$\\alpha$ </td><script>document.body.dataset.pwned=2</script>'
HOSTILE_RELEASE = "<b>bold</b> &amp; <a href=javascript:alert(1)>link</a> $x^2$"
DEVICE = "eu-dev:1@site.a-b"  # every character an id may hold


def _status(device: str, *, sequence: int, key: Ed25519PrivateKey, **fields: object) -> bytes:
    status = DeviceStatus(fleet="markup", region="eu", device=device, sequence=sequence, timestamp_ms=int(time.time() * 1000),
                          online=True, agent_version="0.1.0", bundle_model="m", bundle_version=2, backend="ort-training",
                          **fields)
    return sign_status(status, signer_key=key)


def test_status_text_is_rendered_as_text_never_markup(mosquitto: MosquittoFactory, browser, tmp_path: Path) -> None:
    broker = mosquitto.start()
    device_key, impostor_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = tmp_path / "keys"
    keys.mkdir()
    save_public_key(device_key.public_key(), keys / f"{DEVICE}.pub")
    save_public_key(device_key.public_key(), keys / "other.pub")  # "other" is registered, but not with the impostor's key
    config = tmp_path / "dashboard.toml"
    config.write_text(f"""fleet = "markup"
push_interval_s = 0.3

[registries]
eu = "{keys}"

[mqtt]
host = "127.0.0.1"
port = {broker.port}
role = "region"
region = "eu"

[server]
port = 0
""")
    publisher = Observer(broker.port, client_id="publisher")
    dashboard = DashboardProcess(config, tmp_path / "dashboard.log")
    try:
        publisher.publish(LAYOUT.device_status(DEVICE), _status(
            DEVICE, sequence=1, key=device_key, last_round=3, last_round_status="rejected", last_round_reason=HOSTILE,
            last_loss=float("nan"), last_val_accuracy=0.5,
            release=ReleaseStatus(state="refused", version=3, progress=0, reason=HOSTILE_RELEASE)), retain=True)
        publisher.publish(LAYOUT.device_status("other"), _status("other", sequence=1, key=impostor_key,
                                                                 last_round_reason="<i>forged</i>"), retain=True)

        browser.get(dashboard.url)
        reason = wait_until(lambda: browser.execute_script(
            "const c = document.querySelector('#devices tbody tr td.reason'); return c ? c.textContent : null;"),
            20, "the device's row")
        assert reason == f"{HOSTILE} / {HOSTILE_RELEASE}"
        wait_until(lambda: "status (forged or unknown key) 1" in browser.execute_script("return document.getElementById('refused').textContent;"),
                   20, "the impostor's status counted as refused")
        found = browser.execute_script("""
            return {
              pwned: document.body.dataset.pwned === undefined ? null : document.body.dataset.pwned,
              images: document.querySelectorAll('main img').length,
              scripts: document.scripts.length,
              links: document.querySelectorAll('a').length,
              bold: document.querySelectorAll('b, i').length,
              device: document.querySelector('#devices tbody tr td.device').textContent,
              rows: document.querySelectorAll('#devices tbody tr').length,
              release: document.querySelector('#devices tbody tr td.release').textContent,
            };""")
        assert found == {"pwned": None, "images": 2, "scripts": 1, "links": 0, "bold": 0, "device": DEVICE, "rows": 1,
                         "release": "refused v3"}, found
        screenshot(browser, "dashboard-markup.png")

        with urllib.request.urlopen(dashboard.url + "api/snapshot", timeout=5) as response:
            csp = response.headers["Content-Security-Policy"]
            snapshot = json.loads(response.read())
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        [row] = snapshot["devices"]
        assert row["reason"] == HOSTILE and row["release"]["reason"] == HOSTILE_RELEASE and row["loss"] is None
        assert row["loss_text"] == "nan"
        assert snapshot["refused_messages"] == {"status (forged or unknown key)": 1}
        with urllib.request.urlopen(dashboard.url + "plots/accuracy.svg", timeout=5) as response:
            svg = response.read().decode()
        assert "<script" not in svg and "pwned" not in svg
    finally:
        publisher.close()
        assert dashboard.stop() == 0, dashboard.text()[-3000:]
    assert "Traceback" not in dashboard.text()
