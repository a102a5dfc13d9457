"""The training loop, exact distributed evaluation and the run's outputs.

Loss normalisation. Each task's loss is the mean cross-entropy over *all* labelled examples
of that task in the global batch (every rank, every micro-step), not a mean of per-rank or
per-micro-batch means; those differ as soon as tasks are labelled on different rows. Each
step therefore counts the labels of its whole global batch first, divides every
micro-step's summed cross-entropy by those global counts, and lets the engine undo its own
averaging over ranks and micro-steps (``Engine.loss_scale_for_reduction``). The counts need
no communication: every rank holds the train split and the global order of the sampler.

Shared decisions. Whatever skips or ends a step must be decided identically on every rank,
or one rank waits forever in a collective that the others never join. Each step makes one
small all-reduce, once its last forward pass is done, that carries all of it: every task's
share of the loss (the sum is the logged loss), one "my loss is not finite" flag per rank
rank 0's time-limit vote and a "stop signal received" flag. Every rank then reads the
same sums and takes the same branch: update or skip the step, continue or stop after it.

Stop signals. SIGTERM, SIGUSR1 (a scheduler's warning before a time limit) and a first
Ctrl-C only set a flag; the next step's vote shares it, every rank saves the same
checkpoint, rank 0 writes the ``REQUEUE`` marker and the run exits with
``EXIT_REQUEUE`` (75). A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mtl_dist import distributed as D
from mtl_dist.checkpoint import (
    BEST,
    ENGINE_DIR,
    checkpoint_root,
    load_checkpoint,
    save_checkpoint,
)
from mtl_dist.config import Config
from mtl_dist.data import (
    IGNORE_INDEX,
    Collator,
    TokenizedData,
    column_array,
    eval_batches,
    label_key,
    train_sampler,
)
from mtl_dist.distributed import World
from mtl_dist.engine import Engine
from mtl_dist.errors import ConfigError
from mtl_dist.log import RunRecorder, logger
from mtl_dist.metrics import summary_line, task_metrics
from mtl_dist.weighting import build_weighting, class_weights


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: ``global = micro x accumulation x world_size``."""

    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    world_size: int

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = micro-batch "
            f"{self.micro_batch_size} x accumulation {self.accumulation} x world size "
            f"{self.world_size}"
        )


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    micro = cfg.micro_batch_size or cfg.global_batch_size // world_size
    if micro == 0 or cfg.global_batch_size % (micro * world_size):
        fix = (
            f"pick a global_batch_size that is a multiple of micro_batch_size x "
            f"world_size = {max(micro, 1)} x {world_size}"
        )
        raise ConfigError(
            "global_batch_size",
            cfg.global_batch_size,
            fix,
            "does not split evenly over ranks and micro-steps",
        )
    accumulation = cfg.global_batch_size // (micro * world_size)
    return BatchPlan(cfg.global_batch_size, micro, accumulation, world_size)


REQUEUE_MARKER = "REQUEUE"
"""File in the output directory that says "interrupted with a checkpoint: run me again
with ``--resume auto``"; schedulers and ``slurm/train.sh`` look for it."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class TrainingStopped(RuntimeError):
    """Every rank stopped training at the same step (``nonfinite_loss=stop``)."""


class RunInterrupted(RuntimeError):
    """A stop signal arrived: every rank saved a checkpoint and stopped."""


@dataclass
class StepResult:
    """What every rank agreed on at the end of one step."""

    task_losses: list[float]
    """Each task's mean loss over the global batch (NaN or inf when not finite)."""
    weights: list[float]
    """The weight of each task's loss in this step."""
    objective: float
    """The minimised loss: weighted task losses plus the weighting's own term."""
    grad_norm: torch.Tensor | None
    """Global gradient norm; None when the update was skipped or the engine has none."""
    applied: bool
    """False when every rank skipped this step's update (a loss was not finite)."""
    out_of_time: bool
    """Rank 0 found the time limit passed: every rank stops after this step."""
    interrupted: bool
    """Some rank received a stop signal: every rank checkpoints and exits after it."""


