"""``teacher.mean`` / ``teacher.std`` (docs/config.md, Teacher input): a teacher trained with other normalisation
statistics than the data loader applies sees each batch renormalised to its own, whoever runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kdzoo
from kdzoo.config.loader import config_from_dict
from kdzoo.engine.setup import prepare_run
from kdzoo.errors import UserInputError
from kdzoo.methods.losses import kd_loss
from kdzoo.models.renormalise import renormalise_input
from kdzoo.types import Progress

VIT_MEAN, VIT_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # timm vit_* pretrained_cfg
TEACHER_MEAN, TEACHER_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision / timm ImageNet


def test_hook_maps_one_normalisation_to_the_other_and_leaves_the_model_alone():
    raw = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    mean_of = lambda values: torch.tensor(values, dtype=torch.float64).view(1, 3, 1, 1)  # noqa: E731
    student_view = (raw - mean_of(VIT_MEAN)) / mean_of(VIT_STD)
    seen: list[torch.Tensor] = []
    probe = nn.Conv2d(3, 1, 1).double()
    keys = list(probe.state_dict())
    renormalise_input(probe, VIT_MEAN, VIT_STD, TEACHER_MEAN, TEACHER_STD)
    probe.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))  # runs after the renormalisation
    probe(student_view)
    torch.testing.assert_close(seen[0], (raw - mean_of(TEACHER_MEAN)) / mean_of(TEACHER_STD), rtol=1e-12, atol=1e-12)
    assert list(probe.state_dict()) == keys
    assert torch.equal(student_view, (raw - mean_of(VIT_MEAN)) / mean_of(VIT_STD))  # the batch itself is untouched
    with pytest.raises(UserInputError, match="one value per image channel"):
        renormalise_input(probe, VIT_MEAN, VIT_STD, [0.5], [0.5])
    with pytest.raises(UserInputError, match="positive"):
        renormalise_input(probe, VIT_MEAN, VIT_STD, TEACHER_MEAN, [0.2, 0.0, 0.2])


def _config(tmp_path: Path, **teacher_fields) -> object:
    torch.manual_seed(5)
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"model": kdzoo.create_model("resnet8", num_classes=10).state_dict()}, checkpoint)
    return config_from_dict({
        "experiment": {"name": "renorm", "output_dir": str(tmp_path / "runs")},
        # The student's normalisation: a ViT's 0.5 / 0.5, not mnist5k's convention.
        "data": {"dataset": "mnist5k", "batch_size": 8, "subset": 16, "test_subset": 8, "mean": VIT_MEAN,
                 "std": VIT_STD},
        "teacher": {"name": "resnet8", "checkpoint": str(checkpoint), **teacher_fields},
        "student": {"name": "timm:vit_tiny_patch16_224",
                    "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "method": {"name": "kd"},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False, "threads": 1},
    }), checkpoint


def test_prepare_run_feeds_the_teacher_its_own_normalisation(tmp_path):
    cfg, checkpoint = _config(tmp_path, mean=TEACHER_MEAN, std=TEACHER_STD)
    parts = prepare_run(cfg)
    assert (parts.data.mean, parts.data.std) == (tuple(VIT_MEAN), tuple(VIT_STD))
    batch = next(iter(parts.data.train.iterate(1)))
    reference = kdzoo.create_model("resnet8", num_classes=10)
    reference.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    reference.eval()
    column = lambda values: torch.tensor(values).view(1, 3, 1, 1)  # noqa: E731
    raw = batch.image * column(VIT_STD) + column(VIT_MEAN)
    with torch.no_grad():
        expected = reference((raw - column(TEACHER_MEAN)) / column(TEACHER_STD))
        unchanged = reference(batch.image)
    teacher_logits = parts.distiller.teacher_forward(batch).logits
    torch.testing.assert_close(teacher_logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(teacher_logits, unchanged, atol=1e-3)
    # The whole step runs with it: KD's term is the one of the renormalised teacher's logits.
    student_logits, losses = parts.distiller.training_step(batch, Progress())
    assert losses["loss_kd"].item() == pytest.approx(0.9 * kd_loss(student_logits, expected, 4.0).item(), rel=1e-4)


@pytest.mark.parametrize(("fields", "message"), [
    ({"mean": TEACHER_MEAN}, "go together"),
    ({"mean": [0.5], "std": [0.5]}, "one value per image channel"),
    ({"mean": TEACHER_MEAN, "std": TEACHER_STD, "cache": "teacher_cache"}, "teacher.cache does not record"),
])
def test_bad_teacher_normalisation_is_a_user_error_before_anything_is_written(tmp_path, fields, message):
    cfg, _ = _config(tmp_path, **fields)
    with pytest.raises(UserInputError, match=message):
        prepare_run(cfg)
    assert not (tmp_path / "runs").exists()
