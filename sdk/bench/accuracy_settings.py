"""The accuracy benchmark's settings: built-in ones (real non-IID data) and one made from a user's folder.

A *setting* is a dataset split, a model, a training budget and a list of
*runs* (one algorithm each, possibly with stragglers or a hierarchy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from sdk.training_defaults import DEFAULT_LEARNING_RATE, DEFAULT_OPTIMIZER

Profile = Literal["full", "quick"]
DEFAULT_SETTINGS = ("watch", "watch-scarce", "watch-recording", "fmnist", "synthetic")
"""What ``fedge bench accuracy`` runs without ``--setting``; ``fmnist-long``, ``fmnist-full``, the data-scarce
settings (``<dataset>-n<N>``) and the cold-start settings are opt-in (see ``fedge bench accuracy --help``)."""
TIE_MARGIN = 0.005
"""Accuracy differences up to half a point count as ties in the claims (seed-to-seed spread measured on the
smartwatch setting is 0.03-1 point)."""
PFLLIB_FMNIST_DIR01 = {"FedAvg": 85.85, "FedProx": 85.63, "FedFomo": 97.21, "FedPer": 97.44, "FedRep": 97.56, "Ditto": 97.47,
                       "FedALA": 97.66, "FedDBE": 97.69, "GPFL": 97.81, "FedCP": 97.89}
"""PFLlib's leaderboard, Fashion-MNIST Dir(0.1), 20 clients, best-round accuracy over 2,000 rounds (FedCP is the best)."""
SCARCE_PER_CLASS = (10, 25, 50)
"""Training examples per class per client in the data-scarce settings."""
SCARCE_SEEDS = (0, 1, 2)
"""Seeds of every multi-seed setting: the spread between them is what a gain must exceed."""
CLEAR_SHARE_TARGET = 0.8
"""The data-scarce target: the best personalised method beats local-only by more than the seed spread on this share of devices."""


@dataclass(frozen=True, kw_only=True)
class AccuracyRun:
    """One algorithm run inside a setting.

    ``label`` names the row; ``algorithm`` is a key of
    :data:`sdk.simulation.algorithms.ALGORITHMS`. ``regional_weight`` not
    None runs the two-tier hierarchy over the dataset's regions.
    ``ditto_lambda``: Ditto's proximal weight (None: the algorithm's default).
    ``compression`` / ``downlink``: what devices send up and the server
    sends down (:class:`~device_agent.compression.CompressionSpec` text;
    ``none`` is full float32; the simulator runs the same downlink arithmetic as the regional
    aggregator's model deltas, docs/protocol.md).
    ``choice_epochs`` > 0 adds the rows ``<label>+FT(<scope>, early stop)``, ``<label>, ensemble with local``
    and ``<label>, chosen (<rule>)``: each device keeps, on its validation split, the best of a local-only
    model, the run's model, its fine-tunings with early stopping (at most this many epochs) and their
    ensemble (:mod:`sdk.simulation.local_choice`).
    """

    label: str
    algorithm: str
    mu: float | None = None
    stragglers: float = 0.0
    regional_weight: float | None = None
    finetune_epochs: int = 0
    fomo_candidates: int = 5
    ditto_lambda: float | None = None
    compression: str = "none"
    downlink: str = "none"
    choice_epochs: int = 0


