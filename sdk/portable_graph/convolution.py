"""Convolutions, forward and backward, as one large GEMM each over an unfolded input.

onnxruntime's Conv is fast only with constant weights (its NCHWc layout
transform reorders the weights once at load); in a training graph the weights
are inputs, so Conv and ConvTranspose fall back to one im2col and one small
GEMM per example (measured ~40-65% of this core's SGEMM peak). Here every
convolution is written as matrix products over the whole batch at once:

- The input, channels last (``N, *S, C``), is unfolded by one ``Gather`` of
  whole channel vectors (``N*P`` rows of ``K*C``: P output positions, K kernel
  taps), or, with fewer than four input channels, by one strided ``Slice`` per
  tap stacked tap-major (``C*K`` rows of ``N*P``), where a Gather of single
  floats is slow.
- Forward: one ``Gemm`` of the unfolded input with the weights (bias fused),
  output channels last; weight gradient: one ``Gemm`` of the unfolded input
  with the output gradient; the backward recomputes the unfold from the same
  input, which onnxruntime's common-subexpression elimination merges with the
  forward's. A large unfold (more than ``UNFOLD_GROUP_BYTES`` per example) is
  instead made in ranges of output positions, one Gather + Transpose + Gemm
  each, and the weight gradient unfolds one kernel row at a time: the step then
  never holds the whole unfold twice (the Gather's output and its transposed
  copy) nor keeps it alive until the backward. Each output and each weight
  gradient is still one GEMM sum in the same order, so the numbers are the
  same bits.
- Input gradient: one batched ``MatMul`` ``W^T g`` per example (``C*K`` x
  ``P``) and ONNX ``Col2Im`` (opset 18) to add every tap back into place.

The layouts meet at NCHW between ops (a ``Transpose`` on each side), which
onnxruntime's transpose optimiser cancels through the elementwise ops between
two convolutions, so a stack of layers stays channels-last.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch

aten = torch.ops.aten

#: Below this many input channels the unfold slices taps instead of gathering channel vectors.
_GATHER_MIN_CHANNELS = 4
#: The forward unfolds a convolution's input in ranges of output positions of at most about this many bytes per
#: example: the unfold is the step's largest tensor (6.25 MiB on the 2D-CNN's second convolution at batch 32) and its
#: Transpose to channel-major order holds a second copy while the first exists, so whole it set the step's peak.
UNFOLD_GROUP_BYTES = 1 << 16


def _prod(values: Any) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


@functools.lru_cache(maxsize=None)
def _gather_index(padded: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                  out_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Flat positions in the padded input of every (output position, tap), output positions outer."""
    strides_flat = [_prod(padded[i + 1:]) for i in range(len(padded))]
    index = []
    for pos in itertools.product(*(range(o) for o in out_sizes)):
        for tap in itertools.product(*(range(k) for k in kernel)):
            index.append(sum((pos[i] * stride[i] + tap[i] * dilation[i]) * strides_flat[i] for i in range(len(padded))))
    return tuple(index)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    nd = x.dim() - 2
    return x.permute(0, *range(2, 2 + nd), 1)


def _channels_first(y: torch.Tensor, out_sizes: list[int], channels: int) -> torch.Tensor:
    """(N*P, O) rows, channels last -> (N, O, *out_sizes)."""
    nd = len(out_sizes)
    # contiguous: a free Identity in ONNX, and what lets a later view (Flatten) trace
    return y.reshape(-1, *out_sizes, channels).permute(0, nd + 1, *range(1, nd + 1)).contiguous()


def _pad_spatial(x: torch.Tensor, padding: list[int], channels_last: bool) -> torch.Tensor:
    if not any(padding):
        return x
    pads: list[int] = [0, 0] if channels_last else []
    for p in reversed(padding):
        pads += [p, p]
    return aten.constant_pad_nd(x, pads, 0.0)


