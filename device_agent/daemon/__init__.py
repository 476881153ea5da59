"""The device daemon: a long-running agent that plays federated rounds over MQTT.

``fedge-agent run --config agent.toml`` is the entry point; in code::

    from device_agent.daemon.bootstrap import open_agent
    from device_agent.daemon.config import load_config

    with open_agent(load_config("agent.toml")) as agent:
        result = agent.run(max_rounds=3)

Modules: ``config`` and ``toml_table`` (the TOML file, validated in one
place), ``backoff`` (retry delays), ``connection`` (the paho client, its
network thread, reconnects, size-checked publishes), ``intake`` (verifying
models and receipts), ``agent_state`` (the state directory), ``keyring``
(key files), ``agent`` (the round phases and the loop) with its
collaborators ``round_training``, ``update_sealer``, ``update_sender``,
``release_follower`` and ``round_result``, ``bootstrap`` (config -> agent). Nothing here imports torch, onnx or sdk. See
docs/device-agent.md.
"""

from __future__ import annotations
