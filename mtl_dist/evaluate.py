"""``python -m mtl_dist.evaluate --model DIR --data FILE``: score an exported model.

Prints each task's accuracy, macro-F1, per-class report and confusion matrix, and writes
them as JSON. The file's label columns are the task names unless ``--label_column
task=column`` says otherwise; rows with an empty label are left out for that task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mtl_dist.data import IGNORE_INDEX, _label_text
from mtl_dist.errors import ConfigError
from mtl_dist.inference import (
    add_inference_options,
    pick_device,
    predict_probabilities,
    read_rows,
)
from mtl_dist.log import setup_logging
from mtl_dist.metrics import task_metrics
from mtl_dist.model import load_exported
from mtl_dist.run import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtl_dist.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument(
        "--data", required=True, help="labelled .jsonl, .csv or .tsv file"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON report path (default: <data>.eval.json beside the data)",
    )
    parser.add_argument(
        "--label_column",
        action="append",
        default=[],
        metavar="TASK=COL",
        help="label column of a task, if not named like the task",
    )
    add_inference_options(parser)
    return parser


def encode_labels(
    rows: list[dict], column: str, names: list[str], task: str
) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    out = np.full(len(rows), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        text = _label_text(row.get(column))
        if text is None:
            continue
        if text not in index:
            raise ConfigError(
                f"--label_column {task}",
                column,
                f"the model knows only {names}",
                f"row {i + 1} has label {text!r}",
            )
        out[i] = index[text]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(rank=0)
    device = pick_device(args.device)
    model, tokenizer, label_maps = load_exported(args.model, str(device))
    columns = dict(item.split("=", 1) for item in args.label_column)
    text_column = args.text_column or model.inputs.get("text_column") or "text"
    rows = read_rows(args.data, text_column)
    texts = [str(r.get(text_column) or "") for r in rows]
    probs = predict_probabilities(
        model,
        tokenizer,
        texts,
        args.batch_size,
        model.inputs.get("max_length", 128),
        device,
    )
    report = {}
    for task, names in label_maps.items():
        column = columns.get(task, task)
        if rows and column not in rows[0]:
            raise ConfigError(
                "--label_column",
                f"{task}={column}",
                f"name the column holding {task}'s labels (fields: {sorted(rows[0])})",
                "no such field",
            )
        labels = encode_labels(rows, column, names, task)
        report[task] = task_metrics(probs[task].argmax(-1), labels, names)
    for task, m in report.items():
        print(
            f"== {task}: accuracy {m['accuracy']:.4f}  macro-F1 {m['f1_macro']:.4f}  "
            f"(n={m['support']})"
        )
        width = max(len(n) for n in label_maps[task])
        print(f"{'class':<{width}}  precision  recall  f1      support")
        for name, c in m.get("per_class", {}).items():
            print(
                f"{name:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}  "
                f"{c['f1-score']:.4f}  {int(c['support'])}"
            )
        print("confusion matrix (rows: true, columns: predicted):")
        for name, line in zip(label_maps[task], m.get("confusion_matrix", [])):
            print(f"  {name:<{width}} " + " ".join(f"{v:5d}" for v in line))
    output = Path(args.output or f"{args.data}.eval.json")
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
