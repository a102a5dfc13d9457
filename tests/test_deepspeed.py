"""DeepSpeed on CPU over gloo: ZeRO runs end to end, the loss contract against DDP, and
how a DeepSpeed JSON is resolved against the training config.

The JSON tests are fast and need no DeepSpeed. The runs are slow (15-30 s each on 2
cores, about 2.5 minutes in all, once DeepSpeed's small CPU ops are compiled; the first
run on a machine compiles them, about 2 minutes more) and skip without DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl_dist.config import Config
from mtl_dist.ds_config import AUTO, resolve_ds_config
from mtl_dist.errors import ConfigError, ConfigErrors
from tests.conftest import REPO, read_metrics, run_module, tiny_args

DS_CONFIGS = REPO / "ds_configs"
SHIPPED = sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
TOLERANCE = 1e-4
"""Largest relative difference allowed between DDP's and DeepSpeed's fp32 losses."""

SLOW = [pytest.mark.slow, pytest.mark.distributed]


# -------------------------------------------------------------------------------------
# Resolving the JSON (fast).


def resolve(tmp_path: Path, values: dict | str, **overrides):
    """``resolve_ds_config`` on ``values`` written to a file: 2 ranks x micro-batch 4 x
    accumulation 2 = global batch 16."""
    path = tmp_path / "ds.json"
    path.write_text(values if isinstance(values, str) else json.dumps(values))
    cfg = Config(global_batch_size=16, **overrides)
    return resolve_ds_config(
        str(path), cfg, micro_batch_size=4, accumulation=2, on_cpu=True
    )


def autos_left(values) -> list:
    if isinstance(values, dict):
        return [a for v in values.values() for a in autos_left(v)]
    if isinstance(values, list):
        return [a for v in values for a in autos_left(v)]
    return [values] if values == AUTO else []


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_resolve_with_every_auto_filled(name, tmp_path):
    shipped = json.loads((DS_CONFIGS / f"{name}.json").read_text())
    ds = resolve(
        tmp_path,
        shipped,
        lr=2e-5,
        adam_betas=[0.9, 0.98],
        adam_eps=1e-6,
        weight_decay=0.05,
        max_grad_norm=0.5,
        precision="bf16",
    )
    assert autos_left(ds) == []
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (16, 4, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {
        "lr": 2e-5,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "weight_decay": 0.05,
        "torch_adam": name != "zero3_offload",
    }
    assert ds["zero_optimization"]["stage"] == shipped["zero_optimization"]["stage"]


def test_repeating_the_training_config_is_not_a_contradiction(tmp_path):
    ds = resolve(
        tmp_path,
        {
            "train_batch_size": 16,
            "gradient_clipping": 1.0,
            "fp16": {"enabled": False},
            "optimizer": {"type": "AdamW"},
        },
        precision="fp32",
    )
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["lr"] == 5e-5


def test_all_contradictions_come_in_one_error(tmp_path):
    with pytest.raises(ConfigErrors) as caught:
        resolve(
            tmp_path, {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 5.0}
        )
    assert isinstance(caught.value, ConfigError)  # the CLI prints it and exits with 2
    assert [e.key for e in caught.value.errors] == [
        "train_micro_batch_size_per_gpu",
        "gradient_clipping",
    ]
    message = str(caught.value)
    assert "2 problem(s)" in message
    assert "train_micro_batch_size_per_gpu=8: contradicts micro_batch_size=4" in message
    assert "gradient_clipping=5.0: contradicts max_grad_norm=1.0" in message
    assert 'set it to "auto"' in message


def test_malformed_json_names_line_and_column(tmp_path):
    text = '{\n  "train_batch_size": 16,\n  "bf16": {"enabled": auto}\n}\n'
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, text)
    assert caught.value.key == "deepspeed"
    assert "line 3, column 23" in str(caught.value)


def test_unknown_zero_stage_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, {"zero_optimization": {"stage": 7}})
    assert "zero_optimization.stage=7: no such ZeRO stage" in str(caught.value)


def test_scheduler_section_is_refused(tmp_path):
    scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, {"scheduler": scheduler})
    assert caught.value.key == "scheduler"
    assert "warmup_ratio" in str(caught.value)


def test_auto_where_the_training_config_has_no_value_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve(
            tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": AUTO}}
        )
    assert caught.value.key == "zero_optimization.reduce_bucket_size"


# -------------------------------------------------------------------------------------
# Runs (slow): 2 processes over gloo, as `torchrun ... -m mtl_dist.train` would.


@pytest.fixture(scope="module")
def deepspeed():
    return pytest.importorskip("deepspeed")


def train(out: Path, model_dir: Path, data_dir: Path, *extra: str, nproc: int = 2):
    result = run_module(
        tiny_args(model_dir, data_dir, out, "--progress_bar", "false", *extra),
        nproc=nproc,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("name", "stage", "extra"),
    [
        ("zero2", 2, ()),
        # ZeRO-3 partitions the weights: evaluation and export must gather them on every
        # rank, and accumulation must go through DeepSpeed's micro-step count.
        ("zero3", 3, ("--micro_batch_size", "2")),
    ],
    ids=["zero2-bf16", "zero3-bf16-accumulation"],
)
def test_two_process_run_trains_evaluates_and_exports(
    name, stage, extra, deepspeed, tmp_path, tiny_model_dir, tiny_data_dir
):
    from mtl_dist.model import load_exported

    out = tmp_path / name
    result = train(
        out,
        tiny_model_dir,
        tiny_data_dir,
        "--precision",
        "bf16",
        "--deepspeed",
        str(DS_CONFIGS / f"{name}.json"),
        *extra,
    )
    assert f"DeepSpeed ZeRO stage {stage}" in result.stderr
    assert f"x accumulation {2 if extra else 1} x world size 2" in result.stderr
    assert "step 24/24" in result.stderr
    metrics = read_metrics(out)
    assert [m["split"] for m in metrics] == ["validation", "validation", "test"]
    for task in ("topic", "mood"):
        assert all(0.0 <= m[f"{task}/accuracy"] <= 1.0 for m in metrics), task
    # A full model, not rank 0's shard: loading checks every shape against the config.
    model, _, label_maps = load_exported(out / "model")
    assert sorted(label_maps) == ["mood", "topic"]
    assert model.heads["topic"].weight.shape == (3, 32)


def logged(out: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def exported_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return {
        f"{f.name}:{k}": v
        for f in sorted((out / "model").glob("*.safetensors"))
        for k, v in load_file(str(f)).items()
    }


FP32 = (
    "--precision",
    "fp32",
    "--model.dropout",
    "0",
    "--model.head_dropout",
    "0",
    "--max_steps",
    "4",
    "--log_every",
    "1",
    "--head_lr",
    "3e-3",
)
"""Deterministic, short, and with a head LR unlike the encoder's (per-group LRs)."""


