"""Where mtl_dist's training step spends its time: torch.profiler over the benchmark's run.

The same run as ``python -m mtl_dist.bench``'s ``mtl_dist`` configuration (DailyDialog,
pretrained MiniLM-L6, batch 32, bf16, one epoch planned so that ``compile auto`` decides
as for a real run), cut after ``--warmup`` untimed and ``--steps`` profiled steps. On the
CPU, inductor's generated kernels are profiled one by one (``cpp.enable_kernel_profile``),
so a compiled step is broken down as finely as an eager one.

Prints, per step: the wall time of each profiled step (mean and median, and the median
of steps whose padded length was new to the process against those seen before: on the
CPU the first batch of each length pays for building that shape's kernels), then the
profiler's CPU self time grouped into categories (matrix products, optimizer, gradient
norm, compiled kernels, copies, zero fills, data loading, the rest; on a GPU, read the
table's CUDA columns instead) and the top operators.
``--out`` also gets ``<tag>.json`` (the categories and step times) and ``<tag>.txt``
(the operator table).

    python benchmarks/profile_step.py                          # the default (compile auto)
    python benchmarks/profile_step.py --flags "--compile false" --tag eager
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mtl_dist import bench

# Operators by what they do, matched on the profiler's event names (self time only, so
# that every microsecond lands in exactly one category).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("optimizer (fused AdamW)", ("aten::_fused_adamw_", "aten::_fused_adam_")),
    ("gradient norm", ("aten::dot", "aten::linalg_vector_norm", "aten::_foreach_norm")),
    ("compiled kernels (inductor)", ("cpp_fused", "triton_")),
    ("copies (autocast dtype casts)", ("aten::copy_",)),
    ("zero fills", ("aten::fill_", "aten::zero_")),
    ("data loading", ("enumerate(DataLoader)",)),
]
OTHER = "other (eager element-wise, autograd, Python)"


def category(name: str) -> str:
    for label, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return label
    return OTHER


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=bench.DEFAULT_DATA)
    parser.add_argument("--tasks", default="act,emotion")
    parser.add_argument("--encoder", default="minilm", choices=sorted(bench.ENCODERS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--flags", default="", help="extra training flags, e.g. '--compile false'"
    )
    parser.add_argument(
        "--warmup", type=int, default=40, help="untimed steps first (compiling)"
    )
    parser.add_argument("--steps", type=int, default=30, help="profiled steps")
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--out", default=None, help="directory for <tag>.json/.txt")
    parser.add_argument("--tag", default="profile")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench.pick_device("auto")
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        # Names each generated C++ kernel in the profile (otherwise one opaque call per
        # compiled graph).
        inductor_config.cpp.enable_kernel_profile = True
    spec = {
        "data": bench.resolve_data(args.data),
        "tasks": args.tasks,
        "encoder": args.encoder,
        "model": None,
        "device": device.type,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    with tempfile.TemporaryDirectory(prefix="mtl_profile_") as tmp:
        spec["root"] = tmp
        trainer = bench.build_mtl_dist(spec, Path(tmp), shlex.split(args.flags))
        report = profile(trainer, args.warmup, args.steps, device, args.top)
    report["flags"] = args.flags
    report["compile"] = trainer.engine.compile_reason
    print_report(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = report.pop("table")
        (out / f"{args.tag}.txt").write_text(table + "\n")
        (out / f"{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / args.tag}.json and .txt")
    return 0


class _Done(Exception):
    """Raised after the last profiled step, to end a run planned for an epoch."""


def profile(
    trainer: Any, warmup: int, steps: int, device: torch.device, top: int
) -> dict[str, Any]:
    """Run ``warmup`` steps, then ``steps`` under torch.profiler; the report."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    sync = bench.device_sync(device)
    step = trainer.train_step
    seen: set[int] = set()
    times: list[tuple[float, bool]] = []  # (seconds, padded length new to the process)

    def timed_step(micro_batches: list[dict[str, torch.Tensor]], counts: torch.Tensor):
        done = len(times)
        if done == warmup:
            sync()
            profiler.start()
        lengths = {int(mb["input_ids"].shape[1]) for mb in micro_batches}
        new = not lengths <= seen
        seen.update(lengths)
        start = time.perf_counter()
        result = step(micro_batches, counts)
        sync()
        times.append((time.perf_counter() - start, new))
        if len(times) == warmup + steps:
            profiler.stop()
            raise _Done
        return result

    trainer.train_step = timed_step
    with contextlib.suppress(_Done):
        trainer.fit()
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        label = category(e.key)
        groups[label] = groups.get(label, 0.0) + e.self_cpu_time_total
    profiled = [t for t, _ in times[warmup:]]
    new = [t for t, n in times[warmup:] if n]
    seen_before = [t for t, n in times[warmup:] if not n]
    ms = 1000.0

    def median_ms(values: list[float]) -> float | None:
        return ms * statistics.median(values) if values else None

    return {
        "device": str(device),
        "warmup": warmup,
        "steps": steps,
        "step_ms_mean": ms * statistics.mean(profiled),
        "step_ms_median": median_ms(profiled),
        "new_length_steps": len(new),
        "new_length_step_ms_median": median_ms(new),
        "seen_length_step_ms_median": median_ms(seen_before),
        "categories_ms_per_step": {
            k: v / 1000 / steps for k, v in sorted(groups.items(), key=lambda i: -i[1])
        },
        "self_cpu_ms_per_step": total / 1000 / steps,
        "table": events.table(
            sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70
        ),
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"compile: {report['compile']}; flags: {report['flags'] or '(none)'}")
    print(
        f"{report['steps']} profiled steps after {report['warmup']}: mean "
        f"{report['step_ms_mean']:.1f} ms, median {report['step_ms_median']:.1f} ms"
    )
    seen = report["seen_length_step_ms_median"]
    new = report["new_length_step_ms_median"]
    if seen is not None and new is not None:
        print(
            f"  median of {report['new_length_steps']} steps with a padded length new "
            f"to the process {new:.1f} ms, of the others {seen:.1f} ms"
        )
    total = report["self_cpu_ms_per_step"]
    print(f"\nprofiler self time per step, {total:.1f} ms in all:")
    for label, value in report["categories_ms_per_step"].items():
        print(f"  {label:<46}{value:>8.1f} ms {value / total:>6.1%}")
    print("\n" + report["table"])


if __name__ == "__main__":
    raise SystemExit(main())
