"""The dashboard in headless Chromium against a running fleet on real Mosquitto.

The demo's fleet (root + two bridged regional brokers with generated ACLs
and the read-only monitoring account, the root and regional aggregator
services with their /metrics endpoints, four real device agents that
measure validation accuracy on a held-out split) runs while ``fedge
dashboard`` (a real process, reading only through the monitoring account
and the endpoints) serves the page. The test loads the page before the
devices start, waits for the live updates, reads the rendered text and
checks the devices, their bundle versions and the round against the truth
(the fleet's files and the root's own metrics). A screenshot is kept under
test-artifacts/ (gitignored).
"""

from __future__ import annotations

import queue
import shutil
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.archive import install_bundle
from device_agent.keys import save_public_key
from device_agent.trainer import DeviceTrainer
from sdk.aggregator.metrics_endpoint import MetricsEndpoint
from sdk.demo import DemoSettings
from sdk.demo.brokers import LOOPBACK, BrokerSet
from sdk.demo.devices import DeviceEvent, DeviceFailed, DeviceWorker
from sdk.demo.fleet import MODEL_NAME, prepare_fleet
from sdk.demo.run import make_workdir
from sdk.demo.services import regional_thread, root_thread
from tests.sdk.aggregator_service.scrape import scrape
from tests.sdk.dashboard.browser import screenshot, wait_until
from tests.sdk.dashboard.process import DashboardProcess

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

#: How far behind the root the page may be: its scrape and push intervals (0.5 + 0.5 s) and slack for a loaded machine.
PAGE_LAG_S = 3.0
SETTINGS = DemoSettings(devices=4, rounds=1000, epochs=1, round_deadline_s=30.0, timeout_s=120.0)
LIMIT_S = 150.0
#: Devices play rounds until the test stops them (rounds=1000 is never reached): they stay online while it reads.


_READ_ROWS = """
const rows = {};
for (const tr of document.querySelectorAll('#devices tbody tr')) {
  const cells = {};
  for (const td of tr.querySelectorAll('td')) { if (td.className) cells[td.className] = td.innerText; }
  rows[tr.dataset.device] = cells;
}
return rows;
"""


def _rows(driver) -> dict[str, dict[str, str]]:
    """The devices table as rendered: device -> {column class: text} (read in one script: the table is live)."""
    return driver.execute_script(_READ_ROWS)


def _text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').innerText;")


