"""The benchmark end to end on the tiny random BERT and the tiny data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtl_dist import bench


@pytest.mark.slow
def test_bench_reports_every_configuration(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # Offline, and in this process: four interpreter start-ups would cost more than
    # the steps themselves.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    code = bench.main(
        [
            "--data",
            str(tiny_data_dir),
            "--tasks",
            "topic,mood",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--batch",
            "8",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--peak-seconds",
            "0.2",
            "--in-process",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["config"]: r for r in summary["rows"]}
    assert set(rows) == set(bench.CONFIGS)
    for row in rows.values():
        assert row["samples_per_s"] > 0
        assert 0 <= row["padding_share"] < 1
        assert 0 <= row["data_wait_share"] < 1
    # Every sample of the naive loop is padded to max_length (128 by default).
    assert rows["naive_fp32"]["padding_share"] > rows["mtl_dist"]["padding_share"]
    speed = {name: row["samples_per_s"] for name, row in rows.items()}
    for base in ("hf_grouped", "hf_default", "naive_fp32"):
        assert summary["ratios"][f"mtl_dist / {base}"] == pytest.approx(
            speed["mtl_dist"] / speed[base]
        )


def test_ratios_only_divide_mtl_dist_by_baselines() -> None:
    rows = [
        {"config": "mtl_dist", "samples_per_s": 30.0},
        {"config": "mtl_dist@fp32", "samples_per_s": 60.0},
        {"config": "hf_default", "samples_per_s": 10.0},
        {"config": "hf_grouped", "samples_per_s": 20.0},
    ]
    assert bench.ratios(rows) == {
        "mtl_dist / hf_grouped": 1.5,
        "mtl_dist / hf_default": 3.0,
        "mtl_dist@fp32 / hf_grouped": 3.0,
        "mtl_dist@fp32 / hf_default": 6.0,
        "hf_grouped / hf_default": 2.0,
    }
