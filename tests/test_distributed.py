"""Several processes over gloo: exact evaluation and DDP training."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, run_module, tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def eval_at(world_size, tmp_path, model_dir, data_dir):
    out = tmp_path / f"ws{world_size}"
    args = tiny_args(
        model_dir,
        data_dir,
        out,
        "--precision",
        "fp32",
        "--global_batch_size",
        "12",
        "--eval_batch_size",
        "4",
    )
    result = run_module(args, nproc=world_size, module="tests.dist_eval_worker")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "eval_result.json").read_text())


def test_rank0_gets_every_example_once_and_metrics_match_one_process(
    tmp_path, tiny_model_dir, tiny_data_dir
):
    single = eval_at(1, tmp_path, tiny_model_dir, tiny_data_dir)
    assert single["metrics"]["topic"]["support"] == 31
    for world_size in (2, 3):
        multi = eval_at(world_size, tmp_path, tiny_model_dir, tiny_data_dir)
        seen = [i for rank_rows in multi["seen"] for i in rank_rows]
        assert len(multi["seen"]) == world_size
        assert sorted(seen) == list(range(31)), "an example was lost or counted twice"
        assert multi["metrics"] == single["metrics"]


def test_ddp_two_processes_trains_and_evaluates(
    tmp_path, tiny_model_dir, tiny_data_dir
):
    out = tmp_path / "ddp"
    result = run_module(tiny_args(tiny_model_dir, tiny_data_dir, out), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr
    assert (
        "global batch 8 = micro-batch 4 x accumulation 1 x world size 2"
        in result.stderr
    )
    splits = [m["split"] for m in read_metrics(out)]
    assert splits == ["validation", "validation", "test"]
    # Only rank 0 speaks: info lines carry no rank prefix, and none come from rank 1.
    assert "[rank 1] " not in "\n".join(
        line for line in result.stderr.splitlines() if " INFO " in line
    )
