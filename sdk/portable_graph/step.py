"""One training step and one evaluation as plain PyTorch functions over flat tensors.

These are what gets traced into the portable graphs, and, run eagerly, the
reference the build checks the exported graphs against. The objective is
ORT-training's: task loss + mu/2 * sum over shared w of ||w - anchor.w||^2
(Li et al., MLSys 2020). AdamW is ORT-training's: the HuggingFace variant
(``adam_mode=1``: bias correction folded into the learning rate, decay after
the update) with ``generate_artifacts``' defaults (betas 0.9/0.999, eps 1e-6,
no weight decay), evaluated in the same float32 order, with the bias
corrections' powers in float64 as ORT's ``std::pow`` does. A micro-batched
step is traced in two halves, one slice's scaled gradients
(``make_slice_gradients``) and the FedProx term plus the update
(``make_apply``), which ``micro_batch`` joins in a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from device_agent.bundle.manifest import LossKind, OptimizerKind
from device_agent.training_backends import graph_names as g

# Python floats holding float32 values, so torch applies them to float32 tensors exactly as
# ORT's float attributes: 0.9f, 0.999f, 1e-6f, and 1.f - 0.9f, 1.f - 0.999f computed in float32.
BETA1 = float(np.float32(0.9))
BETA2 = float(np.float32(0.999))
EPS = float(np.float32(1e-6))
ONE_MINUS_BETA1 = float(np.float32(1) - np.float32(BETA1))
ONE_MINUS_BETA2 = float(np.float32(1) - np.float32(BETA2))
#: Parameters this large get their own AdamW update (a dozen nodes) instead of a share of the flat one, which would
#: copy them into and out of the flat vector every step (4 passes over 2 MB for the 2D-CNN's 524k-weight layer).
SEPARATE_UPDATE_MIN_SIZE = 1 << 15


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """What one step graph trains: every parameter (model order), the trainable ones, the shared ones (for FedProx)."""

    parameters: tuple[str, ...]
    trainable: tuple[str, ...]
    shared: tuple[str, ...]
    mu: float
    loss: LossKind
    optimizer: OptimizerKind
    #: Trainable parameters updated on their own, with their own AdamW moments (the large ones; see graph_names).
    separate: tuple[str, ...] = ()

    @property
    def flat(self) -> tuple[str, ...]:
        """Trainable parameters whose AdamW moments share the flat ``opt.m`` / ``opt.v`` vectors."""
        return tuple(n for n in self.trainable if n not in self.separate)

    def moments(self) -> list[str]:
        """AdamW moment names, in input (and output) order: the flat pair when used, then each separate pair."""
        names = [g.OPT_M, g.OPT_V] if self.flat else []
        for n in self.separate:
            names += [g.own_moment(g.OPT_M, n), g.own_moment(g.OPT_V, n)]
        return names

    @property
    def adam(self) -> bool:
        """Whether the step carries AdamW state."""
        return self.optimizer is OptimizerKind.ADAMW

    @property
    def anchored(self) -> tuple[str, ...]:
        """Shared parameters with a FedProx anchor input (none when mu == 0)."""
        return self.shared if self.mu > 0 else ()

    def eval_inputs(self) -> list[str]:
        """Eval graph inputs: x, y, every parameter, the anchors."""
        return [g.X, g.Y, *map(g.param, self.parameters), *map(g.anchor, self.anchored)]

    @property
    def flat_params(self) -> bool:
        """Whether the step reads the flat parameters as one more input and writes them as one output (AdamW only)."""
        return self.adam and bool(self.flat)

    def step_inputs(self) -> list[str]:
        """Step graph inputs: x, y, lr, every parameter, the anchors, the flat parameters, the optimizer state."""
        names = [g.X, g.Y, g.LR, *map(g.param, self.parameters), *map(g.anchor, self.anchored)]
        if self.flat_params:
            names.append(g.FLAT_PARAMS)
        if self.adam:
            names += [g.OPT_STEP, *self.moments()]
        return names

    def step_outputs(self) -> list[str]:
        """Step graph outputs: the loss, then ``new.X`` for every state value X the step updates."""
        if self.flat_params:
            updated = [*map(g.param, self.separate), g.FLAT_PARAMS]
        else:
            updated = [g.param(n) for n in self.trainable]
        if self.adam:
            updated += [g.OPT_STEP, *self.moments()]
        return [g.LOSS, *map(g.new, updated)]


class _MeanCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy with ORT-training's gradient, ``(exp(log_prob) - onehot) * (dY / N)``, in that order.

    F.cross_entropy's decomposition carries ignore_index handling (Equal/Not/Where nodes) that fedge's labels
    never need, and autograd's own backward of log_softmax + gather + mean is a dozen nodes (a scattered
    one-hot, a row sum, a broadcast); this one is five, and rounds exactly as SoftmaxCrossEntropyLossGrad.
    """

    @staticmethod
    def forward(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        log_prob = F.log_softmax(logits, dim=-1)
        return -log_prob.gather(1, labels.unsqueeze(1)).mean(), log_prob

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], inputs[1])

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        log_prob, labels = ctx.saved_tensors
        onehot = (labels.unsqueeze(1) == torch.arange(log_prob.shape[-1])).to(log_prob.dtype)
        return (log_prob.exp() - onehot) * (grad_loss / log_prob.shape[0]), None


