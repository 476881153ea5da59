"""``fedge bundle``: build, verify and inspect signed training bundles."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import click

from device_agent.bundle.archive import verify_bundle
from device_agent.errors import BundleError, BundleVerificationError
from device_agent.keys import load_signing_key, load_verify_key


def _import_factory(spec: str):  # type: ignore[no-untyped-def]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise click.BadParameter("expected module:callable, e.g. sdk.models:PersonalizedMLP")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot import {spec}: {exc}") from exc


def _parse_kwargs(items: tuple[str, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--model-arg {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


@click.group()
def bundle() -> None:
    """Signed ONNX Runtime training bundles."""


@bundle.command("build")
@click.option("--model", "model_spec", required=True, help="Model factory as module:callable (e.g. sdk.models:PersonalizedCNN1D).")
@click.option("--model-arg", "model_args", multiple=True, help="key=value passed to the factory (repeatable).")
@click.option("--input-shape", required=True, help="Shape of one example without the batch axis, e.g. 6,100.")
@click.option("--shared", default="base", show_default=True, help="Comma-separated name prefixes of shared parameters ('*' = all not personal).")
@click.option("--personal", default="", help="Comma-separated name prefixes of personal (never uploaded) parameters.")
@click.option("--mode", type=click.Choice(["fedavg", "fedprox", "fedsim", "fedalt"]), required=True)
@click.option("--mu", type=float, default=0.0, show_default=True, help="FedProx proximal weight on the shared layers.")
@click.option("--loss", type=click.Choice(["cross_entropy", "mse", "bce_with_logits"]), default="cross_entropy", show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="adamw", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Default learning rate (devices may override).")
@click.option("--key", "key_path", type=click.Path(exists=True, path_type=Path), required=True, help="Fleet Ed25519 private key.")
@click.option("--name", "model_name", required=True, help="Model name recorded in the manifest.")
@click.option("--version", "bundle_version", type=int, default=1, show_default=True, help="Bundle version (monotonic per model).")
@click.option("--seed", type=int, default=0, show_default=True, help="torch seed for the initial weights.")
@click.option("--artifacts", type=click.Choice(["both", "portable", "ort-training"]), default="both", show_default=True,
              help="Artifact kinds to include: portable graphs (any onnxruntime >= 1.19, aarch64, armhf), "
                   "ORT-training artifacts (onnxruntime-training, x86_64), or both.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output .fedge file.")
def build(model_spec: str, model_args: tuple[str, ...], input_shape: str, shared: str, personal: str, mode: str, mu: float,
          loss: str, optimizer: str, lr: float, key_path: Path, model_name: str, bundle_version: int, seed: int, artifacts: str,
          out: Path) -> None:
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

    torch.manual_seed(seed)
    model = _import_factory(model_spec)(**_parse_kwargs(model_args))
    shape = tuple(int(d) for d in input_shape.split(","))
    try:
        split = ParameterSplit(shared=parse_prefixes(shared), personal=parse_prefixes(personal))
        manifest = build_bundle(
            model, example_input=torch.zeros((2, *shape)), split=split,
            spec=TrainingSpec(mode=TrainingMode(mode), mu=mu, loss=LossKind(loss), optimizer=OptimizerKind(optimizer), learning_rate=lr),
            signing_key=load_signing_key(key_path), out_path=out, model_name=model_name, bundle_version=bundle_version,
            kinds=("ort-training", "portable") if artifacts == "both" else (artifacts,),
        )
    except UnsupportedModelError as exc:
        raise click.ClickException(f"refused: {exc}") from exc
    except (ParameterSplitError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    n_shared = sum(_numel(p.shape) for p in manifest.parameters if p.role == "shared")
    n_personal = sum(_numel(p.shape) for p in manifest.parameters if p.role == "personal")
    kinds = "+".join(k.value for k in manifest.artifact_kinds)
    click.echo(f"wrote {out}: {model_name} v{bundle_version}, mode {mode}, {n_shared} shared + {n_personal} personal parameters, "
               f"artifacts {kinds}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@bundle.command("verify")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--pub", "pub_paths", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="Trusted fleet public key(s).")
@click.option("--json", "as_json", is_flag=True, help="Print the verified manifest as JSON.")
def verify(path: Path, pub_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check a bundle's signature and file hashes; exit 1 if it is not authentic."""
    try:
        manifest = verify_bundle(path, [load_verify_key(p) for p in pub_paths])
    except BundleVerificationError as exc:
        raise click.ClickException(f"REFUSED: {exc}") from exc
    except BundleError as exc:
        raise click.ClickException(f"malformed bundle: {exc}") from exc
    if as_json:
        click.echo(json.dumps(json.loads(manifest.to_json_bytes()), indent=2))
        return
    h = manifest.hyperparameters
    click.echo(f"OK {manifest.model_name} v{manifest.bundle_version} signed by {manifest.signer_key_id}")
    click.echo(f"  mode={h.mode.value} mu={h.mu} loss={h.loss.value} optimizer={h.optimizer.value} lr={h.learning_rate}")
    click.echo(f"  format {manifest.format_version}, artifacts {', '.join(k.value for k in manifest.artifact_kinds)}")
    for p in manifest.parameters:
        click.echo(f"  {p.role:8s} {p.name:30s} {list(p.shape)} {p.dtype}")
