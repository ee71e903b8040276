"""ReviewKD — Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, arXiv 2104.09044
(docs/methods/reviewkd.md). Reference: mdistiller ``distillers/ReviewKD.py`` (``ReviewKD``, ``ABF``, ``hcl_loss``).

Student levels (the last stages + the pooled vector as a 1x1 map) are fused deep -> shallow by attention-based
fusion (ABF) modules; every fused output is compared with the teacher's pre-ReLU stage map (or pooled vector)
of the same level by the hierarchical context loss. Level sizes are read from the tensors at run time (the
reference's SHAPES / OUT_SHAPES / IN_CHANNELS / OUT_CHANNELS config lists are what the probes give).

Detection (mdistiller ``detection/model/reviewkd.py`` and ``rcnn.py``, ``KD.TYPE: ReviewKD``): the student's FPN
levels (p2..p6, torchvision's ``'0'..'3', 'pool'``) are the levels, fused deep -> shallow by the same ABF chain (``in``,
``mid`` and ``out`` channels there all 256 = the FPN width; here read from the two FPNs, mid = ``min(max_mid_channel,
in channels of the deepest level)``, 256 too) and compared with the teacher's FPN levels of the same index by the same
HCL (MSE plus 4x4 / 2x2 / 1x1 pools smaller than the map, weights 1, 1/2, 1/4, 1/8 normalised; levels summed), times
``REVIEWKD.LOSS_WEIGHT`` and added to the detector's own losses, with no warm-up and no pooled-vector level. Per-pair
weights are in mdistiller's ``detection/configs/ReviewKD/*.yaml`` (R18-R101 1.2, R50-R101 1.0, MV2-R50 2.0): recipes
set ``reviewkd_weight`` and ``warmup_epochs: 0``. mdistiller's ABF there resizes the residual to the student level's
own size; this ABF resizes the fused level to the teacher level's size, a no-op when both detectors resize the images
alike (Detectron2 resizes in the data loader, so there they always agree).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, cross_entropy, warmup_factor
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import FeatureExtractor, Outputs
from kdzoo.types import CLASSIFICATION, DETECTION, Batch, Progress


@dataclass
class ReviewKDConfig:
    # mdistiller configs/cifar100/reviewkd.yaml REVIEWKD.REVIEWKD_WEIGHT (cfg.py default 1.0)
    reviewkd_weight: float = 5.0
    warmup_epochs: int = 20  # mdistiller REVIEWKD.WARMUP_EPOCHS, 1-based epoch (ImageNet: 1)
    # mdistiller ReviewKD.py: mid = min(512, in_channels[-1]) (cfg MAX_MID_CHANNEL is ignored)
    max_mid_channel: int = 512
    student_preact: bool = False  # mdistiller REVIEWKD.STU_PREACT (CIFAR False, ImageNet True); unused on detection
    ce_weight: float = 1.0  # mdistiller REVIEWKD.CE_WEIGHT


class ABF(nn.Module):
    """mdistiller ``ABF``: 1x1 conv+BN to the mid width, attention fusion with the deeper level's residual (all but
    the deepest level), 3x3 conv+BN to the teacher's width. Returns (output, residual for the next level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        if x.device.type == "cpu":
            # The chain runs in NHWC on CPU (a no-op under runtime.channels_last): there oneDNN's convolutions,
            # BatchNorm and the fusion's broadcasts over C all stream contiguous channel rows (and a materialised
            # nearest upscale is ~10x faster). Measured on the resnet32x4 -> resnet8x4 bench levels (batch 64, 2
            # threads), the NCHW chain's forward + backward took ~1.3x as long. Same values up to fp32 rounding.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            x = self.fuse(x, residual)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x

    def fuse(self, x: Tensor, residual: Tensor) -> Tensor:
        """mdistiller's attention fusion, ``r = interpolate(residual, x's size, "nearest")``,
        ``w = sigmoid(att_conv(cat([x, r])))``, ``x * w[:, 0:1] + r * w[:, 1:2]``, computed without materialising
        ``r`` or the concatenation (same values up to fp32 summation order; see :class:`_AttentionFusion`)."""
        height, width = x.shape[-2:]
        r_height, r_width = residual.shape[-2:]
        if not (_exact_nearest_factor(r_height, height) and _exact_nearest_factor(r_width, width)):
            residual = F.interpolate(residual, size=(height, width), mode="nearest")  # mdistiller's op, materialised
        conv = self.att_conv[0]
        # In x's dtype, as the conv would run: under autocast x is half precision and the weights are cast to it.
        weight, bias = conv.weight.view(2, -1).to(x.dtype), conv.bias.to(x.dtype)
        return _AttentionFusion.apply(x, residual.to(x.dtype), weight, bias)