def task_loss(kind: LossKind, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, MSE or BCE-with-logits, as ORT-training's loss blocks compute them."""
    if kind is LossKind.CROSS_ENTROPY:
        loss, _ = _MeanCrossEntropy.apply(out, y)
        return loss  # type: ignore[no-any-return]
    if kind is LossKind.MSE:
        diff = out - y
        return (diff * diff).mean()
    return F.binary_cross_entropy_with_logits(out, y)


def objective(model: torch.nn.Module, spec: StepSpec, params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor],
              x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss + FedProx term, model output)."""
    out = functional_call(model, params, (x,))
    loss = task_loss(spec.loss, out, y)
    if spec.anchored:
        loss = loss + _prox_term(spec, params, anchors)
    return loss, out


def _prox_term(spec: StepSpec, params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> torch.Tensor:
    """mu/2 * sum over the anchored parameters of ||w - anchor||^2, summed in order as ORT-training's loss block does."""
    terms = []
    for name in spec.anchored:
        diff = params[name] - anchors[name]
        terms.append((diff * diff).sum())  # a Mul, not a Pow: measured faster in ORT
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total * torch.tensor(np.float32(spec.mu / 2))


def _hf_step_size(t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """lr * sqrt(1 - beta2^t) / (1 - beta1^t), once per step for every parameter (ORT's ``lr_corrected``)."""
    t64 = t.to(torch.float64)
    alpha_correction = 1 - torch.pow(torch.tensor(BETA1, dtype=torch.float64), t64).to(torch.float32)
    beta_correction = 1 - torch.pow(torch.tensor(BETA2, dtype=torch.float64), t64).to(torch.float32)
    return lr * (torch.sqrt(beta_correction) / alpha_correction)


def _hf_adamw(p: torch.Tensor, grad_p: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
              step_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = m * BETA1 + grad_p * ONE_MINUS_BETA1
    v = v * BETA2 + (grad_p * ONE_MINUS_BETA2) * grad_p
    return p - (step_size * m) / (torch.sqrt(v) + EPS), m, v


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])  # no Reshape node for vectors


def _after(value: torch.Tensor, dependency: torch.Tensor | None) -> torch.Tensor:
    """``value`` itself, as a node that reads ``dependency``: ``Where(isnan(d[0]), value, value)``, exact for any d."""
    if dependency is None:
        return value
    return torch.where(torch.isnan(dependency.reshape(-1)[0]), value, value)


