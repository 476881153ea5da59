"""Switching the device to another bundle version between rounds: install, carry, try, keep or go back.

Installing release R (:meth:`VersionSwitch.install`), in this order so a
crash at any point leaves a state the next start can finish:

1. measure the running version's validation accuracy (the *baseline*) and
   record a pending trial in the release state;
2. move the trainer's state directory aside (``trainer.previous``): the old
   version's personal head and optimizer stay intact for a way back;
3. install the bundle (verified again, atomic, anti-rollback rule);
4. start a trainer on it, carry the personal parameters over where names and
   shapes match, and start the shared layers from the last global model
   (``carry``) or the bundle's own weights (``bundle``); save;
5. the **trial**: train on the local data, evaluate on the validation data,
   judge (:func:`~device_agent.release.policy.judge_trial`): healthy keeps
   it; diverged (non-finite loss, accuracy far below the baseline) marks the
   release failed and goes back (:meth:`VersionSwitch.revert`).

Going back (a failed trial, or signed metadata that halted or rolled back the
release) repoints the bundle to the kept version under the install policy's
one exception (:func:`~device_agent.bundle.archive.revert_bundle`) and puts the
old trainer state back. What was kept and reset is logged and reported.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_agent.bundle.archive import TrainingBundle, install_bundle, revert_bundle
from device_agent.bundle.install_policy import read_record
from device_agent.daemon.config import AgentConfig
from device_agent.data import DataSource
from device_agent.errors import BundleError, TrainingError
from device_agent.keys import TrustedKeys
from device_agent.local_round import train_local_round
from device_agent.release.carry import carry_parameters
from device_agent.release.policy import Action, Decision, LocalRelease, judge_trial
from device_agent.release.release_info import SharedStart
from device_agent.release.release_state import PendingTrial, ReleaseReport
from device_agent.trainer import DeviceTrainer, TrainBudget

if TYPE_CHECKING:  # python-tuf loads with the release client, only when [release] is configured
    from device_agent.release.client import InstallReady, ReleaseClient, RevertNeeded

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Switched:
    """The outcome of a switch: the ``trainer`` to play rounds with from now on (on ``bundle``), and the
    trial's numbers for the status (``loss``/``accuracy`` None when no trial ran)."""

    trainer: DeviceTrainer
    bundle: TrainingBundle
    loss: float | None = None
    accuracy: float | None = None