@dataclass(frozen=True, kw_only=True)
class AccuracySetting:
    """A dataset split, a model, a budget, and the runs compared on it.

    ``dataset`` ``"folder"`` reads the user's per-client ``.npz`` files from
    ``data_dir`` (:func:`sdk.datasets.load_client_folder`, ``num_classes``
    None: inferred). ``model`` is a built-in kind, ``"auto"`` (the built-in
    model for the data's shape) or ``MODULE:CALLABLE`` built with
    ``model_args`` (``KEY=VALUE``), whose ``personal`` prefixes name the head.

    Multi-seed settings name their ``seeds`` and usually fix the data with
    ``data_seed``; ``per_class`` makes the data scarce; ``checkpoint_every``
    keeps a resumable checkpoint; ``clients`` overrides the loader's client
    count. Cold start: the ``newcomers`` (client ids) stay out of the fleet and
    join it after each of ``join_rounds`` with ``newcomer_samples`` examples,
    training their head ``head_epochs`` epochs (local-only: ``rounds * epochs``).
    """

    name: str
    title: str
    dataset: str  # "watch-time" | "watch-scarce" | "watch-recording" | "fashion-mnist" | "synthetic" | "digits" | "folder"
    model: str  # "cnn1d" | "cnn2d" | "logreg" | "mlp" | "auto" | "MODULE:CALLABLE"
    rounds: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    runs: tuple[AccuracyRun, ...]
    participation: float = 1.0
    straggler_work: float = 0.5
    subsample: float | None = None
    regions: str | None = None  # None | "side" | "labels-<k>"
    notes: tuple[str, ...] = ()
    data_dir: str | None = None
    num_classes: int | None = None
    model_args: tuple[str, ...] = ()
    personal: tuple[str, ...] = ()
    shared: tuple[str, ...] = ("*",)
    seeds: tuple[int, ...] = ()
    data_seed: int | None = None
    per_class: int | None = None
    checkpoint_every: int = 0
    clients: int | None = None
    newcomers: tuple[str, ...] = ()
    join_rounds: tuple[int, ...] = ()
    newcomer_samples: tuple[int, ...] = (10, 50, 100)
    head_epochs: int = 10

    def run_seeds(self, seed: int) -> tuple[int, ...]:
        """The seeds this setting runs: its own ``seeds``, or ``(seed,)`` (the command's ``--seed``) when it has none."""
        return self.seeds or (seed,)


def cut_setting(setting: AccuracySetting, *, rounds: int | None = None, labels: Sequence[str] = ()) -> AccuracySetting:
    """``setting`` with at most ``rounds`` rounds and only the runs named in ``labels`` (empty: all), the cut noted in its title.

    What fits on a small machine: the report then says it is a cut of the full setting. Rounds above the
    setting's own and labels it does not have are a ValueError.
    """
    if rounds is not None and not 1 <= rounds <= setting.rounds:
        raise ValueError(f"{setting.name} runs {setting.rounds} rounds; --rounds must be between 1 and that")
    known = [r.label for r in setting.runs]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ValueError(f"{setting.name} has no runs {unknown}; its runs are {known}")
    runs = tuple(r for r in setting.runs if not labels or r.label in labels)
    cut = []
    if rounds is not None and rounds < setting.rounds:
        cut.append(f"{rounds} of its {setting.rounds} rounds")
    if len(runs) < len(setting.runs):
        cut.append(f"{len(runs)} of its {len(setting.runs)} runs")
    if not cut:
        return setting
    joins = tuple(r for r in setting.join_rounds if r <= (rounds or setting.rounds))
    if setting.newcomers and not joins:
        raise ValueError(f"{setting.name}: newcomers join after rounds {list(setting.join_rounds)}; keep at least the first")
    return replace(setting, rounds=rounds or setting.rounds, runs=runs, join_rounds=joins, title=f"{setting.title} (cut: {' and '.join(cut)})",
                   notes=(*setting.notes, f"This report is a cut of the setting: {' and '.join(cut)} (--rounds/--run), what fitted"
                                          " the machine; the full setting runs without them."))


def setting_from_dict(raw: dict[str, Any]) -> AccuracySetting:
    """An :class:`AccuracySetting` back from its ``asdict`` form (a results JSON); unknown keys are ignored."""
    known = {f.name for f in fields(AccuracySetting)}
    run_fields = {f.name for f in fields(AccuracyRun)}
    values = {k: v for k, v in raw.items() if k in known}
    values["runs"] = tuple(AccuracyRun(**{k: v for k, v in r.items() if k in run_fields}) for r in raw["runs"])
    for key in ("notes", "model_args", "personal", "shared", "seeds", "newcomers", "join_rounds", "newcomer_samples"):
        if key in values:
            values[key] = tuple(values[key])
    return AccuracySetting(**values)


