"""DeiT (docs/methods/deit.md): the loss against a re-statement of facebookresearch/deit ``losses.py``
(``DistillationLoss``, soft and hard) written with explicit probabilities in float64, end-to-end training of a
tiny distilled ViT, and evaluation of the export through ``kdzoo eval`` on the averaged heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdzoo
from kdzoo.cli import main
from kdzoo.config.loader import config_from_dict
from kdzoo.data.datasets import build_data
from kdzoo.engine import checkpoint_io
from kdzoo.engine.run import run_training
from kdzoo.engine.setup import load_model_for_eval
from kdzoo.errors import UserInputError
from kdzoo.methods.deit import DeiTConfig, deit_losses
from kdzoo.types import Batch, Progress

DEIT_STUDENT = "timm:deit_tiny_distilled_patch16_224"
# A 1-block ViT on 32x32 inputs: 16 patches of 8x8, 32 channels (seconds on a CPU).
TINY_VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def reference_distillation_loss(class_logits, distillation_logits, teacher_logits, labels, distillation_type,
                                alpha, tau):
    """DeiT's ``DistillationLoss.forward`` with explicit sums: CE on the class head; soft = τ² · Σ p_t (log p_t −
    log p_s) / (B·K) on the distillation head; hard = CE against the teacher's arg-max; mixed by 1 − α and α."""
    def log_softmax(z):
        shifted = z - z.max(dim=1, keepdim=True).values
        return shifted - shifted.exp().sum(dim=1, keepdim=True).log()

    def ce(z, classes):
        return -log_softmax(z)[torch.arange(len(classes)), classes].mean()

    base = ce(class_logits, labels)
    if distillation_type == "soft":
        log_p_s, log_p_t = log_softmax(distillation_logits / tau), log_softmax(teacher_logits / tau)
        distillation = (log_p_t.exp() * (log_p_t - log_p_s)).sum() * tau * tau / distillation_logits.numel()
    else:
        distillation = ce(distillation_logits, teacher_logits.argmax(dim=1))
    return base * (1 - alpha) + distillation * alpha


@pytest.mark.parametrize(("distillation_type", "alpha", "tau"),
                         [("soft", 0.5, 1.0), ("soft", 0.3, 3.0), ("hard", 0.5, 1.0), ("hard", 0.8, 1.0)])
def test_loss_and_gradients_equal_deit_distillation_loss(distillation_type, alpha, tau):
    gen = torch.Generator().manual_seed(3)
    class_logits, distillation_logits, teacher_logits = (3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
                                                         for _ in range(3))
    labels = torch.randint(0, 7, (5,), generator=gen)
    ours = [t.clone().requires_grad_() for t in (class_logits, distillation_logits)]
    reference = [t.clone().requires_grad_() for t in (class_logits, distillation_logits)]
    cfg = DeiTConfig(distillation_type=distillation_type, alpha=alpha, tau=tau)
    losses = deit_losses(*ours, teacher_logits, labels, cfg)
    expected = reference_distillation_loss(*reference, teacher_logits, labels, distillation_type, alpha, tau)
    assert set(losses) == {"loss_ce", "loss_deit"}
    total = sum(losses.values())
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["loss_ce"].item() == pytest.approx((1 - alpha) * F.cross_entropy(class_logits, labels).item(),
                                                     rel=1e-6)
    total.backward()
    expected.backward()
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def _tiny_deit(num_classes: int = 10) -> torch.nn.Module:
    return kdzoo.create_model(DEIT_STUDENT, num_classes=num_classes, **TINY_VIT_ARGS)


