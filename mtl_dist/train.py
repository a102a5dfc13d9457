"""Entry point: ``python -m mtl_dist.train`` or ``torchrun ... -m mtl_dist.train``."""

from __future__ import annotations

import sys

from transformers import set_seed

from mtl_dist.checkpoint import read_trainer_state
from mtl_dist.config import parse_config
from mtl_dist.distributed import init_world
from mtl_dist.engine import build_engine
from mtl_dist.log import RunRecorder, setup_logging
from mtl_dist.model import build_model, load_tokenizer
from mtl_dist.run import (
    check_before_writing,
    check_output_dir,
    check_resume,
    export_final,
    init_output_dir,
    log_startup,
    make_collator,
    prepare_data,
    run_cli,
)
from mtl_dist.trainer import Trainer, plan_batches, warmup_steps


def main(argv: list[str] | None = None) -> int:
    # Configuration: defaults, then --config, then flags; every value checked.
    cfg, _ = parse_config(argv)

    # Processes: join torchrun's group (or run alone); only rank 0 speaks.
    world = init_world(cfg.device, deepspeed=cfg.deepspeed is not None)
    setup_logging(world.rank)
    plan = plan_batches(cfg, world.world_size)
    set_seed(cfg.seed)  # same seed on every rank: identical initial heads

    # Refuse every mistake found without the data before touching the run directory;
    # find the checkpoint to resume, if any.
    check_before_writing(cfg, world, plan)
    out, checkpoint = check_output_dir(cfg, world)

    # Data: labels from train, tokenised once and cached. A data error leaves the run
    # directory as it was: an earlier run there is cleared only after this.
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer, world)
    check_resume(checkpoint, cfg, data.label_maps)
    total_steps = Trainer.planned_steps(cfg, len(data.splits["train"]), plan)

    # Run directory: the resolved config and label maps, nothing of an earlier run.
    init_output_dir(cfg, world, out, checkpoint, data.label_maps)

    # Model, optimizer and engine (DDP or DeepSpeed).
    model = build_model(cfg.model, data.label_maps)
    engine = build_engine(
        model,
        cfg,
        world,
        plan.micro_batch_size,
        plan.accumulation,
        total_steps,
        warmup_steps(cfg, total_steps),
    )
    resume_step = read_trainer_state(checkpoint)["step"] if checkpoint else None
    recorder = RunRecorder(
        out,
        world.is_main,
        purge_step=resume_step + 1 if resume_step is not None else None,
    )
    trainer = Trainer(
        cfg,
        world,
        data,
        engine,
        plan,
        make_collator(tokenizer, data, world),
        recorder,
        out,
    )
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    log_startup(cfg, world, engine, plan, trainer, data)

    # Train, evaluating on validation after every epoch.
    trainer.fit()

    # Test once at the end (on the best checkpoint), then export a plain HF model.
    if cfg.load_best_at_end:
        trainer.load_best()
    if "test" in data.splits:
        trainer.evaluate("test")
    export_final(cfg, engine, tokenizer, data, out)
    recorder.close()
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