def _personal_runs(ft_epochs: int) -> tuple[AccuracyRun, ...]:
    return (
        AccuracyRun(label="Local-only", algorithm="local"),
        AccuracyRun(label="FedAvg", algorithm="fedavg", finetune_epochs=ft_epochs),
        AccuracyRun(label="FedProx", algorithm="fedprox", mu=0.01),
        AccuracyRun(label="FedSim", algorithm="fedsim"),
        AccuracyRun(label="FedAlt", algorithm="fedalt"),
        AccuracyRun(label="FedFomo", algorithm="fedfomo", fomo_candidates=5),
    )


DITTO_RUN = AccuracyRun(label="Ditto", algorithm="ditto")
"""One Ditto run gives two rows: ``Ditto`` (its personal model) and ``Ditto+choice`` (the mixture each device chose)."""


def settings(profile: Profile = "full") -> dict[str, AccuracySetting]:
    """The benchmark's settings; ``quick`` shrinks rounds and data for a smoke run."""
    quick = profile == "quick"
    watch_common = dict(model="cnn1d", rounds=4 if quick else 30, epochs=2, batch_size=32, learning_rate=0.005, optimizer="adamw")
    hier = (
        AccuracyRun(label="Hier. FedAvg a=0.5", algorithm="fedavg", regional_weight=0.5),
        AccuracyRun(label="Hier. FedAvg a=0.9", algorithm="fedavg", regional_weight=0.9),
    )
    out = [
        AccuracySetting(
            name="watch", title="Smartwatch exercises, 20 clients (subject x arm), time split", dataset="watch-time",
            regions="side", runs=(*_personal_runs(2), *hier,
                                  AccuracyRun(label="Hier. FedAlt a=0.5", algorithm="fedalt", regional_weight=0.5)),
            **watch_common,  # type: ignore[arg-type]
            notes=("Each recording is cut in time: the last 25% of every recording is test, 15% of the rest validation;"
                   " windows never cross a cut, so no time step is in two splits.",
                   "Hierarchical runs: two regions, the left-arm and the right-arm clients."),
        ),
        AccuracySetting(
            name="watch-scarce", title="Smartwatch exercises, 20 clients, time split, only the first 25% of each training segment",
            dataset="watch-scarce", runs=_personal_runs(2), **watch_common,  # type: ignore[arg-type]
            notes=("As the watch setting, but each device keeps only the first quarter of its training steps (the first few"
                   " repetitions of each exercise): the scarce-data case of a new device. Validation and test are unchanged.",),
        ),
        AccuracySetting(
            name="watch-recording", title="Smartwatch exercises, 20 clients, split by recording (unseen exercise)",
            dataset="watch-recording", runs=_personal_runs(2), **watch_common,  # type: ignore[arg-type]
            notes=("Every client has exactly one recording per exercise, so holding out whole recordings means each"
                   " client's test (and validation) exercise is one it has no training data for.",),
        ),
        AccuracySetting(
            name="fmnist", title="Fashion-MNIST, Dirichlet(0.1) over 20 clients, all clients every round",
            dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 15, epochs=1, batch_size=32,
            learning_rate=0.001, optimizer="adamw", subsample=0.05 if quick else 0.5, regions="labels-4",
            runs=(*_personal_runs(1), hier[0]),
            notes=("Hierarchical run: four regions of clients grouped by label mix (k-means on label histograms).",),
        ),
    ]
    out.append(AccuracySetting(
        name="fmnist-long", title="Fashion-MNIST Dir(0.1): local-only vs FedAlt over 40 rounds (the round-budget check)",
        dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 40, epochs=1, batch_size=32,
        learning_rate=0.001, optimizer="adamw", subsample=0.05 if quick else 0.5,
        runs=(AccuracyRun(label="Local-only", algorithm="local"), AccuracyRun(label="FedAlt", algorithm="fedalt")),
        notes=("Same data, model and budget per round as the fmnist setting, 40 rounds instead of 15.",),
    ))
    out.extend(_compress_settings(quick, watch_common))
    stragglers = (0.0, 0.5, 0.9)
    synthetic_runs = tuple(
        run for s in stragglers for run in (
            AccuracyRun(label=f"FedAvg, {s:.0%} stragglers", algorithm="fedavg", stragglers=s),
            AccuracyRun(label=f"FedProx mu=1, {s:.0%} stragglers", algorithm="fedprox", mu=1.0, stragglers=s),
        )
    )
    out.append(AccuracySetting(
        name="synthetic", title="FedProx Synthetic(1, 1), 30 devices, multinomial logistic regression",
        dataset="synthetic", model="logreg", rounds=10 if quick else 100, epochs=20, batch_size=10, learning_rate=0.01,
        optimizer="sgd", participation=10 / 30, straggler_work=0.25, runs=synthetic_runs,
        notes=("As in Li et al. (2020): 10 of 30 devices per round, 20 local epochs, batch 10, SGD lr 0.01; a straggler does"
               " a quarter of its budget; FedAvg drops stragglers' updates, FedProx keeps their partial work.",),
    ))
    out.append(AccuracySetting(
        name="fmnist-full", title="Fashion-MNIST Dir(0.1), all 70,000 images, 20 clients, all every round, 100 rounds",
        dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 100, epochs=1, batch_size=32, learning_rate=0.001,
        optimizer="adamw", subsample=0.05 if quick else None, checkpoint_every=5,
        runs=(AccuracyRun(label="Local-only", algorithm="local"), AccuracyRun(label="FedAvg", algorithm="fedavg"),
              AccuracyRun(label="FedAlt", algorithm="fedalt"), DITTO_RUN),
        notes=("PFLlib's leaderboard setting on all 70,000 images (its best: FedCP 97.89, FedRep 97.56, best round of"
               " 2,000), here 100 rounds with AdamW lr 0.001, batch 32, 1 local epoch (PFLlib: SGD lr 0.005, batch 10).",),
    ))
    out.extend(_scarce_settings(quick))
    out.extend(_cold_start_settings(quick))
    return {s.name: s for s in out}


