"""The training loop, exact distributed evaluation and the run's outputs.

Loss normalisation. Each task's loss is the mean cross-entropy over *all* labelled examples
of that task in the global batch (every rank, every micro-step), not a mean of per-rank or
per-micro-batch means; those differ as soon as tasks are labelled on different rows. Each
step therefore counts the labels of its global batch first (one small all-reduce), divides
every micro-step's summed cross-entropy by those global counts, and lets the engine undo its
own averaging over ranks and micro-steps (``Engine.loss_scale_for_reduction``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mtl_dist import distributed as D
from mtl_dist.config import Config
from mtl_dist.data import IGNORE_INDEX, Collator, GlobalBatchSampler, TokenizedData, eval_batches
from mtl_dist.distributed import World
from mtl_dist.engine import Engine
from mtl_dist.errors import ConfigError
from mtl_dist.log import RunRecorder, logger
from mtl_dist.metrics import summary_line, task_metrics


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: ``global = micro x accumulation x world_size``."""

    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    world_size: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch_size} = micro-batch "
                f"{self.micro_batch_size} x accumulation {self.accumulation} x world size "
                f"{self.world_size}")


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    micro = cfg.micro_batch_size or cfg.global_batch_size // world_size
    if micro == 0 or cfg.global_batch_size % (micro * world_size):
        fix = (f"pick a global_batch_size that is a multiple of micro_batch_size x "
               f"world_size = {max(micro, 1)} x {world_size}")
        raise ConfigError("global_batch_size", cfg.global_batch_size, fix,
                          "does not split evenly over ranks and micro-steps")
    accumulation = cfg.global_batch_size // (micro * world_size)
    return BatchPlan(cfg.global_batch_size, micro, accumulation, world_size)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    # Under ZeRO-3 a parameter's local tensor is a shard; ds_numel is its full size.
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(map(numel, params)), sum(numel(p) for p in params if p.requires_grad)