def update_order(spec: StepSpec, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each separately updated parameter, the gradient its update waits for: the previous trainable parameter's.

    In a layer stack that gradient is computed from the layer's input gradient, the backward's last read of the
    layer's weights, so the update comes after every read of the old weights and the device may keep one buffer
    per parameter (``in_place.parameters_update_in_place`` proves it on the exported graph; where it does not hold,
    the graph is simply not marked). The update waits only for the layer below, not for the whole backward.
    """
    order = list(spec.trainable)
    return {n: grads[order[order.index(n) - 1]] for n in spec.separate if order.index(n) > 0}


def _update(spec: StepSpec, lr: torch.Tensor, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
            rest: Sequence[torch.Tensor], flat_grad: torch.Tensor | None = None,
            after: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The optimizer's outputs (``step_outputs()`` after the loss) from the gradients; ``rest``: the state after the anchors.

    ``flat_grad``: the flat parameters' gradients already concatenated (else taken from ``grads``); ``after``: per
    separately updated parameter, a tensor its update must wait for (:func:`update_order`).
    """
    if not spec.adam:
        return tuple(params[n] - lr * grads[n] for n in spec.trainable)
    flat_params = rest[0] if spec.flat else None
    step_count, *moments = rest[1:] if spec.flat else rest
    t = step_count + 1
    step_size = _hf_step_size(t, lr)
    new = []
    new_moments = []
    if spec.flat:
        # One flat update for the small parameters: ~12 graph nodes instead of ~12 per parameter. The device
        # keeps them in one buffer too (each of their param.* inputs a view of flat.param), so the update
        # reads and writes that buffer whole: no concatenation of the parameters, no split of the result.
        m, v = moments[:2]
        moments = moments[2:]
        flat_g = flat_grad if flat_grad is not None else _flat([grads[n] for n in spec.flat])
        flat, m, v = _hf_adamw(flat_params, flat_g, m, v, step_size)
        new_moments += [m, v]
    for i, n in enumerate(spec.separate):
        # A large parameter on its own: no concatenation, no slicing, the update writes new.param directly.
        size = step_size if after is None else _after(step_size, after.get(n))
        p, m, v = _hf_adamw(params[n], grads[n], moments[2 * i], moments[2 * i + 1], size)
        new.append(p)
        new_moments += [m, v]
    if spec.flat:
        new.append(flat)
    return (*new, t, *new_moments)


def make_step(model: torch.nn.Module, spec: StepSpec) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``step(*inputs) -> outputs`` in the order of ``spec.step_inputs()`` / ``spec.step_outputs()``."""
    n_params, n_anchors = len(spec.parameters), len(spec.anchored)

    def step(x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = dict(zip(spec.parameters, state[:n_params]))
        anchors = dict(zip(spec.anchored, state[n_params:n_params + n_anchors]))
        frozen = {n: v for n, v in params.items() if n not in spec.trainable}

        def loss_of(trainable: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            loss, _ = objective(model, spec, {**frozen, **trainable}, anchors, x, y)
            return loss, loss

        grads, loss = grad(loss_of, has_aux=True)({n: params[n] for n in spec.trainable})
        return (loss, *_update(spec, lr, params, grads, state[n_params + n_anchors:], after=update_order(spec, grads)))

    return step


def gradient_names(spec: StepSpec) -> list[str]:
    """What a micro-batch's gradient function returns after the loss: the flat gradient (AdamW with flat
    parameters), then one per separately updated parameter; with SGD, one per trainable parameter."""
    if spec.adam:
        return (["grad.flat"] if spec.flat else []) + [f"grad.{n}" for n in spec.separate]
    return [f"grad.{n}" for n in spec.trainable]


def make_slice_gradients(model: torch.nn.Module, spec: StepSpec) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``grads(x, y, scale, *params) -> (scale * task loss, *scale * gradients)`` for one micro-batch (``gradient_names``).

    ``scale`` is the slice's share of the batch (its size / the batch size): the step sums these over the slices,
    which is the whole batch's mean loss and its gradient. The FedProx term is not here: it is added once, by
    :func:`make_apply`. Scaling the loss scales every gradient without a pass over the gradients.
    """

    def gradients(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, *params_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = dict(zip(spec.parameters, params_in))
        frozen = {n: v for n, v in params.items() if n not in spec.trainable}

        def loss_of(trainable: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(model, {**frozen, **trainable}, (x,))
            loss = task_loss(spec.loss, out, y) * scale
            return loss, loss

        grads, loss = grad(loss_of, has_aux=True)({n: params[n] for n in spec.trainable})
        if not spec.adam:
            return (loss, *(grads[n] for n in spec.trainable))
        flat = [_flat([grads[n] for n in spec.flat])] if spec.flat else []
        return (loss, *flat, *(grads[n] for n in spec.separate))

    return gradients


def make_apply(spec: StepSpec) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``apply(lr, *state, task_loss, *gradients) -> step_outputs()``: the FedProx term and the optimizer update.

    ``state`` is the step's inputs after ``lr`` (``step_inputs()[3:]``); ``task_loss`` and the gradients are the
    sums of :func:`make_slice_gradients` over the micro-batches.
    """
    n_params, n_anchors = len(spec.parameters), len(spec.anchored)
    n_state = len(spec.step_inputs()) - 3

    def apply(lr: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state, loss, summed = inputs[:n_state], inputs[n_state], inputs[n_state + 1:]
        params = dict(zip(spec.parameters, state[:n_params]))
        anchors = dict(zip(spec.anchored, state[n_params:n_params + n_anchors]))
        has_flat = spec.adam and bool(spec.flat)
        grads = dict(zip(spec.separate if spec.adam else spec.trainable, summed[1:] if has_flat else summed))
        flat_grad = summed[0] if has_flat else None
        anchored = [n for n in spec.anchored if n in spec.trainable]
        if spec.anchored:
            def prox_of(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                term = _prox_term(spec, {**params, **p}, anchors)
                return term, term

            if anchored:
                prox_grads, prox = grad(prox_of, has_aux=True)({n: params[n] for n in anchored})
                for n in anchored:
                    if n in grads:
                        grads[n] = grads[n] + prox_grads[n]
                if flat_grad is not None and any(n in prox_grads for n in spec.flat):
                    flat_grad = flat_grad + _flat([prox_grads[n] if n in prox_grads else torch.zeros_like(params[n])
                                                   for n in spec.flat])
            else:
                prox = _prox_term(spec, params, anchors)
            loss = loss + prox
        return (loss, *_update(spec, lr, params, grads, state[n_params + n_anchors:], flat_grad))

    return apply


def make_eval(model: torch.nn.Module, spec: StepSpec) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``evaluate(x, y, *params, *anchors) -> (loss, output)``."""
    n_params = len(spec.parameters)

    def evaluate(x: torch.Tensor, y: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = dict(zip(spec.parameters, state[:n_params]))
        anchors = dict(zip(spec.anchored, state[n_params:]))
        return objective(model, spec, params, anchors, x, y)

    return evaluate


def example_inputs(spec: StepSpec, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   *, lr: float, step: bool, warm: torch.Generator | None = None) -> list[torch.Tensor]:
    """Inputs for the step (``step`` True) or eval graph: the given parameters, anchors equal to them, zero moments.

    ``warm``: AdamW state as after some training instead (step 10, random moments with sqrt(v) >> eps), drawn
    from this generator. A first AdamW step from zero moments divides each gradient by its own magnitude,
    which turns float32 summation-order noise in near-zero gradients into update differences of ~1e-6; from a
    warm state the update is well conditioned and ``new.opt.m`` (= 0.9 m + 0.1 g) checks the gradients directly.
    """
    state: list[torch.Tensor] = [params[n].clone() for n in spec.parameters] + [params[n].clone() for n in spec.anchored]
    if not step:
        return [x, y, *state]
    if spec.flat_params:
        state.append(_flat([params[n] for n in spec.flat]).clone())
    if spec.adam:
        state += [torch.tensor(0 if warm is None else 10, dtype=torch.int64)]
        shapes = ([torch.Size([sum(params[n].numel() for n in spec.flat)])] if spec.flat else []) + \
            [params[n].shape for n in spec.separate]
        for shape in shapes:  # m and v distinct tensors: the tracer would otherwise treat them as one aliased input
            if warm is None:
                state += [torch.zeros(shape), torch.zeros(shape)]
            else:
                state += [torch.randn(shape, generator=warm) * 1e-2, torch.rand(shape, generator=warm) * 1e-4 + 1e-5]
    return [x, y, torch.tensor(lr, dtype=torch.float32), *state]


def as_numpy(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Detached numpy copies."""
    return [t.detach().cpu().numpy().copy() for t in tensors]
