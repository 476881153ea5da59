"""``fedge bench``: benchmarks that print a table and write JSON."""

from __future__ import annotations

from pathlib import Path

import click

from sdk.cli.family import examples
from sdk.cli.model_option import MODEL_ARG_HELP, MODEL_HELP
from sdk.cli.simulate_cmd import DATA_HELP
from sdk.simulation.algorithms import ALGORITHMS
from sdk.training_defaults import DEFAULT_LEARNING_RATE


@click.group()
def bench() -> None:
    """Benchmarks (measured side by side in one run; ratios are the headline)."""


@bench.command("train", epilog=examples("fedge bench train", "fedge bench train --quick --repeats 1"))
@click.option("--repeats", type=int, default=3, show_default=True, help="Alternating runs per runtime; the median is reported.")
@click.option("--threads", type=int, default=2, show_default=True, help="Intra-op threads for every runtime.")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--quick", is_flag=True, help="10x fewer steps (smoke test).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/train.json"), show_default=True,
              help="JSON results; a PNG chart is written next to it.")
def train(repeats: int, threads: int, batch: int, quick: bool, out: Path) -> None:
    """Portable and ort-training backends (torch hidden) vs PyTorch eager: steps/s, peak RSS, import time; MLP, 1D-CNN, 2D-CNN
    (and the 2D-CNN with a micro-batched portable step, not the default build)."""
    from tqdm import tqdm

    from sdk.bench.train_bench import DEFAULT_MODELS, format_table, run_train_bench, write_json, write_png

    with tqdm(total=repeats * len(DEFAULT_MODELS), desc="train bench", unit="round") as bar:
        rows = run_train_bench(batch=batch, threads=threads, repeats=repeats, step_scale=0.1 if quick else 1.0, progress=bar.update)
    click.echo(format_table(rows))
    write_json(rows, out, threads=threads)
    write_png(rows, out.with_suffix(".png"))
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


def _updates_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from exc
    if not counts or any(n < 1 for n in counts):
        raise click.BadParameter("every update count must be >= 1")
    return counts


@bench.command("aggregator", epilog=examples("fedge bench aggregator", "fedge bench aggregator --updates 100 --repeats 1 --paths durable,memory"))
@click.option("--updates", default="400", show_default=True, callback=_updates_list,
              help="Comma-separated numbers of sealed updates per round (one row each).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Alternating runs per path; the median is reported.")
@click.option("--batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Updates per group commit in the durable paths (the service's batch_max_updates).")
@click.option("--paths", default="durable,memory,memory-batched,naive,unbatched,members", show_default=True,
              help="Comma-separated paths to run; durable and memory are required.")
@click.option("--frames", type=click.Choice(["1", "2", "1,2"]), default="1,2", show_default=True,
              help="Frame versions to seal the updates in (2: prehashed signatures); both: side by side in one run.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/aggregator.json"), show_default=True,
              help="JSON results; a PNG chart is written next to it.")
def aggregator(updates: tuple[int, ...], repeats: int, batch: int, paths: str, frames: str, out: Path) -> None:
    """Regional aggregator, 100k-parameter model: durable (group commit) vs in memory, 2 members vs 1, per-part costs."""
    from tqdm import tqdm

    from sdk.bench.aggregator_bench import PATHS, REQUIRED_PATHS, format_table, run_aggregator_bench, write_json, write_png

    chosen = tuple(p.strip() for p in paths.split(",") if p.strip())
    if not set(REQUIRED_PATHS) <= set(chosen) or not set(chosen) <= set(PATHS):
        raise click.BadParameter(f"choose from {', '.join(PATHS)}, including {' and '.join(REQUIRED_PATHS)}", param_hint="--paths")
    with tqdm(total=repeats * len(updates), desc="aggregator bench", unit="round") as bar:
        rows = run_aggregator_bench(updates=updates, repeats=repeats, paths=chosen, batch=batch, progress=bar.update,
                                    frames=tuple(int(v) for v in frames.split(",")))
    click.echo(format_table(rows))
    write_json(rows, out)
    write_png(rows, out.with_suffix(".png"))
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


@bench.command("contributors", epilog=examples("fedge bench contributors", "fedge bench contributors --devices 1000"))
@click.option("--devices", default="1000,10000,100000", show_default=True, callback=_updates_list,
              help="Comma-separated numbers of devices each of two children lists (one row each).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/contributors.json"), show_default=True)
