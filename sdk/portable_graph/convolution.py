"""A convolution's backward in ops torch.onnx translates, as two well-shaped matrix products.

Weight gradient: the input unfolded into its receptive fields (one strided
Slice per kernel tap, stacked), then one GEMM with the output gradient:
``dW[o, c*k] = sum over batch and positions of g[o, p] * cols[c*k, p]``. The
textbook alternative (a convolution with batch and channel axes swapped)
makes a skinny GEMM and was measured ~2x slower in ORT.

Input gradient of a 1-D, stride-1 convolution: one GEMM ``W^T g`` gives every
tap's contribution, placed back by padding each tap to its offset and summing
(col2im). ORT's ConvTranspose, the textbook alternative, runs one small GEMM
per example and was the slowest node of the 1D-CNN step; for 2-D kernels (25
taps) the padding and adding cost as much, so 2-D and strided convolutions
keep ConvTranspose.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

aten = torch.ops.aten


def _unfold(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
            out_sizes: list[int]) -> torch.Tensor:
    """(C, N, *S) -> (C, prod(kernel), N, *out_sizes): every kernel tap's strided view of the zero-padded input.

    Channels first, so the result reshapes to (C*K, N*P) without transposing the (large) unfolded tensor.
    """
    nd = len(kernel)
    if any(padding):
        pads: list[int] = []
        for p in reversed(padding):
            pads += [p, p]
        x = aten.constant_pad_nd(x, pads, 0.0)
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        view = x
        for axis in range(nd):
            start = offsets[axis] * dilation[axis]
            view = aten.slice(view, 2 + axis, start, start + (out_sizes[axis] - 1) * stride[axis] + 1, stride[axis])
        taps.append(view)
    return torch.stack(taps, dim=1)


def _input_grad_stride1(grad_output: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, padding: list[int],
                        dilation: list[int]) -> torch.Tensor:
    nd = inp.dim() - 2
    c_out, c_in = int(weight.shape[0]), int(weight.shape[1])
    kernel = [int(k) for k in weight.shape[2:]]
    out_sizes = [int(s) for s in grad_output.shape[2:]]
    padded = [int(inp.shape[2 + i]) + 2 * padding[i] for i in range(nd)]
    taps = 1
    for k in kernel:
        taps *= k
    grads = grad_output.transpose(0, 1).reshape(c_out, -1)  # (Cout, N*P)
    cols = torch.mm(weight.reshape(c_out, c_in * taps).t(), grads)  # (C*K, N*P)
    cols = cols.reshape(c_in, taps, -1, *out_sizes)  # (C, K, N, *O): tap slices need no transpose
    placed = []
    for t, offsets in enumerate(itertools.product(*(range(k) for k in kernel))):
        pads: list[int] = []
        for axis in reversed(range(nd)):
            before = offsets[axis] * dilation[axis]
            pads += [before, padded[axis] - before - out_sizes[axis]]
        placed.append(aten.constant_pad_nd(cols[:, t], pads, 0.0))
    total = placed[0]
    for tap in placed[1:]:
        total = total + tap
    for axis in range(nd):
        if padding[axis]:
            total = aten.slice(total, 2 + axis, padding[axis], padding[axis] + int(inp.shape[2 + axis]))
    return total.transpose(0, 1)  # (C, N, *S) -> (N, C, *S)


def convolution_backward(grad_output: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                         stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                         output_padding: list[int], groups: int, output_mask: list[bool]) -> tuple[Any, Any, Any]:
    """Decomposition of ``aten.convolution_backward`` for plain (groups=1, not transposed) 1-D and 2-D convolutions."""
    if transposed or groups != 1:
        raise NotImplementedError("only plain convolutions (groups=1, not transposed) have a portable backward")
    nd = inp.dim() - 2
    kernel = [int(k) for k in weight.shape[2:]]
    out_sizes = [int(s) for s in grad_output.shape[2:]]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        if all(s == 1 for s in stride) and nd == 1:
            grad_input = _input_grad_stride1(grad_output, inp, weight, padding, dilation)
        else:
            # The transposed convolution's natural size can fall short of the input's by up to stride - 1.
            extra = [int(inp.shape[2 + i]) - ((out_sizes[i] - 1) * stride[i] - 2 * padding[i]
                                              + dilation[i] * (kernel[i] - 1) + 1) for i in range(nd)]
            grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, 1)
    if output_mask[1]:
        c_out, c_in = int(weight.shape[0]), int(weight.shape[1])
        taps = 1
        for k in kernel:
            taps *= k
        cols = _unfold(inp.transpose(0, 1), kernel, stride, padding, dilation, out_sizes)  # (C, K, N, *O)
        cols = cols.reshape(c_in * taps, -1)  # (C*K, N*P)
        grads = grad_output.transpose(0, 1).reshape(c_out, -1)  # (Cout, N*P)
        grad_weight = torch.mm(grads, cols.t()).reshape(weight.shape)
    if output_mask[2]:
        grad_bias = grad_output.sum([0, *range(2, 2 + nd)])
    return grad_input, grad_weight, grad_bias