@pytest.fixture(scope="module")
def ddp_fp32(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("ddp_fp32")
    train(out, tiny_model_dir, tiny_data_dir, *FP32)
    return out


@pytest.mark.parametrize(
    ("name", "nproc", "extra"),
    [
        pytest.param("zero2", 2, (), marks=SLOW, id="zero2"),
        pytest.param(
            "zero3", 2, ("--micro_batch_size", "2"), marks=SLOW, id="zero3-accumulation"
        ),
        # No torchrun at all: DeepSpeed still needs its process group, of one.
        pytest.param("zero2", 1, (), marks=SLOW, id="zero2-one-process"),
    ],
)
def test_fp32_deepspeed_logs_the_losses_of_ddp(
    name, nproc, extra, deepspeed, ddp_fp32, tmp_path, tiny_model_dir, tiny_data_dir
):
    out = tmp_path / name
    train(
        out,
        tiny_model_dir,
        tiny_data_dir,
        *FP32,
        "--deepspeed",
        str(DS_CONFIGS / f"{name}.json"),
        *extra,
        nproc=nproc,
    )
    # The trainer hands DeepSpeed each micro-step's share of the global-batch loss times
    # world size x accumulation. A wrong factor scales every gradient: clipping and
    # Adam hide that from the losses, the logged grad norm does not.
    for tag in ("train/loss", "train/loss_topic", "train/loss_mood", "train/grad_norm"):
        ours, reference = logged(out, tag), logged(ddp_fp32, tag)
        assert sorted(ours) == sorted(reference) == [1, 2, 3, 4], tag
        worst = max(abs(ours[s] - reference[s]) / abs(reference[s]) for s in reference)
        assert worst <= TOLERANCE, (tag, ours, reference)
    for tag in ("train/lr", "train/head_lr"):
        assert logged(out, tag) == pytest.approx(logged(ddp_fp32, tag), rel=1e-6), tag
    # The exported weights are the same training's too (under ZeRO-3, gathered). Not
    # tensor by tensor: Adam turns rounding noise in a gradient that is zero in exact
    # arithmetic (attention's key bias) into updates of the LR's size.
    ours, reference = exported_weights(out), exported_weights(ddp_fp32)
    assert sorted(ours) == sorted(reference)
    assert all(ours[k].shape == v.shape for k, v in reference.items())
    gap = torch.cat([(ours[k] - v).flatten() for k, v in reference.items()]).norm()
    scale = torch.cat([v.flatten() for v in reference.values()]).norm()
    assert gap <= TOLERANCE * scale, (float(gap), float(scale))