def best_metric_value(
    name: str, metrics: dict[str, dict[str, Any]], loss: float
) -> float:
    """The validation figure ``name`` (see ``Config.best_metric``) from per-task metrics."""
    if name == "loss":
        return loss
    if name in ("mean_f1_macro", "mean_accuracy"):
        key = name[len("mean_") :]
        return float(np.mean([m[key] for m in metrics.values()]))
    task, _, key = name.partition("/")
    return float(metrics[task][key])


def is_better(name: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if name == "loss" else value > best


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    # Under ZeRO-3 a parameter's local tensor is a shard; ds_numel is its full size.
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(map(numel, params)), sum(numel(p) for p in params if p.requires_grad)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        world: World,
        data: TokenizedData,
        engine: Engine,
        plan: BatchPlan,
        collator: Collator,
        recorder: RunRecorder,
        output_dir: Path,
    ) -> None:
        self.cfg = cfg
        self.world = world
        self.data = data
        self.engine = engine
        self.plan = plan
        self.collator = collator
        self.recorder = recorder
        self.output_dir = output_dir
        self.tasks = [t.name for t in cfg.tasks]
        self.weighting = build_weighting(cfg)
        train = data.splits["train"]
        self.sampler = train_sampler(
            train,
            cfg,
            plan.global_batch_size,
            plan.micro_batch_size,
            world.world_size,
            world.rank,
        )
        # Every train row's class id per task (rows x tasks, int16: this is held for
        # the whole run and grows with the data), a missing label as the extra id
        # `classes`; and per task, the weight of each id (class weight, 0 for the
        # missing label). A global batch's weights, summed, are the denominators of
        # the task means, known on every rank without a collective.
        self.class_weights: list[torch.Tensor | None] = []
        self.id_weights: list[torch.Tensor] = []
        ids = []
        for i, task in enumerate(cfg.tasks):
            labels = column_array(train, label_key(i), np.int16)
            classes = len(data.label_maps[task.name])
            per_class = class_weights(task.class_weights, labels, classes)
            self.class_weights.append(
                None
                if task.class_weights == "none"
                else torch.tensor(per_class, dtype=torch.float32, device=world.device)
            )
            self.id_weights.append(torch.tensor([*per_class, 0.0], dtype=torch.float32))
            ids.append(
                np.where(labels == IGNORE_INDEX, classes, labels).astype(np.int16)
            )
        self.label_ids = torch.from_numpy(np.stack(ids, 1))
        self.total_steps = self.planned_steps(cfg, len(train), plan)
        self.step = 0
        """Optimizer steps taken so far (the number of the last one)."""
        self.epoch = 0
        """Index of the epoch in progress (0-based)."""
        self.step_in_epoch = 0
        """Steps of ``self.epoch`` already taken: where a resumed run picks up."""
        self.best_score: float | None = None
        """Best validation ``cfg.best_metric`` so far (None before the first)."""
        self.best_step: int | None = None
        self.evals_since_best = 0
        self.last_eval_loss = math.nan
        self.last_saved_step: int | None = None
        self.stop_signal: int | None = None
        """The first stop signal this process received (None: none yet)."""
        self.started = time.monotonic()

    @staticmethod
    def planned_steps(cfg: Config, num_train: int, plan: BatchPlan) -> int:
        """Optimizer steps of the whole run: all epochs, capped by ``max_steps``."""
        per_epoch = num_train // plan.global_batch_size
        if per_epoch == 0:
            raise ConfigError(
                "global_batch_size",
                cfg.global_batch_size,
                f"use at most {num_train} (the train split's size)",
                "larger than the train split",
            )
        total = per_epoch * cfg.epochs
        return min(total, cfg.max_steps) if cfg.max_steps else total

    # -----------------------------------------------------------------------------------
    # Training.

    def loader(self) -> DataLoader:
        # A private generator: creating the iterator draws a seed from it, and drawing
        # from the global RNG instead would shift every dropout mask after a resume.
        return DataLoader(
            self.data.splits["train"],
            batch_sampler=self.sampler,
            collate_fn=self.collator,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.world.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.world.device, non_blocking=True) for k, v in batch.items()}

    def global_label_counts(self, step_in_epoch: int) -> torch.Tensor:
        """Each task's labels in the whole global batch of a step (every rank, every
        micro-step), each counted with its class weight; identical on every rank."""
        ids = self.label_ids[self.sampler.global_batch(step_in_epoch)].long()
        counts = torch.stack(
            [weights[ids[:, i]].sum() for i, weights in enumerate(self.id_weights)]
        )
        # Pinned, the copy to the GPU does not wait for the previous step's kernels.
        return counts.pin_memory() if self.world.device.type == "cuda" else counts

    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], global_counts: torch.Tensor
    ) -> StepResult:
        """One optimizer step (number ``self.step``) over this rank's micro-batches.

        ``global_counts`` is :meth:`global_label_counts` of the step: each micro-step's
        summed cross-entropy is divided by it, so the shares of all ranks and micro-steps
        add up to each task's mean over the global batch.
        """
        num_tasks = len(self.tasks)
        weights = self.weighting.weights(self.step)
        # Counts of class-weighted rows can sum to less than 1: clamp only true zeros.
        denominators = global_counts.to(
            self.world.device, torch.float32, non_blocking=True
        )
        denominators = torch.where(denominators > 0, denominators, 1.0)
        shares = torch.zeros(num_tasks, device=self.world.device)
        last = len(micro_batches) - 1
        for k, mb in enumerate(micro_batches):
            mb = self._to_device(mb)
            labels = mb.pop("labels")
            with self.engine.no_sync(skip=k < last):
                logits = self.engine.forward(mb)
                sums = torch.stack(
                    [
                        F.cross_entropy(
                            logits[t].float(),
                            labels[:, i],
                            weight=self.class_weights[i],
                            reduction="sum",
                            ignore_index=IGNORE_INDEX,
                        )
                        for i, t in enumerate(self.tasks)
                    ]
                )
                task_losses = sums / denominators
                shares += task_losses.detach()
                # Python floats as factors: no host-to-device copy on every step.
                loss = sum(w * x for w, x in zip(weights, task_losses.unbind()))
                loss = loss * self.engine.loss_scale_for_reduction
                if k == last:
                    votes = self._vote(shares)
                    # A step to skip gets a NaN factor on its last loss on every rank: the
                    # reduced gradient is then NaN on all of them, which is what
                    # DeepSpeed's overflow guard needs to drop the update. A kept step is
                    # multiplied by exactly 1.0, so its gradient is unchanged.
                    drop = votes[num_tasks:-2].sum() > 0
                    loss = loss * torch.where(drop, torch.nan, 1.0)
                self.engine.backward(loss)
        # The step's one host sync: whether to update must be known before the update.
        values = votes.tolist()
        task_losses, flags = values[:num_tasks], values[num_tasks:-2]
        out_of_time, interrupted = values[-2] > 0, values[-1] > 0
        objective = sum(w * v for w, v in zip(weights, task_losses))
        objective += self.weighting.regularizer()
        if not any(flags):
            norm = self.engine.step()
            # Every rank observes the same summed losses: the weights stay identical.
            self.weighting.observe(task_losses, self.step, self._lrs()[1])
            return StepResult(
                task_losses, weights, objective, norm, True, out_of_time, interrupted
            )
        self.engine.skip_step()
        self._nonfinite(task_losses, flags)
        return StepResult(
            task_losses, weights, objective, None, False, out_of_time, interrupted
        )

    def _vote(self, shares: torch.Tensor) -> torch.Tensor:
        """The step's one all-reduce: task shares, a not-finite flag per rank, rank 0's
        time-limit vote, and whether any rank received a stop signal."""
        num_tasks = len(self.tasks)
        votes = torch.zeros(num_tasks + self.world.world_size + 2, device=shares.device)
        votes[:num_tasks] = shares
        votes[num_tasks + self.world.rank] = (~torch.isfinite(shares)).any().float()
        votes[-2] = float(self._time_is_up())
        votes[-1] = float(self.stop_signal is not None)
        return D.all_reduce_sum(votes)

    def _time_is_up(self) -> bool:
        # Only rank 0's clock counts: clocks drift apart across nodes, and a rank that
        # stopped on its own would leave the others waiting in the next collective.
        limit = self.cfg.time_limit_minutes * 60
        return (
            self.world.is_main
            and limit > 0
            and time.monotonic() - self.started >= limit
        )

    def _nonfinite(self, task_losses: list[float], flags: list[float]) -> None:
        ranks = [r for r, flag in enumerate(flags) if flag]
        tasks = ", ".join(
            f"{t} ({v})"
            for t, v in zip(self.tasks, task_losses)
            if not math.isfinite(v)
        )
        where = f"step {self.step}: loss of {tasks} not finite on rank(s) {ranks}"
        if self.cfg.nonfinite_loss == "stop":
            raise TrainingStopped(f"{where}; every rank stopped (nonfinite_loss=stop)")
        # Once per event: the first rank that saw it speaks (with its rank prefix).
        if self.world.rank == ranks[0]:
            logger.warning(
                f"{where}; every rank skips this update (nonfinite_loss=skip)"
            )

    def fit(self) -> None:
        """Train until the last step, an early stop, the time limit or a stop signal."""
        if self.step >= self.total_steps:
            logger.info(
                f"all {self.total_steps} steps were done before: nothing to train"
            )
            return
        loader = self.loader()
        progress = self._progress_bar()
        window = _LogWindow(len(self.tasks))
        self.started = time.monotonic()
        with self._catch_stop_signals():
            for epoch in range(self.epoch, self.cfg.epochs):
                # A resumed run skips the steps its epoch already took; later epochs
                # start at their first step.
                self.sampler.set_epoch(
                    epoch, self.step_in_epoch if epoch == self.epoch else 0
                )
                self.epoch = epoch
                stop = self._train_epoch(loader, window, progress)
                if stop == "time":
                    break
                if "validation" in self.data.splits:
                    metrics = self.evaluate("validation")
                    stop = self._track_best(metrics) or stop
                if self.cfg.checkpoint_at_epoch_end:
                    self.save()
                if stop == "early":
                    logger.info(
                        f"early stopping: {self.cfg.best_metric} did not improve "
                        f"for {self.evals_since_best} validations (best "
                        f"{self.best_score:.4f} at step {self.best_step})"
                    )
                    break
                if self.step >= self.total_steps:
                    break
        if progress is not None:
            progress.close()

    def _train_epoch(
        self, loader: DataLoader, window: _LogWindow, progress: Any
    ) -> str | None:
        """The rest of the current epoch; returns ``"time"`` when the time limit ended
        training, else None. A stop signal checkpoints and raises ``RunInterrupted``."""
        batches = iter(loader)
        for index in range(self.sampler.start_step, self.sampler.steps_per_epoch):
            micro = [next(batches) for _ in range(self.plan.accumulation)]
            counts = self.global_label_counts(index)
            window.note_wait()
            self.step += 1
            result = self.train_step(micro, counts)
            self.step_in_epoch = index + 1
            if self.step_in_epoch == self.sampler.steps_per_epoch:
                # Before any checkpoint of this step, so that it holds the closed epoch.
                self.weighting.end_epoch()
            window.add(result)
            if progress is not None:
                progress.update(1)
            last = self.step >= self.total_steps
            stopping = result.out_of_time or result.interrupted
            if self.step % self.cfg.log_every == 0 or last or stopping:
                self._log_train(window)
            if result.interrupted:
                self._interrupt()
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save()
            if result.out_of_time:
                logger.info(
                    f"time limit of {self.cfg.time_limit_minutes:g} minutes "
                    f"reached: training stops after step {self.step}/"
                    f"{self.total_steps}"
                )
                return "time"
            if last:
                break
        return None

    # -----------------------------------------------------------------------------------
    # Checkpoints, stop signals and the best model.

    def trainer_state(self) -> dict[str, Any]:
        """Everything besides the engine that a resumed run needs to continue exactly."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.world.world_size,
            "global_batch_size": self.plan.global_batch_size,
            "seed": self.cfg.seed,
            "tasks": self.tasks,
            "best_metric_name": self.cfg.best_metric,
            "best_metric": self.best_score,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "label_maps": self.data.label_maps,
            "weighting_method": self.cfg.weighting.method,
            "weighting": self.weighting.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def save(self) -> None:
        """Checkpoint the current step on every rank (once per step)."""
        if self.last_saved_step == self.step:
            return
        save_checkpoint(
            self.engine,
            self.trainer_state(),
            self.output_dir,
            self.world,
            self.cfg.keep_checkpoints,
        )
        self.last_saved_step = self.step

    def resume_from(self, path: Path) -> None:
        """Restore a checkpoint: engine, RNG, position in the data, best-model tracking,
        the loss weighting and the sampler."""
        # The checkpoint was checked against this run's config before anything was
        # built (run.check_resume).
        state = load_checkpoint(self.engine, path, self.world)
        self.step, self.epoch = state["step"], state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        if self.step_in_epoch >= self.sampler.steps_per_epoch:  # saved at an epoch end
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.best_score, self.best_step = state["best_metric"], state["best_step"]
        self.evals_since_best = state["evals_since_best"]
        self.weighting.load_state_dict(state.get("weighting", {}))
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        self.last_saved_step = self.step
        # Lines a killed run wrote after this checkpoint are written again.
        self.recorder.truncate_metrics(self.step)

    @contextlib.contextmanager
    def _catch_stop_signals(self) -> Iterator[None]:
        # Signal handlers can only be set from the main thread (not in a notebook's
        # worker thread, for instance): there, signals keep their default action.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def note(signum: int, frame: Any) -> None:
            if self.stop_signal is None:
                self.stop_signal = signum
            if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
                signal.signal(signal.SIGINT, signal.default_int_handler)

        for sig in STOP_SIGNALS:
            signal.signal(sig, note)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _interrupt(self) -> None:
        received = (
            signal.Signals(self.stop_signal).name
            if self.stop_signal is not None
            else "a signal on another rank"
        )
        logger.info(f"{received} received: saving a checkpoint at step {self.step}")
        self.save()
        if self.world.is_main:
            (self.output_dir / REQUEUE_MARKER).write_text(f"{self.step}\n")
        self.recorder.flush()
        raise RunInterrupted(
            f"stopped at step {self.step}/{self.total_steps} by "
            f"{received}; a checkpoint was saved, continue with "
            "--resume auto"
        )

    def _track_best(self, metrics: dict[str, dict[str, Any]] | None) -> str | None:
        """Update the best score (rank 0 computes it, every rank learns it); returns
        ``"early"`` when early stopping's patience ran out."""
        score = None
        if metrics is not None:
            score = best_metric_value(
                self.cfg.best_metric, metrics, self.last_eval_loss
            )
        # Every rank must take the same early-stopping branch.
        score = D.broadcast_object(score)
        if is_better(self.cfg.best_metric, score, self.best_score):
            self.best_score, self.best_step, self.evals_since_best = score, self.step, 0
        else:
            self.evals_since_best += 1
        patience = self.cfg.early_stopping_patience
        return "early" if patience and self.evals_since_best >= patience else None

    def load_best(self) -> None:
        """Go back to the best checkpoint's weights (for the test split and the export)."""
        if self.best_step is None or self.best_step == self.step:
            return
        path = checkpoint_root(self.output_dir) / f"step-{self.best_step:08d}"
        pointer = checkpoint_root(self.output_dir) / BEST
        if not (pointer.is_file() and pointer.read_text().strip() == path.name):
            logger.warning(
                f"the best step ({self.best_step}) has no checkpoint (enable "
                "checkpoint_at_epoch_end): testing and exporting the last "
                "weights"
            )
            return
        self.engine.load_state(path / ENGINE_DIR)
        logger.info(
            f"loaded the best checkpoint (step {self.best_step}, "
            f"{self.cfg.best_metric} {self.best_score:.4f}) for test and export"
        )

    def _progress_bar(self) -> Any:
        show = self.cfg.progress_bar == "true" or (
            self.cfg.progress_bar == "auto" and sys.stderr.isatty()
        )
        if not (show and self.world.is_main):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True
        )

    def _log_train(self, window: _LogWindow) -> None:
        # No collective here: each step's losses were summed over ranks already.
        task_losses, loss, weights, grad_norm, steps, elapsed, wait = window.flush()
        samples_per_sec = steps * self.plan.global_batch_size / max(elapsed, 1e-9)
        lr, head_lr = self._lrs()
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/head_lr": head_lr,
            "train/samples_per_sec": samples_per_sec,
            "train/data_wait_share": wait / max(elapsed, 1e-9),
        }
        values.update({f"train/loss_{t}": v for t, v in zip(self.tasks, task_losses)})
        values.update({f"train/weight_{t}": w for t, w in zip(self.tasks, weights)})
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        self.recorder.scalars(values, self.step)
        per_task = " | ".join(
            f"loss_{t} {v:.4f}" for t, v in zip(self.tasks, task_losses)
        )
        if self.cfg.weighting.method != "sum":
            per_task += " | weights " + "/".join(f"{w:.3f}" for w in weights)
        norm_text = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        logger.info(
            f"step {self.step}/{self.total_steps} | epoch {self.epoch + 1} | "
            f"loss {loss:.4f} | {per_task} | lr {lr:.3e} | grad_norm {norm_text} | "
            f"samples/s {samples_per_sec:.1f}"
        )

    def _lrs(self) -> tuple[float, float]:
        """Current encoder and head learning rates."""
        by_group = dict(zip(self.engine.group_names, self.engine.lrs()))
        return by_group.get("encoder", float("nan")), by_group.get(
            "heads", float("nan")
        )

    # -----------------------------------------------------------------------------------
    # Evaluation: every rank runs its own disjoint shard, rank 0 gets each example once.

    def evaluate(self, split: str) -> dict[str, dict[str, Any]] | None:
        ds = self.data.splits[split]
        batches = eval_batches(
            ds["length"],
            self.world.rank,
            self.world.world_size,
            self.cfg.eval_batch_size,
        )
        # Own generator: evaluating must not consume the global RNG (see ``loader``).
        loader = DataLoader(
            ds,
            batch_sampler=[indices for indices, _ in batches],
            collate_fn=self.collator,
            num_workers=self.cfg.data.num_workers,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        ids, preds, labels, losses = [], [], [], []
        with self.engine.eval_mode():
            for (indices, real), batch in zip(batches, loader):
                batch = self._to_device(batch)
                batch_labels = batch.pop("labels")
                logits = self.engine.forward(batch)
                if not real:
                    continue  # a filler pass that kept this rank in step under ZeRO-3
                ids.append(np.asarray(indices))
                # Only argmax ids and label ids travel; logits would grow with the split.
                preds.append(
                    torch.stack([logits[t].argmax(-1) for t in self.tasks], 1).cpu()
                )
                labels.append(batch_labels.cpu())
                losses.append(
                    torch.stack(
                        [
                            F.cross_entropy(
                                logits[t].float(),
                                batch_labels[:, i],
                                reduction="none",
                                ignore_index=IGNORE_INDEX,
                            )
                            for i, t in enumerate(self.tasks)
                        ],
                        1,
                    ).cpu()
                )
        local = _pack(ids, preds, labels, losses, len(self.tasks))
        gathered = D.gather_to_main(local)
        if gathered is None:
            return None
        return self._report(split, gathered, len(ds))

    def _report(
        self, split: str, gathered: list[dict[str, np.ndarray]], size: int
    ) -> dict[str, dict[str, Any]]:
        ids = np.concatenate([g["ids"] for g in gathered])
        # The shards are disjoint by construction; this check is what makes the metrics
        # trustworthy, so it stays on in production.
        assert len(ids) == size and len(np.unique(ids)) == size, (
            f"evaluation saw {len(ids)} predictions for {size} examples"
        )
        order = np.argsort(ids)
        preds = np.concatenate([g["preds"] for g in gathered])[order]
        labels = np.concatenate([g["labels"] for g in gathered])[order]
        losses = np.concatenate([g["losses"] for g in gathered])[order]
        metrics = {
            t: task_metrics(preds[:, i], labels[:, i], self.data.label_maps[t])
            for i, t in enumerate(self.tasks)
        }
        record: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "split": split,
        }
        scalars = {}
        prefix = "eval" if split == "validation" else split
        total = 0.0
        for i, (task, m) in enumerate(metrics.items()):
            mask = labels[:, i] != IGNORE_INDEX
            task_loss = float(losses[mask, i].mean()) if mask.any() else float("nan")
            # Unweighted by class; weighted by task only with fixed (static) weights,
            # so that validation losses stay comparable across steps.
            total += self.weighting.fixed[i] * task_loss
            record.update(
                {
                    f"{task}/accuracy": m["accuracy"],
                    f"{task}/f1_macro": m["f1_macro"],
                    f"{task}/loss": task_loss,
                }
            )
            scalars.update(
                {
                    f"{prefix}/{task}/accuracy": m["accuracy"],
                    f"{prefix}/{task}/f1_macro": m["f1_macro"],
                    f"{prefix}/loss_{task}": task_loss,
                }
            )
            scalars.update(
                {
                    f"{prefix}/{task}/f1/{name.replace(' ', '_')}": c["f1-score"]
                    for name, c in m.get("per_class", {}).items()
                }
            )
        record["loss"] = scalars[f"{prefix}/loss"] = total
        self.last_eval_loss = total
        self.recorder.scalars(scalars, self.step)
        self.recorder.metrics_line(record)
        self.recorder.confusion_matrices(
            prefix,
            {t: m["confusion_matrix"] for t, m in metrics.items()},
            self.data.label_maps,
            self.step,
        )
        reports = self.output_dir / "reports"
        reports.mkdir(exist_ok=True)
        name = f"{split}_step{self.step}.json"
        (reports / name).write_text(json.dumps({**record, "tasks": metrics}, indent=1))
        logger.info(
            f"{split} (epoch {self.epoch + 1}, step {self.step}): loss {total:.4f} | "
            f"{summary_line(metrics)}"
        )
        return metrics


