"""``python -m mtl_dist.predict --model DIR``: label sentences with an exported model.

Reads JSONL (a text field), CSV/TSV (a text column) or plain lines, from a file or stdin,
and writes one JSON object per input line: for every task the predicted label and its
probability, plus the input's ``id`` when it has one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from mtl_dist.inference import (
    add_inference_options,
    pick_device,
    predict_probabilities,
    read_rows,
)
from mtl_dist.log import setup_logging
from mtl_dist.model import load_exported
from mtl_dist.run import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtl_dist.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument(
        "--input",
        default="-",
        help="file (.jsonl, .csv, .tsv, or plain lines); - = stdin (default: -)",
    )
    parser.add_argument(
        "--output", default="-", help="JSONL file; - = stdout (default: -)"
    )
    add_inference_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(rank=0)
    device = pick_device(args.device)
    model, tokenizer, label_maps = load_exported(args.model, str(device))
    inputs = model.inputs
    column = args.text_column or inputs.get("text_column") or "text"
    rows = read_rows(args.input, column)
    texts = [str(r.get(column) or "") for r in rows]
    pair_column = inputs.get("text_pair_column")
    pairs = [str(r.get(pair_column) or "") for r in rows] if pair_column else None
    probs = predict_probabilities(
        model,
        tokenizer,
        texts,
        args.batch_size,
        inputs.get("max_length", 128),
        device,
        pairs,
    )
    with contextlib.ExitStack() as stack:
        fh = (
            sys.stdout
            if args.output == "-"
            else stack.enter_context(Path(args.output).open("w", encoding="utf-8"))
        )
        for i, row in enumerate(rows):
            record = {"id": row["id"]} if "id" in row else {}
            record["text"] = texts[i]
            for task, p in probs.items():
                best = int(p[i].argmax())
                record[task] = {
                    "label": label_maps[task][best],
                    "probability": round(float(p[i, best]), 6),
                }
            fh.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
