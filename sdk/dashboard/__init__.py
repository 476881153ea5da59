"""``fedge dashboard``: one page that shows the fleet live (docs/operations.md, "The dashboard").

- :mod:`~sdk.dashboard.config`: what it reads and where it serves (TOML and flags).
- :mod:`~sdk.dashboard.sources`: the monitoring account on MQTT (verified statuses and models) and the
  aggregators' ``/metrics``.
- :mod:`~sdk.dashboard.view` / :mod:`~sdk.dashboard.history` / :mod:`~sdk.dashboard.aggregators`: the pure
  picture of the fleet, its bounded accuracy history and the readings of the aggregators.
- :mod:`~sdk.dashboard.plots`: matplotlib SVG plots.
- :mod:`~sdk.dashboard.security`: who may see it; :mod:`~sdk.dashboard.server`: the aiohttp server (SSE).
"""
