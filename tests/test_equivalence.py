"""Distributed training is the same training (docs/distributed-correctness.md).

With a fixed global batch, fp32 and dropout off, every configuration below must log the
same total and per-task loss as one process, step by step for 20 steps, within a relative
1e-4: DDP on 2 processes, DeepSpeed ZeRO-1/2/3 on 2 processes, one process accumulating 2
micro-batches, and two torchrun "nodes" of one process each. The train data has labels
missing unevenly across ranks, so the same runs check the global-batch normalisation.
The last tests inject a NaN loss, or a time limit, on one rank and check that every rank
takes the same decision at the same step, and that only rank 0 speaks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from mtl_dist.data import GlobalBatchSampler
from tests.conftest import (
    REPO,
    child_env,
    free_port,
    make_rows,
    run_module,
    write_jsonl,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 20
GLOBAL_BATCH = 8
SEED = 42
TOLERANCE = 1e-4
"""Largest relative difference allowed between two runs' losses at any step (see docs)."""
LOSS_TAGS = ("train/loss", "train/loss_topic", "train/loss_mood")


def uneven_rows() -> list[dict]:
    """160 rows (20 global batches) where rank 0 of 2 sees `mood` on about a quarter of
    its rows and rank 1 misses `topic` on about a quarter: a mean of per-rank means would
    weigh rank 0's few `mood` labels far more than the global mean does."""
    rows = make_rows(STEPS * GLOBAL_BATCH, seed=7)
    sampler = GlobalBatchSampler(
        len(rows), GLOBAL_BATCH, GLOBAL_BATCH // 2, world_size=2, rank=0, seed=SEED
    )
    rank0 = {i for batch in sampler for i in batch}
    for i, row in enumerate(rows):
        if i in rank0 and i % 4:
            row["mood"] = None
        elif i not in rank0 and i % 4 == 0:
            row["topic"] = None
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # A train split only: no evaluation passes, so the runs stay short.
    out = tmp_path_factory.mktemp("uneven")
    write_jsonl(out / "train.jsonl", uneven_rows())
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("equivalence")


def train_args(model_dir, data_dir, out, *extra: str) -> list[str]:
    # Plain shuffling, not length grouping: uneven_rows() places the missing labels by
    # the rows that the plain sampler gives rank 0.
    return [
        "--model.name_or_path",
        str(model_dir),
        "--model.random_init",
        "true",
        "--data.dataset",
        str(data_dir),
        "--data.group_by_length",
        "false",
        "--tasks",
        "topic,mood",
        "--output_dir",
        str(out),
        "--global_batch_size",
        str(GLOBAL_BATCH),
        "--epochs",
        "1",
        "--max_steps",
        str(STEPS),
        "--seed",
        str(SEED),
        "--data.max_length",
        "32",
        "--lr",
        "1e-3",
        "--log_every",
        "1",
        "--precision",
        "fp32",
        "--model.dropout",
        "0",
        "--model.head_dropout",
        "0",
        "--progress_bar",
        "false",
        *extra,
    ]


