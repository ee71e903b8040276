"""DOT optimizer (docs/methods/dot.md): five steps on a toy model with one shared, one task-only and one
distillation-only parameter against the update rule written out by hand in float64; resume through
state_dict; AMP (unscaling, skipped steps, scale back-off)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdzoo.engine.dot import DistillationOrientedSGD, dot_backward_step

LR, MOMENTUM, DELTA, WEIGHT_DECAY = 0.1, 0.9, 0.075, 0.01
STEPS = 5
# Step index whose distillation loss does not reach the shared parameter (exercises the mean-momentum branches).
DISTILL_SKIPS_SHARED = 2


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.shared = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.task_only = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.distill_only = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))


def step_data(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return {n: torch.randn(3, generator=g, dtype=torch.float64) for n in ("x", "y", "u", "v")}


def losses(model: Toy, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """task = ½‖s⊙x + t − y‖², distill = ½‖s⊙u + d − v‖² (without s at step DISTILL_SKIPS_SHARED)."""
    d = step_data(k)
    task = 0.5 * (model.shared * d["x"] + model.task_only - d["y"]).pow(2).sum()
    shared_term = 0.0 if k == DISTILL_SKIPS_SHARED else model.shared * d["u"]
    distill = 0.5 * (shared_term + model.distill_only - d["v"]).pow(2).sum()
    return task, distill


def expected_trajectory() -> list[dict[str, torch.Tensor | None]]:
    """The update rule of docs/methods/dot.md in plain float64 arithmetic, gradients in closed form."""
    init = Toy()
    s, t, dd = (init.shared.detach().clone(), init.task_only.detach().clone(), init.distill_only.detach().clone())
    mu_task, mu_kd = MOMENTUM - DELTA, MOMENTUM + DELTA
    mu_mean = (mu_task + mu_kd) / 2
    buf: dict[str, torch.Tensor | None] = dict.fromkeys(("s_task", "t_task", "s_kd", "d_kd"))
    out = []
    for k in range(STEPS):
        data = step_data(k)
        x, y, u, v = data["x"], data["y"], data["u"], data["v"]
        # Gradients of the two losses (closed form).
        r_task = s * x + t - y
        g_s_task, g_t_task = r_task * x, r_task
        shared_in_distill = k != DISTILL_SKIPS_SHARED
        r_distill = (s * u if shared_in_distill else 0.0) + dd - v
        g_s_kd, g_d_kd = r_distill * u, r_distill
        # Rule 1 (task): d = g + wd*theta; mu_task if the parameter also got a distillation gradient, else mean.
        step_s = g_s_task + WEIGHT_DECAY * s
        mu_s = mu_task if shared_in_distill else mu_mean
        buf["s_task"] = step_s.clone() if buf["s_task"] is None else mu_s * buf["s_task"] + step_s
        step_t = g_t_task + WEIGHT_DECAY * t
        buf["t_task"] = step_t.clone() if buf["t_task"] is None else mu_mean * buf["t_task"] + step_t
        # Rule 2 (distillation): raw gradient on creation / for shared parameters (mu_kd); distillation-only
        # parameters get weight decay and the mean momentum after their first step.
        if shared_in_distill:
            buf["s_kd"] = g_s_kd.clone() if buf["s_kd"] is None else mu_kd * buf["s_kd"] + g_s_kd
        if buf["d_kd"] is None:
            buf["d_kd"] = g_d_kd.clone()
        else:
            buf["d_kd"] = mu_mean * buf["d_kd"] + (g_d_kd + WEIGHT_DECAY * dd)
        s = s - LR * buf["s_task"]
        if shared_in_distill:
            s = s - LR * buf["s_kd"]
        t = t - LR * buf["t_task"]
        dd = dd - LR * buf["d_kd"]
        out.append({"shared": s.clone(), "task_only": t.clone(), "distill_only": dd.clone(),
                    **{k_: None if b is None else b.clone() for k_, b in buf.items()}})
    return out


def make(model: Toy) -> DistillationOrientedSGD:
    return DistillationOrientedSGD(model.parameters(), lr=LR, momentum=MOMENTUM, delta=DELTA,
                                   weight_decay=WEIGHT_DECAY)


def assert_matches(model: Toy, opt: DistillationOrientedSGD, exp: dict[str, torch.Tensor | None]) -> None:
    close = {"rtol": 1e-6, "atol": 1e-9}
    for name in ("shared", "task_only", "distill_only"):
        torch.testing.assert_close(getattr(model, name).detach(), exp[name], **close, msg=name)
    state = opt.state
    torch.testing.assert_close(state[model.shared]["momentum_buffer"], exp["s_task"], **close)
    torch.testing.assert_close(state[model.task_only]["momentum_buffer"], exp["t_task"], **close)
    torch.testing.assert_close(state[model.shared]["momentum_kd_buffer"], exp["s_kd"], **close)
    torch.testing.assert_close(state[model.distill_only]["momentum_kd_buffer"], exp["d_kd"], **close)
    assert "momentum_kd_buffer" not in state[model.task_only]
    assert "momentum_buffer" not in state[model.distill_only]


def test_five_steps_match_hand_written_update_rule():
    model = Toy()
    opt = make(model)
    for k, exp in enumerate(expected_trajectory()):
        assert dot_backward_step(opt, *losses(model, k)) is True
        assert_matches(model, opt, exp)
    assert DistillationOrientedSGD.splits_losses is True


def test_mdistiller_call_sequence_is_equivalent():
    """The explicit sequence of MD's trainer (zero, kd backward, step_kd, zero, task backward, step)."""
    model = Toy()
    opt = make(model)
    for k, exp in enumerate(expected_trajectory()):
        task, distill = losses(model, k)
        opt.zero_grad(set_to_none=True)
        distill.backward(retain_graph=True)
        opt.step_kd()
        opt.zero_grad(set_to_none=True)
        task.backward()
        opt.step()
        assert_matches(model, opt, exp)


