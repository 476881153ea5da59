"""The controller's release stage on the dashboard, in headless Chromium, from the TUF metadata the root retains.

A fleet from ``fedge fleet init`` runs its brokers (real Mosquitto, generated
ACLs: the monitoring account reads ``release/metadata/#`` and nothing of the
bundle); ``fedge dashboard --fleet`` (a real process) serves the page. No
devices are needed: the stage is the rollout role's signed word, not the
devices'. ``fedge release publish`` (a canary) must appear as ``canary`` with
its canary share and expiry, and ``fedge release halt`` must turn it into
``halted`` with the operator's reason, live, without a reload.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.demo.brokers import broker_owner, free_port
from sdk.fleet.day2 import open_fleet
from sdk.fleet.provision import init_fleet
from sdk.fleet.spec import parse_fleet_spec
from sdk.fleet.up import FleetRunner
from tests.mosquitto_broker import reachable_dir
from tests.sdk.dashboard.browser import screenshot, wait_until
from tests.sdk.dashboard.process import DashboardProcess
from tests.sdk.fleet.conftest import loopback_topology
from tests.sdk.fleet.test_fleet_live import run, tool

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

_READ = """
const out = {};
for (const tr of document.querySelectorAll('#rollout tbody tr')) {
  const cells = {};
  for (const td of tr.querySelectorAll('td')) { if (td.className) cells[td.className] = td.innerText; }
  out[tr.dataset.release] = cells;
}
return out;
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = reachable_dir("fedge-dash-release-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_dashboard_shows_the_release_stage_from_the_verified_metadata(browser, workdir: Path, fleet_key,
                                                                      bundle_factory) -> None:
    ports = {site: (free_port(), free_port()) for site in ("root", "eu", "us")}
    text = loopback_topology(ports)
    fleet_dir = workdir / "fleet"
    bundle = bundle_factory("fedavg")
    init_fleet(parse_fleet_spec(text), fleet_dir, topology_text=text, fleet_key=fleet_key, bundle=bundle,
               owner=broker_owner())
    runner = FleetRunner(open_fleet(fleet_dir), sites=["root", "eu", "us"], services=False)
    runner.start()
    dashboard = None
    try:
        dashboard = DashboardProcess(fleet_dir, workdir / "dashboard.log", source="--fleet")
        browser.get(dashboard.url)
        note = lambda: browser.execute_script("return document.getElementById('rollout-note').innerText;")  # noqa: E731
        rows = lambda: browser.execute_script(_READ)  # noqa: E731
        wait_until(lambda: "live" == browser.execute_script("return document.getElementById('live').innerText;"), 20,
                   "the first live update")
        assert rows() == {} and "not configured" not in note(), note()

        run(tool(["fedge", "release", "publish", str(fleet_dir), str(bundle), "--canary", "eu-dev-0001",
                  "--expires", "2d"]), workdir)
        canary = wait_until(lambda: rows().get("1") if rows().get("1", {}).get("stage") == "canary" else None, 30,
                            "release 1 shown as canary")
        assert canary["canary"] == "1 of 4 (25.0%)", canary
        assert canary["bundle"].startswith("digits-mlp v") and canary["why"] == "published", canary
        assert "expired" not in canary["expires"] and canary["expires"].strip(), canary
        assert "verified" in note(), note()

        run(tool(["fedge", "release", "halt", str(fleet_dir), "1", "--reason", "accuracy drop in eu"]), workdir)
        halted = wait_until(lambda: rows().get("1") if rows().get("1", {}).get("stage") == "halted" else None, 30,
                            "release 1 shown as halted")
        assert halted["why"] == "accuracy drop in eu", halted
        assert screenshot(browser, "dashboard-release-stage.png").stat().st_size > 5_000
        assert "Traceback" not in dashboard.text(), dashboard.text()[-3000:]
    finally:
        if dashboard is not None:
            dashboard.stop()
        runner.stop()
