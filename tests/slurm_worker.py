"""The real training entry point, slowed down so a test can signal it mid-training.

Run by slurm/train.sh as ``TRAIN_MODULE=tests.slurm_worker``. ``MTL_TEST_STEP_SLEEP``
(seconds, default 0) is slept after every optimizer step. Sleeping changes no number:
a slowed run computes exactly what a plain run computes.
"""

from __future__ import annotations

import os
import time

from mtl_dist import engine as E
from mtl_dist.train import cli


def _slow_steps(seconds: float) -> None:
    step = E.TorchEngine.step

    def slowed(self, _step=step):
        result = _step(self)
        time.sleep(seconds)
        return result

    E.TorchEngine.step = slowed


if __name__ == "__main__":
    _slow_steps(float(os.environ.get("MTL_TEST_STEP_SLEEP", "0")))
    cli()
