"""What one interruption costs: stop a run with SIGTERM mid-training, resume it.

    python benchmarks/interruption.py --signal-at 20 -- --max_steps 60

Runs ``python -m mtl_dist.train`` with the flags after ``--`` (the embedded default
when there are none) three times in one output directory: up to the step named by
``--signal-at``, where it sends SIGTERM; the resumed run (``--resume auto``); and, for
comparison, the time an uninterrupted start takes to reach its first step. Prints the
seconds from the signal to the exit (the checkpoint), from the resumed start to its first
step, and the steps that had to be redone (0 when the checkpoint holds the signalled step),
and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = re.compile(r" INFO step (\d+)/(\d+) ")


def launch(flags: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mtl_dist.train", *flags],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def first_step(proc: subprocess.Popen, until: int = 0) -> tuple[float, int]:
    """Read the run's log until a step line numbered >= ``until``; (time, step)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        match = STEP.search(line)
        if match and int(match.group(1)) >= until:
            return time.monotonic(), int(match.group(1))
    raise RuntimeError(f"the run ended (status {proc.wait()}) before step {until}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal-at", type=int, default=20, help="step to signal at")
    parser.add_argument("--out", default="interruption.json", help="JSON result file")
    parser.add_argument("flags", nargs="*", help="training flags (after --)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtl_interrupt_"))
    flags = [*args.flags, "--log_every", "1", "--progress_bar", "false"]

    # An uninterrupted start, for the time to its first step.
    started = time.monotonic()
    fresh = launch([*flags, "--output_dir", str(work / "fresh")])
    fresh_first, _ = first_step(fresh)
    fresh.kill()
    fresh.wait()

    run = [*flags, "--output_dir", str(work / "run"), "--resume", "auto"]
    proc = launch(run)
    _, signalled_step = first_step(proc, args.signal_at)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    status = proc.wait()
    stopped = time.monotonic()
    last_logged = max([signalled_step, *(int(m.group(1)) for m in STEP.finditer(rest))])
    latest = (work / "run" / "checkpoints" / "latest").read_text().strip()
    saved_step = int(latest.split("-")[1])

    restarted = time.monotonic()
    resumed = launch(run)
    resumed_first, resumed_step = first_step(resumed)
    resumed.kill()
    resumed.wait()

    result = {
        "exit_status_after_signal": status,
        "signal_to_exit_s": round(stopped - signalled, 2),
        "fresh_start_to_first_step_s": round(fresh_first - started, 2),
        "resumed_start_to_first_step_s": round(resumed_first - restarted, 2),
        "signalled_after_step": signalled_step,
        "last_step_before_exit": last_logged,
        "checkpoint_step": saved_step,
        "first_resumed_step": resumed_step,
        "steps_redone": last_logged - saved_step,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
