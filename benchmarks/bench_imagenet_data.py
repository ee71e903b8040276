"""ImageNet-style loading and the crop-level teacher cache, on an ImageFolder of real JPEG photographs built from
the photos that ship with scikit-image and scikit-learn (kdzoo/data/sample_photos.py: shorter side 240-500 px,
quality 70-95, a few greyscale and CMYK files, as ImageNet has).

1. Images/s of each class-folder backend available here (RandomResizedCrop 224 + flip + normalise, batch 64):
   `torch` (PIL in DataLoader workers, the reference), `device` (workers read bytes; batched decode + crops on
   --device), `dali` (the same worker output through an NVIDIA DALI pipeline; CPU-only without a GPU).
2. A KD training step (teacher forward + student forward/backward/SGD = the compute floor) against the same step
   reading the teacher's logits from the crop-level cache (student step + the cache read), on the same batches.

    python benchmarks/bench_imagenet_data.py [--device cpu] [--images 640] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdzoo.config.loader import config_from_dict
from kdzoo.data import dali_augment
from kdzoo.data.crop_cache import CropCache
from kdzoo.data.datasets import build_data
from kdzoo.data.sample_photos import PHOTOS, build_photo_folder
from kdzoo.engine.crop_cache_build import build_crop_cache, crop_cache_key
from kdzoo.methods.losses import kd_loss
from kdzoo.models.registry import create_model


def loader_rate(root: Path, backend: str, args: argparse.Namespace) -> float:
    cfg = config_from_dict({"data": {"dataset": "imagefolder", "root": str(root), "batch_size": args.batch_size,
                                     "num_workers": args.workers, "loader": backend}})
    data = build_data(cfg.data, seed=0, device=torch.device(args.device))
    rates = []
    for epoch in range(1, args.repeats + 1):
        it = data.train.iterate(epoch)
        next(it)  # worker start-up and the first batch are not counted
        count, start = 0, time.perf_counter()
        for batch in it:
            count += len(batch.index)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def kd_steps(root: Path, args: argparse.Namespace, tmp: Path) -> tuple[float, float, float]:
    """Median s/step of the live-teacher KD step (the floor) and of the cached step, and the teacher-only time."""
    device = torch.device(args.device)
    cfg = config_from_dict({"data": {"dataset": "imagefolder", "root": str(root), "batch_size": args.kd_batch,
                                     "num_workers": args.workers, "image_size": args.kd_size}})
    data = build_data(cfg.data, seed=0, device=device)
    num_classes = data.num_classes
    torch.manual_seed(0)
    teacher = create_model(args.teacher, num_classes=num_classes).to(device).eval()
    student = create_model(args.student, num_classes=num_classes).to(device).train()
    checkpoint = tmp / "teacher.pt"
    torch.save(teacher.state_dict(), checkpoint)
    key = crop_cache_key(data.train, teacher_name=args.teacher, teacher_checkpoint=str(checkpoint),
                         dataset="imagefolder", root=str(root), num_classes=num_classes, topk=args.topk)
    build_crop_cache(teacher, data.train, key, tmp / "cache", [1], build_seed=0, progress=False)
    cached = build_data(cfg.data, seed=0, device=device)
    cached.train.replay(CropCache(tmp / "cache", key, epochs=1))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step(images, target, teacher_logits):
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = teacher(images)
        logits = student(images)
        loss = torch.nn.functional.cross_entropy(logits, target) + kd_loss(logits, teacher_logits, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    live_batches = list(data.train.iterate(1))[: args.steps + 1]
    cached_batches = list(cached.train.iterate(1))[: args.steps + 1]
    timings: dict[str, list[float]] = {"live": [], "cached": [], "teacher": []}
    for live, hit in zip(live_batches, cached_batches):  # interleaved, so drift in machine speed hits both
        for name, batch, logits in (("live", live, None), ("cached", hit, hit.teacher_logits)):
            start = time.perf_counter()
            step(batch.image, batch.target, logits)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            teacher(live.image)
        timings["teacher"].append(time.perf_counter() - start)
    return tuple(statistics.median(t[1:]) for t in (timings["live"], timings["cached"], timings["teacher"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=640, help="training JPEGs in the photo folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per backend (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", default="tv_resnet34")
    parser.add_argument("--student", default="tv_resnet18")
    parser.add_argument("--kd-batch", type=int, default=32)
    parser.add_argument("--kd-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: torch,device, and dali where it is installed)")
    parser.add_argument("--folder", default=None, help="where the photo folder is built (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        per_class = max(1, args.images // len(PHOTOS))
        root = build_photo_folder(Path(args.folder) if args.folder else tmp / "photos", train_per_class=per_class,
                                  val_per_class=2, greyscale_every=50, cmyk_every=97)
        available = ["torch", "device"] + (["dali"] if dali_augment.dali_available() else [])
        backends = args.backends.split(",") if args.backends else available
        rates = {b: loader_rate(root, b, args) for b in backends}
        live, cached, teacher_only = kd_steps(root, args, tmp)
    command = ("python benchmarks/bench_imagenet_data.py " + f"--device {args.device} --images {args.images} "
               f"--threads {args.threads} --repeats {args.repeats} --steps {args.steps}")
    print(f"`{command}` — {per_class * len(PHOTOS)} JPEGs, {torch.get_num_threads()} threads, {args.workers} "
          f"workers, torch {torch.__version__}, {platform.machine()}")
    print()
    print(f"| class-folder backend (RandomResizedCrop 224 + flip, batch {args.batch_size}) | images/s | × torch |")
    print("|---|---:|---:|")
    for backend, rate in rates.items():
        print(f"| `{backend}` on {args.device} | {rate:,.0f} | {rate / rates['torch']:.2f} |")
    print()
    print(f"| KD step, {args.teacher} → {args.student}, batch {args.kd_batch} at {args.kd_size} px, top-{args.topk} "
          "| s/step (median) | × floor |")
    print("|---|---:|---:|")
    print(f"| floor: live teacher forward + student step | {live:.3f} | 1.00 |")
    print(f"| teacher forward alone | {teacher_only:.3f} | {teacher_only / live:.2f} |")
    print(f"| student step with the crop-level cache's logits | {cached:.3f} | {cached / live:.2f} |")
    print(f"| speed-up of the step | {live / cached:.2f}× | |")


if __name__ == "__main__":
    main()
