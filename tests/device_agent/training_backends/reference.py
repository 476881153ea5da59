"""An independent PyTorch reference of one fedge training step, for holding both backends to it.

Written from the definitions, not from sdk.portable_graph: objective = task loss
+ mu/2 * sum over shared w of ||w - anchor.w||^2; SGD p -= lr * g; AdamW as
onnxruntime-training runs it (HuggingFace variant: m, v EMAs with betas 0.9 /
0.999, step size lr * sqrt(1 - b2^t) / (1 - b1^t), denominator sqrt(v) + 1e-6,
no weight decay).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

BETA1, BETA2, EPS = 0.9, 0.999, 1e-6


def task_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    if kind == "mse":
        return F.mse_loss(out, y)
    return F.binary_cross_entropy_with_logits(out, y)


class ReferenceTrainer:
    """Parameters, anchors and per-set optimizer state of one model, stepped in float32 PyTorch."""

    def __init__(self, model: torch.nn.Module, *, shared: list[str], mu: float, loss: str, optimizer: str, lr: float) -> None:
        self.model = model
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.shared = shared
        self.mu = mu
        self.loss = loss
        self.optimizer = optimizer
        self.lr = lr
        self.anchors = {n: self.params[n].clone() for n in shared} if mu > 0 else {}
        self.state: dict[str, dict] = {}

    def objective(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = task_loss(self.loss, functional_call(self.model, params, (x,)), y)
        if self.anchors:
            loss = loss + self.mu / 2 * sum(((params[n] - self.anchors[n]) ** 2).sum() for n in self.shared)
        return loss

    def step(self, set_name: str, trainable: list[str], x: np.ndarray, y: np.ndarray) -> float:
        params = {n: v.clone().requires_grad_(n in trainable) for n, v in self.params.items()}
        loss = self.objective(params, torch.from_numpy(x), torch.from_numpy(y))
        grads = torch.autograd.grad(loss, [params[n] for n in trainable])
        st = self.state.setdefault(set_name, {"t": 0, "m": {}, "v": {}})
        st["t"] += 1
        with torch.no_grad():
            for n, g in zip(trainable, grads):
                if self.optimizer == "sgd":
                    self.params[n] = self.params[n] - self.lr * g
                    continue
                m = BETA1 * st["m"].get(n, torch.zeros_like(g)) + (1 - BETA1) * g
                v = BETA2 * st["v"].get(n, torch.zeros_like(g)) + (1 - BETA2) * g * g
                st["m"][n], st["v"][n] = m, v
                size = self.lr * math.sqrt(1 - BETA2 ** st["t"]) / (1 - BETA1 ** st["t"])
                self.params[n] = self.params[n] - size * m / (v.sqrt() + EPS)
        return float(loss.detach())

    def set_anchors(self, anchors: dict[str, np.ndarray]) -> None:
        self.anchors = {n: torch.from_numpy(np.array(v)) for n, v in anchors.items()}

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {n: v.numpy() for n, v in self.params.items()}