def test_state_dict_round_trip_continues_identically():
    model = Toy()
    opt = make(model)
    for k in range(2):
        dot_backward_step(opt, *losses(model, k))
    saved_opt = copy.deepcopy(opt.state_dict())
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(saved_opt["state"][0])  # shared parameter: both
    resumed_model = Toy()
    resumed_model.load_state_dict(model.state_dict())
    resumed_opt = make(resumed_model)
    resumed_opt.load_state_dict(saved_opt)
    expected = expected_trajectory()
    for k in range(2, STEPS):
        dot_backward_step(opt, *losses(model, k))
        dot_backward_step(resumed_opt, *losses(resumed_model, k))
        for name in ("shared", "task_only", "distill_only"):
            assert torch.equal(getattr(model, name), getattr(resumed_model, name)), name
        for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
            assert opt.state[p].keys() == resumed_opt.state[q].keys()
            for key in opt.state[p]:
                assert torch.equal(opt.state[p][key], resumed_opt.state[q][key]), key
        assert_matches(resumed_model, resumed_opt, expected[k])


def test_grad_scaler_unscales_both_gradient_sets():
    """A power-of-two loss scale is exact, so scaled steps must reproduce the unscaled trajectory."""
    model = Toy()
    opt = make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for k, exp in enumerate(expected_trajectory()):
        assert dot_backward_step(opt, *losses(model, k), grad_scaler=scaler) is True
        assert_matches(model, opt, exp)
    assert scaler.get_scale() == 2.0**10


@pytest.mark.parametrize("bad", ["distill", "task"])
def test_grad_scaler_skips_step_on_inf_and_backs_off(bad):
    model = Toy()
    opt = make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    dot_backward_step(opt, *losses(model, 0), grad_scaler=scaler)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    task, distill = losses(model, 1)
    poison = model.distill_only if bad == "distill" else model.task_only
    poisoned = (poison * torch.tensor([float("inf"), 0.0, 0.0], dtype=torch.float64)).sum()
    if bad == "distill":
        distill = distill + poisoned
    else:
        task = task + poisoned
    assert dot_backward_step(opt, task, distill, grad_scaler=scaler) is False
    for p, before in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), before)
    after = opt.state_dict()["state"]
    for index, buffers in state.items():
        for key, value in buffers.items():
            assert torch.equal(after[index][key], value), (index, key)
    assert scaler.get_scale() == 2.0**9  # backoff_factor 0.5
    assert not opt.has_pending_distill_grads
    # The next clean step goes through.
    assert dot_backward_step(opt, *losses(model, 2), grad_scaler=scaler) is True


def test_rejects_bad_momenta():
    with pytest.raises(ValueError, match="delta"):
        DistillationOrientedSGD(Toy().parameters(), lr=0.1, momentum=0.9, delta=0.2)
