"""SemCKD — Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021, arXiv 2012.03236
(docs/methods/semckd.md). Reference: DefangChen/SimKD ``models/util.py SelfA/MLPEmbed/Proj``,
``distiller_zoo/SemCKD.py SemCKDLoss`` and ``helper/loops.py`` (branch ``semckd``, plus CE + KD(T=4)).

Every student stage attends over every teacher stage. The attention logits come from per-stage MLP embeddings
of the batch Gram matrix ``F F^T`` [B, B], so the MLPs' input width *is* the batch size: the reference builds
them for ``--batch_size`` and skips smaller batches. Here the width is the distiller's ``batch_size`` (the trainer
passes ``data.batch_size``, per process under DDP, so it is never stated twice) and the loader drops the last
short batch (``needs_fixed_batch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, ce_and_kd
from kdzoo.methods.projectors import bottleneck_projector
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class SemCKDConfig:
    semckd_weight: float = 400.0  # SimKD scripts/run_distill.sh -b 400
    ce_weight: float = 1.0  # SimKD -c 1
    kd_weight: float = 1.0  # SimKD -d 1
    temperature: float = 4.0  # SimKD --kd_T 4
    attention_temperature: float = 1.0  # SimKD train_student.py -s/--soft 1.0 (energy is divided by it)
    embed_factor: int = 4  # SimKD SelfA(factor=4): MLP output width = batch_size // 4


class GramEmbedding(nn.Module):
    """SimKD ``MLPEmbed``: Linear(B, 2d) - ReLU - Linear(2d, d) - L2 normalisation. The reference's unused
    ``regressor`` Sequential (never called, never gets a gradient) is left out."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, gram: Tensor) -> Tensor:
        out = self.linear2(F.relu(self.linear1(gram)))
        return out / out.norm(dim=1, keepdim=True)  # SimKD ``Normalize``: no epsilon


def batch_gram(feature_map: Tensor) -> Tensor:
    """[B, B] inner products of the flattened per-sample maps, in fp32 (docs/design.md)."""
    flat = at_least_fp32(feature_map.flatten(1))
    return flat @ flat.t()


@register_method("semckd")
class SemCKD(Distiller):
    Config = SemCKDConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)
    needs_fixed_batch_size = True

    def build(self) -> None:
        cfg = self.cfg
        s_channels = [f.shape[1] for f in self.probe_student().feats[1:]]
        t_channels = [f.shape[1] for f in self.probe_teacher().feats[1:]]
        if self.batch_size is None:
            raise UserInputError("semckd sizes its attention MLPs by the training batch: pass batch_size= (the "
                                 "trainer passes data.batch_size; SimKD's recipe uses 64)")
        embed_dim = self.batch_size // cfg.embed_factor
        if embed_dim < 1:
            raise UserInputError(f"semckd: data.batch_size {self.batch_size} is smaller than method.embed_factor "
                                 f"{cfg.embed_factor}")
        # Registration order = SimKD SelfA's: queries, keys, then the (student i, teacher j) heads row by row.
        self.queries = nn.ModuleList(GramEmbedding(self.batch_size, embed_dim) for _ in s_channels)
        self.keys = nn.ModuleList(GramEmbedding(self.batch_size, embed_dim) for _ in t_channels)
        # SimKD repository's ``Proj``: bottleneck width 2 C_t, no BN + ReLU after the last conv.
        self.projections = nn.ModuleList(bottleneck_projector(c_s, 2 * c_t, c_t, final_bn_relu=False)
                                         for c_s in s_channels for c_t in t_channels)

    def attention(self, s_maps: list[Tensor], t_maps: list[Tensor]) -> Tensor:
        """[B, n_s, n_t] softmax over teacher stages of query_i . key_j. Runs in fp32 with autocast off: Gram
        entries are sums over C*H*W products and overflow fp16 (docs/design.md)."""
        with torch.autocast(s_maps[0].device.type, enabled=False):
            # query [B, n_s, d], key [B, d, n_t]
            query = torch.stack([q(batch_gram(f)) for q, f in zip(self.queries, s_maps, strict=True)], dim=1)
            key = torch.stack([k(batch_gram(f)) for k, f in zip(self.keys, t_maps, strict=True)], dim=2)
            return F.softmax(torch.bmm(query, key) / self.cfg.attention_temperature, dim=-1)

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        s_maps, t_maps = student.feats[1:], teacher.feats[1:]
        batch_size = s_maps[0].shape[0]
        if batch_size != self.batch_size:
            raise UserInputError(
                f"semckd's attention MLPs were built for batches of {self.batch_size} (data.batch_size) but got "
                f"{batch_size}: every batch must have that size (the trainer drops the last short one)")
        losses = ce_and_kd(student.logits, teacher.logits, batch.target, cfg.ce_weight, cfg.kd_weight, cfg.temperature)

        attention = self.attention(s_maps, t_maps)

        # SimKD pools whichever map of a pair is larger down to the other's size; pool each map once per size.
        pooled: dict[tuple[str, int, tuple[int, int]], Tensor] = {}

        def resized(side: str, index: int, fmap: Tensor, size: tuple[int, int]) -> Tensor:
            if tuple(fmap.shape[-2:]) == size:
                return fmap
            key_ = (side, index, size)
            if key_ not in pooled:
                pooled[key_] = F.adaptive_avg_pool2d(fmap, size)
            return pooled[key_]

        pair_losses = []
        heads = iter(self.projections)
        for i, s_map in enumerate(s_maps):
            for j, t_map in enumerate(t_maps):
                s_size, t_size = tuple(s_map.shape[-2:]), tuple(t_map.shape[-2:])
                size = t_size if s_size[0] > t_size[0] else s_size
                source, target = resized("s", i, s_map, size), resized("t", j, t_map, size)
                diff = at_least_fp32(next(heads)(source)) - at_least_fp32(target)
                pair_losses.append(diff.pow(2).flatten(1).mean(dim=1))  # per-sample MSE over C, H, W
        pair_loss = torch.stack(pair_losses, dim=1).view_as(attention)  # [B, n_s, n_t], row-major as the heads
        loss = (attention * pair_loss).sum() / (batch_size * len(s_maps))
        losses["loss_semckd"] = cfg.semckd_weight * loss
        return losses
