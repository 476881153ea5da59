"""Max and average pooling in ops that are cheap in ONNX Runtime, forward and backward.

Max pooling whose windows tile the input (stride == kernel, no padding, no
dilation, the usual ``MaxPool(2)``) is computed as ReduceMax / ArgMax over a
reshaped view, and its gradient scattered to each window's argmax: ORT's MaxPool with
an indices output plus a ScatterElements backward measured several times
slower. Ties go to the first maximum, as in PyTorch. Other max pools keep
``max_pool2d_with_indices`` and get a scatter-add backward. Average pooling
(no padding) backpropagates through a transposed convolution with a constant
kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

aten = torch.ops.aten


def _tiled(kernel: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool) -> bool:
    return list(stride or kernel) == list(kernel) and not any(padding) and all(d == 1 for d in dilation) and not ceil_mode


def _windows(x: torch.Tensor, kernel: list[int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, OH, OW, kh*kw), dropping the rows/columns no window covers."""
    kh, kw = kernel
    oh, ow = int(x.shape[2]) // kh, int(x.shape[3]) // kw
    x = x[:, :, : oh * kh, : ow * kw]
    return x.reshape(-1, int(x.shape[1]), oh, kh, ow, kw).permute(0, 1, 2, 4, 3, 5).reshape(-1, int(x.shape[1]), oh, ow, kh * kw)


def max_pool2d_with_indices(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] = (),
                            padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                            ceil_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled max pooling as ReduceMax/ArgMax; the indices are window-local (only :func:`max_pool2d_backward` reads them)."""
    kernel = list(kernel_size) if len(kernel_size) == 2 else [kernel_size[0]] * 2
    if not _tiled(kernel, list(stride), list(padding), list(dilation), ceil_mode):
        return NotImplemented  # type: ignore[return-value]  # torch falls back to the ATen op
    windows = _windows(x, kernel)
    return windows.amax(-1), windows.argmax(-1)


def max_pool2d_backward(grad_output: torch.Tensor, inp: torch.Tensor, kernel_size: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], ceil_mode: bool, indices: torch.Tensor) -> torch.Tensor:
    """Gradient of either max pool above: one-hot at the window-local argmax, or a scatter-add at plane indices."""
    kernel = list(kernel_size) if len(kernel_size) == 2 else [kernel_size[0]] * 2
    n_c = int(inp.shape[1])
    if not _tiled(kernel, list(stride), list(padding), list(dilation), ceil_mode):
        plane_in = int(inp.shape[2]) * int(inp.shape[3])
        plane_out = int(grad_output.shape[2]) * int(grad_output.shape[3])
        grad = torch.zeros_like(inp).reshape(-1, n_c, plane_in)
        grad = grad.scatter_add(2, indices.reshape(-1, n_c, plane_out), grad_output.reshape(-1, n_c, plane_out))
        return grad.reshape(inp.shape)
    kh, kw = kernel
    oh, ow = int(grad_output.shape[2]), int(grad_output.shape[3])
    # ScatterElements of each window's gradient at its argmax (measured faster in ORT than a one-hot Equal + Mul).
    zeros = grad_output.new_zeros((grad_output.shape[0], n_c, oh, ow, kh * kw))
    spread = zeros.scatter(-1, indices.unsqueeze(-1), grad_output.unsqueeze(-1))  # (N, C, OH, OW, kh*kw)
    grad = spread.reshape(-1, n_c, oh, ow, kh, kw).permute(0, 1, 2, 4, 3, 5).reshape(-1, n_c, oh * kh, ow * kw)
    missing_h, missing_w = int(inp.shape[2]) - oh * kh, int(inp.shape[3]) - ow * kw
    if missing_h or missing_w:
        grad = aten.constant_pad_nd(grad, [0, missing_w, 0, missing_h], 0.0)
    return grad


def avg_pool2d_backward(grad_output: torch.Tensor, inp: torch.Tensor, kernel_size: list[int], stride: list[int],
                        padding: list[int], ceil_mode: bool, count_include_pad: bool, divisor_override: Any) -> torch.Tensor:
    """Every window averages exactly kh * kw inputs (support.py refuses padding, ceil_mode and divisor_override), so
    the gradient spreads grad / (kh * kw) over each window: a transposed convolution with a constant kernel."""
    if any(padding) or ceil_mode or divisor_override:
        raise NotImplementedError("average pooling with padding, ceil_mode or divisor_override has no portable backward")
    kh, kw = kernel_size
    sh, sw = stride or kernel_size
    oh, ow = int(grad_output.shape[-2]), int(grad_output.shape[-1])
    h, w = int(inp.shape[-2]), int(inp.shape[-1])
    kernel = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=grad_output.dtype)
    extra = [h - ((oh - 1) * sh + kh), w - ((ow - 1) * sw + kw)]
    grad = aten.convolution(grad_output.reshape(-1, 1, oh, ow), kernel, None, [sh, sw], [0, 0], [1, 1], True, extra, 1)
    return grad.reshape(inp.shape)
