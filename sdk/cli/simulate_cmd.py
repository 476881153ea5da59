"""``fedge simulate``: run one algorithm on one federated dataset (built-in, or a folder of your own) in-process."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sdk.cli.family import check_writable, examples
from sdk.cli.model_option import MODEL_ARG_HELP, MODEL_HELP
from sdk.simulation.algorithms import ALGORITHMS
from sdk.training_defaults import DEFAULT_LEARNING_RATE, DEFAULT_OPTIMIZER

DATASETS = ("digits", "watch", "fashion-mnist", "synthetic")
MODEL_FOR = {"digits": "mlp", "watch": "cnn1d", "fashion-mnist": "cnn2d", "synthetic": "logreg"}
DATA_HELP = ("Folder of your own per-client data: one .npz per client (x_train, y_train, x_test, y_test, optional x_val,"
             " y_val), the file name is the client id; optional regions.toml/json maps client -> region. Replaces --dataset.")


def _load_builtin(name: str, seed: int, subsample: float | None):  # type: ignore[no-untyped-def]
    import sdk.datasets as ds

    if name == "digits":
        return ds.load_digits(num_clients=10, label_skew=0.5, seed=seed)
    if name == "watch":
        return ds.load_watch(seed=seed, split=ds.TimeSplit())
    if name == "fashion-mnist":
        return ds.load_fashion_mnist(num_clients=20, alpha=0.1, seed=seed, subsample=subsample)
    return ds.make_synthetic(alpha=1.0, beta=1.0, seed=seed)


def load_data_option(data_dir: Path | None, dataset: str | None, *, seed: int, subsample: float | None,
                     num_classes: int | None):  # type: ignore[no-untyped-def]
    """The dataset ``--data`` or ``--dataset`` names (digits when neither); a bad folder is a one-line usage error."""
    from sdk.datasets import DatasetError, load_client_folder

    if data_dir is not None and dataset is not None:
        raise click.BadParameter("give --data (your folder) or --dataset (a built-in one), not both", param_hint="--data")
    if data_dir is None:
        return _load_builtin(dataset or "digits", seed, subsample)
    try:
        return load_client_folder(data_dir, num_classes=num_classes)
    except DatasetError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from exc


def model_source_option(data, *, dataset: str | None, model_spec: str | None, model_args: tuple[str, ...],  # type: ignore[no-untyped-def]
                        shared: str, personal: str | None):
    """The ModelSource for ``--model``/``--shared``/``--personal``: your factory, or the built-in model for the data."""
    from sdk.model_spec import parse_prefixes
    from sdk.simulation.catalog import builtin_model, default_model_kind
    from sdk.simulation.runner import ModelSource

    if model_spec is None:
        try:
            kind = MODEL_FOR[dataset] if dataset is not None else default_model_kind(data.input_shape)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--model") from exc
        return builtin_model(kind, data, hidden=(64,))
    from sdk.cli.model_option import cli_model_factory

    return ModelSource(factory=cli_model_factory(model_spec, model_args), personal=parse_prefixes(personal or ""),
                       shared=parse_prefixes(shared), name=model_spec.rpartition(":")[2] or "model")


def check_model_option(model, data, algo: str) -> None:  # type: ignore[no-untyped-def]
    """Refuse, before any training, a model that does not fit the data or the algorithm (one line, exit 2)."""
    if ALGORITHMS[algo].personal_head and not model.personal:
        raise click.BadParameter(f"{algo} keeps a personal head on each device: name its layers with --personal PREFIX"
                                 " (e.g. --personal head), or choose fedavg, fedprox or local", param_hint="--personal")
    try:
        model.check(data, ALGORITHMS[algo])
    except ValueError as exc:
        where, _, message = str(exc).partition(": ")
        if message.endswith("one score per class"):
            message += " (--num-classes sets the class count when the data lacks some classes)"
        raise click.BadParameter(message, param_hint="--personal/--shared" if where == "split" else "--model") from exc


@click.command(epilog=examples("fedge simulate --dataset digits --algorithm fedalt --rounds 5",
                               "fedge simulate --dataset watch --algorithm fedprox --mu 0.01 --stragglers 0.5 --rounds 30",
                               "fedge simulate --dataset digits --regions 2 --regional-weight 0.5 --json-out sim.json",
                               "fedge simulate --data ./my-clients --model mymodels:Net --personal head --model-arg hidden=64"))
@click.option("--dataset", type=click.Choice(DATASETS), default=None, help="Built-in dataset (default: digits, unless --data is given).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None, help=DATA_HELP)
@click.option("--num-classes", type=click.IntRange(min=2), default=None, help="--data: number of classes (default: largest label + 1).")
@click.option("--model", "model_spec", default=None, help=MODEL_HELP + " Default: a built-in model for the data's shape.")
@click.option("--model-arg", "model_args", multiple=True, help=MODEL_ARG_HELP)
@click.option("--shared", default="*", show_default=True, help="--model: comma-separated name prefixes of the federated layers ('*' = all not personal).")
@click.option("--personal", default=None, help="--model: comma-separated name prefixes of the personal head (needed by fedsim, fedalt, fedfomo).")
@click.option("--algorithm", "algo", type=click.Choice(sorted(ALGORITHMS)), default="fedalt", show_default=True)
@click.option("--fomo-candidates", type=click.IntRange(min=1), default=5, show_default=True, help="FedFomo: peer models each device asks for per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Local epochs per round (fedalt: of the shared phase).")
@click.option("--personal-epochs", type=click.IntRange(min=1), default=None,
              help="fedalt: epochs of the head phase; ditto: of the personal model (default: --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LEARNING_RATE, show_default=True, help="Learning rate (see docs/tuning.md).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=DEFAULT_OPTIMIZER, show_default=True)
@click.option("--mu", type=click.FloatRange(min=0), default=None, help="FedProx mu (default: the algorithm's).")
@click.option("--ditto-lambda", type=click.FloatRange(min=0, min_open=True), default=None,
              help="ditto: pull of each personal model towards the global one (default: the algorithm's).")
@click.option("--participation", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Fraction of devices sampled per round.")
@click.option("--stragglers", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Fraction of sampled devices that do only part of their budget.")
@click.option("--dropouts", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Fraction of sampled devices that send nothing.")
@click.option("--subsample", type=click.FloatRange(0, 1, min_open=True), default=None, help="Use this fraction of Fashion-MNIST (quick runs).")
@click.option("--validation-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of a client's training examples held out for validation when its data has none (seeded).")
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
def simulate(dataset: str | None, data_dir: Path | None, num_classes: int | None, model_spec: str | None, model_args: tuple[str, ...],
             shared: str, personal: str | None, algo: str, rounds: int, epochs: int, personal_epochs: int | None, batch_size: int,
             lr: float, optimizer: str, mu: float | None, participation: float, stragglers: float, dropouts: float,
             subsample: float | None, validation_fraction: float, seed: int, json_out: Path | None, fomo_candidates: int,
             aggregation: str, trim_fraction: float, clip_norm: float | None, regional_weight: float | None,
             region_weighting: str, regions: int | None, finetune_epochs: int, ditto_lambda: float | None) -> None:
    """Simulate a federation in-process: real ORT training per device, no broker."""
    from tqdm import tqdm

    from device_agent.errors import FedgeError
    from device_agent.trainer import TrainBudget
    from sdk.aggregation import AggregationConfig
    from sdk.datasets import regions_by_label_mix
    from sdk.simulation.runner import BundleTraining, run_algorithm
    from sdk.simulation.simulator import HierarchyConfig, RoundMetrics, SimulationConfig

    if json_out is not None:
        check_writable("--json-out", json_out)
    data = load_data_option(data_dir, dataset, seed=seed, subsample=subsample, num_classes=num_classes)
    if regions is not None:
        data = data.with_regions(regions_by_label_mix(data, regions, seed=seed))
    model = model_source_option(data, dataset=dataset, model_spec=model_spec, model_args=model_args, shared=shared, personal=personal)
    check_model_option(model, data, algo)
    try:
        agg = AggregationConfig(rule=aggregation, trim_fraction=trim_fraction, clip_norm=clip_norm)  # type: ignore[arg-type]
        hierarchy = None if regional_weight is None else HierarchyConfig(regional_weight=regional_weight,
                                                                          region_weighting=region_weighting)  # type: ignore[arg-type]
        config = SimulationConfig(rounds=rounds, budget=TrainBudget(epochs=epochs, batch_size=batch_size, personal_epochs=personal_epochs),
                                  participation=participation, straggler_fraction=stragglers, dropout_fraction=dropouts, seed=seed,
                                  aggregation=agg, hierarchy=hierarchy, finetune_epochs=finetune_epochs,
                                  validation_fraction=validation_fraction)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if hierarchy is not None and not data.regions:
        raise click.BadParameter(f"{data.name} has no regions; pass --regions N to group clients by label mix"
                                 " (or put a regions.toml in the --data folder)")
    click.echo(f"data: {data.description}")
    with tqdm(total=rounds, desc=f"{algo} on {data.name}", unit="round") as bar:

        def progress(record: RoundMetrics) -> None:
            bar.update(1)
            bar.set_postfix(acc=f"{record.mean_accuracy:.3f}")

        try:
            run = run_algorithm(data, algo, model=model, config=config, fomo_candidates=fomo_candidates, on_round=progress,
                                training=BundleTraining(learning_rate=lr, optimizer=optimizer, mu=mu, ditto_lambda=ditto_lambda))
        except (FedgeError, ValueError) as exc:
            raise click.ClickException(f"{algo} on {data.name}: {exc}") from exc
    result = run.result
    if result.validation is not None and result.validation.held_out:
        click.echo(f"validation: {result.validation.describe()}")
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
    if last is not None and last.serving_weight:
        weights = last.serving_weight
        click.echo(f"ditto: personal model alone {_mean(last.personal_model_accuracy):.4f}, global model "
                   f"{_mean(last.global_accuracy):.4f}, served (each device's choice) {last.mean_accuracy:.4f}; weight on the"
                   " personal model per device: " + ", ".join(f"{cid} {w:.1f}" for cid, w in weights.items()))
    overall = result.fomo_kept_own_overall
    if overall is not None:
        rates = result.fomo_kept_own_rate
        click.echo(f"fedfomo: kept only its own model (no peer helped on its validation split) in {overall:.0%} of"
                   f" {sum(len(r.fomo_combined) for r in result.rounds)} device-rounds; per device: "
                   + ", ".join(f"{cid} {rate:.0%}" for cid, rate in rates.items()))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"dataset": data.name, "dataset_description": data.description, "algorithm": algo,
                                        "learning_rate": lr, "mu": run.mu, "ditto_lambda": run.ditto_lambda,
                                        **result.to_json_dict()}, indent=2))


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")
