"""``fedge broker-config`` (``python -m sdk.broker_config``) commands."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sdk.broker_config.cli import broker_config

EXAMPLE = Path(__file__).resolve().parents[3] / "broker_config" / "topology.toml"


def test_cli_generate_writes_every_broker_and_reports_paths(tmp_path: Path) -> None:
    result = CliRunner().invoke(broker_config, ["generate", "--topology", str(EXAMPLE), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "keep it offline" in result.output
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"root", "eu", "us", "credentials", "pki"}


def test_cli_reports_topology_errors_and_non_empty_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fleet]\nname = 'x'\n")
    result = CliRunner().invoke(broker_config, ["generate", "--topology", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "missing 'root'" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    result = CliRunner().invoke(broker_config, ["generate", "--topology", str(EXAMPLE), "--out", str(tmp_path / "full")])
    assert result.exit_code != 0 and "not empty" in result.output


def test_cli_render_examples_writes_no_secrets(tmp_path: Path) -> None:
    result = CliRunner().invoke(broker_config, ["render-examples", "--topology", str(EXAMPLE), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.rglob("passwords")) and not list(tmp_path.rglob("*.key"))
    assert (tmp_path / "eu" / "conf.d" / "bridge-root.conf").is_file()
