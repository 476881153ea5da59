"""``fedge-agent``: the device-side command line (argparse only: no extra device dependency)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import replace

import numpy as np

from device_agent.bundle.archive import install_bundle, load_bundle
from device_agent.daemon.bootstrap import open_agent
from device_agent.daemon.config import load_config
from device_agent.data import DataSource, load_csv, load_npz
from device_agent.errors import FedgeError
from device_agent.keys import load_verify_key
from device_agent.trainer import DeviceTrainer, TrainBudget
from device_agent.training_backends import BackendName


def _data(path: str) -> DataSource:
    return load_csv(path) if path.endswith(".csv") else load_npz(path)


def _cmd_install(args: argparse.Namespace) -> dict[str, object]:
    bundle = install_bundle(args.bundle, load_verify_key(args.fleet_key), args.dest)
    m = bundle.manifest
    return {"installed": str(bundle.directory), "model": m.model_name, "version": m.bundle_version, "mode": m.hyperparameters.mode.value}


def _cmd_train(args: argparse.Namespace) -> dict[str, object]:
    bundle = load_bundle(args.bundle_dir, load_verify_key(args.fleet_key))
    trainer = DeviceTrainer(bundle, state_dir=args.state, threads=args.threads, backend=args.backend)
    budget = TrainBudget(epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps, learning_rate=args.lr)
    report = trainer.train(_data(args.data), budget, rng=np.random.default_rng(args.seed))
    trainer.save_state()
    out: dict[str, object] = {"steps": report.steps, "mean_loss": report.mean_loss, "seconds": report.seconds,
                              "backend": trainer.backend_name.value}
    if args.eval_data:
        ev = trainer.evaluate(_data(args.eval_data))
        out.update(eval_loss=ev.loss, eval_accuracy=ev.accuracy, eval_examples=ev.examples)
    return out


def _cmd_evaluate(args: argparse.Namespace) -> dict[str, object]:
    bundle = load_bundle(args.bundle_dir, load_verify_key(args.fleet_key))
    trainer = DeviceTrainer(bundle, state_dir=args.state, threads=args.threads, backend=args.backend)
    ev = trainer.evaluate(_data(args.data))
    return {"loss": ev.loss, "accuracy": ev.accuracy, "examples": ev.examples, "backend": trainer.backend_name.value}


def _cmd_run(args: argparse.Namespace) -> dict[str, object]:
    config = load_config(args.config)
    if args.backend is not None:
        config = replace(config, backend=BackendName(args.backend))
    # The start-up line (device, bundle, training backend) shows at the default verbosity too.
    start_log = logging.getLogger("device_agent.daemon.bootstrap")
    if start_log.getEffectiveLevel() > logging.INFO:
        start_log.setLevel(logging.INFO)
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


def build_parser() -> argparse.ArgumentParser:
    """The fedge-agent argument parser."""
    p = argparse.ArgumentParser(prog="fedge-agent", description="fedge device agent: verify bundles and train on local data (no torch).")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    inst = sub.add_parser("install", help="verify a .fedge bundle against the fleet key and install it")
    inst.add_argument("bundle")
    inst.add_argument("--fleet-key", required=True, help="trusted fleet Ed25519 public key (PEM)")
    inst.add_argument("--dest", required=True, help="installation directory (replaced atomically)")
    inst.set_defaults(func=_cmd_install)

    for name, func, helptext in (("train", _cmd_train, "train the installed bundle on local data and save state"),
                                 ("evaluate", _cmd_evaluate, "evaluate the personalised model on local data")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--bundle-dir", required=True, help="installed bundle directory (re-verified)")
        c.add_argument("--fleet-key", required=True)
        c.add_argument("--state", required=True, help="device state directory (personal weights, optimizer state)")
        c.add_argument("--data", required=True, help=".npz (arrays x, y) or .csv (last column = label)")
        c.add_argument("--threads", type=int, default=None)
        _backend_option(c, default=BackendName.AUTO.value)
        c.set_defaults(func=func)
        if name == "train":
            c.add_argument("--epochs", type=int, default=1)
            c.add_argument("--batch-size", type=int, default=32)
            c.add_argument("--max-steps", type=int, default=None)
            c.add_argument("--lr", type=float, default=None)
            c.add_argument("--seed", type=int, default=0)
            c.add_argument("--eval-data", default=None)

    run = sub.add_parser("run", help="join the federation: wait for signed models, train, send sealed updates")
    run.add_argument("--config", required=True, help="agent TOML file (see examples/agent.toml)")
    run.add_argument("--rounds", type=_non_negative, default=None, help="stop after N finished rounds (default: run until stopped)")
    _backend_option(run, default=None)
    run.set_defaults(func=_cmd_run)
    return p


def _backend_option(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    parser.add_argument("--backend", choices=[b.value for b in BackendName], default=default,
                        help="training backend: auto (ort-training when installed and in the bundle, else portable), "
                             "portable or ort-training" + (" (default: training.backend of the config, auto)" if default is None
                                                            else " (default: %(default)s)"))


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; prints one JSON object per command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except (FedgeError, ValueError, OSError) as exc:
        print(f"fedge-agent: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
