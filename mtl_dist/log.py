"""Rank-aware logging: one mechanism for text, TensorBoard and ``metrics.jsonl``.

Text goes through the standard ``logging`` module. A filter lets rank 0 say everything and
other ranks only warnings and errors, prefixed with their rank, so callers never write
``if rank == 0`` around a log call. Files (TensorBoard events, ``metrics.jsonl``) are
written by rank 0 only.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("mtl_dist")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = f"[rank {self.rank}] " if self.rank else ""
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int) -> None:
    """Route ``mtl_dist`` logs to stderr: everything on rank 0, warnings up elsewhere."""
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s %(rank_prefix)s%(message)s", "%H:%M:%S"
        )
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # Libraries chatter on every rank; keep their warnings only.
    for name in ("transformers", "datasets", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_warning()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


class RunRecorder:
    """TensorBoard scalars and ``metrics.jsonl`` lines, written on rank 0 only."""

    def __init__(
        self,
        output_dir: Path,
        is_main: bool,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ) -> None:
        self.is_main = is_main
        self.writer = None
        self.metrics_path = output_dir / "metrics.jsonl"
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after the checkpoint it
            # resumes from, so the curves carry no duplicated steps.
            self.writer = SummaryWriter(
                log_dir=str(output_dir / "tensorboard"), purge_step=purge_step
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def metrics_line(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with self.metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def confusion_matrices(
        self,
        prefix: str,
        matrices: dict[str, list[list[int]]],
        label_maps: dict[str, list[str]],
        step: int,
    ) -> None:
        """One image per task under ``<prefix>/<task>/confusion_matrix``."""
        if self.writer is None:
            return
        # Imported here: only rank 0 with TensorBoard on draws anything.
        import numpy as np
        from matplotlib.figure import Figure
        from sklearn.metrics import ConfusionMatrixDisplay

        for task, matrix in matrices.items():
            labels = label_maps[task]
            size = 1.5 + 0.6 * len(labels)
            figure = Figure(figsize=(size + 1, size))
            axes = figure.add_subplot()
            ConfusionMatrixDisplay(np.asarray(matrix), display_labels=labels).plot(
                ax=axes, colorbar=False, xticks_rotation="vertical"
            )
            axes.set_title(f"{task} (step {step})")
            figure.tight_layout()
            self.writer.add_figure(f"{prefix}/{task}/confusion_matrix", figure, step)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop ``metrics.jsonl`` lines of steps after ``after_step`` (a resumed run
        writes them again)."""
        if not (self.is_main and self.metrics_path.is_file()):
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [
            line
            for line in lines
            if json.loads(line)["step"] <= after_step
            and json.loads(line)["split"] != "test"
        ]
        self.metrics_path.write_text(
            "".join(line + "\n" for line in kept), encoding="utf-8"
        )

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
