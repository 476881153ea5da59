"""One demo device: a real :class:`DeviceAgent` in a thread, playing rounds and evaluating itself at the end.

The worker drives the agent phase by phase (``wait_for_model`` then
``complete_round``) so the demo can report every round as it ends. After its
last round it waits for the next model, which is the root's final global
model G_R as served by its region, and measures on its own test split:

- *personalised*: the device's model as it stands after its last round (the
  shared layers it trained locally in round R-1 and its own head);
- *global*: the final global shared layers G_R with the device's own head.

Events go to a queue the demo's main thread reads; nothing here prints.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from device_agent.daemon.agent import DeviceAgent, RoundStatus
from device_agent.daemon.bootstrap import open_agent
from device_agent.data import ArrayDataSource
from device_agent.protocol.envelope import OpenedModel
from sdk.demo.fleet import DemoDevice

logger = logging.getLogger(__name__)

_POLL_S = 0.25


@dataclass(frozen=True, kw_only=True)
class DeviceRound:
    """Device ``device`` finished round ``round`` with ``status`` (``reason`` from the aggregator, or why it failed)."""

    device: str
    region: str
    round: int
    status: RoundStatus
    reason: str
    mean_loss: float
    examples: int
    finished_at: float


@dataclass(frozen=True, kw_only=True)
class DeviceEvaluation:
    """Accuracies on the device's test split after the last round; ``model_round`` is the final model's round."""

    device: str
    region: str
    personal_accuracy: float
    global_accuracy: float
    test_examples: int
    model_round: int
    final_global: dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class DeviceFailed:
    """The device's thread ended with an error (it reports nothing more)."""

    device: str
    error: str


DeviceEvent = DeviceRound | DeviceEvaluation | DeviceFailed


class _Stopped(Exception):
    """The demo is shutting down."""


class DeviceWorker:
    """Runs ``device``'s agent for ``rounds`` rounds in a daemon thread, posting :data:`DeviceEvent`s to ``events``.

    ``clock`` (monotonic seconds) stamps :attr:`DeviceRound.finished_at`.
    """

    def __init__(self, device: DemoDevice, *, rounds: int, events: queue.Queue[DeviceEvent],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self._rounds = rounds
        self._events = events
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"fedge-demo-{device.device_id}", daemon=True)

    def start(self) -> None:
        """Start the device's thread."""
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the worker to stop between steps (a step in progress is bounded by the receipt timeouts)."""
        self._stop.set()

    def join(self, timeout_s: float = 10.0) -> None:
        """Wait for the thread to end; logs a warning when it is still running after ``timeout_s``."""
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("device %s did not stop within %g s", self.device.device_id, timeout_s)

    def _main(self) -> None:
        device = self.device
        try:
            with open_agent(device.config) as agent:
                finished = 0
                while finished < self._rounds:
                    result = agent.complete_round(self._next_model(agent))
                    report = result.report
                    self._events.put(DeviceRound(
                        device=device.device_id, region=device.region, round=result.round, status=result.status,
                        reason=result.reason, mean_loss=report.mean_loss if report else float("nan"),
                        examples=report.examples if report else 0, finished_at=self._clock()))
                    finished += result.status is not RoundStatus.NO_RECEIPT
                self._events.put(self._evaluate(agent, self._next_model(agent)))
        except _Stopped:
            return
        except Exception as exc:  # noqa: BLE001 - reported to the main thread as data
            logger.exception("device %s failed", device.device_id)
            self._events.put(DeviceFailed(device=device.device_id, error=f"{type(exc).__name__}: {exc}"))

    def _next_model(self, agent: DeviceAgent) -> OpenedModel:
        """The next model after the last finished round, waiting in short steps so a stop is noticed."""
        while not self._stop.is_set():
            model = agent.wait_for_model(_POLL_S)
            if model is not None:
                return model
        raise _Stopped

    def _evaluate(self, agent: DeviceAgent, final: OpenedModel) -> DeviceEvaluation:
        test = ArrayDataSource(self.device.test.x, self.device.test.y)
        personal = agent.trainer.evaluate(test)
        agent.trainer.set_shared(final.tensors)  # in memory only: the saved state is left as the last round made it
        global_ = agent.trainer.evaluate(test)
        return DeviceEvaluation(
            device=self.device.device_id, region=self.device.region,
            personal_accuracy=float(personal.accuracy or 0.0), global_accuracy=float(global_.accuracy or 0.0),
            test_examples=personal.examples, model_round=final.header.round,
            final_global={name: np.array(value) for name, value in final.tensors.items()},
        )
