"""Exact rewrites of a model's layers that make its training graph cheaper.

``ReLU`` followed by ``MaxPool`` becomes ``MaxPool`` followed by ``ReLU``: max
and ReLU commute (``max(relu(x)) == relu(max(x))``, bit for bit, since ReLU
is monotone), so the ReLU and its backward run on the pooled tensor, a
quarter of the size behind a 2x2 pool. The gradients agree too, ties
included: where a window's maximum is positive both orders send the gradient
to its first maximum; where it is not, both send zero (ReLU's gradient at the
winner is 0). The build checks the exported graph against the original,
unrewritten model.

``AdaptiveAvgPool1d(1)`` / ``AdaptiveAvgPool2d(1)`` (global average pooling)
becomes a plain mean over the spatial axes: the same ReduceMean forward, but
its backward is a broadcast of ``grad / L`` that the graph clean-up folds
into the next multiplication, where the adaptive pool's went through a 2-D
unsqueeze, an Expand and a Div over the full activation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_POOLS = (nn.MaxPool1d, nn.MaxPool2d)


class GlobalMean(nn.Module):
    """Mean over the last ``dims`` axes, kept as size-1 axes: global average pooling without the adaptive-pool machinery."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.axes = tuple(range(-dims, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.axes, keepdim=True)


def _global_pool_dims(module: nn.Module) -> int | None:
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        size = module.output_size
        sizes = size if isinstance(size, tuple) else (size,)
        if all(s == 1 for s in sizes):
            return 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
    return None


def for_training_graph(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with both rewrites above applied (parameter names unchanged: the moved layers have none)."""
    return _global_means(pool_before_relu(model))


def _global_means(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            dims = _global_pool_dims(child) if child is not None else None
            if dims is not None:
                module._modules[name] = GlobalMean(dims)
    return model


def pool_before_relu(model: nn.Module) -> nn.Module:
    """A copy of ``model`` where every ``nn.Sequential``'s ReLU directly followed by a max pool is swapped with it."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        keys = list(module._modules)
        for i in range(len(keys) - 1):
            first, second = module._modules[keys[i]], module._modules[keys[i + 1]]
            if type(first) is nn.ReLU and isinstance(second, _POOLS):
                module._modules[keys[i]], module._modules[keys[i + 1]] = second, first
    return model
