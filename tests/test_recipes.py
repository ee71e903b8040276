"""Every recipe under configs/ validates; every CIFAR-100 recipe runs one real training step.

The step uses real CIFAR-100 images from ../shared/data (batch of 8 through the training pipeline),
the recipe's own teacher/student pair and method hyper-parameters, random-weight models (no teacher
checkpoints can be downloaded here), and checks finite losses and gradients on the student.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdzoo.config.loader import load_config
from kdzoo.data.datasets import build_data, load_source
from kdzoo.types import Progress
from kdzoo.methods.registry import method_class
from kdzoo.models.registry import create_model
from tests.conftest import REPO_ROOT

RECIPES = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if "_base_" not in p.parts)
CIFAR100_RECIPES = [p for p in RECIPES if p.parts[-3] == "cifar100"]


def _id(path):
    return str(path.relative_to(REPO_ROOT / "configs"))


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_recipe_validates(recipe):
    cfg = load_config(recipe, ["data.root=../shared/data"])
    assert cfg.experiment.name and cfg.student.name
    assert "Published" in recipe.read_text() or "published" in recipe.read_text() or "no top-1" in recipe.read_text()


@pytest.fixture(scope="module")
def cifar_source(data_root):
    cfg = load_config(None, [f"data.root={data_root}"])
    return load_source(cfg.data)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", CIFAR100_RECIPES, ids=_id)
def test_recipe_runs_one_step(recipe, cifar_source, data_root):
    cfg = load_config(recipe, [f"data.root={data_root}", "data.subset=64"])
    method = method_class(str(cfg.method["name"]))
    batch_size = 8
    params = dict(cfg.method)
    if method.needs_fixed_batch_size and "batch_size" in params:
        params["batch_size"] = batch_size
    torch.manual_seed(0)
    student = create_model(cfg.student.name, num_classes=100)
    teacher = create_model(cfg.teacher.name, num_classes=100) if method.requires_teacher else None
    distiller = method(student, teacher, params)
    cfg.data.batch_size = batch_size
    data = build_data(cfg.data, seed=0, device=torch.device("cpu"), source=cifar_source)
    distiller.bind_dataset(data.info)
    distiller.train()
    batch = next(data.train.iterate(epoch=1))
    stage = distiller.stages()[-1]
    progress = Progress(epoch=cfg.schedule.epochs, epochs=cfg.schedule.epochs, stage=stage.name)
    if distiller.performs_own_updates:
        optimizer = torch.optim.SGD([p for g in distiller.param_groups(stage) for p in g["params"]], lr=0.01)

        def apply_update(loss):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        _, losses = distiller.update_step(batch, progress, apply_update)
    else:
        _, losses = distiller.training_step(batch, progress)
        sum(losses.values()).backward()
    assert losses and all(math.isfinite(float(v.detach())) for v in losses.values()), losses
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