class _Geometry:
    """Sizes of one convolution."""

    def __init__(self, inp: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                 dilation: list[int]) -> None:
        self.nd = inp.dim() - 2
        self.channels = int(weight.shape[1])
        self.out_channels = int(weight.shape[0])
        self.kernel = [int(k) for k in weight.shape[2:]]
        self.spatial = [int(s) for s in inp.shape[2:]]
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.padded = [s + 2 * p for s, p in zip(self.spatial, self.padding)]
        self.out_sizes = [(self.padded[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
                          for i in range(self.nd)]
        self.taps = _prod(self.kernel)
        self.positions = _prod(self.out_sizes)
        self.gather = self.channels >= _GATHER_MIN_CHANNELS


def _unfold_rows(inp: torch.Tensor, geo: _Geometry, positions: tuple[int, int]) -> torch.Tensor:
    """(N*P', C*K): the receptive field of each output position in ``positions`` (a range), channel-major like the weights.

    One Gather of whole channel vectors gives (tap, channel) order; a Transpose makes it (channel, tap) so that
    the GEMM sums each output in the same order as onnxruntime's Conv (im2col + GEMM), which makes the
    forward bit-identical to ORT-training's.
    """
    x = _pad_spatial(_channels_last(inp), geo.padding, channels_last=True).reshape(-1, _prod(geo.padded), geo.channels)
    index = _gather_index(tuple(geo.padded), tuple(geo.kernel), tuple(geo.stride), tuple(geo.dilation), tuple(geo.out_sizes))
    start, stop = positions
    index = index[start * geo.taps:stop * geo.taps]
    rows = aten.index_select(x, 1, torch.tensor(index, dtype=torch.int64)).reshape(-1, geo.taps, geo.channels)
    return rows.transpose(1, 2).reshape(-1, geo.channels * geo.taps)


def unfold_bytes_per_example(geo: _Geometry) -> int:
    """The float32 bytes of one example's whole unfold (every output position's receptive field)."""
    return geo.positions * geo.channels * geo.taps * 4


def _position_groups(geo: _Geometry) -> list[tuple[int, int]]:
    """The output positions in ranges whose unfold holds at most about UNFOLD_GROUP_BYTES per example (one range if small)."""
    count = min(geo.positions, max(1, -(-unfold_bytes_per_example(geo) // UNFOLD_GROUP_BYTES)))
    size = -(-geo.positions // count)
    return [(start, min(start + size, geo.positions)) for start in range(0, geo.positions, size)]


def _unfold_taps(inp: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """(C*K, N*P): one strided view of the input per kernel tap, channel-major like the weights (few channels)."""
    x = _pad_spatial(inp.transpose(0, 1), geo.padding, channels_last=False)  # (C, N, *S)
    taps = []
    for offsets in itertools.product(*(range(k) for k in geo.kernel)):
        view = x
        for axis in range(geo.nd):
            start = offsets[axis] * geo.dilation[axis]
            view = aten.slice(view, 2 + axis, start, start + (geo.out_sizes[axis] - 1) * geo.stride[axis] + 1, geo.stride[axis])
        taps.append(view)
    # unsqueeze + cat, not stack: the first trace pass decomposes stack into exactly this, so the forward's
    # unfold (second pass) is the same graph as the backward's and the two merge.
    return torch.cat([t.unsqueeze(1) for t in taps], dim=1).reshape(geo.channels * geo.taps, -1)


def convolution(inp: torch.Tensor, weight: torch.Tensor, bias: Any, stride: list[int], padding: list[int],
                dilation: list[int], transposed: bool, output_padding: list[int], groups: int) -> torch.Tensor:
    """Decomposition of ``aten.convolution`` for plain 1-D and 2-D convolutions; others are left to ONNX Conv."""
    if transposed or groups != 1 or inp.dim() not in (3, 4):
        return NotImplemented  # type: ignore[no-any-return]
    geo = _Geometry(inp, weight, stride, padding, dilation)
    weights = weight.reshape(geo.out_channels, -1).t()
    if not geo.gather:
        rows = _unfold_taps(inp, geo).t()  # (N*P, C*K)
        out = torch.mm(rows, weights) if bias is None else torch.addmm(bias, rows, weights)
        return _channels_first(out, geo.out_sizes, geo.out_channels)
    groups = _position_groups(geo)
    parts = []
    for start, stop in groups:  # one GEMM per range of output positions, each output summed as in one GEMM
        rows = _unfold_rows(inp, geo, (start, stop))  # (N*P', C*K)
        parts.append(torch.mm(rows, weights) if bias is None else torch.addmm(bias, rows, weights))
    if len(groups) > 1:  # (N*P', O) per range -> (N*P, O), positions in order within each example
        out = torch.cat([part.reshape(-1, stop - start, geo.out_channels) for part, (start, stop) in zip(parts, groups)], dim=1)
        parts = [out.reshape(-1, geo.out_channels)]
    return _channels_first(parts[0], geo.out_sizes, geo.out_channels)


def _input_grad(grad_output: torch.Tensor, weight: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Every example's ``W^T g`` (C*K x P), then Col2Im adds each tap back into place (2-D; 1-D as height 1).

    Col2Im runs on the padded image and the padding is sliced off after: onnxruntime's Col2Im with ``pads``
    was measured 2.5x slower than without.
    """
    grads = grad_output.reshape(-1, geo.out_channels, geo.positions)
    # bmm of the broadcast matrix, not matmul (which traces to reshapes around it): graph_passes folds the Expand away.
    matrix = weight.reshape(geo.out_channels, -1).t().unsqueeze(0).expand(grads.shape[0], -1, -1)
    cols = torch.bmm(matrix, grads)  # (N, C*K, P)
    padded = geo.padded if geo.nd == 2 else [1, geo.padded[0]]
    kernel, dilation, stride = ([geo.kernel, geo.dilation, geo.stride] if geo.nd == 2 else
                                [[1, geo.kernel[0]], [1, geo.dilation[0]], [1, geo.stride[0]]])
    image = aten.col2im(cols, padded, kernel, dilation, [0, 0], stride)  # (N, C, H', W')
    if geo.nd == 1:
        image = image.reshape(-1, geo.channels, geo.padded[0])
    for axis, pad in enumerate(geo.padding):
        if pad:
            image = aten.slice(image, 2 + axis, pad, pad + geo.spatial[axis])
    return image


def _weight_grad_by_rows(inp: torch.Tensor, grads: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """The weight gradient one kernel row at a time: ``rows_i^T g`` (kw*C x O) for each offset i of the outer axes.

    ``rows_i`` unfolds only the last spatial axis of the input's strided view at offset i (a Gather of channel
    vectors, 1/kh of the whole unfold); every weight's gradient is still one sum over the same N*P positions. So the
    forward's unfold (N*P x C*K, 6.25 MiB on the 2D-CNN's second convolution at batch 32) dies right after the
    forward GEMM instead of living until the backward reaches this layer, and the backward holds one row's unfold
    at a time.
    """
    x = _pad_spatial(_channels_last(inp), geo.padding, channels_last=True)  # (N, *S, C)
    last = geo.nd - 1
    index = _gather_index((geo.padded[last],), (geo.kernel[last],), (geo.stride[last],), (geo.dilation[last],),
                          (geo.out_sizes[last],))
    index_t = torch.tensor(index, dtype=torch.int64)
    parts = []
    for offsets in itertools.product(*(range(k) for k in geo.kernel[:last])):
        view = x
        for axis, offset in enumerate(offsets):
            start = offset * geo.dilation[axis]
            view = aten.slice(view, 1 + axis, start, start + (geo.out_sizes[axis] - 1) * geo.stride[axis] + 1, geo.stride[axis])
        rows = aten.index_select(view, 1 + last, index_t).reshape(-1, geo.kernel[last] * geo.channels)  # (N*P, kw*C)
        parts.append(torch.mm(rows.t(), grads))  # (kw*C, O)
    # (*k_outer, kw, C, O) -> (O, C, *k)
    grad = torch.stack(parts, dim=0).reshape(*geo.kernel, geo.channels, geo.out_channels)
    return grad.permute(geo.nd + 1, geo.nd, *range(geo.nd)).contiguous()


def convolution_backward(grad_output: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                         stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                         output_padding: list[int], groups: int, output_mask: list[bool]) -> tuple[Any, Any, Any]:
    """Decomposition of ``aten.convolution_backward`` for plain (groups=1, not transposed) 1-D and 2-D convolutions."""
    if transposed or groups != 1 or inp.dim() not in (3, 4):
        raise NotImplementedError("only plain 1-D and 2-D convolutions (groups=1, not transposed) have a portable backward")
    geo = _Geometry(inp, weight, stride, padding, dilation)
    grad_input = grad_weight = grad_bias = None
    grads = _channels_last(grad_output).reshape(-1, geo.out_channels)  # (N*P, O)
    if output_mask[0]:
        grad_input = _input_grad(grad_output, weight, geo)
    if output_mask[1]:
        if geo.gather and len(_position_groups(geo)) > 1:  # a large unfold: not kept from the forward
            grad_weight = _weight_grad_by_rows(inp, grads, geo)
        else:  # a small one: the forward's, which onnxruntime's common-subexpression elimination shares
            cols = _unfold_rows(inp, geo, (0, geo.positions)).t() if geo.gather else _unfold_taps(inp, geo)  # (C*K, N*P)
            grad_weight = torch.mm(cols, grads).t().reshape(weight.shape)  # (C*K, O) -> (O, C, *k)
    if output_mask[2]:
        grad_bias = grads.sum(0)
    return grad_input, grad_weight, grad_bias