def _pack(
    ids: list[np.ndarray],
    preds: list[torch.Tensor],
    labels: list[torch.Tensor],
    losses: list[torch.Tensor],
    num_tasks: int,
) -> dict[str, np.ndarray]:
    if not ids:
        empty = np.zeros((0, num_tasks), dtype=np.int64)
        return {
            "ids": np.zeros(0, dtype=np.int64),
            "preds": empty,
            "labels": empty,
            "losses": empty.astype(np.float32),
        }
    return {
        "ids": np.concatenate(ids),
        "preds": torch.cat(preds).numpy(),
        "labels": torch.cat(labels).numpy(),
        "losses": torch.cat(losses).float().numpy(),
    }


class _LogWindow:
    """Sums over one logging interval; grad norms stay on the device until logged."""

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.reset()

    def reset(self) -> None:
        self.losses = [0.0] * self.num_tasks
        self.objective = 0.0
        self.weights = [math.nan] * self.num_tasks
        self.norms: list[torch.Tensor] = []
        self.steps = 0
        self.applied = 0
        self.wait = 0.0
        self.start = self.mark = time.perf_counter()

    def note_wait(self) -> None:
        now = time.perf_counter()
        self.wait += now - self.mark

    def add(self, result: StepResult) -> None:
        # A skipped step's losses are not finite: they stay out of the interval's mean.
        if result.applied:
            self.losses = [a + b for a, b in zip(self.losses, result.task_losses)]
            self.objective += result.objective
            self.applied += 1
        self.weights = result.weights
        if result.grad_norm is not None:
            self.norms.append(result.grad_norm.detach().float().reshape(()))
        self.steps += 1
        self.mark = time.perf_counter()

    def flush(
        self,
    ) -> tuple[list[float], float, list[float], float | None, int, float, float]:
        """Means over the applied steps (task losses, objective), the last step's
        weights, the mean grad norm, steps, seconds and data-wait seconds."""
        losses = [v / self.applied if self.applied else math.nan for v in self.losses]
        objective = self.objective / self.applied if self.applied else math.nan
        norm = float(torch.stack(self.norms).mean()) if self.norms else None
        elapsed = time.perf_counter() - self.start
        result = (losses, objective, self.weights, norm, self.steps, elapsed, self.wait)
        self.reset()
        return result


def warmup_steps(cfg: Config, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)
