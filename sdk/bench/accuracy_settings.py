"""The accuracy benchmark's settings: built-in ones (real non-IID data) and one made from a user's folder.

A *setting* is a dataset split, a model, a training budget and a list of
*runs* (one algorithm each, possibly with stragglers or a hierarchy).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from sdk.training_defaults import DEFAULT_LEARNING_RATE, DEFAULT_OPTIMIZER

Profile = Literal["full", "quick"]
DEFAULT_SETTINGS = ("watch", "watch-scarce", "watch-recording", "fmnist", "synthetic")
"""What ``fedge bench accuracy`` runs without ``--setting``; ``fmnist-long`` is opt-in (about an hour on 2 cores)."""
TIE_MARGIN = 0.005
"""Accuracy differences up to half a point count as ties in the claims (seed-to-seed spread measured on the
smartwatch setting is 0.03-1 point)."""
PFLLIB_FMNIST_DIR01 = {"FedAvg": 85.85, "FedProx": 85.63, "FedFomo": 97.21, "FedPer": 97.44, "FedRep": 97.56, "Ditto": 97.47}


@dataclass(frozen=True, kw_only=True)
class AccuracyRun:
    """One algorithm run inside a setting.

    ``label`` names the row; ``algorithm`` is a key of
    :data:`sdk.simulation.algorithms.ALGORITHMS`. ``regional_weight`` not
    None runs the two-tier hierarchy over the dataset's regions.
    ``compression`` / ``downlink``: what devices send up and the server
    sends down (:class:`~device_agent.compression.CompressionSpec` text;
    ``none`` is full float32; the downlink is simulated only).
    """

    label: str
    algorithm: str
    mu: float | None = None
    stragglers: float = 0.0
    regional_weight: float | None = None
    finetune_epochs: int = 0
    fomo_candidates: int = 5
    compression: str = "none"
    downlink: str = "none"


@dataclass(frozen=True, kw_only=True)
class AccuracySetting:
    """A dataset split, a model, a budget, and the runs compared on it.

    ``dataset`` ``"folder"`` reads the user's per-client ``.npz`` files from
    ``data_dir`` (:func:`sdk.datasets.load_client_folder`, ``num_classes``
    None: inferred). ``model`` is a built-in kind, ``"auto"`` (the built-in
    model for the data's shape) or ``MODULE:CALLABLE`` built with
    ``model_args`` (``KEY=VALUE``), whose ``personal`` prefixes name the head.
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


def setting_from_dict(raw: dict[str, Any]) -> AccuracySetting:
    """An :class:`AccuracySetting` back from its ``asdict`` form (a results JSON); unknown keys are ignored."""
    known = {f.name for f in fields(AccuracySetting)}
    run_fields = {f.name for f in fields(AccuracyRun)}
    values = {k: v for k, v in raw.items() if k in known}
    values["runs"] = tuple(AccuracyRun(**{k: v for k, v in r.items() if k in run_fields}) for r in raw["runs"])
    for key in ("notes", "model_args", "personal", "shared"):
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
    return {s.name: s for s in out}




COMPRESSED_RUNS = (("q8", "q8"), ("q4", "q4"), ("topk:0.3+q4", "q4"), ("topk:0.1+q8", "none"))
"""(up, down) pairs the compression settings compare with full float32."""


def _compress_settings(quick: bool, watch_common: dict[str, Any]) -> list[AccuracySetting]:
    """``watch-compress`` and ``fmnist-compress``: FedAvg (and FedAlt on the watch) in float32 vs compressed traffic."""
    runs = (AccuracyRun(label="FedAvg", algorithm="fedavg"),
            *(AccuracyRun(label=f"FedAvg, up {up}, down {down}", algorithm="fedavg", compression=up, downlink=down)
              for up, down in COMPRESSED_RUNS))
    note = ("Traffic is the encoded tensor payload per participating device per round, averaged over rounds (the envelope"
            " adds ~0.5 KB per message); up is the device's error-feedback compression (device_agent.compression), down is"
            " the server's, simulated (the MQTT protocol still sends full models).")
    return [
        AccuracySetting(
            name="watch-compress", title="Smartwatch, 20 clients, time split: compressed vs full float32 traffic",
            dataset="watch-time", notes=(note,),
            runs=(*runs, AccuracyRun(label="FedAlt", algorithm="fedalt"),
                  AccuracyRun(label="FedAlt, up topk:0.3+q4, down q4", algorithm="fedalt", compression="topk:0.3+q4",
                              downlink="q4")),
            **watch_common,  # type: ignore[arg-type]
        ),
        AccuracySetting(
            name="fmnist-compress", title="Fashion-MNIST Dir(0.1), 20 clients: compressed vs full float32 traffic",
            dataset="fashion-mnist", model="cnn2d", rounds=3 if quick else 10, epochs=1, batch_size=32, learning_rate=0.001,
            optimizer="adamw", subsample=0.05 if quick else 0.1, runs=runs[:4],
            notes=(note, "Smaller than the fmnist setting (10 rounds on 10% of the images) so that it fits a shared 2-core"
                         " machine; the last compressed pair of watch-compress is left out for the same reason."),
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
