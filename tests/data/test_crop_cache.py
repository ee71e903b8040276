"""The crop-level teacher cache (FKD-style) on an ImageFolder of real JPEG photographs: build, replay, the
exactness bound of a KD step against the live teacher, and every way a cache can belong to another run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdzoo.cli import main
from kdzoo.config.loader import config_from_dict
from kdzoo.data import dali_augment
from kdzoo.data.crop_cache import bytes_per_sample, reconstruct_logits
from kdzoo.data.sample_photos import build_photo_folder
from kdzoo.engine.setup import prepare_run
from kdzoo.errors import UserInputError
from kdzoo.models.registry import create_model
from kdzoo.types import Progress

CLASSES = 10


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    build_photo_folder(root, train_per_class=4, val_per_class=1)
    torch.manual_seed(0)
    teacher = create_model("tv_resnet18", num_classes=CLASSES)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    (root / "empty.yaml").write_text("{}\n")
    return root


def _overrides(root, cache, **extra):
    values = {"data.dataset": "imagefolder", "data.root": str(root), "data.image_size": 40, "data.batch_size": 8,
              "data.num_workers": 0, "teacher.name": "tv_resnet18", "teacher.checkpoint": str(root / "teacher.pt"),
              "student.name": "tv_resnet18", "method.name": "kd", "schedule.epochs": 2, "teacher.cache": str(cache),
              "runtime.progress": False, "experiment.output_dir": str(root / "runs"), **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _cfg(root, cache, **extra):
    nested: dict = {}
    for item in _overrides(root, cache, **extra):
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    for section, name, cast in (("data", "image_size", int), ("data", "batch_size", int), ("data", "num_workers", int),
                                ("schedule", "epochs", int), ("teacher", "cache_topk", int)):
        if name in nested.get(section, {}):
            nested[section][name] = cast(nested[section][name])
    nested["runtime"]["progress"] = False
    return config_from_dict(nested)


@pytest.fixture(scope="module")
def built(photos):
    """Caches at k = C and k = 3, two epochs each, built through the CLI."""
    caches = {}
    for k in (CLASSES, 3):
        cache = photos / f"cache_k{k}"
        assert main(["cache", "build", str(photos / "empty.yaml"),
                     *_overrides(photos, cache, **{"teacher.cache_topk": k})]) == 0
        caches[k] = cache
    return caches


def test_layout_and_storage(photos, built):
    cache = built[3]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["topk"] == 3 and meta["num_samples"] == 40 and meta["crop"]["size"] == 40
    assert meta["crop"]["scale"] == [0.08, 1.0] and meta["build_seed"] == 0
    for epoch in (1, 2):
        shard = cache / f"epoch_{epoch:04d}"
        params = np.load(shard / "params.npy")
        assert params.shape == (40, 5) and params.dtype == np.uint16
        assert np.load(shard / "top_values.npy").dtype == np.float16
        assert np.load(shard / "top_indices.npy").shape == (40, 3)
    payload = sum(np.load(cache / "epoch_0001" / f"{a}.npy").nbytes
                  for a in ("params", "top_values", "top_indices", "tail_lse"))
    assert payload == bytes_per_sample(3, CLASSES) * 40
    # The paper figure in the docs: ImageNet-1k, k = 10 -> 54 bytes per image and epoch.
    assert bytes_per_sample(10, 1000) == 54
    assert not list(cache.glob(".epoch_*"))  # no partial shard left behind


def _kd_losses_and_grads(parts, batch):
    distiller = parts.distiller
    distiller.zero_grad(set_to_none=True)
    _, losses = distiller(batch, Progress(epoch=1, epochs=2))
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in distiller.student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def test_replay_equals_live_teacher_step_at_full_k(photos, built):
    """k = C: the replayed crops are the build's crops, the cached logits are the live teacher's to fp16 rounding,
    and the KD step's losses and student gradients match the live-teacher step to that rounding (relative 2e-3)."""
    parts = prepare_run(_cfg(photos, built[CLASSES], **{"teacher.cache_topk": CLASSES}))
    batch = next(parts.data.train.iterate(1))
    assert batch.teacher_logits is not None and batch.crop.shape == (8, 5)
    cached_params = np.load(built[CLASSES] / "epoch_0001" / "params.npy")
    assert np.array_equal(cached_params[batch.index.numpy()], batch.crop.numpy())
    teacher = parts.distiller.teacher.eval()
    with torch.no_grad():
        live_logits = teacher(batch.image)
    spacing = torch.exp2(torch.floor(torch.log2(live_logits.abs().clamp_min(2.0**-14))) - 10)
    assert float(((batch.teacher_logits - live_logits).abs() / spacing).max()) <= 0.5 + 1e-6
    teacher_calls = []
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    cached_losses, cached_grads = _kd_losses_and_grads(parts, batch)
    assert teacher_calls == []  # the cached step skips the teacher
    batch.teacher_logits = None  # the same batch through the live teacher
    live_losses, live_grads = _kd_losses_and_grads(parts, batch)
    assert teacher_calls == [1]
    for name in live_losses:
        assert cached_losses[name] == pytest.approx(live_losses[name], rel=2e-3, abs=1e-6)
    for name, grad in live_grads.items():  # per tensor, relative to its norm (elementwise sums cancel)
        assert float((cached_grads[name] - grad).norm()) <= 2e-3 * float(grad.norm()) + 1e-8, name


