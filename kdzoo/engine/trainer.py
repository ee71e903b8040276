"""One training loop for teachers, students and every method.

The loop knows nothing about methods: it asks the distiller for its stages, parameter groups and
named losses, sums them, steps, evaluates, logs and checkpoints. Per step there is no host-device
synchronisation: losses and the non-finite flags are accumulated on the device and read once per
``runtime.log_interval`` steps (and at the end of the epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from kdzoo import __version__
from kdzoo.collectives import total
from kdzoo.config.loader import to_dict, to_yaml
from kdzoo.engine import checkpoint_io
from kdzoo.engine.dot import dot_backward_step
from kdzoo.engine.faults import fault_point
from kdzoo.engine.logger import MetricsLog
from kdzoo.engine.metrics import EVALUATORS, PRIMARY_METRIC, EvalContext
from kdzoo.engine.optim import build_optimizer, scaled_to_batch, schedule_epochs, scheduled_lr, set_lr
from kdzoo.engine.runtime import amp_dtype, autocast, rng_state, set_rng_state
from kdzoo.engine.setup import RunParts
from kdzoo.engine.stop import StopRequests, TrainingStopped
from kdzoo.errors import UserInputError
from kdzoo.models.taps import compile_model
from kdzoo.types import Batch, Progress, Stage


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf; the message names the loss term, step and epoch."""


class TeacherChangedError(RuntimeError):
    """A frozen teacher's weights or BatchNorm statistics moved during training."""


def teacher_fingerprint(teacher: nn.Module, with_buffers: bool) -> dict[str, Tensor]:
    """Exact per-tensor copies would double the teacher's memory; (sum, sum of squares) in float64 per
    tensor catches any change that matters at a cost of one pass over the weights per epoch."""
    tensors = dict(teacher.named_parameters())
    if with_buffers:
        tensors.update((n, b) for n, b in teacher.named_buffers() if b.is_floating_point())
    return {n: torch.stack([t.double().sum(), t.double().pow(2).sum()]) for n, t in tensors.items()}


