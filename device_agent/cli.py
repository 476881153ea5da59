"""``fedge-agent``: the device-side command line (argparse only: no extra device dependency).

It follows the fedge CLI conventions (docs/cli.md): ``--version``, ``-v``/``-q``
and ``--log-format text|json`` before or after the subcommand (``run`` logs at
INFO by default, the others at WARNING), defaults and examples in ``--help``, one JSON
object on stdout per command, one line on stderr for an error, and the exit
codes 0 (ok), 1 (failure: refused or failed) and 2 (usage or input error).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from device_agent import __version__
from device_agent.bundle.archive import TrainingBundle, install_bundle, load_bundle
from device_agent.bundle.install_policy import BundleDowngradeError
from device_agent.data import DataSource, load_csv, load_npz
from device_agent.errors import BundleVerificationError, FedgeError, TrainingError
from device_agent.keys import load_verify_key
from device_agent.logformat import LOG_FORMATS, install_handler
from device_agent.state_store import StateStore
from device_agent.trainer import DeviceTrainer, TrainBudget
from device_agent.training_backends import BackendName

#: Exit codes shared with ``fedge`` (docs/cli.md).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Errors that mean "the command ran and the answer is no" (exit 1); every other fedge/OS error is an input error (2).
_FAILURES = (BundleVerificationError, BundleDowngradeError, TrainingError)


class CliInputError(FedgeError):
    """A command-line input (a path or option value) is unusable; the message names the option."""


def _data(path: str, args: argparse.Namespace) -> DataSource:
    return load_csv(path) if path.endswith(".csv") else load_npz(path, x_key=args.x_key, y_key=args.y_key)


def _bundle(args: argparse.Namespace) -> TrainingBundle:
    return load_bundle(args.bundle_dir, _fleet_key(args.fleet_key))


def _fleet_key(path: str) -> Any:
    try:
        return load_verify_key(path)
    except (OSError, ValueError) as exc:
        raise CliInputError(f"--fleet-key {path}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _cmd_install(args: argparse.Namespace) -> dict[str, object]:
    bundle = install_bundle(args.bundle, _fleet_key(args.fleet_key), args.dest)
    m = bundle.manifest
    return {"installed": str(args.dest), "directory": str(bundle.directory), "model": m.model_name,
            "version": m.bundle_version, "mode": m.hyperparameters.mode.value}


def _cmd_train(args: argparse.Namespace) -> dict[str, object]:
    bundle = _bundle(args)
    trainer = DeviceTrainer(bundle, state_dir=args.state, threads=args.threads, backend=args.backend)
    budget = TrainBudget(epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps, learning_rate=args.lr)
    report = trainer.train(_data(args.data, args), budget, rng=np.random.default_rng(args.seed))
    trainer.save_state()
    out: dict[str, object] = {"steps": report.steps, "mean_loss": report.mean_loss, "seconds": report.seconds,
                              "backend": trainer.backend_name.value}
    if args.eval_data:
        ev = trainer.evaluate(_data(args.eval_data, args))
        out.update(eval_loss=ev.loss, eval_accuracy=ev.accuracy, eval_examples=ev.examples)
    return out


def _cmd_evaluate(args: argparse.Namespace) -> dict[str, object]:
    bundle = _bundle(args)
    if args.state is not None:
        _require_saved_state(args.state, bundle)
    trainer = DeviceTrainer(bundle, state_dir=args.state, threads=args.threads, backend=args.backend)
    ev = trainer.evaluate(_data(args.data, args))
    return {"loss": ev.loss, "accuracy": ev.accuracy, "examples": ev.examples, "trained": args.state is not None,
            "backend": trainer.backend_name.value}


def _require_saved_state(state: str, bundle: TrainingBundle) -> None:
    """Refuse a state directory without a saved state for this bundle: scoring untrained weights would mislead."""
    m = bundle.manifest
    if not Path(state).is_dir():
        raise CliInputError(f"--state {state}: no such directory (train first with `fedge-agent train`, "
                            "or leave out --state to score the bundle's initial weights)")
    stored = StateStore(state).load()
    if stored is None or stored.meta.get("manifest_sha256") != bundle.manifest_sha256:
        what = "no saved state" if stored is None else "the saved state belongs to another bundle"
        raise CliInputError(f"--state {state}: {what} for {m.model_name} v{m.bundle_version} (train first with "
                            "`fedge-agent train`, or leave out --state to score the bundle's initial weights)")


def _cmd_run(args: argparse.Namespace) -> dict[str, object]:
    # The daemon's stack (MQTT, TLS, release metadata: ~11 MB resident) is imported by `run` alone, so the one-shot
    # commands (install, train, evaluate) do not hold it (docs/device-agent.md "Footprint").
    from device_agent.daemon.bootstrap import open_agent
    from device_agent.daemon.config import load_config

    config = load_config(args.config)
    if args.backend is not None:
        config = replace(config, backend=BackendName(args.backend))
    stop = threading.Event()
    # SIGTERM (systemd, docker stop) and Ctrl-C end the run between steps; a pending update
    # stays on disk and is resent by the next start.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with open_agent(config) as agent:
            result = agent.run(max_rounds=args.rounds, stop_event=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {
        "device": config.device_id,
        "backend": agent.trainer.backend_name.value,
        "finished": result.finished,
        "stopped": result.stopped,
        "rounds": [{"round": r.round, "status": r.status.value, "reason": r.reason, "trained": r.trained}
                   for r in result.rounds],
    }


def _cmd_config_example(args: argparse.Namespace) -> None:
    from importlib.resources import files

    text = files("device_agent").joinpath("agent.example.toml").read_text(encoding="utf-8")
    if args.out is None:
        sys.stdout.write(text)
        return None
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliInputError(f"--out {out}: exists; pass --force to overwrite it")
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliInputError(f"--out {out}: cannot write: {_reason(exc)}") from exc
    print(json.dumps({"written": str(out)}))
    return None


# -- the parser ---------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (when it has a meaningful one); the Examples epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or isinstance(default, bool) or action.required
                or isinstance(action, argparse._CountAction) or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _examples(*lines: str) -> str:
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


def _verbosity(parser: argparse.ArgumentParser, dest_prefix: str) -> None:
    # Separate destinations above and below the subcommand: a subparser's defaults would overwrite the top level's.
    parser.add_argument("-v", "--verbose", dest=f"{dest_prefix}verbose", action="count", default=0,
                        help="more logging: -v info, -vv debug")
    parser.add_argument("-q", "--quiet", dest=f"{dest_prefix}quiet", action="count", default=0,
                        help="less logging: -q one level quieter (errors only for most commands)")
    parser.add_argument("--log-format", dest=f"{dest_prefix}log_format", choices=LOG_FORMATS, default=None,
                        help="log lines on stderr as text (default) or JSON Lines")


def _subcommand(sub: Any, name: str, func: Any, helptext: str, examples: tuple[str, ...]) -> argparse.ArgumentParser:
    c = sub.add_parser(name, help=helptext, description=helptext, epilog=_examples(*examples), formatter_class=_Formatter)
    _verbosity(c, "sub_")
    c.set_defaults(func=func)
    return c


def _add_install(sub: Any) -> None:
    c = _subcommand(sub, "install", _cmd_install, "verify a .fedge bundle against the fleet key and install it",
                    ("fedge-agent install watch.fedge --fleet-key fleet.pub --dest /var/lib/fedge/bundle",))
    c.add_argument("bundle", help="the .fedge archive")
    c.add_argument("--fleet-key", required=True, help="trusted fleet Ed25519 public key (PEM)")
    c.add_argument("--dest", required=True,
                   help="installation path: a link switched atomically to DEST.versions/v<N>-<hash>; "
                        "never to an older version than installed before")


def _add_train_evaluate(sub: Any) -> None:
    train = _subcommand(sub, "train", _cmd_train, "train the installed bundle on local data and save state",
                        ("fedge-agent train --bundle-dir bundle/ --fleet-key fleet.pub --state state/ "
                         "--data local.npz --epochs 2",
                         "fedge-agent train ... --data local.csv --eval-data test.csv"))
    evaluate = _subcommand(sub, "evaluate", _cmd_evaluate, "evaluate the personalised model on local data",
                           ("fedge-agent evaluate --bundle-dir bundle/ --fleet-key fleet.pub --state state/ "
                            "--data test.npz",))
    for c in (train, evaluate):
        c.add_argument("--bundle-dir", required=True, help="installed bundle directory (re-verified)")
        c.add_argument("--fleet-key", required=True, help="trusted fleet Ed25519 public key (PEM)")
        c.add_argument("--data", required=True, help=".npz (arrays --x-key, --y-key) or .csv (last column = label)")
        c.add_argument("--x-key", default="x", help="features array in an .npz (as data.x_key in agent.toml)")
        c.add_argument("--y-key", default="y", help="labels array in an .npz (as data.y_key in agent.toml)")
        c.add_argument("--threads", type=_positive, default=None, help="ONNX Runtime threads (default: its choice)")
        _backend_option(c, default=BackendName.AUTO.value)
    train.add_argument("--state", required=True, help="device state directory (personal weights, optimizer state)")
    evaluate.add_argument("--state", default=None,
                          help="state directory saved by `train` (must hold this bundle's state; "
                               "leave out to score the bundle's initial weights)")
    train.add_argument("--epochs", type=_positive, default=1, help="passes over the data (per phase for fedalt)")
    train.add_argument("--batch-size", type=_positive, default=32, help="examples per step")
    train.add_argument("--max-steps", type=_positive, default=None, help="cap on steps per phase")
    train.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default: the bundle's)")
    train.add_argument("--seed", type=int, default=0, help="batch shuffling seed")
    train.add_argument("--eval-data", default=None, help="held-out data to evaluate after training")


def _add_run(sub: Any) -> None:
    c = _subcommand(sub, "run", _cmd_run, "join the federation: wait for signed models, train, send sealed updates",
                    ("fedge-agent config example --out agent.toml   # then edit it",
                     "fedge-agent run --config agent.toml",
                     "fedge-agent -v run --config agent.toml --rounds 3"))
    c.add_argument("--config", required=True, help="agent TOML file (`fedge-agent config example` writes an annotated one)")
    c.add_argument("--rounds", type=_non_negative, default=None, help="stop after N finished rounds (default: until stopped)")
    c.set_defaults(base_level=logging.INFO)  # a service: it says what it does without -v
    _backend_option(c, default=None)


def _backend_option(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    parser.add_argument("--backend", choices=[b.value for b in BackendName], default=default,
                        help="training backend: auto (ort-training when installed and in the bundle, else portable), "
                             "portable or ort-training" + (" (default: training.backend of the config, auto)"
                                                            if default is None else ""))


def _add_config(sub: Any) -> None:
    config = sub.add_parser("config", help="agent configuration files", description="agent configuration files",
                            formatter_class=_Formatter)
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="{example}", parser_class=_Parser)
    c = _subcommand(config_sub, "example", _cmd_config_example, "print (or write) an annotated agent.toml",
                    ("fedge-agent config example > agent.toml", "fedge-agent config example --out agent.toml"))
    c.add_argument("--out", default=None, help="write it to this file instead of standard output")
    c.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def build_parser() -> argparse.ArgumentParser:
    """The fedge-agent argument parser."""
    p = _Parser(prog="fedge-agent", formatter_class=_Formatter,
                description="fedge device agent: verify bundles, train on local data and join the federation (no torch).",
                epilog=_examples("fedge-agent install watch.fedge --fleet-key fleet.pub --dest bundle/",
                                 "fedge-agent train --bundle-dir bundle/ --fleet-key fleet.pub --state state/ "
                                 "--data local.npz",
                                 "fedge-agent run --config agent.toml -v",
                                 "",
                                 "Exit codes: 0 ok, 1 failure (refused or failed), 2 usage or input error (docs/cli.md)."))
    p.add_argument("--version", action="version", version=f"fedge-agent {__version__}")
    _verbosity(p, "")
    sub = p.add_subparsers(dest="command", required=True, metavar="{install,train,evaluate,run,config}",
                           parser_class=_Parser)
    _add_install(sub)
    _add_train_evaluate(sub)
    _add_run(sub)
    _add_config(sub)
    return p


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None: JSON has no NaN (a loss over zero steps is undefined, not NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _one_line(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, OSError) else (
        f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; prints one JSON object per command (nothing for ``config example`` to stdout)."""
    args = build_parser().parse_args(argv)
    level = getattr(args, "base_level", logging.WARNING) + 10 * (args.quiet + args.sub_quiet - args.verbose - args.sub_verbose)
    install_handler(args.sub_log_format or args.log_format or "text")
    logging.getLogger().setLevel(min(max(level, logging.DEBUG), logging.CRITICAL))
    try:
        result = args.func(args)
    except _FAILURES as exc:
        print(f"fedge-agent: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except (FedgeError, ValueError, OSError) as exc:
        print(f"fedge-agent: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if result is not None:
        print(json.dumps(_json_safe(result), allow_nan=False))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
