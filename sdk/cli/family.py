"""What every ``fedge`` command shares with ``fedge-agent`` (docs/cli.md): errors, exit codes, verbosity, examples.

- **Exit codes**: 0 ok, 1 failure (the command ran and failed or refused),
  2 usage or input error (an option, a path, a file's content).
- **Errors** are one line on stderr, ``<command path>: error: <message>``, never
  a traceback: click's usage errors lose their usage block, an unreadable or
  unwritable path (OSError) becomes an input error naming it, and a fedge
  error (``FedgeError``) a failure, or an input error for a malformed input.
- **Logging**: ``-v``/``-vv`` (info/debug) and ``-q`` (one level quieter) are
  accepted before and after the subcommand; they add up from the command's
  default level: WARNING, or INFO for the long-running services (aggregators,
  dashboard), which say what they do (:func:`service_logging`).
  ``--log-format text|json`` (also before or after) picks human lines or JSON Lines.
- **Help** shows every default and ends with an Examples section (:func:`examples`).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from device_agent.bundle.install_policy import BundleDowngradeError
from device_agent.data import DataFileError
from device_agent.errors import BundleVerificationError, FedgeError, TrainingError
from device_agent.logformat import LOG_FORMATS, install_handler

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_K = TypeVar("_K")
_VERBOSITY_KEY = "fedge.verbosity"
_BASE_LEVEL_KEY = "fedge.base_level"
_LOG_FORMAT_KEY = "fedge.log_format"
#: fedge errors that mean the input itself is unusable (exit 2); other fedge errors are failures (exit 1).
_REFUSED = (BundleVerificationError, BundleDowngradeError, TrainingError)


class InputError(click.ClickException):
    """An unusable input (option value, path, file content): one line naming it, exit 2."""

    exit_code = EXIT_USAGE


def examples(*lines: str) -> str:
    """A help epilog listing example command lines (click keeps the ``\\b`` block as written)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def one_line(text: str) -> str:
    """``text`` on one line: its non-empty lines joined with '; '."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def input_error(exc: BaseException) -> InputError:
    """An :class:`InputError` for an OSError (naming the path) or a malformed-input error."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return InputError(f"{exc.filename}: {exc.strerror or exc}")
    return InputError(str(exc))


def apply_verbosity(ctx: click.Context) -> None:
    """Set the root logger's level from the ``-v``/``-q`` flags seen so far in this run, counted from the
    command's default level (WARNING; INFO after :func:`service_logging`)."""
    meta = ctx.find_root().meta
    level = meta.get(_BASE_LEVEL_KEY, logging.WARNING) - 10 * meta.get(_VERBOSITY_KEY, 0)
    logging.getLogger().setLevel(min(max(level, logging.DEBUG), logging.CRITICAL))


def configure_logging(ctx: click.Context) -> None:
    """Install the stderr handler in the ``--log-format`` seen so far (text by default) and apply the level."""
    install_handler(ctx.find_root().meta.get(_LOG_FORMAT_KEY, "text"))
    apply_verbosity(ctx)


def service_logging(ctx: click.Context) -> None:
    """Make INFO the default level of this run: a service logs its start, connections, rounds and forwarding
    without ``-v`` (``-q`` brings it back to warnings)."""
    ctx.find_root().meta[_BASE_LEVEL_KEY] = logging.INFO
    apply_verbosity(ctx)


def load_key(option: str, path: Path, loader: Callable[[Path], _K]) -> _K:
    """``loader(path)``, or an InputError naming ``option`` and the file (with a hint when a private key was given)."""
    try:
        return loader(path)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot read: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        text = path.read_bytes()[:4096] if path.is_file() else b""
        if b"PRIVATE KEY" in text:
            raise InputError(f"{option} {path}: this is a private key; pass its public key (the .pub file)") from exc
        if b"PUBLIC KEY" in text:
            raise InputError(f"{option} {path}: a public key was given where a private key is needed") from exc
        raise InputError(f"{option} {path}: not a usable key: {one_line(str(exc))}") from exc


def write_error(option: str, path: Path, exc: OSError) -> InputError:
    """An InputError naming ``option`` and the path that could not be written (and which ancestor is a file)."""
    blocker = next((a for a in path.parents if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return InputError(f"{option} {path}: cannot write: {blocker} is a file, not a directory")
    return InputError(f"{option} {path}: cannot write: {exc.strerror or exc}")


def check_writable(option: str, path: Path) -> None:
    """Fail fast (InputError naming ``option``) when ``path`` cannot be written: before minutes of work, not after."""
    if path.is_dir():
        raise InputError(f"{option} {path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise write_error(option, path, exc) from exc


def _set_level(ctx: click.Context, param: click.Parameter, value: int) -> None:
    """Add this flag's count to the run's verbosity and apply it."""
    if value:
        meta = ctx.find_root().meta
        meta[_VERBOSITY_KEY] = meta.get(_VERBOSITY_KEY, 0) + (-value if param.name == "quiet" else value)
        apply_verbosity(ctx)


def _set_format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Remember ``--log-format`` (the last one given wins) and reformat the handler when it is installed."""
    if value is not None:
        ctx.find_root().meta[_LOG_FORMAT_KEY] = value
        install_handler(value)


def verbosity_options() -> list[click.Option]:
    """Fresh ``-v``/``-q``/``--log-format`` options (not passed to the command function: they only set up logging)."""
    return [
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_set_level, is_eager=True,
                     show_default=False, help="More logging: -v info, -vv debug (also after the subcommand)."),
        click.Option(["-q", "--quiet"], count=True, expose_value=False, callback=_set_level, is_eager=True,
                     show_default=False, help="Less logging: -q one level quieter (errors only for most commands)."),
        click.Option(["--log-format"], type=click.Choice(LOG_FORMATS), default=None, expose_value=False,
                     callback=_set_format, is_eager=True, show_default=False,
                     help="Log lines as text (default) or JSON Lines on stderr (also after the subcommand)."),
    ]


def add_verbosity_everywhere(command: click.Command) -> None:
    """Give every leaf command under ``command`` the ``-v``/``-q`` options (a group gets them via its own decorator)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_verbosity_everywhere(sub)
        return
    names = {opt for p in command.params for opt in getattr(p, "opts", ())}
    if "-v" not in names and "-q" not in names:
        command.params.extend(verbosity_options())


class FedgeGroup(click.Group):
    """The top-level group: one-line errors with the family's exit codes, for the console script and CliRunner alike."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; OSError and fedge errors that escape it become one-line click errors."""
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except _REFUSED as exc:
            raise click.ClickException(str(exc)) from exc
        except (OSError, FedgeError, DataFileError) as exc:
            raise input_error(exc) from exc

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Like click's, but every error is printed as one line (no usage block) before exiting 1 or 2."""
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            _exit(exc.exit_code)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else (prog_name or self.name or "fedge")
            _fail(f"{path}: error: {one_line(exc.format_message())} (see '{path} --help')", EXIT_USAGE)
        except click.ClickException as exc:
            _fail(f"{prog_name or self.name or 'fedge'}: error: {one_line(exc.format_message())}", exc.exit_code)
        except click.Abort:
            _fail("Aborted!", EXIT_FAILURE)
        except KeyboardInterrupt:
            _fail("Aborted!", EXIT_FAILURE)
        # Without standalone mode click returns ctx.exit()'s code (--help, --version) instead of exiting.
        _exit(code if isinstance(code, int) else EXIT_OK)


def _fail(line: str, code: int) -> NoReturn:
    click.echo(line, err=True)
    _exit(code)


def _exit(code: int) -> NoReturn:
    sys.exit(code)

