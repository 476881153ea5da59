"""``fedge bench``: benchmarks that print a table and write JSON."""

from __future__ import annotations

from pathlib import Path

import click

from sdk.cli.family import examples


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
    """Portable and ort-training backends (torch hidden) vs PyTorch eager: steps/s, peak RSS, import time; MLP, 1D-CNN, 2D-CNN."""
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


@bench.command("aggregator", epilog=examples("fedge bench aggregator --updates 50,200"))
@click.option("--updates", default="50,200", show_default=True, callback=_updates_list,
              help="Comma-separated numbers of sealed updates per round (one row each).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Alternating runs per path; the median is reported.")
@click.option("--no-memory", is_flag=True, help="Skip the in-memory streaming path (no SQLite).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/aggregator.json"), show_default=True)
def aggregator(updates: tuple[int, ...], repeats: int, no_memory: bool, out: Path) -> None:
    """Regional aggregator, 100k-parameter model: streaming + SQLite vs keeping every delta; updates/s and peak RSS."""
    from tqdm import tqdm

    from sdk.bench.aggregator_bench import PATHS, format_table, run_aggregator_bench, write_json

    paths = tuple(p for p in PATHS if not (no_memory and p == "memory"))
    with tqdm(total=repeats * len(updates), desc="aggregator bench", unit="round") as bar:
        rows = run_aggregator_bench(updates=updates, repeats=repeats, paths=paths, progress=bar.update)
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


@bench.command("accuracy", epilog=examples("fedge bench accuracy --quick", "fedge bench accuracy --setting watch --setting synthetic", "fedge bench accuracy --report-only"))
@click.option("--setting", "names", multiple=True,
              help="Setting to run (repeatable): watch, watch-scarce, watch-recording, fmnist, synthetic, fmnist-long. Default: all but fmnist-long.")
@click.option("--quick", is_flag=True, help="Few rounds on a small data subsample: a smoke run, not the benchmark.")
@click.option("--workers", type=int, default=2, show_default=True, help="Runs in parallel (one ORT thread each).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("docs/results"), show_default=True,
              help="Where <setting>.json, <setting>.md and the PNG plots go.")
@click.option("--report-only", is_flag=True, help="Rebuild the tables and plots from the JSON already under --out; train nothing.")
def accuracy(names: tuple[str, ...], quick: bool, workers: int, seed: int, out: Path, report_only: bool) -> None:
    """Every algorithm on real non-IID data: per-device personalised accuracy, global model, gain over local-only,
    bytes per device per round and wall time; JSON, Markdown tables and PNG plots under --out."""
    from tqdm import tqdm

    from sdk.bench.accuracy_bench import DEFAULT_SETTINGS, rewrite_reports, run_accuracy_bench, settings

    table = settings("quick" if quick else "full")
    chosen = list(names) or list(DEFAULT_SETTINGS)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise click.BadParameter(f"unknown settings {unknown}; choose from {sorted(table)}", param_hint="--setting")
    if report_only:
        missing = [n for n in chosen if not (out / f"{n}.json").is_file()]
        if missing:
            raise click.ClickException(f"no results to report for {missing} under {out}; run without --report-only first")
        for name, (text, _) in rewrite_reports(out, chosen).items():
            click.echo("\n" + text)
        return
    if workers < 1:
        raise click.BadParameter("--workers must be >= 1")
    total = sum(len(table[n].runs) for n in chosen)
    with tqdm(total=total, desc="accuracy bench", unit="run") as bar:

        def progress(message: str) -> None:
            bar.update(1)
            bar.write(message)

        reports = run_accuracy_bench(chosen, profile="quick" if quick else "full", seed=seed, workers=workers, out_dir=out,
                                     progress=progress)
    for name in chosen:
        click.echo("\n" + reports[name][0])
    click.echo(f"\nwrote {out}/<setting>.json, .md and .png for: {', '.join(chosen)}")


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
