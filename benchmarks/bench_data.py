"""Images/s of kdzoo's batched on-device CIFAR augmentation vs the per-image PIL pipeline
(torchvision RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize, DataLoader with 2 workers).

    python benchmarks/bench_data.py --root ../shared/data [--device cpu] [--batches 200]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kdzoo.data.cifar import CIFAR100_MEAN, CIFAR100_STD, load_cifar_split
from kdzoo.data.tensor_loader import CropFlip, TensorBatchLoader


class PilCifar(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    images, labels = load_cifar_split(args.root, "cifar100", train=True)
    n = args.batches * args.batch_size

    loader = TensorBatchLoader(images, labels, batch_size=args.batch_size, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                               device=args.device, augment=CropFlip(4), seed=0)
    it = loader.iterate(1)
    next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    if batch.image.is_cuda:
        torch.cuda.synchronize()
    ours = n / (time.perf_counter() - start)

    pil = DataLoader(PilCifar(images, labels), batch_size=args.batch_size, shuffle=True, num_workers=2,
                     pin_memory=args.device != "cpu", persistent_workers=True)
    it2 = iter(pil)
    next(it2)
    start = time.perf_counter()
    for _ in range(args.batches):
        x, _ = next(it2)
        x = x.to(args.device, non_blocking=True)
    pil_rate = n / (time.perf_counter() - start)
    print(f"`python benchmarks/bench_data.py --root {args.root} --device {args.device} --batches {args.batches}`")
    print("| pipeline | images/s |\n|---|---:|")
    print(f"| kdzoo batched tensor augmentation ({args.device}) | {ours:,.0f} |")
    print(f"| PIL + torchvision transforms, DataLoader 2 workers | {pil_rate:,.0f} |")
    print(f"| ratio | {ours / pil_rate:.1f}x |")


if __name__ == "__main__":
    main()
