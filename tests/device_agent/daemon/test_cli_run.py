"""``fedge-agent run``: a round through the real entry point, bad configs, and SIGTERM in a torch-free process."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap

import pytest

from device_agent.cli import main
from device_agent.protocol.status import open_status
from tests.device_agent.daemon.fleet_harness import Probe, write_config

pytestmark = pytest.mark.mosquitto

NO_TORCH_CLI = textwrap.dedent(
    """
    import sys
    from device_agent.import_guard import ModuleBlocker

    sys.meta_path.insert(0, ModuleBlocker(("torch", "onnx", "sdk")))
    from device_agent.cli import main
    code = main(sys.argv[1:])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "sdk"))
    print("heavy=" + ",".join(heavy))
    print("tuf=" + str("tuf" in sys.modules))  # python-tuf loads only in a daemon that follows releases
    sys.exit(code)
    """
)


def test_cli_run_plays_a_round_and_prints_the_outcome(fleet, capsys):
    config = write_config(fleet.config_path, fleet.sections)
    peek = fleet.agent()  # installs the bundle; only used to read its initial weights
    weights = peek.trainer.global_reference
    peek.close()
    fleet.responder.publish_model(0, weights)

    assert main(["run", "--config", str(config), "--rounds", "1"]) == 0

    out = json.loads(capsys.readouterr().out)
    # auto picks ort-training where onnxruntime-training is installed (this host) and the bundle has both kinds
    assert out == {"device": "eu-dev-0001", "backend": "ort-training", "finished": 1, "stopped": False,
                   "rounds": [{"round": 0, "status": "accepted", "reason": "", "trained": True}]}
    assert [o.header.round for o in fleet.responder.opened] == [0]


def test_cli_run_reports_a_bad_config_key_and_exits_2(fleet, capsys):
    fleet.sections["broker"]["port"] = "eighty"
    config = write_config(fleet.config_path, fleet.sections)
    assert main(["run", "--config", str(config)]) == 2
    assert "broker.port: expected an integer" in capsys.readouterr().err


def test_cli_run_stops_cleanly_on_sigterm_without_importing_torch(fleet):
    config = write_config(fleet.config_path, fleet.sections)
    status = Probe(fleet.broker.port, "fedge/itest/dev/eu-dev-0001/status")
    keys = {"eu-dev-0001": fleet.keys.device.public_key()}
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH_CLI, "run", "--config", str(config), "--backend", "portable"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            first = status.next(timeout=30)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"no status from the agent within 30 s:\n{proc.communicate(timeout=10)[1][-3000:]}")
        online = open_status(first, device_keys=keys, fleet="itest", device="eu-dev-0001")
        assert online.online and online.bundle_version == 1 and online.region == "eu"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        offline = open_status(status.next(timeout=10), device_keys=keys, fleet="itest", device="eu-dev-0001")
    finally:
        if proc.poll() is None:
            proc.kill()
        status.close()
    assert proc.returncode == 0, err
    assert not offline.online and offline.sequence > online.sequence, "a clean stop publishes a signed offline status"
    lines = out.strip().splitlines()
    assert json.loads(lines[0]) == {"device": "eu-dev-0001", "backend": "portable", "finished": 0, "stopped": True,
                                    "rounds": []}
    assert lines[1] == "heavy="
    assert lines[2] == "tuf=False", "no [release] section: the daemon must not load python-tuf (3.3 MB)"
    # the start-up line names the backend at the default verbosity
    assert "training backend portable (onnxruntime " in err
