"""One process, end to end through the real entry point, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mtl_dist.model import load_exported
from tests.conftest import REPO, read_metrics, run_module, tiny_args

pytestmark = pytest.mark.slow

TRAIN_TAGS = [
    "train/loss",
    "train/loss_topic",
    "train/loss_mood",
    "train/lr",
    "train/grad_norm",
    "train/samples_per_sec",
]
EVAL_TAGS = [
    "eval/loss",
    "eval/topic/accuracy",
    "eval/topic/f1_macro",
    "eval/mood/accuracy",
    "eval/mood/f1_macro",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_module(
        # A learning rate high enough that the tiny random model learns in 36 steps.
        tiny_args(tiny_model_dir, tiny_data_dir, out, "--epochs", "3", "--lr", "1e-2")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def test_run_directory_contents(finished_run):
    out, _ = finished_run
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 3 and [t["name"] for t in config["tasks"]] == [
        "topic",
        "mood",
    ]
    assert json.loads((out / "labels.json").read_text()) == {
        "topic": ["food", "sport", "tech"],
        "mood": ["negative", "positive"],
    }
    metrics = read_metrics(out)
    assert [(m["split"], m["epoch"]) for m in metrics] == [
        ("validation", 1),
        ("validation", 2),
        ("validation", 3),
        ("test", 3),
    ]
    for m in metrics:
        for task in ("topic", "mood"):
            assert 0.0 <= m[f"{task}/accuracy"] <= 1.0 and f"{task}/f1_macro" in m


def test_startup_block_and_step_lines(finished_run):
    _, log = finished_run
    assert "global batch 8 = micro-batch 8 x accumulation 1 x world size 1" in log
    assert "steps: 12 per epoch x 3 epochs = 36 total" in log
    step_lines = [line for line in log.splitlines() if "| loss_topic " in line]
    assert len(step_lines) == 18  # every 2 steps
    assert all("grad_norm" in line and "samples/s" in line for line in step_lines)


def test_tensorboard_tags_read_back(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert set(TRAIN_TAGS + EVAL_TAGS) <= tags, tags
    for tag in EVAL_TAGS:
        assert len(events.Scalars(tag)) == 3, tag  # one value per epoch
    assert [e.step for e in events.Scalars("eval/loss")] == [12, 24, 36]
    # Confusion matrices as images: one per task per evaluation, test at the end.
    images = set(events.Tags()["images"])
    for task in ("topic", "mood"):
        assert len(events.Images(f"eval/{task}/confusion_matrix")) == 3
        assert f"test/{task}/confusion_matrix" in images


def test_it_learns(finished_run):
    out, _ = finished_run
    test = read_metrics(out)[-1]
    # The tiny data's words give the labels away; chance is 0.33 and 0.5.
    assert test["topic/accuracy"] > 0.6 and test["mood/accuracy"] > 0.7, test
    losses = [m["loss"] for m in read_metrics(out) if m["split"] == "validation"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_exported_model_reproduces_test_predictions(finished_run, tiny_data_dir):
    out, _ = finished_run
    model, tokenizer, label_maps = load_exported(out / "model")
    assert label_maps["topic"] == ["food", "sport", "tech"]
    rows = [
        json.loads(x) for x in (tiny_data_dir / "test.jsonl").read_text().splitlines()
    ]
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch)
    preds = logits["topic"].argmax(-1).tolist()
    accuracy = (
        sum(label_maps["topic"][p] == r["topic"] for p, r in zip(preds, rows)) / 20
    )
    reported = read_metrics(out)[-1]["topic/accuracy"]
    # bf16 autocast during training eval vs fp32 here: allow one flipped example.
    assert abs(accuracy - reported) <= 1 / 20 + 1e-9


def test_output_dir_with_another_run_is_refused(
    finished_run, tiny_model_dir, tiny_data_dir
):
    out, _ = finished_run
    result = run_module(tiny_args(tiny_model_dir, tiny_data_dir, out, "--epochs", "1"))
    assert result.returncode == 2
    assert "output_dir" in result.stderr and "--overwrite" in result.stderr
    assert "epochs" in result.stderr  # says what differs


def test_one_task(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "one"
    args = tiny_args(
        tiny_model_dir, tiny_data_dir, out, "--tasks", "mood", "--max_steps", "3"
    )
    result = run_module(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(read_metrics(out)[-1]) >= {"mood/accuracy", "mood/f1_macro"}
    assert "topic/accuracy" not in read_metrics(out)[-1]


def test_three_tasks_on_dailydialog(tmp_path, tiny_model_dir):
    from tests.conftest import SHARED_DATA

    source = SHARED_DATA / "dailydialog"
    if not source.is_dir():
        pytest.skip(
            f"{source} not present (it ships with the project's shared data only)"
        )
    data = tmp_path / "dd"
    data.mkdir()
    # Every n-th line: the files are ordered by dialogue, and topics come in runs.
    for split, stride in (("train", 29), ("validation", 80), ("test", 150)):
        lines = (source / f"{split}.jsonl").read_text().splitlines()[::stride]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = tiny_args(
        tiny_model_dir,
        data,
        out,
        "--tasks",
        "act,emotion,topic",
        "--max_steps",
        "4",
        "--global_batch_size",
        "16",
    )
    result = run_module(args)
    assert result.returncode == 0, result.stderr[-3000:]
    last = read_metrics(out)[-1]
    assert last["split"] == "test"
    assert all(f"{t}/f1_macro" in last for t in ("act", "emotion", "topic"))


def test_predict_cli_reads_stdin_and_writes_jsonl(finished_run, tmp_path):
    import subprocess
    import sys

    out, _ = finished_run
    result = subprocess.run(
        [sys.executable, "-m", "mtl_dist.predict", "--model", str(out / "model")],
        input="the match was great\n\nmy laptop battery is awful\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in records] == [
        "the match was great",
        "my laptop battery is awful",
    ]
    for r in records:
        assert r["topic"]["label"] in ("food", "sport", "tech")
        assert 0.0 < r["mood"]["probability"] <= 1.0


def test_evaluate_cli_matches_the_run_and_writes_json(
    finished_run, tiny_data_dir, tmp_path
):
    out, _ = finished_run
    report_path = tmp_path / "report.json"
    result = run_module(
        [
            "--model",
            str(out / "model"),
            "--data",
            str(tiny_data_dir / "test.jsonl"),
            "--output",
            str(report_path),
        ],
        module="mtl_dist.evaluate",
    )
    assert result.returncode == 0, result.stderr
    assert "confusion matrix" in result.stdout and "macro-F1" in result.stdout
    report = json.loads(report_path.read_text())
    run_test = read_metrics(out)[-1]
    for task in ("topic", "mood"):
        assert report[task]["support"] == 20
        # bf16 autocast in the run's evaluation, fp32 here: allow one flipped example.
        assert (
            abs(report[task]["accuracy"] - run_test[f"{task}/accuracy"]) <= 0.05 + 1e-9
        )


def test_recipe_table_reports_the_tested_checkpoint(finished_run):
    """benchmarks/recipe_table.py reads a real run directory: the test line's
    figures, the validation that chose the checkpoint, per-class F1 of every class."""
    out, _ = finished_run
    metrics = read_metrics(out)
    test = next(m for m in metrics if m["split"] == "test")
    table = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recipe_table.py"), f"{out}=90"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = next(line for line in table.splitlines() if line.startswith(f"| {out.name} "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == ["sum", "3", str(test["step"]), "2 min"]
    assert cells[6] == f"**{100 * test['topic/f1_macro']:.1f}**"
    assert cells[9] == f"**{100 * test['mood/f1_macro']:.1f}**"
    for name in ("food (n=", "sport (n=", "tech (n=", "negative (n=", "positive (n="):
        assert name in table
