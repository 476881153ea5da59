"""``fedge demo``: a whole federation on one machine, over real Mosquitto brokers (or embedded amqtt ones).

A fleet key signs a FedAlt bundle (:class:`~sdk.models.PersonalizedCNN1D` on
the smartwatch data); a generated topology puts a root broker and two bridged
regional brokers (left arm, right arm) on loopback; the root and regional
aggregator services and one :class:`~device_agent.daemon.agent.DeviceAgent`
per client run as threads of this process. See ``docs/demo.md``.

| module | holds |
|---|---|
| ``settings`` | :class:`DemoSettings`, :class:`DemoError` |
| ``brokers`` | finding (or installing) Mosquitto, starting and stopping its processes |
| ``embedded`` | without Mosquitto: amqtt brokers on event-loop threads and paho bridges (no ACLs) |
| ``fleet`` | keys, the bundle, the topology, each device's data and agent config |
| ``services`` | the aggregator services in threads |
| ``devices`` | one device agent in a thread, playing rounds and evaluating itself |
| ``run`` | :func:`run_demo`: start everything, follow the rounds, tear down |
| ``report`` | :class:`DemoResult` and the final table |
"""

from __future__ import annotations

from sdk.demo.report import DemoResult, RegionRound, RegionSummary, format_result
from sdk.demo.run import run_demo
from sdk.demo.settings import DemoError, DemoSettings

__all__ = ["DemoError", "DemoResult", "DemoSettings", "RegionRound", "RegionSummary", "format_result", "run_demo"]
