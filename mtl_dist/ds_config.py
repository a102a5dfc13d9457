"""DeepSpeed JSON: fill every ``"auto"`` from the training config, refuse contradictions.

The training config owns batch sizes, accumulation, clipping, precision and the optimizer's
hyper-parameters. A DeepSpeed file may leave those as ``"auto"`` or repeat the same value;
any other value is a contradiction, and all of them are reported in one error.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mtl_dist.config import Config
from mtl_dist.errors import ConfigError, ConfigErrors

AUTO = "auto"
STAGES = (0, 1, 2, 3)


def read_ds_json(path: str) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError("deepspeed", path,
                          f"fix the JSON at line {exc.lineno}, column {exc.colno} "
                          f"({exc.msg})", "malformed JSON") from None
    if not isinstance(values, dict):
        raise ConfigError("deepspeed", path, "write the DeepSpeed config as a JSON object")
    return values


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return device not in (None, "none")


def resolve_ds_config(path: str, cfg: Config, micro_batch_size: int, accumulation: int,
                      on_cpu: bool) -> dict[str, Any]:
    """The DeepSpeed config to hand to ``deepspeed.initialize``, with no ``"auto"`` left."""
    ds = copy.deepcopy(read_ds_json(path))
    errors: list[ConfigError] = []

    def fill(section: dict[str, Any], key: str, value: Any, dotted: str, owner: str) -> None:
        current = section.get(key, AUTO)
        if current == AUTO:
            section[key] = value
        elif current != value:
            errors.append(ConfigError(
                dotted, current, f"set it to \"auto\" (or {value!r}) and change {owner} in "
                "the training config instead", f"contradicts {owner}={value!r}"))

    fill(ds, "train_micro_batch_size_per_gpu", micro_batch_size,
         "train_micro_batch_size_per_gpu", "micro_batch_size")
    fill(ds, "gradient_accumulation_steps", accumulation, "gradient_accumulation_steps",
         "global_batch_size / (micro_batch_size x world_size)")
    fill(ds, "train_batch_size", cfg.global_batch_size, "train_batch_size",
         "global_batch_size")
    fill(ds, "gradient_clipping", cfg.max_grad_norm, "gradient_clipping", "max_grad_norm")
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        fill(section, "enabled", cfg.precision == name, f"{name}.enabled", "precision")

    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in STAGES:
        errors.append(ConfigError("zero_optimization.stage", stage,
                                  f"use one of {STAGES}", "no such ZeRO stage"))
    if "scheduler" in ds:
        errors.append(ConfigError("scheduler", ds["scheduler"],
                                  "remove the scheduler section: warmup_ratio and the "
                                  "linear decay come from the training config",
                                  "the training config owns the LR schedule"))
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(optimizer.get("type", "AdamW")).lower() != "adamw":
        errors.append(ConfigError("optimizer.type", optimizer.get("type"),
                                  "use \"AdamW\" (the toolkit's optimizer)"))
    params = optimizer.setdefault("params", {})
    fill(params, "lr", cfg.lr, "optimizer.params.lr", "lr")
    fill(params, "betas", list(cfg.adam_betas), "optimizer.params.betas", "adam_betas")
    fill(params, "eps", cfg.adam_eps, "optimizer.params.eps", "adam_eps")
    fill(params, "weight_decay", cfg.weight_decay, "optimizer.params.weight_decay",
         "weight_decay")
    # torch's AdamW on CPU avoids compiling DeepSpeed's fused kernel; an offloaded
    # optimizer must be DeepSpeed's own CPU Adam, which ZeRO insists on.
    if params.get("torch_adam", AUTO) == AUTO:
        params["torch_adam"] = on_cpu and not offloads_optimizer(ds)
    if errors:
        raise ConfigErrors(errors, f"DeepSpeed config {path} contradicts the training config")
    ds.setdefault("steps_per_print", 10**9)  # the toolkit logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds
