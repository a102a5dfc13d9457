"""Save one checkpoint, then start a second whose engine write hangs (killed by a test).

Run as ``python -m tests.ckpt_kill_worker OUTPUT_DIR``: prints ``SAVING`` once the second
save is half-written, then sleeps until the test kills it with SIGKILL.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from mtl_dist.checkpoint import save_checkpoint
from mtl_dist.distributed import World


class SlowEngine:
    """Writes its weights in two files; the second write never finishes."""

    def __init__(self, value: float, hang: bool) -> None:
        self.weights = torch.full((4,), value)
        self.hang = hang

    def save_state(self, directory: Path) -> None:
        torch.save({"w": self.weights}, directory / "part1.pt")
        if self.hang:
            print("SAVING", flush=True)
            time.sleep(600)
        torch.save({"w": self.weights}, directory / "part2.pt")


def main() -> None:
    out = Path(sys.argv[1])
    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    state = {"step": 1, "epoch": 0, "step_in_epoch": 1, "world_size": 1}
    save_checkpoint(SlowEngine(1.0, hang=False), state, out, world, keep=3)
    save_checkpoint(
        SlowEngine(2.0, hang=True), {**state, "step": 2}, out, world, keep=3
    )


if __name__ == "__main__":
    main()
