"""Phase 3 of a round: compress the delta, seal it to the aggregator, persist it as pending.

:class:`UpdateSealer` holds what sealing needs across rounds: the bundle's
uplink compression, the override a model named for its round, and the
error-feedback residual file (the part of a delta not sent, added to the next),
and the frame version the aggregator's models announce it reads.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from device_agent.compression import CompressedTensor, CompressionSpec, compress_delta, residual_for
from device_agent.compression.feedback import ResidualState
from device_agent.daemon.agent_state import AgentStateFiles, SealedUpdate
from device_agent.daemon.config import AgentConfig
from device_agent.daemon.keyring import DeviceKeys
from device_agent.local_round import LocalUpdate
from device_agent.protocol import envelope
from device_agent.protocol.frame_versions import FRAME_V1, choose_frame_version
from device_agent.protocol.headers import UpdateHeader
from device_agent.state_store import ResidualFile


class UpdateSealer:
    """Seals a device's local updates; ``compression`` is what the bundle asks devices to send up.

    ``none``: the float32 delta in ``config.encoding``. ``wall_clock`` stamps
    headers and ``random_bytes`` makes their nonces.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        keys: DeviceKeys,
        state: AgentStateFiles,
        compression: CompressionSpec,
        wall_clock: Callable[[], float],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self._config = config
        self._keys = keys
        self._state = state
        self.compression = compression
        self._wall_clock = wall_clock
        self._random_bytes = random_bytes
        #: The round and spec a model's ``compression`` field asked for (None: the bundle decides).
        self._round_compression: tuple[int, CompressionSpec] | None = None
        self._residual = ResidualFile(state.directory / "residual.bin")
        #: The frame version updates are sealed in: the highest the last model's ``frames`` named and this
        #: code reads (1 until a model names more; docs/protocol.md, "Frames").
        self.frame_version = FRAME_V1

    def follow_model(self, round: int, compression: str | None) -> None:
        """Note the compression the round's model asked for (None: the bundle's field)."""
        self._round_compression = None if compression is None else (round, CompressionSpec.parse(compression))

    def follow_frames(self, frames: tuple[int, ...] | None) -> None:
        """Seal in the highest frame version the model's publisher reads (``frames`` None: version 1 only).

        Called for every round played, a re-seal after a restart included."""
        self.frame_version = choose_frame_version(frames)

    def compression_for(self, round: int) -> CompressionSpec:
        """The uplink compression of ``round``: the override its model named, else the bundle's field."""
        override = self._round_compression
        return override[1] if override is not None and override[0] == round else self.compression

    def seal(self, update: LocalUpdate, *, bundle_version: int) -> SealedUpdate:
        """Compress, encrypt to the aggregator, sign, and persist ``update`` as the pending update.

        The new residual is saved before the update, together with the one the
        round started from, so a crash anywhere re-seals from the same residual.
        """
        tensors, encoding = self._compress(update, bundle_version)
        header = UpdateHeader.create(
            clock=self._wall_clock,
            random_bytes=self._random_bytes,
            fleet=self._config.fleet,
            region=self._config.region,
            sender=self._config.device_id,
            round=update.round_number,
            bundle_version=bundle_version,
            sample_count=update.num_examples,
            encoding=encoding,
        )
        blob = envelope.seal_update(
            header, tensors, recipient_public_key=self._keys.aggregator_key, sender_key=self._keys.signing_key,
            frame_version=self.frame_version
        )
        sealed = SealedUpdate(header=header, blob=blob)
        self._state.save_pending(sealed)
        return sealed

    def _compress(self, update: LocalUpdate, bundle_version: int) -> tuple[dict[str, np.ndarray | CompressedTensor], str]:
        """What to seal and its encoding: the float32 delta, or the round's compression with error feedback."""
        spec = self.compression_for(update.round_number)
        if not spec.enabled and not self.compression.enabled:
            return update.delta, self._config.encoding.value
        before = residual_for(self._residual.load(), bundle_version=bundle_version, round=update.round_number)
        out = compress_delta(update.delta, before, spec)
        self._residual.save(ResidualState(bundle_version=bundle_version, round=update.round_number,
                                          before=before or {}, after=out.residual))
        return out.tensors, spec.encoding