def contributors(devices: tuple[int, ...], out: Path) -> None:
    """A middle tier taking two children's aggregates: the contributor lists' intake, close and size (docs/aggregation.md)."""
    from tqdm import tqdm

    from sdk.bench.contributors_bench import format_table, run_contributors_bench, write_json

    with tqdm(total=len(devices), desc="contributors bench", unit="N") as bar:
        rows = run_contributors_bench(devices, progress=bar.update)
    click.echo(format_table(rows))
    write_json(rows, out)
    click.echo(f"wrote {out}")


@bench.command("round", epilog=examples("fedge bench round --devices 50", "fedge bench round --devices 10 --repeats 1 --no-tmpfs"))
@click.option("--devices", type=int, default=50, show_default=True, help="Device clients in the region, all started at once.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Alternating rounds per store variant; the median is reported.")
@click.option("--no-tmpfs", is_flag=True, help="Only fedge's store on disk (skip the same store on /dev/shm).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/round.json"), show_default=True)
def round_(devices: int, repeats: int, no_tmpfs: bool, out: Path) -> None:
    """End-to-end round through Mosquitto (root + 1 bridged region): round time, receipt latency, regional peak RSS."""
    from tqdm import tqdm

    from sdk.bench.round_bench import DEFAULT_MODELS, VARIANTS, format_table, run_round_bench, write_json

    if devices < 1 or repeats < 1:
        raise click.BadParameter("--devices and --repeats must be >= 1")
    variants = tuple(v for v in VARIANTS if not (no_tmpfs and v == "tmpfs"))
    with tqdm(total=repeats * len(DEFAULT_MODELS), desc="round bench", unit="repeat") as bar:
        rows = run_round_bench(devices=devices, repeats=repeats, variants=variants, progress=bar.update)
    click.echo(format_table(rows))
    write_json(rows, out)
    click.echo(f"wrote {out}")


@bench.command("downlink", epilog=examples("fedge bench downlink", "fedge bench downlink --quick",
                                              "fedge bench downlink --models watch --specs q4 --devices 5 --rounds 3"))
@click.option("--models", default="watch,fmnist", show_default=True,
              help="Comma-separated: watch (the 1D-CNN), fmnist (the 2D-CNN) of the accuracy benchmark.")
@click.option("--specs", default="q8,q4,topk:0.3+q4", show_default=True, help="Comma-separated downlink compressions.")
@click.option("--devices", type=click.IntRange(min=1), default=20, show_default=True, help="Light device clients.")
@click.option("--rounds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Rounds after the first (full) one; the mean is taken from round 2 on.")
@click.option("--quick", is_flag=True, help="The watch model, q4 only, 3 devices, 3 rounds: a smoke run.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/downlink.json"), show_default=True)
def downlink(models: str, specs: str, devices: int, rounds: int, quick: bool, out: Path) -> None:
    """Bytes down per device per round over MQTT: compressed model deltas vs full float32 models."""
    from device_agent.compression.spec import CompressionSpec
    from sdk.bench.downlink_bench import run

    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not names or any(m not in ("watch", "fmnist") for m in names):
        raise click.BadParameter("expected watch and/or fmnist", param_hint="--models")
    texts = tuple(t.strip() for t in specs.split(",") if t.strip())
    for text in texts:
        try:
            if not CompressionSpec.parse(text).enabled:
                raise ValueError("none is always measured (the float32 baseline)")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--specs") from exc
    if quick:
        names, texts, devices, rounds = ("watch",), ("q4",), 3, 3
    run(models=names, specs=texts, devices=devices, rounds=rounds, out=out)
    click.echo(f"wrote {out}")


@bench.command("fleet", epilog=examples("fedge bench fleet", "fedge bench fleet --quick",
                                           "fedge bench fleet --devices 200 --regions 4 --rounds 2 --agents 0"))
@click.option("--devices", type=click.IntRange(min=1), default=1000, show_default=True, help="Devices in the fleet (real agents included).")
@click.option("--regions", type=click.IntRange(min=1), default=10, show_default=True, help="Regions, each with its own bridged broker and aggregator.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--agents", type=click.IntRange(min=0), default=3, show_default=True,
              help="Devices run as real `fedge-agent run` processes (they train); the rest replay pre-sealed updates.")