class Trainer:
    def __init__(self, cfg: Config, world: World, data: TokenizedData, engine: Engine,
                 plan: BatchPlan, collator: Collator, recorder: RunRecorder,
                 output_dir: Path) -> None:
        self.cfg = cfg
        self.world = world
        self.data = data
        self.engine = engine
        self.plan = plan
        self.collator = collator
        self.recorder = recorder
        self.output_dir = output_dir
        self.tasks = [t.name for t in cfg.tasks]
        self.weights = torch.tensor([t.weight for t in cfg.tasks], device=world.device)
        self.sampler = GlobalBatchSampler(
            len(data.splits["train"]), plan.global_batch_size, plan.micro_batch_size,
            world.world_size, world.rank, cfg.seed)
        self.total_steps = self.planned_steps(cfg, len(data.splits["train"]), plan)
        self.step = 0
        self.epoch = 0

    @staticmethod
    def planned_steps(cfg: Config, num_train: int, plan: BatchPlan) -> int:
        """Optimizer steps of the whole run: all epochs, capped by ``max_steps``."""
        per_epoch = num_train // plan.global_batch_size
        if per_epoch == 0:
            raise ConfigError("global_batch_size", cfg.global_batch_size,
                              f"use at most {num_train} (the train split's size)",
                              "larger than the train split")
        total = per_epoch * cfg.epochs
        return min(total, cfg.max_steps) if cfg.max_steps else total

    # -----------------------------------------------------------------------------------
    # Training.

    def loader(self) -> DataLoader:
        return DataLoader(self.data.splits["train"], batch_sampler=self.sampler,
                          collate_fn=self.collator, num_workers=self.cfg.data.num_workers,
                          pin_memory=self.world.device.type == "cuda")

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.world.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        """One optimizer step over this rank's micro-batches; returns this rank's share of
        each task's loss (sum over ranks = the global-batch mean) and the grad norm."""
        counts = sum((mb["labels"] != IGNORE_INDEX).sum(0) for mb in micro_batches)
        counts = D.all_reduce_sum(counts.to(self.world.device, torch.float32))
        denominators = counts.clamp(min=1.0)
        shares = torch.zeros(len(self.tasks), device=self.world.device)
        last = len(micro_batches) - 1
        for k, mb in enumerate(micro_batches):
            mb = self._to_device(mb)
            labels = mb.pop("labels")
            with self.engine.no_sync(skip=k < last):
                logits = self.engine.forward(mb)
                sums = torch.stack([
                    F.cross_entropy(logits[t].float(), labels[:, i], reduction="sum",
                                    ignore_index=IGNORE_INDEX)
                    for i, t in enumerate(self.tasks)])
                task_losses = sums / denominators
                loss = (self.weights * task_losses).sum()
                self.engine.backward(loss * self.engine.loss_scale_for_reduction)
            shares += task_losses.detach()
        return shares, self.engine.step()

    def fit(self) -> None:
        loader = self.loader()
        progress = self._progress_bar()
        window = _LogWindow(len(self.tasks), self.world.device)
        start_epoch = self.epoch
        for epoch in range(start_epoch, self.cfg.epochs):
            self.epoch = epoch
            self.sampler.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(self.sampler.steps_per_epoch):
                micro = [next(batches) for _ in range(self.plan.accumulation)]
                window.note_wait()
                shares, norm = self.train_step(micro)
                self.step += 1
                window.add(shares, norm)
                if progress is not None:
                    progress.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self._log_train(window)
                if self.step >= self.total_steps:
                    break
            del batches  # release the loader's workers before evaluating
            if "validation" in self.data.splits:
                self.evaluate("validation")
            if self.step >= self.total_steps:
                break
        if progress is not None:
            progress.close()

    def _progress_bar(self) -> Any:
        show = self.cfg.progress_bar == "true" or (
            self.cfg.progress_bar == "auto" and sys.stderr.isatty())
        if not (show and self.world.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, unit="step",
                    dynamic_ncols=True)

    def _log_train(self, window: _LogWindow) -> None:
        # The one host sync of the logging interval: losses and norms live on the device
        # until here, and the all-reduce is matched on every rank (same step numbers).
        task_losses, grad_norm, steps, elapsed, wait = window.flush()
        loss = float((self.weights.cpu() * task_losses).sum())
        samples_per_sec = steps * self.plan.global_batch_size / max(elapsed, 1e-9)
        lr, head_lr = self._lrs()
        values = {"train/loss": loss, "train/lr": lr, "train/head_lr": head_lr,
                  "train/samples_per_sec": samples_per_sec,
                  "train/data_wait_share": wait / max(elapsed, 1e-9)}
        values.update({f"train/loss_{t}": float(v) for t, v in zip(self.tasks, task_losses)})
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        self.recorder.scalars(values, self.step)
        per_task = " | ".join(f"loss_{t} {float(v):.4f}"
                              for t, v in zip(self.tasks, task_losses))
        norm_text = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        logger.info(f"step {self.step}/{self.total_steps} | epoch {self.epoch + 1} | "
                    f"loss {loss:.4f} | {per_task} | lr {lr:.3e} | grad_norm {norm_text} | "
                    f"samples/s {samples_per_sec:.1f}")

    def _lrs(self) -> tuple[float, float]:
        """Current encoder and head learning rates."""
        by_group = dict(zip(self.engine.group_names, self.engine.lrs()))
        return by_group.get("encoder", float("nan")), by_group.get("heads", float("nan"))

    # -----------------------------------------------------------------------------------
    # Evaluation: every rank runs its own disjoint shard, rank 0 gets each example once.

    def evaluate(self, split: str) -> dict[str, dict[str, Any]] | None:
        ds = self.data.splits[split]
        batches = eval_batches(ds["length"], self.world.rank, self.world.world_size,
                               self.cfg.eval_batch_size)
        loader = DataLoader(ds, batch_sampler=[indices for indices, _ in batches],
                            collate_fn=self.collator, num_workers=self.cfg.data.num_workers)
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
                preds.append(torch.stack([logits[t].argmax(-1) for t in self.tasks], 1).cpu())
                labels.append(batch_labels.cpu())
                losses.append(torch.stack([
                    F.cross_entropy(logits[t].float(), batch_labels[:, i], reduction="none",
                                    ignore_index=IGNORE_INDEX)
                    for i, t in enumerate(self.tasks)], 1).cpu())
        local = _pack(ids, preds, labels, losses, len(self.tasks))
        gathered = D.gather_to_main(local)
        if gathered is None:
            return None
        return self._report(split, gathered, len(ds))

    def _report(self, split: str, gathered: list[dict[str, np.ndarray]],
                size: int) -> dict[str, dict[str, Any]]:
        ids = np.concatenate([g["ids"] for g in gathered])
        # The shards are disjoint by construction; this check is what makes the metrics
        # trustworthy, so it stays on in production.
        assert len(ids) == size and len(np.unique(ids)) == size, (
            f"evaluation saw {len(ids)} predictions for {size} examples")
        order = np.argsort(ids)
        preds = np.concatenate([g["preds"] for g in gathered])[order]
        labels = np.concatenate([g["labels"] for g in gathered])[order]
        losses = np.concatenate([g["losses"] for g in gathered])[order]
        metrics = {t: task_metrics(preds[:, i], labels[:, i], self.data.label_maps[t])
                   for i, t in enumerate(self.tasks)}
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "split": split}
        scalars = {}
        prefix = "eval" if split == "validation" else split
        total = 0.0
        for i, (task, m) in enumerate(metrics.items()):
            mask = labels[:, i] != IGNORE_INDEX
            task_loss = float(losses[mask, i].mean()) if mask.any() else float("nan")
            total += self.cfg.tasks[i].weight * task_loss
            record.update({f"{task}/accuracy": m["accuracy"], f"{task}/f1_macro": m["f1_macro"],
                           f"{task}/loss": task_loss})
            scalars.update({f"{prefix}/{task}/accuracy": m["accuracy"],
                            f"{prefix}/{task}/f1_macro": m["f1_macro"],
                            f"{prefix}/loss_{task}": task_loss})
        record["loss"] = scalars[f"{prefix}/loss"] = total
        self.recorder.scalars(scalars, self.step)
        self.recorder.metrics_line(record)
        reports = self.output_dir / "reports"
        reports.mkdir(exist_ok=True)
        name = f"{split}_step{self.step}.json"
        (reports / name).write_text(json.dumps({**record, "tasks": metrics}, indent=1))
        logger.info(f"{split} (epoch {self.epoch + 1}, step {self.step}): loss {total:.4f} | "
                    f"{summary_line(metrics)}")
        return metrics


