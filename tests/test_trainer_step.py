"""Trainer.train_step in one process: the global-batch loss arithmetic and the decisions
every rank must share, with a fake engine whose logits are a linear map of features."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
import torch.nn.functional as F

from mtl_dist.config import Config, TaskConfig, WeightingConfig
from mtl_dist.data import IGNORE_INDEX
from mtl_dist.distributed import World
from mtl_dist.engine import Engine
from mtl_dist.log import logger
from mtl_dist.trainer import Trainer, TrainingStopped
from mtl_dist.weighting import build_weighting

TASKS = {"topic": 3, "mood": 2}
FEATURES = 5
MICRO = 4


class LinearEngine(Engine):
    """Logits = features @ weight per task; it records step / skip and never updates, so
    the gradients of several calls add up as a reduction over ranks would add them."""

    group_names = ["heads"]

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.loss_scale_for_reduction = 1.0
        self.calls: list[str] = []

    def lrs(self):
        return [1e-3]

    def forward(self, batch):
        return {t: batch["features"] @ w for t, w in self.weights.items()}

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.calls.append("step")

    def skip_step(self):
        self.calls.append("skip")


def make_trainer(engine: Engine, rank: int = 0, world_size: int = 1, **cfg) -> Trainer:
    trainer = Trainer.__new__(Trainer)  # train_step needs no data, model or sampler
    trainer.cfg = Config(tasks=[TaskConfig(t) for t in TASKS], **cfg)
    trainer.world = World(rank, rank, world_size, torch.device("cpu"))
    trainer.engine = engine
    trainer.tasks = list(TASKS)
    trainer.weighting = build_weighting(trainer.cfg)
    trainer.class_weights = [None] * len(TASKS)
    trainer.step = 1
    trainer.started = time.monotonic()
    trainer.stop_signal = None
    return trainer


def uneven_global_batch(seed: int = 0):
    """16 rows for 2 ranks x 2 micro-steps of 4; rank r's micro-step k gets chunk 2k + r
    (as GlobalBatchSampler cuts them). Rank 0 has `mood` on one row per chunk, rank 1
    misses `topic` on one row per chunk."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(16, FEATURES, generator=gen)
    labels = torch.stack(
        [torch.randint(0, n, (16,), generator=gen) for n in TASKS.values()], 1
    )
    for chunk in range(4):
        rows = slice(chunk * MICRO, (chunk + 1) * MICRO)
        rank = chunk % 2
        if rank == 0:
            labels[rows, 1][1:] = IGNORE_INDEX
        else:
            labels[rows, 0][0] = IGNORE_INDEX
    return features, labels


def chunk(features, labels, index):
    rows = slice(index * MICRO, (index + 1) * MICRO)
    return {"features": features[rows], "labels": labels[rows]}


def make_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        t: torch.randn(FEATURES, n, generator=gen).requires_grad_()
        for t, n in TASKS.items()
    }


def test_shares_of_all_ranks_and_micro_steps_add_up_to_the_global_mean():
    features, labels = uneven_global_batch()
    weights = make_weights()
    engine = LinearEngine(weights)
    global_counts = (labels != IGNORE_INDEX).sum(0)
    total = torch.zeros(len(TASKS), dtype=torch.float64)
    for rank in (0, 1):
        micro = [chunk(features, labels, 2 * k + rank) for k in (0, 1)]
        result = make_trainer(engine).train_step(micro, global_counts)
        assert result.applied
        total += torch.tensor(result.task_losses, dtype=torch.float64)
    got_grads = {t: w.grad.clone() for t, w in weights.items()}

    # The definition: each task's mean over every labelled row of the global batch.
    for w in weights.values():
        w.grad = None
    expected = torch.stack(
        [
            F.cross_entropy(
                features @ weights[t], labels[:, i], ignore_index=IGNORE_INDEX
            )
            for i, t in enumerate(TASKS)
        ]
    )
    expected.sum().backward()
    assert torch.allclose(total.float(), expected.detach(), rtol=1e-6)
    for t, w in weights.items():
        assert torch.allclose(got_grads[t], w.grad, rtol=1e-5, atol=1e-7), t
    assert engine.calls == ["step", "step"]

    # The data makes the distinction matter: a mean of per-rank means is far off.
    per_rank = []
    for rank in (0, 1):
        rows = torch.cat(
            [torch.arange(c * MICRO, (c + 1) * MICRO) for c in (rank, rank + 2)]
        )
        per_rank.append(
            float(
                F.cross_entropy(
                    features[rows] @ weights["mood"].detach(),
                    labels[rows, 1],
                    ignore_index=IGNORE_INDEX,
                )
            )
        )
    assert abs(sum(per_rank) / 2 - float(expected[1].detach())) > 0.05