@click.option("--generators", type=click.IntRange(min=1), default=2, show_default=True,
              help="Load-generator processes the lightweight devices are multiplexed over.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Each region's round deadline in seconds (rounds close earlier, at quorum: every device).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=1800.0, show_default=True,
              help="Fail when the rounds take longer than this many seconds in all.")
@click.option("--quick", is_flag=True, help="20 devices (1 agent), 2 regions, 1 round: a smoke run, not the benchmark.")
@click.option("--logs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Copy every broker, aggregator, generator and agent log here.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/fleet.json"), show_default=True,
              help="JSON results; a PNG chart is written next to it.")
@click.pass_context
def fleet(ctx: click.Context, devices: int, regions: int, rounds: int, agents: int, generators: int, deadline: float,
          timeout: float, quick: bool, logs: Path | None, out: Path) -> None:
    """A whole fleet on this machine through real Mosquitto (root + bridged regional brokers, generated per-device
    credentials and ACLs), aggregators as separate processes, several rounds: round time, receipt latency, CPU, peak
    RSS and bytes per process, and what saturates first."""
    from tqdm import tqdm

    from sdk.bench.fleet_bench import QUICK, FleetBenchConfig, run_fleet_bench
    from sdk.bench.fleet_report import format_table, summarise, write_json, write_png

    if quick:
        config = QUICK
    else:
        try:
            config = FleetBenchConfig(devices=devices, regions=regions, rounds=rounds, agents=agents, generators=generators,
                                      deadline_s=deadline, timeout_s=timeout)
        except ValueError as exc:
            raise click.UsageError(str(exc), ctx) from exc
    with tqdm(total=3 + config.rounds, desc="fleet bench", unit="step") as bar:

        def progress(message: str) -> None:
            bar.update(1)
            bar.write(message)

        try:
            run = run_fleet_bench(config, progress=progress, keep=logs)
        except RuntimeError as exc:  # a process died or a round did not close: one line, exit 1
            raise click.ClickException(f"fleet bench failed: {exc}") from exc
    summary = summarise(run)
    click.echo(format_table(summary))
    write_json(summary, out)
    write_png(summary, out.with_suffix(".png"))
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


@bench.command("accuracy", epilog=examples(
    "fedge bench accuracy --quick", "fedge bench accuracy --setting watch --setting synthetic",
    "fedge bench accuracy --setting watch-n10 --setting fmnist-n10   # data-scarce, three seeds each",
    "fedge bench accuracy --setting fmnist-full --resume --out docs/results   # hours; rerun the same line after an interruption",
    "fedge bench accuracy --report-only --out docs/results",
    "fedge bench accuracy --data ./my-clients --model mymodels:Net --personal head --out ./my-results"))
@click.option("--setting", "names", multiple=True,
              help="Built-in setting to run (repeatable): watch, watch-scarce, watch-recording, fmnist, synthetic (the default"
                   " set); opt-in: fmnist-long, fmnist-full (100 rounds on all 70k images), watch-compress, fmnist-compress,"
                   " the data-scarce <dataset>-n<N> (dataset watch, fmnist, digits or synthetic; N 10, 25 or 50 examples per"
                   " class; three seeds each) and cold-start-watch, cold-start-fmnist. None when --data is given.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None, help=DATA_HELP.replace(" Replaces --dataset.", ""))
@click.option("--name", default=None, help="--data: the setting's name, used for the output files (default: the folder's name).")
@click.option("--num-classes", type=click.IntRange(min=2), default=None, help="--data: number of classes (default: largest label + 1).")
@click.option("--model", "model_spec", default=None, help=MODEL_HELP + " --data only; default: a built-in model for the data's shape.")
@click.option("--model-arg", "model_args", multiple=True, help=MODEL_ARG_HELP)
@click.option("--shared", default="*", show_default=True, help="--model: comma-separated name prefixes of the federated layers.")
@click.option("--personal", default="", help="--model: comma-separated name prefixes of the personal head (needed by fedsim, fedalt, fedfomo).")
@click.option("--algorithm", "algorithms", multiple=True, type=click.Choice(sorted(ALGORITHMS)),
              help="--data: algorithm to compare (repeatable; default: every one the model allows).")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="--data: rounds (default 20). Built-in settings: only the first N rounds, a cut the report states.")