class _AttentionFusion(torch.autograd.Function):
    """``fused = x * w0 + up(r) * w1``, ``[w0, w1] = sigmoid(W_x x + W_r up(r) + b)`` (mdistiller ``ABF.forward``,
    the 1x1 ``att_conv`` over ``cat([x, up(r)])`` split into its two halves), ``up`` a nearest upscale by an
    integer factor f (``_exact_nearest_factor``; f = 1 when the caller materialised it), with a hand-written
    backward. On CPU the fusion's elementwise work, not its 2-channel conv, had cost as much as the 3x3 conv
    after it, mostly in fresh full-size temporaries and in reductions over [B, C, h, f, w, f] views:

    - a nearest upscale repeats every residual pixel f x f times, so the residual is broadcast over a
      [B, C, h, f, w, f] view of ``x`` instead of being copied to full size; ``W_r`` commutes with the
      upscale, so its half of the conv runs at the residual's (small) size;
    - the 2-output-channel 1x1 conv runs as a batched matmul, several times faster than the conv kernels;
    - autograd of that formulation allocates one full-size tensor per broadcast product and sums the residual's
      gradient over the f x f blocks through a 6-d reduction; here one scratch buffer is reused for the three
      products (dx's own memory), the block sums are ``avg_pool2d(divisor_override=1)``, and the logits'
      contribution to dx is added in place (``baddbmm_`` / ``addmm_``) instead of through an extra full-size sum.

    The forward is the plain formulation's, op for op (bit-identical); the backward is its exact derivative, in
    another summation order. Not twice differentiable (no method differentiates ReviewKD's loss twice)."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        batch, channels, height, width = x.shape
        fine, coarse = _fusion_views(x, residual)
        logits_x = torch.bmm(weight[:, :channels].expand(batch, 2, channels), x.flatten(2))
        logits_r = torch.bmm(weight[:, channels:].expand(batch, 2, channels), residual.flatten(2))
        weights = torch.sigmoid(logits_x.view(fine) + logits_r.view(coarse) + bias.view(1, 2, 1, 1, 1, 1))
        fused = torch.mul(x.view(fine), weights[:, 0:1])  # x's layout: under channels_last the views stay free
        fused.addcmul_(residual.view(coarse), weights[:, 1:2])
        ctx.save_for_backward(x, residual, weight, weights)
        return fused.reshape(batch, channels, height, width)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        x, residual, weight, weights = ctx.saved_tensors
        batch, channels, height, width = x.shape
        r_height, r_width = residual.shape[-2:]
        fine, coarse = _fusion_views(x, residual)
        grad = grad.to(x.dtype).view(fine)
        w0, w1 = weights[:, 0:1], weights[:, 1:2]
        # dx's memory is the scratch for the three products below, then receives dx itself: no other full-size
        # allocation (on CPU each fresh one is paid again in page faults).
        grad_x = torch.empty_like(x, memory_format=_dense_format(x))
        scratch = grad_x.view(fine)
        grad_w0 = torch.mul(grad, x.view(fine), out=scratch).sum(1, keepdim=True)
        grad_w1 = torch.mul(grad, residual.view(coarse), out=scratch).sum(1, keepdim=True)
        grad_logits = torch.cat([grad_w0, grad_w1], 1).mul_(weights * (1 - weights))  # sigmoid' [B, 2, h, f, w, f]
        grad_lx = grad_logits.view(batch, 2, height * width)
        grad_lr = grad_logits.sum((3, 5)).view(batch, 2, r_height * r_width)
        # d/dr of up(r) * w1: the f x f block sums of grad * w1.
        block = torch.mul(grad, w1, out=scratch).view(batch, channels, height, width)
        factor = (height // r_height, width // r_width)
        # (f = 1: a copy, as the scratch is overwritten by dx next)
        grad_r = F.avg_pool2d(block, factor, divisor_override=1) if factor != (1, 1) else block.clone()
        grad_r = _add_rank2(_dense(grad_r), grad_lr, weight[:, channels:])
        torch.mul(grad, w0, out=scratch)
        grad_x = _add_rank2(grad_x, grad_lx, weight[:, :channels])
        grad_weight = torch.cat([torch.bmm(grad_lx, x.flatten(2).mT).sum(0),
                                 torch.bmm(grad_lr, residual.flatten(2).mT).sum(0)], 1)
        return grad_x, grad_r, grad_weight, grad_logits.sum((0, 2, 3, 4, 5))


def _fusion_views(x: Tensor, residual: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes viewing x's pixels grouped by the residual's ([B, C, h, f, w, f]) and the residual broadcast over
    the groups ([B, C, h, 1, w, 1]); splitting dimensions is a view whatever the layout."""
    batch, _, height, width = x.shape
    r_height, r_width = residual.shape[-2:]
    return (batch, -1, r_height, height // r_height, r_width, width // r_width), (batch, -1, r_height, 1, r_width, 1)


def _dense_format(x: Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _dense(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=_dense_format(x))


def _add_rank2(out: Tensor, coeff: Tensor, weight: Tensor) -> Tensor:
    """``out[b, c, p] += sum_k weight[k, c] coeff[b, k, p]`` in place, for ``out`` [B, C, H, W] dense in NCHW or
    NHWC (``_dense``), ``coeff`` [B, 2, H*W], ``weight`` [2, C]: one gemm over the layout's own matrix view
    (a batched matmul into a transposed NHWC view ran tens of times slower)."""
    batch, channels = out.shape[:2]
    if out.is_contiguous():
        out.view(batch, channels, -1).baddbmm_(weight.mT.expand(batch, channels, 2), coeff)
    else:
        out.permute(0, 2, 3, 1).view(-1, channels).addmm_(coeff.mT.reshape(-1, 2), weight)
    return out


def _exact_nearest_factor(size_in: int, size_out: int) -> bool:
    """Whether ``interpolate(mode="nearest")`` from ``size_in`` to ``size_out`` repeats every input pixel
    ``size_out // size_in`` times: an integer factor whose reciprocal is exact in fp32 (a power of two, so that
    the kernel's ``floor(i * (size_in / size_out))`` is ``i // factor``), or a single input pixel."""
    if size_out % size_in:
        return False
    factor = size_out // size_in
    return size_in == 1 or factor & (factor - 1) == 0


def hcl_terms(student_levels: Sequence[Tensor], teacher_levels: Sequence[Tensor]) -> list[Tensor]:
    """mdistiller ``hcl_loss`` per level: MSE plus MSEs of 4x4 / 2x2 / 1x1 average pools (those smaller than the map),
    weighted 1/2, 1/4, 1/8 in order of use, divided by the sum of the weights."""
    terms = []
    for s, t in zip(student_levels, teacher_levels):
        s, t = at_least_fp32(s), at_least_fp32(t)
        loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
        sizes = [size for size in (4, 2, 1) if size < s.shape[2]]
        for pooled_s, pooled_t in zip(_pool_pyramid(s, sizes), _pool_pyramid(t, sizes), strict=True):
            weight /= 2.0
            loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
            total += weight
        terms.append(loss / total)
    return terms


def _pool_pyramid(x: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """``adaptive_avg_pool2d(x, size)`` for decreasing ``sizes``. Where the windows nest (the map divides into
    equal blocks), a coarser level is the average of the finer one, so it is pooled from that small map instead
    of from ``x`` again: one pass over the full map forward, one backward, instead of one per size."""
    pooled, source = [], x
    for size in sizes:
        nested = source.shape[2] % size == 0 and source.shape[3] % size == 0
        out = F.adaptive_avg_pool2d(source if nested else x, size)
        if nested:  # exact block means of x: a valid source for every size that divides it
            source = out
        pooled.append(out)
    return pooled


def probe_fpn_levels(detector: nn.Module) -> OrderedDict[str, torch.Size]:
    """The shapes of a detector's FPN levels (name -> [1, C, H, W]) from one eval-mode, no-grad pass of its
    ``backbone`` (body + FPN, torchvision's ``BackboneWithFPN``) over a zero 64x64 image: what the detection build
    paths size their modules by (eval mode, so no BatchNorm statistic moves)."""
    backbone = getattr(detector, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise UserInputError(f"{type(detector).__name__} has no FPN backbone to distil")
    param = next(detector.parameters())
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            levels = backbone(torch.zeros(1, 3, 64, 64, device=param.device, dtype=param.dtype))
    finally:
        backbone.train(was_training)
    if isinstance(levels, Tensor):
        levels = OrderedDict([("0", levels)])
    return OrderedDict((name, level.shape) for name, level in levels.items())


def drop_taps(distiller: Distiller) -> None:
    """Unhook both feature extractors: on detection the methods read the opened-up forward
    (``Outputs.detector``), so no tap needs to record anything."""
    distiller.student_extractor.remove()
    distiller.student_taps = ()
    distiller.student_extractor = FeatureExtractor(distiller.student, ())
    if distiller.teacher_extractor is not None:
        distiller.teacher_extractor.remove()
        distiller.teacher_taps = ()
        distiller.teacher_extractor = FeatureExtractor(distiller.teacher, ())


def _levels(maps: Sequence[Tensor], pooled: Tensor) -> list[Tensor]:
    return [*maps, pooled[:, :, None, None]]


@register_method("reviewkd")
class ReviewKD(Distiller):
    supported_tasks = (CLASSIFICATION, DETECTION)
    Config = ReviewKDConfig
    teacher_taps = ("preact", "pooled")
    student_taps = ("feats", "pooled")

    def build(self) -> None:
        if self.task.name == DETECTION:
            self.build_detection()
            return
        if self.cfg.student_preact:  # mdistiller's ImageNet recipes read the student's pre-ReLU maps
            self.student_extractor.remove()
            self.student_taps = ("preact", "pooled")
            self.student_extractor = FeatureExtractor(self.student, self.student_taps)
        teacher_levels = self.teacher_levels(self.probe_teacher())
        student_levels = self.student_levels(self.probe_student(), len(teacher_levels))
        in_channels = [f.shape[1] for f in student_levels]
        mid_channels = min(self.cfg.max_mid_channel, in_channels[-1])
        count = len(in_channels)
        # Built shallow -> deep as mdistiller does (same RNG draws), stored deepest first (mdistiller's ``abfs[::-1]``).
        abfs = [ABF(c_in, mid_channels, t.shape[1], fuse=i < count - 1)
                for i, (c_in, t) in enumerate(zip(in_channels, teacher_levels))]
        self.abfs = nn.ModuleList(abfs[::-1])

    def build_detection(self) -> None:
        """mdistiller ``detection/model/reviewkd.py`` ``build_kd_trans``: one ABF per FPN level, fusion on all but the
        deepest, built shallow -> deep and stored deepest first, as on classification."""
        assert self.teacher is not None
        drop_taps(self)
        student_levels = list(probe_fpn_levels(self.student).values())
        teacher_levels = list(probe_fpn_levels(self.teacher).values())
        if len(student_levels) != len(teacher_levels):
            raise UserInputError(f"reviewkd on detection pairs FPN levels one to one, but the student has "
                                 f"{len(student_levels)} and the teacher {len(teacher_levels)}")
        in_channels = [shape[1] for shape in student_levels]
        mid_channels = min(self.cfg.max_mid_channel, in_channels[-1])
        count = len(in_channels)
        abfs = [ABF(c_in, mid_channels, t[1], fuse=i < count - 1)
                for i, (c_in, t) in enumerate(zip(in_channels, teacher_levels))]
        self.abfs = nn.ModuleList(abfs[::-1])

    def teacher_levels(self, teacher: Outputs) -> list[Tensor]:
        """mdistiller: the teacher's pre-ReLU stage maps and its pooled vector."""
        assert teacher.pooled is not None
        return _levels(teacher.preact[1:], teacher.pooled)

    def student_levels(self, student: Outputs, count: int) -> list[Tensor]:
        """mdistiller: the student's last ``count`` levels of [stem, stages..., pooled] (its zip drops the rest)."""
        assert student.pooled is not None
        levels = _levels(student.preact if self.cfg.student_preact else student.feats, student.pooled)
        if len(levels) < count:
            raise UserInputError(f"reviewkd needs {count} student levels (the teacher's stages + pooled), but "
                                 f"{type(self.student).__name__} has only {len(levels)}")
        return levels[-count:]

    def review(self, student_levels: Sequence[Tensor], out_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """The ABF chain, deepest level first; returns the outputs shallowest first (as the teacher levels)."""
        outputs: list[Tensor] = []
        residual = None
        for abf, level, size in zip(self.abfs, reversed(student_levels), reversed(out_sizes)):
            out, residual = abf(level, residual, size)
            outputs.append(out)
        return outputs[::-1]

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        ramp = warmup_factor(progress.epoch, cfg.warmup_epochs)
        if self.task.name == DETECTION:
            teacher_levels = list(teacher.detector.fpn.values())
            outputs = self.review(list(student.detector.fpn.values()), [t.shape[-2:] for t in teacher_levels])
            losses = {k: cfg.ce_weight * v for k, v in self.task_loss_terms(student, batch.target).items()}
        else:
            teacher_levels = self.teacher_levels(teacher)
            outputs = self.review(self.student_levels(student, len(teacher_levels)),
                                  [t.shape[-2:] for t in teacher_levels])
            losses = {"loss_ce": cfg.ce_weight * cross_entropy(student.logits, batch.target)}
        losses["loss_reviewkd"] = cfg.reviewkd_weight * ramp * sum(hcl_terms(outputs, teacher_levels))
        return losses
