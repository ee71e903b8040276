"""CRD — Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv 1910.10699
(docs/methods/crd.md). Reference: RepDistiller ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``,
``Embed``), ``crd/memory.py`` (``ContrastMemory``) and the negatives of ``dataset/cifar100.py``
(``CIFAR100InstanceSample``). Differences that do not change the math: negatives are drawn here, on
the batch's device, instead of in the data loader; the scores come from one [N, B] product instead of
gathering B x (K+1) x 128 memory rows whenever that is smaller; the whole head runs in fp32."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdzoo import collectives
from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, DatasetInfo, Progress

NCE_EPS = 1e-7  # RepDistiller crd/criterion.py eps
MODES = {"exact": "exact", "relax": "relax", "relaxed": "relax"}


@dataclass
class CRDConfig:
    ce_weight: float = 1.0  # RepDistiller scripts/run_cifar_distill.sh -r 1
    kd_weight: float = 0.0  # RepDistiller -a 0 (CRD+KD: -a 1)
    feat_weight: float = 0.8  # RepDistiller -b 0.8 (mdistiller CRD.LOSS.FEAT_WEIGHT 0.8)
    temperature: float = 4.0  # RepDistiller --kd_T 4; KD term only, used when kd_weight > 0
    feat_dim: int = 128  # RepDistiller --feat_dim 128
    nce_k: int = 16384  # RepDistiller --nce_k 16384 negatives per sample
    nce_t: float = 0.07  # RepDistiller --nce_t 0.07
    nce_momentum: float = 0.5  # RepDistiller --nce_m 0.5 (memory-bank momentum)
    mode: str = "exact"  # RepDistiller --mode exact ("relax"/"relaxed": positive = random same-class sample)
    num_data: int | None = None  # RepDistiller n_data = len(train_set); None: taken from bind_dataset


def _uniform_below(bound: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Independent uniform integers in [0, bound) (``bound`` broadcasts to ``shape``); 62-bit draws
    reduced modulo bound, so the bias is below bound / 2^62."""
    raw = torch.randint(0, 2**62, shape, generator=generator, device=bound.device)
    return raw % bound


def first_distinct(draws: Tensor, k: int, num_values: int) -> Tensor:
    """The first ``k`` distinct values of every row of ``draws`` (values in [0, num_values)), in draw order;
    each row must hold at least ``k`` distinct values. Rows of iid uniform draws give uniform k-subsets.

    Vectorised two ways with the same result: a [rows, num_values] table of each value's first draw
    position (``scatter_reduce`` amin, one pass; used when the table is at most 4x the draws, as for
    CIFAR's 16,384 of ~50,000), or a stable sort of every row (ImageNet: 16,384 of 1.28M)."""
    rows, length = draws.shape
    position = torch.arange(length, device=draws.device).expand(rows, length)
    if num_values <= 4 * length:
        first = torch.full((rows, num_values), length, dtype=torch.long, device=draws.device)
        first.scatter_reduce_(1, draws, position, reduce="amin")
        is_first = first.gather(1, draws) == position
        rank = is_first.cumsum(1) - 1
        # The first k go to their rank; every other draw to its own spare column (no duplicate targets,
        # so the scatter is deterministic on every device).
        slot = torch.where(is_first & (rank < k), rank, k + position)
        out = torch.empty((rows, k + length), dtype=draws.dtype, device=draws.device)
        return out.scatter_(1, slot, draws)[:, :k]
    # A stable sort groups equal values and keeps draw order within a group, so the first of each group is
    # that value's first occurrence and ``perm`` holds its draw position.
    values, perm = draws.sort(dim=1, stable=True)
    is_first = torch.ones_like(values, dtype=torch.bool)
    is_first[:, 1:] = values[:, 1:] != values[:, :-1]
    # The k earliest first occurrences (repeats ranked behind all of them), in draw order.
    earliest = torch.where(is_first, perm, perm + length).topk(k, dim=1, largest=False).values % length
    return draws.gather(1, earliest)


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over their sequence): neighbouring inputs give
    unrelated seeds, so streams of consecutive calls or ranks do not overlap in structure."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & mask
        state ^= state >> 29
    return state >> 1


