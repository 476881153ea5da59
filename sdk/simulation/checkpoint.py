"""A long simulation's progress on disk: a record per round, and the whole fleet every few rounds, so it can resume.

Layout of a checkpoint directory:

- ``rounds.jsonl``: one :class:`~sdk.simulation.results.RoundMetrics` per line,
  appended after every round (a partial curve is readable while the run goes on);
- ``bundle.fedge`` and ``bundle.pub``: the signed bundle the run trains and its
  public key (a resumed run installs the very same bundle: saved device states
  are tied to its manifest);
- ``devices/<client>/``: each simulated device's state directory, written
  by :meth:`DeviceTrainer.save_state` (the devices' own crash-safe format);
- ``server.npz``: the global model and each region's model;
- ``progress.json``: ``{"round": r}``, written last and atomically: the commit.

A resumed run continues after round ``r`` with the same numbers an
uninterrupted run gets (every random draw depends on the seed and the round
only). A crash between the device saves and the commit leaves devices one
checkpoint ahead of the commit; :meth:`SimulationCheckpoint.committed_round`
notices and the run starts over rather than mixing rounds.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from device_agent.state_store import StateStore, atomic_write_bytes
from device_agent.trainer import DeviceTrainer
from sdk.simulation.results import RoundMetrics

logger = logging.getLogger(__name__)

ParameterDict = dict[str, np.ndarray]


class SimulationCheckpoint:
    """The checkpoint directory of one run; the fleet is saved after every ``every``-th round (records after each)."""

    def __init__(self, directory: str | Path, *, every: int = 1) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.directory = Path(directory)
        self.every = every
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def bundle_path(self) -> Path:
        """Where the run's signed bundle is kept."""
        return self.directory / "bundle.fedge"

    @property
    def public_key_path(self) -> Path:
        """The raw Ed25519 public key the bundle verifies with."""
        return self.directory / "bundle.pub"

    def device_dir(self, client_id: str) -> Path:
        """The state directory of simulated device ``client_id``."""
        return self.directory / "devices" / client_id

    def committed_round(self, client_ids: Sequence[str]) -> int | None:
        """The last round whose whole fleet was saved, or None (nothing saved, or an unfinished save: everything is wiped)."""
        try:
            committed = int(json.loads((self.directory / "progress.json").read_text())["round"])
        except FileNotFoundError:
            self._clear_fleet()
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable progress.json (%s); starting over", self.directory, exc)
            self._clear_fleet()
            return None
        behind = []
        for cid in client_ids:
            stored = StateStore(self.device_dir(cid)).load()
            if stored is None or int(stored.meta.get("round", -2)) != committed:
                behind.append(cid)
        if behind:
            logger.warning("%s: devices %s were not saved at round %d; starting over", self.directory, behind[:3], committed)
            self._clear_fleet()
            return None
        return committed

    def _clear_fleet(self) -> None:
        shutil.rmtree(self.directory / "devices", ignore_errors=True)
        for name in ("progress.json", "server.npz", "rounds.jsonl"):
            (self.directory / name).unlink(missing_ok=True)

    def append_record(self, record: RoundMetrics) -> None:
        """Add one round's metrics to ``rounds.jsonl``."""
        with open(self.directory / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps(record.to_json()) + "\n")

    def records(self, through_round: int) -> list[RoundMetrics]:
        """The saved records of rounds 0..``through_round`` (ValueError when some are missing)."""
        path = self.directory / "rounds.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [RoundMetrics.from_json(json.loads(line)) for line in lines if line.strip()][: through_round + 1]
        if [r.round_number for r in kept] != list(range(through_round + 1)):
            raise ValueError(f"{path}: records of rounds 0..{through_round} are not all there")
        path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in kept))  # drop rounds after the commit
        return kept

    def due(self, round_number: int, last_round: int) -> bool:
        """Whether the fleet is saved after ``round_number`` (every ``every``-th round, and the last one)."""
        return (round_number + 1) % self.every == 0 or round_number == last_round

    def save(self, round_number: int, trainers: Mapping[str, DeviceTrainer], global_params: ParameterDict,
             regional: Mapping[str, ParameterDict | None]) -> None:
        """Save every device, then the server's models, then commit ``round_number``."""
        for trainer in trainers.values():
            trainer.round = round_number  # devices that sat the round out are saved as of this round too
            trainer.save_state()
        arrays = {f"global/{n}": v for n, v in global_params.items()}
        for region, params in regional.items():
            arrays.update({f"regional/{region}/{n}": v for n, v in (params or {}).items()})
        tmp = self.directory / "server.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        tmp.replace(self.directory / "server.npz")
        atomic_write_bytes(self.directory / "progress.json", json.dumps({"round": round_number}).encode())

    def load_server(self, regions: Sequence[str]) -> tuple[ParameterDict, dict[str, ParameterDict | None]]:
        """The global model and each region's model (None where the region had none yet) as saved."""
        with np.load(self.directory / "server.npz", allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
        global_params = {k[len("global/"):]: v for k, v in arrays.items() if k.startswith("global/")}
        regional: dict[str, ParameterDict | None] = {}
        for region in regions:
            prefix = f"regional/{region}/"
            params = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            regional[region] = params or None
        return global_params, regional
