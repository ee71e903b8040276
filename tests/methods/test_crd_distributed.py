"""CRD's state under DDP, two gloo processes: memory banks and Z equal those of one process running the
global batch, and every process draws its own negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdzoo
from kdzoo.types import DatasetInfo

NUM_DATA, K, BATCH = 96, 24, 8


def _distiller() -> kdzoo.methods.base.Distiller:
    torch.manual_seed(0)  # same embeddings, banks and sampler seed on every process
    distiller = kdzoo.create_distiller("crd", teacher=kdzoo.create_model("resnet8"),
                                       student=kdzoo.create_model("resnet8"), nce_k=K)
    labels = torch.randint(0, 10, (NUM_DATA,), generator=torch.Generator().manual_seed(1))
    distiller.bind_dataset(DatasetInfo(num_samples=NUM_DATA, num_classes=10, targets=labels))
    return distiller


def _inputs(step: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    pooled_s, pooled_t = torch.randn(BATCH, 64, generator=g), torch.randn(BATCH, 64, generator=g)
    index = torch.randperm(NUM_DATA, generator=g)[:BATCH]
    contrast = torch.randint(0, NUM_DATA, (BATCH, K + 1), generator=g)
    contrast[:, 0] = index
    return pooled_s, pooled_t, index, contrast


def _run(distiller, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Two steps of the CRD head; each process takes its slice of the global batch."""
    losses = []
    for step in range(2):
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        pooled_s, pooled_t, index, contrast = (t[part] for t in _inputs(step))
        loss_s, loss_t = distiller.contrast_losses(pooled_s, pooled_t, index, contrast)
        losses.append(torch.stack([loss_s, loss_t]).detach())
    drawn = distiller.sampler(torch.arange(4), K, "exact")
    return {"losses": torch.stack(losses), "normalizer": distiller.normalizer.clone(),
            "memory_student": distiller.memory_student.clone(), "memory_teacher": distiller.memory_teacher.clone(),
            "drawn": drawn}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_run(_distiller(), rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_crd_state_under_ddp_equals_one_process_with_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _run(_distiller(), 0, 1)
    for name in ("normalizer", "memory_student", "memory_teacher"):
        for result in ranks:
            torch.testing.assert_close(result[name], single[name], rtol=1e-6, atol=1e-7)
    # Each process's loss is the mean over its half; their average is the global batch's loss.
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"], rtol=1e-5, atol=0)
    # Rank 0 draws the single process's stream; rank 1 its own.
    assert torch.equal(ranks[0]["drawn"], single["drawn"])
    assert not torch.equal(ranks[1]["drawn"], ranks[0]["drawn"])
