"""Faults: nothing is lost when a loss goes non-finite, the disk fills up during a
checkpoint, Ctrl-C arrives or a data file changes under its cache; no secret given by
environment variable reaches a file or the log; nothing on disk is unpickled.

The runs are the real entry point on the tiny model, in-process through ``run_cli``
with the fault patched in, or in a subprocess where a signal must be delivered.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl_dist import checkpoint as C
from mtl_dist import engine as E
from mtl_dist.checkpoint import CheckpointError, find_checkpoint, read_trainer_state
from mtl_dist.config import Config, DataConfig, ModelConfig, TaskConfig
from mtl_dist.data import build_label_maps, load_raw, tokenize
from mtl_dist.distributed import World
from mtl_dist.run import (
    EXIT_CHECKPOINT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_REQUEUE,
    EXIT_TRAINING_STOPPED,
    run_cli,
)
from mtl_dist.train import main as train_main
from tests.conftest import (
    REPO,
    child_env,
    make_rows,
    read_metrics,
    tiny_args,
    wait_for,
    write_jsonl,
)

SECRET = "hf_mtl-test-secret-6d1f0c"


def args_for(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_args(
        model,
        data,
        out,
        "--epochs",
        "1",
        "--log_every",
        "1",
        "--checkpoint_every",
        "2",
        "--checkpoint_at_epoch_end",
        "false",
        *extra,
    )


def run(args: list[str], capsys) -> tuple[int, str]:
    code = run_cli(train_main, args)
    return code, capsys.readouterr().err


def latest(out: Path) -> str:
    return (out / "checkpoints" / C.LATEST).read_text().strip()


def finite_weights(checkpoint: Path) -> bool:
    state = torch.load(
        checkpoint / C.ENGINE_DIR / E.TORCH_STATE, map_location="cpu", weights_only=True
    )
    return all(bool(torch.isfinite(t).all()) for t in state["model"].values())


# ---------------------------------------------------------------------------------------
# A non-finite loss.


def inject_nan(monkeypatch, task: str, step: int) -> None:
    """The forward passes of training step ``step`` return NaN logits for ``task``."""
    taken: list[str] = []
    for name in ("step", "skip_step"):
        original = getattr(E.TorchEngine, name)

        def counted(self, _original=original, _name=name):
            taken.append(_name)
            return _original(self)

        monkeypatch.setattr(E.TorchEngine, name, counted)
    forward = E.TorchEngine.forward

    def nan_forward(self, batch):
        logits = forward(self, batch)
        if self.module.training and len(taken) + 1 == step:
            logits = {**logits, task: logits[task] * torch.nan}
        return logits

    monkeypatch.setattr(E.TorchEngine, "forward", nan_forward)


@pytest.mark.slow
def test_nonfinite_loss_stop_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = args_for(tiny_model_dir, tiny_data_dir, out, "--max_steps", "6")
    inject_nan(monkeypatch, "mood", step=3)
    code, stderr = run(args + ["--nonfinite_loss", "stop"], capsys)
    assert code == EXIT_TRAINING_STOPPED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert (
        "error: step 3: loss of mood (nan) not finite on rank(s) [0]; every rank "
        "stopped (nonfinite_loss=stop)" in stderr
    )
    assert latest(out) == "step-00000002" and not (out / "model").exists()
    assert finite_weights(out / "checkpoints" / "step-00000002")

    monkeypatch.undo()  # the fault is gone: the run continues from step 2
    code, stderr = run(args + ["--nonfinite_loss", "stop", "--resume", "auto"], capsys)
    assert code == 0, stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'}" in stderr
    assert (out / "model").is_dir()


@pytest.mark.slow
def test_nonfinite_loss_skip_drops_that_update_only(
    tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch
):
    out = tmp_path / "out"
    inject_nan(monkeypatch, "mood", step=3)
    code, stderr = run(
        args_for(tiny_model_dir, tiny_data_dir, out, "--max_steps", "4"), capsys
    )
    assert code == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "not finite" in line]
    assert len(warnings) == 1
    assert "WARNING step 3: loss of mood (nan) not finite on rank(s) [0]" in warnings[0]
    assert "every rank skips this update (nonfinite_loss=skip)" in warnings[0]
    assert latest(out) == "step-00000004"
    assert finite_weights(out / "checkpoints" / "step-00000004")


# ---------------------------------------------------------------------------------------
# A full disk.


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_resumable(
    tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = args_for(tiny_model_dir, tiny_data_dir, out, "--max_steps", "4")
    real_save = torch.save

    def save(obj, f, *rest, **kwargs):
        if ".tmp-step-00000004" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a file")  # then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *rest, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, stderr = run(args, capsys)
    assert code == EXIT_CHECKPOINT_FAILED, stderr[-3000:]
    assert "Traceback" not in stderr
    previous = out / "checkpoints" / "step-00000002"
    assert (
        "error: checkpoint step-00000004 could not be written: No space left on "
        f"device ({out / 'checkpoints' / '.tmp-step-00000004'}"
    ) in stderr
    assert f"the previous checkpoint {previous} is intact" in stderr
    assert "then continue with --resume auto" in stderr
    assert latest(out) == "step-00000002"
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert find_checkpoint("auto", out) == previous
    assert read_trainer_state(previous)["step"] == 2 and finite_weights(previous)
    assert not (out / "model").exists()

    monkeypatch.undo()  # space again
    code, stderr = run(args + ["--resume", "auto"], capsys)
    assert code == 0, stderr[-3000:]
    assert f"resumed from {previous}" in stderr
    assert latest(out) == "step-00000004" and (out / "model").is_dir()
    assert read_metrics(out)[-1]["step"] == 4


class TinyEngine:
    def __init__(self, value: float) -> None:
        self.value = value

    def save_state(self, directory: Path) -> None:
        torch.save({"w": torch.full((2,), self.value)}, directory / "w.pt")


def test_disk_full_while_publishing_keeps_the_latest_pointer(tmp_path, monkeypatch):
    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    state = {"step": 1, "epoch": 0, "step_in_epoch": 1, "world_size": 1}
    C.save_checkpoint(TinyEngine(1.0), state, tmp_path, world, keep=3)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == C.LATEST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", replace)
    with pytest.raises(CheckpointError, match="could not be published: No space left"):
        C.save_checkpoint(TinyEngine(2.0), {**state, "step": 2}, tmp_path, world, 3)
    root = tmp_path / "checkpoints"
    assert latest(tmp_path) == "step-00000001"
    assert not (root / f".{C.LATEST}.tmp").exists()  # no half-written pointer left
    assert find_checkpoint("auto", tmp_path) == root / "step-00000001"


# ---------------------------------------------------------------------------------------
# Ctrl-C, and a secret in the environment.


def files_holding(directory: Path, text: str) -> list[str]:
    needle = text.encode()
    return [
        str(p) for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()
    ]


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_cleanly_and_no_secret_is_written(
    tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = args_for(tiny_model_dir, tiny_data_dir, out, "--checkpoint_every", "0")
    # A token given the usual way, by environment variable, in the child from its start.
    env = {**child_env(), "HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtl_dist.train", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    seen = wait_for(proc, r"step 3/12 ")
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_REQUEUE, rest[-3000:]
    stderr = "".join(seen) + rest
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "SIGINT received: saving a checkpoint at step" in stderr
    match = re.search(r"interrupted: stopped at step (\d+)/12 by SIGINT", stderr)
    assert match, stderr[-3000:]
    stopped = int(match.group(1))
    assert 3 <= stopped < 12
    assert read_trainer_state(find_checkpoint("auto", out))["step"] == stopped
    assert (out / "REQUEUE").is_file() and not (out / "model").exists()

    monkeypatch.setenv("HF_TOKEN", SECRET)
    code, resumed = run(args + ["--resume", "auto"], capsys)
    assert code == 0, resumed[-3000:]
    assert (out / "model").is_dir()
    # Neither the config, the metrics, the checkpoints, TensorBoard nor the log.
    assert files_holding(out, SECRET) == []
    assert SECRET not in stderr and SECRET not in resumed


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt  # what the second SIGINT raises, wherever it lands

    assert run_cli(interrupted, []) == EXIT_INTERRUPTED
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert "interrupted: a second Ctrl-C stopped the run at once" in stderr
    assert "--resume auto" in stderr


# ---------------------------------------------------------------------------------------
# A data file that changes under its cache.


def rewrite_keeping_size_and_mtime(path: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` (same length) and put the mtime back, as `cp -p` or
    `rsync -t` would leave it."""
    assert len(old) == len(new)
    stat = path.stat()
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_a_data_file_changed_under_its_cache_is_read_and_tokenised_again(
    tmp_path, tiny_model_dir
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = make_rows(12, 1)
    rows[0]["text"] = "pizza great"
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = Config(
        tasks=[TaskConfig("topic"), TaskConfig("mood")],
        data=DataConfig(dataset=str(tmp_path)),
    )

    def load():
        raw = load_raw(cfg.data)
        maps = build_label_maps(raw["train"], cfg.tasks)
        return raw, maps, tokenize(raw, tokenizer, cfg, maps)

    raw, maps, data = load()
    assert raw["train"][0]["text"] == "pizza great"
    before = data.splits["train"][0]["input_ids"]
    rewrite_keeping_size_and_mtime(
        tmp_path / "train.jsonl", "pizza great", "bread awful"
    )
    rewrite_keeping_size_and_mtime(tmp_path / "train.jsonl", "positive", "upbeat!!")

    raw, maps, data = load()
    assert raw["train"][0]["text"] == "bread awful"
    assert maps["mood"] == ["negative", "upbeat!!"]
    assert data.splits["train"][0]["input_ids"] != before
    assert data.splits["train"][0]["input_ids"] == tokenizer("bread awful")["input_ids"]


@pytest.mark.slow
def test_a_rerun_on_a_changed_file_trains_on_the_new_content(
    tmp_path, tiny_model_dir, capsys
):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", make_rows(24, 1))
    out = tmp_path / "out"
    args = args_for(tiny_model_dir, data, out, "--max_steps", "1")
    code, stderr = run(args, capsys)
    assert code == 0, stderr[-3000:]
    assert json.loads((out / "labels.json").read_text())["mood"] == [
        "negative",
        "positive",
    ]
    rewrite_keeping_size_and_mtime(data / "train.jsonl", "positive", "upbeat!!")
    code, stderr = run(args + ["--overwrite", "true"], capsys)
    assert code == 0, stderr[-3000:]
    labels = json.loads((out / "labels.json").read_text())
    assert labels["mood"] == ["negative", "upbeat!!"]
    assert json.loads((out / "model" / "mtl_model.json").read_text())["tasks"][1] == {
        "name": "mood",
        "labels": ["negative", "upbeat!!"],
    }


# ---------------------------------------------------------------------------------------
# What is read from disk, and what code runs.


def package_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in (REPO / "mtl_dist").glob("*.py")}


def test_nothing_is_unpickled_and_no_remote_code_is_trusted_by_default():
    for name, text in package_sources().items():
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b", text, re.M), name
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{name}: {call}"
        assert "weights_only=False" not in text, name
        assert "trust_remote_code=True" not in text, name
    assert ModelConfig().trust_remote_code is False