@dataclasses.dataclass
class TrainState:
    stage_index: int = 0
    epoch: int = 1  # 1-based epoch within the stage that is running or about to run
    step_in_epoch: int = 0  # batches of ``epoch`` already done
    global_step: int = 0
    best_score: float = -math.inf  # the task's primary metric (top-1, mean IoU) at its best epoch
    best_epoch: int = 0
    # Running sums of the epoch's losses (device tensors), checkpointed so a mid-epoch resume logs
    # exactly what an uninterrupted run logs.
    epoch_sums: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    epoch_steps: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Trainer:
    def __init__(self, parts: RunParts, run_dir: Path, *, is_main: bool = True):
        self.parts = parts
        self.cfg = parts.cfg
        self.distiller = parts.distiller
        self.device = parts.device
        self.run_dir = run_dir
        self.is_main = is_main
        self.state = TrainState()
        self.stages = self.distiller.training_stages()
        # The schedule as this run applies it: the recipe's, scaled to the global batch when it names the batch
        # its lr is for (schedule.reference_batch).
        self.schedule, self.base_lr = scaled_to_batch(self.cfg.schedule, self.cfg.optim.lr,
                                                      parts.world_size * self.cfg.data.batch_size)
        self.primary_metric = PRIMARY_METRIC[self.distiller.task.name]
        self.amp = self.cfg.runtime.amp
        self.amp_dtype = amp_dtype(self.device, self.cfg.runtime.amp_dtype)
        # fp16 needs loss scaling wherever it runs (CUDA in practice; CPU autocast has fp16 too, and the
        # scaler's CPU implementation lets the tests exercise this very path).
        use_scaler = self.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.model: nn.Module = self.distiller
        if parts.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._sync_self_synchronised_buffers()
            # Multi-stage methods leave some parameters without gradients in their early stages.
            self.model = DistributedDataParallel(
                self.distiller,
                device_ids=ids,
                find_unused_parameters=len(self.stages) > 1 or self.distiller.leaves_parameters_unused,
            )
        if self.cfg.runtime.compile:
            self._compile()
        self.optimizer = self._build_optimizer(self.stages[0])
        teacher = self.distiller.teacher
        # OFD's declared train-mode teacher moves its BatchNorm statistics by design: weights only then.
        self._teacher_buffers_frozen = not self.distiller.teacher_train_mode
        self._teacher_print = None if teacher is None else teacher_fingerprint(teacher, self._teacher_buffers_frozen)
        self.stop_requests = StopRequests()
        runtime = self.cfg.runtime
        self.log = MetricsLog(run_dir, runtime.tensorboard, enabled=is_main,
                              wandb_project=runtime.wandb_project if runtime.wandb else None,
                              run_config=to_dict(self.cfg))

    # ---- setup --------------------------------------------------------------------------------
    def _compile(self) -> None:
        # Compile the networks, not the distiller: hooks registered on their submodules are traced
        # into the graph, and the method's loss code stays eager (it is cheap and often dynamic).
        for extractor in (self.distiller.student_extractor, self.distiller.teacher_extractor):
            if extractor is not None:
                extractor.model = compile_model(extractor.model)

    def _build_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        groups = self.distiller.param_groups(stage)
        if not groups:
            raise UserInputError(f"stage {stage.name!r} of {self.distiller.name} has no trainable parameters")
        return build_optimizer(self._scaled_groups(groups, stage), self.cfg.optim, stage.lr)

    def _scaled_groups(self, groups: list[dict[str, Any]], stage: Stage) -> list[dict[str, Any]]:
        """Split each parameter group into the student's head modules (the model's ``head_modules``), the
        method's extra modules and the rest, with ``lr_scale`` = ``optim.head_lr_scale`` /
        ``optim.extra_lr_scale`` / 1 (pytorch-deeplab-xception's 10x head and the overhaul-distillation 10x
        connectors). The order inside each part is the distiller's."""
        optim = self.cfg.optim
        if not stage.scale_groups or (optim.head_lr_scale == 1 and optim.extra_lr_scale == 1):
            return groups
        student = self.distiller.student
        head_modules = [student.get_submodule(name) for name in getattr(student, "head_modules", ())]
        head = {id(p) for module in head_modules for p in module.parameters()}
        extra = {id(p) for p in self.distiller.extra_parameters()}
        scaled: list[dict[str, Any]] = []
        for group in groups:
            parts: dict[float, list[nn.Parameter]] = {}
            for p in group["params"]:
                scale = optim.head_lr_scale if id(p) in head else optim.extra_lr_scale if id(p) in extra else 1.0
                parts.setdefault(scale, []).append(p)
            scale_of_group = group.get("lr_scale", 1.0)
            scaled.extend({**group, "params": params, "lr_scale": scale_of_group * scale}
                          for scale, params in parts.items())
        return scaled

    def stage_steps(self, stage: Stage) -> int:
        """Optimiser steps of ``stage``: ``schedule.iterations`` for a scheduled-length stage under
        unit=iterations, else its epochs times the batches of an epoch."""
        if stage.epochs is None and self.schedule.unit == "iterations":
            return self.schedule.iterations
        return self.stage_epochs(stage) * len(self.parts.data.train)

    def stage_epochs(self, stage: Stage) -> int:
        if stage.epochs is not None:
            return stage.epochs
        return schedule_epochs(self.schedule, len(self.parts.data.train))

    def steps_in_epoch(self, stage: Stage, epoch: int) -> int:
        """Batches of ``epoch`` (1-based) of ``stage``: a whole pass, but the last epoch of an iteration-counted
        stage stops at the stage's step count."""
        per_epoch = len(self.parts.data.train)
        return min(per_epoch, self.stage_steps(stage) - (epoch - 1) * per_epoch)

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "kdzoo-train",
            "version": __version__,
            "method": self.distiller.name,
            "student_name": self.cfg.student.name,
            "num_classes": self.parts.data.num_classes,
            "train_state": dataclasses.asdict(self.state),
            "distiller": self.distiller.method_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def save(self) -> None:
        if not self.is_main:
            return
        s = self.state
        path = self.run_dir / checkpoint_io.checkpoint_name(s.stage_index, s.epoch, s.step_in_epoch)
        checkpoint_io.save_checkpoint(self.state_dict(), path)
        checkpoint_io.prune(self.run_dir, self.cfg.runtime.keep_last)
        fault_point("after_save")

    def load(self, path: Path) -> None:
        ckpt = checkpoint_io.load_verified(path, map_location=self.device)
        if ckpt.get("format") != "kdzoo-train" or ckpt.get("method") != self.distiller.name:
            raise UserInputError(f"{path} is not a {self.distiller.name} training checkpoint of kdzoo")
        train_state = dict(ckpt["train_state"])
        if "best_top1" in train_state:  # checkpoints written before the task-generic name
            train_state["best_score"] = train_state.pop("best_top1")
        self.state = TrainState(**train_state)
        self.state.epoch_sums = {k: v.to(self.device) for k, v in self.state.epoch_sums.items()}
        self.distiller.load_method_state_dict(ckpt["distiller"])
        self.optimizer = self._build_optimizer(self.stages[self.state.stage_index])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.log.restore(self.state.records)

    def export(self, name: str, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        model = self.distiller.export_student()
        payload = {
            "format": "kdzoo-model",
            "version": __version__,
            "model_name": getattr(model, "kdzoo_name", self.cfg.student.name),
            "model_args": dict(self.cfg.student.model_args),
            "num_classes": self.parts.data.num_classes,
            "model": model.state_dict(),
            "metrics": metrics,
        }
        if self.distiller.exports_composite:
            payload["composite"] = {
                "method": self.distiller.name,
                "method_config": dataclasses.asdict(self.distiller.cfg),
                "student_name": self.cfg.student.name,
                "teacher_name": self.cfg.teacher.name,
                "student_taps": self.cfg.student.taps,
                "teacher_taps": self.cfg.teacher.taps,
            }
        checkpoint_io.save_checkpoint(payload, self.run_dir / name)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(f"# kdzoo {__version__}\n" + to_yaml(self.cfg))
        with self.stop_requests:
            self._fit_stages()
        self.log.close()
        final = self.state.records[-1] if self.state.records else {}
        metric = self.primary_metric
        return {
            "metric": metric,
            "last": final.get(metric),
            "best": self.state.best_score if self.state.best_epoch else None,
            "best_epoch": self.state.best_epoch,
            "run_dir": str(self.run_dir),
        }

    def _fit_stages(self) -> None:
        while self.state.stage_index < len(self.stages):
            stage = self.stages[self.state.stage_index]
            while self.state.epoch <= self.stage_epochs(stage):
                self._stop_if_requested(stage, {})
                self.train_epoch(stage)
            self.state.stage_index += 1
            self.state.epoch, self.state.step_in_epoch = 1, 0
            if self.state.stage_index < len(self.stages):
                self.optimizer = self._build_optimizer(self.stages[self.state.stage_index])

    def _stop_if_requested(self, stage: Stage, bad_terms: dict[str, Tensor]) -> None:
        """Checkpoint and raise ``TrainingStopped`` if a stop signal arrived (on any process, under DDP:
        one all-reduce, so every process stops at the same step)."""
        signum = self.stop_requests.signum or 0
        if self.parts.world_size > 1:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if not signum:
            return
        self._check_finite(bad_terms, stage)
        self.save()
        self.log.close()
        s = self.state
        raise TrainingStopped(signum, self.run_dir, f"stage {stage.name!r}, epoch {s.epoch}, step {s.step_in_epoch} "
                              f"of the epoch (global step {s.global_step})")

    def train_epoch(self, stage: Stage) -> None:
        """One epoch of ``stage`` from the state's position (a resumed run starts mid-epoch): the steps, then
        the end-of-epoch checks, evaluation, record, exports and checkpoint."""
        s = self.state
        epochs = self.stage_epochs(stage)
        schedule = self.schedule
        per_step_lr = schedule.name == "poly" or schedule.unit == "iterations" or schedule.warmup_iters > 0
        self._set_lr(stage)
        self.distiller.train()
        progress = Progress(epoch=s.epoch, epochs=epochs, step=s.global_step, stage=stage.name)
        bad_terms: dict[str, Tensor] = {}
        started = time.perf_counter()
        steps_in_epoch = self.steps_in_epoch(stage, s.epoch)
        bar = self._progress_bar(steps_in_epoch, s.step_in_epoch, f"{stage.name} {s.epoch}/{epochs}")
        for batch in self.parts.data.train.iterate(s.epoch, s.step_in_epoch):
            progress.step = s.global_step
            if per_step_lr:
                self._set_lr(stage)
            self._accumulate(self.train_step(batch, progress), bad_terms)
            s.epoch_steps += 1
            s.step_in_epoch += 1
            s.global_step += 1
            fault_point("step")
            if bar is not None:
                bar.update(1)
            if s.step_in_epoch >= steps_in_epoch:
                break
            self._between_steps(stage, bad_terms, bar)
        if bar is not None:
            bar.close()
        self._end_epoch(stage, bad_terms, time.perf_counter() - started)

    def _set_lr(self, stage: Stage) -> None:
        """The schedule's lr for where training is: per epoch (multistep) or per step (poly, iteration-counted
        steps, warm-up), steps counted over every stage, as pytorch-deeplab-xception's LR_Scheduler counts epoch 0
        too. A stage's own lr is scaled to the batch like the optimiser's."""
        base_lr = self.base_lr if stage.lr is None else stage.lr * self.base_lr / self.cfg.optim.lr
        if not stage.use_schedule:
            set_lr(self.optimizer, base_lr)
            return
        total_steps = sum(self.stage_steps(s) for s in self.stages)
        set_lr(self.optimizer, scheduled_lr(base_lr, self.schedule, epoch=self.state.epoch,
                                            step=self.state.global_step, total_steps=total_steps))

    def _accumulate(self, losses: dict[str, Tensor], bad_terms: dict[str, Tensor]) -> None:
        """Add the step's losses to the epoch sums and its non-finite flags to ``bad_terms``, on the device
        (no host read here)."""
        sums = self.state.epoch_sums
        for name, value in losses.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value.clone()
            not_finite = ~torch.isfinite(value)
            bad_terms[name] = bad_terms[name] | not_finite if name in bad_terms else not_finite

    def _between_steps(self, stage: Stage, bad_terms: dict[str, Tensor], bar: Any) -> None:
        """Stop requests, the host read of the losses at log steps, mid-epoch checkpoints."""
        s, runtime = self.state, self.cfg.runtime
        at_log_step = s.step_in_epoch % runtime.log_interval == 0
        # Single process: a free flag check every step. DDP: agreed at log steps (one collective).
        if at_log_step or self.parts.world_size == 1:
            self._stop_if_requested(stage, bad_terms)
        if at_log_step:
            self._check_finite(bad_terms, stage)
            if bar is not None:
                bar.set_postfix({k: f"{float(v) / s.epoch_steps:.3f}" for k, v in s.epoch_sums.items()})
        if runtime.checkpoint_interval and s.step_in_epoch % runtime.checkpoint_interval == 0:
            self._check_finite(bad_terms, stage)
            self.save()

    def _end_epoch(self, stage: Stage, bad_terms: dict[str, Tensor], seconds: float) -> None:
        """Checks before anything of this epoch is kept, then the record, evaluation, exports, checkpoint."""
        s = self.state
        epochs = self.stage_epochs(stage)
        self._check_finite(bad_terms, stage)
        self._check_teacher()
        self._check_replicas_agree()
        record: dict[str, Any] = {"stage": stage.name, "epoch": s.epoch, "step": s.global_step,
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        record.update({f"train/{k}": float(v) / max(s.epoch_steps, 1) for k, v in s.epoch_sums.items()})
        record.update(self._loader_stats())
        record["epoch_time_s"] = seconds
        final_stage = stage is self.stages[-1]
        if final_stage and (s.epoch % self.cfg.runtime.eval_every == 0 or s.epoch == epochs):
            record.update(self._evaluate_all())
        s.epoch += 1
        s.step_in_epoch = 0
        s.epoch_sums, s.epoch_steps = {}, 0
        s.records.append(record)
        self.log.log(record, s.global_step)
        metric = self.primary_metric
        if metric in record and record[metric] > s.best_score:
            s.best_score, s.best_epoch = record[metric], record["epoch"]
            self.export("student_best.pt", record)
        self.save()
        if final_stage and s.epoch > epochs:
            self.export("student_last.pt", record)

    def _loader_stats(self) -> dict[str, float]:
        """Counts the training loader reports for its epoch (a loader may declare ``epoch_stats``: the class-folder
        loaders count images skipped as undecodable), summed over processes."""
        stats_of = getattr(self.parts.data.train, "epoch_stats", None)
        if stats_of is None:
            return {}
        stats = stats_of()
        if not stats:
            return {}
        summed = total(torch.tensor(list(stats.values()), dtype=torch.float32, device=self.device))
        return dict(zip(stats, summed.tolist()))

    def train_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        """One training step: the batch's cached teacher logits and memory format, then the update the
        method or the optimiser calls for. Returns the step's named losses."""
        if self.parts.teacher_cache is not None:
            batch.teacher_logits = self.parts.teacher_cache.lookup(batch.index, batch.crop)
        if self.cfg.runtime.channels_last:
            batch.image = batch.image.contiguous(memory_format=torch.channels_last)
        if self.distiller.performs_own_updates:
            with autocast(self.device, self.amp, self.amp_dtype):
                _, losses = self.distiller.update_step(batch, progress, self._apply_update)
            return losses
        if getattr(self.optimizer, "splits_losses", False):
            return self._split_loss_step(batch, progress)
        with autocast(self.device, self.amp, self.amp_dtype):
            _, losses = self.model(batch, progress)
        self._require_losses(losses, progress)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.runtime.nonfinite == "skip" and not self._update_allowed(total):
            return {k: v.detach() for k, v in losses.items() if torch.isfinite(v)}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses

    def _split_loss_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        """An optimiser that steps the task and the distillation gradients separately (DOT): the method's
        ``task_losses`` against the rest. DOT back-propagates twice per forward and DDP would average only
        the first pass, so under DDP the forward runs in ``no_sync`` and each gradient set is averaged here."""
        distributed = self.parts.world_size > 1

        def sync_context() -> contextlib.AbstractContextManager:
            return self.model.no_sync() if distributed else contextlib.nullcontext()

        with sync_context(), autocast(self.device, self.amp, self.amp_dtype):
            _, losses = self.model(batch, progress)
        self._require_losses(losses, progress)
        task_names = self.distiller.task_losses
        task = sum(v for k, v in losses.items() if k in task_names)
        distill = sum(v for k, v in losses.items() if k not in task_names)
        with sync_context():
            dot_backward_step(self.optimizer, task, distill, self.scaler if self.scaler.is_enabled() else None,
                              sync_grads=self._average_grads if distributed else None)
        return losses

    def _require_losses(self, losses: dict[str, Tensor], progress: Progress) -> None:
        if not losses:
            raise UserInputError(f"{self.distiller.name} returned no losses in stage {progress.stage!r}")

    def _update_allowed(self, total: Tensor) -> bool:
        """``runtime.nonfinite=skip``: whether this step's update may be applied (one host read per step, by
        choice). With fp16's GradScaler an overflow of the scaled gradients is the scaler's to handle: its
        ``step`` skips that update and ``update`` halves the scale, so here only a non-finite loss skips, and
        the scaler still sees that step (its inf check and back-off). Without a scaler, a non-finite
        gradient skips too."""
        if not self.scaler.is_enabled():
            return bool(torch.isfinite(total)) and self._grads_finite()
        if bool(torch.isfinite(total)):
            return True
        self.scaler.unscale_(self.optimizer)  # records the inf check that update() reads
        self.scaler.update()
        return False

    def _optimized_params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _average_grads(self) -> None:
        grads = [p.grad for p in self._optimized_params() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.parts.world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def _apply_update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.parts.world_size > 1:
            # update_step runs the networks outside DDP's forward, so DDP's reducer never averages these
            # gradients: average them here, or the replicas drift apart.
            self._average_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self._optimized_params() if p.grad is not None]
        return bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True

    def _check_finite(self, bad_terms: dict[str, Tensor], stage: Stage) -> None:
        if self.cfg.runtime.nonfinite != "stop" or not bad_terms:
            return
        flags = torch.stack(list(bad_terms.values())).cpu()
        if flags.any():
            names = [n for n, f in zip(bad_terms, flags.tolist()) if f]
            s = self.state
            raise NonFiniteLossError(
                f"non-finite loss in term(s) {', '.join(names)} during stage {stage.name!r}, epoch {s.epoch}, "
                f"before step {s.step_in_epoch} of the epoch (global step {s.global_step}); training stopped, the "
                f"last checkpoint in {self.run_dir} is intact. Lower optim.lr, or set runtime.nonfinite=skip."
            )

    def _self_synchronised(self) -> list[Tensor]:
        buffers = dict(self.distiller.named_buffers())
        return [buffers[name] for name in self.distiller.self_synchronised_buffers]

    def _sync_self_synchronised_buffers(self) -> None:
        """Hand the method's self-synchronised buffers to DDP's ignore list, after one broadcast from
        rank 0 (DDP's own start-up broadcast skips ignored buffers too)."""
        names = list(self.distiller.self_synchronised_buffers)
        if not names:
            return
        for buffer in self._self_synchronised():
            dist.broadcast(buffer, src=0)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.distiller, names)

    def _check_replicas_agree(self) -> None:
        """Under DDP every process must hold the same trainable weights (a gradient that escaped the
        all-reduce would let them drift apart silently) and the same self-synchronised buffers. One small
        all-reduce per epoch checks it."""
        if self.parts.world_size <= 1:
            return
        tensors = [*self._optimized_params(), *self._self_synchronised()]
        print_ = torch.stack([t.detach().double().sum() for t in tensors])
        low, high = print_.clone(), print_.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"DDP replicas diverged during epoch {self.state.epoch}: the processes' weights "
                               "(or a method's self-synchronised buffers) differ")

    def _check_teacher(self) -> None:
        if self._teacher_print is None:
            return
        now = teacher_fingerprint(self.distiller.teacher, self._teacher_buffers_frozen)
        changed = [n for n, v in now.items() if not torch.equal(v, self._teacher_print[n])]
        if changed:
            raise TeacherChangedError(
                f"the frozen teacher changed during epoch {self.state.epoch} ({', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}); the method modifies its teacher. Training stopped before "
                "this epoch's checkpoint."
            )

    def _evaluate_all(self) -> dict[str, float]:
        out: dict[str, float] = {}
        task = self.distiller.task
        ctx = EvalContext(task, self.parts.data.num_classes, self.amp, self.amp_dtype,
                          sharded=self.parts.data.test_sharded and self.parts.world_size > 1)
        for i, (name, model) in enumerate(self.distiller.evaluation_models().items()):
            if ctx.sharded:
                # Each process's BatchNorm statistics moved in its own last forward (DDP broadcasts rank 0's only
                # at the start of the next one): evaluate rank 0's, the model that is exported, on every shard.
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            metrics = EVALUATORS[task.name](model, self.parts.data.test, ctx)
            prefix = "" if i == 0 else f"{name}/"
            out.update({f"{prefix}{k}": v for k, v in metrics.items()})
        return out

    def _progress_bar(self, total: int, initial: int, desc: str) -> Any:
        if not (self.is_main and self.cfg.runtime.progress):
            return None
        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