def _pack(ids: list[np.ndarray], preds: list[torch.Tensor], labels: list[torch.Tensor],
          losses: list[torch.Tensor], num_tasks: int) -> dict[str, np.ndarray]:
    if not ids:
        empty = np.zeros((0, num_tasks), dtype=np.int64)
        return {"ids": np.zeros(0, dtype=np.int64), "preds": empty, "labels": empty,
                "losses": empty.astype(np.float32)}
    return {"ids": np.concatenate(ids),
            "preds": torch.cat(preds).numpy(),
            "labels": torch.cat(labels).numpy(),
            "losses": torch.cat(losses).float().numpy()}


class _LogWindow:
    """Device-side sums over one logging interval, read back once when it is logged."""

    def __init__(self, num_tasks: int, device: torch.device) -> None:
        self.num_tasks = num_tasks
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.shares = torch.zeros(self.num_tasks, device=self.device)
        self.norms: list[torch.Tensor] = []
        self.steps = 0
        self.wait = 0.0
        self.start = self.mark = time.perf_counter()

    def note_wait(self) -> None:
        now = time.perf_counter()
        self.wait += now - self.mark

    def add(self, shares: torch.Tensor, norm: torch.Tensor | None) -> None:
        self.shares += shares
        if norm is not None:
            self.norms.append(norm.detach().float().reshape(()))
        self.steps += 1
        self.mark = time.perf_counter()

    def flush(self) -> tuple[torch.Tensor, float | None, int, float, float]:
        totals = D.all_reduce_sum(self.shares.clone()).cpu() / max(self.steps, 1)
        norm = float(torch.stack(self.norms).mean()) if self.norms else None
        result = (totals, norm, self.steps, time.perf_counter() - self.start, self.wait)
        self.reset()
        return result


def warmup_steps(cfg: Config, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)
