"""Checkpoints that survive a kill at any moment, and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    step-00000120/            one complete checkpoint
        engine/               model, optimizer, LR schedule (torch file or DeepSpeed shards)
        rng-rank<R>.pt        every rank's RNG states (dropout masks continue exactly)
        trainer_state.json    step, epoch, position inside the epoch, best metric, labels
    latest                    name of the newest complete checkpoint
    best                      name of the best checkpoint by the configured metric

A checkpoint is written into ``.tmp-step-...`` and renamed only after every rank has
finished writing it; ``latest`` is replaced atomically after that. A kill during a save
therefore leaves the previous checkpoint and pointer untouched. Loading uses
``torch.load(weights_only=True)`` only: nothing on disk is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_dist import distributed as D
from mtl_dist.distributed import World
from mtl_dist.errors import ConfigError
from mtl_dist.log import logger

ROOT = "checkpoints"
LATEST = "latest"
BEST = "best"
STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / ROOT


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half-written pointer
        raise


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable weights-only)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(words), gauss],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine: Any,
    trainer_state: dict[str, Any],
    output_dir: Path,
    world: World,
    keep: int,
) -> Path:
    """Write a checkpoint from every rank; publish it only when all ranks succeeded."""
    root = checkpoint_root(output_dir)
    name = f"step-{trainer_state['step']:08d}"
    tmp = root / f".tmp-{name}"
    failed = torch.zeros(1)
    error = ""
    if world.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / ENGINE_DIR).mkdir(parents=True)
        except OSError as exc:  # the writes below then fail on every rank too
            failed += 1
            error = _describe(exc, tmp)
    D.barrier()
    # Every rank attempts its writes even after a failure elsewhere: under DeepSpeed
    # the save is a collective, and a rank that skipped it would leave the rest hanging.
    try:
        engine.save_state(tmp / ENGINE_DIR)
        torch.save(rng_state(), tmp / f"rng-rank{world.rank}.pt")
        if world.is_main:
            _write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1))
    except OSError as exc:  # e.g. ENOSPC; every rank must learn of it, or some hang
        failed += 1
        error = error or _describe(exc, tmp)
    # Every rank reports; the checkpoint is published only if none failed.
    if D.all_reduce_sum(failed).item() > 0:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
        raise CheckpointError(
            f"checkpoint {name} could not be written: "
            f"{error or 'failed on another rank'}; {_previous(root)}: free space "
            "(or fix the file system), then continue with --resume auto"
        )
    final = root / name
    if world.is_main:
        try:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(root / LATEST, name + "\n")
            if trainer_state.get("best_step") == trainer_state["step"]:
                _write_atomic(root / BEST, name + "\n")
        except OSError as exc:
            # `latest` still names the previous checkpoint, which nothing touched.
            raise CheckpointError(
                f"checkpoint {name} could not be published: {exc.strerror or exc}; "
                f"{_previous(root)}: free space, then continue with --resume auto"
            ) from None
        _prune(root, keep)
    D.barrier()
    logger.info(f"checkpoint saved: {final}")
    return final


def _describe(exc: OSError, where: Path) -> str:
    return f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or where})"


def _previous(root: Path) -> str:
    """What a failed save left to resume from, for its error message."""
    name = _pointer(root, LATEST)
    if name is None:
        return "no earlier checkpoint exists, and none was changed"
    return f"the previous checkpoint {root / name} is intact"


def _pointer(root: Path, name: str) -> str | None:
    path = root / name
    return path.read_text().strip() if path.is_file() else None


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and the best one; drop the rest."""
    protected = {_pointer(root, BEST), _pointer(root, LATEST)}
    complete = sorted(p.name for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    for name in complete[:-keep] if keep > 0 else []:
        if name not in protected:
            shutil.rmtree(root / name, ignore_errors=True)


def find_checkpoint(resume: str, output_dir: Path) -> Path | None:
    """``auto``: the newest complete checkpoint of the run (None if there is none);
    otherwise the given checkpoint directory, which must be complete."""
    if resume == "auto":
        root = checkpoint_root(output_dir)
        name = _pointer(root, LATEST)
        if name and (root / name / STATE_FILE).is_file():
            return root / name
        complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
        return complete[-1] if complete else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            "resume",
            resume,
            f"give a checkpoint directory (it holds {STATE_FILE}) or `auto`",
            "not a complete checkpoint",
        )
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "resume",
            str(path),
            "resume from another checkpoint (or start a new run): this one was "
            "not written by mtl_dist, or was changed since",
            f"{STATE_FILE} is not valid JSON ({exc})",
        ) from None


def load_checkpoint(engine: Any, path: Path, world: World) -> dict[str, Any]:
    """Restore engine state and this rank's RNG; returns the trainer state."""
    state = read_trainer_state(path)
    engine.load_state(path / ENGINE_DIR)
    rng_file = path / f"rng-rank{world.rank}.pt"
    if state.get("world_size") == world.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning(
            f"resuming on {world.world_size} ranks a checkpoint written on "
            f"{state.get('world_size')}: data order is exact, dropout RNG "
            "streams are not"
        )
    logger.info(
        f"resumed from {path} at step {state['step']} (epoch {state['epoch'] + 1},"
        f" {state['step_in_epoch']} steps into it)"
    )
    return state