def _cold_start_settings(quick: bool) -> list[AccuracySetting]:
    """A device joins a running fleet with 10, 50 or 100 labelled examples: the fleet's model + head steps vs local-only."""
    runs = (AccuracyRun(label="FedAvg", algorithm="fedavg"), AccuracyRun(label="FedAlt", algorithm="fedalt"))
    note = ("Newcomers never train with the fleet. After the listed rounds each takes n of its training examples (seeded,"
            " the same n at every join round) and is tested on its whole test split: the fleet's global model as it is"
            " (FedAvg), the fleet's model with its head trained {head} epochs on the n examples (FedAvg's whole model, or"
            " FedAlt's trunk with a fresh head), and local-only: the same model trained from scratch on the same n"
            " examples for {local} epochs.")
    return [
        AccuracySetting(
            name="cold-start-watch", title="Cold start, smartwatch: subjects 9 and 10 (4 arms) join a 16-arm fleet",
            dataset="watch-time", model="cnn1d", rounds=4 if quick else 30, epochs=2, batch_size=32, learning_rate=0.005,
            optimizer="adamw", runs=runs, seeds=SCARCE_SEEDS, data_seed=0,
            newcomers=("s09-left", "s09-right", "s10-left", "s10-right"), join_rounds=(1, 4) if quick else (1, 5, 10, 30),
            notes=(note.format(head=10, local=60),
                   "A newcomer's other arm is a newcomer too: no part of a newcomer's body was in the fleet."),
        ),
        AccuracySetting(
            name="cold-start-fmnist", title="Cold start, Fashion-MNIST Dir(0.1): 4 newcomers join a 20-client fleet",
            dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 15, epochs=1, batch_size=32, learning_rate=0.001,
            optimizer="adamw", subsample=0.05 if quick else 0.5, runs=runs, seeds=SCARCE_SEEDS, data_seed=1, clients=24,
            newcomers=("fmnist-20", "fmnist-21", "fmnist-22", "fmnist-23"), join_rounds=(1, 3) if quick else (1, 5, 15),
            notes=(note.format(head=10, local=15),
                   "Dirichlet(0.1) over 24 clients of half the 70k images (data seed 1); the last four are the newcomers."),
        ),
    ]


CHOICE_EPOCHS = 20
"""Most fine-tuning epochs (early stopping, patience 3) before the per-device choice against local-only."""


def _with_choice(runs: tuple[AccuracyRun, ...]) -> tuple[AccuracyRun, ...]:
    """The data-scarce runs with the per-device choice against local-only on every averaging run."""
    return tuple(replace(r, choice_epochs=CHOICE_EPOCHS) if r.algorithm in ("fedavg", "fedalt", "ditto") else r
                 for r in runs)