@click.option("--run", "run_labels", multiple=True,
              help="Built-in settings: only the run with this label (repeatable, e.g. FedAlt), a cut the report states.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="--data: local epochs per round.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="--data: batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LEARNING_RATE, show_default=True,
              help="--data: learning rate (see docs/tuning.md).")
@click.option("--quick", is_flag=True, help="Built-in settings: few rounds on a small data subsample: a smoke run, not the benchmark.")
@click.option("--workers", type=int, default=2, show_default=True, help="Runs in parallel (one ORT thread each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the settings that do not fix their own (the"
                                                                   " data-scarce and cold-start settings run seeds 0, 1 and 2).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("fedge-results"), show_default=True,
              help="Where <setting>.json, <setting>.md and the PNG plots go (the committed report is regenerated only with"
                   " an explicit --out docs/results).")
@click.option("--report-only", is_flag=True, help="Rebuild the tables and plots from the JSON already under --out; train nothing.")
@click.option("--resume", is_flag=True, help="Reuse runs finished under --out/.progress and the runs the setting's report under"
                                            " --out already holds (same settings and hyper-parameters: adding runs to a report"
                                            " runs only those), and continue interrupted runs from their last checkpoint"
                                            " (without it, a setting's progress there is cleared first).")
def accuracy(names: tuple[str, ...], data_dir: Path | None, name: str | None, num_classes: int | None, model_spec: str | None,
             model_args: tuple[str, ...], shared: str, personal: str, algorithms: tuple[str, ...], rounds: int, epochs: int,
             batch_size: int, lr: float, quick: bool, workers: int, seed: int, out: Path, report_only: bool, resume: bool,
             run_labels: tuple[str, ...]) -> None:
    """Every algorithm on real non-IID data (or your own): per-device personalised accuracy, global model, gain over
    local-only, bytes per device per round and wall time; JSON, Markdown tables and PNG plots under --out."""
    from tqdm import tqdm

    from sdk.bench.accuracy_bench import DEFAULT_SETTINGS, rewrite_reports, run_accuracy_bench, settings, user_setting
    from sdk.bench.accuracy_settings import cut_setting

    table = settings("quick" if quick else "full")
    chosen = list(names) or ([] if data_dir is not None else list(DEFAULT_SETTINGS))
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise click.BadParameter(f"unknown settings {unknown}; choose from {sorted(table)}", param_hint="--setting")
    extra = []
    if data_dir is not None and run_labels:
        raise click.BadParameter("--run cuts built-in settings; with --data choose --algorithm", param_hint="--run")
    if data_dir is None and (rounds is not None or run_labels):
        try:
            extra = [cut_setting(table[n], rounds=rounds, labels=run_labels) for n in chosen if n in table]
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--rounds/--run") from exc
    if data_dir is not None:
        extra.append(_user_setting(user_setting, data_dir, name=name, num_classes=num_classes, model_spec=model_spec,
                                   model_args=model_args, shared=shared, personal=personal, algorithms=algorithms, rounds=rounds or 20,
                                   epochs=epochs, batch_size=batch_size, lr=lr))
        chosen.append(extra[-1].name)
    if report_only:
        missing = [n for n in chosen if not (out / f"{n}.json").is_file()]
        if missing:
            raise click.ClickException(f"no results to report for {missing} under {out}; run without --report-only first")
        for _, (text, _) in rewrite_reports(out, chosen).items():
            click.echo("\n" + text)
        return
    if workers < 1:
        raise click.BadParameter("--workers must be >= 1")
    total = sum(len(s.runs) * len(s.run_seeds(seed)) for s in extra) + sum(
        len(table[n].runs) * len(table[n].run_seeds(seed)) for n in chosen if n in table and n not in {s.name for s in extra})
    with tqdm(total=total, desc="accuracy bench", unit="run") as bar:

        def progress(message: str) -> None:
            bar.update(1)
            bar.write(message)

        reports = run_accuracy_bench(chosen, profile="quick" if quick else "full", seed=seed, workers=workers, out_dir=out,
                                     progress=progress, extra=extra, resume=resume)
    for setting_name in chosen:
        click.echo("\n" + reports[setting_name][0])
    click.echo(f"\nwrote {out}/<setting>.json, .md and .png for: {', '.join(chosen)}")


