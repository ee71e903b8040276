"""FitNet, AT, NST, PKT, KD-SVD, RKD, SP and CC on heterogeneous teacher/student pairs: each builds
and runs a training step with finite losses, gradients on every student parameter (the method term
alone reaching the stem) and on its extra modules, and none on the teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdzoo
from kdzoo.config.loader import load_config
from kdzoo.errors import UserInputError
from kdzoo.methods.base import build_method_config
from kdzoo.methods.registry import method_class
from kdzoo.types import Batch, Progress

PAIRS = [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")]
METHOD_TERMS = {
    "fitnet": {"loss_fitnet"},
    "at": {"loss_at"},
    "nst": {"loss_nst"},
    "pkt": {"loss_pkt"},
    "kdsvd": {"loss_kdsvd"},
    "rkd": {"loss_rkd_distance", "loss_rkd_angle"},
    "sp": {"loss_sp"},
    "cc": {"loss_cc"},
}
EXTRA_PARAMS = {"fitnet": 4, "cc": 4}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prototypes():
    torch.manual_seed(0)
    return {name: kdzoo.create_model(name) for pair in PAIRS for name in pair}


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    return Batch(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 100, (4,), generator=generator))


@pytest.fixture(scope="module")
def teacher_outputs(prototypes, batch):
    """Eval-mode teacher taps, computed once per teacher (what Distiller.teacher_forward returns)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = prototypes[name].eval()
            with torch.no_grad():
                cache[name] = kdzoo.features(model, batch.image)
        return cache[name]

    return get


@pytest.mark.parametrize("method", sorted(METHOD_TERMS))
@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS, ids=[f"{t}-{s}" for t, s in PAIRS])
def test_training_step_on_heterogeneous_pair(prototypes, teacher_outputs, batch, method, teacher_name, student_name):
    teacher, student = prototypes[teacher_name], prototypes[student_name]
    student.zero_grad(set_to_none=True)
    if method == "kdsvd" and student_name == "ShuffleV2":
        # KD-SVD matches singular vectors channel by channel (RepDistiller fails here too): a clear error.
        with pytest.raises(UserInputError, match="equal widths"):
            kdzoo.create_distiller(method, teacher=teacher, student=student)
        return
    distiller = kdzoo.create_distiller(method, teacher=teacher, student=student)
    try:
        check_training_step(distiller, teacher_outputs(teacher_name), batch, method)
    finally:
        # The models are shared by all tests of the module: drop this distiller's hooks.
        distiller.student_extractor.remove()
        distiller.teacher_extractor.remove()


def check_training_step(distiller, teacher_out, batch, method):
    student, teacher = distiller.student, distiller.teacher
    assert len(distiller.extra_parameters()) == EXTRA_PARAMS.get(method, 0)
    distiller.train()
    # The training step with the teacher forward shared across methods (the costly part on CPU).
    losses = distiller.compute_losses(distiller.student_extractor(batch.image), teacher_out, batch, Progress())
    assert set(losses) == {"loss_ce"} | METHOD_TERMS[method]
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), (name, value)
        assert value.item() >= 0, (name, value)

    method_total = sum(losses[name] for name in METHOD_TERMS[method])
    stem = next(student.parameters())
    (stem_grad,) = torch.autograd.grad(method_total, stem, retain_graph=True)
    assert stem_grad.abs().sum() > 0, "the method term does not reach the student's stem"

    sum(losses.values()).backward()
    for name, param in student.named_parameters():
        assert param.grad is not None, f"student {name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"student {name} has a non-finite gradient"
    for param in distiller.extra_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0 or param.ndim == 1  # a conv bias before train-mode BN gets ~0
    assert all(p.grad is None for p in teacher.parameters())


RECIPES = sorted(
    path for method in METHOD_TERMS for path in (REPO_ROOT / "configs" / "cifar100" / method).glob("*.yaml")
)


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipe_validates_and_uses_reference_defaults(path):
    cfg = load_config(path)
    method = method_class(cfg.method["name"])
    assert cfg.method["name"] == path.parent.name
    hparams = build_method_config(method, dict(cfg.method), {})
    # Every pair of the RepDistiller table runs with the same method hyper-parameters (the defaults).
    assert hparams == method.Config()
    is_light_student = cfg.student.name in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
    assert cfg.optim.lr == (0.01 if is_light_student else 0.05)


@pytest.mark.parametrize("method", sorted(METHOD_TERMS))
def test_bf16_autocast_keeps_method_terms_fp32(method):
    torch.manual_seed(0)
    # Equal stage widths (16, 32, 64) so that KD-SVD applies too.
    teacher, student = kdzoo.create_model("resnet20"), kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller(method, teacher=teacher, student=student)
    distiller.train()
    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    _, reference = distiller.training_step(batch, Progress())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = distiller.training_step(batch, Progress())
    for name in METHOD_TERMS[method]:
        assert losses[name].dtype == torch.float32 and torch.isfinite(losses[name]), name
        if method != "kdsvd":  # singular-vector signs may legitimately flip with bf16 features
            torch.testing.assert_close(losses[name], reference[name], rtol=0.1, atol=1e-3)
