"""ATen decompositions that keep a traced training step inside standard ONNX ops.

torch.onnx has no translation for ``convolution_backward`` or the max-pool
backward, so they are rewritten into ops it does translate: the input gradient
of a convolution is a transposed convolution, the weight gradient a
convolution with batch and channel axes swapped, the max-pool gradient a
scatter-add at the forward pass's argmax indices. ReLU's backward is a
multiplication by a 0/1 mask instead of a Where (measured faster in ORT).
Everything else uses torch's core ATen decompositions, without which the
cross-entropy gradient comes out batch-size times too large (torch.onnx's
``nll_loss_forward`` reports a total weight of 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._decomp import core_aten_decompositions

aten = torch.ops.aten


def _convolution_backward(grad_output: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                          stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                          output_padding: list[int], groups: int, output_mask: list[bool]) -> tuple[Any, Any, Any]:
    if transposed or groups != 1:
        raise NotImplementedError("only plain convolutions (groups=1, not transposed) have a portable backward")
    nd = inp.dim() - 2
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        # The transposed convolution's natural size can fall short of the input's by up to stride - 1.
        extra = [int(inp.shape[2 + i]) - ((int(grad_output.shape[2 + i]) - 1) * stride[i] - 2 * padding[i]
                                          + dilation[i] * (int(weight.shape[2 + i]) - 1) + 1) for i in range(nd)]
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, 1)
    if output_mask[1]:
        swapped = aten.convolution(inp.transpose(0, 1), grad_output.transpose(0, 1), None,
                                   dilation, padding, stride, False, [0] * nd, 1)
        grad_weight = swapped.transpose(0, 1)
        for i in range(nd):
            grad_weight = grad_weight.narrow(2 + i, 0, int(weight.shape[2 + i]))
    if output_mask[2]:
        grad_bias = grad_output.sum([0, *range(2, 2 + nd)])
    return grad_input, grad_weight, grad_bias


def _max_pool2d_backward(grad_output: torch.Tensor, inp: torch.Tensor, kernel_size: Any, stride: Any, padding: Any,
                         dilation: Any, ceil_mode: bool, indices: torch.Tensor) -> torch.Tensor:
    n, c = inp.shape[0], inp.shape[1]
    grad = torch.zeros_like(inp).reshape(n, c, -1)
    grad = grad.scatter_add(2, indices.reshape(n, c, -1), grad_output.reshape(n, c, -1))
    return grad.reshape(inp.shape)


def _threshold_backward(grad_output: torch.Tensor, inp: torch.Tensor, threshold: float) -> torch.Tensor:
    return grad_output * (inp > threshold).to(grad_output.dtype)


def _empty_permuted(size: Any, physical_layout: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
                    pin_memory: Any = None) -> torch.Tensor:
    # BCE-with-logits' backward allocates with empty_permuted, which torch.onnx does not translate;
    # the buffer is overwritten, so zeros of the logical shape are equivalent.
    return torch.zeros(size, dtype=dtype, device=device)


def decomposition_table() -> dict[Any, Callable[..., Any]]:
    """Core ATen decompositions plus the rewrites above."""
    table = dict(core_aten_decompositions())
    table[aten.empty_permuted.default] = _empty_permuted
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    table[aten.threshold_backward.default] = _threshold_backward
    return table
