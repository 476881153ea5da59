"""``fedge bundle``: build, verify and inspect signed training bundles."""

from __future__ import annotations

import json
from pathlib import Path

import click

from device_agent.bundle.archive import verify_bundle
from device_agent.errors import BundleError, BundleVerificationError
from device_agent.keys import load_signing_key, load_verify_key
from sdk.cli.family import InputError, check_writable, examples, load_key, one_line, write_error
from sdk.cli.model_option import MODEL_ARG_HELP, MODEL_HELP, cli_import_factory, cli_model_args
from sdk.training_defaults import DEFAULT_LEARNING_RATE


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"expected positive integers separated by commas (e.g. 6,100), got {text!r}",
                                 param_hint="--input-shape")
    return shape


def _make_model(spec: str, factory, kwargs: dict[str, object], shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """The model, checked to accept a batch of ``shape`` inputs; BadParameter naming the option at fault."""
    import torch

    try:
        model = factory(**kwargs)
    except TypeError as exc:  # a misspelt or missing --model-arg
        raise click.BadParameter(f"{spec} does not accept {sorted(kwargs)}: {one_line(str(exc))}",
                                 param_hint="--model-arg") from exc
    try:
        with torch.no_grad():
            model(torch.zeros((2, *shape)))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise click.BadParameter(f"{spec} rejects inputs of shape {list(shape)}: {one_line(str(exc))}",
                                 param_hint="--input-shape") from exc
    return model


@click.group()
def bundle() -> None:
    """Signed ONNX Runtime training bundles."""


@bundle.command("build", epilog=examples(
    "fedge bundle build --model sdk.models:PersonalizedCNN1D --model-arg in_channels=6 --model-arg num_classes=7 \\",
    "    --input-shape 6,100 --shared base --personal head --mode fedalt --mu 0.01 \\",
    "    --key fleet.key --name watch-cnn --version 1 -o watch.fedge"))
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--model-arg", "model_args", multiple=True, help=MODEL_ARG_HELP)
@click.option("--input-shape", required=True, help="Shape of one example without the batch axis, e.g. 6,100.")
@click.option("--shared", default="base", show_default=True, help="Comma-separated name prefixes of shared parameters ('*' = all not personal).")
@click.option("--personal", default="", help="Comma-separated name prefixes of personal (never uploaded) parameters.")
@click.option("--mode", type=click.Choice(["fedavg", "fedprox", "fedsim", "fedalt", "ditto"]), required=True)
@click.option("--mu", type=float, default=0.0, show_default=True, help="FedProx proximal weight on the shared layers.")
@click.option("--ditto-lambda", type=float, default=None, help="ditto: pull of the personal model towards the global one"
                                                                " (default 0.1 for --mode ditto).")
@click.option("--loss", type=click.Choice(["cross_entropy", "mse", "bce_with_logits"]), default="cross_entropy", show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="adamw", show_default=True)
@click.option("--lr", type=float, default=DEFAULT_LEARNING_RATE, show_default=True, help="Default learning rate (devices may override).")
@click.option("--key", "key_path", type=click.Path(exists=True, path_type=Path), required=True, help="Fleet Ed25519 private key.")
@click.option("--name", "model_name", required=True, help="Model name recorded in the manifest.")
@click.option("--version", "bundle_version", type=click.IntRange(min=0), default=1, show_default=True,
              help="Bundle version; a device never installs a lower one than it has (docs/device-agent.md).")
@click.option("--seed", type=int, default=0, show_default=True, help="torch seed for the initial weights.")
@click.option("--artifacts", type=click.Choice(["both", "portable", "ort-training"]), default="both", show_default=True,
              help="Artifact kinds to include: portable graphs (any onnxruntime >= 1.19, aarch64, armhf), "
                   "ORT-training artifacts (onnxruntime-training, x86_64), or both.")
@click.option("--compression", default="none", show_default=True, callback=lambda ctx, param, value: _compression(value),
              help="What devices send up: none (float32), q8, q4, topk:F, topk:F+q8, topk:F+q4, each optionally"
                   " +deflate (lossless zlib; q6 only with it) (error feedback; docs/protocol.md 'Compressed updates'),"
                   " e.g. q4+deflate.")
@click.option("--micro-batch", type=click.IntRange(min=0), default=0, show_default=True,
              help="Portable steps: run the forward and backward on slices of this many examples (same numbers, less"
                   " peak memory, slower; 0 = the whole batch; docs/device-agent.md 'Micro-batched steps').")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output .fedge file.")
def build(model_spec: str, model_args: tuple[str, ...], input_shape: str, shared: str, personal: str, mode: str, mu: float,
          loss: str, optimizer: str, lr: float, key_path: Path, model_name: str, bundle_version: int, seed: int, artifacts: str,
          compression: str, out: Path, ditto_lambda: float | None, micro_batch: int) -> None:
    """Export a PyTorch model and write a signed training bundle.

    A model with a layer the training graphs cannot express (BatchNorm, Dropout, ...) is
    refused with one line naming the layer.
    """
    import torch

    from device_agent.bundle.manifest import LossKind, OptimizerKind, TrainingMode
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.model_spec import ParameterSplit, ParameterSplitError, parse_prefixes
    from sdk.portable_graph import UnsupportedModelError
    from sdk.simulation.algorithms import DEFAULT_DITTO_LAMBDA

    factory = cli_import_factory(model_spec)
    kwargs = cli_model_args(model_args)
    shape = _parse_shape(input_shape)
    signing_key = load_key("--key", key_path, load_signing_key)
    check_writable("--out", out)
    torch.manual_seed(seed)
    model = _make_model(model_spec, factory, kwargs, shape)
    try:
        split = ParameterSplit(shared=parse_prefixes(shared), personal=parse_prefixes(personal))
    except (ParameterSplitError, ValueError) as exc:
        raise click.BadParameter(one_line(str(exc)), param_hint="--shared/--personal") from exc
    try:
        manifest = build_bundle(
            model, example_input=torch.zeros((2, *shape)), split=split,
            spec=TrainingSpec(mode=TrainingMode(mode), mu=mu, loss=LossKind(loss), optimizer=OptimizerKind(optimizer), learning_rate=lr,
                              ditto_lambda=(DEFAULT_DITTO_LAMBDA if ditto_lambda is None else ditto_lambda) if mode == "ditto"
                              else ditto_lambda or 0.0, micro_batch=micro_batch),
            signing_key=signing_key, out_path=out, model_name=model_name, bundle_version=bundle_version,
            kinds=("ort-training", "portable") if artifacts == "both" else (artifacts,), compression=compression,
        )
    except UnsupportedModelError as exc:  # the command ran and the answer is no (exit 1)
        raise click.ClickException(f"refused: {one_line(str(exc))}") from exc
    except ParameterSplitError as exc:
        raise click.BadParameter(one_line(str(exc)), param_hint="--shared/--personal") from exc
    except OSError as exc:
        raise write_error("--out", out, exc) from exc
    except ValueError as exc:
        raise InputError(one_line(str(exc))) from exc
    n_shared = sum(_numel(p.shape) for p in manifest.parameters if p.role == "shared")
    n_personal = sum(_numel(p.shape) for p in manifest.parameters if p.role == "personal")
    kinds = "+".join(k.value for k in manifest.artifact_kinds)
    click.echo(f"wrote {out}: {model_name} v{bundle_version}, mode {mode}, {n_shared} shared + {n_personal} personal parameters, "
               f"artifacts {kinds}")


def _compression(value: str) -> str:
    from device_agent.compression import CompressionSpec

    try:
        return CompressionSpec.parse(value).describe()
    except ValueError as exc:
        raise click.BadParameter(one_line(str(exc)), param_hint="--compression") from exc


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@bundle.command("verify", epilog=examples("fedge bundle verify watch.fedge --pub fleet.pub",
                                          "fedge bundle verify watch.fedge --pub old.pub --pub new.pub --json"))
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--pub", "pub_paths", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="Trusted fleet public key(s).")
@click.option("--json", "as_json", is_flag=True, help="Print the verified manifest as JSON.")
def verify(path: Path, pub_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check a bundle's signature and file hashes; exit 1 if it is not authentic, 2 if it is not a bundle."""
    keys = [load_key("--pub", p, load_verify_key) for p in pub_paths]
    try:
        manifest = verify_bundle(path, keys)
    except BundleVerificationError as exc:
        raise click.ClickException(f"REFUSED: {path}: {exc}") from exc
    except BundleError as exc:
        raise InputError(f"{path}: malformed bundle: {one_line(str(exc))}") from exc
    if as_json:
        click.echo(json.dumps(json.loads(manifest.to_json_bytes()), indent=2))
        return
    h = manifest.hyperparameters
    click.echo(f"OK {manifest.model_name} v{manifest.bundle_version} signed by {manifest.signer_key_id}")
    click.echo(f"  mode={h.mode.value} mu={h.mu} loss={h.loss.value} optimizer={h.optimizer.value} lr={h.learning_rate}"
               + (f" ditto_lambda={h.ditto_lambda}" if h.ditto_lambda is not None else ""))
    click.echo(f"  format {manifest.format_version}, artifacts {', '.join(k.value for k in manifest.artifact_kinds)}")
    for p in manifest.parameters:
        click.echo(f"  {p.role:8s} {p.name:30s} {list(p.shape)} {p.dtype}")
