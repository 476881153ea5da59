"""``fedge simulate``: run one algorithm on one federated dataset in-process."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from sdk.cli.family import check_writable, examples

DATASETS = ("digits", "watch", "fashion-mnist", "synthetic")


def _load(name: str, seed: int, subsample: float | None):  # type: ignore[no-untyped-def]
    import sdk.datasets as ds

    if name == "digits":
        return ds.load_digits(num_clients=10, label_skew=0.5, seed=seed)
    if name == "watch":
        return ds.load_watch(seed=seed, split=ds.TimeSplit())
    if name == "fashion-mnist":
        return ds.load_fashion_mnist(num_clients=20, alpha=0.1, seed=seed, subsample=subsample)
    return ds.make_synthetic(alpha=1.0, beta=1.0, seed=seed)


MODEL_FOR = {"digits": "mlp", "watch": "cnn1d", "fashion-mnist": "cnn2d", "synthetic": "logreg"}


@click.command(epilog=examples("fedge simulate --dataset digits --algorithm fedalt --rounds 5",
                               "fedge simulate --dataset watch --algorithm fedprox --mu 0.01 --stragglers 0.5 --rounds 30",
                               "fedge simulate --dataset digits --regions 2 --regional-weight 0.5 --json-out sim.json"))
@click.option("--dataset", type=click.Choice(DATASETS), default="digits", show_default=True)
@click.option("--algorithm", "algo", type=click.Choice(["local", "fedavg", "fedprox", "fedsim", "fedalt", "fedfomo"]), default="fedalt", show_default=True)
@click.option("--fomo-candidates", type=click.IntRange(min=1), default=5, show_default=True, help="FedFomo: peer models each device asks for per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Local epochs per round (per phase for fedalt).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.005, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="adamw", show_default=True)
@click.option("--mu", type=click.FloatRange(min=0), default=None, help="FedProx mu (default: the algorithm's).")
@click.option("--participation", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Fraction of devices sampled per round.")
@click.option("--stragglers", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Fraction of sampled devices that do only part of their budget.")
@click.option("--dropouts", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Fraction of sampled devices that send nothing.")
@click.option("--subsample", type=click.FloatRange(0, 1, min_open=True), default=None, help="Use this fraction of Fashion-MNIST (quick runs).")
@click.option("--aggregation", type=click.Choice(["mean", "median", "trimmed_mean"]), default="mean", show_default=True,
              help="Rule for each (regional) aggregate: sample-weighted mean, or the robust coordinate-wise median / trimmed mean.")
@click.option("--trim-fraction", type=click.FloatRange(0, 0.5, max_open=True), default=0.1, show_default=True, help="trimmed_mean: fraction cut at each end per coordinate.")
@click.option("--clip-norm", type=click.FloatRange(min=0, min_open=True), default=None, help="Clip each update to this global L2 norm before aggregating.")
@click.option("--regional-weight", type=click.FloatRange(0, 1), default=None,
              help="Run the two-tier hierarchy over the dataset's regions; each region serves a*regional + (1-a)*global.")
@click.option("--region-weighting", type=click.Choice(["samples", "uniform"]), default="samples", show_default=True,
              help="Hierarchy: how the root weights regional aggregates.")
@click.option("--regions", type=click.IntRange(min=1), default=None, help="Group clients into this many regions by label mix (default: the dataset's own regions).")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="fedavg/fedprox: after the last round, fine-tune locally (head only, and all parameters) and report both.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Write per-round results as JSON.")
def simulate(dataset: str, algo: str, rounds: int, epochs: int, batch_size: int, lr: float, optimizer: str, mu: float | None,
             participation: float, stragglers: float, dropouts: float, subsample: float | None, seed: int, json_out: Path | None,
             fomo_candidates: int, aggregation: str, trim_fraction: float, clip_norm: float | None, regional_weight: float | None,
             region_weighting: str, regions: int | None, finetune_epochs: int) -> None:
    """Simulate a federation in-process: real ORT training per device, no broker."""
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from tqdm import tqdm

    from device_agent.bundle.archive import install_bundle
    from device_agent.bundle.manifest import OptimizerKind
    from device_agent.trainer import TrainBudget
    from sdk.artifacts import TrainingSpec
    from sdk.bundle_builder import build_bundle
    from sdk.simulation.algorithms import algorithm
    from sdk.simulation.catalog import build_model
    from sdk.simulation.simulator import FederatedSimulator, RoundMetrics, SimulationConfig

    from sdk.aggregation import AggregationConfig
    from sdk.datasets import regions_by_label_mix
    from sdk.simulation.simulator import HierarchyConfig

    if json_out is not None:
        check_writable("--json-out", json_out)
    spec = algorithm(algo)
    data = _load(dataset, seed, subsample)
    if regions is not None:
        data = data.with_regions(regions_by_label_mix(data, regions, seed=seed))
    try:
        agg = AggregationConfig(rule=aggregation, trim_fraction=trim_fraction, clip_norm=clip_norm)  # type: ignore[arg-type]
        hierarchy = None if regional_weight is None else HierarchyConfig(regional_weight=regional_weight,
                                                                          region_weighting=region_weighting)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if hierarchy is not None and not data.regions:
        raise click.BadParameter(f"{dataset} has no regions; pass --regions N to group clients by label mix")
    torch.manual_seed(seed)  # before the model exists: the initial weights follow the seed
    try:
        model, split, finetune = build_model(MODEL_FOR[dataset], data, personal=spec.personal_head, hidden=(64,))
    except ValueError as exc:
        raise click.ClickException(f"{algo} on {dataset}: {exc}") from exc
    finetune = finetune if finetune_epochs else ()
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="fedge-sim-") as tmp:
        build_bundle(model, example_input=torch.zeros((2, *data.input_shape)), split=split,
                     spec=TrainingSpec(mode=spec.mode, mu=spec.default_mu if mu is None else mu, optimizer=OptimizerKind(optimizer), learning_rate=lr,
                                       finetune=finetune),
                     signing_key=key, out_path=Path(tmp) / "b.fedge", model_name=dataset)
        bundle = install_bundle(Path(tmp) / "b.fedge", key.public_key(), Path(tmp) / "bundle")
        config = SimulationConfig(rounds=rounds, budget=TrainBudget(epochs=epochs, batch_size=batch_size), participation=participation,
                                  straggler_fraction=stragglers, dropout_fraction=dropouts, straggler_policy=spec.straggler_policy,  # type: ignore[arg-type]
                                  federated=spec.federated, fomo_candidates=fomo_candidates if spec.fomo else None, seed=seed,
                                  aggregation=agg, hierarchy=hierarchy, finetune_epochs=finetune_epochs)
        sim = FederatedSimulator(bundle, data, config)
        with tqdm(total=rounds, desc=f"{algo} on {dataset}", unit="round") as bar:

            def progress(record: RoundMetrics) -> None:
                bar.update(1)
                bar.set_postfix(acc=f"{record.mean_accuracy:.3f}")

            result = sim.run(on_round=progress)
    click.echo(f"{'round':>5s} {'mean acc':>9s} {'aggregated':>10s} {'dropped':>7s} {'seconds':>8s}")
    for r in result.rounds:
        click.echo(f"{r.round_number:5d} {r.mean_accuracy:9.4f} {len(r.aggregated):10d} {len(r.dropped):7d} {r.seconds:8.2f}")
    click.echo(f"final mean personalised accuracy over {len(result.final_accuracy)} devices: {result.mean_final_accuracy:.4f}")
    last = result.rounds[-1] if result.rounds else None
    if last is not None and last.regional_accuracy:
        click.echo(f"hierarchy: global model {_mean(last.global_accuracy):.4f}, regional model {_mean(last.regional_accuracy):.4f}, "
                   f"served (mixed) {last.mean_accuracy:.4f}")
    for kind, acc in sorted(result.fine_tuned_accuracy.items()):
        click.echo(f"after local fine-tuning ({kind}): {_mean(acc):.4f}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"dataset": dataset, "algorithm": algo, "rounds": [
            {"round": r.round_number, "mean_accuracy": r.mean_accuracy, "accuracy": r.personalised_accuracy,
             "pooled_accuracy": r.pooled_accuracy, "global_accuracy": r.global_accuracy, "regional_accuracy": r.regional_accuracy,
             "aggregated": list(r.aggregated), "dropped": r.dropped, "bytes_up_per_device": r.bytes_up_per_device,
             "bytes_down_per_device": r.bytes_down_per_device,
             "seconds": r.seconds} for r in result.rounds], "fine_tuned_accuracy": result.fine_tuned_accuracy}, indent=2))


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")
