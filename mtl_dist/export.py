"""Export any checkpoint to a plain model directory: ``python -m mtl_dist.export``.

The training exports its final (or best) model by itself; this turns any checkpoint of a
run, torch or DeepSpeed (ZeRO shards are merged into full fp32 weights), into the same
kind of directory: encoder in Hugging Face format, heads, tokenizer, task description.
It runs in one process, without a GPU and without the ranks that wrote the checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mtl_dist.checkpoint import BEST, ENGINE_DIR, STATE_FILE, checkpoint_root
from mtl_dist.checkpoint import find_checkpoint as find_latest
from mtl_dist.config import config_from_dict
from mtl_dist.engine import DEEPSPEED_TAG, TORCH_STATE
from mtl_dist.errors import ConfigError
from mtl_dist.log import logger, setup_logging
from mtl_dist.model import build_model, export_model, load_tokenizer
from mtl_dist.run import export_inputs, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtl_dist.export",
        description="Write a checkpoint as a plain model directory (loads without "
        "mtl_dist's training code or DeepSpeed).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory (runs/x/checkpoints/step-00000120), or a run "
        "directory: then its newest checkpoint, or its best with --best",
    )
    parser.add_argument(
        "--best", action="store_true", help="with a run directory: its best checkpoint"
    )
    parser.add_argument(
        "--output", required=True, help="directory to write (created; must be empty)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def resolve_checkpoint(path: Path, best: bool) -> Path:
    """The checkpoint directory ``path`` names, directly or as a run directory."""
    if (path / STATE_FILE).is_file():
        return path
    pointer = checkpoint_root(path) / BEST
    if best and pointer.is_file():
        return checkpoint_root(path) / pointer.read_text().strip()
    found = None if best else find_latest("auto", path)
    if found is None:
        what = "a best checkpoint" if best else "a complete checkpoint"
        raise ConfigError(
            "--checkpoint",
            str(path),
            "give a checkpoint directory or a run directory that has one",
            f"holds no {what}",
        )
    return found


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full model weights from a torch or DeepSpeed checkpoint."""
    engine_dir = checkpoint / ENGINE_DIR
    if (engine_dir / TORCH_STATE).is_file():
        state = torch.load(
            engine_dir / TORCH_STATE, map_location="cpu", weights_only=True
        )
        return state["model"]
    if (engine_dir / DEEPSPEED_TAG).is_dir():
        # TODO(deepspeed-pickle): DeepSpeed's reader unpickles its own files; export
        # only checkpoints your own runs wrote.
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), DEEPSPEED_TAG)
    raise ConfigError(
        "--checkpoint",
        str(checkpoint),
        "give a checkpoint written by mtl_dist",
        "holds neither torch nor DeepSpeed engine state",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(rank=0)
    checkpoint = resolve_checkpoint(Path(args.checkpoint), args.best)
    run_dir = checkpoint.parent.parent
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            "--output", str(out), "give a new or empty directory", "not empty"
        )
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    label_maps = json.loads((run_dir / "labels.json").read_text())
    model = build_model(cfg.model, label_maps)
    state = checkpoint_weights(checkpoint)
    # Strict: a checkpoint of another model must fail here, not export half of itself.
    model.load_state_dict(state, strict=True)
    export_model(
        model.state_dict(),
        model,
        load_tokenizer(cfg.model),
        label_maps,
        out,
        export_inputs(cfg),
    )
    logger.info(f"exported {checkpoint} to {out}")
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