def test_topk_reconstruction_bound(photos, built):
    """k < C: the stored classes keep their probability (T = 1), the tail's mass is exact and spread evenly, so
    the per-sample L1 distance of the softmax (= of the KD gradient on the student's logits at T = 1) is at most
    twice the tail mass, plus rounding."""
    parts = prepare_run(_cfg(photos, built[3], **{"teacher.cache_topk": 3}))
    batch = next(parts.data.train.iterate(2))
    with torch.no_grad():
        live = parts.distiller.teacher.eval()(batch.image).float()
    p_live, p_cached = live.softmax(1), batch.teacher_logits.softmax(1)
    top = live.topk(3, dim=1).indices
    torch.testing.assert_close(p_cached.gather(1, top), p_live.gather(1, top), rtol=2e-3, atol=1e-6)
    tail = 1 - p_live.gather(1, top).sum(1)
    l1 = (p_cached - p_live).abs().sum(1)
    assert bool((l1 <= 2 * tail + 2e-3).all())
    assert float(tail.max()) > 0.05  # a random teacher spreads its mass: the bound is exercised, not vacuous


def test_reconstruct_logits_by_hand():
    values = torch.tensor([[3.0, 1.0]])
    classes = torch.tensor([[2, 0]])
    rest = torch.tensor([0.5, -1.0])  # the other two classes' logits
    tail = torch.logsumexp(rest, 0).reshape(1)
    out = reconstruct_logits(values, classes, tail, 4)
    fill = float(tail) - np.log(2)
    assert out[0].tolist() == pytest.approx([1.0, fill, 3.0, fill])
    assert float(torch.logsumexp(out, 1)) == pytest.approx(float(torch.logsumexp(torch.tensor([1.0, 0.5, 3.0, -1.0]),
                                                                                 0)), rel=1e-6)


def test_replay_ignores_the_training_seed(photos, built):
    """Training with another seed keeps its own sample order but replays the cached crops."""
    parts = prepare_run(_cfg(photos, built[3], **{"teacher.cache_topk": 3, "experiment.seed": 7}))
    batches = list(parts.data.train.iterate(2))
    index = torch.cat([b.index for b in batches]).numpy()
    crops = torch.cat([b.crop for b in batches]).numpy()
    assert sorted(index.tolist()) == list(range(40))
    assert np.array_equal(np.load(built[3] / "epoch_0002" / "params.npy")[index], crops)


def test_cache_of_another_setting_is_refused(photos, built, tmp_path):
    cache = built[3]
    with pytest.raises(UserInputError, match="crop"):
        prepare_run(_cfg(photos, cache, **{"teacher.cache_topk": 3, "data.crop_scale": "[0.1,1.0]"}))
    with pytest.raises(UserInputError, match="topk"):
        prepare_run(_cfg(photos, cache, **{"teacher.cache_topk": 5}))
    with pytest.raises(UserInputError, match="samples_sha256"):
        prepare_run(_cfg(photos, cache, **{"teacher.cache_topk": 3, "data.subset": 20}))
    with pytest.raises(UserInputError, match="lacks epoch"):
        prepare_run(_cfg(photos, cache, **{"teacher.cache_topk": 3, "schedule.epochs": 3}))
    other = tmp_path / "other_teacher.pt"
    torch.manual_seed(5)
    torch.save(create_model("tv_resnet18", num_classes=CLASSES).state_dict(), other)
    with pytest.raises(UserInputError, match="teacher_sha256"):
        prepare_run(_cfg(photos, cache, **{"teacher.cache_topk": 3, "teacher.checkpoint": str(other)}))
    with pytest.raises(UserInputError, match="missing"):
        prepare_run(_cfg(photos, tmp_path / "nothing", **{"teacher.cache_topk": 3}))


def test_train_with_crop_cache_end_to_end(photos, built, capsys):
    overrides = _overrides(photos, built[3], **{"teacher.cache_topk": 3, "experiment.name": "cached"})
    assert main(["train", str(photos / "empty.yaml"), *overrides]) == 0
    assert "top1 last" in capsys.readouterr().out
    records = [json.loads(line) for line in (photos / "runs" / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["data/skipped_images"] == 0 and np.isfinite(r["train/loss_kd"]) for r in records)


@pytest.mark.skipif(not dali_augment.dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_backend_replays_the_cache(photos, built):
    """data.loader=dali on a cache built through the torch backend: the same crops and cached targets reach the
    step, and the KD step (same student initialisation) gives the torch backend's losses to within the pixels'
    difference (docs/config.md, ImageNet loading: inside a crop within one level)."""
    overrides = {"teacher.cache_topk": CLASSES}
    reference = prepare_run(_cfg(photos, built[CLASSES], **overrides))
    dali = prepare_run(_cfg(photos, built[CLASSES], **overrides, **{"data.loader": "dali"}))
    a, b = next(reference.data.train.iterate(1)), next(dali.data.train.iterate(1))
    assert torch.equal(a.index, b.index) and torch.equal(a.crop, b.crop)
    assert torch.equal(a.teacher_logits, b.teacher_logits)
    losses_a, _ = _kd_losses_and_grads(reference, a)
    losses_b, _ = _kd_losses_and_grads(dali, b)
    assert losses_a.keys() == losses_b.keys()
    for name in losses_a:
        assert losses_b[name] == pytest.approx(losses_a[name], rel=2e-2), name
