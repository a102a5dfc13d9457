"""The results table of finished runs: test macro-F1 per task and per-class F1.

    python benchmarks/recipe_table.py runs/dd_sum runs/dd_uncertainty runs/dd_dwa

Reads each run directory's ``config.json``, ``metrics.jsonl`` (the test line and the
validation lines) and ``reports/test_step<N>.json`` (per-class F1), and prints markdown:
one row per run with the recipe's weighting method, epochs, the step whose checkpoint
was tested (the best on validation), and each task's test accuracy and macro-F1 and the
validation macro-F1 that chose that checkpoint; then one per-class F1 table per task.
Wall time is not in the run directory: pass it as ``DIR=SECONDS`` to add a column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_run(directory: Path) -> dict[str, Any]:
    config = json.loads((directory / "config.json").read_text())
    lines = [
        json.loads(line)
        for line in (directory / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    tests = [line for line in lines if line["split"] == "test"]
    if not tests:
        raise SystemExit(
            f"{directory}: no test line in metrics.jsonl (run unfinished?)"
        )
    test = tests[-1]
    chosen = [
        line
        for line in lines
        if line["split"] == "validation" and line["step"] == test["step"]
    ]
    report = json.loads(
        (directory / "reports" / f"test_step{test['step']}.json").read_text()
    )
    return {
        "dir": directory,
        "config": config,
        "test": test,
        "validation": chosen[-1] if chosen else None,
        "report": report,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", help="run directories, optionally DIR=SECONDS"
    )
    args = parser.parse_args()
    runs, seconds = [], {}
    for item in args.runs:
        path, _, wall = item.partition("=")
        run = read_run(Path(path))
        runs.append(run)
        if wall:
            seconds[path] = float(wall)
    tasks = [t["name"] for t in runs[0]["config"]["tasks"]]
    head = ["run", "weighting", "epochs", "tested step"]
    if seconds:
        head.append("wall time")
    for task in tasks:
        head += [f"{task} acc", f"{task} macro-F1", f"{task} val macro-F1"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run, item in zip(runs, args.runs):
        cfg, test = run["config"], run["test"]
        row = [
            run["dir"].name,
            cfg["weighting"]["method"],
            str(cfg["epochs"]),
            str(test["step"]),
        ]
        if seconds:
            wall = seconds.get(item.partition("=")[0])
            row.append(f"{wall / 60:.0f} min" if wall else "")
        val = run["validation"]
        for task in tasks:
            row += [
                f"{100 * test[f'{task}/accuracy']:.1f}",
                f"**{100 * test[f'{task}/f1_macro']:.1f}**",
                f"{100 * val[f'{task}/f1_macro']:.1f}" if val else "",
            ]
        print("| " + " | ".join(row) + " |")
    for task in tasks:
        classes = list(runs[0]["report"]["tasks"][task]["per_class"])
        print(f"\nPer-class test F1 (%), {task}:\n")
        print(
            "| run | "
            + " | ".join(f"{c} (n={_support(runs[0], task, c)})" for c in classes)
            + " |"
        )
        print("|" + "---|" * (len(classes) + 1))
        for run in runs:
            per_class = run["report"]["tasks"][task]["per_class"]
            cells = [f"{100 * per_class[c]['f1-score']:.1f}" for c in classes]
            print(f"| {run['dir'].name} | " + " | ".join(cells) + " |")
    return 0


def _support(run: dict[str, Any], task: str, name: str) -> int:
    return int(run["report"]["tasks"][task]["per_class"][name]["support"])


if __name__ == "__main__":
    raise SystemExit(main())
