"""fedge release: one-line errors with the family's exit codes, before anything is signed or sent."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sdk.cli.main import cli


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_release_commands_need_a_fleet_with_a_repository(tmp_path: Path) -> None:
    result = _run("release", "status", str(tmp_path))
    assert result.exit_code == 2 and "not a fleet directory" in result.output
    assert "Traceback" not in result.output


def test_release_publish_option_conflicts_are_usage_errors(tmp_path: Path, bundle_factory) -> None:
    bundle = bundle_factory("fedavg")
    result = _run("release", "publish", str(tmp_path), str(bundle), "--no-canary", "--canary", "eu-1")
    assert result.exit_code == 2 and "--no-canary cannot be combined" in result.output
    result = _run("release", "publish", str(tmp_path), str(bundle), "--no-canary", "--expires", "soon")
    assert result.exit_code == 2 and "--expires" in result.output and "not a duration" in result.output
    result = _run("release", "controller", str(tmp_path), "--canary-timeout", "1w")
    assert result.exit_code == 2 and "--canary-timeout" in result.output


def test_release_controller_interval_and_roles_are_checked(tmp_path: Path) -> None:
    result = _run("release", "controller", str(tmp_path), "--interval", "0")
    assert result.exit_code == 2 and "--interval" in result.output
    result = _run("release", "rotate", str(tmp_path), "nonsense")
    assert result.exit_code == 2 and "nonsense" in result.output