def logged_losses(out) -> dict[str, list[float]]:
    """Every step's logged losses, read back from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = {}
    for tag in LOSS_TAGS:
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == list(range(1, len(scalars) + 1)), tag
        losses[tag] = [e.value for e in scalars]
    return losses


def largest_relative_difference(
    run: dict[str, list[float]], reference: dict[str, list[float]]
) -> float:
    worst = 0.0
    for tag in LOSS_TAGS:
        assert len(run[tag]) == len(reference[tag]) == STEPS, tag
        for a, b in zip(run[tag], reference[tag]):
            worst = max(worst, abs(a - b) / abs(b))
    return worst


def train(model_dir, data_dir, out, *extra: str, nproc: int = 2):
    result = run_module(
        train_args(model_dir, data_dir, out, *extra), nproc=nproc, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process(work, tiny_model_dir, data_dir):
    train(tiny_model_dir, data_dir, work / "one", nproc=1)
    losses = logged_losses(work / "one")
    # The comparison means something only if training moves the loss far more than the
    # tolerance allows the runs to differ.
    moved = abs(losses["train/loss"][-1] - losses["train/loss"][0])
    assert moved > 100 * TOLERANCE * losses["train/loss"][0], losses["train/loss"]
    return losses


@pytest.fixture(scope="module")
def two_processes(work, tiny_model_dir, data_dir):
    train(tiny_model_dir, data_dir, work / "ddp")
    return logged_losses(work / "ddp")


def record(case: str, value: float) -> None:
    # The figure of each case, shown with `pytest -s` (docs/distributed-correctness.md).
    print(f"\n{case}: largest relative loss difference {value:.2e}")


# -------------------------------------------------------------------------------------
# Same losses, step by step.


def test_ddp_two_processes_matches_one(one_process, two_processes):
    worst = largest_relative_difference(two_processes, one_process)
    record("ddp-2", worst)
    assert worst <= TOLERANCE


def test_accumulation_two_matches_one_micro_batch(
    one_process, work, tiny_model_dir, data_dir
):
    out = work / "accumulation"
    result = train(
        tiny_model_dir,
        data_dir,
        out,
        "--micro_batch_size",
        str(GLOBAL_BATCH // 2),
        nproc=1,
    )
    assert "micro-batch 4 x accumulation 2 x world size 1" in result.stderr
    worst = largest_relative_difference(logged_losses(out), one_process)
    record("accumulation-2", worst)
    assert worst <= TOLERANCE


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_two_processes_matches_one(
    stage, one_process, work, tiny_model_dir, data_dir
):
    pytest.importorskip("deepspeed")
    out = work / f"zero{stage}"
    result = train(
        tiny_model_dir,
        data_dir,
        out,
        "--deepspeed",
        str(REPO / "ds_configs" / f"zero{stage}.json"),
    )
    assert f"DeepSpeed ZeRO stage {stage}" in result.stderr
    worst = largest_relative_difference(logged_losses(out), one_process)
    record(f"zero{stage}-2", worst)
    assert worst <= TOLERANCE


def test_two_nodes_match_two_processes_on_one_node(
    two_processes, work, tiny_model_dir, data_dir
):
    out = work / "two_nodes"
    port = free_port()
    procs, logs = [], []
    for node_rank in (0, 1):
        # Each "node" is one torchrun agent with one process; c10d rendezvous joins them
        # as a real two-node launch would. Both write to one output directory, as on a
        # shared file system.
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node_rank),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            "two-nodes-test",
            "-m",
            "mtl_dist.train",
            *train_args(tiny_model_dir, data_dir, out),
        ]
        log = (work / f"node{node_rank}.log").open("w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=child_env(),
                cwd=REPO,
                start_new_session=True,
            )
        )
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: end the agent and its workers
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    text = "\n".join((work / f"node{i}.log").read_text() for i in (0, 1))
    assert codes == [0, 0], text[-3000:]
    assert "world size 2" in text
    worst = largest_relative_difference(logged_losses(out), two_processes)
    record("two-nodes-vs-ddp-2", worst)
    assert worst <= TOLERANCE


# -------------------------------------------------------------------------------------
# Decisions are shared, and only rank 0 speaks.


def run_with_faults(out, model_dir, data_dir, env: dict[str, str], *extra: str):
    """2 processes through tests/fault_worker.py; every output line is tagged by torchrun
    with the process it came from (``[default<rank>]:``)."""
    out.mkdir(parents=True)
    env = {"MTL_TEST_RECORD_DIR": str(out), **env}
    result = run_module(
        train_args(model_dir, data_dir, out / "run", *extra),
        nproc=2,
        module="tests.fault_worker",
        env=env,
        timeout=300,
        torchrun_args=("--tee", "3", "--log-dir", str(out / "torchrun")),
    )
    calls = [
        json.loads((out / f"engine_calls_rank{r}.json").read_text()) for r in (0, 1)
    ]
    return result, result.stdout + result.stderr, calls


def lines_of(rank: int, text: str) -> list[str]:
    tag = f"[default{rank}]:"
    return [line[len(tag) :] for line in text.splitlines() if line.startswith(tag)]


NAN_STEPS = (3, 7)
NAN_RUN_STEPS = 10


def skip_nan_steps(out, model_dir, data_dir, *extra: str):
    """Rank 1's `mood` loss is NaN at steps 3 and 7 of 10; returns the logged losses."""
    env = {"MTL_TEST_NAN": "1:mood:" + ",".join(map(str, NAN_STEPS))}
    result, text, calls = run_with_faults(
        out, model_dir, data_dir, env, "--max_steps", str(NAN_RUN_STEPS), *extra
    )
    assert result.returncode == 0, text[-3000:]
    expected = [
        "skip" if step in NAN_STEPS else "step" for step in range(1, NAN_RUN_STEPS + 1)
    ]
    assert calls == [expected, expected]
    return logged_losses(out / "run"), text


