"""Loss weighting, task sampling and class weights through the real entry point: under
DDP and every ZeRO stage, the same on 1 and 2 processes, and exact across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_rows, run_module, tiny_args, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def per_task_dir(tmp_path_factory) -> Path:
    """Shared rows with both labels, plus a topic-only and a mood-only train file."""
    out = tmp_path_factory.mktemp("per_task")
    write_jsonl(out / "train.jsonl", make_rows(32, 11))
    write_jsonl(out / "validation.jsonl", make_rows(19, 12))
    topic = [{"text": r["text"], "topic": r["topic"]} for r in make_rows(48, 13)]
    mood = [{"text": r["text"], "mood": r["mood"]} for r in make_rows(24, 14)]
    write_jsonl(out / "topic.jsonl", topic)
    write_jsonl(out / "mood.jsonl", mood)
    return out


def task_flags(data_dir: Path, sampling: str = "proportional") -> list[str]:
    tasks = [
        {"name": "topic", "train_file": str(data_dir / "topic.jsonl")},
        {
            "name": "mood",
            "train_file": str(data_dir / "mood.jsonl"),
            "class_weights": "inverse",
        },
    ]
    return ["--tasks", json.dumps(tasks), "--data.task_sampling", sampling]


def tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def final_state(out: Path) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())


@pytest.mark.parametrize(
    "ds_config, method",
    [
        (None, "uncertainty"),
        ("zero0.json", "dwa"),
        ("zero1.json", "rlw"),
        ("zero2.json", "uncertainty"),
        ("zero3.json", "dwa"),
    ],
)
def test_weighting_trains_under_ddp_and_zero_with_bf16(
    tmp_path, tiny_model_dir, per_task_dir, ds_config, method
):
    out = tmp_path / "out"
    args = tiny_args(
        tiny_model_dir,
        per_task_dir,
        out,
        *task_flags(per_task_dir),
        "--weighting.method",
        method,
        "--weighting.dwa_interval",
        "2",
        "--precision",
        "bf16",
        "--log_every",
        "1",
        "--max_steps",
        "8",
    )
    if ds_config:
        args += ["--deepspeed", str(Path("ds_configs") / ds_config)]
    result = run_module(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = tensorboard(out)
    weights = {
        t: [v for _, v in scalars[f"train/weight_{t}"]] for t in ("topic", "mood")
    }
    assert len(weights["topic"]) == 8
    pairs = list(zip(weights["topic"], weights["mood"]))
    if method == "uncertainty":
        assert pairs[0] == (1.0, 1.0) and pairs[-1] != (1.0, 1.0)
        assert final_state(out)["weighting"]["updates"] == 8
    elif method == "dwa":
        # Intervals of 2 steps: steps 1-4 use 1, step 5 on the ratio of two means.
        assert pairs[:4] == [(1.0, 1.0)] * 4
        assert pairs[4] != (1.0, 1.0) and sum(pairs[4]) == pytest.approx(2.0)
    else:
        assert all(a + b == pytest.approx(1.0, abs=1e-6) for a, b in pairs)
        assert len(set(pairs)) == 8
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert {"mood/f1_macro", "topic/f1_macro"} <= metrics[-1].keys()
    assert "eval/mood/f1/positive" in scalars  # per-class F1


def run_exact(model_dir, data_dir, out, *extra: str, nproc: int = 1):
    """fp32, dropout off: 1 and 2 processes must agree step by step."""
    args = tiny_args(
        model_dir,
        data_dir,
        out,
        *task_flags(data_dir, "temperature"),
        "--precision",
        "fp32",
        "--model.dropout",
        "0",
        "--model.head_dropout",
        "0",
        "--log_every",
        "1",
        "--data.group_by_length",
        "false",
        *extra,
    )
    result = run_module(args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return tensorboard(out)


@pytest.mark.parametrize("method", ["uncertainty", "dwa"])
def test_weighted_task_sampled_run_is_the_same_on_one_and_two_processes(
    tmp_path, tiny_model_dir, per_task_dir, method
):
    extra = ("--weighting.method", method, "--weighting.dwa_interval", "3")
    one = run_exact(tiny_model_dir, per_task_dir, tmp_path / "one", *extra)
    two = run_exact(tiny_model_dir, per_task_dir, tmp_path / "two", *extra, nproc=2)
    tags = [
        "train/loss",
        "train/loss_topic",
        "train/loss_mood",
        "train/weight_topic",
        "train/weight_mood",
    ]
    worst = 0.0
    for tag in tags:
        assert [s for s, _ in one[tag]] == [s for s, _ in two[tag]]
        for (_, a), (_, b) in zip(one[tag], two[tag]):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    print(f"{method}: largest relative difference 1 vs 2 processes {worst:.2g}")
    assert worst <= 1e-4
    # Not vacuous: the weights moved away from 1 during the run.
    assert len({v for _, v in one["train/weight_mood"]}) > 2


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(out / "model" / "model.safetensors"),
        **load_file(out / "model" / "heads.safetensors"),
    }


@pytest.mark.parametrize("method", ["uncertainty", "dwa"])
def test_resume_continues_the_weighting_and_the_sampler_exactly(
    tmp_path, tiny_model_dir, per_task_dir, method
):
    # Dropout stays on: the RNG state is part of what a resume must restore.
    extra = [
        "--weighting.method",
        method,
        "--weighting.dwa_interval",
        "2",
        "--precision",
        "fp32",
        "--log_every",
        "1",
        "--checkpoint_every",
        "5",
        "--keep_checkpoints",
        "10",
        "--load_best_at_end",
        "false",
        *task_flags(per_task_dir, "round_robin"),
    ]
    full = tmp_path / "full"
    args = tiny_args(tiny_model_dir, per_task_dir, full, *extra)
    assert run_module(args).returncode == 0
    # Continue the full run's step-5 checkpoint (mid-epoch 1) in a new directory.
    resumed = tmp_path / "resumed"
    checkpoint = full / "checkpoints" / "step-00000005"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["weighting"]
    args = tiny_args(tiny_model_dir, per_task_dir, resumed, *extra)
    result = run_module(args + ["--resume", str(checkpoint)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    a, b = model_weights(full), model_weights(resumed)
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{method}: resume weight difference {difference:.3g}")
    assert difference <= 1e-6
    assert final_state(full)["weighting"] == final_state(resumed)["weighting"]
    assert final_state(full)["sampler"] == final_state(resumed)["sampler"]
    full_tb, resumed_tb = tensorboard(full), tensorboard(resumed)
    for tag in ("train/weight_topic", "train/weight_mood", "train/loss"):
        assert [v for s, v in full_tb[tag] if s > 5] == [v for _, v in resumed_tb[tag]]
