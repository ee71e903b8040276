"""DOT — Zhao, Cui, Song, Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023, arXiv 2307.08436
(docs/methods/dot.md). Reference: mdistiller ``mdistiller/engine/dot.py`` (``DistillationOrientedTrainer``) and the
``DOT`` trainer's ``train_iter`` in ``mdistiller/engine/trainer.py``.

SGD with two momentum buffers per parameter: ``momentum_buffer`` for the task (cross-entropy) gradient with
momentum ``mu - delta`` and ``momentum_kd_buffer`` for the distillation gradient with ``mu + delta``. A parameter
reached by only one of the two losses uses the mean momentum ``mu`` for that buffer. Weight decay enters once:
through the task gradient, or through the distillation gradient for distillation-only parameters (never on the
first step of a distillation buffer, a reference quirk kept for parity). The optimizer state holds both buffers
under mdistiller's key names, so ``state_dict()`` / ``load_state_dict()`` resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor


class DistillationOrientedSGD(torch.optim.Optimizer):
    """DOT's optimizer. Per iteration: backward of the distillation loss, :meth:`record_distill_grads`, zero the
    gradients, backward of the task loss, :meth:`step` — or just call :func:`dot_backward_step`."""

    # The trainer splits the losses into (task, distillation) and calls dot_backward_step when this is set.
    splits_losses: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,  # mdistiller cfg.py SOLVER.MOMENTUM 0.9 (the base momentum mu)
        delta: float = 0.075,  # mdistiller cfg.py SOLVER.DOT.DELTA 0.075 (CIFAR-100, Tiny-ImageNet; ImageNet 0.09)
        weight_decay: float = 0.0,
    ):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if not 0.0 <= delta <= momentum or momentum + delta >= 1.0:
            raise ValueError(f"DOT needs 0 <= delta <= momentum and momentum + delta < 1, got {momentum=}, {delta=}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        # id(param) -> its distillation gradient, between record_distill_grads() and step(); None = nothing pending.
        self._distill_grads: dict[int, Tensor] | None = None
        self._scaler_view = _RecordedGradients()

    @torch.no_grad()
    def record_distill_grads(self) -> None:
        """Remember the current ``.grad`` of every parameter as its distillation gradient (mdistiller's
        ``step_kd``). The tensors are kept, not copied: follow with ``zero_grad(set_to_none=True)`` (which leaves them
        intact; ``set_to_none=False`` would zero them in place)."""
        self._distill_grads = {
            id(p): p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        }

    step_kd = record_distill_grads  # mdistiller's name, for ported training loops

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Update with the task gradients now in ``.grad`` and the recorded distillation gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distill_grads = self._distill_grads or {}
        for group in self.param_groups:
            _dot_update(group, self.state, distill_grads)
        self._distill_grads = None
        return loss

    def discard_distill_grads(self) -> None:
        """Forget the recorded distillation gradients (a skipped AMP step)."""
        self._distill_grads = None

    @property
    def has_pending_distill_grads(self) -> bool:
        return self._distill_grads is not None

    def recorded_gradients_view(self) -> _RecordedGradients:
        """The recorded distillation gradients as an optimizer-like object GradScaler can unscale and step."""
        grads = self._distill_grads or {}
        self._scaler_view.reset([(p, grads[id(p)]) for g in self.param_groups for p in g["params"] if id(p) in grads])
        return self._scaler_view


def _dot_update(group: dict[str, Any], state: dict[Tensor, dict[str, Any]], distill_grads: dict[int, Tensor]) -> None:
    """One parameter group's update, in the reference's order: every task update first, then every
    distillation update (docs/methods/dot.md rules 1 and 2)."""
    lr, weight_decay = group["lr"], group["weight_decay"]
    # Same expressions as mdistiller trainer.py / dot.py, so the momenta are bit-identical to the reference's.
    momentum_task = group["momentum"] - group["delta"]
    momentum_kd = group["momentum"] + group["delta"]
    momentum_mean = (momentum_kd + momentum_task) / 2.0

    task_params = [p for p in group["params"] if p.grad is not None]
    distill_params = [p for p in group["params"] if id(p) in distill_grads]
    has_task_grad = {id(p) for p in task_params}

    # 1. Task gradient (+ weight decay) into momentum_buffer: mu_task if the parameter also got a distillation
    # gradient this step, the mean momentum otherwise.
    if task_params:
        grads = [p.grad for p in task_params]
        steps = torch._foreach_add(grads, task_params, alpha=weight_decay) if weight_decay else grads
        if momentum_task != 0:
            momenta = [momentum_task if id(p) in distill_grads else momentum_mean for p in task_params]
            steps = _momentum_into(state, "momentum_buffer", task_params, steps, momenta)
        torch._foreach_add_(task_params, steps, alpha=-lr)

    # 2. Distillation gradient into momentum_kd_buffer: raw on creation and for shared parameters (their weight
    # decay came with the task gradient), + weight decay with the mean momentum for distillation-only ones.
    if distill_params:
        steps = []
        for p in distill_params:
            grad = distill_grads[id(p)]
            if weight_decay and id(p) not in has_task_grad and "momentum_kd_buffer" in state[p]:
                grad = grad.add(p, alpha=weight_decay)
            steps.append(grad)
        momenta = [momentum_kd if id(p) in has_task_grad else momentum_mean for p in distill_params]
        steps = _momentum_into(state, "momentum_kd_buffer", distill_params, steps, momenta)
        torch._foreach_add_(distill_params, steps, alpha=-lr)


def _momentum_into(
    state: dict[Tensor, dict[str, Any]], key: str, params: list[Tensor], steps: list[Tensor], momenta: list[float]
) -> list[Tensor]:
    """``buf = step`` for a new buffer, else ``buf = m*buf + step`` (dampening 0), batched per momentum value."""
    buffers: list[Tensor] = []
    by_momentum: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for p, step, momentum in zip(params, steps, momenta, strict=True):
        buf = state[p].get(key)
        if buf is None:
            buf = state[p][key] = torch.clone(step).detach()
        else:
            bufs, adds = by_momentum.setdefault(momentum, ([], []))
            bufs.append(buf)
            adds.append(step)
        buffers.append(buf)
    for momentum, (bufs, adds) in by_momentum.items():
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, adds)
    return buffers


class _RecordedGradients:
    """The recorded distillation gradients seen by ``torch.amp.GradScaler`` as a second optimizer (it only reads
    ``param_groups[i]["params"][j].grad`` and calls ``step()``). ``unscale_`` divides them by the loss scale in
    place and records their inf check, so ``update()`` backs the scale off when either gradient set overflowed;
    ``GradScaler.step`` calls :meth:`step` only when they are all finite."""

    def __init__(self) -> None:
        self.param_groups: list[dict[str, list[Tensor]]] = [{"params": []}]
        self.finite = False

    def reset(self, params_and_grads: list[tuple[Tensor, Tensor]]) -> None:
        holders = []
        for param, grad in params_and_grads:
            holder = param.detach()  # shares storage, no copy: only a tensor of the right shape to carry .grad
            holder.grad = grad
            holders.append(holder)
        self.param_groups = [{"params": holders}]
        self.finite = False

    def step(self) -> None:
        self.finite = True


def dot_backward_step(
    optimizer: DistillationOrientedSGD,
    task_loss: Tensor | float,
    distill_loss: Tensor | float,
    grad_scaler: torch.amp.GradScaler | None = None,
    sync_grads: Callable[[], None] | None = None,
) -> bool:
    """Everything after the forward of one DOT iteration (mdistiller ``DOT.train_iter``): zero the gradients, backward
    of the distillation loss keeping the graph, record its gradients, zero, backward of the task loss, update.

    With an enabled ``grad_scaler`` both losses are scaled, both gradient sets are unscaled, the update is
    skipped if either holds an inf/NaN, and ``grad_scaler.update()`` is called (the whole AMP iteration).
    Returns whether the parameters were updated.

    ``sync_grads`` runs after each of the two backward passes: under DDP the trainer runs the forward in
    ``no_sync()`` (DDP's reducer fires once per forward, so it would average only the first backward's
    gradients) and averages each gradient set across processes itself.
    """
    scaling = grad_scaler is not None and grad_scaler.is_enabled()

    def backward(loss: Tensor | float, retain_graph: bool) -> None:
        if isinstance(loss, Tensor) and loss.requires_grad:
            (grad_scaler.scale(loss) if scaling else loss).backward(retain_graph=retain_graph)  # type: ignore[union-attr]

    optimizer.zero_grad(set_to_none=True)
    backward(distill_loss, retain_graph=True)
    if sync_grads is not None:
        sync_grads()
    optimizer.record_distill_grads()
    optimizer.zero_grad(set_to_none=True)
    backward(task_loss, retain_graph=False)
    if sync_grads is not None:
        sync_grads()
    if not scaling:
        optimizer.step()
        return True

    assert grad_scaler is not None
    recorded = optimizer.recorded_gradients_view()
    has_distill_grads = bool(recorded.param_groups[0]["params"])
    has_task_grads = any(p.grad is not None for g in optimizer.param_groups for p in g["params"])
    if not (has_distill_grads or has_task_grads):
        optimizer.discard_distill_grads()
        return False
    if has_distill_grads:
        grad_scaler.unscale_(recorded)  # type: ignore[arg-type]
        grad_scaler.step(recorded)  # type: ignore[arg-type]  # sets recorded.finite only if all are finite
    else:
        recorded.finite = True
    if not has_task_grads:
        if recorded.finite:
            optimizer.step()
    elif recorded.finite:
        grad_scaler.step(optimizer)  # unscales the task gradients and steps only if they are finite
    else:
        grad_scaler.unscale_(optimizer)  # the task set's inf check is recorded too, for update()
    stepped = not optimizer.has_pending_distill_grads  # step() consumes the recorded gradients
    optimizer.discard_distill_grads()
    grad_scaler.update()
    return stepped
