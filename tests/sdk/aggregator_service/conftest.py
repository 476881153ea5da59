"""Fixtures of the aggregator service tests: everything a test starts is stopped after it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.sdk.aggregator_service.harness import Observer, ServiceThread


@dataclass
class Started:
    """What a test started: service threads (stopped first) and observers."""

    threads: list[ServiceThread] = field(default_factory=list)
    observers: list[Observer] = field(default_factory=list)

    def thread(self, thread: ServiceThread) -> ServiceThread:
        self.threads.append(thread)
        return thread.start()

    def observer(self, observer: Observer) -> Observer:
        self.observers.append(observer)
        return observer


@pytest.fixture
def started() -> Iterator[Started]:
    made = Started()
    yield made
    for thread in made.threads:
        thread.stop_event.set()
    for thread in made.threads:
        thread.stop()
    for observer in made.observers:
        observer.close()
