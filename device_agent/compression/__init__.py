"""Device-side compression of the shared-layer delta, with error feedback (pure: numpy in, numpy out).

- :mod:`.spec`: :class:`CompressionSpec` (what a bundle or a round asks for) and its one-line text form.
- :mod:`.quantise`: block-wise low-bit quantisation with power-of-two scales.
- :mod:`.sparsify`: top-k selection.
- :mod:`.feedback`: :func:`compress_delta`, which adds the residual a device did not send to its next delta
  (Seide et al., 2014; Karimireddy et al., ICML 2019) and returns the new residual; :class:`ResidualState`
  is what the device persists (:class:`device_agent.state_store.ResidualFile`).

The wire format of the compressed tensors is in :mod:`device_agent.protocol.tensor_codec`.
"""

from device_agent.compression.feedback import CompressedDelta, ResidualState, compress_delta, decoded_values, residual_for
from device_agent.compression.quantise import QuantisedBlocks, dequantise, quantise
from device_agent.compression.sparsify import top_k_indices
from device_agent.compression.spec import NO_COMPRESSION, CompressedTensor, CompressionSpec

__all__ = [
    "NO_COMPRESSION", "CompressedDelta", "CompressedTensor", "CompressionSpec", "QuantisedBlocks", "ResidualState",
    "compress_delta", "decoded_values", "residual_for", "dequantise", "quantise", "top_k_indices",
]