@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    # setup_logging() stops the package logger from reaching the root logger, which is
    # where caplog listens.
    monkeypatch.setattr(logger, "propagate", True)
    return caplog


def nan_mood_step(trainer: Trainer):
    features, labels = uneven_global_batch()
    trainer.engine.weights["mood"].data[0, 0] = torch.nan
    counts = (labels != IGNORE_INDEX).sum(0)
    return trainer.train_step([chunk(features, labels, 1)], counts)


def test_a_nonfinite_loss_skips_the_update_and_says_where(warnings_seen):
    trainer = make_trainer(LinearEngine(make_weights()))
    with warnings_seen.at_level(logging.WARNING, logger="mtl_dist"):
        result = nan_mood_step(trainer)
    assert trainer.engine.calls == ["skip"]
    assert not result.applied and result.grad_norm is None
    assert math.isfinite(result.task_losses[0]) and math.isnan(result.task_losses[1])
    assert [r.getMessage() for r in warnings_seen.records] == [
        "step 1: loss of mood (nan) not finite on rank(s) [0]; every rank skips this "
        "update (nonfinite_loss=skip)"
    ]


def test_a_nonfinite_loss_with_stop_policy_raises_after_skipping():
    trainer = make_trainer(LinearEngine(make_weights()), nonfinite_loss="stop")
    with pytest.raises(TrainingStopped, match=r"step 1: loss of mood \(nan\)"):
        nan_mood_step(trainer)
    assert trainer.engine.calls == ["skip"]


def test_only_rank0_votes_on_the_time_limit():
    features, labels = uneven_global_batch()
    counts = (labels != IGNORE_INDEX).sum(0)
    for rank, expected in ((0, True), (1, False)):
        # No process group here, so each rank's vote is its own: rank 1 never votes.
        trainer = make_trainer(
            LinearEngine(make_weights()),
            rank=rank,
            world_size=2,
            time_limit_minutes=0.5,
        )
        trainer.started -= 31
        result = trainer.train_step([chunk(features, labels, 0)], counts)
        assert result.out_of_time is expected


def test_class_weighted_shares_add_up_to_the_weighted_global_mean():
    """With class weights, a task's loss is the class-weighted mean over the global
    batch: the denominators are the summed weights of its labelled rows."""
    features, labels = uneven_global_batch(seed=3)
    weights = make_weights(seed=4)
    engine = LinearEngine(weights)
    per_class = [torch.tensor([0.5, 2.0, 1.0]), torch.tensor([3.0, 0.25])]
    rows = torch.stack(
        [
            torch.where(labels[:, i] != IGNORE_INDEX, w[labels[:, i].clamp(min=0)], 0.0)
            for i, w in enumerate(per_class)
        ],
        1,
    )
    total = torch.zeros(len(TASKS), dtype=torch.float64)
    for rank in (0, 1):
        trainer = make_trainer(engine)
        trainer.class_weights = per_class
        micro = [chunk(features, labels, 2 * k + rank) for k in (0, 1)]
        total += torch.tensor(
            trainer.train_step(micro, rows.sum(0)).task_losses, dtype=torch.float64
        )
    expected = [
        float(
            F.cross_entropy(
                features @ weights[t].detach(),
                labels[:, i],
                weight=per_class[i],
                ignore_index=IGNORE_INDEX,
            )
        )
        for i, t in enumerate(TASKS)
    ]
    assert torch.allclose(total.float(), torch.tensor(expected), rtol=1e-6)


def test_the_weighting_scales_each_tasks_gradient_and_the_objective():
    features, labels = uneven_global_batch()
    counts = (labels != IGNORE_INDEX).sum(0)
    micro = [chunk(features, labels, k) for k in range(4)]
    plain = make_weights()
    make_trainer(LinearEngine(plain)).train_step(micro, counts)
    weighted = make_weights()
    trainer = make_trainer(
        LinearEngine(weighted), weighting=WeightingConfig("uncertainty")
    )
    trainer.weighting.log_vars = [math.log(2.0), -math.log(3.0)]  # weights 1/2 and 3
    result = trainer.train_step(micro, counts)
    assert result.weights == pytest.approx([0.5, 3.0])
    for t, factor in zip(TASKS, (0.5, 3.0)):
        assert torch.allclose(weighted[t].grad, factor * plain[t].grad, rtol=1e-5)
    regularizer = (math.log(2.0) - math.log(3.0)) / 2
    expected = 0.5 * result.task_losses[0] + 3 * result.task_losses[1] + regularizer
    assert result.objective == pytest.approx(expected)
    # The applied step taught the log-variances: both moved.
    assert trainer.weighting.log_vars[0] != math.log(2.0)
    assert trainer.weighting.log_vars[1] != -math.log(3.0)