def _scarce_settings(quick: bool) -> list[AccuracySetting]:
    """Every built-in dataset with at most N training examples per class per client, three seeds each."""
    out = []
    for n in SCARCE_PER_CLASS:
        common = dict(seeds=SCARCE_SEEDS, per_class=n, data_seed=0)
        note = (f"At most {n} training and {max(1, n // 5)} validation examples per class per client (the first in the"
                " loader's order: in time for the smartwatch), test splits whole; data fixed, seeds 0-2 vary the initial"
                " weights and every shuffle.")
        out += [
            AccuracySetting(
                name=f"watch-n{n}", title=f"Smartwatch, 20 clients, time split, {n} training windows per class per client",
                dataset="watch-time", model="cnn1d", rounds=4 if quick else 30, epochs=2, batch_size=32, learning_rate=0.005,
                optimizer="adamw", runs=_with_choice((*_personal_runs(2), DITTO_RUN)), notes=(note,), **common),  # type: ignore[arg-type]
            AccuracySetting(
                name=f"fmnist-n{n}", title=f"Fashion-MNIST Dir(0.1), 20 clients, {n} training images per class per client",
                dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 20, epochs=5, batch_size=32, learning_rate=0.001,
                optimizer="adamw", subsample=0.05 if quick else 0.5,
                runs=_with_choice((AccuracyRun(label="Local-only", algorithm="local"),
                                   AccuracyRun(label="FedAvg", algorithm="fedavg", finetune_epochs=5),
                                   AccuracyRun(label="FedAlt", algorithm="fedalt"), DITTO_RUN)),
                notes=(note, "The fmnist setting's split (half of the 70k images, Dirichlet(0.1), data seed 1)."),
                **{**common, "data_seed": 1}),  # type: ignore[arg-type]
            AccuracySetting(
                name=f"digits-n{n}", title=f"Digits, 8 clients, Dirichlet(0.3), {n} training images per class per client",
                dataset="digits", model="mlp", rounds=4 if quick else 30, epochs=5, batch_size=32,
                learning_rate=DEFAULT_LEARNING_RATE, optimizer=DEFAULT_OPTIMIZER, runs=_with_choice((*_personal_runs(5), DITTO_RUN)),
                notes=(note,), **common),  # type: ignore[arg-type]
            AccuracySetting(
                name=f"synthetic-n{n}", title=f"FedProx Synthetic(1, 1), 30 devices, {n} training examples per class per device",
                dataset="synthetic", model="logreg", rounds=5 if quick else 50, epochs=5, batch_size=10, learning_rate=0.01,
                optimizer="sgd",
                runs=_with_choice((AccuracyRun(label="Local-only", algorithm="local"),
                                   AccuracyRun(label="FedAvg", algorithm="fedavg", finetune_epochs=5),
                                   AccuracyRun(label="FedProx", algorithm="fedprox", mu=1.0), DITTO_RUN)),
                notes=(note, "Multinomial logistic regression has no head to keep personal: Ditto personalises the whole"
                       " model, FedAvg+FT(all) fine-tunes it; every device takes part in every round."),
                **common),  # type: ignore[arg-type]
        ]
    return out




COMPRESSED_RUNS = (("q8+deflate", "q8+deflate"), ("q4+deflate", "q4+deflate"), ("q4+deflate", "q6+deflate"),
                   ("topk:0.3+q4+deflate", "q4+deflate"))
"""(up, down) pairs the compression settings compare with full float32. ``+deflate`` is lossless (zlib over the
encoded tensors), so each run's accuracy is what the same spec without it gives, bit for bit, and its bytes are less."""
RECOMMENDED_COMPRESSION = ("q4+deflate", "q6+deflate")
"""The watch setting's FedAlt pair: 4-bit up (errors average over the devices), 6-bit down (one error, every device).
Measured since (docs/benchmarks.md): the 6-bit downlink buys no accuracy that the seed noise shows; q4 both ways is cheaper."""


