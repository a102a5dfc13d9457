"""Evaluate an untrained tiny model on validation at any world size (run by torchrun).

Rank 0 writes what it received: the example ids every rank evaluated, the per-task
metrics and predictions, so the test can compare world sizes with one another.
"""

from __future__ import annotations

import json
import sys

from transformers import set_seed

from mtl_dist import distributed as D
from mtl_dist.config import parse_config
from mtl_dist.data import eval_batches
from mtl_dist.distributed import init_world
from mtl_dist.engine import TorchEngine
from mtl_dist.log import RunRecorder, setup_logging
from mtl_dist.model import build_model, load_tokenizer
from mtl_dist.run import make_collator, prepare_data, prepare_output_dir
from mtl_dist.trainer import Trainer, plan_batches


def main() -> None:
    cfg, _ = parse_config(sys.argv[1:])
    world = init_world("cpu")
    setup_logging(world.rank)
    out, _ = prepare_output_dir(cfg, world)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer, world, out)
    set_seed(cfg.seed)
    model = build_model(cfg.model, data.label_maps)
    plan = plan_batches(cfg, world.world_size)
    engine = TorchEngine(model, cfg, world, total_steps=1, warmup_steps=0)
    trainer = Trainer(
        cfg,
        world,
        data,
        engine,
        plan,
        make_collator(tokenizer, data, world),
        RunRecorder(out, world.is_main, tensorboard=False),
        out,
    )
    metrics = trainer.evaluate("validation")
    # Independently of the trainer's own check: which rows did each rank evaluate?
    lengths = data.splits["validation"]["length"]
    mine = [
        i
        for idx, real in eval_batches(
            lengths, world.rank, world.world_size, cfg.eval_batch_size
        )
        if real
        for i in idx
    ]
    seen = D.gather_to_main(mine)
    if world.is_main:
        result = {
            "world_size": world.world_size,
            "seen": seen,
            "metrics": {
                t: {
                    k: m[k]
                    for k in ("accuracy", "f1_macro", "support", "confusion_matrix")
                }
                for t, m in metrics.items()
            },
        }
        (out / "eval_result.json").write_text(json.dumps(result))
    D.shutdown()


if __name__ == "__main__":
    main()