@pytest.fixture(scope="module")
def nan_skipped_ddp(work, tiny_model_dir, data_dir):
    return skip_nan_steps(work / "nan_skip_ddp", tiny_model_dir, data_dir)


def test_nan_loss_on_one_rank_skips_that_step_on_every_rank(nan_skipped_ddp):
    losses, text = nan_skipped_ddp
    # Had any rank applied the NaN update, every later loss would be NaN.
    skipped = [step - 1 for step in NAN_STEPS]
    for i, value in enumerate(losses["train/loss"]):
        assert math.isnan(value) if i in skipped else math.isfinite(value), (i, value)

    # Only rank 0 speaks; rank 1's warning, once per event, carries its rank.
    rank0, rank1 = lines_of(0, text), lines_of(1, text)
    assert any("INFO step 10/10" in line for line in rank0)
    assert not [line for line in rank1 if " INFO " in line]
    warnings = [line for line in rank1 if " WARNING " in line]
    assert len(warnings) == 2, rank1
    assert (
        "WARNING [rank 1] step 3: loss of mood (nan) not finite on rank(s) [1]; "
        "every rank skips this update" in warnings[0]
    )
    assert "[rank 1] step 7:" in warnings[1]
    assert not [line for line in rank0 if "not finite" in line]


def test_deepspeed_skips_exactly_like_ddp(
    nan_skipped_ddp, work, tiny_model_dir, data_dir
):
    # ZeRO-2 with accumulation: a skipped step must leave DeepSpeed's micro-step count
    # in place (or a later step() would miss its accumulation boundary), and must move
    # neither weights, optimizer state nor LR, as the DDP run does not.
    pytest.importorskip("deepspeed")
    losses, _ = skip_nan_steps(
        work / "nan_skip_zero2",
        tiny_model_dir,
        data_dir,
        "--deepspeed",
        str(REPO / "ds_configs" / "zero2.json"),
        "--micro_batch_size",
        str(GLOBAL_BATCH // 4),
    )
    reference, _ = nan_skipped_ddp
    for tag in LOSS_TAGS:
        assert len(losses[tag]) == len(reference[tag]) == NAN_RUN_STEPS
        for step, (a, b) in enumerate(zip(losses[tag], reference[tag]), 1):
            if step in NAN_STEPS:
                assert math.isnan(a) and math.isnan(b)
            else:
                assert abs(a - b) <= TOLERANCE * abs(b), (tag, step, a, b)


def test_nan_loss_with_stop_policy_stops_every_rank_at_that_step(
    work, tiny_model_dir, data_dir
):
    out = work / "nan_stop"
    result, text, calls = run_with_faults(
        out,
        tiny_model_dir,
        data_dir,
        {"MTL_TEST_NAN": "1:mood:3"},
        "--nonfinite_loss",
        "stop",
    )
    assert result.returncode != 0
    assert calls == [["step", "step", "skip"]] * 2
    errors = [
        line for line in lines_of(0, text) if "error: step 3: loss of mood" in line
    ]
    assert len(errors) == 1 and "every rank stopped" in errors[0], text[-3000:]
    assert not [line for line in lines_of(1, text) if "error:" in line]
    assert "exitcode  : 3" in text  # torchrun's summary of the ranks' exit status


def test_time_limit_is_rank0s_decision_for_every_rank(work, tiny_model_dir, data_dir):
    # Rank 1's clock is frozen: had it decided for itself it would train on alone, and
    # the run would hang or fail in the next collective.
    out = work / "time_limit"
    result, text, calls = run_with_faults(
        out,
        tiny_model_dir,
        data_dir,
        {"MTL_TEST_FROZEN_CLOCK_RANK": "1"},
        "--time_limit_minutes",
        "1e-6",
    )
    assert result.returncode == 0, text[-3000:]
    assert calls == [["step"], ["step"]]
    assert any(
        "time limit of 1e-06 minutes reached: training stops after step 1/20" in line
        for line in lines_of(0, text)
    )
    assert (out / "run" / "model" / "mtl_model.json").is_file()  # still exported
