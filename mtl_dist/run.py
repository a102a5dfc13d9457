"""Pieces of a training run that are not the loop: the run directory, data preparation,
the startup block and the final export."""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtl_dist import distributed as D
from mtl_dist.checkpoint import CheckpointError, find_checkpoint, read_trainer_state
from mtl_dist.config import Config, resolve_output_dir
from mtl_dist.data import Collator, TokenizedData, build_label_maps, load_raw, tokenize
from mtl_dist.distributed import World
from mtl_dist.engine import Engine, check_compile, check_precision
from mtl_dist.errors import ConfigError
from mtl_dist.log import logger
from mtl_dist.model import check_model, export_model
from mtl_dist.trainer import (
    REQUEUE_MARKER,
    BatchPlan,
    RunInterrupted,
    Trainer,
    TrainingStopped,
    count_parameters,
)

EXIT_USER_ERROR = 2
"""Exit status for a mistake in the config, data or command line."""
EXIT_TRAINING_STOPPED = 3
"""Exit status when every rank stopped training on purpose (``nonfinite_loss=stop``)."""
EXIT_REQUEUE = 75
"""Exit status after a stop signal: a checkpoint was written, run again with
``--resume auto`` (75 is EX_TEMPFAIL, "try again later")."""
EXIT_CHECKPOINT_FAILED = 74
"""Exit status when a checkpoint could not be written (a full disk, say); the previous
one is intact (74 is EX_IOERR)."""
EXIT_INTERRUPTED = 130
"""Exit status after a second Ctrl-C, which stops at once (128 + SIGINT)."""