def _compress_settings(quick: bool, watch_common: dict[str, Any]) -> list[AccuracySetting]:
    """``watch-compress`` and ``fmnist-compress``: FedAvg (and FedAlt on the watch) in float32 vs compressed traffic."""
    runs = (AccuracyRun(label="FedAvg", algorithm="fedavg"),
            *(AccuracyRun(label=f"FedAvg, up {up}, down {down}", algorithm="fedavg", compression=up, downlink=down)
              for up, down in COMPRESSED_RUNS))
    up, down = RECOMMENDED_COMPRESSION
    note = ("Traffic is the encoded tensor payload per participating device per round, averaged over rounds (the envelope"
            " adds ~0.5 KB per message); up is the device's error-feedback compression (device_agent.compression), down is"
            " the server's, simulated here (the MQTT protocol's compressed model deltas are docs/protocol.md's).")
    return [
        AccuracySetting(
            name="watch-compress", title="Smartwatch, 20 clients, time split: compressed vs full float32 traffic",
            dataset="watch-time", notes=(note,),
            runs=(*runs, AccuracyRun(label="FedAlt", algorithm="fedalt"),
                  AccuracyRun(label=f"FedAlt, up {up}, down {down}", algorithm="fedalt", compression=up, downlink=down)),
            **watch_common,  # type: ignore[arg-type]
        ),
        AccuracySetting(
            name="fmnist-compress", title="Fashion-MNIST Dir(0.1), 20 clients: compressed vs full float32 traffic",
            dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 15, epochs=1, batch_size=32, learning_rate=0.001,
            optimizer="adamw", subsample=0.05 if quick else 0.1, runs=runs,
            notes=(note, "Smaller than the fmnist setting (15 rounds on 10% of the images, not half) so that it fits a shared"
                         " 2-core machine; at 10 rounds the float32 model was still swinging by 5-16 points a round."),
        ),
    ]


_LABELS = {run.algorithm: run for run in _personal_runs(0)}


def user_setting(
    data_dir: str,
    *,
    name: str,
    model: str = "auto",
    model_args: tuple[str, ...] = (),
    personal: tuple[str, ...] = (),
    shared: tuple[str, ...] = ("*",),
    num_classes: int | None = None,
    algorithms: tuple[str, ...] = (),
    rounds: int = 20,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    optimizer: str = DEFAULT_OPTIMIZER,
) -> AccuracySetting:
    """A setting over a user's folder of per-client ``.npz`` files.

    ``algorithms`` empty: every built-in run (local-only, FedAvg with local
    fine-tuning, FedProx, FedSim, FedAlt, FedFomo), less those that need a
    personal head when ``model`` is the user's own and ``personal`` is empty.
    ``name`` must not be a built-in setting's.
    """
    from sdk.simulation.algorithms import ALGORITHMS

    if name in settings("full"):
        raise ValueError(f"setting name {name!r} is a built-in setting's; choose another")
    own_model = ":" in model
    if own_model and not personal:
        usable = tuple(a for a in ALGORITHMS if not ALGORITHMS[a].personal_head)
    else:
        usable = tuple(ALGORITHMS)
    chosen = algorithms or tuple(a for a in _LABELS if a in usable)
    unknown = [a for a in chosen if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from {sorted(ALGORITHMS)}")
    refused = [a for a in chosen if a not in usable]
    if refused:
        raise ValueError(f"{refused} keep a personal head on each device: name the model's personal layers (personal prefixes)")
    runs = tuple(
        AccuracyRun(label=_LABELS[a].label, algorithm=a, mu=_LABELS[a].mu,
                    finetune_epochs=max(1, epochs) if a == "fedavg" else 0) if a in _LABELS else AccuracyRun(label=a, algorithm=a)
        for a in chosen
    )
    shown = model if model != "auto" else "the built-in model for its shape"
    return AccuracySetting(
        name=name, title=f"Your data: {name} ({shown})", dataset="folder", data_dir=str(data_dir), num_classes=num_classes,
        model=model, model_args=tuple(model_args), personal=tuple(personal), shared=tuple(shared), rounds=rounds,
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer, runs=runs,
        notes=(f"Per-client data read from {data_dir} (one .npz per client); {rounds} rounds, {epochs} local epoch(s),"
               f" batch {batch_size}, {optimizer} lr {learning_rate:g}.",),
    )
