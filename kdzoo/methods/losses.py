"""Loss functions shared by several methods. Numerically sensitive parts run in fp32 under AMP
(docs/design.md): log-softmax of tempered logits is computed on ``.float()`` inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.models.taps import classifier_of
from kdzoo.types import SEGMENTATION, TaskSpec


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: T^2 * KL(p_t || p_s), summed over classes, averaged over the batch (docs/methods/kd.md)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


def cross_entropy(logits: Tensor, target: Tensor, task: TaskSpec | None = None) -> Tensor:
    """The task's own loss. Classification: mean CE over the batch. Segmentation (``[B, K, H, W]`` logits):
    mean CE over the pixels not labelled ``task.ignore_index``, divided by B when ``task.ce_batch_average``
    (pytorch-deeplab-xception ``utils/loss.py``; docs/design.md, Tasks)."""
    if task is None or task.name != SEGMENTATION:
        return F.cross_entropy(logits.float(), target)
    loss = F.cross_entropy(logits.float(), target, ignore_index=task.ignore_index)
    return loss / logits.shape[0] if task.ce_batch_average else loss


def ce_and_kd(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    target: Tensor,
    ce_weight: float,
    kd_weight: float,
    temperature: float = 4.0,
    task: TaskSpec | None = None,
) -> dict[str, Tensor]:
    """The ``w_ce*CE + w_kd*KD`` part every RepDistiller / SimKD loop adds (docs/design.md).
    Terms with weight 0 are left out, so they cost nothing."""
    losses: dict[str, Tensor] = {}
    if ce_weight:
        losses["loss_ce"] = ce_weight * cross_entropy(student_logits, target, task)
    if kd_weight:
        assert teacher_logits is not None
        losses["loss_kd"] = kd_weight * kd_loss(student_logits, teacher_logits, temperature)
    return losses


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """``min(e / W, 1)`` with 1-based epochs (mdistiller, docs/methods/dkd.md)."""
    return min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


def logsumexp_excluding(logits: Tensor, exclude: Tensor) -> Tensor:
    """``log sum_{k != y} exp(z_k)`` per row, without forming the complement probability."""
    return torch.logsumexp(logits.masked_fill(exclude, float("-inf")), dim=1)


def autocast_off(reference: Tensor) -> torch.autocast:
    """Context disabling autocast on ``reference``'s device, so that matmuls, SVDs and exps of
    ``.float()`` inputs really run in fp32 (docs/design.md): under autocast ``.float()`` alone is not
    enough, ``mm``/``bmm`` would cast their inputs back to half precision."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


def pool_to_smaller(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """RepDistiller's spatial matching (AT, NST, FSP, FT): adaptive-average-pool the larger of two square maps to
    the other's size; equal sizes pass through untouched."""
    student_size, teacher_size = student_map.shape[2], teacher_map.shape[2]
    if student_size > teacher_size:
        student_map = F.adaptive_avg_pool2d(student_map, (teacher_size, teacher_size))
    elif student_size < teacher_size:
        teacher_map = F.adaptive_avg_pool2d(teacher_map, (student_size, student_size))
    return student_map, teacher_map


def align_spatial(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """The SimKD repository's spatial matching (SimKD, SelfA), also VID's: adaptive-average-pool the map with the
    larger height to the other's (H, W). Unlike :func:`pool_to_smaller` a non-square map keeps its aspect ratio;
    on square maps the two agree."""
    s_size, t_size = student_map.shape[-2:], teacher_map.shape[-2:]
    if s_size[0] > t_size[0]:
        return F.adaptive_avg_pool2d(student_map, t_size), teacher_map
    if s_size != t_size:
        return student_map, F.adaptive_avg_pool2d(teacher_map, s_size)
    return student_map, teacher_map


def pooled_pair_terms(
    first_maps: Sequence[Tensor], second_maps: Sequence[Tensor], term: Callable[[Tensor, Tensor], Tensor]
) -> list[Tensor]:
    """``term(a, b)`` for each pair of maps zipped from the two lists (stages beyond the shorter list are ignored,
    as RepDistiller's zips do), each map upcast to at least fp32 and the larger one of the pair pooled to the
    other's size (:func:`pool_to_smaller`), with autocast off so that the term's matmuls stay fp32 too.
    AT and NST pair student with teacher stages; FSP pairs consecutive maps of one network."""
    with autocast_off(first_maps[0]):
        return [term(*pool_to_smaller(at_least_fp32(a), at_least_fp32(b))) for a, b in zip(first_maps, second_maps)]


def at_least_fp32(tensor: Tensor) -> Tensor:
    """Upcast fp16/bf16 to fp32 for numerically sensitive parts; leaves fp32/fp64 as they are (so a
    float64 run stays float64, unlike ``.float()``)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class _ParametersWithout(torch.nn.Module):
    """Non-owning view of ``model``'s parameters minus ``excluded``'s. It has no children and no state:
    ``object.__setattr__`` keeps both models out of the module tree, so no state_dict sees them twice."""

    def __init__(self, model: torch.nn.Module, excluded: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_excluded", excluded)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        skip = {id(p) for p in self._excluded.parameters()}
        for name, param in self._model.named_parameters(prefix, recurse, remove_duplicate):
            if id(param) not in skip:
                yield name, param


def feature_body(model: torch.nn.Module) -> torch.nn.Module:
    """RepDistiller's ``get_feat_modules()`` as a parameter view: every parameter of ``model`` except its
    classifier's, for stages that train the feature extractor alone (AB and FSP init, docs/methods/ab.md,
    docs/methods/fsp.md).
    Store it with ``object.__setattr__`` and name it in ``Stage.trainable``."""
    return _ParametersWithout(model, classifier_of(model))
