"""Loss weighting methods, each against its paper's definition, and class weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtl_dist.config import Config, TaskConfig, WeightingConfig
from mtl_dist.data import IGNORE_INDEX
from mtl_dist.errors import ConfigError
from mtl_dist.weighting import (
    DynamicWeightAverage,
    RandomLossWeighting,
    UncertaintyWeighting,
    build_weighting,
    class_weights,
)


def config(method: str, weights=(1.0, 1.0), **kwargs) -> Config:
    tasks = [TaskConfig(f"t{i}", weight=w) for i, w in enumerate(weights)]
    return Config(tasks=tasks, weighting=WeightingConfig(method, **kwargs))


def test_sum_weighs_every_task_one():
    assert build_weighting(config("sum")).weights(1) == [1.0, 1.0]


def test_static_uses_the_task_weights():
    weighting = build_weighting(config("static", weights=(0.25, 3.0)))
    assert weighting.weights(7) == [0.25, 3.0]
    assert weighting.regularizer() == 0.0


def test_task_weights_without_static_are_refused():
    with pytest.raises(ConfigError, match="weighting.method.*static"):
        config("sum", weights=(2.0, 1.0))


def test_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match="weighting.method.*uncertainty"):
        WeightingConfig("gradnorm")


def test_uncertainty_learns_weights_inverse_to_twice_the_loss():
    """Kendall et al.: minimising exp(-s) L + s/2 over s gives exp(-s) = 1 / (2 L), so
    the task with the larger loss ends with the smaller weight."""
    weighting = build_weighting(config("uncertainty"))
    assert isinstance(weighting, UncertaintyWeighting)
    assert weighting.weights(1) == [1.0, 1.0]  # s = 0: plain sum at the start
    losses = [2.0, 0.25]
    for step in range(1, 3001):
        weighting.observe(losses, step, lr=0.01)
    assert weighting.weights(3001) == pytest.approx([1 / 4, 2.0], rel=1e-2)
    expected = sum(math.log(2 * v) / 2 for v in losses)
    assert weighting.regularizer() == pytest.approx(expected, rel=1e-2)


def test_uncertainty_gradient_matches_the_objective():
    """The first Adam step moves each s against the sign of d/ds (exp(-s) L + s/2)."""
    weighting = build_weighting(config("uncertainty"))
    weighting.observe([2.0, 0.1], 1, lr=0.1)
    # d/ds at s = 0 is 1/2 - L: negative for L = 2 (s grows), positive for 0.1.
    assert weighting.log_vars[0] == pytest.approx(0.1)
    assert weighting.log_vars[1] == pytest.approx(-0.1)


def test_uncertainty_state_round_trips():
    a = build_weighting(config("uncertainty"))
    for step in range(1, 6):
        a.observe([1.5, 0.5], step, lr=0.05)
    b = build_weighting(config("uncertainty"))
    b.load_state_dict(a.state_dict())
    a.observe([1.0, 1.0], 6, lr=0.05)
    b.observe([1.0, 1.0], 6, lr=0.05)
    assert a.weights(7) == b.weights(7)


def dwa_after(epochs: list[list[list[float]]], **kwargs) -> DynamicWeightAverage:
    weighting = build_weighting(config("dwa", **kwargs))
    assert isinstance(weighting, DynamicWeightAverage)
    step = 0
    for epoch in epochs:
        for losses in epoch:
            step += 1
            weighting.observe(losses, step, lr=0.0)
        weighting.end_epoch()
    return weighting


def test_dwa_is_one_for_the_first_two_epochs():
    assert dwa_after([]).weights(1) == [1.0, 1.0]
    assert dwa_after([[[1.0, 1.0]]]).weights(2) == [1.0, 1.0]


def test_dwa_follows_the_ratio_of_the_last_two_epoch_means():
    """Liu et al.: w_i = K exp(r_i / T) / sum_j exp(r_j / T), r_i = L_i(t-1) / L_i(t-2),
    with L the epoch's mean training loss. The task whose loss fell less gets more."""
    epochs = [
        [[2.0, 1.0], [2.0, 3.0]],  # means 2.0, 2.0
        [[1.0, 1.8], [1.0, 2.2]],  # means 1.0, 2.0: t0 halved, t1 stayed
    ]
    weighting = dwa_after(epochs)
    r = np.array([1.0 / 2.0, 2.0 / 2.0])
    expected = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    assert weighting.weights(5) == pytest.approx(expected.tolist())
    assert weighting.weights(5)[1] > weighting.weights(5)[0]
    assert sum(weighting.weights(5)) == pytest.approx(2.0)