def run_cli(
    main: Callable[[list[str] | None], int], argv: list[str] | None = None
) -> int:
    """Run an entry point; a user's mistake prints one message and exits with 2."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except ConfigError as exc:
        _report_on_every_rank(exc, debug)
        return EXIT_USER_ERROR
    except TrainingStopped as exc:
        # Every rank stops at the same step with the same message: rank 0 says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
    except RunInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_REQUEUE
    except CheckpointError as exc:
        # Every rank learns of the failure; each says what it saw (a full disk may be
        # local to one node).
        _report_on_every_rank(exc, debug)
        return EXIT_CHECKPOINT_FAILED
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(
            "interrupted: a second Ctrl-C stopped the run at once; the last complete "
            "checkpoint (if any) is intact, continue with --resume auto",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        D.shutdown()


def _report_on_every_rank(exc: Exception, debug: bool) -> None:
    """One line on stderr, the rank named where it is not 0; the traceback with
    --debug."""
    if debug:
        traceback.print_exc()
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"[rank {rank}] "
    print(f"{prefix}error: {exc}", file=sys.stderr)


RUN_ARTIFACTS = (
    "metrics.jsonl",
    "labels.json",
    "tensorboard",
    "reports",
    "model",
    "checkpoints",
    REQUEUE_MARKER,
)
RUN_CONTROL_KEYS = (
    "overwrite",
    "resume",
    "progress_bar",
    "time_limit_minutes",
    "output_dir",
)
"""Config keys that may change between a run and its continuation (a run directory
may be moved, and is still the same run)."""


def check_before_writing(cfg: Config, world: World, plan: BatchPlan) -> None:
    """Refuse what needs no data to refuse, before the run directory is touched: fp16
    on a CPU, `compile true` without a compiler, a DeepSpeed JSON that does not fit, a
    model directory without weights, a max_length the encoder lacks."""
    check_precision(cfg, world.device)
    check_compile(cfg, world.device)
    if cfg.deepspeed is not None:
        from mtl_dist.ds_config import resolve_ds_config

        resolve_ds_config(
            cfg.deepspeed,
            cfg,
            plan.micro_batch_size,
            plan.accumulation,
            on_cpu=world.device.type == "cpu",
        )
    check_model(cfg.model, cfg.data.max_length)


def _holds_a_run(out: Path) -> bool:
    """Whether a directory holds anything of a run that would be lost: a start that
    failed before training left only config.json (and labels.json)."""
    return any((out / name).exists() for name in RUN_ARTIFACTS if name != "labels.json")


def check_output_dir(cfg: Config, world: World) -> tuple[Path, Path | None]:
    """Refuse a run directory this run must not use; find the checkpoint to resume.

    A directory holding a run with a different config, or an unfinished run that this
    one would not resume, is refused unless ``overwrite``. Nothing is deleted here:
    that waits for :func:`init_output_dir`, once the data has loaded.
    """
    out = resolve_output_dir(cfg)
    checkpoint = find_checkpoint(cfg.resume, out) if cfg.resume else None
    previous = out / "config.json"
    if previous.is_file() and not cfg.overwrite and _holds_a_run(out):
        try:
            saved = json.loads(previous.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = {"config.json": "unreadable"}
        old = {k: v for k, v in saved.items() if k not in RUN_CONTROL_KEYS}
        new = {k: v for k, v in cfg.to_dict().items() if k not in RUN_CONTROL_KEYS}
        if old != new:
            changed = sorted(
                k for k in new.keys() | old.keys() if old.get(k) != new.get(k)
            )
            raise ConfigError(
                "output_dir",
                str(out),
                "choose a new --output_dir, or pass --overwrite true to "
                "replace that run",
                f"holds a run with another config (differs in: {', '.join(changed)})",
            )
        unfinished = (out / "checkpoints").is_dir() and not (out / "model").is_dir()
        if unfinished and checkpoint is None:
            raise ConfigError(
                "output_dir",
                str(out),
                "pass --resume auto to continue it, or --overwrite true to start over",
                "holds an unfinished run with checkpoints",
            )
    if world.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                "output_dir",
                str(out),
                "choose a directory you can write to",
                f"not writable ({exc.strerror})",
            ) from None
    return out, checkpoint


def init_output_dir(
    cfg: Config,
    world: World,
    out: Path,
    checkpoint: Path | None,
    label_maps: dict[str, list[str]] | None = None,
) -> None:
    """Clear what a fresh run must not inherit; save the resolved config (and the label
    maps). A resumed run keeps its history; a rerun of a finished run with the same
    config starts over, so old events never mix with new ones."""
    if world.is_main:
        kept = ("metrics.jsonl", "labels.json", "tensorboard", "reports", "checkpoints")
        for name in RUN_ARTIFACTS:
            path = out / name
            if checkpoint is not None and name in kept:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if label_maps is not None:
            write_label_maps(out, label_maps)
    D.barrier()


def prepare_output_dir(cfg: Config, world: World) -> tuple[Path, Path | None]:
    """:func:`check_output_dir` and :func:`init_output_dir` at once."""
    out, checkpoint = check_output_dir(cfg, world)
    init_output_dir(cfg, world, out, checkpoint)
    return out, checkpoint


def check_resume(
    checkpoint: Path | None, cfg: Config, label_maps: dict[str, list[str]]
) -> None:
    """Refuse a checkpoint this run cannot continue exactly (other tasks, labels,
    global batch, seed or weighting method) before its weights are loaded: heads of
    another shape would fail to load with a message about tensors."""
    if checkpoint is None:
        return
    state = read_trainer_state(checkpoint)
    tasks = [t.name for t in cfg.tasks]
    fix = (
        "resume with the tasks and data the checkpoint was written with, or start a "
        "new run (a new --output_dir, or --overwrite true without --resume)"
    )
    if state.get("tasks", tasks) != tasks:
        raise ConfigError(
            "tasks",
            tasks,
            fix,
            f"differ from the tasks {state['tasks']} of the checkpoint {checkpoint}",
        )
    # The data order depends on the global batch and the seed; the weighting state
    # belongs to its method.
    for key, now in (
        ("global_batch_size", cfg.global_batch_size),
        ("seed", cfg.seed),
        ("weighting_method", cfg.weighting.method),
    ):
        if key in state and state[key] != now:
            raise ConfigError(
                key if key != "weighting_method" else "weighting.method",
                now,
                f"resume with the value {state[key]!r} the checkpoint was written "
                "with, or start a new run",
                f"differs from the checkpoint {checkpoint}",
            )
    saved = state.get("label_maps", {})
    for name, labels in label_maps.items():
        if name in saved and saved[name] != labels:
            raise ConfigError(
                f"tasks.{name}.labels",
                labels,
                fix,
                f"differ from the labels {saved[name]} of the checkpoint {checkpoint}",
            )


def prepare_data(
    cfg: Config, tokenizer: Any, world: World, out: Path | None = None
) -> TokenizedData:
    """Load, label and tokenise every split; the first rank on each node fills the cache.
    With ``out``, the label maps are saved there."""
    with D.local_main_first(world):
        raw = load_raw(cfg.data, cfg.tasks)
        label_maps = build_label_maps(raw["train"], cfg.tasks)
        data = tokenize(raw, tokenizer, cfg, label_maps)
    if world.is_main:
        for split, count in data.truncated.items():
            if count:
                logger.warning(
                    f"{count} of {len(data.splits[split])} {split} rows are longer "
                    f"than data.max_length={cfg.data.max_length} tokens and were "
                    "truncated"
                )
        if out is not None:
            write_label_maps(out, label_maps)
    return data


def write_label_maps(out: Path, label_maps: dict[str, list[str]]) -> None:
    (out / "labels.json").write_text(json.dumps(label_maps, indent=2) + "\n")


def make_collator(tokenizer: Any, data: TokenizedData, world: World) -> Collator:
    # Multiples of 8 suit GPU tensor cores; on CPU they would only add padding.
    multiple = 8 if world.device.type == "cuda" else None
    return Collator(tokenizer, data.input_columns, len(data.label_maps), multiple)


def log_startup(
    cfg: Config,
    world: World,
    engine: Engine,
    plan: BatchPlan,
    trainer: Trainer,
    data: TokenizedData,
) -> None:
    total, trainable = count_parameters(engine.module)
    stage = "off (plain DDP)" if engine.zero_stage < 0 else f"stage {engine.zero_stage}"
    if engine.zero_stage < 0 and not world.distributed:
        stage = "off (single process)"
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.splits.items())
    tasks = ", ".join(
        f"{t} ({len(labels)} classes)" for t, labels in data.label_maps.items()
    )
    lines = [
        f"world size {world.world_size} | device {world.device} | precision {cfg.precision}"
        f" | torch {torch.__version__} | threads {torch.get_num_threads()}",
        f"DeepSpeed ZeRO {stage} | torch.compile {engine.compile_reason}"
        + (" | freed memory kept for reuse" if engine.keeps_freed_memory else ""),
        f"model {cfg.model.name_or_path} | pooling {cfg.model.pooling} | parameters "
        f"{total / 1e6:.2f} M ({trainable / 1e6:.2f} M trainable)",
        f"tasks: {tasks}",
        f"data: {sizes} examples | max_length {cfg.data.max_length}",
        plan.describe(),
        f"steps: {trainer.sampler.steps_per_epoch} per epoch x {cfg.epochs} epochs"
        f" = {trainer.total_steps} total"
        + (f" (capped by max_steps {cfg.max_steps})" if cfg.max_steps else ""),
        f"output: {resolve_output_dir(cfg)}",
    ]
    for line in lines:
        logger.info(line)


def export_inputs(cfg: Config) -> dict[str, Any]:
    """How the training fed text to the model; predict and evaluate do the same."""
    return {
        "text_column": cfg.data.text_column,
        "text_pair_column": cfg.data.text_pair_column,
        "max_length": cfg.data.max_length,
    }


def export_final(
    cfg: Config, engine: Engine, tokenizer: Any, data: TokenizedData, out: Path
) -> None:
    """Write the final model as a plain Hugging Face directory (rank 0, full weights)."""
    state = engine.full_state_dict()  # a collective under ZeRO-3: every rank calls it
    if state is not None:
        export_model(
            state,
            engine.module,
            tokenizer,
            data.label_maps,
            out / "model",
            export_inputs(cfg),
        )
        logger.info(f"model exported to {out / 'model'}")
    D.barrier()