def _user_setting(make, data_dir: Path, *, name: str | None, num_classes: int | None, model_spec: str | None,  # type: ignore[no-untyped-def]
                  model_args: tuple[str, ...], shared: str, personal: str, algorithms: tuple[str, ...], rounds: int, epochs: int,
                  batch_size: int, lr: float):
    """The setting for ``--data``, after reading the folder once here so a bad file is a usage error before any worker starts."""
    from sdk.cli.model_option import cli_model_factory
    from sdk.cli.simulate_cmd import check_model_option, load_data_option
    from sdk.model_spec import parse_prefixes
    from sdk.simulation.runner import ModelSource

    data = load_data_option(data_dir, None, seed=0, subsample=None, num_classes=num_classes)
    if (name or data.name) in settings_names():
        raise click.BadParameter(f"{name or data.name!r} is a built-in setting's name; choose another", param_hint="--name")
    if model_spec is not None:  # fail here, in one line, if the model cannot be imported or does not fit the data
        source = ModelSource(factory=cli_model_factory(model_spec, model_args), personal=parse_prefixes(personal),
                             shared=parse_prefixes(shared), name=model_spec)
        check_model_option(source, data, "fedalt" if source.personal else "fedavg")
    try:
        return make(str(data_dir), name=name or data.name, model=model_spec or "auto", model_args=model_args,
                    personal=parse_prefixes(personal), shared=parse_prefixes(shared), num_classes=num_classes,
                    algorithms=algorithms, rounds=rounds, epochs=epochs, batch_size=batch_size, learning_rate=lr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--personal") from exc


def settings_names() -> set[str]:
    """Names of the built-in accuracy settings."""
    from sdk.bench.accuracy_bench import settings

    return set(settings("full"))


@bench.command("flood")
@click.option("--devices", type=click.IntRange(min=1), default=20, show_default=True, help="Honest device clients.")
@click.option("--flood", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Messages the flooding device account publishes (copies of its signed update, QoS 1).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Alternating rounds per variant; medians reported.")
@click.option("--receipt-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Honest devices resend after this long without a receipt.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/flood.json"), show_default=True)
def flood(devices: int, flood: int, repeats: int, receipt_timeout: float, out: Path) -> None:
    """One device account floods its update topic on real Mosquitto: honest devices' round time with and without it.

    \b
    Examples:
      fedge bench flood
      fedge bench flood --devices 10 --flood 2000 --repeats 1
    """
    from tqdm import tqdm

    from sdk.bench.flood_bench import VARIANTS, format_table, run_flood_bench, write_json

    with tqdm(total=repeats * len(VARIANTS), desc="flood bench", unit="round") as bar:
        rows = run_flood_bench(devices=devices, flood=flood, repeats=repeats, receipt_timeout_s=receipt_timeout,
                               progress=bar.update)
    click.echo(format_table(rows))
    write_json(rows, out)
    click.echo(f"wrote {out}")


@bench.command("release", epilog=examples("fedge bench release", "fedge bench release --repeats 1 --releases 3"))
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Fresh processes per variant (alternating); medians reported.")
@click.option("--releases", type=click.IntRange(min=1), default=20, show_default=True,
              help="Releases in the repository a device refreshes from.")
@click.option("--bundle-kib", type=click.IntRange(min=1), default=1024, show_default=True, help="Size of the bundle checked.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/release.json"), show_default=True)
def release(repeats: int, releases: int, bundle_kib: int, out: Path) -> None:
    """What following releases with python-tuf costs a device: installed size, import time and RSS, refresh + verify."""
    from tqdm import tqdm

    from sdk.bench.release_bench import OTHERS, TUF_STACK, format_table, installed_mib, measure_imports, measure_verify, \
        write_json

    sizes = installed_mib(TUF_STACK + OTHERS)
    with tqdm(total=repeats * 4, desc="release bench", unit="process") as bar:
        imports = measure_imports(repeats, progress=bar.update)
        verify = [measure_verify(releases=1, bundle_kib=bundle_kib, repeats=repeats, progress=bar.update),
                  measure_verify(releases=releases, bundle_kib=bundle_kib, repeats=repeats, progress=bar.update)]
    click.echo(format_table(sizes, imports, verify))
    write_json(out, sizes, imports, verify)
    click.echo(f"wrote {out}")