class VersionSwitch:
    """Performs installs, trials and reverts for one agent (module docstring).

    ``load_data`` / ``load_validation``: the local data (the validation data
    falls back to the training data when the device has none, which the status
    says). ``trainer_dir``: the trainer's state directory.
    """

    def __init__(self, config: AgentConfig, *, client: ReleaseClient, fleet_keys: TrustedKeys, trainer_dir: Path,
                 load_data: Callable[[], DataSource], load_validation: Callable[[], DataSource] | None,
                 trial_budget: TrainBudget, rng: np.random.Generator | None = None) -> None:
        self._config = config
        self._client = client
        self._keys = fleet_keys
        self._trainer_dir = trainer_dir
        self._previous_dir = trainer_dir.with_name(trainer_dir.name + ".previous")
        self._load_data = load_data
        self._load_validation = load_validation
        self._budget = trial_budget
        self._rng = rng
        self._recovered = False
        self._stuck: set[int] = set()

    def step(self, trainer: DeviceTrainer) -> Switched | None:
        """Between rounds: finish a switch a crash interrupted, then install a verified release or go back from a
        withdrawn or failed one. None when nothing changed (also when there is no way back: said once)."""
        if not self._recovered:
            self._recovered = True
            recovered = self.recover(trainer)
            if recovered is not None:
                return recovered
        from device_agent.release.client import InstallReady, RevertNeeded  # python-tuf loads with the release client

        record = read_record(self._config.install_dir)
        local = LocalRelease(bundle_version=trainer.manifest.bundle_version, running_release=self._client.memory.running_release,
                             highest=record)
        step = self._client.step(local)
        if isinstance(step, InstallReady):
            return self.install(step, trainer)
        if isinstance(step, RevertNeeded) and local.running_release not in self._stuck:
            try:
                return self.revert(step, bundle=trainer.bundle)
            except BundleError as exc:  # nothing kept to go back to, or the rule says no: stay, say so once
                self._stuck.add(local.running_release or 0)
                logger.error("release %s should be left (%s) but this device cannot go back: %s",
                             local.running_release, step.decision.reason, exc)
                self._client.set_report(ReleaseReport(state="refused", release=local.running_release, progress=0,
                                                      reason=f"cannot go back: {exc}"))
        return None

    def accuracy(self, trainer: DeviceTrainer) -> float | None:
        """Validation accuracy of ``trainer`` (None: no labels to score or the data cannot be read)."""
        try:
            data = (self._load_validation or self._load_data)()
            return trainer.evaluate(data).accuracy
        except (OSError, ValueError, TrainingError) as exc:
            logger.warning("cannot measure validation accuracy: %s", exc)
            return None

    # -- install and trial ------------------------------------------------------------------

    def install(self, ready: InstallReady, trainer: DeviceTrainer) -> Switched | None:
        """Install ``ready`` and run its trial; the trainer to continue with, or None when the install was refused."""
        info = ready.info
        client = self._client
        baseline = self.accuracy(trainer)
        old_personal, old_global = trainer.get_personal(), trainer.global_reference
        memory = client.memory
        trial = PendingTrial(release=info.release, baseline_accuracy=baseline, previous_version=trainer.manifest.bundle_version,
                             max_accuracy_drop_pct=info.max_accuracy_drop_pct)
        client.save(replace(memory, trial=trial, previous_release=memory.running_release))
        client.set_report(ReleaseReport(state="installing", release=info.release, progress=100, baseline_accuracy=baseline))
        self._set_aside()
        try:
            bundle = install_bundle(ready.archive, self._keys, self._config.install_dir)
        except BundleError as exc:  # downgrade, failed before, conflicting rebuild, bad archive
            self._restore_previous()
            client.save(replace(client.memory, trial=None, previous_release=memory.previous_release))
            client.refuse(info.release, f"install: {exc}")
            return None
        client.installed(info)
        client.save(replace(client.memory, running_release=info.release))
        try:
            new = DeviceTrainer(bundle, state_dir=self._trainer_dir, threads=self._config.threads,
                                backend=self._config.backend)
            personal = carry_parameters(old_personal, new.get_personal())
            new.set_personal(personal.params)
            if info.shared_start is SharedStart.CARRY:
                shared = carry_parameters(old_global, new.get_shared())
                new.set_global(shared.params)
                shared_note = f"shared layers {shared.summary()}"
            else:
                shared_note = "shared layers from the bundle"
            new.save_state()
        except Exception as exc:  # noqa: BLE001 - a version that does not even load is a failed trial, not a crash loop
            logger.error("release %d: the new version does not load here (%s): going back", info.release, exc)
            client.save(client.memory.with_failed(info.release))
            from device_agent.release.client import RevertNeeded  # python-tuf loads with the release client

            return self.revert(RevertNeeded(decision=Decision(action=Action.REVERT, reason="failed",
                                                              detail=f"the new version does not load: {exc}")),
                               bundle=bundle)
        logger.warning("installed release %d: bundle %s v%d (was v%d); personal parameters %s; %s", info.release,
                       bundle.manifest.model_name, bundle.manifest.bundle_version, trainer.manifest.bundle_version,
                       personal.summary(), shared_note)
        return self.trial(trial, new, bundle, note=f"personal {personal.summary()}")

    def trial(self, pending: PendingTrial, trainer: DeviceTrainer, bundle: TrainingBundle, *, note: str = "") -> Switched:
        """Train and evaluate the new version, judge it against ``pending``'s baseline, and keep it or go back."""
        client = self._client
        release, baseline = pending.release, pending.baseline_accuracy
        loss: float | None = None
        steps = 0
        try:
            update = train_local_round(trainer, self._load_data(), global_params=None, round_number=-1,
                                       budget=self._budget, rng=self._rng)
            loss, steps = update.report.mean_loss, update.report.steps
        except Exception as exc:  # noqa: BLE001 - any failure of the new version is a failed trial (unreadable data too)
            logger.error("release %d: the trial training failed: %s", release, exc)
            loss = math.nan
            steps = max(steps, 1) if "non-finite" in str(exc) else 0
        accuracy = self.accuracy(trainer) if steps and loss is not None and math.isfinite(loss) else None
        health = judge_trial(steps, loss, accuracy, baseline, max_accuracy_drop_pct=pending.max_accuracy_drop_pct)
        if not health.healthy:
            logger.error("release %d diverged on this device (%s): going back", release, health.reason)
            client.save(client.memory.with_failed(release))
            decision = Decision(action=Action.REVERT, reason="diverged", detail=health.reason)
            from device_agent.release.client import RevertNeeded  # python-tuf loads with the release client

            back = self.revert(RevertNeeded(decision=decision), bundle=bundle)
            return replace(back, loss=loss, accuracy=accuracy)
        trainer.save_state()
        client.save(replace(client.memory, trial=None))
        client.set_report(ReleaseReport(state="installed", release=release, progress=100,
                                        reason=f"healthy: loss {loss:.4f}, accuracy {_fmt(accuracy)} vs {_fmt(baseline)}"
                                        + (f"; {note}" if note else "")[:120], baseline_accuracy=baseline))
        logger.warning("release %d is healthy here: loss %.4f, validation accuracy %s (previous version %s)",
                       release, loss, _fmt(accuracy), _fmt(baseline))
        return Switched(trainer=trainer, bundle=bundle, loss=loss, accuracy=accuracy)

    # -- going back -------------------------------------------------------------------------

    def revert(self, needed: RevertNeeded, *, bundle: TrainingBundle) -> Switched:
        """Go back to the kept version (BundleError when none is kept or the rule refuses); the old trainer."""
        decision = needed.decision
        client = self._client
        marked = decision.reason in ("failed", "diverged")
        previous = revert_bundle(self._config.install_dir, self._keys, marked_failed=marked, withdrawn=not marked)
        shutil.rmtree(self._trainer_dir, ignore_errors=True)
        self._restore_previous()
        trainer = DeviceTrainer(previous, state_dir=self._trainer_dir, threads=self._config.threads,
                                backend=self._config.backend)
        memory = client.memory
        failed_release = memory.running_release
        if failed_release is not None:
            memory = memory.with_failed(failed_release)
        client.save(replace(memory, running_release=memory.previous_release, previous_release=None, trial=None))
        client.set_report(ReleaseReport(state="rolled_back", release=failed_release, progress=0,
                                        reason=f"{decision.reason}: {decision.detail}",
                                        baseline_accuracy=memory.report.baseline_accuracy))
        logger.warning("back on bundle %s v%d (from v%d): %s", previous.manifest.model_name,
                       previous.manifest.bundle_version, bundle.manifest.bundle_version, decision.detail)
        return Switched(trainer=trainer, bundle=previous)

    def recover(self, trainer: DeviceTrainer) -> Switched | None:
        """At start-up: finish a switch a crash interrupted (a pending trial); None when there was none."""
        trial = self._client.memory.trial
        if trial is None:
            return None
        if trainer.manifest.bundle_version == trial.previous_version:
            # Died before the new bundle was installed: keep the old version (the release is decided again).
            logger.warning("a switch to release %d was interrupted before it finished; staying on v%d", trial.release,
                           trainer.manifest.bundle_version)
            if not self._trainer_dir.exists():
                self._restore_previous()
                trainer = DeviceTrainer(trainer.bundle, state_dir=self._trainer_dir, threads=self._config.threads,
                                        backend=self._config.backend)
            self._client.save(replace(self._client.memory, trial=None))
            return Switched(trainer=trainer, bundle=trainer.bundle)
        logger.warning("release %d was installed but not judged before a restart: running its trial now", trial.release)
        return self.trial(trial, trainer, trainer.bundle)

    def _set_aside(self) -> None:
        shutil.rmtree(self._previous_dir, ignore_errors=True)
        if self._trainer_dir.exists():
            self._trainer_dir.rename(self._previous_dir)

    def _restore_previous(self) -> None:
        if self._previous_dir.exists():
            shutil.rmtree(self._trainer_dir, ignore_errors=True)
            self._previous_dir.rename(self._trainer_dir)
        elif not self._trainer_dir.exists():
            logger.warning("the previous version's trainer state is gone: its personal parameters start from the bundle")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
