"""``fedge bench``: benchmarks that print a table and write JSON."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def bench() -> None:
    """Benchmarks (measured side by side in one run; ratios are the headline)."""


@bench.command("train")
@click.option("--repeats", type=int, default=3, show_default=True, help="Alternating runs per runtime; the median is reported.")
@click.option("--threads", type=int, default=2, show_default=True, help="Intra-op threads for both runtimes.")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--quick", is_flag=True, help="10x fewer steps (smoke test).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/train.json"), show_default=True)
def train(repeats: int, threads: int, batch: int, quick: bool, out: Path) -> None:
    """Device trainer (ORT, torch hidden) vs PyTorch eager: steps/s and peak RSS for an MLP and a 1D-CNN."""
    from tqdm import tqdm

    from sdk.bench.train_bench import DEFAULT_MODELS, format_table, run_train_bench, write_json

    with tqdm(total=repeats * len(DEFAULT_MODELS), desc="train bench", unit="pair") as bar:
        rows = run_train_bench(batch=batch, threads=threads, repeats=repeats, step_scale=0.1 if quick else 1.0, progress=bar.update)
    click.echo(format_table(rows))
    write_json(rows, out, threads=threads)
    click.echo(f"wrote {out}")