class ContrastSampler(nn.Module):
    """Draws RepDistiller's contrast indices: column 0 the positive (the sample itself in ``exact`` mode,
    a random sample of its class in ``relax`` mode), then K negatives from the other classes, distinct
    when K <= #negatives (``np.random.choice(..., replace=False)``), independent otherwise.

    Batched on the batch's device. Call n of process r draws from a generator seeded with a hash of
    (seed, n, r): the stream depends on nothing else, so a checkpoint needs only (seed, n) to resume it
    exactly, on any device, and under DDP every process draws its own negatives (RepDistiller's data-loader
    workers draw independently too)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self.calls = 0
        self.dedupe_draws: int | None = None
        self.some_need_replacement = False
        for name in ("class_order", "class_start", "class_count", "sample_class"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def bound(self) -> bool:
        return self.sample_class.numel() > 0

    def bind(self, targets: Tensor, num_classes: int, k: int, device: torch.device) -> None:
        targets = targets.to(torch.long).cpu()
        count = torch.bincount(targets, minlength=num_classes)
        self.sample_class = targets.to(device)
        # Class-sorted order: the negatives of class c are this order without c's block.
        self.class_order = torch.argsort(targets, stable=True).to(device)
        self.class_count = count.to(device)
        self.class_start = (count.cumsum(0) - count).to(device)
        # Without replacement, draw iid and keep the first k distinct values of each row (a uniform
        # k-subset). Size the draw for the hardest row: mean + 12 sd of the draws that k distinct values
        # need. When that exceeds the negatives themselves, random keys over all of them are cheaper.
        num_negatives = targets.numel() - count
        self.some_need_replacement = bool((num_negatives < k).any())
        feasible = num_negatives[num_negatives >= k]
        self.dedupe_draws = None
        if feasible.numel() and k > 0:
            n = float(feasible.min())
            hit = (n - torch.arange(k, dtype=torch.float64)) / n
            draws = (1 / hit).sum() + 12 * ((1 - hit) / hit**2).sum().sqrt() + 64
            if draws < float(num_negatives.max()):
                self.dedupe_draws = int(draws)

    def _rng(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(_mix_seed(self.seed, self.calls, collectives.rank()))
        return generator

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def _distinct(self, bound: Tensor, k: int, gen: torch.Generator) -> Tensor:
        """[B, k] values, row b a uniform k-subset of [0, bound_b) (rows with bound_b < k: unspecified)."""
        rows = bound.shape[0]
        if self.dedupe_draws is not None:
            draws = _uniform_below(bound[:, None], (rows, self.dedupe_draws), gen)
            return first_distinct(draws, k, int(self.class_order.numel()))
        width = int(self.class_order.numel())
        if k > width:  # every row has fewer than k negatives: all are drawn with replacement by the caller
            return torch.zeros((rows, k), dtype=torch.long, device=bound.device)
        keys = torch.rand((rows, width), generator=gen, device=bound.device, dtype=torch.float64)
        keys = keys.masked_fill(torch.arange(width, device=bound.device) >= bound[:, None], 2.0)
        return keys.topk(k, dim=1, largest=False).indices

    def forward(self, index: Tensor, k: int, mode: str) -> Tensor:
        """[B, k+1] dataset indices for the samples ``index``."""
        gen = self._rng(index.device)
        self.calls += 1
        label = self.sample_class[index]
        count, start = self.class_count[label], self.class_start[label]
        num_negatives = self.class_order.numel() - count
        rank = self._distinct(num_negatives, k, gen)
        if self.some_need_replacement:  # RepDistiller: replace = k > len(cls_negative[target]), per sample
            iid = _uniform_below(num_negatives[:, None], (index.shape[0], k), gen)
            rank = torch.where((num_negatives < k)[:, None], iid, rank)
        # Rank r among the negatives -> position in class-sorted order, skipping the sample's class block.
        negatives = self.class_order[rank + count[:, None] * (rank >= start[:, None])]
        positive = index
        if mode == "relax":  # a random sample of the anchor's class (RepDistiller mode='relax')
            positive = self.class_order[start + _uniform_below(count, (index.shape[0],), gen)]
        return torch.cat([positive[:, None], negatives], dim=1)


def _l2_normalize(x: Tensor) -> Tensor:
    return x / x.pow(2).sum(1, keepdim=True).sqrt()  # RepDistiller Normalize(2): no eps


def nce_loss(probs: Tensor, num_data: int) -> Tensor:
    """Paper Eq. 18 with noise P_n = 1/N: -(1/B)[Σ log P_0/(P_0 + K P_n) + Σ log K P_n/(P_k + K P_n)]."""
    noise = (probs.shape[1] - 1) / num_data
    log_pos = torch.log(probs[:, 0]) - torch.log(probs[:, 0] + noise + NCE_EPS)
    log_neg = math.log(noise) - torch.log(probs[:, 1:] + noise + NCE_EPS)
    return -(log_pos.sum() + log_neg.sum()) / probs.shape[0]


@register_method("crd")
class CRD(Distiller):
    Config = CRDConfig
    teacher_taps = ("pooled",)
    student_taps = ("pooled",)
    # The banks and Z stay equal across processes through the all-gather below; the sampler's tables are
    # built from the dataset labels, the same on every process.
    self_synchronised_buffers = ("memory_student", "memory_teacher", "normalizer", "sampler.class_order",
                                 "sampler.class_start", "sampler.class_count", "sampler.sample_class")

    def build(self) -> None:
        cfg = self.cfg
        if cfg.mode not in MODES:
            raise UserInputError(f"crd mode must be one of {sorted(MODES)}, got {cfg.mode!r}")
        self.mode = MODES[cfg.mode]
        student_dim, teacher_dim = self.probe_student().pooled.shape[1], self.probe_teacher().pooled.shape[1]
        # Both embeddings are trainable (RepDistiller adds embed_s and embed_t to its optimiser).
        self.embed_student = nn.Linear(student_dim, cfg.feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, cfg.feat_dim)
        # Banks of unit vectors keyed by dataset index (RepDistiller memory_v1 = student side, memory_v2 = teacher
        # side).
        self.register_buffer("memory_student", torch.zeros(0, cfg.feat_dim))
        self.register_buffer("memory_teacher", torch.zeros(0, cfg.feat_dim))
        # (Z_s, Z_t), RepDistiller params[2:4]: -1 = unset, fixed by the first batch, then frozen.
        self.register_buffer("normalizer", torch.full((2,), -1.0))
        if cfg.num_data is not None:
            self._init_memory(cfg.num_data)
        # Seeded from the global generator after RepDistiller's construction order (embeddings, then banks).
        self.sampler = ContrastSampler(seed=int(torch.randint(0, 2**62, ()).item()))

    def _init_memory(self, num_data: int) -> None:
        # RepDistiller ContrastMemory: U(-a, a), a = 1/sqrt(feat_dim/3) (unit expected norm), student bank first.
        device, dim = self.memory_student.device, self.cfg.feat_dim
        stdv = 1.0 / math.sqrt(dim / 3)
        self.memory_student = torch.rand(num_data, dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.memory_teacher = torch.rand(num_data, dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.normalizer.fill_(-1.0)

    def bind_dataset(self, info: DatasetInfo) -> None:
        if self.cfg.num_data is not None and self.cfg.num_data != info.num_samples:
            raise UserInputError(
                f"crd num_data={self.cfg.num_data}, but the training set has {info.num_samples} samples"
            )
        if self.memory_student.shape[0] != info.num_samples:
            self._init_memory(info.num_samples)
        self.sampler.bind(info.targets, info.num_classes, self.cfg.nce_k, self.memory_student.device)

    def _scores(self, memory: Tensor, contrast_index: Tensor, anchor: Tensor) -> Tensor:
        """memory[contrast_index[b, k]] · anchor[b], shape [B, K+1]."""
        if memory.shape[0] <= contrast_index.numel():
            # One [N, B] product, then pick; the snapshot keeps the graph valid across the in-place
            # memory update that follows in this same step.
            return (memory.clone() @ anchor.T).gather(0, contrast_index.T).T
        rows = memory[contrast_index]  # advanced indexing copies, as RepDistiller's index_select
        return torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)

    def contrast_losses(self, student_pooled: Tensor, teacher_pooled: Tensor, index: Tensor,
                        contrast_index: Tensor) -> tuple[Tensor, Tensor]:
        """Unweighted (student-anchor, teacher-anchor) NCE losses; updates Z (first call) and both banks."""
        cfg, num_data = self.cfg, self.memory_student.shape[0]
        if num_data == 0:
            raise UserInputError("crd needs the training-set size: pass num_data= or call bind_dataset()")
        # exp(1/0.07) ~ 1.6e6 overflows fp16: embeddings, scores, loss and memory stay in fp32.
        with torch.autocast(device_type=student_pooled.device.type, enabled=False):
            v_s = _l2_normalize(self.embed_student(student_pooled.flatten(1).float()))
            v_t = _l2_normalize(self.embed_teacher(teacher_pooled.flatten(1).float()))
            # Each anchor is scored against the other side's bank (RepDistiller out_v1 / out_v2).
            out_s = torch.exp(self._scores(self.memory_teacher.float(), contrast_index, v_s) / cfg.nce_t)
            out_t = torch.exp(self._scores(self.memory_student.float(), contrast_index, v_t) / cfg.nce_t)
            with torch.no_grad():  # Z = mean(exp) * N from the first batch only, a constant for the loss
                # Under DDP: the mean over every process's batch, as one process with the global batch.
                first = collectives.average(torch.stack([out_s.mean(), out_t.mean()])) * num_data
                self.normalizer.copy_(torch.where(self.normalizer < 0, first, self.normalizer))
            z = self.normalizer.clone()
            loss_s = nce_loss(out_s / z[0], num_data)
            loss_t = nce_loss(out_t / z[1], num_data)
            self._update_memory(index, v_s, v_t)
        return loss_s, loss_t

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        # RepDistiller: rows of the batch's own samples <- normalize(m * row + (1 - m) * v), after scoring.
        # Under DDP every process applies every process's rows, so the banks stay identical on all of them
        # and equal to one process's with the global batch.
        m = self.cfg.nce_momentum
        index, v_s, v_t = (collectives.gather_cat(t) for t in (index, v_s.detach(), v_t.detach()))
        # A sample can appear twice in the gathered batch (the last batches of an epoch are padded so that
        # every process gets as many as the others). index_copy_ with repeated indices keeps an arbitrary
        # one on GPUs, which would let the processes' banks drift apart: every copy writes the row of the
        # sample's last occurrence instead. Without repeats this selects every row as it is.
        position = torch.arange(index.shape[0], device=index.device)
        last = torch.full((self.memory_student.shape[0],), -1, dtype=torch.long, device=index.device)
        last = last.scatter_reduce_(0, index, position, reduce="amax")[index]
        for bank, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = bank.index_select(0, index).float().mul_(m).add_(v.detach() * (1 - m))
            bank.index_copy_(0, index, _l2_normalize(rows)[last].to(bank.dtype))

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None and student.pooled is not None and teacher.pooled is not None
        cfg = self.cfg
        if batch.index is None:
            raise UserInputError("crd needs the dataset index of every sample (Batch.index)")
        index = batch.index.to(device=student.pooled.device, dtype=torch.long)
        contrast_index = batch.contrast_index
        if contrast_index is None:
            if not self.sampler.bound:
                raise UserInputError("crd draws its negatives from the dataset labels: call bind_dataset() first")
            contrast_index = self.sampler(index, cfg.nce_k, self.mode)
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        loss_s, loss_t = self.contrast_losses(student.pooled, teacher.pooled, index, contrast_index.to(index.device))
        losses["loss_crd"] = cfg.feat_weight * (loss_s + loss_t)
        return losses
