"""Run one golden training step of a kdzoo method and compare with the reference fixture
(../shared/golden/README.md: tolerances, loss-name and weight conventions)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import kdzoo
from kdzoo.methods.base import Distiller
from kdzoo.types import Batch, Progress

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
STUDENT_GRAD_REL = 1e-4
EXTRA_GRAD_REL = 1e-3


def build_pair(common: Mapping[str, Any]) -> tuple[nn.Module, nn.Module]:
    teacher = kdzoo.create_model(common["teacher_arch"], num_classes=100)
    teacher.load_state_dict(common["teacher_state_dict"])
    student = kdzoo.create_model(common["student_arch"], num_classes=100)
    student.load_state_dict(common["student_state_dict"])
    return teacher, student


def load_extra_by_order(module: nn.Module, ref: Mapping[str, Any], params: list[nn.Parameter] | None = None,
                        buffers: list[torch.Tensor] | None = None) -> None:
    """Copy the reference's extra-module weights into ours by registration order (README step 2)."""
    sd = ref["extra_state_dict"]
    params = list(module.parameters()) if params is None else params
    buffers = list(module.buffers()) if buffers is None else buffers
    assert len(params) == len(ref["extra_param_order"]), (len(params), len(ref["extra_param_order"]))
    with torch.no_grad():
        for p, (name, shape) in zip(params, ref["extra_param_order"]):
            assert list(p.shape) == list(shape), (name, list(p.shape), shape)
            p.copy_(sd[name])
        for b, (name, shape) in zip(buffers, ref["extra_buffer_order"]):
            assert list(b.shape) == list(shape), (name, list(b.shape), shape)
            b.copy_(sd[name])


def run_step(distiller: Distiller, common: Mapping[str, Any], *, epoch: int = 240,
             contrast_index: torch.Tensor | None = None, index: torch.Tensor | None = None
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    distiller.train()
    distiller.zero_grad(set_to_none=True)
    batch = Batch(common["images"], common["labels"], index, contrast_index=contrast_index)
    _, losses = distiller.training_step(batch, Progress(epoch=epoch, epochs=240))
    total = sum(losses.values())
    total.backward()
    return losses, total


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def assert_student_grads(student: nn.Module, ref: Mapping[str, Any]) -> None:
    params = dict(student.named_parameters())
    zero = set(ref["fp64"].get("zero_grads", []))
    largest = max(ref["student_grad_norms"].values())
    for name, expected in ref["student_grads"].items():
        grad = params[name].grad
        assert grad is not None, f"{name} got no gradient"
        if name in zero:
            assert grad.abs().max().item() <= 1e-6 * largest, name
        else:
            assert rel_l2(grad, expected) <= STUDENT_GRAD_REL, (name, rel_l2(grad, expected))
    for name, expected in ref["student_grads_head"].items():
        grad = params[name].grad.flatten()[: expected.numel()]
        assert rel_l2(grad, expected) <= STUDENT_GRAD_REL, (name, rel_l2(grad, expected))
    for name, norm in ref["student_grad_norms"].items():
        grad = params[name].grad
        assert grad is not None, f"{name} got no gradient"
        if name in zero:
            continue
        torch.testing.assert_close(grad.double().norm().item(), norm, rtol=1e-4, atol=1e-6 * largest, msg=name)
    with_grad = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= set(ref["student_grad_norms"]), with_grad - set(ref["student_grad_norms"])


def assert_extra_grads(named_params: Mapping[str, nn.Parameter], ref: Mapping[str, Any],
                       name_map: Callable[[str], str] = lambda n: n) -> None:
    """``named_params`` maps *reference* names (after ``name_map``) to our parameters."""
    zero = set(ref["fp64"].get("zero_grads", []))
    norms = ref["extra_grad_norms"]
    largest = max(norms.values()) if norms else 0.0
    for ref_name, expected in {**ref["extra_grads"], **ref["extra_grads_head"]}.items():
        p = named_params[name_map(ref_name)]
        assert p.grad is not None, f"extra {ref_name} got no gradient"
        grad = p.grad.flatten()[: expected.numel()].view_as(expected) if ref_name in ref["extra_grads_head"] else p.grad
        if ref_name in zero:
            assert grad.abs().max().item() <= 1e-6 * largest, ref_name
        else:
            assert rel_l2(grad, expected) <= EXTRA_GRAD_REL, (ref_name, rel_l2(grad, expected))
    for ref_name, norm in norms.items():
        if ref_name in zero:
            continue
        p = named_params[name_map(ref_name)]
        torch.testing.assert_close(p.grad.double().norm().item(), norm, rtol=1e-4, atol=1e-6 * largest, msg=ref_name)


def assert_loss(actual: torch.Tensor | float, expected: float) -> None:
    torch.testing.assert_close(float(torch.as_tensor(actual).detach()), float(expected), rtol=LOSS_RTOL, atol=LOSS_ATOL)


def stage_step(distiller: Distiller, images, labels, stage: str) -> dict[str, torch.Tensor]:
    """One train-mode forward and backward of ``stage`` (no optimiser step); returns the losses."""
    distiller.train()
    distiller.zero_grad(set_to_none=True)
    _, losses = distiller.training_step(Batch(images, labels), Progress(stage=stage))
    sum(losses.values()).backward()
    return losses


def trainable_names(distiller: Distiller, stage) -> set[str]:
    """Names of the parameters ``stage`` trains."""
    names = {id(p): n for n, p in distiller.named_parameters()}
    return {names[id(p)] for p in distiller.trainable_parameters(stage)}