@bench.command("attack")
@click.option("--rounds", type=click.IntRange(min=1), default=15, show_default=True, help="Rounds per run, attacked every round.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/attack.json"), show_default=True)
def attack(rounds: int, seed: int, out: Path) -> None:
    """Colluding devices (1, 2, 5 of 20) send huge-norm updates, inflated sample counts, or both, through the real
    aggregators: how far the global model moves beyond the honest-only step, and the accuracy left (default vs unsafe).

    \b
    Examples:
      fedge bench attack
      fedge bench attack --rounds 5 --out /tmp/attack.json
    """
    from tqdm import tqdm

    from sdk.bench.attack_bench import ATTACKS, COLLUDERS, CONFIGS, format_table, run_attack_bench, write_json

    total = len(CONFIGS) * (1 + (len(ATTACKS) - 1) * len(COLLUDERS))
    with tqdm(total=total, desc="attack bench", unit="run") as bar:
        runs = run_attack_bench(rounds=rounds, seed=seed, progress=bar.update)
    click.echo(format_table(runs, rounds=rounds))
    write_json(runs, out, rounds=rounds, seed=seed)
    click.echo(f"wrote {out}")


@bench.command("sweep", epilog=examples("fedge bench sweep --dataset digits --quick", "fedge bench sweep --out ./sweep",
                                           "fedge bench sweep --out ./sweep --resume"))
@click.option("--dataset", "datasets", multiple=True, help="Built-in dataset to sweep (repeatable): watch, digits, fmnist. Default: all three.")
@click.option("--quick", is_flag=True, help="Two learning rates, two algorithms, two rounds: a smoke run, not the measurement.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Runs in parallel (one ORT thread each).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("fedge-results"), show_default=True,
              help="Folder for sweep.json, sweep.md and sweep.png.")
@click.option("--resume", is_flag=True, help="Reuse the points already in --out/sweep.json (same seed and profile); run only the rest.")
def sweep(datasets: tuple[str, ...], quick: bool, workers: int, seed: int, out: Path, resume: bool) -> None:
    """Sensitivity of accuracy to learning rate, local epochs and FedProx mu on the built-in datasets (see docs/tuning.md)."""
    import json
    from dataclasses import asdict

    from tqdm import tqdm

    from sdk.bench.sweep import SWEEP_DATASETS, Profile, run_sweep, sweep_points

    chosen = list(datasets) or list(SWEEP_DATASETS)
    unknown = [d for d in chosen if d not in SWEEP_DATASETS]
    if unknown:
        raise click.BadParameter(f"unknown datasets {unknown}; choose from {sorted(SWEEP_DATASETS)}", param_hint="--dataset")
    profile: Profile = "quick" if quick else "full"
    previous = _previous_sweep(out / "sweep.json", seed=seed, profile=profile) if resume else []
    points = [json.dumps(asdict(p), sort_keys=True) for p in sweep_points(chosen, profile)]
    reused = len(set(points) & {json.dumps(r["point"], sort_keys=True) for r in previous})  # type: ignore[index]
    with tqdm(total=len(points) - reused, desc="sweep", unit="run") as bar:

        def progress(message: str) -> None:
            bar.update(1)
            bar.write(message)

        table, _ = run_sweep(chosen, profile=profile, seed=seed, workers=workers, out_dir=out, progress=progress, previous=previous)
    click.echo("\n" + table)
    click.echo(f"\nwrote {out}/sweep.json, sweep.md and sweep.png")


def _previous_sweep(path: Path, *, seed: int, profile: str) -> list[dict[str, object]]:
    """The results of an earlier sweep under --out, checked to be of the same seed and profile ([] if there is none)."""
    import json

    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text())
        results = list(payload["results"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.BadParameter(f"{path}: not a sweep result to resume from ({exc})", param_hint="--resume") from exc
    if payload.get("seed") != seed or payload.get("profile") != profile:
        raise click.BadParameter(f"{path} was made with seed {payload.get('seed')}, profile {payload.get('profile')};"
                                 f" this run is seed {seed}, profile {profile}", param_hint="--resume")
    return results
