"""The fleet benchmark on a small real fleet: 20 devices, 2 regions, 1 round, real Mosquitto and aggregator processes.

One run (module fixture) is checked against what must hold exactly: every device's update accepted once with a
verified receipt, the global model equal to a plain numpy reference of the updates the devices sent (round 0 of
the default bounded influence: each update clipped to L2 norm 1, every device weighing the same), bytes through
the regional brokers at least the updates they carried, and the JSON written as summarised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdk.bench.fleet_bench import FleetBenchConfig, FleetRun, run_fleet_bench
from sdk.bench.fleet_load import device_delta
from sdk.bench.fleet_setup import SignedBundle
from sdk.bench.fleet_report import format_table, summarise, write_json, write_png
from sdk.cli.main import cli

CONFIG = FleetBenchConfig(devices=20, regions=2, rounds=1, agents=0, generators=1, deadline_s=120.0,
                          receipt_timeout_s=30.0, timeout_s=240.0)


@pytest.fixture(scope="module")
def fleet_run(bundle_factory, fleet_key) -> FleetRun:
    """One run on the suite's cached digits bundle (building the bench's own would cost a torch export)."""
    return run_fleet_bench(CONFIG, bundle=SignedBundle(path=bundle_factory("fedavg"), key=fleet_key))


@pytest.mark.mosquitto
@pytest.mark.slow
def test_fleet_bench_counts_every_update_once_and_the_global_model_matches_numpy(fleet_run: FleetRun, tmp_path: Path) -> None:
    summary = summarise(fleet_run)
    receipts = summary["receipts"]
    assert (receipts["expected"], receipts["accepted_once"], receipts["accepted_more_than_once"], receipts["missing"]) == (20, 20, 0, 0)
    assert sorted(fleet_run.accepted) == sorted(fleet_run.devices) and all(c == {0: 1} for c in fleet_run.accepted.values())
    assert summary["devices_by_region"] == {"r01": 10, "r02": 10}
    assert 0 < receipts["latency_ms"]["p50"] <= receipts["latency_ms"]["p95"] <= receipts["latency_ms"]["max"]
    assert receipts["latency_ms"]["count"] == 20

    # Round 0 under the default influence policy, written out in plain numpy: clip to norm 1, equal weights.
    initial = fleet_run.models[0]
    spec = {name: value.shape for name, value in initial.items()}
    deltas = [device_delta(spec, index=index, round=0, seed=CONFIG.seed) for _, index in fleet_run.devices.values()]
    clipped = []
    for delta in deltas:
        norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values()))
        clipped.append({n: v.astype(np.float64) * min(1.0, 1.0 / norm) for n, v in delta.items()})
    assert any(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in d.values())) > 1.0 for d in deltas), "nothing was clipped"
    for name, start in initial.items():
        expected = start.astype(np.float64) + np.mean([c[name] for c in clipped], axis=0)
        np.testing.assert_allclose(fleet_run.models[1][name], expected, rtol=0, atol=2e-6)
    assert summary["global_model_check"]["checked"] and summary["global_model_check"]["max_abs_diff"] < 2e-6

    rows = {row["name"]: row for row in summary["processes"]}
    assert set(rows) == {"broker root", "broker r01", "broker r02", "regional r01", "regional r02", "root", "generator 0"}
    update_bytes = summary["model"]["update_bytes"]
    for region in ("r01", "r02"):  # 10 updates in from the devices and out to the aggregator, each
        assert rows[f"broker {region}"]["bytes_in"] >= 10 * update_bytes
        assert rows[f"broker {region}"]["bytes_out"] >= 10 * update_bytes
    for row in rows.values():
        assert row["cpu_s"] is not None and row["cpu_s"] >= 0 and row["peak_rss_mb"] > 0
    assert len(summary["rounds"]["seconds"]) == 1 and summary["rounds"]["seconds"][0] > 0
    assert summary["saturation"]["busiest_process"] in rows

    services = summary["aggregator_metrics"]  # the aggregators' own counters agree: each update counted once, none lost
    assert sorted(services) == ["r01", "r02", "root"]
    assert [services[r]["accepted"] for r in ("r01", "r02", "root")] == [10, 10, 2]
    for figures in services.values():
        assert (figures["duplicates"], figures["rejected"], figures["inbox_dropped"], figures["service_dropped"]) == (0, 0, 0, 0)
        # Group commit: a region commits a batch of updates at once, so commits may be fewer than updates.
        assert figures["rounds_closed"] == 1 and figures["commits"] >= 1 and figures["commit_mean_ms"] > 0
    assert services["r01"]["receipts"] == 10 and services["r01"]["receipt_latency_mean_ms"] > 0

    out = tmp_path / "fleet.json"
    write_json(summary, out)
    write_png(summary, out.with_suffix(".png"))
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary)) and out.with_suffix(".png").stat().st_size > 0
    assert "20/20 accepted once" in format_table(summary)


def test_bench_fleet_cli_refuses_fewer_devices_than_regions() -> None:
    result = CliRunner().invoke(cli, ["bench", "fleet", "--devices", "3", "--regions", "4"])
    assert result.exit_code == 2 and "at least one device per region" in result.output


def test_fleet_topology_spreads_devices_evenly_and_agents_go_round_the_regions() -> None:
    from sdk.bench.fleet_setup import choose_agents, region_names, topology_text
    from sdk.fleet.spec import parse_fleet_spec

    spec = parse_fleet_spec(topology_text(devices=23, regions=4, deadline_s=60))
    assert [len(r.devices) for r in spec.topology.regions] == [6, 6, 6, 5]
    assert [r.name for r in spec.topology.regions] == list(region_names(4))
    by_region = {r.name: list(r.devices) for r in spec.topology.regions}
    assert choose_agents(region_names(4), by_region, 5) == ("r01-dev-0001", "r02-dev-0001", "r03-dev-0001", "r04-dev-0001",
                                                             "r01-dev-0002")
    with pytest.raises(ValueError, match="one device per region"):
        topology_text(devices=3, regions=4, deadline_s=60)


def test_fleet_report_divides_each_tier_by_the_updates_and_names_the_saturated_process() -> None:
    from sdk.bench.fleet_bench import Proc
    from sdk.bench.proc_stats import ProcSample

    def s(cpu: float, rss: float = 50.0, io: int = 0) -> ProcSample:
        return ProcSample(cpu_s=cpu, peak_rss_mb=rss, rss_mb=rss, read_bytes=io, written_bytes=2 * io)

    config = FleetBenchConfig(devices=4, regions=2, rounds=2, agents=0, generators=1)
    processes = [Proc(name="broker root", kind="broker", pid=1), Proc(name="broker r01", kind="broker", pid=2),
                 Proc(name="regional r01", kind="regional", pid=3), Proc(name="generator 0", kind="generator", pid=4)]
    before = {"broker root": s(1.0), "broker r01": s(1.0), "regional r01": s(2.0), "generator 0": s(0.0)}
    after = {"broker root": s(1.0), "broker r01": s(1.4, io=800), "regional r01": s(11.6), "generator 0": s(0.8)}
    sent = {"0": [1.0], "1": [5.0]}
    generator = {"devices": {f"d{k}": {"sent": sent, "receipts": [[1.5, ""], [5.25, ""]]} for k in range(4)},
                 "update_bytes": 100, "resends": 0, "seal_s": 0.1, "connect_s": 0.1, "cpu_serving_s": 0.8, "bad_models": 0}
    run = FleetRun(config=config, parameters=10, bundle_version=1, setup_s={}, model_times={0: 0.0, 1: 4.0, 2: 10.0},
                   processes=processes, before=before, after=after, window_s=10.0, machine_busy=0.5,
                   generator_results=[generator], agent_results={}, accepted={f"d{k}": {0: 1, 1: 1} for k in range(4)},
                   other_receipts=0, model_max_abs_diff=0.0, light_devices=4,
                   devices={"d0": ("r01", 0), "d1": ("r01", 1), "d2": ("r02", 2), "d3": ("r02", 3)},
                   service_metrics={"root": {"commits": 3, "commit_mean_ms": 1.0},
                                    "r01": {"commits": 8, "commit_mean_ms": 625.0}})
    summary = summarise(run)
    assert summary["rounds"]["seconds"] == [4.0, 6.0] and summary["rounds"]["updates_per_s"] == pytest.approx(8 / 10)
    assert summary["receipts"]["accepted_once"] == 8 and summary["receipts"]["missing"] == 0
    assert summary["receipts"]["latency_ms"]["p50"] == pytest.approx(375.0)  # 500 ms and 250 ms, four times each
    assert summary["per_update"]["regional aggregators"]["cpu_ms"] == pytest.approx(9600 / 8)
    assert summary["per_update"]["regional brokers"]["bytes_in"] == pytest.approx(800 / 8)
    assert summary["per_update"]["regional brokers"]["bytes_out"] == pytest.approx(1600 / 8)
    assert summary["per_update"]["regional aggregators"]["bytes_in"] is None  # Python's socket bytes are not in /proc io
    assert summary["saturation"]["busiest_process"] == "regional r01" and summary["saturation"]["heaviest_tier"] == "regional aggregators"
    assert summary["saturation"]["verdict"].startswith("one process: regional r01 at 96% of a core")
    assert summary["saturation"]["regional_commit_share"] == pytest.approx(8 * 0.625 / 10)  # the root's commits left out
