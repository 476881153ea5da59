"""Max and average pooling in ops that are cheap in ONNX Runtime, forward and backward.

Max pooling whose windows tile the input (stride == kernel, no padding, no
dilation: the usual ``MaxPool(2)``) works channels-last on the window's taps
(one strided view per kernel position, each a copy of whole channel vectors):
the forward is a running ``Max`` over the taps, and the backward hands each
window's gradient to its first maximum, as PyTorch does, by a scan over the
taps: ``s_i = tap_i > max(tap_0..tap_i-1)`` is true for the first maximum and
for no later tap, so walking the taps from the last one, ``g_i = r * s_i;
r -= g_i`` leaves the whole gradient on the first maximum (every product is
exactly r or 0). The taps are reassembled by concatenation. This replaced
ReduceMax / ArgMax over a window axis and a ScatterElements backward (and,
before that, MaxPool with indices), each measured several times slower.
Other max pools keep ``max_pool2d_with_indices`` and get a scatter-add
backward. Average pooling (no padding) backpropagates through a transposed
convolution with a constant kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

aten = torch.ops.aten


def _tiled(kernel: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool) -> bool:
    return list(stride or kernel) == list(kernel) and not any(padding) and all(d == 1 for d in dilation) and not ceil_mode


def _kernel(kernel_size: Sequence[int]) -> list[int]:
    return list(kernel_size) if len(kernel_size) == 2 else [kernel_size[0]] * 2


def _taps(x: torch.Tensor, kernel: list[int]) -> list[torch.Tensor]:
    """(N, C, H, W) -> kh*kw tensors (N, OH, OW, C), tap (i, j) of every window, rows no window covers dropped."""
    kh, kw = kernel
    c = int(x.shape[1])
    oh, ow = int(x.shape[2]) // kh, int(x.shape[3]) // kw
    windows = x.permute(0, 2, 3, 1)[:, : oh * kh, : ow * kw].reshape(-1, oh, kh, ow, kw, c)
    return [windows[:, :, i, :, j] for i in range(kh) for j in range(kw)]


def _running_max(taps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``out[i]`` = max(taps[0..i]), as the same Max nodes in the forward and the backward."""
    out = [taps[0]]
    for tap in taps[1:]:
        out.append(torch.maximum(out[-1], tap))
    return out


def max_pool2d_with_indices(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] = (),
                            padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                            ceil_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled max pooling as a running Max over the window taps; the indices are a placeholder nothing reads
    (:func:`max_pool2d_backward` recomputes the taps from the input), dropped from the exported graph."""
    kernel = _kernel(kernel_size)
    if not _tiled(kernel, list(stride), list(padding), list(dilation), ceil_mode):
        return NotImplemented  # type: ignore[return-value]  # torch falls back to the ATen op
    # contiguous: a free Identity in ONNX, and what lets a later view (Flatten) trace
    pooled = _running_max(_taps(x, kernel))[-1].permute(0, 3, 1, 2).contiguous()
    return pooled, torch.zeros_like(pooled, dtype=torch.int64)


def max_pool2d_backward(grad_output: torch.Tensor, inp: torch.Tensor, kernel_size: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], ceil_mode: bool, indices: torch.Tensor) -> torch.Tensor:
    """Gradient of either max pool above: to each window's first maximum, or a scatter-add at plane indices."""
    kernel = _kernel(kernel_size)
    n_c = int(inp.shape[1])
    if not _tiled(kernel, list(stride), list(padding), list(dilation), ceil_mode):
        plane_in = int(inp.shape[2]) * int(inp.shape[3])
        plane_out = int(grad_output.shape[2]) * int(grad_output.shape[3])
        grad = torch.zeros_like(inp).reshape(-1, n_c, plane_in)
        grad = grad.scatter_add(2, indices.reshape(-1, n_c, plane_out), grad_output.reshape(-1, n_c, plane_out))
        return grad.reshape(inp.shape)
    kh, kw = kernel
    oh, ow = int(grad_output.shape[2]), int(grad_output.shape[3])
    taps = _taps(inp, kernel)
    before = _running_max(taps)
    rest = grad_output.permute(0, 2, 3, 1)  # (N, OH, OW, C)
    grads: list[torch.Tensor] = [rest] * len(taps)
    for i in range(len(taps) - 1, 0, -1):
        grads[i] = rest * (taps[i] > before[i - 1]).to(rest.dtype)
        rest = rest - grads[i]
    grads[0] = rest
    rows = [torch.stack(grads[i * kw:(i + 1) * kw], dim=3) for i in range(kh)]  # (N, OH, OW, kw, C)
    grad = torch.stack(rows, dim=2).reshape(-1, oh * kh, ow * kw, n_c)
    missing_h, missing_w = int(inp.shape[2]) - oh * kh, int(inp.shape[3]) - ow * kw
    if missing_h or missing_w:
        grad = aten.constant_pad_nd(grad, [0, 0, 0, missing_w, 0, missing_h], 0.0)
    return grad.permute(0, 3, 1, 2).contiguous()


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