def test_defaults_heads_and_errors():
    torch.manual_seed(0)
    student, teacher = _tiny_deit(), kdzoo.create_model("resnet8", num_classes=10)
    distiller = kdzoo.create_distiller("deit", student=student, teacher=teacher)
    cfg = distiller.cfg
    assert (cfg.distillation_type, cfg.alpha, cfg.tau) == ("hard", 0.5, 1.0)  # deit README / main.py
    distiller.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, losses = distiller.training_step(Batch(images, labels), Progress())
    # The step's two heads, read from the network itself: class token -> head, distillation token -> head_dist.
    tokens = student.forward_features(images)
    class_logits, distillation_logits = student.head(tokens[:, 0]), student.head_dist(tokens[:, 1])
    torch.testing.assert_close(logits, (class_logits + distillation_logits) / 2)
    expected = deit_losses(class_logits, distillation_logits, teacher(images), labels, cfg)
    for name in ("loss_ce", "loss_deit"):
        assert losses[name].item() == pytest.approx(expected[name].item(), rel=1e-5)
    sum(losses.values()).backward()
    for name in ("head.weight", "head_dist.weight", "dist_token", "cls_token"):
        assert distiller.student.get_parameter(name).grad.abs().sum() > 0, name
    with pytest.raises(UserInputError, match="distillation token"):
        kdzoo.create_distiller("deit", student=kdzoo.create_model("resnet8", num_classes=10), teacher=teacher)
    with pytest.raises(UserInputError, match="method.name=vanilla"):
        kdzoo.create_distiller("deit", student=_tiny_deit(), teacher=teacher, distillation_type="none")
    with pytest.raises(UserInputError, match=r"\[0, 1\]"):
        kdzoo.create_distiller("deit", student=_tiny_deit(), teacher=teacher, alpha=1.5)


def _cfg(tmp_path: Path, distillation_type: str):
    torch.manual_seed(123)
    teacher_file = tmp_path / "teacher.pth"
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": kdzoo.create_model("resnet8", num_classes=10).state_dict()}, teacher_file)
    return config_from_dict({
        "experiment": {"name": f"deit_{distillation_type}", "output_dir": str(tmp_path / "runs"), "seed": 7},
        "data": {"dataset": "mnist5k", "batch_size": 32, "subset": 64, "test_subset": 48, "test_batch_size": 24},
        "teacher": {"name": "resnet8", "checkpoint": str(teacher_file)},
        "student": {"name": DEIT_STUDENT, "model_args": TINY_VIT_ARGS},
        "method": {"name": "deit", "distillation_type": distillation_type},
        "optim": {"lr": 0.01},
        "schedule": {"epochs": 1, "milestones": [1]},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False, "threads": 1, "log_interval": 1},
    })


def _averaged_head_scores(weights: dict, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exported weights in a fresh timm model; (class head + distillation head) / 2 computed by hand."""
    model = _tiny_deit()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(images)
        class_logits, distillation_logits = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
    averaged = (class_logits + distillation_logits) / 2
    return {"averaged": averaged, "class": class_logits,
            "loss": F.cross_entropy(averaged, labels), "class_loss": F.cross_entropy(class_logits, labels),
            "top1": 100.0 * (averaged.argmax(dim=1) == labels).float().mean()}


@pytest.mark.parametrize("distillation_type", ["hard", "soft"])
def test_trains_end_to_end_and_kdzoo_eval_scores_the_averaged_heads(tmp_path, capsys, distillation_type):
    cfg = _cfg(tmp_path, distillation_type)
    summary = run_training(cfg)
    run_dir = Path(summary["run_dir"])
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train/loss_ce"] > 0 and record["train/loss_deit"] > 0
    export = run_dir / "student_last.pt"
    payload = checkpoint_io.load_verified(export)
    assert payload["model_name"] == DEIT_STUDENT and payload["model_args"] == TINY_VIT_ARGS

    # The test split as kdzoo eval reads it: mnist5k's first 48 evaluation images, normalised by the loader.
    data = build_data(cfg.data, seed=0, device=torch.device("cpu"))
    batches = list(data.test)
    images, labels = torch.cat([b.image for b in batches]), torch.cat([b.target for b in batches])
    expected = _averaged_head_scores(payload["model"], images, labels)
    # The network kdzoo eval builds returns the averaged heads (timm's eval forward), batch for batch.
    model = load_model_for_eval(None, str(export), 10, (3, 32, 32)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batches[0].image), expected["averaged"][: len(batches[0].target)])
    # The two heads disagree, so the average is not the class head alone.
    assert not torch.allclose(expected["averaged"], expected["class"])

    scores = tmp_path / "scores.json"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(export), "--json", str(scores), "data.dataset=mnist5k",
                 "data.test_subset=48", "data.test_batch_size=24", "runtime.device=cpu"]) == 0
    metrics = json.loads(scores.read_text())["metrics"]
    assert metrics["loss"] == pytest.approx(expected["loss"].item(), rel=1e-5)
    assert metrics["top1"] == pytest.approx(expected["top1"].item(), abs=1e-6)
    assert metrics["loss"] != pytest.approx(expected["class_loss"].item(), rel=1e-5)
    # The trainer's own last evaluation scored the same network the same way.
    assert record["loss"] == pytest.approx(expected["loss"].item(), rel=1e-5)