def test_dashboard_shows_a_running_fleet_live_in_chromium(browser, tmp_path: Path) -> None:
    workdir = make_workdir()
    try:
        fleet = prepare_fleet(SETTINGS, workdir)
        devices = []
        for device in fleet.devices:  # devices report validation accuracy on their held-out split
            val = device.config.data.path.parent / "val.npz"
            np.savez(val, x=device.test.x, y=device.test.y)
            devices.append(replace(device, config=replace(device.config, data=replace(device.config.data,
                                                                                      validation_path=val))))
        bundle = install_bundle(fleet.bundle_path, fleet.fleet_public_key, workdir / "root-bundle")
        initial = DeviceTrainer(bundle).get_shared()
        spec, version = bundle.manifest.shared_spec(), bundle.manifest.bundle_version
        (workdir / "aggregators").mkdir()
        for region in fleet.regions:  # each region's registry, as its aggregator keeps it
            (tmp_path / region).mkdir()
        for device in devices:
            save_public_key(device.public_key, tmp_path / device.region / f"{device.device_id}.pub")
        registries = "\n".join(f'{region} = "{tmp_path / region}"' for region in fleet.regions)
        with ExitStack() as stack:
            stack.enter_context(BrokerSet(fleet.generated))
            services = [regional_thread(fleet, region, spec=spec, bundle_version=version,
                                        deadline_s=SETTINGS.round_deadline_s, max_seconds=LIMIT_S) for region in fleet.regions]
            services.append(root_thread(fleet, initial=initial, spec=spec, bundle_version=version,
                                        deadline_s=SETTINGS.round_deadline_s, max_seconds=LIMIT_S))
            for service in services:
                stack.callback(service.stop)
                service.start()
            endpoints = []
            for service in services:
                assert service.service is not None
                endpoints.append(MetricsEndpoint(host=LOOPBACK, port=0, registry=service.service.metrics.registry,
                                                 health=service.service.health).start())
                stack.callback(endpoints[-1].close)
            root_url = endpoints[-1].url
            config = tmp_path / "dashboard.toml"
            monitor = fleet.generated.credential_files[fleet.generated.topology.monitor]
            config.write_text(f"""fleet = "demo"
metrics = [{", ".join(f'"{e.url}"' for e in endpoints)}]
scrape_interval_s = 0.5
push_interval_s = 0.5

[registries]
{registries}

[model_keys]
root = "{workdir / 'keys' / 'root.pub'}"

[mqtt]
credentials = "{monitor}"
role = "root"

[server]
port = 0
""")
            dashboard = DashboardProcess(config, tmp_path / "dashboard.log")
            stack.callback(dashboard.stop)

            browser.get(dashboard.url)
            wait_until(lambda: _text(browser, "live") == "live", 20, "the first live update")
            wait_until(lambda: _text(browser, "round") == "0 (collecting)", 20, "round 0 before devices")
            first_version = int(browser.execute_script("return document.body.dataset.version;"))
            assert _rows(browser) == {}

            events: queue.Queue[DeviceEvent] = queue.Queue()
            workers = [DeviceWorker(device, rounds=SETTINGS.rounds, events=events) for device in devices]
            for worker in workers:
                stack.callback(worker.join)
                stack.callback(worker.request_stop)
                worker.start()

            # Live: without a reload, every device appears online with its version, a finished round and an accuracy.
            def all_reported() -> dict[str, dict[str, str]] | None:
                while not events.empty():
                    event = events.get_nowait()
                    assert not isinstance(event, DeviceFailed), f"device {event.device} failed: {event.error}"
                rows = _rows(browser)
                ready = len(rows) == len(devices) and all(
                    r["online"] == "online" and r["round"] not in ("", "\u2013") and int(r["round"]) >= 1
                    and r["accuracy"] not in ("", "\u2013") for r in rows.values())
                return rows if ready else None

            rows = wait_until(all_reported, 90, "every device online with a round >= 1 and an accuracy")
            assert isinstance(rows, dict)
            assert set(rows) == {d.device_id for d in devices}
            assert {r["version"] for r in rows.values()} == {f"{MODEL_NAME} v{version}"}
            for r in rows.values():
                assert 0.0 <= float(r["accuracy"]) <= 1.0
            assert int(browser.execute_script("return document.body.dataset.version;")) > first_version

            # The round shown is the root's (its own metrics say which). Rounds keep moving (about one a second with
            # batched receipts) and the page is up to a scrape plus a push behind (0.5 + 0.5 s, more under load), so
            # the page's round must lie between the root's round read up to PAGE_LAG_S before and the one read after.
            root_rounds: list[tuple[float, int]] = []

            def agrees() -> bool:
                root_rounds.append((time.monotonic(), int(scrape(root_url).value("fedge_round_current"))))
                shown = browser.execute_script("return document.getElementById('round').dataset.round;")
                after = int(scrape(root_url).value("fedge_round_current"))
                before = min(r for t, r in root_rounds if t >= root_rounds[-1][0] - PAGE_LAG_S)
                return shown != "" and 1 <= before <= int(shown) <= after

            wait_until(agrees, 20, "the page's round to be the root's fedge_round_current")
            online = _text(browser, "online")
            assert online == f"{len(devices)} / {len(devices)}", online
            regions = _text(browser, "regions")
            for region in fleet.regions:
                assert region in regions
            aggregators = _text(browser, "aggregators")
            assert aggregators.count("connected") >= 3 and "down" not in aggregators, aggregators
            wait_until(lambda: "region" in _text(browser, "rounds"), 20, "closed rounds in the table")
            for image in ("plot-accuracy", "plot-updates"):
                wait_until(lambda: browser.execute_script(
                    f"const i = document.getElementById('{image}'); return i.complete && i.naturalWidth > 0;"),
                    20, f"{image} drawn")
            time.sleep(1.0)  # let the plots catch up with the last snapshot before the picture
            shot = screenshot(browser, "dashboard-live-fleet.png")
            assert shot.stat().st_size > 10_000
            assert "Traceback" not in dashboard.text(), dashboard.text()[-3000:]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
