"""Batched inference with an exported model, shared by the predict and evaluate CLIs."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_dist.errors import ConfigError
from mtl_dist.model import MultiTaskModel


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The options the predict and evaluate CLIs share."""
    parser.add_argument(
        "--text_column",
        default=None,
        help="field holding the text (default: the one used in training)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="sentences per forward pass (default: 64)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu or cuda (default: auto)"
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def read_rows(path: str | None, text_column: str) -> list[dict[str, Any]]:
    """Rows from JSONL, CSV/TSV or plain lines (one sentence each); ``-``/None is stdin.

    Plain lines become ``{text_column: line}``.
    """
    if path in (None, "-"):
        lines = sys.stdin.read().splitlines()
        suffix = ".jsonl" if lines and lines[0].lstrip().startswith("{") else ".txt"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                "--input",
                path,
                "give an existing file (or - for stdin)",
                "file not found",
            )
        suffix = p.suffix.lower()
        if suffix in (".csv", ".tsv"):
            with p.open(newline="", encoding="utf-8") as fh:
                rows = list(
                    csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                )
            return _check_text(rows, text_column, path)
        lines = p.read_text(encoding="utf-8").split("\n")
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    "--input",
                    f"{path or 'stdin'}:{number}",
                    "write one JSON object per line",
                    f"not JSON ({exc.msg})",
                ) from None
        return _check_text(rows, text_column, path)
    return [{text_column: line} for line in lines if line.strip()]


def _check_text(rows: list[dict[str, Any]], column: str, path: str | None):
    if rows and column not in rows[0]:
        raise ConfigError(
            "--text_column",
            column,
            f"use one of {sorted(rows[0])}",
            f"no such field in {path}",
        )
    return rows


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def predict_probabilities(
    model: MultiTaskModel,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 128,
    device: torch.device | None = None,
    pairs: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Softmax probabilities per task, ``[len(texts), num_classes]``, in input order.

    Texts are sorted by length so each batch pads little, then put back in order.
    """
    device = device or next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = {
        t: np.zeros((len(texts), model.heads[t].out_features), dtype=np.float32)
        for t in model.task_names
    }
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx],
            [pairs[i] for i in idx] if pairs is not None else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        logits = model(**batch)
        for task, values in logits.items():
            out[task][idx] = values.float().softmax(-1).cpu().numpy()
    return out
