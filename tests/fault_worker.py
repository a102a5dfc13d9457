"""The real training entry point with faults injected on one rank (run by torchrun).

Environment, all optional:

- ``MTL_TEST_NAN="RANK:TASK:STEP[,STEP...]"``: on that rank, the forward pass of those
  training steps returns NaN logits for that task, so only that rank's loss is not finite.
- ``MTL_TEST_FROZEN_CLOCK_RANK=R``: the trainer's clock on rank R never moves, so that rank
  alone would never reach a time limit.
- ``MTL_TEST_RECORD_DIR=DIR``: every rank writes ``DIR/engine_calls_rank<R>.json``, the
  sequence of ``step`` / ``skip`` calls its engine received, so a test can compare ranks.
"""

from __future__ import annotations

import atexit
import json
import os
import time
import types
from pathlib import Path

import torch

from mtl_dist import engine as E
from mtl_dist import trainer as T
from mtl_dist.train import cli

RANK = int(os.environ.get("RANK", "0"))
calls: list[str] = []


def _count_engine_calls() -> None:
    for cls in (E.TorchEngine, E.DeepSpeedEngine):
        step, skip = cls.step, cls.skip_step

        def counted_step(self, _step=step):
            calls.append("step")
            return _step(self)

        def counted_skip(self, _skip=skip):
            calls.append("skip")
            return _skip(self)

        cls.step, cls.skip_step = counted_step, counted_skip


def _inject_nan(spec: str) -> None:
    rank, task, steps = spec.split(":")
    if int(rank) != RANK:
        return
    bad_steps = {int(s) for s in steps.split(",")}
    for cls in (E.TorchEngine, E.DeepSpeedEngine):
        original = cls.forward

        def forward(self, batch, _original=original):
            logits = _original(self, batch)
            # The step being taken is one past the engine calls so far; evaluation
            # passes run in eval mode and are left alone.
            if self.module.training and len(calls) + 1 in bad_steps:
                logits = dict(logits)
                logits[task] = logits[task] * torch.nan
            return logits

        cls.forward = forward


if __name__ == "__main__":
    _count_engine_calls()
    if os.environ.get("MTL_TEST_RECORD_DIR"):
        path = Path(os.environ["MTL_TEST_RECORD_DIR"]) / f"engine_calls_rank{RANK}.json"
        atexit.register(lambda: path.write_text(json.dumps(calls)))
    if os.environ.get("MTL_TEST_NAN"):
        _inject_nan(os.environ["MTL_TEST_NAN"])
    if os.environ.get("MTL_TEST_FROZEN_CLOCK_RANK") == str(RANK):
        T.time = types.SimpleNamespace(
            monotonic=lambda: 0.0, perf_counter=time.perf_counter
        )
    cli()
