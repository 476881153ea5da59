"""One CLI family: fedge and fedge-agent share --version, -v/-q anywhere, Examples + defaults in help, exit codes."""

from __future__ import annotations

import logging
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from device_agent.cli import build_parser
from sdk.cli.main import cli


def _leaves(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    if isinstance(command, click.Group):
        return [leaf for name, sub in sorted(command.commands.items()) for leaf in _leaves(sub, (*path, name))]
    return [(path, command)]


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *args], capture_output=True, text=True, timeout=60)


def test_both_commands_print_their_version():
    from device_agent import __version__

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedge {__version__}"
    agent = _agent("--version")
    assert agent.returncode == 0 and agent.stdout.strip() == f"fedge-agent {__version__}"


@pytest.mark.parametrize("path", [p for p, _ in _leaves(cli)], ids=" ".join)
def test_every_fedge_command_has_examples_defaults_and_verbosity(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output and "-v, --verbose" in result.output and "-q, --quiet" in result.output
    command = dict(_leaves(cli))[path]
    if any(isinstance(p, click.Option) and not p.count and not p.is_flag and not p.required
           and isinstance(p.default, (int, float, str)) for p in command.params):
        assert "[default:" in result.output


@pytest.mark.parametrize("name", ["install", "train", "evaluate", "run"])
def test_every_agent_command_has_examples_defaults_and_verbosity(name, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as caught:
        parser.parse_args([name, "--help"])
    out = capsys.readouterr().out
    assert caught.value.code == 0
    assert "Examples:" in out and "-v, --verbose" in out and "-q, --quiet" in out
    if name == "train":
        assert "(default: 32)" in out


def test_fedge_verbosity_works_before_and_after_the_subcommand(tmp_path):
    root = logging.getLogger()
    before = root.level
    try:
        for args in (["-v", "keys", "generate", "--out", str(tmp_path / "a")],
                     ["keys", "generate", "--out", str(tmp_path / "b"), "-v"]):
            assert CliRunner().invoke(cli, args).exit_code == 0
            assert root.level == logging.INFO
        assert CliRunner().invoke(cli, ["-v", "keys", "generate", "--out", str(tmp_path / "c"), "-v", "-q"]).exit_code == 0
        assert root.level == logging.INFO  # they add up: +1 +1 -1
        assert CliRunner().invoke(cli, ["keys", "generate", "--out", str(tmp_path / "d")]).exit_code == 0
        assert root.level == logging.WARNING
    finally:
        root.setLevel(before)


def test_agent_verbosity_works_before_and_after_the_subcommand():
    parser = build_parser()
    before = parser.parse_args(["-vv", "run", "--config", "x.toml"])
    after = parser.parse_args(["run", "--config", "x.toml", "-v", "-q", "-v"])
    assert (before.verbose, before.sub_verbose) == (2, 0)
    assert (after.verbose, after.sub_verbose, after.sub_quiet) == (0, 2, 1)


def test_usage_errors_are_one_line_with_exit_2_in_both():
    result = CliRunner().invoke(cli, ["simulate", "--rounds", "0"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--rounds" in result.stderr
    agent = _agent("run")
    assert agent.returncode == 2 and agent.stderr.count("\n") == 1 and "--config" in agent.stderr
    assert "Traceback" not in agent.stderr + result.stderr