def test_dwa_temperature_and_interval():
    # Every 2 steps is one point of the history instead of every epoch.
    weighting = dwa_after(
        [[[4.0, 1.0], [4.0, 1.0], [1.0, 1.0], [1.0, 1.0]]],
        dwa_interval=2,
        dwa_temperature=0.5,
    )
    r = np.array([0.25, 1.0])
    expected = 2 * np.exp(r / 0.5) / np.exp(r / 0.5).sum()
    assert weighting.weights(5) == pytest.approx(expected.tolist())


def test_dwa_resumes_mid_epoch_exactly():
    first = [[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]]
    uninterrupted = dwa_after([first, [[1.0, 1.0], [0.5, 1.5], [1.0, 1.0]]])
    # Interrupted after the first step of the second epoch: the state carries the
    # partial sums, the resumed object continues them.
    partial = dwa_after([first])
    partial.observe([1.0, 1.0], 4, lr=0.0)
    resumed = build_weighting(config("dwa"))
    resumed.load_state_dict(partial.state_dict())
    resumed.observe([0.5, 1.5], 5, lr=0.0)
    resumed.observe([1.0, 1.0], 6, lr=0.0)
    resumed.end_epoch()
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_rlw_draws_softmax_of_a_normal_each_step():
    """Lin et al.: w = softmax(z), z ~ N(0, I), a new draw every step; the same draw
    for the same seed and step (every rank, a resumed run)."""
    weighting = build_weighting(config("rlw", weights=(1.0, 1.0, 1.0)))
    assert isinstance(weighting, RandomLossWeighting)
    draws = np.array([weighting.weights(step) for step in range(1, 2001)])
    assert np.allclose(draws.sum(1), 1.0) and (draws > 0).all()
    assert not np.allclose(draws[0], draws[1])
    assert draws.mean(0) == pytest.approx([1 / 3] * 3, abs=0.02)
    # The normal behind it: log-weight differences are z_i - z_j, variance 2.
    diff = np.log(draws[:, 0]) - np.log(draws[:, 1])
    assert diff.var() == pytest.approx(2.0, rel=0.15)
    again = build_weighting(config("rlw", weights=(1.0, 1.0, 1.0)))
    assert again.weights(17) == weighting.weights(17)
    other_seed = build_weighting(
        Config(
            tasks=[TaskConfig(f"t{i}") for i in range(3)],
            weighting=WeightingConfig("rlw"),
            seed=7,
        )
    )
    assert other_seed.weights(17) != weighting.weights(17)


def test_class_weights_inverse_balances_the_classes():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1 + [IGNORE_INDEX] * 5)
    weights = class_weights("inverse", labels, 4)
    counts = np.array([90, 9, 1, 0])
    # Every present class weighs the same in total; the absent one gets 0.
    totals = weights * counts
    assert totals[:3] == pytest.approx([totals[0]] * 3)
    assert weights[3] == 0.0
    # The mean weight of a labelled row is 1.
    assert (weights * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert weights[:3] == pytest.approx(100 / (3 * counts[:3]))


def test_class_weights_sqrt_inverse_is_milder():
    labels = np.array([0] * 100 + [1] * 4)
    inverse = class_weights("inverse", labels, 2)
    sqrt = class_weights("sqrt_inverse", labels, 2)
    assert sqrt[1] / sqrt[0] == pytest.approx(5.0)  # sqrt(100 / 4)
    assert inverse[1] / inverse[0] == pytest.approx(25.0)
    assert (sqrt * [100, 4]).sum() / 104 == pytest.approx(1.0)
    assert class_weights("none", labels, 2).tolist() == [1.0, 1.0]
