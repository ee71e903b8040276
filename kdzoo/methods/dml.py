"""DML — Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018, arXiv 1706.00384 (docs/methods/dml.md).

A cohort of networks trained together from scratch: network k minimises
``CE(z_k, y) + 1/(K-1) * sum_{l != k} KL(p_l || p_k)`` with its peers' predictions detached (paper Eq. 1/2 and
their K-network generalisation). No reference PyTorch trainer exists in the pinned repositories; the golden
fixture composes RepDistiller's ``DistillKL`` (T = 1) with cross-entropy (golden README, ``methods/dml.pt``).

The student is network 1; peers ``peer1 ... peer{K-1}`` are extra modules (optimised, checkpointed and
counted with the method). ``update``:

* ``simultaneous`` (default, the recorded fixture): one forward of every network; each network's terms
  depend only on its own parameters, so one backward of the summed terms gives every network exactly the
  gradient of its own objective.
* ``alternating`` (paper Algorithm 1): networks are stepped one after the other, each against the *updated*
  predictions of those stepped before it. This needs one optimiser step per network inside a training step:
  a trainer calls :meth:`DML.update_step` with a callback that back-propagates and steps
  (``performs_own_updates`` tells it to).

A teacher, if given, is ignored (DML is teacher-free; ``requires_teacher = False``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import cross_entropy, kd_loss
from kdzoo.methods.registry import register_method
from kdzoo.models.registry import create_model
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress

UPDATE_MODES = ("simultaneous", "alternating")


@dataclass
class DMLConfig:
    # Architectures of the peers; "student" = the student's own architecture, freshly initialised.
    # Default: a cohort of two networks of the same architecture (paper Table 1; golden dml.pt cohort=2).
    peers: list[str] = field(default_factory=lambda: ["student"])
    temperature: float = 1.0  # paper: plain softmax (golden dml.pt hparams.T = 1); the T^2 factor is 1 there
    ce_weight: float = 1.0  # paper Eq. 1 (golden w_ce 1)
    kl_weight: float = 1.0  # paper Eq. 1 (golden w_kl 1); averaged over the K-1 peers (paper Eq. 5)
    update: str = "simultaneous"  # golden dml.pt (simultaneous); "alternating" = paper Algorithm 1


@register_method("dml")
class DML(Distiller):
    Config = DMLConfig
    requires_teacher = False

    def build(self) -> None:
        cfg = self.cfg
        if cfg.update not in UPDATE_MODES:
            raise UserInputError(f"dml: update must be one of {UPDATE_MODES}, got {cfg.update!r}")
        if not cfg.peers:
            raise UserInputError("dml needs at least one peer (method.peers)")
        num_classes = self.probe_student().logits.shape[1]
        reference = next(self.student.parameters())
        for k, arch in enumerate(cfg.peers, start=1):
            peer = self._new_network(arch, num_classes).to(device=reference.device, dtype=reference.dtype)
            setattr(self, f"peer{k}", peer)

    def _new_network(self, arch: str, num_classes: int) -> nn.Module:
        if arch != "student":
            return create_model(arch, num_classes=num_classes)
        name = getattr(self.student, "kdzoo_name", None)
        if name is not None:
            return create_model(name, num_classes=num_classes)  # the architecture's own initialisation
        # A student built outside the registry: copy it and redraw every parameter with PyTorch's default init.
        peer = copy.deepcopy(self.student)
        for module in peer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return peer

    @property
    def peers(self) -> list[nn.Module]:
        return [getattr(self, f"peer{k}") for k in range(1, len(self.cfg.peers) + 1)]

    @property
    def performs_own_updates(self) -> bool:
        """True when the trainer must call :meth:`update_step` instead of summing and stepping once."""
        return self.cfg.update == "alternating"

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Every network of the cohort, to be evaluated (and reported) separately."""
        return {"student": self.student, **{f"peer{k}": p for k, p in enumerate(self.peers, start=1)}}

    def teacher_forward(self, batch: Batch) -> Outputs | None:
        return None  # DML never uses a teacher

    def network_losses(self, index: int, logits: Tensor, others: list[Tensor], target: Tensor) -> dict[str, Tensor]:
        """Weighted CE + mean KL to the (detached) predictions of the other networks, for network ``index``
        (0 = student: ``loss_ce``/``loss_kl``; k >= 1: ``peer{k}.loss_ce``/``peer{k}.loss_kl``)."""
        cfg = self.cfg
        prefix = f"peer{index}." if index else ""
        kl = torch.stack([kd_loss(logits, other.detach(), cfg.temperature) for other in others]).mean()
        return {
            f"{prefix}loss_ce": cfg.ce_weight * cross_entropy(logits, target),
            f"{prefix}loss_kl": cfg.kl_weight * kl,
        }

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        if self.performs_own_updates:
            raise RuntimeError("dml with update=alternating is trained through update_step()")
        logits = [student.logits, *(peer(batch.image) for peer in self.peers)]
        losses: dict[str, Tensor] = {}
        for k, z in enumerate(logits):
            losses.update(self.network_losses(k, z, logits[:k] + logits[k + 1:], batch.target))
        return losses

    def update_step(self, batch: Batch, progress: Progress,
                         apply_update: Callable[[Tensor], None]) -> tuple[Tensor, dict[str, Tensor]]:
        """Paper Algorithm 1: for each network in turn, ``apply_update(its total)`` (the trainer zeroes the
        gradients with ``set_to_none=True``, back-propagates and steps, so only that network moves), then the
        network is re-run in train mode on the same batch so the next ones learn from its updated
        predictions (this second forward also updates its BatchNorm statistics, as the algorithm does).
        Returns the student's first-forward logits and the detached per-network terms."""
        networks = [self.student, *self.peers]
        logits = [self.student_extractor(batch.image).logits, *(peer(batch.image) for peer in self.peers)]
        latest = [z.detach() for z in logits]
        report: dict[str, Tensor] = {}
        for k, network in enumerate(networks):
            terms = self.network_losses(k, logits[k], latest[:k] + latest[k + 1:], batch.target)
            apply_update(sum(terms.values()))
            report.update({name: value.detach() for name, value in terms.items()})
            if k + 1 < len(networks):
                with torch.no_grad():
                    latest[k] = network(batch.image)
        return logits[0].detach(), report
