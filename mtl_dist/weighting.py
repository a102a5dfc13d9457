"""How the task losses combine into the one loss that is minimised.

Each method gives a weight per task before a step (``weights``) and learns from the step's
task losses after it (``observe``). The task losses are each task's mean over the global
batch, summed over ranks by the step's one all-reduce, so every rank observes the same
numbers and computes the same weights without communicating. The weights are plain
floats computed in Python (IEEE doubles, no vectorised kernels), so ranks on different
CPUs cannot drift apart either.

Methods:

- ``sum``: every weight is 1 (the default).
- ``static``: the weights of ``tasks[].weight``.
- ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): one learned log-variance
  ``s_i`` per task; the objective is ``sum_i exp(-s_i) L_i + s_i / 2`` (the paper's
  form for a classification likelihood, ``L / sigma^2 + log sigma`` with
  ``s = log sigma^2``). The network's gradient sees the weights ``exp(-s_i)``; ``s`` is
  learned by Adam on its exact gradient ``-exp(-s_i) L_i + 1/2``, at the heads' learning
  rate and schedule. The optimum is ``exp(-s_i) = 1 / (2 L_i)``.
- ``dwa`` (Liu, Johns and Davison, CVPR 2019): ``w_i = K softmax_i(r_i / T)`` with
  ``r_i = L_i(t-1) / L_i(t-2)``, the ratio of a task's mean training loss over the last
  two intervals (epochs in the paper; ``weighting.dwa_interval`` steps if set); 1 for the
  first two intervals.
- ``rlw`` (Lin et al., TMLR 2022): ``w = softmax(z)``, ``z ~ N(0, I)`` drawn afresh every
  step, from the seed and the step, so every rank (and a resumed run) draws the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mtl_dist.config import Config
from mtl_dist.data import IGNORE_INDEX


class LossWeighting:
    """Weights of ``sum`` and ``static``; the base of the adaptive methods."""

    def __init__(self, cfg: Config) -> None:
        self.num_tasks = len(cfg.tasks)
        self.fixed = (
            [t.weight for t in cfg.tasks]
            if cfg.weighting.method == "static"
            else [1.0] * self.num_tasks
        )

    def weights(self, step: int) -> list[float]:
        """The weight of each task's loss in step ``step`` (1-based)."""
        return list(self.fixed)

    def regularizer(self) -> float:
        """The part of the objective that does not depend on the network."""
        return 0.0

    def observe(self, task_losses: list[float], step: int, lr: float) -> None:
        """Learn from a step that was applied; ``lr`` is the heads' current rate."""

    def end_epoch(self) -> None:
        """Called on every rank after the last step of each epoch."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class UncertaintyWeighting(LossWeighting):
    # Adam's constants; the learning rate comes from the heads' schedule.
    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.log_vars = [0.0] * self.num_tasks
        self.exp_avg = [0.0] * self.num_tasks
        self.exp_avg_sq = [0.0] * self.num_tasks
        self.updates = 0

    def weights(self, step: int) -> list[float]:
        return [math.exp(-s) for s in self.log_vars]

    def regularizer(self) -> float:
        return sum(s / 2 for s in self.log_vars)

    def observe(self, task_losses: list[float], step: int, lr: float) -> None:
        # Adam by hand on K numbers: the same few float operations on every rank, where
        # a torch kernel could round differently on another CPU's vector unit.
        b1, b2 = self.BETAS
        self.updates += 1
        for i, loss in enumerate(task_losses):
            grad = -math.exp(-self.log_vars[i]) * loss + 0.5
            self.exp_avg[i] = b1 * self.exp_avg[i] + (1 - b1) * grad
            self.exp_avg_sq[i] = b2 * self.exp_avg_sq[i] + (1 - b2) * grad * grad
            m_hat = self.exp_avg[i] / (1 - b1**self.updates)
            v_hat = self.exp_avg_sq[i] / (1 - b2**self.updates)
            self.log_vars[i] -= lr * m_hat / (math.sqrt(v_hat) + self.EPS)

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_vars": list(self.log_vars),
            "exp_avg": list(self.exp_avg),
            "exp_avg_sq": list(self.exp_avg_sq),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_vars = list(state["log_vars"])
        self.exp_avg = list(state["exp_avg"])
        self.exp_avg_sq = list(state["exp_avg_sq"])
        self.updates = int(state["updates"])


class DynamicWeightAverage(LossWeighting):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.temperature = cfg.weighting.dwa_temperature
        self.interval = cfg.weighting.dwa_interval  # 0 = one epoch
        self.sums = [0.0] * self.num_tasks
        self.count = 0
        self.history: list[list[float]] = []
        """Mean task losses of the last two completed intervals, oldest first."""
        self.current = [1.0] * self.num_tasks

    def weights(self, step: int) -> list[float]:
        return list(self.current)

    def observe(self, task_losses: list[float], step: int, lr: float) -> None:
        self.sums = [a + b for a, b in zip(self.sums, task_losses)]
        self.count += 1
        if self.interval and self.count == self.interval:
            self._close_interval()

    def end_epoch(self) -> None:
        if not self.interval and self.count:
            self._close_interval()

    def _close_interval(self) -> None:
        self.history = [*self.history, [s / self.count for s in self.sums]][-2:]
        self.sums, self.count = [0.0] * self.num_tasks, 0
        if len(self.history) < 2:
            return
        before, last = self.history
        ratios = [b / max(a, 1e-12) for a, b in zip(before, last)]
        top = max(r / self.temperature for r in ratios)
        exps = [math.exp(r / self.temperature - top) for r in ratios]
        self.current = [self.num_tasks * e / sum(exps) for e in exps]

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": list(self.sums),
            "count": self.count,
            "history": [list(h) for h in self.history],
            "current": list(self.current),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = list(state["sums"])
        self.count = int(state["count"])
        self.history = [list(h) for h in state["history"]]
        self.current = list(state["current"])


class RandomLossWeighting(LossWeighting):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.seed = cfg.seed

    def weights(self, step: int) -> list[float]:
        # numpy's PCG64 and normal sampler give the same stream on every platform; the
        # draw depends on nothing but the seed and the step, so it needs no state.
        z = np.random.default_rng([self.seed, step]).standard_normal(self.num_tasks)
        top = float(z.max())
        exps = [math.exp(float(v) - top) for v in z]
        return [e / sum(exps) for e in exps]


def build_weighting(cfg: Config) -> LossWeighting:
    method = cfg.weighting.method
    if method == "uncertainty":
        return UncertaintyWeighting(cfg)
    if method == "dwa":
        return DynamicWeightAverage(cfg)
    if method == "rlw":
        return RandomLossWeighting(cfg)
    assert method in ("sum", "static"), method  # checked by WeightingConfig
    return LossWeighting(cfg)


def class_weights(method: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Weight of each class in one task's cross-entropy, from the train labels.

    ``inverse`` gives class ``c`` the weight ``n / (classes x n_c)``, so every class
    weighs the same in total; ``sqrt_inverse`` is proportional to ``1 / sqrt(n_c)``.
    Both are scaled so that the mean weight of a labelled train row is 1, which keeps
    the loss on the scale of the unweighted one. Classes absent from train get 0.
    ``none`` gives every class 1.
    """
    if method == "none":
        return np.ones(num_classes)
    counts = np.bincount(labels[labels != IGNORE_INDEX], minlength=num_classes)
    counts = counts.astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    power = 1.0 if method == "inverse" else 0.5
    weights[present] = counts[present] ** -power
    return weights * counts.sum() / (counts * weights).sum()
