"""What the simulated devices and server send, through the deployment's own compression and wire format.

Uplink: each device compresses its delta with error feedback exactly as the
agent does (:func:`device_agent.compression.compress_delta`, its residual kept
per device), the tensor codec encodes it, and the server folds what the
payload *decodes to*, so the simulator's accuracy is the deployment's.

Downlink (simulated only; the MQTT protocol still sends full models, see
docs/protocol.md): the server keeps its true model ``G`` and the model the
devices hold, ``H``; after each round it sends ``C(G - H)`` and every device
adds the decoded values, so ``G - H`` is the server's error-feedback residual
(error feedback on both directions, as in Tang et al., "DoubleSqueeze",
ICML 2019). Devices train from ``H``; the first message is a delta against
the bundle's initial weights (the device has them). Bytes are the encoded tensor payload
(the envelope adds a fixed ~0.5 KB per message on top).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device_agent.compression import NO_COMPRESSION, CompressionSpec, compress_delta
from device_agent.protocol.tensor_codec import decode_tensors, encode_tensors

ParameterDict = dict[str, np.ndarray]


class Uplink:
    """Per-device error-feedback compression; :meth:`send` returns what the aggregator decodes and the payload size."""

    def __init__(self, spec: CompressionSpec = NO_COMPRESSION) -> None:
        self.spec = spec
        self._residual: dict[str, dict[str, np.ndarray]] = {}

    def send(self, device: str, delta: Mapping[str, np.ndarray]) -> tuple[ParameterDict, int]:
        """``(decoded delta, payload bytes)`` of ``device``'s update; its residual is kept for the next one."""
        out = compress_delta(delta, self._residual.get(device), self.spec)
        if out.residual:
            self._residual[device] = out.residual
        blob = encode_tensors(out.tensors, encoding=self.spec.encoding)
        return decode_tensors(blob, encoding=self.spec.encoding), len(blob)


class Downlink:
    """The model the devices hold and what each round's model message costs (full first, then compressed deltas)."""

    def __init__(self, initial: Mapping[str, np.ndarray], spec: CompressionSpec = NO_COMPRESSION) -> None:
        self.spec = spec
        self.held: ParameterDict = {n: np.array(v, dtype=np.float32) for n, v in initial.items()}
        #: bytes of the whole model in float32 (what a FedFomo upload or an uncompressed model message costs)
        self.full_bytes = len(encode_tensors(self.held))
        #: bytes of the last model message per device. Uncompressed, every message is the whole model; compressed,
        #: the first is a delta against the bundle's initial weights, which every device installed with the bundle.
        self.last_bytes = self.full_bytes
        if spec.enabled:
            self.publish(self.held)

    def publish(self, target: Mapping[str, np.ndarray]) -> ParameterDict:
        """Move the held model towards ``target`` (the server's true model); returns the new held model."""
        if not self.spec.enabled:
            self.held = {n: np.array(v, dtype=np.float32) for n, v in target.items()}
            self.last_bytes = self.full_bytes
            return self.held
        gap = {n: np.asarray(target[n], np.float64) - self.held[n] for n in self.held}
        out = compress_delta({n: np.zeros(v.shape, np.float32) for n, v in gap.items()}, gap, self.spec)
        blob = encode_tensors(out.tensors, encoding=self.spec.encoding)
        decoded = decode_tensors(blob, encoding=self.spec.encoding)
        self.held = {n: (v + decoded[n]).astype(np.float32) for n, v in self.held.items()}
        self.last_bytes = len(blob)
        return self.held
