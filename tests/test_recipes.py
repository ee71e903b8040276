"""Every recipe under configs/ validates, states only what differs from the method's defaults and records the
published number it reproduces as data; every CIFAR-100 recipe runs one real training step.

The step uses real CIFAR-100 images from ../shared/data (batch of 8 through the training pipeline),
the recipe's own teacher/student pair and method hyper-parameters, random-weight models (no teacher
checkpoints can be downloaded here), and checks finite losses and gradients on the student.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kdzoo.config.loader import load_config
from kdzoo.data.datasets import build_data, load_source
from kdzoo.methods.registry import method_class
from kdzoo.models.registry import create_model
from kdzoo.types import Progress
from tests.conftest import REPO_ROOT

RECIPES = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if "_base_" not in p.parts)
CIFAR100_RECIPES = [p for p in RECIPES if p.parts[-3] == "cifar100"]
VOC_RECIPES = [p for p in RECIPES if p.parts[-3] == "voc"]

# VOC recipes without a published mIoU: overhaul-distillation's README reports its own method and baselines only.
VOC_UNPUBLISHED = {f"voc/{m}/deeplabv3plus_r101_{s}.yaml" for m in ("cwd", "pixel_kd") for s in ("r18", "mobilenetv2")}


# CIFAR-100 distillation recipes without a published top-1, and why.
UNPUBLISHED = {
    "cifar100/catkd/resnet56_resnet20.yaml": "no CAT-KD number for this pair is recorded yet",
    "cifar100/catkd/vgg13_vgg8.yaml": "no CAT-KD number for this pair is recorded yet",
    "cifar100/catkd/wrn_40_2_wrn_16_2.yaml": "no CAT-KD number for this pair is recorded yet",
    "cifar100/dot/dkd_resnet32x4_resnet8x4.yaml": "mdistiller publishes DOT results for KD only",
    "cifar100/jacobian/resnet32x4_resnet8x4.yaml": "the Jacobian-matching paper has no result for this pair",
    "cifar100/kdsvd/resnet32x4_resnet8x4.yaml": "mdistiller implements KD-SVD but publishes no number",
}


def _id(path):
    return str(path.relative_to(REPO_ROOT / "configs"))


def _defaults(config_class):
    out = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _equal(value, default):
    if isinstance(value, bool) or isinstance(default, bool):  # True == 1, but a bool key set to 1 is not a default
        return type(value) is type(default) and value == default
    if isinstance(default, tuple):
        default = list(default)
    return value == default


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_recipe_validates(recipe):
    cfg = load_config(recipe, ["data.root=../shared/data"])
    assert cfg.experiment.name and cfg.student.name


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_recipe_states_only_non_default_method_keys(recipe):
    method = dict(load_config(recipe).method)
    config_class = method_class(str(method["name"])).Config
    defaults = _defaults(config_class) if dataclasses.is_dataclass(config_class) else {}
    redundant = sorted(k for k, v in method.items() if k in defaults and _equal(v, defaults[k]))
    assert not redundant, f"method keys equal to {config_class.__name__}'s defaults: {redundant}"


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_recipe_published_values_are_percentages(recipe):
    published = load_config(recipe).published
    for value in (published.top1, published.top5):
        assert value is None or 0 < value <= 100, published
    assert published.miou is None or 0 < published.miou <= 100, published
    numbers = (published.top1, published.top5, published.miou)
    assert all(v is None for v in numbers) or published.source, "a published number needs a source"


@pytest.mark.parametrize("recipe", CIFAR100_RECIPES, ids=_id)
def test_cifar100_distillation_recipe_names_its_published_top1(recipe):
    cfg = load_config(recipe)
    if not method_class(str(cfg.method["name"])).requires_teacher:
        return
    if _id(recipe) in UNPUBLISHED:
        assert cfg.published.top1 is None, f"{_id(recipe)} has a published top-1 now: drop it from UNPUBLISHED"
        return
    assert cfg.published.top1 is not None and cfg.published.source, "set published: {top1: ..., source: ...}"


@pytest.mark.parametrize("recipe", VOC_RECIPES, ids=_id)
def test_voc_recipe_is_the_overhaul_distillation_setting(recipe):
    cfg = load_config(recipe)
    assert cfg.task == "segmentation" and cfg.data.dataset == "voc" and cfg.schedule.name == "poly"
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.data.crop_size, cfg.optim.head_lr_scale) == (0.007, 6, 513, 10.0)
    epochs = cfg.schedule.epochs + int(cfg.method.get("connector_init_epochs", 0))
    assert epochs == 50, "the reference trains 50 epochs in all"
    if _id(recipe) in VOC_UNPUBLISHED:
        assert cfg.published.miou is None
    else:
        assert cfg.published.miou is not None and "overhaul-distillation" in cfg.published.source


def test_unpublished_allow_list_names_existing_recipes():
    missing = [name for name in {*UNPUBLISHED, *VOC_UNPUBLISHED} if not (REPO_ROOT / "configs" / name).is_file()]
    assert not missing, f"UNPUBLISHED names recipes that do not exist: {missing}"


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
    torch.manual_seed(0)
    student = create_model(cfg.student.name, num_classes=100)
    teacher = create_model(cfg.teacher.name, num_classes=100) if method.requires_teacher else None
    distiller = method(student, teacher, dict(cfg.method), batch_size=batch_size)  # as the trainer passes it
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
